"""Checkpoints (written atomically, loadable with ``torch.load(..., weights_only=True)``), the
trainer's checkpoint bookkeeping and its preemption signals.

A checkpoint is a dict: model / optimizer / scheduler / scaler state dicts, ``rng`` (torch CPU
and CUDA generators, Python's and NumPy's global RNGs), ``epoch`` (completed epochs), ``step``
(optimizer steps), ``steps_per_epoch``, ``metrics`` (last validation), ``best`` (best main
validation metric so far, or None) and ``config`` (the resolved config as YAML text).

Files in ``<run dir>/checkpoints/``: ``last.pt`` (epoch ends, the end, a preemption signal),
``step_<N>.pt`` (every ``trainer.checkpoint_every`` steps / ``trainer.checkpoint_minutes``
minutes; the newest ``trainer.keep_last`` are kept) and ``best.pt`` (the main validation metric
improved). Resuming takes the newest one that loads.
"""
from __future__ import annotations

import logging
import os
import random
import re
import signal
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from abnexp.distributed import preemption_signal
from abnexp.errors import ConfigError
from abnexp.models.pretrained import read_checkpoint

log = logging.getLogger("abnexp")

LAST = "last.pt"
BEST = "best.pt"
EXIT_PREEMPTED = 75
"""Exit code after a preemption signal was handled and a checkpoint written: EX_TEMPFAIL of
sysexits.h ("temporary failure, try again"), distinct from an error (1) and from a process the
signal killed unhandled (143 = 128 + SIGTERM, or -15 from Python's subprocess)."""
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_STEP_FILE = re.compile(r"step_(\d+)\.pt")


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
    """Loads a checkpoint on the CPU with ``weights_only=True`` (:func:`abnexp.models.pretrained.read_checkpoint`).

    Raises:
        ConfigError: the file does not exist or is not an abnexp checkpoint.
    """
    try:
        return read_checkpoint(Path(path).expanduser())
    except ValueError as e:
        raise ConfigError(str(e)) from None


def step_file_number(path: Path) -> int | None:
    """N of a ``step_<N>.pt`` file name, else None."""
    match = _STEP_FILE.fullmatch(path.name)
    return int(match.group(1)) if match else None


def checkpoint_files(folder: Path) -> list[Path]:
    """``last.pt`` and the ``step_<N>.pt`` files in ``folder``, newest first (by modification time,
    ties by N); ``best.pt`` and unfinished temporary files are not candidates."""
    files = [p for p in Path(folder).glob("*.pt") if p.name == LAST or step_file_number(p) is not None]
    return sorted(files, key=lambda p: (p.stat().st_mtime_ns, step_file_number(p) or 0), reverse=True)


def load_newest(folder: Path) -> tuple[Path, dict] | None:
    """The newest checkpoint of ``folder`` (see :func:`checkpoint_files`) that loads, and its state;
    an unreadable newer one is skipped with a warning naming it and the one used instead. None if
    ``folder`` has no checkpoint.

    Raises:
        ConfigError: there are checkpoints but none of them loads.
    """
    files = checkpoint_files(folder)
    errors = []
    for path in files:
        try:
            state = load_checkpoint(path)
        except ConfigError as e:
            errors.append(str(e))
            continue
        for skipped in errors:
            log.warning("%s; resuming from the previous checkpoint %s instead", skipped, path)
        return path, state
    if errors:
        raise ConfigError(f"no checkpoint in {folder} can be read: {'; '.join(errors)}")
    return None


def find_resume(resume: str | None, run_dir: Path) -> tuple[Path, dict] | None:
    """The checkpoint to resume from and its state: ``resume`` (a checkpoint file, or a run dir:
    its newest readable checkpoint), else the run dir's own newest readable checkpoint if it has one
    (auto-resume), else None.

    Raises:
        ConfigError: ``resume`` names a path without a checkpoint, or no checkpoint there loads.
    """
    if resume:
        path = Path(resume).expanduser()
        if path.is_file():
            return path, load_checkpoint(path)
        found = load_newest(path / "checkpoints") if path.is_dir() else None
        if found is None:
            where = path / "checkpoints" / LAST if path.is_dir() else path
            raise ConfigError(f"resume={resume}: no checkpoint at {where}")
        return found
    return load_newest(Path(run_dir) / "checkpoints")


def check_checkpoint_settings(trainer_cfg) -> None:
    """Checks ``trainer.checkpoint_every`` (steps), ``trainer.checkpoint_minutes`` and
    ``trainer.keep_last``.

    Raises:
        ConfigError: naming the key, its value and the valid range.
    """
    for key, low in (("checkpoint_every", 0), ("checkpoint_minutes", 0), ("keep_last", 1)):
        value = trainer_cfg[key]
        if value < low:
            raise ConfigError(f"trainer.{key}={value}: valid values are >= {low}")


class Checkpoints:
    """When and where the trainer writes checkpoints. Every rank decides alike (the trainer agrees
    on :meth:`time_due` over the process group); only ``enabled`` (rank 0) writes files.

    Args:
        folder: ``<run dir>/checkpoints``.
        every: optimizer steps between step checkpoints; 0 = none.
        minutes: wall-clock minutes after the last checkpoint that make a step checkpoint due; 0 = off.
        keep_last: step checkpoints kept (older ones are deleted after a new one is written).
        best: best main validation metric so far (from the resumed checkpoint), or None.
    """

    def __init__(self, folder: Path, every: int, minutes: float, keep_last: int, enabled: bool,
                 best: float | None = None):
        self.folder, self.every, self.minutes, self.keep_last = Path(folder), every, minutes, keep_last
        self.enabled, self.best = enabled, best
        self.latest: Path | None = None  # the last file written by this process
        self._since = time.monotonic()
        if enabled and self.folder.is_dir():  # unfinished writes of a killed process
            for tmp in self.folder.glob(".*.tmp"):
                tmp.unlink(missing_ok=True)

    def step_due(self, step: int) -> bool:
        return bool(self.every) and step % self.every == 0

    def time_due(self) -> bool:
        return bool(self.minutes) and time.monotonic() - self._since >= 60 * self.minutes

    def improved(self, metrics: dict) -> bool:
        """Whether the main metric (the first entry of validate()'s dict; higher is better) beats
        the best so far; if so it becomes the best."""
        value = next(iter(metrics.values()), None)
        if not isinstance(value, (int, float)) or (self.best is not None and value <= self.best):
            return False
        self.best = float(value)
        return True

    def write(self, state: dict, step_file: bool = False, best: bool = False) -> None:
        """Writes ``state`` (with ``best`` added) to ``last.pt``, or to ``step_<step>.pt`` and deletes
        the step checkpoints beyond ``keep_last``; also to ``best.pt`` if ``best``."""
        self._since = time.monotonic()
        if not self.enabled:
            return
        state = {**state, "best": self.best}
        self.latest = save_checkpoint(state, self.folder / (f"step_{state['step']}.pt" if step_file else LAST))
        if step_file:
            old = sorted(self.folder.glob("step_*.pt"), key=lambda p: step_file_number(p) or -1, reverse=True)
            for path in old[self.keep_last:]:
                path.unlink(missing_ok=True)
        if best:
            save_checkpoint(state, self.folder / BEST)


class PreemptionSignals:
    """Context manager: while active, SIGTERM and SIGUSR1 (what SLURM sends before preemption) and,
    in a submitit job, submitit's time-out signal (SIGUSR2, :func:`abnexp.distributed.preemption_signal`)
    only record the signal in :attr:`received` (the trainer checks it after each optimizer step,
    checkpoints and exits). On exit the previous handlers are restored and, when the trainer leaves
    after a signal (SystemExit) whose previous handler is a Python function, that handler is called:
    in a submitit job that is submitit's checkpoint protocol (task 0 pickles the job again through
    the Hydra launcher's ``checkpoint`` and requeues it; the requeued job resumes from the run dir's
    checkpoint). Outside the main thread (where Python cannot install handlers) it does nothing."""

    def __init__(self):
        self.received: int | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def __enter__(self) -> "PreemptionSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in {*PREEMPTION_SIGNALS, preemption_signal()} - {None}:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        previous = self._previous.get(self.received)
        self._previous.clear()
        # left by the trainer's preemption exit (SystemExit), to a handler that is a Python function
        # (not SIG_DFL / SIG_IGN, which are ints, nor None: set outside Python)
        if isinstance(exc[1], SystemExit) and callable(previous):
            previous(self.received, None)


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
