"""Run logging on rank 0: console (tqdm bar on a terminal, plain periodic lines otherwise),
TensorBoard scalars and ``metrics.jsonl`` (one JSON object per line) in the run dir, and at the end
of a run its hyper-parameters and final metrics for TensorBoard's HParams dashboard."""
from __future__ import annotations

import json
import logging
import resource
import sys
from pathlib import Path

import torch

log = logging.getLogger("abnexp")


def peak_memory_bytes(device: torch.device) -> int:
    """Peak GPU memory allocated by torch (bytes) on CUDA; the process's peak RSS on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _recipe(cfg, world_size: int) -> str:
    e = cfg.get("experiment")
    return "" if e is None else " | ".join(str(v) for v in (e.table, e.row, e.column) if v)


HPARAMS = {
    "model": lambda cfg, world: cfg.model.name,
    "norm": lambda cfg, world: cfg.norm.name,
    "task": lambda cfg, world: cfg.task.name,
    "data": lambda cfg, world: cfg.data.name,
    "batch_per_process": lambda cfg, world: cfg.data.batch_size,
    "world_size": lambda cfg, world: world,
    "lr": lambda cfg, world: cfg.optim.lr,
    "scale_lr": lambda cfg, world: cfg.optim.scale_lr,
    "crop": lambda cfg, world: cfg.data.get("crop_size"),  # None (left out) for detection data
    "seed": lambda cfg, world: cfg.seed,
    "recipe": _recipe,  # "<table> | <row> | <column>" of experiment=, "" without a recipe
}
"""TensorBoard HParams name -> its value from (config, world size). ``lr`` is ``optim.lr`` as
configured (with ``scale_lr`` the optimizer's is lr × global batch / optim.base_batch_size)."""


def run_hparams(cfg, world_size: int) -> dict:
    """The :data:`HPARAMS` of a run (str / int / float / bool values; None values left out)."""
    values = {name: get(cfg, world_size) for name, get in HPARAMS.items()}
    return {k: v for k, v in values.items() if v is not None}


class RunLogger:
    """Writes training and validation scalars. Does nothing when ``enabled`` is False (rank ≠ 0).

    Args:
        run_dir: the run directory (metrics.jsonl and TensorBoard event files go there).
        total_steps: optimizer steps of the whole run (the bar's length).
        start_step: steps already done (on resume: TensorBoard's purge_step, so that events
            logged after the checkpoint by an interrupted run are dropped).
    """

    def __init__(self, run_dir: Path, enabled: bool, total_steps: int, start_step: int = 0):
        self.enabled = enabled
        self.bar = None
        self.last_train: dict = {}  # the scalars of the last train() call
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir), purge_step=start_step if start_step > 0 else None)
        self.jsonl = open(run_dir / "metrics.jsonl", "a")
        if sys.stdout.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True, unit="step")

    def _row(self, row: dict) -> None:
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()

    def train(self, step: int, epoch: int, scalars: dict, advance: int = 0) -> None:
        """Logs training scalars (loss, lr, images_per_s, peak_memory_bytes) at ``step``."""
        if not self.enabled:
            return
        self.last_train = scalars
        for k, v in scalars.items():
            self.writer.add_scalar(f"train/{k}", v, step)
        self._row({"split": "train", "step": step, "epoch": epoch, **scalars})
        if self.bar is not None:
            self.bar.update(advance)
            self.bar.set_postfix(loss=f"{scalars['loss']:.4f}", lr=f"{scalars['lr']:.3g}")
        else:
            log.info("epoch %d step %d  loss %.4f  lr %.4g  %.1f img/s", epoch, step, scalars["loss"],
                     scalars["lr"], scalars["images_per_s"])

    def val(self, step: int, epoch: int, metrics: dict) -> None:
        """Logs validation metrics (top1, top5 in percent, ...) at ``step``. An "images" entry
        ({tag: uint8 (3, H, W)}, e.g. segmentation overlays) is removed from ``metrics`` and
        written as TensorBoard images."""
        images = metrics.pop("images", {})
        if not self.enabled:
            return
        for tag, image in images.items():
            self.writer.add_image(tag, image, step)
        for k, v in metrics.items():
            self.writer.add_scalar(f"val/{k}", v, step)
        self._row({"split": "val", "step": step, "epoch": epoch, **metrics})
        text = "  ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
        (self.bar.write if self.bar is not None else log.info)(f"epoch {epoch} validation: {text}")

    def hparams(self, hparams: dict, metrics: dict) -> None:
        """Writes the run's hyper-parameters (see :func:`run_hparams`) and the names of its final
        metrics (``metrics``: last validation, as val/<name>; and train/loss) into the run's event
        file as TensorBoard HParams summaries (experiment, session start, session end with status
        success), so the HParams dashboard lists the runs of a sweep side by side with the last
        value of each metric. Non-numeric metrics are left out."""
        if not self.enabled:
            return
        from torch.utils.tensorboard.summary import hparams as hparams_summaries

        names = [f"val/{k}" for k, v in metrics.items() if isinstance(v, (int, float))]
        if "loss" in self.last_train:
            names.append("train/loss")
        for summary in hparams_summaries(hparams, dict.fromkeys(names, 0.0)):
            self.writer.file_writer.add_summary(summary)
        self.writer.flush()

    def close(self) -> None:
        if self.enabled:
            if self.bar is not None:
                self.bar.close()
            self.writer.close()
            self.jsonl.close()
