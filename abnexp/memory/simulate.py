"""The peak memory of a whole training step, simulated on fake tensors; what fits a device.

:class:`Simulator` builds the model and optimizer once under PyTorch's ``FakeTensorMode``
(tensors with shapes, dtypes and strides but no data: nothing is computed, nothing allocated),
gives the optimizer its steady state (one step on zero gradients: SGD's momentum buffers exist
from the second step on), then runs steps — inputs, forward, loss, backward, optimizer step,
``zero_grad(set_to_none=True)`` as the trainer does — under an
:class:`~abnexp.memory.tracker.AllocationTracker`. The step's allocations are replayed through
the CUDA caching allocator model (:mod:`abnexp.memory.allocator`). A configuration fits a
capacity (the device's memory less what no tensor of the step owns: CUDA context, library
workspaces) when that replay raises no out-of-memory.

:func:`max_batch` and :func:`max_crop` search over simulations: the allocated peak is affine in
the batch and nearly so in the pixels, so two simulations place the answer and a few more
(bracket, bisection over the allocator replay) confirm it (InPlace-ABN §4.2 / Table 3: the
fixed-crop and fixed-batch regimes).
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from abnexp.memory.allocator import CachingAllocator, OutOfMemory
from abnexp.memory.tracker import AllocationTracker

TOP_MODULES = 10


@dataclass(frozen=True)
class StepSpec:
    """What one training step is, as four callables (run under fake mode by the simulator) and
    the trainer's precision settings.

    ``model()`` → the module (train mode is set); ``optimizer(model)`` → its optimizer;
    ``inputs(batch, crop)`` → a batch of that many square crops (what the task's loss takes);
    ``loss(model, batch)`` → the scalar loss. ``amp``: the autocast dtype of the forward pass and
    loss (torch.bfloat16 / torch.float16; None = float32); float16 also scales the loss with a
    ``GradScaler`` (abnexp.engine.trainer). ``grad_clip`` > 0: the gradients are unscaled and
    their global norm clipped before the optimizer step, as the trainer does.
    """

    model: Callable[[], nn.Module]
    optimizer: Callable[[nn.Module], torch.optim.Optimizer]
    inputs: Callable[[int, int], Any]
    loss: Callable[[nn.Module, Any], torch.Tensor]
    amp: Optional[torch.dtype] = None
    grad_clip: float = 0.0

    def autocast(self):
        """The forward pass's autocast context (CPU autocast: the simulator's fake tensors are
        CPU tensors), a null context for float32."""
        return torch.autocast("cpu", dtype=self.amp) if self.amp is not None else nullcontext()


@dataclass
class StepMemory:
    """One simulated step (bytes). ``tensor_peak_bytes``: the most bytes of live tensor storages
    at any moment, ``peak_phase`` when; ``at_peak``: those bytes by role (parameters and
    buffers, optimizer state, inputs, activations from forward, gradients of the parameters,
    backward temporaries); ``activations_bytes``: forward's storages alive when the loss is
    computed (what is kept for backward, loss included); ``backward_transient_bytes``: the most
    bytes of backward's own storages other than parameter gradients alive at once;
    ``allocated_peak_bytes`` / ``reserved_peak_bytes``: the caching allocator model's peaks
    (blocks in use, 512-byte rounded / segments held from cudaMalloc); ``top_modules``: the
    modules whose forward allocated the most bytes still kept at the loss, ``[name, bytes]``."""

    batch: int
    crop: int
    parameters_bytes: int
    gradients_bytes: int
    optimizer_bytes: int
    inputs_bytes: int
    activations_bytes: int
    backward_transient_bytes: int
    tensor_peak_bytes: int
    peak_phase: str
    at_peak: dict[str, int]
    allocated_peak_bytes: int
    reserved_peak_bytes: int
    top_modules: list[tuple[str, int]]
    events: list[tuple[int, int]] = field(repr=False, default_factory=list)

    def fits(self, capacity: int) -> bool:
        """Whether the step's allocations fit ``capacity`` bytes of the caching allocator model."""
        try:
            CachingAllocator(capacity).replay(self.events)
        except OutOfMemory:
            return False
        return True

    def summary(self) -> dict:
        """The figures without the event list (JSON-ready)."""
        return {k: v for k, v in self.__dict__.items() if k != "events"}


class Simulator:
    """Fake-tensor training steps of ``spec``; see the module docstring.

    Raises (from :meth:`step`): whatever the model raises for that batch / crop, e.g. BatchNorm's
    ValueError for one value per channel.
    """

    def __init__(self, spec: StepSpec):
        self.spec = spec
        self._cache: dict[tuple[int, int], Optional[StepMemory]] = {}
        self.mode = FakeTensorMode()
        with self.mode:
            self.model = spec.model().train()
            self.optimizer = spec.optimizer(self.model)
            self.scaler = torch.amp.GradScaler("cpu", enabled=spec.amp == torch.float16)
            for p in self.model.parameters():
                if p.requires_grad:
                    p.grad = torch.zeros_like(p)
            self.scaler.scale(torch.zeros(()))  # the scale and growth tracker exist from the first step on
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)

    def try_step(self, batch: int, crop: int) -> Optional[StepMemory]:
        """:meth:`step`, memoized; None where the model rejects the batch / crop (ValueError,
        RuntimeError: e.g. BatchNorm with one value per channel)."""
        if (batch, crop) not in self._cache:
            try:
                self._cache[batch, crop] = self.step(batch, crop)
            except (ValueError, RuntimeError):
                self._cache[batch, crop] = None
        return self._cache[batch, crop]

    def step(self, batch: int, crop: int) -> StepMemory:
        """Simulates one steady-state step at ``batch`` crops of ``crop``²."""
        model, optimizer = self.model, self.optimizer
        with self.mode:
            tr = AllocationTracker(model)
            for t in [*model.parameters(), *model.buffers()]:
                tr.add(t, "parameters")
            scaler = self.scaler
            state = [t for s in optimizer.state.values() for t in s.values()]
            for t in [*state, *([scaler._scale, scaler._growth_tracker] if scaler.is_enabled() else [])]:
                if isinstance(t, torch.Tensor):
                    tr.add(t, "optimizer")
            marks = {}
            with tr:
                tr.phase = "inputs"
                inputs = self.spec.inputs(batch, crop)
                marks["inputs"] = len(tr.storages)
                tr.phase = "forward"
                with self.spec.autocast():
                    loss = self.spec.loss(model, inputs)
                marks["forward"] = len(tr.events)
                kept = [s for s in tr.storages[marks["inputs"]:] if s.alive]
                tr.phase = "backward"
                scaler.scale(loss).backward()
                del loss
                marks["backward"] = len(tr.events)
                for p in model.parameters():
                    if p.grad is not None:
                        tr.storages[tr.add(p.grad, "gradients")].category = "gradients"
                tr.phase = "optimizer"
                if self.spec.grad_clip > 0:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(model.parameters(), self.spec.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                del inputs
        return _summarize(tr, marks, kept, batch, crop)


_ROLE = {"inputs": "inputs", "forward": "activations", "backward": "temporaries", "optimizer": "temporaries"}


def _summarize(tr: AllocationTracker, marks: dict, kept: list, batch: int, crop: int) -> StepMemory:
    storages = tr.storages
    for s in storages:
        s.category = s.category or _ROLE[s.phase]
    live, peak, peak_at = 0, -1, 0
    backward_live, backward_peak = 0, 0
    for n, (key, nbytes) in enumerate(tr.events):
        s = storages[key]
        delta = s.nbytes if nbytes >= 0 else -s.nbytes
        live += delta
        if s.phase == "backward" and s.category != "gradients":
            backward_live += delta
            backward_peak = max(backward_peak, backward_live)
        if live > peak:
            peak, peak_at = live, n
    at_peak: set[int] = set()
    for key, nbytes in tr.events[:peak_at + 1]:
        (at_peak.add if nbytes >= 0 else at_peak.discard)(key)
    phase = next(p for p in ("forward", "backward", "optimizer") if peak_at < marks.get(p, len(tr.events)))
    by_role: dict[str, int] = {}
    for key in at_peak:
        by_role[storages[key].category] = by_role.get(storages[key].category, 0) + storages[key].nbytes
    per_module: dict[str, int] = {}
    for s in kept:
        per_module[s.module] = per_module.get(s.module, 0) + s.nbytes
    total = lambda cat: sum(s.nbytes for s in storages if s.category == cat)  # noqa: E731
    reserved = CachingAllocator().replay(tr.events)
    return StepMemory(
        batch=batch, crop=crop, parameters_bytes=total("parameters"), gradients_bytes=total("gradients"),
        optimizer_bytes=total("optimizer"), inputs_bytes=total("inputs"),
        activations_bytes=sum(s.nbytes for s in kept if s.category == "activations"),
        backward_transient_bytes=backward_peak, tensor_peak_bytes=peak, peak_phase=phase,
        at_peak=dict(sorted(by_role.items())), allocated_peak_bytes=reserved.peak_allocated,
        reserved_peak_bytes=reserved.peak_reserved,
        top_modules=sorted(per_module.items(), key=lambda kv: -kv[1])[:TOP_MODULES], events=list(tr.events))


def _probes(step_at: Callable[[int], Optional[StepMemory]], capacity: int):
    """(peak, fits) for a search over one size (batch or crop side): the allocated peak in bytes
    of the step at that size (None: the model rejects it), and whether it fits ``capacity`` bytes."""
    def peak(v: int) -> Optional[int]:
        r = step_at(v)
        return None if r is None else r.allocated_peak_bytes

    def fits(v: int) -> bool:
        r = step_at(v)
        return r is not None and r.fits(capacity)

    return peak, fits


def max_batch(sim: Simulator, crop: int, capacity: int, multiple: int = 1, upper: int = 4096) -> int:
    """The largest batch (a multiple of ``multiple``) of ``crop``² whose step fits ``capacity``
    bytes; 0 if none. Batches the model rejects (BatchNorm at one value per channel) do not fit."""
    peak, fits = _probes(lambda b: sim.try_step(b, crop), capacity)
    if multiple == 1 and not fits(2):
        return 1 if fits(1) else 0
    guess = _extrapolate(peak, 2 * multiple, multiple, upper, capacity, power=1)
    return _search(fits, guess, multiple, 2 * multiple, upper)


def max_crop(sim: Simulator, batch: int, capacity: int, start: int, multiple: int = 8,
             upper: int = 4096) -> int:
    """The largest square crop side (a multiple of ``multiple``) whose step at ``batch`` fits
    ``capacity`` bytes, extrapolated from ``start``; 0 if not even ``multiple`` fits."""
    peak, fits = _probes(lambda c: sim.try_step(batch, c), capacity)
    start = min(max(start // multiple * multiple, multiple), upper)
    guess = _extrapolate(peak, start, multiple, upper, capacity, power=2)
    return _search(fits, guess, multiple, multiple, upper)


def _extrapolate(peak: Callable[[int], Optional[int]], x: int, step: int, upper: int, capacity: int,
                 power: int) -> int:
    """Where ``peak(x) ≈ a + b·x**power`` reaches ``capacity``: from points doubled from ``x``
    (multiples of ``step``) until the peak passes half the capacity (or ``x`` and ``x / 2`` if
    ``x`` already does), the last two solved for a, b."""
    points: list[tuple[int, int]] = []
    while True:
        p = peak(x)
        if p is not None:
            points.append((x, p))
        if p is None or p > capacity / 2 or x >= upper:
            break
        x = min(2 * x // step * step, upper)
    if len(points) == 1 and x > step:  # the first point is already past half: a second one below it
        below = max(x // 2 // step * step, step)
        p = peak(below)
        points = [(below, p), *points] if p is not None and below < x else points
    if len(points) < 2:
        return points[0][0] if points else x
    (xa, pa), (xb, pb) = points[-2:]
    slope = (pb - pa) / (xb**power - xa**power)
    if slope <= 0:
        return upper
    return int(max((capacity - pa) / slope + xa**power, 0) ** (1 / power))


def _search(fits: Callable[[int], bool], guess: int, step: int, lowest: int, upper: int) -> int:
    """The largest multiple of ``step`` in [``lowest``, ``upper``] that fits (fitting is monotone),
    0 if none: a bracket grown from ``guess`` in doubling strides, then bisection."""
    lo_k, hi_k, k = lowest // step - 1, upper // step + 1, min(max(guess // step, lowest // step), upper // step)
    stride = max(k // 16, 1)
    if fits(k * step):
        lo_k = k
        while lo_k + stride < hi_k and fits((lo_k + stride) * step):
            lo_k, stride = lo_k + stride, stride * 2
        hi_k = min(lo_k + stride, hi_k)
    else:
        hi_k = k
        while hi_k - stride > lo_k and not fits((hi_k - stride) * step):
            hi_k, stride = hi_k - stride, stride * 2
        lo_k = max(hi_k - stride, lo_k)
    while hi_k - lo_k > 1:  # lo_k fits (or is below lowest), hi_k does not (or is above upper)
        mid = (lo_k + hi_k) // 2
        lo_k, hi_k = (mid, hi_k) if fits(mid * step) else (lo_k, mid)
    return lo_k * step if lo_k * step >= lowest else 0


def measure_max_batch(step: Callable[[int, int], None], crop: int, lower: int = 1, upper: int = 1024) -> int:
    """On a GPU: the largest batch in [``lower``, ``upper``] for which ``step(batch, crop)`` (one
    real training step) runs without ``torch.cuda.OutOfMemoryError``, by doubling from ``lower``
    then bisection; ``lower - 1`` if not even ``lower`` fits."""
    def fits(b: int) -> bool:
        try:
            step(b, crop)
            return True
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            torch.cuda.empty_cache()

    lo, hi = lower - 1, lower
    while hi <= upper and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, upper + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo
