"""What fits in a GPU's memory for a composed config (``abnexp memory``), and its real check.

:func:`plan_for` simulates the configured task's whole training step on fake tensors
(:mod:`abnexp.memory.simulate`: the model, the task's loss, backward, the configured SGD step),
replays it through the CUDA caching allocator model, and searches the largest batch at the crop
and the largest square crop at the batch that fit ``memory.device`` (or ``memory.device_gb``)
less ``memory.reserved_gb``. ``abnexp table memory`` (abnexp.report.memory_table) runs it over
InPlace-ABN Table 3.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from abnexp.config import choice
from abnexp.engine.optim import build_optimizer
from abnexp.engine.runtime import AMP_DTYPES
from abnexp.errors import ConfigError
from abnexp.memory import DEVICES, GIB, MIB, Simulator, StepSpec, max_batch, max_crop, measure_max_batch
from abnexp.memory.detection import detection_inputs, upper_bound_losses
from abnexp.models.detection import HEADS
from abnexp.tasks import build_task
from abnexp.tasks.base import RunContext


def _cls_batch(cfg, batch: int, crop: int):
    return torch.randn(batch, 3, crop, crop), torch.randint(0, cfg.data.num_classes, (batch,))


def _semseg_batch(cfg, batch: int, crop: int):
    return torch.randn(batch, 3, crop, crop), torch.randint(0, cfg.data.num_classes, (batch, crop, crop))


def _detection_batch(cfg, batch: int, side: int):
    d = cfg.data
    return detection_inputs(batch, side, _detection_width(cfg, side), cfg.memory.gt_instances,
                            HEADS[cfg.head.name].masks, d.num_classes)


def _detection_width(cfg, side: int) -> int:
    return round(side * cfg.data.max_size / cfg.data.min_size)


def _detection_scale(cfg):
    """The config with the detector's training resize (data.min_size / data.max_size) set to
    ``memory.image_size`` (COCO's 800 / 1333 unless set; null keeps the data set's), its shorter
    side ``memory.crop`` if set (the longer-side cap scaled with it)."""
    cfg = copy.deepcopy(cfg)
    m, d = cfg.memory, cfg.data
    short, cap = m.image_size or (d.min_size, d.max_size)
    if m.crop:
        short, cap = m.crop, round(cap * m.crop / short)
    d.min_size, d.max_size = short, cap
    return cfg


def _detection_upper_bound(model, batch) -> torch.Tensor:
    return sum(upper_bound_losses(model, *batch).values())


@dataclass(frozen=True)
class PlannedTask:
    """How ``abnexp memory`` simulates one task: ``inputs(cfg, batch, side)`` → a training batch
    as the task's loss takes it; ``side(cfg)`` → the image side planned when ``memory.crop`` is 0;
    ``simulated_loss(model, batch)`` → the loss on fake tensors (None: the task's own loss);
    ``crop_search``: whether the largest square crop is searched (square crops are the task's input);
    ``width(cfg, side)``: the image's other side (None: square); ``scale(cfg)`` → the config
    planned (None: ``cfg`` as composed)."""

    inputs: Callable
    side: Callable
    simulated_loss: Optional[Callable] = None
    crop_search: bool = True
    width: Optional[Callable] = None
    scale: Optional[Callable] = None


PLANNED_TASKS = {
    "cls": PlannedTask(_cls_batch, lambda cfg: cfg.data.crop_size),
    "semseg": PlannedTask(_semseg_batch, lambda cfg: cfg.data.crop_size),
    "detection": PlannedTask(_detection_batch, lambda cfg: cfg.data.min_size, _detection_upper_bound,
                             crop_search=False, width=_detection_width, scale=_detection_scale),
}
"""task name -> its entry. cls: float32 images (N, 3, S, S), int64 class ids (N,); semseg: the same
with class ids per pixel (N, S, S); detection: N images (3, S, S·max_size/min_size) at
``memory.image_size`` (whatever data= trains at) with ``memory.gt_instances`` boxes / labels /
masks each, the step an upper bound (abnexp.memory.detection)."""


def planned_config(cfg):
    """The config whose step ``abnexp memory`` plans: the task's :attr:`PlannedTask.scale` applied
    (detection: ``memory.image_size``), else ``cfg``."""
    planned = PLANNED_TASKS.get(cfg.task.name)
    return planned.scale(cfg) if planned and planned.scale else cfg


def device_capacity(cfg) -> tuple[str, int]:
    """(the device's name, bytes the step's tensors may reserve: device − ``memory.reserved_gb``).

    Raises:
        ConfigError: ``memory.device`` not in the table, or nothing left after the reserve.
    """
    m = cfg.memory
    if m.device not in DEVICES:
        raise ConfigError(f"memory.device={m.device!r} is not a known GPU; valid: {', '.join(DEVICES)} "
                          f"(or set memory.device_gb=<GiB>)")
    name, total = ((f"{m.device_gb:g} GiB device", int(m.device_gb * GIB)) if m.device_gb
                   else (DEVICES[m.device].name, DEVICES[m.device].total_bytes))
    capacity = total - int(m.reserved_gb * GIB)
    if capacity <= 0:
        raise ConfigError(f"memory.reserved_gb={m.reserved_gb:g} leaves nothing of the {total / GIB:.2f} GiB of "
                          f"{name}; lower memory.reserved_gb")
    return name, capacity


def step_spec(cfg, device: torch.device = torch.device("cpu"), simulated: bool = True) -> StepSpec:
    """The configured training step as the trainer runs it: task model, task loss under
    ``amp=``'s autocast (it moves the CPU-made inputs to ``device``, as from a data loader),
    GradScaler for fp16, ``trainer.grad_clip``, the configured optimizer. ``simulated``: the
    loss runs on fake tensors (detection: the upper-bound step of abnexp.memory.detection);
    False: the task's own loss (real steps).

    Raises:
        ConfigError: a task without an input table entry.
    """
    if cfg.task.name not in PLANNED_TASKS:
        raise ConfigError(f"abnexp memory simulates task={' or task='.join(PLANNED_TASKS)}, not task={cfg.task.name}")
    amp = AMP_DTYPES[choice(cfg.amp)]
    task, ctx = build_task(cfg), RunContext(device=device, amp_dtype=amp)
    planned = PLANNED_TASKS[cfg.task.name]
    loss = (planned.simulated_loss if simulated and planned.simulated_loss
            else lambda model, batch: task.loss(model, batch, ctx)[0])
    return StepSpec(model=task.build_model,
                    optimizer=lambda model: build_optimizer(model, cfg.optim, cfg.data.batch_size),
                    inputs=lambda batch, crop: planned.inputs(cfg, batch, crop), loss=loss,
                    amp=amp, grad_clip=cfg.trainer.grad_clip)


PRECISIONS = ("none", "bf16")
"""``amp=`` settings whose activations per crop ``abnexp memory`` prints (fp16 keeps what bf16 keeps:
the same autocast op lists, 2 bytes a value; it adds only the GradScaler's scalars)."""


def _with_amp(cfg, amp: str):
    other = cfg.copy()
    other.amp = amp
    return other


def _activations_per_crop(sim: Simulator, crop: int, multiple: int) -> Optional[int]:
    """Growth of the bytes kept for backward per crop (batches 2 → 4 × ``multiple``); None if rejected."""
    low, high = sim.try_step(2 * multiple, crop), sim.try_step(4 * multiple, crop)
    return None if low is None or high is None else (high.activations_bytes - low.activations_bytes) // (2 * multiple)


def plan_for(cfg, search: bool = True) -> dict:
    """The simulated step of :func:`planned_config` at (``memory.batch`` or data.batch_size,
    ``memory.crop`` or data.crop_size; detection: ``memory.image_size``) with its breakdown
    (bytes), and — with ``search`` — ``max_batch`` at the crop and ``max_crop`` at the batch on
    the device.

    Returns:
        dict: model, norm, task, device, capacity_bytes, batch, crop, the
        :class:`~abnexp.memory.StepMemory` figures, ``peak_bytes`` (the allocator model's reserved
        peak), ``fits``, ``max_batch``, ``max_crop``, ``per_crop_bytes`` (the allocated peak's
        growth per crop, from batches 2 and 4), ``activations_per_crop`` ({amp: bytes kept for
        backward per crop} for :data:`PRECISIONS`), ``image`` (the planned image size), ``data_image``
        (detection: data.min_size × data.max_size as composed), ``seconds``.

    Raises:
        ConfigError: an unknown device, an unsupported task / precision, or a batch the model
            rejects (e.g. BatchNorm with one value per channel at batch 1).
    """
    t0 = time.perf_counter()
    data_image = f"{cfg.data.min_size}×{cfg.data.max_size}" if "min_size" in cfg.data else None
    cfg = planned_config(cfg)
    device, capacity = device_capacity(cfg)
    spec = step_spec(cfg)
    planned = PLANNED_TASKS.get(cfg.task.name)
    crop = cfg.memory.crop or (planned.side(cfg) if planned else 0)
    batch = cfg.memory.batch or cfg.data.batch_size
    with torch.random.fork_rng(devices=[]):
        sim = Simulator(spec)
        step = sim.try_step(batch, crop)
        if step is None:
            try:
                sim.step(batch, crop)
            except (ValueError, RuntimeError) as e:
                raise ConfigError(f"the step at batch {batch}, crop {crop} fails: {str(e).splitlines()[0]}; "
                                  f"set memory.batch / memory.crop") from None
        result = {"model": cfg.model.name, "norm": cfg.norm.name, "task": cfg.task.name, "amp": choice(cfg.amp),
                  "gt_instances": cfg.memory.gt_instances, "device": device,
                  "capacity_bytes": capacity, **step.summary(), "peak_bytes": step.reserved_peak_bytes,
                  "fits": step.fits(capacity)}
        result["image"] = f"{crop}×{planned.width(cfg, crop)}" if planned.width else f"{crop}²"
        result["data_image"] = data_image
        if search:
            multiple = max(cfg.norm.get("group_size", 0) or 1, 1)
            result["max_batch"] = max_batch(sim, crop, capacity, multiple)
            result["max_crop"] = max_crop(sim, batch, capacity, start=crop) if planned.crop_search else None
            low, high = sim.try_step(2 * multiple, crop), sim.try_step(4 * multiple, crop)
            if low is not None and high is not None:  # the allocated peak's growth per crop
                result["per_crop_bytes"] = (high.allocated_peak_bytes - low.allocated_peak_bytes) // (2 * multiple)
            result["activations_per_crop"] = {
                p: _activations_per_crop(sim if AMP_DTYPES[p] == spec.amp else Simulator(step_spec(_with_amp(cfg, p))),
                                         crop, multiple) for p in PRECISIONS}
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result


def check_measure(cfg) -> tuple[torch.device, int]:
    """For ``memory.measure=true``, before anything runs: (the CUDA device, the planned capacity).

    Raises:
        ConfigError: no CUDA device, or the GPU smaller than the planned device.
    """
    if not torch.cuda.is_available():
        raise ConfigError("memory.measure=true needs a CUDA device; drop it to use the planner's estimate")
    device = torch.device("cuda")
    _, capacity = device_capacity(cfg)
    total = torch.cuda.get_device_properties(device).total_memory
    if capacity > total:
        raise ConfigError(f"memory.measure=true: this GPU has {total / GIB:.2f} GiB, less than the planned "
                          f"{capacity / GIB:.2f} GiB; plan a smaller memory.device / memory.device_gb")
    return device, capacity


def measured_max_batch(cfg, crop: int, upper: int) -> int:
    """``memory.measure=true``: the largest batch whose real training step (the task's loss,
    backward, the configured optimizer) runs on this GPU without out-of-memory, searched from
    batch 2 (BatchNorm needs two values per channel) up to ``upper``, with the memory capped at
    the planned device's (``torch.cuda.set_per_process_memory_fraction``).

    Raises:
        ConfigError: as :func:`check_measure`.
    """
    device, capacity = check_measure(cfg)
    cfg = planned_config(cfg)
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(capacity / total, device)
    spec = step_spec(cfg, device, simulated=False)
    model = spec.model().to(device).train()
    optimizer = spec.optimizer(model)

    def step(batch: int, side: int) -> None:
        try:
            spec.loss(model, spec.inputs(batch, side)).backward()
            optimizer.step()
        finally:
            optimizer.zero_grad(set_to_none=True)

    return measure_max_batch(step, crop, lower=2, upper=upper)


def _gib(n: int) -> str:
    return f"{n / GIB:.3f} GiB"


def format_plan(r: dict) -> str:
    """The plan as printed by ``abnexp memory``."""
    lines = [f"{r['task']} {r['model']} norm={r['norm']}: one training step at batch {r['batch']}, {r['image']} "
             f"(simulated on fake tensors in {r['seconds']:g} s)",
             f"  parameters + buffers {_gib(r['parameters_bytes'])}, gradients {_gib(r['gradients_bytes'])}, "
             f"optimizer state {_gib(r['optimizer_bytes'])}, inputs {_gib(r['inputs_bytes'])}",
             f"  activations kept for backward {_gib(r['activations_bytes'])}, backward transient peak "
             f"{_gib(r['backward_transient_bytes'])}",
             f"  peak of live tensors {_gib(r['tensor_peak_bytes'])} (in {r['peak_phase']}: "
             + ", ".join(f"{k} {v / GIB:.3f}" for k, v in r["at_peak"].items()) + ")",
             f"  caching allocator: {_gib(r['allocated_peak_bytes'])} allocated, "
             f"{_gib(r['peak_bytes'])} reserved at peak",
             "  modules keeping the most bytes: "
             + ", ".join(f"{n} {b / MIB:.0f} MiB" for n, b in r["top_modules"][:5]),
             f"  {r['device']}: {_gib(r['capacity_bytes'])} for tensors, this step "
             f"{'fits' if r['fits'] else 'does NOT fit'}"]
    if r["task"] == "detection":
        lines.append(f"  detection: an upper bound: images of {r['image']} (memory.image_size; the data config's "
                     f"{r['data_image']} with memory.image_size=null), RPN proposals, sampled RoIs and mask RoIs at "
                     f"their configured caps, {r['gt_instances']} objects per image")
    if "max_batch" in r:
        lines.append(f"  largest batch at {r['image']}: {r['max_batch']}")
        if r["max_crop"] is not None:
            lines.append(f"  largest square crop at batch {r['batch']}: {r['max_crop']}²")
        lines.append("  activations kept per crop: " + ", ".join(
            f"{'float32' if p == 'none' else p + '/fp16'} {f'{b / MIB:.1f} MiB' if b is not None else '—'}"
            for p, b in r["activations_per_crop"].items()))
    return "\n".join(lines)
