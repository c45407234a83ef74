"""data=fashion_mnist on small IDX files written here (the real files are never needed): samples
against the written bytes normalized by hand, the training crop against hand-shifted images,
holdout / train_subset by file order, the errors naming the file, `abnexp data check`'s counts, and
`abnexp eval`'s test-set protocol against the model's own logits counted by hand."""
from __future__ import annotations

import gzip
import json
import struct

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from abnexp.config import compose
from abnexp.data import DatasetError, classification_sets, dataset_root
from conftest import run_cli

MEAN, STD = 0.2860, 0.3530
TRAIN_PER_CLASS, TEST_PER_CLASS = 4, 2


def idx_bytes(array: np.ndarray) -> bytes:
    """IDX format by hand: 0x00 0x00 0x08 (uint8) ndim, then big-endian int32 dims, then the bytes."""
    return bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def write_fashion(root, gz: bool = True, seed: int = 0) -> dict:
    """Random 28x28 images, classes interleaved (0..9, 0..9, ...); returns {split: (images, labels)}."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, prefix, per_class in (("train", "train", TRAIN_PER_CLASS), ("test", "t10k", TEST_PER_CLASS)):
        labels = np.tile(np.arange(10, dtype=np.uint8), per_class)
        images = rng.integers(0, 256, (len(labels), 28, 28), dtype=np.uint8)
        for kind, array in (("images-idx3-ubyte", images), ("labels-idx1-ubyte", labels)):
            data = idx_bytes(array)
            name = root / f"{prefix}-{kind}"
            if gz:
                (name.parent / f"{name.name}.gz").write_bytes(gzip.compress(data))
            else:
                name.write_bytes(data)
        out[split] = (images, labels)
    return out


def normalized(image: np.ndarray) -> torch.Tensor:
    """(28, 28) uint8 -> (3, 28, 28): the gray channel three times, (x / 255 - mean) / std."""
    x = (torch.from_numpy(image.astype(np.float32)) / 255 - MEAN) / STD
    return x.expand(3, 28, 28)


def data_cfg(root, *overrides):
    return compose(["data=fashion_mnist", f"data.root={root}", *overrides]).data


@pytest.mark.parametrize("gz", [True, False])
def test_samples_are_the_written_images_gray_to_three_channels(tmp_path, gz):
    written = write_fashion(tmp_path / "fm", gz)
    train, val = classification_sets(data_cfg(tmp_path / "fm", "data.padding=0", "data.flip=false"))
    assert len(train) == 10 * TRAIN_PER_CLASS and len(val) == 10 * TEST_PER_CLASS  # val = the test split
    for dataset, (images, labels) in ((train, written["train"]), (val, written["test"])):
        for i in (0, 7, len(dataset) - 1):
            x, y = dataset[i]
            assert x.dtype == torch.float32 and x.shape == (3, 28, 28) and y == labels[i]
            torch.testing.assert_close(x, normalized(images[i]), rtol=0, atol=1e-6)


def test_training_crop_is_a_shift_of_the_zero_padded_image_possibly_flipped(tmp_path):
    images, _ = write_fashion(tmp_path / "fm")["train"]
    train, _ = classification_sets(data_cfg(tmp_path / "fm"))  # padding 4, flip
    torch.manual_seed(0)
    for i in range(6):
        x, _ = train[i]
        padded = np.pad(images[i], 4)
        candidates = [normalized(np.ascontiguousarray(c)) for dy in range(9) for dx in range(9)
                      for c in (padded[dy:dy + 28, dx:dx + 28], padded[dy:dy + 28, dx:dx + 28][:, ::-1])]
        assert sum(torch.allclose(x, c, atol=1e-6) for c in candidates) == 1


def test_holdout_and_train_subset_follow_file_order(tmp_path):
    images, labels = write_fashion(tmp_path / "fm")["train"]
    train, val = classification_sets(data_cfg(tmp_path / "fm", "data.holdout=0.25", "data.train_subset=2",
                                              "data.padding=0", "data.flip=false"))
    # 4 images per class: the last ceil(0.25 * 4) = 1 of each class is held out (indices 30..39),
    # and the first 2 of the other 3 are trained on (indices 0..19)
    assert sorted(val.indices) == list(range(30, 40)) and train.indices == list(range(20))
    x, y = val[0]
    assert y == labels[30] and torch.allclose(x, normalized(images[30]), atol=1e-6)  # evaluation transform


def test_real_files_layout_names_each_problem(tmp_path):
    root = tmp_path / "fm"
    write_fashion(root)
    (root / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetError, match="has no t10k-labels-idx1-ubyte"):
        dataset_root("fashion_mnist", str(root))
    write_fashion(root)
    data = (root / "train-images-idx3-ubyte.gz").read_bytes()
    (root / "train-images-idx3-ubyte.gz").write_bytes(data[:len(data) // 2])  # a cut download
    with pytest.raises(DatasetError, match=r"cannot read .*train-images-idx3-ubyte.gz.*truncated"):
        dataset_root("fashion_mnist", str(root))
    plain = tmp_path / "plain"
    write_fashion(plain, gz=False)
    data = (plain / "t10k-images-idx3-ubyte").read_bytes()
    (plain / "t10k-images-idx3-ubyte").write_bytes(data[:-28])
    with pytest.raises(DatasetError, match=r"t10k-images-idx3-ubyte is truncated .* announces 20 items"):
        dataset_root("fashion_mnist", str(plain))
    (plain / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(np.zeros((20, 32, 32), np.uint8)))  # not 28x28
    with pytest.raises(DatasetError, match="is not a Fashion-MNIST IDX file"):
        dataset_root("fashion_mnist", str(plain))
    with pytest.raises(DatasetError, match="data.root is not set for data=fashion_mnist"):
        dataset_root("fashion_mnist", None)


def test_train_refuses_a_bad_root_in_one_line_before_any_run_dir(tmp_path, capsys):
    root = tmp_path / "fm"
    write_fashion(root)
    (root / "train-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8b")  # a gzip header, nothing after
    code, _, err = run_cli(["train", "data=fashion_mnist", f"data.root={root}",
                            f"hydra.run.dir={tmp_path / 'run'}"], capsys)
    assert code == 1 and "train-labels-idx1-ubyte.gz" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


def test_data_check_reports_counts_and_class_balance(tmp_path, capsys):
    write_fashion(tmp_path / "fm")
    code, out, _ = run_cli(["data", "check", "data=fashion_mnist", f"data.root={tmp_path / 'fm'}"], capsys)
    assert code == 0
    assert "train: 40 images" in out and "test: 20 images" in out
    assert "| 0 T-shirt/top | 4 | 2 |" in out and "| 9 Ankle boot | 4 | 2 |" in out


def test_eval_protocol_is_the_test_set_at_28_pixels(tmp_path):
    from abnexp.tasks import build_task

    images, labels = write_fashion(tmp_path / "fm")["test"]
    cfg = compose(["data=fashion_mnist", f"data.root={tmp_path / 'fm'}", "model.stem=small"])
    task = build_task(cfg)
    torch.manual_seed(0)
    model = task.build_model().eval()
    results = task.evaluate_protocols(model, type("Ctx", (), {"device": torch.device("cpu"), "amp_dtype": None,
                                                              "channels_last": False})(),
                                      lambda dataset, ten_crop: DataLoader(dataset, batch_size=8))
    assert list(results) == ["center"] and (results["center"]["crop"], results["center"]["ten_crop"]) == (28, False)
    with torch.no_grad():  # top-1 by hand: the model on the hand-normalized images
        logits = model(torch.stack([normalized(im) for im in images]))
    expected = 100.0 * float((logits.argmax(1).numpy() == labels).mean())
    assert results["center"]["num_samples"] == 20 and results["center"]["top1"] == pytest.approx(expected)


@pytest.mark.slow  # trains and evaluates through the CLI
def test_train_and_eval_end_to_end(tmp_path, capsys):
    write_fashion(tmp_path / "fm")
    run = tmp_path / "run"
    code, _, err = run_cli(["train", "data=fashion_mnist", f"data.root={tmp_path / 'fm'}", "model.stem=small_pool",
                            "trainer.max_steps=2", "data.batch_size=8", "data.num_workers=0",
                            f"hydra.run.dir={run}"], capsys)
    assert code == 0, err
    code, _, err = run_cli(["eval", f"checkpoint={run / 'checkpoints' / 'last.pt'}"], capsys)
    assert code == 0, err
    protocols = json.loads((run / "eval.json").read_text())["protocols"]
    assert list(protocols) == ["center"] and protocols["center"]["num_samples"] == 10 * TEST_PER_CLASS
