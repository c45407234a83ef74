"""The bytes autograd keeps for backward (the InPlace-ABN paper's quantity, per layer).

:class:`SavedBytes` records every tensor autograd saves inside its context through
``torch.autograd.graph.saved_tensors_hooks`` and counts each distinct storage once (keyed by
``untyped_storage().data_ptr()``): a buffer shared by two ops — z kept by InPlace-ABN and,
as its input, by the following convolution — counts once. Parameters can be excluded, so the
figure is the activation memory of a forward pass. (The whole training step's peak is
:mod:`abnexp.memory.simulate`'s.) :func:`kept_by_savers` says, per storage, which modules saved
it (on fake tensors too, whose storages have no address).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import nn

from abnexp.memory.tracker import AllocationTracker


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


@dataclass(frozen=True)
class KeptTensor:
    """A storage a forward pass keeps for backward: its bytes, the module whose forward allocated
    it, and the modules whose ops saved it (qualified names; ``OUTSIDE`` outside the model)."""

    nbytes: int
    module: str
    savers: frozenset[str]


def kept_by_savers(model: nn.Module, forward: Callable[[], Any]) -> list[KeptTensor]:
    """Runs ``forward()`` (e.g. the model and its loss, on fake or real tensors) and returns every
    storage it allocated that autograd saved for backward, with who allocated and who saved it
    (an :class:`~abnexp.memory.tracker.AllocationTracker` plus ``saved_tensors_hooks``). A
    buffer an in-place norm layer overwrote is saved both by that layer and by the next
    convolution (InPlace-ABN §3: the one buffer both keep). Parameters are not counted."""
    tracker = AllocationTracker(model)
    savers: dict[int, set] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = tracker.key(t)
        if key is not None:
            savers.setdefault(key, set()).add(tracker.module_label())
        return t

    with tracker, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return [KeptTensor(tracker.storages[k].nbytes, tracker.storages[k].module, frozenset(s))
            for k, s in savers.items()]
