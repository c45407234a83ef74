"""Weight files from outside ``abnexp train``, recognized by content, in abnexp's names.

=================  ==================================================================  ====================
source             content (what ``torch.load(..., weights_only=True)`` returns)         norm weights
=================  ==================================================================  ====================
``abnexp``         ``abnexp train`` checkpoint: {"model": state dict, "config": YAML}  as its ``norm.name``
``inplace_abn``    the reference InPlace-ABN library's released ImageNet checkpoints    |γ| + ε convention
                   (``*.pth.tar``): {"state_dict": ..., "epoch", "best_prec1",
                   "optimizer"}, the network's keys under ``module.`` (it was wrapped
                   in DistributedDataParallel), the classifier as ``classifier.fc.*``
``state_dict``     a plain state dict of tensors in torchvision's names: torchvision's   γ as is
                   ``resnet*().state_dict()``, timm's ResNets (``resnet18`` .. ``152``
                   share torchvision's names and architecture); a ``module.`` prefix
                   on every key is removed
=================  ==================================================================  ====================

abnexp's ResNeXt-50/101/152 and WideResNet-38 A2 use the reference library's module names
(``mod1`` .. ``bn_out``), so its files map key for key once the prefix is dropped and
``classifier.fc.*`` is renamed ``classifier.*``; which network a file holds follows from its
blocks per stage (:data:`REFERENCE_MODELS`), its stem (``mod1.conv3``: ``model.input_3x3=true``).

**The |γ| + ε convention.** The reference library's InPlace-ABN layers (which trained its released
models) and abnexp's in-place strategies (``inplace_abn``, ``inplace_abn_ii`` and their sync
variants) scale x̂ by ``|weight| + eps`` so that the scale is invertible; every other norm
(``bn``, ``checkpoint*``, ``syncbn``, frozen BN, ...) scales by ``weight``. The same file must
compute the same function in either, so :func:`adapt_scales` rewrites each norm's ``weight`` by
the rules of :func:`abnexp.norm.convert.convert` when the file's convention and the layer's differ:
in-place weights into a plain layer become ``|weight| + eps`` (exact); plain weights into an
in-place layer become ``max(weight - eps, 0)`` (exact for weight >= eps; a negative weight cannot
be represented and raises). ``eps`` is the receiving layer's (1e-5 by default, the reference's).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from omegaconf import OmegaConf
from torch import nn

from abnexp.models.blocks import is_inplace
from abnexp.norm.registry import NORMS

REFERENCE_MODELS = {(3, 4, 6, 3): "resnext50", (3, 4, 23, 3): "resnext101", (3, 8, 36, 3): "resnext152",
                    (3, 3, 6, 3, 1, 1): "wideresnet38"}
"""Blocks in mod2, mod3, ... of a reference network -> the abnexp model it loads into."""


@dataclass(frozen=True)
class Weights:
    """A weight file's tensors in abnexp's names.

    Attributes:
        state: {abnexp key: tensor}.
        source: the :data:`SOURCES` entry that read it.
        inplace_scale: whether its norm weights follow the |γ| + ε convention (see the module docstring);
            None where the file does not say (an abnexp checkpoint without norm.name): copied as they are.
        model: the ``model=`` it holds when the file says (abnexp config, reference structure), else None.
        options: model options the file implies (``{"input_3x3": True}`` for a three-3×3 stem).
        config: an abnexp checkpoint's config (YAML text), else None.
    """

    state: dict[str, torch.Tensor]
    source: str
    inplace_scale: Optional[bool]
    model: Optional[str] = None
    options: dict = field(default_factory=dict)
    config: Optional[str] = None


def _is_state(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(k, str) and torch.is_tensor(v)
                                                       for k, v in obj.items())


def _strip(state: dict, prefix: str = "module.") -> dict:
    return {k[len(prefix):]: v for k, v in state.items()} if all(k.startswith(prefix) for k in state) else state


def _read_abnexp(path: Path, obj: dict) -> Weights:
    try:
        cfg = OmegaConf.create(obj["config"])
    except Exception as e:  # omegaconf / yaml errors of a malformed config
        raise ValueError(f"{path} is not an abnexp checkpoint (its config does not parse: {e})") from None
    model, norm = OmegaConf.select(cfg, "model.name"), OmegaConf.select(cfg, "norm.name")
    return Weights(dict(obj["model"]), "abnexp", NORMS[norm].inplace if norm in NORMS else None,
                   model if isinstance(model, str) else None, config=obj["config"])


def reference_model(state: dict) -> tuple[str, dict]:
    """(abnexp model name, options) of a reference network's state dict (``module.`` removed).

    Raises:
        ValueError: its blocks per stage are none of :data:`REFERENCE_MODELS`.
    """
    blocks = []
    for mod in range(2, 8):
        names = {k.split(".")[1] for k in state if k.startswith(f"mod{mod}.")}
        if names:
            blocks.append(len(names))
    name = REFERENCE_MODELS.get(tuple(blocks))
    if name is None:
        raise ValueError(f"a reference InPlace-ABN network with {blocks} blocks per stage is none of abnexp's "
                         f"({', '.join(f'{v} {list(k)}' for k, v in REFERENCE_MODELS.items())})")
    return name, ({"input_3x3": True} if "mod1.conv3.weight" in state else {})


def _read_reference(path: Path, obj: dict) -> Weights:
    state = {k.replace("classifier.fc.", "classifier.", 1) if k.startswith("classifier.fc.") else k: v
             for k, v in _strip(obj["state_dict"]).items()}
    try:
        model, options = reference_model(state)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return Weights(state, "inplace_abn", True, model, options)


def _read_state_dict(path: Path, obj: dict) -> Weights:
    return Weights(_strip(obj), "state_dict", False)


@dataclass(frozen=True)
class Source:
    """One kind of weight file: ``matches(obj)`` on the loaded object, ``read(path, obj)`` -> Weights."""

    description: str
    matches: Callable[[Any], bool]
    read: Callable[[Path, Any], Weights]


SOURCES: dict[str, Source] = {
    "abnexp": Source("an `abnexp train` checkpoint (model/config entries)",
                     lambda o: isinstance(o, dict) and "model" in o and "config" in o, _read_abnexp),
    "inplace_abn": Source("a reference InPlace-ABN checkpoint (state_dict with module.* keys)",
                          lambda o: isinstance(o, dict) and _is_state(o.get("state_dict"))
                          and all(k.startswith("module.mod") or k.startswith("module.bn_out")
                                  or k.startswith("module.classifier") for k in o["state_dict"]),
                          _read_reference),
    "state_dict": Source("a state dict of tensors (torchvision's, timm's)", _is_state, _read_state_dict),
}
"""Recognized weight files, tried in this order (see the module docstring)."""


def load_file(path: Path, expected: str) -> Any:
    """``torch.load`` of ``path`` (CPU tensors, ``weights_only=True``).

    Raises:
        ValueError: ``path`` is missing (the message says ``expected``) or unreadable (truncated, foreign).
    """
    if not path.is_file():
        raise ValueError(f"checkpoint {path} does not exist (expected {expected})")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a truncated or foreign file
        raise ValueError(f"checkpoint {path} cannot be read: {type(e).__name__}: {e}") from None


def read_weights(path: str | Path) -> Weights:
    """The weights in the file at ``path`` (CPU tensors, ``weights_only=True``), whatever its source.

    Raises:
        ValueError: a missing or unreadable file, or content none of :data:`SOURCES` recognizes; the
            message names the file and the kinds accepted.
    """
    path = Path(path).expanduser()
    obj = load_file(path, f"an `abnexp train` checkpoint, <run dir>/checkpoints/last.pt, or a weight file: {_kinds()}")
    for source in SOURCES.values():
        if source.matches(obj):
            return source.read(path, obj)
    raise ValueError(f"{path} is not an abnexp checkpoint nor another weight file abnexp reads ({_kinds()})")


def _kinds() -> str:
    return "; ".join(s.description for s in SOURCES.values())


def adapt_scales(state: dict[str, torch.Tensor], model: nn.Module,
                 inplace_scale: Optional[bool]) -> dict[str, torch.Tensor]:
    """``state`` with each norm's ``weight`` rewritten for the layer of ``model`` that receives it.

    A norm is a prefix ``p`` with ``p.weight`` and ``p.running_var`` in ``state``; its layer is
    ``model.get_submodule(p)`` (prefixes ``model`` lacks are left alone). When the file's convention
    (``inplace_scale``: weights scale x̂ as |weight| + eps) differs from the layer's
    (:func:`~abnexp.models.blocks.is_inplace`), the weight becomes ``|weight| + eps`` (in-place file,
    plain layer) or ``max(weight - eps, 0)`` (plain file, in-place layer), with the layer's ``eps``:
    the rules of :func:`abnexp.norm.convert.convert`, so outputs in eval are the same.
    ``inplace_scale=None`` (convention unknown) returns ``state`` unchanged.

    Raises:
        ValueError: negative weights for an in-place layer (its scale is always positive), naming
            the layers; load into a plain norm (norm=bn) instead.
    """
    out, negative = dict(state), []
    if inplace_scale is None:
        return out
    own = dict(model.named_modules())
    for key in state:
        prefix = key[:-len(".weight")]
        if not key.endswith(".weight") or f"{prefix}.running_var" not in state or prefix not in own:
            continue
        layer = own[prefix]
        if is_inplace(layer) == inplace_scale:
            continue
        weight, eps = state[key], float(layer.eps)
        if inplace_scale:
            out[key] = weight.abs() + eps
        else:
            if bool((weight < 0).any()):
                negative.append(f"{prefix} ({int((weight < 0).sum())} of {weight.numel()} channels)")
            out[key] = (weight - eps).clamp(min=0)
    if negative:
        raise ValueError(f"weights < 0 cannot be loaded into in-place layers (scale |weight| + eps): "
                         f"{', '.join(negative[:3])}{' ...' if len(negative) > 3 else ''}; load them with a "
                         f"plain norm (norm=bn) instead")
    return out
