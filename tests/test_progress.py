"""A slow first start says what it does (abnexp.progress): the native kernels' build, the demo data."""
from __future__ import annotations

import logging
import time

import pytest

from abnexp.progress import announced


def messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "abnexp"]


def test_a_step_shorter_than_the_allowed_silence_says_nothing(caplog):
    caplog.set_level(logging.INFO, logger="abnexp")
    with announced("building", "built", after=5.0):
        pass
    assert messages(caplog) == []


def test_a_long_step_is_announced_while_it_runs_then_timed(caplog):
    caplog.set_level(logging.INFO, logger="abnexp")
    with announced("building", "built", after=0.05):
        time.sleep(0.3)
        assert messages(caplog) == ["building"]  # said during the step, not after it
    assert messages(caplog)[1] in ("built in 0 s", "built in 1 s")


def test_after_zero_announces_first_and_a_failure_is_not_called_done(caplog):
    caplog.set_level(logging.INFO, logger="abnexp")
    with pytest.raises(OSError):
        with announced("making", "made"):
            assert messages(caplog) == ["making"]
            raise OSError("disk full")
    assert messages(caplog) == ["making"]


def test_generated_data_is_announced_once_then_found_quietly(tmp_path, caplog):
    from abnexp.data.demo import generate_once

    caplog.set_level(logging.INFO, logger="abnexp")
    root = tmp_path / "demo_x"
    generate_once(root, "done", lambda folder: (folder.mkdir(), (folder / "done").write_text("")))
    said = messages(caplog)
    assert len(said) == 2 and "making the demo data set demo_x once" in said[0] and str(root) in said[0]
    assert said[1].startswith("demo data made in ")
    caplog.clear()
    generate_once(root, "done", lambda folder: pytest.fail("a cached data set is not written again"))
    assert messages(caplog) == []


def test_a_native_build_that_takes_long_is_announced(monkeypatch, caplog):
    """The kernels' first build (abnexp.norm.native.probe) is wrapped: a build slower than the allowed
    silence logs what is built before it ends, and its duration."""
    from abnexp.norm import native

    caplog.set_level(logging.INFO, logger="abnexp")
    monkeypatch.setattr(native, "_BUILT", None)
    monkeypatch.setattr(native, "_FAILED", None)
    monkeypatch.setattr(native, "announced", lambda message, done, after: announced(message, done, after=0.05))

    def slow_failing_build():
        time.sleep(0.3)
        raise native.KernelBuildError("no compiler")

    monkeypatch.setattr(native, "build", slow_failing_build)
    assert native.probe("cpu") == "no compiler"
    assert [m.split(",")[0] for m in messages(caplog)] == ["building the native kernels for this machine"]
