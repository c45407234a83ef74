"""Every bad input stops early with one clear message (exit code 1, no traceback)."""
from __future__ import annotations

from pathlib import Path

import pytest

from conftest import run_cli

FAST = ["trainer.max_steps=1", "data.num_workers=0", "data.batch_size=8", "data.crop_size=32"]


def _train(tmp_path, capsys, *overrides):
    return run_cli(["train", f"hydra.run.dir={tmp_path / 'run'}", *overrides], capsys)


def test_unknown_group_option_lists_choices(tmp_path, capsys):
    code, _, err = _train(tmp_path, capsys, "model=resnet19")
    assert code == 1
    assert "resnet19" in err and "resnet18" in err and "wideresnet38" in err
    assert "Traceback" not in err


def test_misspelled_key_fails_at_start(tmp_path, capsys):
    code, _, err = _train(tmp_path, capsys, "trainer.epoch=3")
    assert code == 1
    assert "epoch" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_bad_enum_value_lists_valid_values(tmp_path, capsys):
    code, _, err = _train(tmp_path, capsys, "amp=fp32")
    assert code == 1
    assert "bf16" in err and "fp16" in err


def test_imagenet_without_root(tmp_path, capsys):
    code, _, err = _train(tmp_path, capsys, "data=imagenet")
    assert code == 1
    assert "data.root is not set" in err and "<root>/train/<wnid>/*.JPEG" in err


def test_missing_root_names_path_and_layout(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    code, _, err = _train(tmp_path, capsys, "data=imagenet", f"data.root={missing}")
    assert code == 1
    assert str(missing) in err and "<root>/val/<wnid>/*.JPEG" in err


def test_malformed_root_without_val(tmp_path, capsys):
    (tmp_path / "in" / "train" / "n01").mkdir(parents=True)
    code, _, err = _train(tmp_path, capsys, "data=imagenet", f"data.root={tmp_path / 'in'}")
    assert code == 1
    assert "has no 'val' folder" in err


def test_wrong_class_count(tmp_path, capsys, demo_root):
    code, _, err = _train(tmp_path, capsys, f"data.root={demo_root}", "data.num_classes=1000", *FAST)
    assert code == 1
    assert "data.num_classes=10" in err


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_image_names_the_file(tmp_path, capsys, demo_root, workers):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(demo_root, root)
    for split in ("train", "val"):  # every image of one class corrupt: the first batch hits one
        for f in (root / split / "coins").iterdir():
            f.write_bytes(b"not a jpeg")
    code, _, err = _train(tmp_path, capsys, f"data.root={root}", *FAST, f"data.num_workers={workers}",
                          "data.batch_size=64")
    assert code == 1
    assert "cannot read image" in err and "coins" in err and ".JPEG" in err


def test_inplace_norm_with_relu_is_refused(tmp_path, capsys):
    code, _, err = _train(tmp_path, capsys, "norm=inplace_abn", "norm.activation=relu", *FAST)
    assert code == 1
    assert "invertible" in err and "Traceback" not in err


def test_resume_path_without_checkpoint(tmp_path, capsys):
    code, _, err = _train(tmp_path, capsys, f"resume={tmp_path / 'nothing'}", *FAST)
    assert code == 1
    assert "no checkpoint" in err


def test_eval_of_missing_checkpoint(tmp_path, capsys):
    code, _, err = run_cli(["eval", f"checkpoint={tmp_path / 'last.pt'}"], capsys)
    assert code == 1
    assert "does not exist" in err


@pytest.mark.slow  # trains a run first
def test_eval_rejects_unknown_override(tmp_path, capsys, trained_run):
    code, _, err = run_cli(["eval", f"checkpoint={trained_run / 'checkpoints' / 'last.pt'}",
                            "data.rot=/x"], capsys)
    assert code == 1
    assert "data.rot" in err and "no such config key" in err


def test_no_command_prints_usage(capsys):
    code, _, err = run_cli([], capsys)
    assert code == 2 and "train" in err and "eval" in err


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    from abnexp.cli import main

    run = tmp_path_factory.mktemp("run")
    main(["train", f"hydra.run.dir={run}", *FAST])
    return run
