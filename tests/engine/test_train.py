"""End-to-end training on the demo data: outputs, exact resume, divergence handling, eval."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from abnexp.data.demo import PER_CLASS, SOURCES
from conftest import run_cli, train_losses

pytestmark = pytest.mark.slow  # the CLI end to end: training runs on the demo data

TINY = ["model=resnet18", "data.batch_size=16", "data.crop_size=32", "data.large_crop_size=40",
        "data.num_workers=0", "trainer.log_every=1", "trainer.epochs=2"]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> Path:
    from abnexp.cli import main

    run = tmp_path_factory.mktemp("full")
    main(["train", f"hydra.run.dir={run}", *TINY])
    return run


def test_run_dir_contents(full_run):
    assert (full_run / "config.yaml").is_file()
    assert list(full_run.glob("events.out.tfevents.*"))
    state = torch.load(full_run / "checkpoints" / "last.pt", weights_only=True)
    assert state["epoch"] == 2 and state["step"] == 2 * state["steps_per_epoch"]
    assert set(state) >= {"model", "optimizer", "scheduler", "scaler", "rng", "config"}
    assert "name: resnet18" in state["config"]
    val = [json.loads(r) for r in (full_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in val if r["split"] == "val"] == [1, 2]


def test_interrupted_then_resumed_run_reproduces_losses(full_run, tmp_path, capsys):
    run = tmp_path / "interrupted"
    assert run_cli(["train", f"hydra.run.dir={run}", *TINY, "trainer.max_steps=7"], capsys)[0] == 0
    first = train_losses(run)
    assert max(first) == 7
    # Same run dir again without the cap: auto-resume from checkpoints/last.pt (mid-epoch).
    assert run_cli(["train", f"hydra.run.dir={run}", *TINY], capsys)[0] == 0
    resumed = train_losses(run)
    reference = train_losses(full_run)
    assert sorted(resumed) == sorted(reference)
    for step in reference:
        assert resumed[step] == pytest.approx(reference[step], rel=1e-5, abs=1e-6), step


def test_resume_from_other_run_dir(full_run, tmp_path, capsys):
    run = tmp_path / "continued"
    code, _, _ = run_cli(["train", f"hydra.run.dir={run}", *TINY, "trainer.epochs=3",
                          f"resume={full_run}"], capsys)
    assert code == 0
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert state["epoch"] == 3
    assert min(train_losses(run)) == 2 * state["steps_per_epoch"] + 1  # first logged step continues


@pytest.mark.parametrize("log_every", [1, 50])
def test_nonfinite_loss_stops_and_keeps_checkpoint(full_run, tmp_path, capsys, monkeypatch, log_every):
    """The loss is checked on the device and read at log lines and before checkpoints: whether the
    first read is a log line (log_every=1) or a step checkpoint (log_every=50, checkpoint_every=1),
    training stops before anything a non-finite loss has touched is saved."""
    import shutil

    from abnexp.tasks.cls import ClassificationTask

    run = tmp_path / "diverge"
    shutil.copytree(full_run, run)
    ckpt = run / "checkpoints" / "last.pt"
    before = ckpt.read_bytes()

    def nan_loss(self, model, batch, ctx):
        loss, n = original(self, model, batch, ctx)
        return loss * float("nan"), n

    original = ClassificationTask.loss
    monkeypatch.setattr(ClassificationTask, "loss", nan_loss)
    code, _, err = run_cli(["train", f"hydra.run.dir={run}", *TINY, "trainer.epochs=3",
                            f"trainer.log_every={log_every}", "trainer.checkpoint_every=1"], capsys)
    assert code == 1
    assert "loss became nan between steps" in err and "intact" in err
    assert ckpt.read_bytes() == before
    assert not list((run / "checkpoints").glob("step_*.pt"))


def test_eval_prints_three_protocols_and_writes_json(full_run, capsys):
    code, out, _ = run_cli(["eval", f"checkpoint={full_run / 'checkpoints' / 'last.pt'}"], capsys)
    assert code == 0
    result = json.loads((full_run / "eval.json").read_text())
    assert list(result["protocols"]) == ["center", "ten_crop", "large_center"]
    assert [r["crop"] for r in result["protocols"].values()] == [32, 32, 40]
    for name, r in result["protocols"].items():
        assert f"({name})" in out
        assert 0 <= r["top1"] <= r["top5"] <= 100 and r["num_samples"] == len(SOURCES) * PER_CLASS["val"]
    # The center-crop protocol is the validation the trainer ran after the last epoch.
    val = [json.loads(r) for r in (full_run / "metrics.jsonl").read_text().splitlines()]
    assert result["protocols"]["center"]["top1"] == pytest.approx(val[-1]["top1"])


def test_eval_override_applies(full_run, capsys, tmp_path):
    code, out, _ = run_cli(["eval", f"checkpoint={full_run / 'checkpoints' / 'last.pt'}",
                            "data.large_crop_size=48", "data.batch_size=50"], capsys)
    assert code == 0
    assert json.loads((full_run / "eval.json").read_text())["protocols"]["large_center"]["crop"] == 48


def test_multirun_sweeps_models(tmp_path, capsys):
    code, _, err = run_cli(["train", "-m", "model=resnet18,resnet34", "trainer.max_steps=1",
                            "data.num_workers=0", "data.batch_size=4", "data.crop_size=32",
                            f"hydra.sweep.dir={tmp_path}"], capsys)
    assert code == 0, err
    assert len(list(tmp_path.glob("*/checkpoints/last.pt"))) == 2


def test_cfg_job_prints_composed_config(capsys):
    code, out, _ = run_cli(["train", "--cfg", "job", "model=resnext101", "norm=inplace_abn"], capsys)
    assert code == 0
    assert "name: resnext101" in out and "name: inplace_abn" in out
