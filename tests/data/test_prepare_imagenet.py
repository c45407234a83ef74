"""``abnexp data prepare imagenet``: ILSVRC2012's three archives -> the class-folder layout data=imagenet
reads, through torchvision's parsing. The archives are small ones of the official structure written
here (a devkit with data/meta.mat and the validation ground truth; per-class tars inside the train
tar); torchvision's MD5 check is turned off for them, except where a corrupted archive is the point."""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import run_cli

WNIDS = ["n01440764", "n01443537", "n01484850"]  # three leaf synsets (ILSVRC2012_ID 1..3)
COLOURS = {"n01440764": (255, 0, 0), "n01443537": (0, 255, 0), "n01484850": (0, 0, 255)}
VAL_TRUTH = [3, 1, 2, 2, 1, 3, 3]  # ILSVRC2012_ID of validation images 1..7 (ground-truth file order)
TRAIN_PER_CLASS = 4


def _jpeg(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 40), colour).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_archives(src: Path) -> None:
    from scipy.io import savemat

    src.mkdir(parents=True)
    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height",
              "num_train_images"]
    synsets = np.zeros(len(WNIDS) + 1, dtype=[(f, object) for f in fields])
    for i, wnid in enumerate(WNIDS):
        synsets[i] = (i + 1, wnid, f"class {i}, synonym", "gloss", 0, np.zeros(0), 0, TRAIN_PER_CLASS)
    synsets[-1] = (1001, "n00000001", "a parent synset", "gloss", 3, np.array([1, 2, 3]), 1, 0)  # not a class
    devkit = io.BytesIO()
    mat = io.BytesIO()
    savemat(mat, {"synsets": synsets})
    with tarfile.open(fileobj=devkit, mode="w:gz") as tar:
        _add(tar, "ILSVRC2012_devkit_t12/data/meta.mat", mat.getvalue())
        _add(tar, "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt",
             "".join(f"{i}\n" for i in VAL_TRUTH).encode())
    (src / "ILSVRC2012_devkit_t12.tar.gz").write_bytes(devkit.getvalue())
    with tarfile.open(src / "ILSVRC2012_img_train.tar", "w") as outer:
        for wnid in WNIDS:
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w") as tar:
                for k in range(TRAIN_PER_CLASS):
                    _add(tar, f"{wnid}_{k}.JPEG", _jpeg(COLOURS[wnid]))
            _add(outer, f"{wnid}.tar", inner.getvalue())
    with tarfile.open(src / "ILSVRC2012_img_val.tar", "w") as tar:
        for i, class_id in enumerate(VAL_TRUTH, 1):
            _add(tar, f"ILSVRC2012_val_{i:08d}.JPEG", _jpeg(COLOURS[WNIDS[class_id - 1]]))


@pytest.fixture
def no_md5(monkeypatch):
    from torchvision.datasets import imagenet

    monkeypatch.setattr(imagenet, "ARCHIVE_META", {k: (name, None) for k, (name, _) in imagenet.ARCHIVE_META.items()})


@pytest.fixture
def archives(tmp_path) -> Path:
    write_archives(tmp_path / "archives")
    return tmp_path / "archives"


def test_archives_become_the_class_folder_layout(archives, tmp_path, no_md5, capsys, caplog):
    root = tmp_path / "imagenet"
    code, out, err = run_cli(["data", "prepare", "imagenet", f"src={archives}", f"root={root}"], capsys)
    assert code == 0, err
    assert f"{TRAIN_PER_CLASS * 3} training / {len(VAL_TRUTH)} validation images, 3 classes" in out
    assert "ILSVRC2012 has 1,281,167 / 50,000 images, 1,000 classes" in out  # not the real one
    assert f"train: {TRAIN_PER_CLASS * 3} images in 3 class folders" in out  # then abnexp data check's counts
    for split in ("train", "val"):
        assert sorted(p.name for p in (root / split).iterdir()) == WNIDS
        for wnid in WNIDS:
            for image in (root / split / wnid).iterdir():  # every image is in its ground-truth class
                assert Image.open(image).convert("RGB").getpixel((20, 20)) == pytest.approx(COLOURS[wnid], abs=8)
    assert [len(list((root / "val" / w).iterdir())) for w in WNIDS] == [VAL_TRUTH.count(i) for i in (1, 2, 3)]
    assert not list(root.glob(".*.partial")) and not list((root / "train").glob("*.tar"))

    # resumed: a finished split stays, an interrupted one (its .partial folder) is made again
    (root / "val").rename(root / ".val.partial")
    (root / ".val.partial" / "junk.JPEG").write_bytes(b"")
    kept = (root / "train" / WNIDS[0]).stat().st_mtime_ns
    caplog.set_level("INFO", logger="abnexp")
    code, out, err = run_cli(["data", "prepare", "imagenet", f"src={archives}", f"root={root}"], capsys)
    assert code == 0, err
    assert (root / "train" / WNIDS[0]).stat().st_mtime_ns == kept
    assert any("train: already prepared" in r.getMessage() for r in caplog.records)
    assert sum(len(list((root / "val" / w).iterdir())) for w in WNIDS) == len(VAL_TRUTH)


def test_a_missing_archive_is_named_before_anything_is_unpacked(archives, tmp_path, capsys):
    (archives / "ILSVRC2012_img_val.tar").unlink()
    code, _, err = run_cli(["data", "prepare", "imagenet", f"src={archives}", f"root={tmp_path / 'out'}"], capsys)
    assert code == 1 and "lacks ILSVRC2012_img_val.tar" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_torchvisions_md5_check_refuses_an_archive_that_is_not_the_official_one(archives, tmp_path, capsys):
    code, _, err = run_cli(["data", "prepare", "imagenet", f"src={archives}", f"root={tmp_path / 'out'}"], capsys)
    assert code == 1 and "ILSVRC2012_devkit_t12.tar.gz" in err and "corrupted" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv", [["prepare"], ["prepare", "coco", "src=a", "root=b"], ["prepare", "imagenet", "src=a"]])
def test_bad_usage_prints_the_usage(argv, capsys):
    code, _, err = run_cli(["data", *argv], capsys)
    assert code == 1 and "abnexp data prepare imagenet src=" in err


@pytest.mark.slow  # trains one epoch through the CLI
def test_abnexp_trains_on_the_prepared_folder(archives, tmp_path, no_md5, capsys):
    root = tmp_path / "imagenet"
    assert run_cli(["data", "prepare", "imagenet", f"src={archives}", f"root={root}"], capsys)[0] == 0
    run = tmp_path / "run"
    code, _, err = run_cli(["train", "data=imagenet", f"data.root={root}", "data.num_classes=3", "trainer.epochs=1",
                            "data.batch_size=4", "data.crop_size=32", "data.large_crop_size=32",
                            "data.num_workers=0", f"hydra.run.dir={run}"], capsys)
    assert code == 0, err
    assert (run / "checkpoints" / "last.pt").is_file()
