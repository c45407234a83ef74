"""Initializing a backbone from a classification checkpoint (``abnexp train`` on ImageNet, the
reference InPlace-ABN library's released ones, torchvision's / timm's state dicts).

The segmentation experiments of Rota Bulò et al., "In-Place Activated BatchNorm" (CVPR 2018) and
the COCO experiments of Yan et al., "Towards Stabilizing Batch Statistics in Backward Propagation
of Batch Normalization" (MABN, ICLR 2020, §5.2) and Yao et al., "Cross-Iteration Batch
Normalization" (CBN, CVPR 2021, Table 5) start from ImageNet-trained backbones: every weight of
the classifier except its classification head. :func:`load_backbone` reads the checkpoint file
itself (:func:`abnexp.models.reference_weights.read_weights`: an abnexp checkpoint, a dict with
``model``, the state dict, and ``config``, the run's resolved config as YAML text, or another
recognized weight file), so the models layer needs nothing from the training engine. Norm weights
are adapted to the |γ| + ε convention of the receiving layers
(:func:`~abnexp.models.reference_weights.adapt_scales`).
"""
from __future__ import annotations

import logging
from pathlib import Path

from torch import nn

from abnexp.models.heads import ClassificationHead
from abnexp.models.reference_weights import Weights, adapt_scales, load_file, read_weights

log = logging.getLogger("abnexp")

FIX = ("pretrain with the norm the backbone is built with: for detection norm=bn / inplace_abn for "
       "head.norm_placement=heads (frozen BN reads their statistics), the same norm for everywhere")
"""How to fix a strict key mismatch (norms name their parameters / buffers differently)."""


def read_checkpoint(path: Path) -> dict:
    """The abnexp checkpoint dict at ``path`` (CPU tensors, ``weights_only=True``), with its "model"
    (state dict) and "config" (YAML text); the reader of checkpoints to resume or evaluate (the
    engine's ``load_checkpoint`` turns its errors into ConfigError; pretrained weights are read by
    :func:`~abnexp.models.reference_weights.read_weights`).

    Raises:
        ValueError: a missing, unreadable (truncated, foreign) or non-abnexp file, naming it.
    """
    state = load_file(path, "an `abnexp train` checkpoint, <run dir>/checkpoints/last.pt")
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise ValueError(f"{path} is not an abnexp checkpoint (no 'model'/'config' entries)")
    return state


def _check_model(path: Path, weights: Weights, expected_model: str | None) -> None:
    if expected_model is None:
        return
    if weights.model is None and weights.config is not None:
        raise ValueError(f"{path} is not an abnexp checkpoint (its config has no model.name)")
    if weights.model is not None and weights.model != expected_model:
        raise ValueError(f"checkpoint {path} holds a {weights.model}, not a {expected_model}: set model={weights.model}")


def _shapes(path: Path, state: dict, own: dict, what: str = "backbone",
            keys: str = "model= or model.input_3x3=") -> None:
    shapes = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
              if k in own and own[k].shape != v.shape]
    if shapes:
        raise ValueError(f"checkpoint {path}: shapes differ from the {what}'s (checkpoint vs {what}), "
                         f"e.g. {shapes[:3]}; was it trained with another {keys}?")


def load_backbone(backbone: nn.Module, path: str | Path, *, strict: bool,
                  expected_model: str | None = None) -> dict:
    """Copies the weights of the classification checkpoint at ``path`` into ``backbone``.

    ``path`` is any file :func:`~abnexp.models.reference_weights.read_weights` recognizes: an
    ``abnexp train`` checkpoint, a reference InPlace-ABN ``*.pth.tar``, a torchvision / timm state
    dict. Norm weights are rewritten for the backbone's layers where the file's |γ| + ε convention
    differs (:func:`~abnexp.models.reference_weights.adapt_scales`).

    The backbone's classification head (a :class:`~abnexp.models.heads.ClassificationHead` child,
    or an ``nn.Identity`` put in its place) is neither loaded nor counted as missing, and the
    checkpoint's weights under that name are dropped. Every other tensor must have the backbone's
    shape. Keys in only one of the two (missing: the backbone's, left as initialized; unexpected:
    the checkpoint's, ignored) raise with ``strict=True`` (matching tensors are then already
    copied, as with torch's ``load_state_dict``) and are logged as warnings with ``strict=False``.

    Args:
        backbone: a model of :data:`abnexp.models.MODELS` (any norm).
        path: an ``abnexp train`` checkpoint (``<run dir>/checkpoints/last.pt``) or another weight file.
        strict: raise on missing / unexpected keys instead of logging them.
        expected_model: if given, the ``model.name`` the file must hold (when it says: abnexp
            checkpoints and reference files do, plain state dicts do not).

    Returns:
        {"loaded": number of tensors copied, "missing": [...], "unexpected": [...],
        "dropped_head": [checkpoint keys of the classification head]}, key lists sorted.

    Raises:
        ValueError: the file does not exist, cannot be read or is not a recognized weight file; it
            holds another model than ``expected_model``; a shape differs; none of its weights belongs
            to the backbone; negative weights for in-place layers; (``strict``) missing or unexpected
            keys. The message names the file, the keys and the fix.
    """
    path = Path(path).expanduser()
    weights = read_weights(path)
    _check_model(path, weights, expected_model)
    head = tuple(f"{name}." for name, m in backbone.named_children()
                 if isinstance(m, (ClassificationHead, nn.Identity)))
    dropped = sorted(k for k in weights.state if k.startswith(head))
    state = {k: v for k, v in weights.state.items() if not k.startswith(head)}
    own = backbone.state_dict()
    _shapes(path, state, own)
    state = adapt_scales(state, backbone, weights.inplace_scale)
    result = backbone.load_state_dict(state, strict=False)
    missing = sorted(k for k in result.missing_keys if not k.startswith(head))
    unexpected = sorted(result.unexpected_keys)
    loaded = sum(k in own for k in state)
    if loaded == 0:
        raise ValueError(f"checkpoint {path}: none of its {len(state)} weights belongs to this backbone "
                         f"(e.g. {next(iter(state), '-')}); was it trained with another model=?")
    if strict and (missing or unexpected):
        raise ValueError(f"checkpoint {path} does not match this backbone's norm layers (missing "
                         f"{missing[:3]} of {len(missing)}, unexpected {unexpected[:3]} of {len(unexpected)}): {FIX}")
    log.info("backbone from %s (%s): %d tensors loaded, classification head dropped (%s)", path, weights.source,
             loaded, ", ".join(dropped) or "none")
    if missing:
        log.warning("backbone keys not in %s (left as initialized): %s", path, ", ".join(missing))
    if unexpected:
        log.warning("keys of %s the backbone does not have (ignored): %s", path, ", ".join(unexpected))
    return {"loaded": loaded, "missing": missing, "unexpected": unexpected, "dropped_head": dropped}


def load_weights(model: nn.Module, weights: Weights, path: str | Path) -> None:
    """Copies every tensor of ``weights`` (read from ``path``) into ``model``, classifier included,
    strictly: each key of either side consumed / filled, shapes equal (``abnexp import``); norm
    weights adapted as in :func:`load_backbone`.

    Raises:
        ValueError: a shape differs, keys are missing or unexpected (the message names them and the
            file), negative weights for in-place layers.
    """
    path = Path(path).expanduser()
    own = model.state_dict()
    _shapes(path, weights.state, own, "model", "model=, model.input_3x3= or data.num_classes=")
    missing, unexpected = sorted(set(own) - set(weights.state)), sorted(set(weights.state) - set(own))
    if missing or unexpected:
        raise ValueError(f"{path} does not match the model: missing {missing[:3]} of {len(missing)}, unexpected "
                         f"{unexpected[:3]} of {len(unexpected)}; pick the model= / norm= / data.num_classes= it "
                         f"was trained with")
    model.load_state_dict(adapt_scales(weights.state, model, weights.inplace_scale), strict=True)
