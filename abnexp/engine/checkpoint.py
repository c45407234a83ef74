"""Checkpoints: written atomically, loadable with ``torch.load(..., weights_only=True)``.

A checkpoint is a dict: model / optimizer / scheduler / scaler state dicts, ``rng`` (torch CPU
and CUDA generators, Python's and NumPy's global RNGs), ``epoch`` (completed epochs), ``step``
(optimizer steps), ``steps_per_epoch``, ``metrics`` (last validation) and ``config`` (the
resolved config as YAML text).
"""
from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch

from abnexp.errors import ConfigError

LAST = "last.pt"


def save_checkpoint(state: dict, path: str | Path) -> Path:
    """Writes ``state`` to ``path`` via a temporary file in the same folder + rename, so a crash
    mid-write never leaves a truncated checkpoint behind (the previous one stays intact)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | Path) -> dict:
    """Loads a checkpoint on the CPU with ``weights_only=True``.

    Raises:
        ConfigError: the file does not exist or is not an abnexp checkpoint.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"checkpoint {path} does not exist (expected <run dir>/checkpoints/{LAST})")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a truncated or foreign file
        raise ConfigError(f"checkpoint {path} cannot be read: {type(e).__name__}: {e}") from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise ConfigError(f"{path} is not an abnexp checkpoint (no 'model'/'config' entries)")
    return state


def resolve_resume(resume: str | None, run_dir: Path) -> Path | None:
    """The checkpoint to resume from: ``resume`` (a run dir or a checkpoint file), else the run
    dir's own ``checkpoints/last.pt`` if present (auto-resume), else None.

    Raises:
        ConfigError: ``resume`` names a path without a checkpoint.
    """
    if resume:
        path = Path(resume).expanduser()
        if path.is_dir():
            path = path / "checkpoints" / LAST
        if not path.is_file():
            raise ConfigError(f"resume={resume}: no checkpoint at {path}")
        return path
    own = run_dir / "checkpoints" / LAST
    return own if own.is_file() else None


def rng_state() -> dict:
    """Global RNG states in a weights_only-loadable form."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
