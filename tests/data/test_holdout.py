"""``data.holdout``: a validation set carved out of the training split (per class, last files)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from abnexp.config import compose, validate
from abnexp.data import classification_sets, holdout_indices
from abnexp.errors import ConfigError, DatasetError


def test_holdout_indices_take_the_last_ceil_fraction_of_each_class():
    targets = [0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2]  # 4, 3 and 8 samples
    assert holdout_indices(targets, 0.25) == {3, 6, 13, 14}  # ceil(1), ceil(0.75), ceil(2)
    with pytest.raises(DatasetError, match="data.holdout=0.7 leaves no training image of class 1"):
        holdout_indices(targets, 0.7)  # ceil(2.1) = 3 of class 1's 3


def test_demo_holdout_splits_the_train_folder_and_leaves_val_alone(demo_root):
    cfg = compose(["data.holdout=0.25", "data.crop_size=64", "data.resize_ratio=1.0"])
    train, val = classification_sets(cfg.data)
    assert (len(train), len(val)) == (600, 200)
    files = lambda subset: {Path(subset.dataset.samples[i][0]) for i in subset.indices}
    held, kept = files(val), files(train)
    assert not held & kept and all(p.parts[-3] == "train" for p in held | kept)
    for c in {p.parent for p in held}:  # the last 20 of the 80 files of every class, by name
        assert sorted(p.name for p in held if p.parent == c) == sorted(p.name for p in c.iterdir())[60:]
    image, label = val[0]
    assert torch.equal(image, val[0][0]) and image.shape == (3, 64, 64)  # evaluation transform: deterministic
    full_train, full_val = classification_sets(compose([]).data)
    assert (len(full_train), len(full_val)) == (800, 1000)  # the demo's val folder (100 per class)


def test_holdout_out_of_range_is_a_config_error():
    with pytest.raises(ConfigError, match=r"data.holdout=1.0: valid values are in \[0, 1\)"):
        validate(compose(["data.holdout=1.0"]))
