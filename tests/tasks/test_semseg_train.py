"""task=semseg end to end: config composition, `abnexp train` + `abnexp eval` on a tiny
Cityscapes-layout set, TensorBoard overlays, PNG export, and `abnexp data check`."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_cli, write_tiny_cityscapes
from test_config import compose_cfg


@pytest.fixture(scope="module")
def tiny_cityscapes(tmp_path_factory):
    """8 train + 4 val demo composites (64x128) in the Cityscapes layout."""
    return write_tiny_cityscapes(tmp_path_factory.mktemp("tiny_cityscapes"), {"train": 8, "val": 4})


def test_task_semseg_selects_its_defaults_and_the_command_line_wins():
    cfg = compose_cfg("task=semseg")
    assert (cfg.task.name, cfg.data.name, cfg.sched.name) == ("semseg", "demo_cityscapes", "poly")
    assert cfg.sched.power == 0.9 and cfg.model.output_stride == 16 and cfg.optim.lr == 0.01
    assert cfg.trainer.epochs == cfg.data.epochs == 4
    cfg = compose_cfg("task=semseg", "sched=step", "data=cityscapes", "model.output_stride=8", "optim.lr=0.02")
    assert (cfg.sched.name, cfg.data.name, cfg.model.output_stride, cfg.optim.lr) == ("step", "cityscapes", 8, 0.02)
    cfg = compose_cfg()  # classification untouched
    assert (cfg.task.name, cfg.data.name, cfg.sched.name, cfg.model.output_stride, cfg.optim.lr) == \
        ("cls", "demo", "cosine", 32, 0.1)  # the demo recipe's schedule (configs/data/demo.yaml)


@pytest.mark.parametrize("data,classes", [("cityscapes", 19), ("coco_stuff", 171), ("vistas", 65),
                                          ("demo_cityscapes", 19)])
def test_segmentation_data_options_compose_and_build(data, classes):
    from abnexp.tasks import build_task

    cfg = compose_cfg("task=semseg", f"data={data}", "model=resnext101", "norm=inplace_abn",
                      "model.output_stride=8")
    assert cfg.data.num_classes == classes
    with torch.device("meta"):
        model = build_task(cfg).build_model()
    assert model.classifier.out_channels == classes and model.head.map_convs[3].dilation == (36, 36)


def test_semseg_config_errors(tmp_path):
    from abnexp.errors import ConfigError
    from abnexp.tasks import build_task

    with pytest.raises(ConfigError, match="segmentation dataset"):
        build_task(compose_cfg("task=semseg", "data=imagenet"))
    task = build_task(compose_cfg("task=semseg", f"model.pretrained={tmp_path}/none.pt"))
    with pytest.raises(ConfigError, match="does not exist"):
        task.build_model()
    with pytest.raises(ConfigError, match="output stride 8 or 16"):
        build_task(compose_cfg("task=semseg", "model.output_stride=32")).build_model()


def test_pretrained_classification_checkpoint_initializes_the_backbone(tmp_path, caplog):
    from abnexp.engine.checkpoint import save_checkpoint
    from abnexp.models import build_model
    from abnexp.norm import build_norm_act
    from abnexp.tasks import build_task

    cls = build_model("resnext50", build_norm_act("inplace_abn"), num_classes=10)
    path = save_checkpoint({"model": cls.state_dict(), "config": "model:\n  name: resnext50\n"}, tmp_path / "c.pt")
    cfg = compose_cfg("task=semseg", "model=resnext50", "norm=inplace_abn", f"model.pretrained={path}")
    with caplog.at_level("INFO", logger="abnexp"):
        model = build_task(cfg).build_model()
    assert torch.equal(model.backbone.mod3.block1.convs.conv2.weight, cls.mod3.block1.convs.conv2.weight)
    assert torch.equal(model.backbone.bn_out.running_mean, cls.bn_out.running_mean)
    assert "classification head dropped (classifier.bias, classifier.weight)" in caplog.text


@pytest.mark.slow  # the CLI end to end
def test_train_then_eval(tiny_cityscapes, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    code, _, err = run_cli(["train", "task=semseg", "model=resnet18", "norm=inplace_abn", f"hydra.run.dir={run}",
                            f"data.root={tiny_cityscapes}", "data.batch_size=4", "data.num_workers=0",
                            "trainer.epochs=1", "task.log_images=2"], capsys)
    assert code == 0, err
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if r["split"] == "val"]
    assert len(val) == 1 and val[0]["num_images"] == 4 and 0 <= val[0]["miou"] <= 100 and "images" not in val[0]
    events = EventAccumulator(str(run), size_guidance={"images": 0}).Reload()
    assert {"val/overlay_0", "val/overlay_1"} <= set(events.Tags()["images"])
    assert {"val/miou", "train/loss", "train/lr"} <= set(events.Tags()["scalars"])
    overlay = events.Images("val/overlay_0")[0]
    assert (overlay.width, overlay.height) == (3 * 128, 64)  # image | ground truth | prediction

    preds = tmp_path / "preds"
    code, out, err = run_cli(["eval", f"checkpoint={run}/checkpoints/last.pt", "data.num_workers=0",
                              f"task.predictions_dir={preds}", "task.eval_scales=[0.75,1.0]"], capsys)
    assert code == 0, err
    result = json.loads((run / "eval.json").read_text())["protocols"]
    assert set(result) == {"single_scale", "multi_scale_flip"}
    assert result["multi_scale_flip"]["scales"] == [0.75, 1.0] and result["multi_scale_flip"]["flip"]
    for r in result.values():
        assert r["num_images"] == 4 and r["num_pixels"] > 0.9 * 4 * 64 * 128
        assert len(r["iou"]) == 19 and r["iou"]["rider"] in (None, 0.0)  # never in the ground truth
        present = [v for v in r["iou"].values() if v is not None]
        assert r["miou"] == pytest.approx(sum(present) / len(present))
    assert "mIoU [%]" in out and "| road |" in out
    png = Image.open(preds / "single_scale" / "ulm_000000_000000_leftImg8bit.png")
    assert png.mode == "P" and png.size == (128, 64) and max(np.unique(np.asarray(png))) < 19


@pytest.mark.slow  # the CLI end to end
def test_data_check(tiny_cityscapes, tmp_path, capsys):
    code, out, _ = run_cli(["data", "check", "data=cityscapes", f"data.root={tiny_cityscapes}"], capsys)
    assert code == 0 and "no problems found" in out and "train: 8 image/label pairs" in out
    road = next(line for line in out.splitlines() if line.startswith("| 0 road |"))
    assert int(road.split("|")[2]) > 0

    bad = tmp_path / "bad"
    shutil.copytree(tiny_cityscapes, bad)
    label = bad / "gtFine/train/ulm/ulm_000000_000001_gtFine_labelIds.png"
    ids = np.full((64, 128), 7, dtype=np.uint8)
    ids[0, :10] = 255  # a train-id "ignore" where labelIds are expected
    Image.fromarray(ids).save(label)
    (bad / "gtFine/val/ulm/ulm_000000_000002_gtFine_labelIds.png").unlink()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(bad / "gtFine/val/ulm/ulm_000000_000099_gtFine_labelIds.png")
    code, out, _ = run_cli(["data", "check", "data=cityscapes", f"data.root={bad}"], capsys)
    assert code == 1
    assert "1 labelIds files hold values outside the expected set (0-33): 255" in out
    assert "look like train ids" in out
    assert "1 images without a label file" in out and "ulm_000000_000002_leftImg8bit.png" in out
    assert "1 label files without an image" in out and "ulm_000000_000099" in out

    trainids = tmp_path / "trainids"  # every label given as train ids under the labelIds name
    shutil.copytree(tiny_cityscapes, trainids)
    from abnexp.data.segmentation import CITYSCAPES
    for f in trainids.glob("gtFine/*/*/*_labelIds.png"):
        ids = CITYSCAPES.kinds["labelIds"].lut[np.asarray(Image.open(f))]
        Image.fromarray(np.where(ids == 255, 0, ids).astype(np.uint8)).save(f)  # no 255: only the range test
    code, out, _ = run_cli(["data", "check", "data=cityscapes", f"data.root={trainids}"], capsys)
    assert code == 1 and "no labelIds file holds any of 19-33" in out

    code, _, err = run_cli(["data", "check", "data=cityscapes", f"data.root={tmp_path}/missing"], capsys)
    assert code == 1 and "does not exist" in err
