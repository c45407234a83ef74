"""Shared fixtures: one generated demo dataset per test session (in a temporary cache folder)."""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest

# The five strategies of the InPlace-ABN paper (the norm tests compare these against torch BatchNorm).
STRATEGIES = ("bn", "checkpoint", "checkpoint_proposed", "inplace_abn", "inplace_abn_ii")


@pytest.fixture(scope="session", autouse=True)
def demo_cache(tmp_path_factory):
    """Points $ABNEXP_CACHE at a session folder so tests never touch ~/.cache."""
    path = tmp_path_factory.mktemp("abnexp_cache")
    old = os.environ.get("ABNEXP_CACHE")
    os.environ["ABNEXP_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("ABNEXP_CACHE", None)
    else:
        os.environ["ABNEXP_CACHE"] = old


@pytest.fixture(scope="session")
def demo_root(demo_cache):
    from abnexp.data.demo import ensure_demo

    return ensure_demo()


@pytest.fixture(scope="session")
def tiny_root(demo_root, tmp_path_factory) -> Path:
    """The demo data cut to 4 training and 2 validation images per class (40 and 20 images)."""
    root = tmp_path_factory.mktemp("tiny_demo")
    for split, n in (("train", 4), ("val", 2)):
        for folder in sorted((demo_root / split).iterdir()):
            (root / split / folder.name).mkdir(parents=True)
            for image in sorted(folder.iterdir())[:n]:
                shutil.copy(image, root / split / folder.name / image.name)
    return root


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """Runs ``abnexp <args>`` in this process; returns (exit code, stdout, stderr). The root
    logger's handlers and level are restored afterwards: a command's logging set-up (Hydra's
    job logging, logging.basicConfig) would otherwise outlive it, writing to this test's
    captured stream after capsys closed it ("--- Logging error ---" in a later test)."""
    from abnexp.cli import main

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    code = 0
    try:
        main(args)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    out, err = capsys.readouterr()
    return code, out, err


def train_losses(run_dir: Path) -> dict[int, float]:
    """step -> loss of a run dir's metrics.jsonl train rows (a row logged again after a resume wins)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


def only_run_dir(cwd: Path) -> Path:
    """The one run dir below ``cwd/runs`` (asserts there is exactly one)."""
    dirs = list((cwd / "runs").iterdir())
    assert len(dirs) == 1, dirs
    return dirs[0]


def write_tiny_cityscapes(root: Path, counts: dict[str, int]) -> Path:
    """``counts[split]`` demo composites (64x128 images and labelIds, 0 = unlabeled included) per
    split in the Cityscapes layout (one city, "ulm"), from a fixed seed; returns ``root``."""
    import numpy as np
    from PIL import Image

    from abnexp.data.demo_cityscapes import _textures, compose

    textures, rng = _textures(), np.random.default_rng(0)
    for split, count in counts.items():
        (root / "leftImg8bit" / split / "ulm").mkdir(parents=True)
        (root / "gtFine" / split / "ulm").mkdir(parents=True)
        for i in range(count):
            image, label = compose(textures, rng)
            Image.fromarray(image).save(root / f"leftImg8bit/{split}/ulm/ulm_000000_{i:06d}_leftImg8bit.png")
            Image.fromarray(label).save(root / f"gtFine/{split}/ulm/ulm_000000_{i:06d}_gtFine_labelIds.png")
    return root
