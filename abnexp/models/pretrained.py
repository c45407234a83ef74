"""Initializing a backbone from a classification checkpoint (``abnexp train`` on ImageNet).

The segmentation experiments of Rota Bulò et al., "In-Place Activated BatchNorm" (CVPR 2018) and
the COCO experiments of Yan et al., "Towards Stabilizing Batch Statistics in Backward Propagation
of Batch Normalization" (MABN, ICLR 2020, §5.2) and Yao et al., "Cross-Iteration Batch
Normalization" (CBN, CVPR 2021, Table 5) start from ImageNet-trained backbones: every weight of
the classifier except its classification head. :func:`load_backbone` reads the checkpoint file
itself (a dict with ``model``, the state dict, and ``config``, the run's resolved config as YAML
text), so the models layer needs nothing from the training engine.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn

from abnexp.models.heads import ClassificationHead

log = logging.getLogger("abnexp")

FIX = ("pretrain with the norm the backbone is built with: for detection norm=bn / inplace_abn for "
       "head.norm_placement=heads (frozen BN reads their statistics), the same norm for everywhere")
"""How to fix a strict key mismatch (norms name their parameters / buffers differently)."""


def read_checkpoint(path: Path) -> dict:
    """The abnexp checkpoint dict at ``path`` (CPU tensors, ``weights_only=True``), with its "model"
    (state dict) and "config" (YAML text); the one reader of checkpoint files (the engine's
    ``load_checkpoint`` turns its errors into ConfigError).

    Raises:
        ValueError: a missing, unreadable (truncated, foreign) or non-abnexp file, naming it.
    """
    if not path.is_file():
        raise ValueError(f"checkpoint {path} does not exist (expected an `abnexp train` checkpoint, "
                         f"<run dir>/checkpoints/last.pt)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a truncated or foreign file
        raise ValueError(f"checkpoint {path} cannot be read: {type(e).__name__}: {e}") from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise ValueError(f"{path} is not an abnexp checkpoint (no 'model'/'config' entries)")
    return state


def _trained_model(path: Path, config) -> str:
    """``model.name`` of the checkpoint's config (YAML text)."""
    try:
        name = OmegaConf.select(OmegaConf.create(config), "model.name")
    except Exception as e:  # omegaconf / yaml errors of a malformed config
        raise ValueError(f"{path} is not an abnexp checkpoint (its config does not parse: {e})") from None
    if not isinstance(name, str):
        raise ValueError(f"{path} is not an abnexp checkpoint (its config has no model.name)")
    return name


def load_backbone(backbone: nn.Module, path: str | Path, *, strict: bool,
                  expected_model: str | None = None) -> dict:
    """Copies the weights of the classification checkpoint at ``path`` into ``backbone``.

    The backbone's classification head (a :class:`~abnexp.models.heads.ClassificationHead` child,
    or an ``nn.Identity`` put in its place) is neither loaded nor counted as missing, and the
    checkpoint's weights under that name are dropped. Every other tensor must have the backbone's
    shape. Keys in only one of the two (missing: the backbone's, left as initialized; unexpected:
    the checkpoint's, ignored) raise with ``strict=True`` (matching tensors are then already
    copied, as with torch's ``load_state_dict``) and are logged as warnings with ``strict=False``.

    Args:
        backbone: a model of :data:`abnexp.models.MODELS` (any norm).
        path: an ``abnexp train`` checkpoint (``<run dir>/checkpoints/last.pt``).
        strict: raise on missing / unexpected keys instead of logging them.
        expected_model: if given, the ``model.name`` the checkpoint's config must have.

    Returns:
        {"loaded": number of tensors copied, "missing": [...], "unexpected": [...],
        "dropped_head": [checkpoint keys of the classification head]}, key lists sorted.

    Raises:
        ValueError: the file does not exist, cannot be read or is not an abnexp checkpoint; it holds
            another model than ``expected_model``; a shape differs; none of its weights belongs to
            the backbone; (``strict``) missing or unexpected keys. The message names the file, the
            keys and the fix.
    """
    path = Path(path).expanduser()
    checkpoint = read_checkpoint(path)
    if expected_model is not None:
        trained = _trained_model(path, checkpoint["config"])
        if trained != expected_model:
            raise ValueError(f"checkpoint {path} holds a {trained}, not a {expected_model}: "
                             f"set model={trained}")
    head = tuple(f"{name}." for name, m in backbone.named_children()
                 if isinstance(m, (ClassificationHead, nn.Identity)))
    dropped = sorted(k for k in checkpoint["model"] if k.startswith(head))
    state = {k: v for k, v in checkpoint["model"].items() if not k.startswith(head)}
    own = backbone.state_dict()
    shapes = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
              if k in own and own[k].shape != v.shape]
    if shapes:
        raise ValueError(f"checkpoint {path}: shapes differ from the backbone's (checkpoint vs backbone), "
                         f"e.g. {shapes[:3]}; was it trained with another model= or model.input_3x3=?")
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
    log.info("backbone from %s: %d tensors loaded, classification head dropped (%s)", path, loaded,
             ", ".join(dropped) or "none")
    if missing:
        log.warning("backbone keys not in %s (left as initialized): %s", path, ", ".join(missing))
    if unexpected:
        log.warning("keys of %s the backbone does not have (ignored): %s", path, ", ".join(unexpected))
    return {"loaded": loaded, "missing": missing, "unexpected": unexpected, "dropped_head": dropped}
