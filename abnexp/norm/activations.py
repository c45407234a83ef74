"""Activations used after batch normalization: forward, backward-from-output and inverse.

This module is the single place where each activation's math lives. Every entry of
:data:`ACTIVATIONS` provides, for a pre-activation ``y`` and its output ``z = phi(y)``:

* ``forward_(y, param)``: ``phi`` applied **in place** on ``y`` (returns ``y``);
* ``backward(z, dz, param)``: dL/dy computed from the *output* ``z`` and dL/dz (a new
  tensor; ``dz`` is never written to, it may be an expanded tensor);
* ``inverse(z, param)``: ``phi^-1(z)`` as a new tensor, or ``None`` when ``phi`` is not
  invertible;
* ``invertible(param)``: whether ``phi`` with this parameter is a bijection, i.e. whether
  it can be used by the in-place layers (InPlace-ABN, Algorithm 2: ``y <- phi^-1(z)``).

Source: InPlace-ABN (Rota Bulò et al., CVPR 2018), Sec. 3.2-3.3 (Eqs. 4-8: the inverse of the
activation and the gradients from its output) and the authors' released library. Conventions at the kinks follow
PyTorch's own backward kernels (``leaky_relu_backward`` / ``elu_backward`` with
``is_result=True``): at ``z == 0`` the negative-side slope is used.

All functions accept tensors of any shape, layout and floating dtype; they compute in the
dtype of their inputs (callers upcast half precision first).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class Activation:
    """The math of one activation (see the module docstring for each field's contract)."""

    name: str
    forward_: Callable[[Tensor, float], Tensor]
    backward: Callable[[Tensor, Tensor, float], Tensor]
    inverse: Optional[Callable[[Tensor, float], Tensor]]
    invertible: Callable[[float], bool]
    module: Callable[[float, bool], nn.Module]
    reads_output: bool = True  # whether ``backward`` needs z (the identity's does not)


# --- leaky_relu: phi(y) = y (y >= 0), a*y (y < 0); param = slope a -----------------------
def _leaky_forward_(y: Tensor, a: float) -> Tensor:
    return F.leaky_relu_(y, a)


def _leaky_backward(z: Tensor, dz: Tensor, a: float) -> Tensor:
    # z > 0 <=> y > 0 holds for a >= 0 (callers reject negative slopes)
    return torch.where(z > 0, dz, dz * a)


def _leaky_inverse(z: Tensor, a: float) -> Tensor:
    return torch.where(z >= 0, z, z * (1.0 / a))


# --- elu: phi(y) = y (y > 0), alpha*(exp(y) - 1) (y <= 0); param = alpha -----------------
def _elu_forward_(y: Tensor, alpha: float) -> Tensor:
    return F.elu_(y, alpha)


def _elu_backward(z: Tensor, dz: Tensor, alpha: float) -> Tensor:
    # negative side: d/dy alpha*(exp(y) - 1) = alpha*exp(y) = z + alpha (needs alpha >= 0
    # for the mask z > 0 <=> y > 0; callers reject negative alpha)
    return torch.where(z > 0, dz, dz * (z + alpha))


def _elu_inverse(z: Tensor, alpha: float) -> Tensor:
    # y = log1p(z/alpha) for z <= 0. z -> -alpha saturates (exp(y) below the dtype's
    # resolution): the ratio is clamped to > -1 so y stays finite (about log(eps_dtype));
    # there dL/dy = dL/dz*(z+alpha) is 0, so the clamped y only enters dL/dx through the
    # mean terms -- an inherent precision limit of inverting ELU.
    tiny = torch.finfo(z.dtype).eps
    neg = torch.log1p(torch.clamp(z * (1.0 / alpha), min=-1.0 + tiny))
    return torch.where(z > 0, z, neg)


# --- relu: not invertible -------------------------------------------------------------
def _relu_forward_(y: Tensor, _: float) -> Tensor:
    return F.relu_(y)


def _relu_backward(z: Tensor, dz: Tensor, _: float) -> Tensor:
    return torch.where(z > 0, dz, torch.zeros((), dtype=dz.dtype, device=dz.device))


# --- identity ---------------------------------------------------------------------------
def _identity_forward_(y: Tensor, _: float) -> Tensor:
    return y


def _identity_backward(z: Tensor, dz: Tensor, _: float) -> Tensor:
    return dz.clone()


def _identity_inverse(z: Tensor, _: float) -> Tensor:
    return z.clone()


ACTIVATIONS: dict[str, Activation] = {
    "leaky_relu": Activation("leaky_relu", _leaky_forward_, _leaky_backward, _leaky_inverse,
                             invertible=lambda a: float(a) > 0.0,
                             module=lambda a, inplace: nn.LeakyReLU(float(a), inplace)),
    "elu": Activation("elu", _elu_forward_, _elu_backward, _elu_inverse,
                      invertible=lambda alpha: float(alpha) > 0.0,
                      module=lambda alpha, inplace: nn.ELU(float(alpha), inplace)),
    "relu": Activation("relu", _relu_forward_, _relu_backward, None,
                       invertible=lambda _: False, module=lambda _, inplace: nn.ReLU(inplace)),
    "identity": Activation("identity", _identity_forward_, _identity_backward,
                           _identity_inverse, invertible=lambda _: True,
                           module=lambda _, inplace: nn.Identity(), reads_output=False),
}
"""name -> :class:`Activation`. ``param`` is the LeakyReLU slope / ELU alpha (ignored
by relu and identity)."""


def get_activation(name: str) -> Activation:
    """The :class:`Activation` called ``name``.

    Raises:
        ValueError: unknown name (the message lists the valid names).
    """
    try:
        return ACTIVATIONS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown activation {name!r}; valid activations: "
                         f"{', '.join(ACTIVATIONS)}") from None


def make_activation(name: str, param: float, inplace: bool = False) -> nn.Module:
    """A standalone ``nn.Module`` computing activation ``name`` (torch's LeakyReLU / ELU / ReLU /
    Identity).

    Args:
        name: one of ``"leaky_relu"`` (``param`` = negative slope), ``"elu"``
            (``param`` = alpha), ``"relu"``, ``"identity"`` (``param`` ignored).
        param: the activation parameter (dimensionless).
        inplace: overwrite the input (as torchvision's ``ReLU(inplace=True)`` after a residual
            sum): autograd then keeps the output only, one buffer instead of two. Only for inputs
            nothing else needs; ignored for a negative slope / alpha, whose in-place backward
            torch rejects (see :func:`activate`).

    Raises:
        ValueError: unknown ``name`` (the message lists the valid names).
    """
    return get_activation(name).module(param, inplace and not negative_param(name, param))


def activate(name: str, y: Tensor, param: float) -> Tensor:
    """``phi(y)`` for a layer that keeps its pre-activation ``y`` nowhere else: in place on ``y``
    (:attr:`Activation.forward_`, autograd keeps only the output), except a negative leaky_relu
    slope / elu alpha, which runs out of place (torch's in-place backward of those raises, and
    the output no longer tells the side; autograd keeps ``y`` instead). Any shape and floating
    dtype; returns ``y`` itself or a new tensor of its shape and dtype.

    Raises:
        ValueError: unknown ``name``.
    """
    act = get_activation(name)
    if negative_param(name, param):
        return act.module(param, False)(y)
    return act.forward_(y, param)


def output_to_keep(name: str, z: Tensor) -> Optional[Tensor]:
    """``z`` when activation ``name``'s backward reads its output (what a layer keeps for
    phi's backward), None for the identity, whose backward needs none.

    Raises:
        ValueError: unknown ``name``.
    """
    return z if get_activation(name).reads_output else None


def negative_param(name: str, param: float) -> bool:
    """A negative leaky_relu slope / elu alpha: no in-place form, no backward from the output."""
    return name in ("leaky_relu", "elu") and float(param) < 0


def is_invertible(name: str, param: float) -> bool:
    """Whether activation ``name`` with parameter ``param`` is invertible (usable in place).

    leaky_relu needs slope > 0, elu needs alpha > 0, identity always, relu never.

    Raises:
        ValueError: unknown ``name``.
    """
    return get_activation(name).invertible(param)


def check_output_form(name: str, param: float, layer: str) -> None:
    """Raise ``ValueError`` when dL/dy cannot be computed from the output ``z`` alone.

    The masks ``z > 0 <=> y > 0`` used by :attr:`Activation.backward` need a non-negative
    leaky_relu slope / elu alpha; the layers that use this backward call this check.
    """
    get_activation(name)
    if negative_param(name, param):
        raise ValueError(f"{layer}: activation {name!r} needs activation_param >= 0, got "
                         f"{param!r} (use ABN for other values)")


def check_invertible(name: str, param: float, layer: str = "InPlaceABN") -> None:
    """Raise ``ValueError`` unless ``(name, param)`` can be inverted by an in-place layer."""
    if not is_invertible(name, param):
        raise ValueError(
            f"{layer} needs an invertible activation (it recovers y = phi^-1(z) from its "
            f"output in backward), but activation={name!r} with activation_param={param!r} "
            f"is not invertible. Use activation='leaky_relu' with a slope > 0 (e.g. 0.01), "
            f"'elu' with alpha > 0, or 'identity'; or use the non-in-place strategies "
            f"(ABN / CheckpointedABN, norm='bn'/'checkpoint'/'checkpoint_proposed') to keep "
            f"{name!r}.")
