"""Typed schema of the Hydra configuration (configs/ is the tree of values).

The schema is registered as ``base_config`` and is the first entry of configs/config.yaml's
defaults list, so Hydra composes in struct mode against it: a misspelled key
(``trainer.epoch=3``) or a value of the wrong type fails at start with Hydra's one-line
message, and an unknown group option (``model=resnet19``) lists the valid choices.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Optional

from hydra.core.config_store import ConfigStore


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


class NormPlacement(str, Enum):
    """Where task=detection puts norm= (CBN paper, Table 5): ``heads`` = frozen BN in the backbone,
    the norm in FPN + heads; ``everywhere``; ``auto`` = heads with model.pretrained, else everywhere."""

    auto = "auto"
    heads = "heads"
    everywhere = "everywhere"


@dataclass
class HeadConfig:
    """task=detection's detector (configs/head): torchvision's FPN Mask / Faster R-CNN with our norms."""

    name: str = "mask_rcnn_fpn"  # mask_rcnn_fpn | faster_rcnn_fpn
    norm_placement: NormPlacement = NormPlacement.auto
    trainable_backbone_layers: Optional[int] = None  # 0-5 from the top (torchvision); None: 3 pretrained, 5 scratch
    fpn_channels: int = 256
    box_head_convs: int = 4  # 4conv1fc box head
    box_head_fc: int = 1024
    mask_head_convs: int = 4
    rpn_pre_nms_top_n_train: int = 2000  # per FPN level and image (torchvision's defaults)
    rpn_pre_nms_top_n_test: int = 1000
    rpn_post_nms_top_n_train: int = 2000  # per image
    rpn_post_nms_top_n_test: int = 1000
    box_batch_size_per_image: int = 512  # sampled RoIs per image for the box head
    box_detections_per_img: int = 100


@dataclass
class TaskConfig:
    name: str = "cls"
    # task=semseg (DeepLabV3, abnexp/tasks/semseg.py): head width and the evaluation protocols
    head_channels: int = 256  # channels of every DeepLabV3 branch
    eval_scales: list[float] = field(default_factory=lambda: [0.7, 1.0, 1.2])  # multi-scale protocol
    eval_flip: bool = True  # add horizontally flipped inputs to the multi-scale protocol
    eval_window: int = 0  # sliding-window inference with this square window [pixels]; 0 = whole image
    eval_overlap: float = 0.33  # fraction of the window shared by neighbouring windows
    predictions_dir: Optional[str] = None  # abnexp eval: write one PNG per image and protocol here
    predictions_format: str = "palette"  # palette (colour PNG) | ids (train ids as grey values)
    log_images: int = 4  # validation images written to TensorBoard with prediction / ground-truth overlays


@dataclass
class ModelConfig:
    name: str = "resnet18"
    output_stride: int = 32  # 32 = no dilation (classification); 16 or 8 dilate the last stages
    input_3x3: bool = False  # ResNeXt only: three 3x3 convs in the stem instead of one 7x7
    pretrained: Optional[str] = None  # path to an abnexp checkpoint whose backbone weights are loaded


@dataclass
class NormConfig:
    name: str = "bn"
    activation: str = "leaky_relu"
    activation_param: float = 0.01  # LeakyReLU slope / ELU alpha
    eps: float = 1e-5
    momentum: Optional[float] = 0.1  # None: cumulative moving average, as torch BatchNorm
    # small-batch norms (abnexp.norm.SMALL_BATCH_OPTIONS says which norm uses which key); *_iters count
    # training iterations (optimizer steps), also with group_size > 0 (abnexp/norm/grouping.py)
    group_size: int = 0  # normalization batch: statistics over groups of this many samples; 0 = whole batch
    buffer_size: int = 16  # mabn: normalization batches in the moving averages (= iterations if group_size=0)
    warmup_iters: int = 100  # mabn: iterations normalized with the current batch's statistics
    window: int = 4  # cbn: iterations averaged (current + window-1 compensated past ones); 1 = BN
    burnin_iters: int = 0  # cbn: iterations with window 1 (plain BN statistics)
    invalid_stats: str = "max"  # cbn: "max" (paper Eq. 10) or "drop" (released code)
    r_max: float = 3.0  # brn: final clip of r
    d_max: float = 5.0  # brn: final clip of d
    renorm_start_iters: int = 5000  # brn: r_max = 1, d_max = 0 up to here, then linear ramps
    r_max_iters: int = 40000  # brn: iteration where r_max is reached
    d_max_iters: int = 25000  # brn: iteration where d_max is reached


@dataclass
class DataConfig:
    name: str = "demo"
    root: Optional[str] = None  # None for demo: the generated cache folder
    epochs: int = 90  # this dataset's standard training length; trainer.epochs defaults to it
    num_classes: int = 10
    batch_size: int = 32  # per process
    num_workers: int = 2
    crop_size: int = 56  # pixels: training crop and validation center crop
    large_crop_size: int = 80  # pixels: the third evaluation protocol (320 on ImageNet)
    resize_ratio: float = 0.875  # validation resize = crop / ratio (224 -> 256)
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    color_jitter: float = 0.4
    lighting: float = 0.1  # AlexNet-style PCA lighting noise standard deviation
    min_scale: float = 0.08  # RandomResizedCrop lower area bound
    # segmentation datasets (abnexp/data/segmentation.py)
    scale_range: list[float] = field(default_factory=lambda: [0.5, 2.0])  # random scale of training images
    long_side: int = 0  # resize images to this long side [pixels] before random scaling and at test; 0 = as stored
    class_uniform: float = 0.0  # fraction of training crops sampled class-uniformly (InPlace-ABN Table 4)
    # detection datasets (abnexp/data/coco.py): the detector resizes images to these sides [pixels]
    min_size: int = 800  # shorter side
    max_size: int = 1333  # longer side at most


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


@dataclass
class ExperimentConfig:
    """Metadata of a paper recipe (configs/experiment): which table cell(s) it reproduces."""

    paper: str = ""
    table: str = ""  # a key of abnexp.report.paper_tables.TABLES
    row: str = ""  # as printed in the paper
    column: Optional[str] = None  # for tables whose cells come from different runs
    world_size: int = 1  # processes (GPUs) the recipe assumes; data.batch_size is per process
    reported: dict[str, float] = field(default_factory=dict)  # column label -> the paper's number
    eval_overrides: list[str] = field(default_factory=list)  # applied by `abnexp eval` (key=value)
    note: str = ""


@dataclass
class LauncherConfig:
    """Processes of one job (abnexp/engine/launch.py). Under torchrun, torchrun's options rule."""

    nproc_per_node: int = 1  # > 1: `abnexp train` starts torchrun --standalone with this many processes
    sync_group_size: int = 0  # ranks whose synchronized norms share statistics; 0 = all (e.g. 8 = per node of 8)


@dataclass
class MemoryConfig:
    """``abnexp memory``: what fits in one device (InPlace-ABN's fixed-crop / fixed-batch regimes)."""

    device_gb: float = 12.0  # GiB of one device (the paper's Titan Xp: 12)
    reserved_gb: float = 0.5  # GiB not available to tensors (CUDA context, allocator slack)
    crop: int = 0  # square input side in pixels for max_batch; 0 = data.crop_size
    batch: int = 0  # per-device batch for max_crop; 0 = data.batch_size
    probe_crop: int = 256  # measure at this side (cheap) and scale by the pixel count
    probe_batch: int = 2
    json: Optional[str] = None  # write the figures as JSON to this path
    measure: bool = False  # on a GPU: find max_batch by real allocation (binary search)


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


def register_configs() -> None:
    """Registers the schema as ``base_config`` in Hydra's ConfigStore (idempotent)."""
    ConfigStore.instance().store(name="base_config", node=Config)
