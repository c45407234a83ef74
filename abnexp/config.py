"""Typed schema of the Hydra configuration (configs/ is the tree of values).

The schema is registered as ``base_config`` and is the first entry of configs/config.yaml's
defaults list, so Hydra composes in struct mode against it: a misspelled key
(``trainer.epoch=3``) or a value of the wrong type fails at start with Hydra's one-line
message, and an unknown group option (``model=resnet19``) lists the valid choices.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

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


@dataclass
class TaskConfig:
    name: str = "cls"


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
class Config:
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    norm: NormConfig = field(default_factory=NormConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    seed: int = 0
    amp: Amp = Amp.none
    channels_last: bool = False
    device: str = "auto"  # auto (cuda if available), cpu, cuda
    resume: Optional[str] = None  # run dir or checkpoint file; an existing run dir auto-resumes
    experiment: Optional[dict[str, Any]] = None  # metadata of a paper recipe (configs/experiment)


def register_configs() -> None:
    """Registers the schema as ``base_config`` in Hydra's ConfigStore (idempotent)."""
    ConfigStore.instance().store(name="base_config", node=Config)
