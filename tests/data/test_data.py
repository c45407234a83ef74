"""Demo data generation, ImageNet layout checks, transforms and the resumable data order."""
from __future__ import annotations

import hashlib

import pytest
import torch

from abnexp.data import DatasetError, dataset_root, eval_transform, image_folder, train_transform
from abnexp.data.demo import PER_CLASS, SOURCES, ensure_demo
from abnexp.data.sampling import EpochBatches, ResumableSampler, SeededDataset
from abnexp.data.transforms import Lighting
from torch.utils.data import BatchSampler, DataLoader


def digest(root):
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.JPEG")):
        h.update(f.relative_to(root).as_posix().encode() + f.read_bytes())
    return h.hexdigest()


def test_demo_is_deterministic_and_in_imagenet_layout(demo_root, tmp_path):
    again = ensure_demo(tmp_path / "again")
    assert digest(again) == digest(demo_root)
    for split, count in PER_CLASS.items():
        classes = sorted(p.name for p in (demo_root / split).iterdir())
        assert classes == sorted(SOURCES)
        assert all(len(list((demo_root / split / c).glob("*.JPEG"))) == count for c in classes)
    ds = image_folder(demo_root, "val", eval_transform(56, [0.5] * 3, [0.5] * 3), len(SOURCES))
    image, label = ds[0]
    assert image.shape == (3, 56, 56) and image.dtype == torch.float32 and label == 0


def test_dataset_root_errors(tmp_path):
    with pytest.raises(DatasetError, match="data.root is not set"):
        dataset_root("imagenet", None)
    (tmp_path / "train" / "a").mkdir(parents=True)
    (tmp_path / "val" / "b").mkdir(parents=True)
    with pytest.raises(DatasetError, match="train and val class folders differ"):
        dataset_root("imagenet", str(tmp_path))
    from abnexp.errors import ConfigError

    with pytest.raises(ConfigError, match="valid: demo, imagenet"):
        dataset_root("cifar", None)


def test_lighting_matches_hand_computation():
    torch.manual_seed(0)
    alpha = torch.randn(3) * 0.1
    eigval = torch.tensor([0.2175, 0.0188, 0.0045])
    eigvec = torch.tensor([[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]])
    expected_shift = [sum(eigvec[c, j] * alpha[j] * eigval[j] for j in range(3)) for c in range(3)]
    torch.manual_seed(0)
    out = Lighting(0.1)(torch.zeros(3, 2, 2))
    for c in range(3):
        assert torch.allclose(out[c], torch.full((2, 2), float(expected_shift[c])), atol=1e-7)


def test_augmentation_depends_only_on_seed_epoch_index(demo_root):
    ds = image_folder(demo_root, "train", train_transform(32, [0.5] * 3, [0.5] * 3), len(SOURCES))
    seeded = SeededDataset(ds, seed=1)
    a = seeded[0, 5][0]
    torch.rand(100)  # the global RNG must not matter...
    assert torch.equal(seeded[0, 5][0], a)
    assert not torch.equal(seeded[1, 5][0], a)  # ...but the epoch does


def test_sampler_resumes_mid_epoch():
    data = list(range(50))
    full = ResumableSampler(data, seed=0)
    full.set_epoch(3)
    order = list(full)
    assert sorted(order) == data and order != data
    part = ResumableSampler(data, seed=0)
    part.set_epoch(3, start=20)
    assert list(part) == order[20:] and len(part) == 30
    full.set_epoch(4)
    assert list(full) != order


class _RandomPerSample(torch.utils.data.Dataset):
    """Sample i is (i, a draw from the global RNG): shows which seed a sample was computed under."""

    def __len__(self):
        return 12

    def __getitem__(self, i):
        return torch.tensor([float(i), torch.rand(()).item()])


@pytest.mark.slow  # starts DataLoader worker processes
def test_persistent_workers_see_each_epochs_augmentation():
    """Persistent workers keep their dataset copy across epochs; the epoch reaches them with the index,
    so every epoch's batches equal those drawn in the main process (num_workers=0)."""
    def batches(num_workers):
        data = SeededDataset(_RandomPerSample(), seed=3)
        sampler = ResumableSampler(data, seed=3)
        loader = DataLoader(data, batch_sampler=EpochBatches(BatchSampler(sampler, 4, drop_last=True), sampler),
                            num_workers=num_workers, persistent_workers=num_workers > 0)
        out = []
        for epoch in range(3):
            sampler.set_epoch(epoch, start=4 if epoch == 1 else 0)  # epoch 1 resumes after one batch
            out.append(torch.cat(list(loader)))
        return out

    in_process, workers = batches(0), batches(2)
    for a, b in zip(in_process, workers):
        assert torch.equal(a, b)
    assert len(in_process[1]) == 8 and len(in_process[0]) == 12
    assert not torch.equal(in_process[0][:, 1].sort().values, in_process[2][:, 1].sort().values)  # epochs differ
