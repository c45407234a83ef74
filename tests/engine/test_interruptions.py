"""Interruptions: step / best checkpoints, preemption signals (SIGTERM, SIGUSR1), unreadable
checkpoints on resume, and a process killed while it writes a checkpoint."""
from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from abnexp.engine.checkpoint import (BEST, EXIT_PREEMPTED, LAST, Checkpoints, PreemptionSignals, find_resume,
                                      load_checkpoint, load_newest, save_checkpoint)
from abnexp.errors import ConfigError
from conftest import run_cli, train_losses

# 4 training images per class (10 steps per epoch at batch 4) and 2 for validation: 20 steps in all
SMALL = ["model=resnet18", "data.batch_size=4", "data.crop_size=32", "data.large_crop_size=40",
         "data.num_workers=0", "trainer.log_every=1", "trainer.epochs=2"]


def val_rows(run: Path) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["split"] == "val"]


def assert_same_losses(run: Path, reference: Path) -> None:
    got, want = train_losses(run), train_losses(reference)
    assert sorted(got) == sorted(want)
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-5, abs=1e-6), step


def tiny_state(value: float, step: int) -> dict:
    return {"model": {"w": torch.full((4,), value)}, "config": "", "step": step}


# --- checkpoint bookkeeping (no training) ---------------------------------------------------------
def test_unreadable_newest_checkpoint_falls_back_to_previous(tmp_path, caplog):
    folder = tmp_path / "checkpoints"
    save_checkpoint(tiny_state(1.0, 4), folder / "step_4.pt")
    time.sleep(0.01)
    newest = save_checkpoint(tiny_state(2.0, 6), folder / LAST)
    newest.write_bytes(newest.read_bytes()[:50])  # truncated
    path, state = find_resume(None, tmp_path)
    assert path == folder / "step_4.pt" and state["step"] == 4
    assert any(LAST in r.message and "step_4.pt" in r.message for r in caplog.records)
    (folder / "step_4.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="no checkpoint .* can be read"):
        load_newest(folder)
    assert load_newest(tmp_path / "nothing") is None


def test_keep_last_and_best(tmp_path):
    ckpts = Checkpoints(tmp_path, every=2, minutes=0, keep_last=2, enabled=True)
    assert [s for s in range(1, 7) if ckpts.step_due(s)] == [2, 4, 6]
    for step in (2, 4, 6):
        ckpts.write(tiny_state(step, step), step_file=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_4.pt", "step_6.pt"]
    assert ckpts.improved({"top1": 50.0, "top5": 90.0}) and not ckpts.improved({"top1": 40.0, "top5": 99.0})
    ckpts.write(tiny_state(0.5, 10), best=True)
    assert load_checkpoint(tmp_path / BEST)["best"] == 50.0 == load_checkpoint(tmp_path / LAST)["best"]
    assert ckpts.latest == tmp_path / LAST
    assert Checkpoints(tmp_path, 0, 0.5, 1, enabled=True).time_due() is False  # 30 s not elapsed


@pytest.mark.parametrize("key,value,valid", [("checkpoint_every", -1, ">= 0"), ("keep_last", 0, ">= 1"),
                                             ("checkpoint_minutes", -0.5, ">= 0")])
def test_bad_checkpoint_settings_are_refused(key, value, valid, tmp_path):
    from abnexp.config import compose
    from abnexp.engine.trainer import train

    with pytest.raises(ConfigError, match=f"trainer.{key}={value}: valid values are {valid}"):
        train(compose([f"trainer.{key}={value}"]), tmp_path)
    assert not (tmp_path / "checkpoints").exists()


def test_signals_only_set_a_flag_and_handlers_are_restored():
    def previous(signum, frame):
        raise AssertionError("the previous handler ran")

    old = signal.signal(signal.SIGUSR1, previous)
    try:
        with PreemptionSignals() as signals:
            os.kill(os.getpid(), signal.SIGUSR1)
            assert signals.received == signal.SIGUSR1
            os.kill(os.getpid(), signal.SIGTERM)  # the process lives on
            assert signals.received == signal.SIGTERM
        assert signal.getsignal(signal.SIGUSR1) is previous
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGUSR1, old)


# --- training runs -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference(tiny_root, tmp_path_factory) -> Path:
    """An uninterrupted run of SMALL (20 steps, validation after steps 10 and 20)."""
    from abnexp.cli import main

    run = tmp_path_factory.mktemp("reference")
    main(["train", f"hydra.run.dir={run}", *SMALL, f"data.root={tiny_root}"])
    return run


@pytest.mark.slow
def test_reference_run_writes_best(reference):
    top1 = [r["top1"] for r in val_rows(reference)]
    assert len(top1) == 2
    best = load_checkpoint(reference / "checkpoints" / BEST)
    assert best["best"] == max(top1) and best["metrics"]["top1"] == max(top1)
    assert best["step"] == 10 * (top1.index(max(top1)) + 1)
    assert not list((reference / "checkpoints").glob("step_*.pt"))  # checkpoint_every=0: epoch ends only


@pytest.mark.slow
def test_sigusr1_step_checkpoints_and_fallback_resume(reference, tiny_root, tmp_path, capsys, monkeypatch):
    """A real SIGUSR1 (sent by the process to itself during step 3) ends the run after that step;
    with last.pt then truncated, the resume falls back to step_2.pt and reproduces the losses."""
    from abnexp.tasks.cls import ClassificationTask

    original, calls = ClassificationTask.loss, []

    def loss_then_signal(self, model, batch, ctx):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGUSR1)
        return original(self, model, batch, ctx)

    run = tmp_path / "run"
    args = ["train", f"hydra.run.dir={run}", *SMALL, f"data.root={tiny_root}"]
    monkeypatch.setattr(ClassificationTask, "loss", loss_then_signal)
    handler_before = signal.getsignal(signal.SIGUSR1)
    code, _, _ = run_cli([*args, "trainer.checkpoint_every=1", "trainer.keep_last=1"], capsys)
    assert code == EXIT_PREEMPTED
    assert signal.getsignal(signal.SIGUSR1) is handler_before
    folder = run / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == [LAST, "step_2.pt"]
    assert load_checkpoint(folder / LAST)["step"] == 3 and max(train_losses(run)) == 3
    assert "received SIGUSR1: checkpoint written at epoch 0, step 3" in (run / "train.log").read_text()

    monkeypatch.setattr(ClassificationTask, "loss", original)
    (folder / LAST).write_bytes((folder / LAST).read_bytes()[:1000])
    code, _, _ = run_cli(args, capsys)
    assert code == 0
    log = (run / "train.log").read_text()
    assert "last.pt cannot be read" in log and "resuming from the previous checkpoint" in log and "step_2.pt" in log
    assert_same_losses(run, reference)
    assert val_rows(run) == val_rows(reference)


@pytest.mark.slow
def test_checkpoint_minutes_writes_step_checkpoints(tiny_root, tmp_path, capsys):
    run = tmp_path / "run"
    code, _, _ = run_cli(["train", f"hydra.run.dir={run}", *SMALL, f"data.root={tiny_root}", "trainer.max_steps=4",
                          "trainer.checkpoint_minutes=0.00001", "trainer.keep_last=2"], capsys)  # 0.6 ms: every step
    assert code == 0
    folder = run / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == [LAST, "step_2.pt", "step_3.pt"]  # step 4 ends: last.pt
    assert load_checkpoint(folder / "step_3.pt")["step"] == 3 and load_checkpoint(folder / LAST)["step"] == 4


def wait_for(condition, timeout: float, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the process ended (code {proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


@pytest.mark.slow
def test_sigterm_checkpoints_exits_and_resumes_exactly(reference, tiny_root, tmp_path, capsys):
    run = tmp_path / "run"
    log = (tmp_path / "out.txt").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "abnexp", "train", f"hydra.run.dir={run}", *SMALL,
                             f"data.root={tiny_root}"], stdout=log, stderr=subprocess.STDOUT)
    metrics = run / "metrics.jsonl"
    wait_for(lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 2, 120, proc, "2 steps")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == EXIT_PREEMPTED
    output = (tmp_path / "out.txt").read_text()
    assert f"exiting with code {EXIT_PREEMPTED}" in output
    step = load_checkpoint(run / "checkpoints" / LAST)["step"]
    assert 2 <= step < 20 and max(train_losses(run)) == step  # finished the step, then stopped

    code, _, _ = run_cli(["train", f"hydra.run.dir={run}", *SMALL, f"data.root={tiny_root}"], capsys)
    assert code == 0
    resumed = (run / "train.log").read_text()
    assert f"resumed from {run / 'checkpoints' / LAST} (epoch" in resumed and f"step {step})" in resumed
    assert_same_losses(run, reference)
    assert val_rows(run) == val_rows(reference)


KILLED_WRITER = """
import io, sys, time
import torch
import abnexp.engine.checkpoint as ck

path = sys.argv[1]
ck.save_checkpoint({"model": {"w": torch.zeros(3)}, "config": "old"}, path)
real_save = torch.save

def slow_save(obj, f):  # half the bytes, then a pause in the middle of the write
    buffer = io.BytesIO()
    real_save(obj, buffer)
    data = buffer.getvalue()
    f.write(data[: len(data) // 2])
    f.flush()
    print("writing", flush=True)
    time.sleep(60)
    f.write(data[len(data) // 2:])

torch.save = slow_save
ck.save_checkpoint({"model": {"w": torch.ones(1_000_000)}, "config": "new"}, path)
"""


@pytest.mark.slow
def test_kill_during_checkpoint_write_keeps_previous(tmp_path):
    folder = tmp_path / "checkpoints"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(folder / LAST)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert select.select([proc.stdout], [], [], 60)[0], "the writer did not start writing within 60 s"
        assert proc.stdout.readline().strip() == "writing"
        partial = list(folder.glob(f".{LAST}.*.tmp"))
        assert len(partial) == 1 and partial[0].stat().st_size > 1_000_000  # half of 4 MB
    finally:
        proc.kill()
    assert proc.wait(timeout=30) == -signal.SIGKILL
    assert sorted(p.name for p in folder.glob("*.pt")) == [LAST]
    state = load_checkpoint(folder / LAST)
    assert state["config"] == "old" and torch.equal(state["model"]["w"], torch.zeros(3))
    assert load_newest(folder)[0] == folder / LAST  # the leftover is never a resume candidate
    Checkpoints(folder, 0, 0, 1, enabled=True)  # a trainer starting in this run dir removes it
    assert not partial[0].exists()
