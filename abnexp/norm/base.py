"""The state every BN + activation layer shares (:class:`NormActBase`): constructor, parameters,
buffers, ``reset_parameters`` and ``extra_repr`` as torch.nn.BatchNorm and the reference
InPlace-ABN library's ``ABN`` (Rota Bulò et al., CVPR 2018) define them."""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

from abnexp.norm.activations import get_activation
from abnexp.norm.functional import check_batch_size


class NormActBase(nn.Module):
    """Shared state of the BN + activation layers; constructor compatible with the reference
    library (mapillary/inplace_abn ``ABN``) and buffers/semantics of ``torch.nn.BatchNorm``.

    Args:
        num_features: C, the channel count of inputs shaped (N, C), (N, C, L), (N, C, H, W)
            or (N, C, D, H, W).
        eps: added to the variance (dimensionless, same units as var(x)).
        momentum: running-statistics update factor; ``None`` = cumulative average
            (factor ``1/num_batches_tracked``), as in torch.
        affine: learnable per-channel ``weight`` (gamma, init 1) and ``bias`` (beta, init 0).
        track_running_stats: keep ``running_mean`` (init 0), ``running_var`` (init 1,
            *unbiased* batch variances are averaged) and ``num_batches_tracked`` (int64);
            if False, batch statistics are used in eval mode too and the buffers are None.
        activation: "leaky_relu", "elu", "relu" or "identity".
        activation_param: LeakyReLU negative slope / ELU alpha (ignored otherwise).
        device, dtype: factory kwargs for parameters and float buffers.

    Raises:
        ValueError: unknown activation (the message lists the valid ones).

    Class attribute ``inplace``: True for layers that overwrite their input (models clone
    a residual shortcut before such a layer).

    Edge cases, as ``torch.nn.BatchNorm2d`` (and where abnexp differs from the reference
    InPlace-ABN library): an input without values (N = 0, or a zero-size spatial dim) returns an
    empty output of its shape, dtype and layout, leaves the running statistics untouched
    (``num_batches_tracked`` counts the call, as torch's does) and gives weight and bias zero
    gradients, on every kernel backend. The reference library raises for any batch with at most
    one value per channel, so also for an empty one; abnexp accepts the empty batch because an
    empty batch is a normal event outside image classification (a detection head with no
    positive RoI, a data-parallel rank whose shard ran out, a sampler that yields an empty group)
    and torch's own layers accept it -- raising there would stop a run on data that carry no
    statistic at all, whereas one value per channel gives a batch variance of exactly 0 and still
    raises (``ValueError`` naming the layer and the input size, torch's message text).
    """

    inplace = False
    _version = 2

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True,
                 activation: str = "leaky_relu", activation_param: float = 0.01,
                 device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        get_activation(activation)
        factory = {"device": device, "dtype": dtype}
        self.num_features = int(num_features)
        self.eps = float(eps)
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.activation = activation
        self.activation_param = float(activation_param)
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features, **factory))
            self.bias = nn.Parameter(torch.empty(num_features, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
            self.register_buffer("num_batches_tracked",
                                 torch.tensor(0, dtype=torch.long, device=device))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        """running_mean <- 0, running_var <- 1, num_batches_tracked <- 0."""
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        """Reset running statistics and set weight <- 1, bias <- 0."""
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}, track_running_stats={self.track_running_stats}, "
                f"activation={self.activation}, activation_param={self.activation_param}")

    def _check_input(self, x: Tensor, local_stats: bool = True) -> None:
        """Raise ``ValueError`` for inputs that are not (N, C, *) with 0-3 spatial dims, and,
        when this call normalizes with the batch statistics of ``x`` alone (``local_stats``;
        the synchronized layers count their process group's batch instead), for one value per
        channel, as ``torch.nn.BatchNorm2d`` does, naming the layer (:func:`check_batch_size`).
        An empty input (N = 0 or a zero-size spatial dim) is accepted."""
        if not 2 <= x.dim() <= 5:
            raise ValueError(f"expected 2D to 5D input (N, C, *), got {x.dim()}D input")
        if x.shape[1] != self.num_features:
            raise ValueError(f"expected {self.num_features} channels (dim 1), got input "
                             f"of size {tuple(x.shape)}")
        if local_stats and (self.training or self.running_mean is None):
            check_batch_size(x, self.layer_name())

    def hold_for_backward(self, *tensors: Tensor) -> None:
        """Keeps, until the next training call (attribute ``held_for_backward``, a list), tensors
        that this call derived from buffers it then updates in place and that its gradients use
        (BRN's r and d, CBN's window). Eager mode needs nothing of the sort (autograd saves what
        it uses); under ``torch.compile`` they become outputs of the graph, which AOTAutograd then
        saves for the backward. Otherwise its partitioner may recompute them in the backward from
        the buffers, which by then hold this step's update, and the gradients come out wrong
        (torch 2.14, also with backend="aot_eager"; pytorch/pytorch PR 197039;
        tests/norm/test_no_host_sync.py compares compiled training with eager)."""
        self.held_for_backward.extend(tensors)

    @staticmethod
    def advance(counter: Tensor) -> Tensor:
        """``counter += 1`` for a 0-dim counter buffer (on its device: no host read); returns the
        new value as a fresh tensor computed before the in-place update, so that a layer's schedule
        reads a value of this call rather than the buffer after its update."""
        new = counter + 1
        counter.copy_(new)
        return new

    def layer_name(self) -> str:
        """``ClassName(C)``, the layer in error messages."""
        return f"{type(self).__name__}({self.num_features})"

    def _stats_mode(self) -> tuple[bool, float, Optional[Tensor], Optional[Tensor]]:
        """(use batch statistics, update factor, running_mean, running_var) for this call.

        Mirrors ``torch.nn.modules.batchnorm._BatchNorm.forward`` (including incrementing
        ``num_batches_tracked`` in training, and, with ``momentum=None`` only, reading it on the
        host for the factor 1/n as torch does: the default momentum reads nothing). The running tensors are returned when they
        are to be *used* (eval) or *updated* (training), else None.
        """
        factor = 0.0 if self.momentum is None else float(self.momentum)
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        use_running = not self.training or self.track_running_stats
        return (batch_stats, factor, self.running_mean if use_running else None,
                self.running_var if use_running else None)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        version = local_metadata.get("version", None)
        key = prefix + "num_batches_tracked"
        if (version is None or version < 2) and self.track_running_stats and key not in state_dict:
            state_dict[key] = torch.tensor(0, dtype=torch.long)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def inference_affine(self) -> tuple[Tensor, Tensor]:
        """The eval-mode normalization as a per-channel affine map, ``BN(x) = scale * x + shift``
        (the activation follows), for folding into the preceding convolution (``abnexp export``).

        Every subclass whose eval mode is ``F.batch_norm`` with the running statistics and ``weight``
        as the scale (ABN, CheckpointedABN, SyncABN, MABN -- running_mean 0 --, CBN, BRN) uses this:
        ``scale = gamma / sqrt(running_var + eps)``, ``shift = beta - running_mean * scale``.

        Returns:
            (scale, shift): (C,) float64 tensors, detached, on the layer's device.
        Raises:
            ValueError: track_running_stats=False (eval uses batch statistics: not an affine map).
        """
        if self.running_var is None:
            raise ValueError(f"{type(self).__name__} with track_running_stats=False normalizes with batch "
                             f"statistics in eval mode: it is not a per-channel affine map")
        gamma = self.weight if self.weight is not None else torch.ones_like(self.running_var)
        beta = self.bias if self.bias is not None else torch.zeros_like(self.running_var)
        return batchnorm_affine(gamma, beta, self.running_mean, self.running_var, self.eps)


def empty_output(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]) -> Tensor:
    """The output of a normalization layer for an input without values (N = 0 or a zero-size
    spatial dim): a new empty tensor of x's shape, dtype and layout, connected to ``weight`` and
    ``bias`` so that they receive zero gradients -- what ``torch.nn.functional.batch_norm``
    returns for such an input (``x.clone() * weight[0] + bias[0]``)."""
    out = x.clone()
    if weight is not None:
        out = out * weight[0].to(x.dtype)
    if bias is not None:
        out = out + bias[0].to(x.dtype)
    return out


def batchnorm_affine(gamma: Tensor, beta: Tensor, running_mean: Tensor, running_var: Tensor,
                     eps: float) -> tuple[Tensor, Tensor]:
    """(scale, shift) of inference BatchNorm ``gamma * (x - mean) / sqrt(var + eps) + beta``, all (C,),
    computed in float64 and detached (Ioffe & Szegedy 2015, Algorithm 2)."""
    scale = gamma.detach().double() / (running_var.detach().double() + eps).sqrt()
    return scale, beta.detach().double() - running_mean.detach().double() * scale
