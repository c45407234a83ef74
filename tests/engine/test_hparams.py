"""TensorBoard HParams: a run's hyper-parameters and final metrics, read back from its event file
with TensorBoard's own reader (EventAccumulator + the hparams plugin's protobufs)."""
from __future__ import annotations

from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import metadata, plugin_data_pb2

from abnexp.config import compose
from abnexp.engine.logging import RunLogger, run_hparams
from conftest import run_cli


def read_hparams(run_dir: Path) -> tuple[dict, set[str], set[str], int]:
    """(hparams of the session start, metric tags of the experiment, scalar tags, session end
    status) of the one event file in ``run_dir``."""
    files = list(run_dir.glob("events.out.tfevents.*"))
    assert len(files) == 1, files
    acc = EventAccumulator(str(files[0]))
    acc.Reload()
    content = acc.PluginTagToContent(metadata.PLUGIN_NAME)
    data = {tag: plugin_data_pb2.HParamsPluginData.FromString(raw) for tag, raw in content.items()}
    start = data[metadata.SESSION_START_INFO_TAG].session_start_info
    values = {k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind")) for k, v in start.hparams.items()}
    experiment = data[metadata.EXPERIMENT_TAG].experiment
    assert {h.name for h in experiment.hparam_infos} == set(values)
    metric_tags = {m.name.tag for m in experiment.metric_infos}
    status = data[metadata.SESSION_END_INFO_TAG].session_end_info.status
    return values, metric_tags, set(acc.Tags()["scalars"]), status


def test_hparams_of_a_recipe_run_are_read_back(tmp_path):
    cfg = compose(["experiment=cbn_t3/cbn_bs2"])
    logger = RunLogger(tmp_path, enabled=True, total_steps=1)
    logger.train(1, 0, {"loss": 2.5, "lr": 0.1, "images_per_s": 3.0, "peak_memory_bytes": 1})
    logger.val(1, 1, {"top1": 12.5, "top5": 50.0, "num_samples": 80})
    logger.hparams(run_hparams(cfg, world_size=2), {"top1": 12.5, "top5": 50.0, "num_samples": 80, "note": "x"})
    logger.close()
    values, metric_tags, scalars, status = read_hparams(tmp_path)
    assert values == {"model": cfg.model.name, "norm": "cbn", "task": "cls", "data": cfg.data.name,
                      "batch_per_process": 2.0, "world_size": 2.0, "lr": pytest.approx(cfg.optim.lr),
                      "scale_lr": True, "crop": float(cfg.data.crop_size), "seed": 0.0,
                      "recipe": f"cbn_t3 | {cfg.experiment.row} | {cfg.experiment.column}"}
    # the dashboard shows each metric's last scalar: every metric tag is a scalar series of the run
    assert metric_tags == {"val/top1", "val/top5", "val/num_samples", "train/loss"} and metric_tags <= scalars
    assert status == 1  # STATUS_SUCCESS


def test_detection_run_has_no_crop_and_no_recipe():
    values = run_hparams(compose(["task=detection"]), world_size=1)
    assert "crop" not in values and values["recipe"] == "" and values["model"] == "resnet18"


@pytest.mark.slow  # trains one tiny epoch through the CLI
def test_training_run_writes_hparams_at_its_end(tiny_root, tmp_path, capsys):
    run = tmp_path / "run"  # one epoch of 4 steps (40 images), then validation
    code, _, err = run_cli(["train", f"hydra.run.dir={run}", f"data.root={tiny_root}", "model=resnet18", "norm=gn",
                            "data.batch_size=10", "data.crop_size=32", "data.large_crop_size=40",
                            "data.num_workers=0", "trainer.epochs=1", "optim.lr=0.05", "seed=3"], capsys)
    assert code == 0, err
    values, metric_tags, scalars, _ = read_hparams(run)
    assert (values["model"], values["norm"], values["batch_per_process"], values["world_size"]) == ("resnet18", "gn",
                                                                                                  10.0, 1.0)
    assert (values["lr"], values["crop"], values["seed"], values["recipe"]) == (pytest.approx(0.05), 32.0, 3.0, "")
    assert {"val/top1", "val/top5", "train/loss"} <= metric_tags <= scalars
