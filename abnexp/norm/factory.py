"""The normalization-activation factory that every model is built from.

Models never construct BatchNorm themselves: they receive a :class:`NormAct` and call it
once per normalization site, e.g. ``norm_act(256)`` for BN + the configured activation or
``norm_act(256, activation="identity")`` where no activation follows (the last norm of a
post-activation residual branch). Convolutions that feed a normalization layer are built
with ``norm_act.conv(...)`` so that strategies needing a special convolution (MABN's
weight-centralized conv) are an added entry, not a change to every model. Where a norm
directly normalizes one convolution's output, the model passes that conv
(``norm_act(C, conv=self.conv1)``): strategies that need the preceding conv's weight
(Cross-Iteration BN) receive it; the others ignore it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

from abnexp.norm.activations import make_activation


@dataclass(frozen=True)
class NormAct:
    """Builds normalization + activation layers of one strategy with shared settings.

    Attributes:
        layer: class (or partial) taking ``(num_features, eps=..., momentum=..., affine=...,
            track_running_stats=..., activation=..., activation_param=...)`` and returning
            an ``nn.Module`` mapping (N, C, ...) to (N, C, ...).
        activation: default activation name ("leaky_relu", "relu", "elu", "identity").
        activation_param: default activation parameter (LeakyReLU slope / ELU alpha).
        kwargs: further constructor arguments given to every layer (eps, momentum, ...).
        conv: constructor used for convolutions that feed a normalization layer
            (``nn.Conv2d`` signature); strategies that need a special conv replace it.
        name: the ``norm=`` choice this factory was built from.
        takes_conv: whether ``layer`` accepts a ``conv=`` argument (the preceding conv module
            or None); False for every strategy that does not use it.
    """

    layer: Callable[..., nn.Module]
    activation: str = "leaky_relu"
    activation_param: float = 0.01
    kwargs: dict[str, Any] = field(default_factory=dict)
    conv: Callable[..., nn.Module] = nn.Conv2d
    name: str = "bn"
    takes_conv: bool = False

    def __call__(self, num_features: int, activation: str | None = None,
                 activation_param: float | None = None, conv: nn.Module | None = None) -> nn.Module:
        """A layer for ``num_features`` channels; ``activation`` overrides the default;
        ``conv`` is the convolution whose output the layer directly normalizes, if any."""
        extra = {"conv": conv} if self.takes_conv else {}
        return self.layer(
            num_features,
            activation=self.activation if activation is None else activation,
            activation_param=self.activation_param if activation_param is None else activation_param,
            **self.kwargs,
            **extra,
        )

    def activation_module(self, inplace: bool = False) -> nn.Module:
        """The configured activation alone, e.g. after a residual addition; ``inplace`` overwrites
        its input (for a fresh tensor such as the residual sum; see :func:`make_activation`)."""
        return make_activation(self.activation, self.activation_param, inplace)
