"""``abnexp import PATH out=FILE [model=NAME] [norm=NAME] [overrides ...]``: turn a weight file from
elsewhere into an abnexp checkpoint that ``model.pretrained=FILE`` and ``abnexp eval checkpoint=FILE``
read.

PATH is any file :func:`abnexp.models.reference_weights.read_weights` recognizes: the reference
InPlace-ABN library's released ImageNet ``*.pth.tar`` (its model found from its structure),
torchvision's / timm's ResNet state dicts (give ``model=``; they use ReLU: ``norm.activation=relu``).
The ImageNet classifier (task=cls, data=imagenet, 1000 classes) is built with the given config and
every tensor of the file is copied into it, strictly; norm weights are rewritten where the file's
|γ| + ε convention and the chosen norm's differ (default norm: ``inplace_abn`` for the reference
files, whose convention it shares, ``bn`` otherwise). The checkpoint holds the model, the composed
config, epoch 0 and step 0.
"""
from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import OmegaConf

from abnexp.config import compose
from abnexp.engine.checkpoint import save_checkpoint
from abnexp.errors import ConfigError
from abnexp.models.pretrained import load_weights
from abnexp.models.reference_weights import read_weights
from abnexp.tasks import build_task

log = logging.getLogger("abnexp")

USAGE = "usage: abnexp import PATH out=FILE [model=NAME] [norm=NAME] [key=value ...]"


def _defaults(weights, overrides: list[str]) -> list[str]:
    """Group choices and model options the file implies, unless ``overrides`` set them."""
    implied = {"task": "cls", "data": "imagenet", "norm": "inplace_abn" if weights.inplace_scale else "bn"}
    if weights.model is not None:
        implied["model"] = weights.model
    given = {o.split("=", 1)[0]: o.split("=", 1)[1] for o in overrides}
    if given.get("model", weights.model) != weights.model and weights.model is not None:
        raise ConfigError(f"the weight file holds a {weights.model}, not a {given['model']}: drop model= "
                          f"or set model={weights.model}")
    if "model" not in given and weights.model is None:
        raise ConfigError(f"a {weights.source} file does not say which network it holds: add model=NAME "
                          f"(e.g. model=resnet50 norm.activation=relu for torchvision's)")
    out = [f"{k}={v}" for k, v in implied.items() if k not in given]
    out += [f"model.{k}={str(v).lower()}" for k, v in weights.options.items() if f"model.{k}" not in given]
    return out


def import_weights(path: str, out: str, overrides: list[str]) -> Path:
    """Writes the abnexp checkpoint ``out`` from the weight file ``path``; returns its path.

    Raises:
        ConfigError: an unreadable / unrecognized file, a config override error, a model that does
            not match the file (the message names the keys), no ``model=`` for a plain state dict.
    """
    try:
        weights = read_weights(path)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    cfg = compose([*_defaults(weights, overrides), *overrides])
    model = build_task(cfg).build_model()
    try:
        load_weights(model, weights, path)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    target = save_checkpoint({"model": model.state_dict(), "config": OmegaConf.to_yaml(cfg, resolve=True),
                              "epoch": 0, "step": 0, "imported_from": str(Path(path).expanduser().resolve())},
                             Path(out).expanduser())
    print(f"wrote {target}: {cfg.model.name}, norm={cfg.norm.name}, {len(weights.state)} tensors from "
          f"{path} ({weights.source})")
    return target


def import_command(argv: list[str]) -> None:
    """``abnexp import PATH out=FILE [overrides]``.

    Raises:
        ConfigError: no PATH or no ``out=`` (the usage line), and see :func:`import_weights`.
    """
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s")
    paths = [a for a in argv if "=" not in a]
    outs = [a.split("=", 1)[1] for a in argv if a.startswith("out=")]
    if len(paths) != 1 or len(outs) != 1:
        raise ConfigError(USAGE)
    import_weights(paths[0], outs[0], [a for a in argv if "=" in a and not a.startswith("out=")])
