"""ABN: BatchNorm followed by an activation (the paper's "standard" strategy, norm=bn)."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from abnexp.norm import backends
from abnexp.norm.activations import activate
from abnexp.norm.base import NormActBase
from abnexp.norm.checkpointed_bn import STANDARD, checkpointed_abn


class ABN(NormActBase):
    """BatchNorm + activation, the "standard" strategy (paper Fig. 2a, norm=bn).

    y = BN_{gamma,beta}(x) via ``torch.nn.functional.batch_norm`` (paper Eq. 1-2), then
    z = phi(y) applied in place on y, so autograd keeps x (for BN) and z (for phi): the
    paper's "stores x, z, mu_B, sigma_B" (x only with the identity activation, which needs no z).

    Input: (N, C), (N, C, L), (N, C, H, W) or (N, C, D, H, W); float64/32/16 or bfloat16
    (half inputs with float32 parameters and statistics, e.g. under ``torch.autocast``);
    contiguous or channels_last. Output: same shape, dtype and memory layout; the input is
    not modified. Accepts activation leaky_relu (any slope), elu (any alpha), relu, identity;
    the activation runs in place on the BN output, except a negative slope / alpha, which runs
    out of place (autograd then keeps y instead of z for phi's backward).

    With a kernel backend (:mod:`abnexp.norm.backends`) the same strategy runs as fused
    operators: statistics, one normalize + affine + activation pass, and a backward that reads
    the kept x and z (negative LeakyReLU slopes / ELU alphas stay on the PyTorch path).

    An empty input (N = 0 or a zero-size spatial dim) gives an empty output, untouched
    statistics and zero gradients for weight and bias, as ``torch.nn.BatchNorm2d`` (the reference
    InPlace-ABN library raises; see :class:`~abnexp.norm.NormActBase` for why abnexp does not).

    Raises:
        ValueError: wrong input rank or channel count; training (or
            track_running_stats=False) with one value per channel ("ABN(C): Expected more than 1
            value per channel when training, got input size ...").
    """

    inplace = False

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        batch_stats, factor, running_mean, running_var = self._stats_mode()
        if backends.enabled(x, self.activation, self.activation_param):
            return checkpointed_abn(x, self.weight, self.bias, running_mean, running_var,
                                    batch_stats, factor, self.eps, self.activation,
                                    self.activation_param, STANDARD)
        y = F.batch_norm(x, running_mean, running_var, self.weight, self.bias, batch_stats,
                         factor, self.eps)
        return activate(self.activation, y, self.activation_param)
