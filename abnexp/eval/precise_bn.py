"""Precise BN: re-estimate running statistics on training batches after training.

The running statistics kept during training are exponential averages over iterations whose
weights kept changing, and with a normalization batch of 2 they are noisy; evaluating with them
measures that noise as much as the network. "Precise BN" (Wu & Johnson, "Rethinking 'Batch' in
BatchNorm", 2021, §3; fvcore's ``update_bn_stats``) recomputes them with the final weights: every
layer's update switched to a cumulative average (``momentum=None``), ``num_batches_tracked`` reset,
then N training batches forwarded in training mode without gradient, so that each layer's running
statistics become the equal-weight average of the batch (normalization-batch) statistics its own
update rule computes -- mean and unbiased variance for BN / BRN / CBN, the second moment for MABN
(which subtracts no mean) -- over those batches.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn


def running_stats_layers(model: nn.Module) -> list[nn.Module]:
    """The layers of ``model`` whose running statistics follow a momentum update: those with a
    ``momentum`` attribute and ``running_mean`` / ``running_var`` / ``num_batches_tracked`` buffers
    (torch's BatchNorm and abnexp's BN, BRN, MABN, CBN layers; not GroupNorm or frozen BN)."""
    return [m for m in model.modules() if hasattr(m, "momentum") and all(
        getattr(m, b, None) is not None for b in ("running_mean", "running_var", "num_batches_tracked"))]


@torch.no_grad()
def precise_bn(model: nn.Module, inputs: Iterable[torch.Tensor], num_batches: int) -> int:
    """Replaces the running statistics of every :func:`running_stats_layers` layer of ``model`` by
    their cumulative average over the first ``num_batches`` batches of ``inputs``.

    Args:
        model: the trained model; its training/eval mode and every buffer other than
            ``running_mean`` / ``running_var`` (MABN's and CBN's statistic buffers, BRN's and CBN's
            iteration counters, ``num_batches_tracked``) are left as they were.
        inputs: model inputs, e.g. the images (N, 3, H, W) float32 of training batches (the
            training augmentation, as fvcore), already on the model's device.
        num_batches: N >= 1, how many batches to average.

    Returns:
        the number of batches used (fewer than ``num_batches`` if ``inputs`` ran out).

    Raises:
        ValueError: ``num_batches`` < 1, or ``inputs`` yields no batch.
    """
    if num_batches < 1:
        raise ValueError(f"precise BN needs num_batches >= 1, got {num_batches}")
    layers = running_stats_layers(model)
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    momenta = [m.momentum for m in layers]
    was_training = model.training
    used = 0
    try:
        for m in layers:
            m.momentum = None
            m.num_batches_tracked.zero_()  # running stats kept: BRN's r, d read them in the first batch
        model.train()
        for x in inputs:
            if used == num_batches:
                break
            model(x)
            used += 1
        if used == 0:
            raise ValueError("precise BN: the inputs yielded no batch")
        new = [(m.running_mean.clone(), m.running_var.clone()) for m in layers]
    finally:
        for m, momentum in zip(layers, momenta):
            m.momentum = momentum
        for name, b in model.named_buffers():
            b.copy_(buffers[name])
        model.train(was_training)
    for m, (mean, var) in zip(layers, new):
        m.running_mean.copy_(mean)
        m.running_var.copy_(var)
    return used
