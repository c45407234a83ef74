"""Typed schema of the Hydra configuration (configs/ is the tree of values) and the one
function that composes it.

The base schema ``Config`` is registered as ``base_config``, the first entry of
configs/config.yaml's defaults list, so Hydra composes in struct mode against it: a misspelled
key (``trainer.epoch=3``) or a value of the wrong type fails at composition with Hydra's
one-line message, and an unknown group option (``model=resnet19``) lists the valid choices.

Groups whose options have keys of their own (model, norm, data, task, head) are typed here by a base class
holding the keys every option has; each option's full schema is a dataclass carried by its entry
in that axis's table (``abnexp.models.MODELS``, ``abnexp.models.detection.HEADS``, ``abnexp.norm.registry.NORMS``, ``abnexp.data.DATASETS``,
``abnexp.tasks.TASKS``). Importing the config package (``abnexp.configs``, which Hydra does
when it reads the tree) stores those schemas with :func:`register_options` as
``schema/<group>/<option>``, and each option's YAML file names its schema first in its defaults
list, so ``norm=gn norm.window=4`` fails at composition (GroupNorm has no window) while
``norm=cbn norm.window=4`` composes.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from enum import Enum
from importlib import resources
from typing import Optional, Sequence, Union

from hydra.core.config_store import ConfigStore
from omegaconf import II, DictConfig, OmegaConf

from abnexp.errors import ConfigError


class Amp(str, Enum):
    """Automatic mixed precision mode: none (float32), fp16 (with grad scaling) or bf16."""

    none = "none"
    fp16 = "fp16"
    bf16 = "bf16"


class SchedName(str, Enum):
    step = "step"
    linear = "linear"
    poly = "poly"
    cosine = "cosine"


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
"""torch.compile's modes, for trainer.compile_mode (reduce-overhead uses CUDA graphs: GPU only)."""


class NormPlacement(str, Enum):
    """Where task=detection puts norm= (CBN paper, Table 5): ``heads`` = frozen BN in the backbone,
    the norm in FPN + heads; ``everywhere``; ``auto`` = heads with model.pretrained, else everywhere."""

    auto = "auto"
    heads = "heads"
    everywhere = "everywhere"


@dataclass
class HeadConfig:
    """Keys of every ``head=`` option (task=detection's detector, configs/head): torchvision's FPN
    Mask / Faster R-CNN with our norms; an option's own schema (abnexp.models.detection.HEADS)
    extends it."""

    name: str = "mask_rcnn_fpn"  # mask_rcnn_fpn | faster_rcnn_fpn
    norm_placement: NormPlacement = NormPlacement.auto
    trainable_backbone_layers: Optional[int] = None  # 0-5 from the top (torchvision); None: 3 pretrained, 5 scratch
    fpn_channels: int = 256
    box_head_convs: int = 4  # 4conv1fc box head
    box_head_fc: int = 1024
    rpn_pre_nms_top_n_train: int = 2000  # per FPN level and image (torchvision's defaults)
    rpn_pre_nms_top_n_test: int = 1000
    rpn_post_nms_top_n_train: int = 2000  # per image
    rpn_post_nms_top_n_test: int = 1000
    box_batch_size_per_image: int = 512  # sampled RoIs per image for the box head
    box_detections_per_img: int = 100


@dataclass
class TaskConfig:
    """Keys of every ``task=`` option; an option's own schema (abnexp.tasks.TASKS) extends it."""

    name: str = "cls"


@dataclass
class ModelConfig:
    """Keys of every ``model=`` option; an option's own schema (abnexp.models.MODELS) extends it."""

    name: str = "resnet18"
    output_stride: int = 32  # 32 = no dilation (classification); 16 or 8 dilate the last stages
    pretrained: Optional[str] = None  # path to an abnexp checkpoint whose backbone weights are loaded
    zero_init_residual: bool = False  # γ = 0 in the last norm of every residual branch (torchvision's)


@dataclass
class NormConfig:
    """Keys of every ``norm=`` option; an option's own schema (abnexp.norm.registry.NORMS) extends
    it with the keys that strategy has (momentum, group_size, window, ...)."""

    name: str = "bn"
    activation: str = "leaky_relu"  # leaky_relu | relu | elu | identity
    activation_param: float = 0.01  # LeakyReLU slope / ELU alpha
    eps: float = 1e-5


@dataclass
class DataConfig:
    """Keys of every ``data=`` option; an option's own schema (abnexp.data.DATASETS: classification,
    segmentation or detection data) extends it."""

    name: str = "demo"
    root: Optional[str] = None  # None for the generated demo sets: their cache folder
    epochs: int = 90  # this dataset's standard training length; trainer.epochs defaults to it
    num_classes: int = 10
    batch_size: int = 32  # per process
    num_workers: int = II("abnexp.workers:${launcher.nproc_per_node}")  # loader processes; default: default_workers()


@dataclass
class OptimConfig:
    name: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    decay_norm_and_bias: bool = False  # apply weight decay to norm parameters and biases too
    scale_lr: bool = False  # lr *= global batch / base_batch_size
    base_batch_size: int = 256


@dataclass
class SchedConfig:
    name: SchedName = SchedName.step
    warmup_epochs: float = 0.0  # linear warm-up from warmup_factor * lr
    warmup_factor: float = 0.1
    milestones: list[int] = field(default_factory=lambda: [30, 60])  # epochs (step)
    gamma: float = 0.1  # step decay factor
    power: float = 0.9  # poly exponent
    final_lr: float = 0.0  # linear / cosine / poly end value


@dataclass
class TrainerConfig:
    epochs: int = 90
    max_steps: int = 0  # stop after this many optimizer steps; 0 = no cap
    log_every: int = 20  # optimizer steps between log lines / metrics.jsonl rows
    eval_every: int = 1  # epochs between validation passes (and always at the end)
    grad_clip: float = 0.0  # max global gradient norm; 0 = off
    label_smoothing: float = 0.0
    checkpoint_every: int = 0  # optimizer steps between step checkpoints (checkpoints/step_<N>.pt); 0 = epoch ends only
    checkpoint_minutes: float = 0.0  # also a step checkpoint once this many minutes passed since the last one; 0 = off
    keep_last: int = 2  # step checkpoints kept beside last.pt (older ones are deleted); >= 1
    compile: bool = False  # torch.compile the model (checkpoints hold the plain module's keys either way)
    compile_mode: str = "default"  # torch.compile's mode: one of COMPILE_MODES


@dataclass
class ExperimentConfig:
    """Metadata of a paper recipe (configs/experiment): which table cell(s) it reproduces."""

    paper: str = ""
    table: str = ""  # a key of abnexp.report.paper_tables.TABLES
    row: str = ""  # as printed in the paper
    column: Optional[str] = None  # for tables whose cells come from different runs
    world_size: int = 1  # processes (GPUs) the recipe assumes; data.batch_size is per process
    eval_overrides: list[str] = field(default_factory=list)  # applied by `abnexp eval` (key=value)
    note: str = ""


@dataclass
class LauncherConfig:
    """Processes of one job (abnexp/commands/launch.py). Under torchrun, torchrun's options rule."""

    nproc_per_node: int = 1  # > 1: `abnexp train` starts torchrun --standalone with this many processes
    sync_group_size: int = 0  # ranks whose synchronized norms share statistics; 0 = all (e.g. 8 = per node of 8)


@dataclass
class MemoryConfig:
    """``abnexp memory``: what fits in one device (InPlace-ABN's fixed-crop / fixed-batch regimes)."""

    device: str = "titan_xp"  # a GPU of abnexp.memory.DEVICES (titan_xp: the InPlace-ABN paper's 12 GB cards)
    device_gb: float = 0.0  # GiB of one device; 0 = memory.device's memory
    reserved_gb: float = 0.5  # GiB no tensor of the step owns (CUDA context, cuDNN/cuBLAS workspaces)
    crop: int = 0  # input side in pixels for max_batch; 0 = data.crop_size (detection: memory.image_size's shorter side)
    gt_instances: int = 8  # detection: objects (boxes, masks) per image planned; COCO has 7.7 on average
    # detection: the planned training scale [shorter side, longer-side cap] in pixels, whatever data= is (COCO's
    # 800 / 1333, MABN §5.2, CBN §4.2); null = data.min_size / data.max_size
    image_size: Optional[list[int]] = field(default_factory=lambda: [800, 1333])
    batch: int = 0  # per-device batch for max_crop; 0 = data.batch_size
    json: Optional[str] = None  # write the figures as JSON to this path
    measure: bool = False  # on a GPU: also find max_batch by real allocation (binary search)


@dataclass
class Config:
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    norm: NormConfig = field(default_factory=NormConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    seed: int = 0
    amp: Amp = Amp.none
    channels_last: bool = False
    device: str = "auto"  # auto (cuda if available), cpu, cuda
    resume: Optional[str] = None  # run dir or checkpoint file; an existing run dir auto-resumes
    experiment: Optional[ExperimentConfig] = None  # metadata of a paper recipe (configs/experiment)
    head: Optional[HeadConfig] = None  # task=detection's detector (configs/head); None for other tasks


GROUPS_BY_NAME = ("task", "model", "norm", "data", "optim", "sched", "head")
"""Config groups whose chosen option is recorded in the config as ``<group>.name``."""

RENAMES_FILE = "experiment_renames.yaml"
"""configs/experiment_renames.yaml: old recipe name -> its name in a recipe family folder."""


def group_options(group: str) -> str:
    """The options of config group ``group`` as a user picks them (``group=<option>``), comma-separated:
    its YAML files in configs/<group>, nested folders as ``folder/*`` (the recipe families), files
    starting with ``_`` (shared bases) left out. ``abnexp train --help`` lists them (configs/hydra/help)."""
    folder = resources.files("abnexp.configs") / group
    names = sorted(f"{e.name}/*" if e.is_dir() else e.name.removesuffix(".yaml") for e in folder.iterdir()
                   if not e.name.startswith(("_", ".")) and (e.is_dir() or e.name.endswith(".yaml")))
    return ", ".join(names)


MAX_DEFAULT_WORKERS = 8
"""The most loader processes per training process that ``data.num_workers`` defaults to."""


def default_workers(processes_per_node: int) -> int:
    """``data.num_workers``' default: the CPUs this process may run on (its affinity mask: a SLURM
    task's or container's share, as PyTorch's DataLoader counts them) divided among the training
    processes of this node (``launcher.nproc_per_node``, or torchrun's ``LOCAL_WORLD_SIZE``), at
    most :data:`MAX_DEFAULT_WORKERS`; e.g. 2 on a 2-core machine, 8 per GPU on a 64-core node of 8."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local = max(int(processes_per_node), int(os.environ.get("LOCAL_WORLD_SIZE", 1)), 1)
    return min(MAX_DEFAULT_WORKERS, cpus // local)


RESOLVERS = {"abnexp.options": group_options, "abnexp.workers": default_workers}
"""``${name:args}`` of the config tree -> its function; registered when this module is imported."""
for _name, _resolver in RESOLVERS.items():
    OmegaConf.register_new_resolver(_name, _resolver, replace=True)


def register_configs() -> None:
    """Registers the schema as ``base_config`` in Hydra's ConfigStore (idempotent)."""
    ConfigStore.instance().store(name="base_config", node=Config)


def register_options(group: str, schemas: dict[str, type]) -> None:
    """Stores each option's schema dataclass as ``schema/<group>/<option>`` (idempotent); the
    option's YAML file lists ``/schema/<group>/<option>@_here_`` first in its defaults."""
    store = ConfigStore.instance()
    for option, schema in schemas.items():
        store.store(group=f"schema/{group}", name=option, node=schema)


def renamed_recipe(name: str) -> Optional[str]:
    """The new name of a recipe that moved into a family folder (``cbn_t3_cbn_bs2`` ->
    ``cbn_t3/cbn_bs2``), or None."""
    path = resources.files("abnexp.configs") / RENAMES_FILE
    renames = OmegaConf.create(path.read_text()) if path.is_file() else {}
    return renames.get(name)


def _first_line(error: Exception, overrides: Sequence[str]) -> str:
    """Hydra's composition error as one line: its first line, with the valid options of an unknown
    group option, the reason of a rejected value, or the new name of a moved recipe."""
    for item in overrides:
        key, _, value = item.partition("=")
        if key.lstrip("+~") == "experiment" and renamed_recipe(value):
            return f"experiment={value} has moved: use experiment={renamed_recipe(value)}"
    lines = (str(error).strip() or type(error).__name__).splitlines()
    cause = str(error.__cause__ or "").splitlines()  # Hydra keeps OmegaConf's reason as the cause
    message = lines[0]
    missing = [m for m in map(re.compile(r"Key '(\w+)' (?:is )?not in (?:struct|'(\w+)')").search, lines + cause) if m]
    if message.startswith("Could not override") and missing:
        where = f" ({missing[0][2]} has no key {missing[0][1]!r})" if missing[0][2] else ""
        return f"{message.rstrip('.')}: no such config key{where}; `abnexp train --cfg job ...` lists the keys"
    if any(line.startswith("Available options") for line in lines):
        start = next(i for i, line in enumerate(lines) if line.startswith("Available options")) + 1
        available = []
        for line in lines[start:]:
            if not line.startswith(("  ", "\t")) or not line.strip():
                break
            available.append(line.strip())
        return f"{message}; available: {', '.join(available)}"
    return f"{message}: {cause[0]}" if cause else message


def _run_config_overrides(run: DictConfig, overrides: Sequence[str]) -> list[str]:
    """Overrides that rebuild ``run`` (a resolved config) under ``overrides``: the run's group
    options, then its values as a config of their own (``+_run_=config``, global package) minus the
    groups that ``overrides`` switch to another option."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    switched = {o.key_or_group for o in OverridesParser.create().parse_overrides(list(overrides))
                if o.key_or_group in GROUPS_BY_NAME}
    choices = [f"{g}={run[g].name}" for g in GROUPS_BY_NAME
               if g not in switched and OmegaConf.select(run, f"{g}.name") is not None]
    values = OmegaConf.masked_copy(run, [k for k in run if k not in switched])
    ConfigStore.instance().store(group="_run_", name="config", node=values, package="_global_")
    return [*choices, "+_run_=config"]


def compose(overrides: Sequence[str] = (), run: Union[DictConfig, str, None] = None) -> DictConfig:
    """The composed config for Hydra ``overrides`` (the command-line grammar: ``key=value``,
    ``group=option``, ``+key=value``, ...), without a run dir.

    Args:
        overrides: as on the command line, e.g. ``["task=semseg", "norm=inplace_abn"]``.
        run: a resolved config (a run's ``config.yaml`` / a checkpoint's ``config``, as text or
            DictConfig) to start from instead of the defaults: its group options and values are
            kept except where ``overrides`` change them (``data=cityscapes`` switches the whole
            data group to that option's defaults).

    Raises:
        ConfigError: Hydra's composition error, first line (unknown option / key / value); a
            recipe that moved into a family folder names its new name.
    """
    from hydra import compose as hydra_compose, initialize_config_module
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    register_configs()
    overrides = list(overrides)
    try:
        if run is not None:
            run = OmegaConf.create(run) if isinstance(run, str) else run
            overrides = [*_run_config_overrides(run, overrides), *overrides]
        with initialize_config_module(config_module="abnexp.configs", version_base="1.3"):
            return hydra_compose(config_name="config", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(_first_line(e, overrides)) from None


def choice(value) -> str:
    """The string of an enum-typed config value (``cfg.amp`` -> "bf16"), or the value itself."""
    return value.value if isinstance(value, Enum) else value


# --- value checks ---------------------------------------------------------------------------------
def _at_least(low):
    return (lambda v: v >= low), f">= {low}"


def _above(low):
    return (lambda v: v > low), f"> {low}"


def _within(low, high, closed_high=False):
    return ((lambda v: low <= v <= high) if closed_high else (lambda v: low <= v < high),
            f"in [{low}, {high}{']' if closed_high else ')'}")


RANGES: dict[str, tuple] = {
    "data.batch_size": _at_least(1), "data.num_workers": _at_least(0), "data.num_classes": _at_least(1),
    "data.epochs": _at_least(1), "data.crop_size": _at_least(1), "data.large_crop_size": _at_least(1),
    "data.resize_ratio": ((lambda v: 0 < v <= 1), "in (0, 1]"), "data.min_scale": ((lambda v: 0 < v <= 1), "in (0, 1]"),
    "data.color_jitter": _at_least(0), "data.lighting": _at_least(0), "data.long_side": _at_least(0),
    "data.class_uniform": _within(0, 1, closed_high=True), "data.holdout": _within(0, 1), "data.min_size": _at_least(1), "data.max_size": _at_least(1),
    "model.output_stride": ((lambda v: v in (8, 16, 32)), "one of 8, 16, 32"),
    "trainer.compile_mode": ((lambda v: v in COMPILE_MODES), "one of " + ", ".join(COMPILE_MODES)),
    "norm.eps": _above(0), "norm.momentum": ((lambda v: v is None or 0 < v <= 1), "in (0, 1] or null"),
    "norm.group_size": _at_least(0), "norm.buffer_size": _at_least(1), "norm.warmup_iters": _at_least(0),
    "norm.window": _at_least(1), "norm.burnin_iters": _at_least(0), "norm.r_max": _at_least(1),
    "norm.d_max": _at_least(0), "norm.renorm_start_iters": _at_least(0),
    "optim.lr": _above(0), "optim.momentum": _within(0, 1), "optim.weight_decay": _at_least(0),
    "optim.base_batch_size": _at_least(1),
    "sched.warmup_epochs": _at_least(0), "sched.warmup_factor": ((lambda v: 0 < v <= 1), "in (0, 1]"),
    "sched.gamma": ((lambda v: 0 < v <= 1), "in (0, 1]"), "sched.power": _above(0), "sched.final_lr": _at_least(0),
    "trainer.epochs": _at_least(1), "trainer.max_steps": _at_least(0), "trainer.log_every": _at_least(1),
    "trainer.eval_every": _at_least(1), "trainer.grad_clip": _at_least(0), "trainer.label_smoothing": _within(0, 1),
    "trainer.checkpoint_every": _at_least(0), "trainer.checkpoint_minutes": _at_least(0), "trainer.keep_last": _at_least(1),
    "launcher.nproc_per_node": _at_least(1), "launcher.sync_group_size": _at_least(0),
    "memory.device_gb": _at_least(0), "memory.reserved_gb": _at_least(0), "memory.crop": _at_least(0),
    "memory.batch": _at_least(0), "memory.gt_instances": _at_least(1),
    "memory.image_size": ((lambda v: v is None or (len(v) == 2 and 0 < v[0] <= v[1])),
                          "null or [shorter side, longer-side cap] with 0 < shorter <= longer (e.g. [800,1333])"),
}
"""config key -> (check, valid range as written in the error); keys an option does not have are skipped."""


def validate(cfg: DictConfig) -> None:
    """Checks every value of :data:`RANGES` and the relations between keys, before a run starts.

    Raises:
        ConfigError: naming the key, the value given and the valid range or relation.
    """
    for key, (ok, valid) in RANGES.items():
        value = OmegaConf.select(cfg, key, default="__absent__")
        if value != "__absent__" and not ok(value):
            raise ConfigError(f"{key}={value}: valid values are {valid}")
    d, n = cfg.data, cfg.norm
    milestones = list(cfg.sched.milestones)
    if choice(cfg.sched.name) == "step" and (milestones != sorted(set(milestones)) or min(milestones, default=1) <= 0):
        raise ConfigError(f"sched.milestones={milestones}: expected increasing epochs > 0 (e.g. [30,60])")
    if n.get("group_size") and d.batch_size % n.group_size:
        raise ConfigError(f"norm.group_size={n.group_size} does not divide data.batch_size={d.batch_size} (per "
                          f"process): choose a group size that divides the batch")
    if "crop_size" in d and d.crop_size < cfg.model.output_stride:
        raise ConfigError(f"data.crop_size={d.crop_size} is smaller than model.output_stride="
                          f"{cfg.model.output_stride}: a crop must give the network at least one output pixel")
    if "min_size" in d and d.max_size < d.min_size:
        raise ConfigError(f"data.max_size={d.max_size} is smaller than data.min_size={d.min_size}")
