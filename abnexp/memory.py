"""Memory accounting: the bytes autograd keeps for backward (the InPlace-ABN paper's quantity).

:class:`SavedBytes` records every tensor autograd saves inside its context through
``torch.autograd.graph.saved_tensors_hooks`` and counts each distinct storage once (keyed by
``untyped_storage().data_ptr()``): a buffer shared by two ops — z kept by InPlace-ABN and,
as its input, by the following convolution — counts once. Parameters can be excluded, so the
figure is the activation memory of a forward pass.
"""
from __future__ import annotations

from typing import Iterable

import torch


class SavedBytes:
    """Context manager: ``{storage data_ptr: nbytes}`` of every tensor saved for backward.

    Args:
        exclude: tensors (e.g. ``model.parameters()``) whose storages are not counted.

    Example::

        with SavedBytes(exclude=model.parameters()) as saved:
            out = model(x)
        saved.total  # bytes kept for backward by this forward pass
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()):
        self.storages: dict[int, int] = {}
        self.exclude = {t.untyped_storage().data_ptr() for t in exclude}

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in self.exclude:
            self.storages[storage.data_ptr()] = storage.nbytes()
        return t

    def __enter__(self) -> "SavedBytes":
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    @property
    def total(self) -> int:
        """Bytes of the distinct storages saved (each counted once)."""
        return sum(self.storages.values())

    def has(self, t: torch.Tensor) -> bool:
        """Whether ``t``'s storage is among those saved."""
        return t.untyped_storage().data_ptr() in self.storages


GIB = 2**30


def module_bytes(model: torch.nn.Module) -> dict[str, int]:
    """Bytes of the parameters, of their gradients and of SGD's momentum buffers (one per
    trainable parameter), for a model in its current dtype."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return {"params_bytes": params, "grads_bytes": trainable, "optimizer_bytes": trainable}


def activation_bytes(model: torch.nn.Module, batch: int, crop: int, device: torch.device | str = "cpu") -> int:
    """Bytes kept for backward by one training-mode forward pass of ``batch`` × 3 × crop × crop
    (float32 input), parameters excluded, each storage counted once."""
    model.train()
    x = torch.randn(batch, 3, crop, crop, device=device)
    with SavedBytes(exclude=model.parameters()) as saved:
        out = model(x)
    del out
    return saved.total


def plan(model: torch.nn.Module, device_gb: float, reserved_gb: float, crop: int, batch: int,
         probe_crop: int, probe_batch: int) -> dict:
    """The largest per-device batch at ``crop`` and the largest square crop at ``batch``.

    Activation memory per sample is measured at ``probe_crop`` and scaled by the pixel count
    (convolutional activations grow linearly with pixels; the few fixed-size tensors — global
    pooling, classifier — are over-counted, which errs on the safe side for larger crops).
    Available = device − reserved − params − grads − momentum.

    Returns:
        dict with params_bytes, grads_bytes, optimizer_bytes, activation_bytes_per_sample (at
        ``crop``), available_bytes, max_batch (at ``crop``), max_crop (at ``batch``, a
        multiple of 8 pixels), crop, batch, device_gb.
    """
    fixed = module_bytes(model)
    probe = activation_bytes(model, probe_batch, probe_crop) / probe_batch
    per_pixel = probe / probe_crop**2
    available = int((device_gb - reserved_gb) * GIB) - sum(fixed.values())
    per_sample = per_pixel * crop**2
    max_batch = max(int(available // per_sample), 0)
    side = (available / (batch * per_pixel)) ** 0.5 if available > 0 else 0
    return {**fixed, "activation_bytes_per_sample": int(per_sample), "available_bytes": available,
            "max_batch": max_batch, "max_crop": int(side // 8 * 8), "crop": crop, "batch": batch,
            "device_gb": device_gb}


def measure_max_batch(step, crop: int, device: torch.device, upper: int = 1024) -> int:  # GPU only
    """On a GPU: the largest batch for which ``step(batch, crop)`` (one forward + backward)
    runs without running out of memory, by binary search."""
    def fits(b: int) -> bool:
        try:
            step(b, crop)
            return True
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            torch.cuda.empty_cache()

    lo, hi = 0, 1
    while hi <= upper and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, upper + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo
