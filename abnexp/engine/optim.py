"""Optimizer and learning-rate schedules of the recipes.

The schedule is a function of training progress in (fractional) epochs, set before every
optimizer step, so it is unchanged when a run resumes with another world size.
"""
from __future__ import annotations

import math
from bisect import bisect_right

import torch
from torch import nn

from abnexp.config import choice
from abnexp.errors import ConfigError


def param_groups(model: nn.Module, weight_decay: float, decay_norm_and_bias: bool) -> list[dict]:
    """Two groups: weights of convs / linears with ``weight_decay``; norm parameters and biases
    (every parameter with fewer than 2 dimensions) with 0, unless ``decay_norm_and_bias``."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 or decay_norm_and_bias else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model: nn.Module, optim_cfg, global_batch_size: int,
                    loss_scaling: bool = False) -> torch.optim.Optimizer:
    """SGD (Nesterov by default). With ``optim.scale_lr`` the lr is multiplied by
    global_batch_size / optim.base_batch_size (linear scaling rule).

    The update is torch's fused SGD (``fused=True``: weight decay, momentum and the step in one
    pass per parameter) when every parameter is a floating-point CPU or CUDA tensor and
    ``loss_scaling`` is False, else torch's default implementation; both compute the same update.
    ResNet-18 on 2 CPU threads: 5.7 ms per step fused, 27.7 ms with the default (single-tensor on
    CPU) implementation. ``loss_scaling=True`` (a GradScaler, ``amp=fp16``) never fuses: torch's
    fused SGD takes over the scaler's skipping of overflow steps, and on a skipped *first* step it
    leaves its momentum buffers allocated but unwritten (``torch.empty_like``), then reads them as
    momentum at the next step, so the weights become inf/NaN one step later (torch 2.14; measured
    with ``norm=gn amp=fp16``, whose first step overflows at the initial scale 65536)."""
    if optim_cfg.name != "sgd":
        raise ConfigError(f"optim.name={optim_cfg.name!r} is not supported; valid: sgd")
    lr = optim_cfg.lr * (global_batch_size / optim_cfg.base_batch_size if optim_cfg.scale_lr else 1.0)
    fused = not loss_scaling and all(p.is_floating_point() and p.device.type in ("cpu", "cuda")
                                     for p in model.parameters())
    return torch.optim.SGD(param_groups(model, optim_cfg.weight_decay, optim_cfg.decay_norm_and_bias),
                           lr=lr, momentum=optim_cfg.momentum, nesterov=optim_cfg.nesterov,
                           fused=fused or None)


def schedule_warnings(sched_cfg, total_epochs: float) -> list[str]:
    """What the schedule ``sched_cfg`` cannot do in ``total_epochs`` (trainer.epochs), one line per
    problem with the key and the fix: a step schedule whose milestones all lie at or past the end
    (the lr never decays), a warm-up not shorter than training (the lr never reaches optim.lr).
    Warnings, not errors: a run continued later with more epochs may mean it."""
    c, out = sched_cfg, []
    milestones = list(c.milestones)
    if choice(c.name) == "step" and milestones and min(milestones) >= total_epochs:
        out.append(f"sched.milestones=[{','.join(map(str, milestones))}] all lie at or after the end of training (trainer.epochs="
                   f"{total_epochs:g}): the learning rate never decays; give milestones below {total_epochs:g} "
                   f"(e.g. sched.milestones=[{math.ceil(total_epochs * 2 / 3)}]) or use sched=cosine")
    if c.warmup_epochs >= total_epochs:
        out.append(f"sched.warmup_epochs={c.warmup_epochs:g} is not shorter than training (trainer.epochs="
                   f"{total_epochs:g}): the learning rate never reaches optim.lr; lower sched.warmup_epochs")
    return out


class EpochLR:
    """Sets every param group's lr to ``base_lr × factor(t)``, t = epochs elapsed (float).

    Schedules (T = total epochs, lr₀ = base lr, lr_f = sched.final_lr):
      step:   lr₀ · γ^(number of milestones ≤ t)
      linear: lr₀ + (lr_f − lr₀) · t/T
      poly:   lr_f + (lr₀ − lr_f) · (1 − t/T)^power
      cosine: lr_f + (lr₀ − lr_f) · (1 + cos(π t/T)) / 2
    times a linear warm-up from ``warmup_factor`` to 1 over ``warmup_epochs``.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, sched_cfg, total_epochs: float):
        self.optimizer = optimizer
        self.cfg = sched_cfg
        self.total = float(total_epochs)
        self.base_lrs = [g["lr"] for g in optimizer.param_groups]
        self.progress = 0.0

    def lr_at(self, base_lr: float, t: float) -> float:
        c, frac = self.cfg, min(max(t / self.total, 0.0), 1.0) if self.total > 0 else 1.0
        name = choice(c.name)
        if name == "step":
            lr = base_lr * c.gamma ** bisect_right(sorted(c.milestones), t)
        elif name == "linear":
            lr = base_lr + (c.final_lr - base_lr) * frac
        elif name == "poly":
            lr = c.final_lr + (base_lr - c.final_lr) * (1.0 - frac) ** c.power
        elif name == "cosine":
            lr = c.final_lr + (base_lr - c.final_lr) * 0.5 * (1.0 + math.cos(math.pi * frac))
        else:
            raise ConfigError(f"sched.name={name!r}; valid: step, linear, poly, cosine")
        if c.warmup_epochs > 0 and t < c.warmup_epochs:
            lr *= c.warmup_factor + (1.0 - c.warmup_factor) * t / c.warmup_epochs
        return lr

    def set_progress(self, epochs_elapsed: float) -> None:
        self.progress = epochs_elapsed
        for g, base in zip(self.optimizer.param_groups, self.base_lrs):
            g["lr"] = self.lr_at(base, epochs_elapsed)

    def get_last_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        """Only the progress: base lrs come from the config (so a resumed run may change optim.lr)."""
        return {"progress": self.progress}

    def load_state_dict(self, state: dict) -> None:
        self.set_progress(state["progress"])
