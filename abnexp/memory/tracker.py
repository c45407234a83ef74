"""Every tensor storage a piece of PyTorch code creates and frees, in order, on fake or real tensors.

:class:`AllocationTracker` is a ``TorchDispatchMode``: each ATen op's outputs are looked at
after the op runs, and a storage seen for the first time is an allocation of its ``nbytes()``,
attributed to the current phase (``tracker.phase``) and to the innermost module whose forward is
running (global module hooks). A ``weakref.finalize`` on the storage object records its release
when the last tensor (or autograd-saved reference) drops it. In-place ops and views return
storages already seen, so they allocate nothing, as on a GPU. Under ``FakeTensorMode`` nothing
is computed or allocated, yet storages live and die exactly as in the real step.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary


OUTSIDE = "(outside the model)"
"""The module label of storages allocated while no module's forward runs (e.g. the loss)."""


@dataclass
class Storage:
    """One tracked storage: bytes, the phase and module that allocated it, its role (category)."""

    nbytes: int
    phase: str
    module: str
    category: str
    alive: bool = True


class AllocationTracker(TorchDispatchMode):
    """Records ``events``: ``(key, nbytes)`` for an allocation, ``(key, -1)`` for a release.

    Args:
        model: its modules' qualified names label the allocations made inside their forward.

    Use :meth:`add` for storages that exist before tracking starts (parameters, buffers,
    optimizer state); set :attr:`phase` as the step proceeds.
    """

    def __init__(self, model: Optional[nn.Module] = None):
        super().__init__()
        self.events: list[tuple[int, int]] = []
        self.storages: list[Storage] = []
        self.phase = "forward"
        self._keys = WeakIdKeyDictionary()
        self._names = {id(m): name or "(model)" for name, m in model.named_modules()} if model is not None else {}
        self._stack: list[str] = []
        self._hooks: list = []

    def key(self, t: torch.Tensor) -> Optional[int]:
        """The key of ``t``'s storage, None if it was never tracked."""
        return self._keys.get(t.untyped_storage())

    def module_label(self) -> str:
        """The qualified name of the innermost module whose forward is running, ``OUTSIDE`` if none."""
        return self._stack[-1] if self._stack else OUTSIDE

    def add(self, t: torch.Tensor, category: str) -> int:
        """Tracks ``t``'s storage (if new) as ``category``; returns its key."""
        st = t.untyped_storage()
        key = self._keys.get(st)
        if key is None:
            key = len(self.storages)
            self._keys[st] = key
            self.storages.append(Storage(st.nbytes(), self.phase, self.module_label(), category))
            self.events.append((key, st.nbytes()))
            weakref.finalize(st, self._release, key)
        return key

    def _release(self, key: int) -> None:
        self.storages[key].alive = False
        self.events.append((key, -1))

    def live_bytes(self) -> int:
        """Bytes of the storages alive now."""
        return sum(s.nbytes for s in self.storages if s.alive)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.add(t, "")
        return out

    def _pre(self, module, args) -> None:
        self._stack.append(self._names.get(id(module), type(module).__name__))

    def _post(self, module, args, output) -> None:
        if self._stack:
            self._stack.pop()

    def __enter__(self) -> "AllocationTracker":
        self._hooks = [nn.modules.module.register_module_forward_pre_hook(self._pre),
                       nn.modules.module.register_module_forward_hook(self._post, always_call=True)]
        return super().__enter__()

    def __exit__(self, *exc) -> None:
        for h in self._hooks:
            h.remove()
        super().__exit__(*exc)
