"""Cross-Iteration Batch Normalization (CBN) + activation (``norm=cbn``).

Source: Yao, Cao, Zheng, Huang, Lin, "Cross-Iteration Batch Normalization" (CVPR 2021),
Algorithm 1, Eqs. 7-12 and Appendix B (and the authors' released code, Howal/Cross-iterationBatchNorm).

Training iteration t of a layer whose input x = conv(u; theta) is the output of its paired
convolution (per channel c, reductions over N and the output positions, m values):

* current statistics ``mu_t = mean(x)``, ``nu_t = mean(x^2)`` (gradients flow through these);
* the closed forms of Appendix B (:func:`conv_statistics_grads`): ``dmu_c/dtheta_c`` = the mean
  input patch, the same for every channel of a conv group, O(C_in K); ``dnu_c/dtheta_c =
  2 E[x_c * patch]``, O(C_out C_in K) -- one convolution weight-gradient each;
* the k - 1 previous iterations compensated to the current weights (Eqs. 7-8, constants for
  autograd): ``mu_{t-tau}(theta_t) = mu_{t-tau} + <dmu/dtheta, theta_t - theta_{t-tau}>``, same
  for nu;
* ``mu_bar = mean_tau(mu)``, ``nu_bar = mean_tau(max(nu, mu^2))`` (Eq. 10, default
  ``invalid_stats="max"``; ``"drop"`` is the released code's variant: a past entry whose
  compensated ``nu - mu^2 < 0`` is left out of both averages for that channel),
  ``sigma_bar^2 = nu_bar - mu_bar^2`` (computed in the equivalent, cancellation-free form
  mean(max(nu - mu^2, 0)) + variance of the mu's);
* ``xhat = (x - mu_bar) / sqrt(sigma_bar^2 + eps)`` (eps inside the sqrt, Eq. 12),
  ``y = gamma * xhat + beta``, then the activation;
* burn-in: for t <= ``burnin_iters`` the window is 1 (plain BatchNorm statistics); burn-in
  iterations are recorded too (the statistic gradients cost the same as after it), so the full
  window of the last k - 1 is used from iteration ``burnin_iters + 1``; t counts training calls
  (``num_steps``). The schedule and the window's slots are decided on the device from the counter
  buffers (no host read, no graph break under ``torch.compile``);
* running statistics: torch BatchNorm's EMA (``momentum``) of the current batch's mean and
  unbiased variance; inference is BatchNorm with running statistics.

Pairing: the layer is built with ``conv=`` the ``nn.Conv2d`` whose output it normalizes (models
do this through :class:`~abnexp.norm.NormAct`); a forward hook on that conv hands the layer the
conv's input, so ``forward(x)`` takes only x, which must be that conv's output. Where no conv
directly precedes the norm (``conv=None``: the first norm of a pre-activation block, ResNeXt's
``bn_out``) the layer is plain BatchNorm (a warning is issued once). The past statistics,
their gradients and the gradients' inner products with their iteration's weights are
registered buffers (``past_*``, with ``past_valid`` marking filled slots), so checkpoints keep them.

Each training-mode call is one iteration (several calls per step are several iterations with
unchanged weights, which the compensation handles exactly for mu); with ``group_size`` each
group is one window entry (see :mod:`abnexp.norm.grouping`). An empty batch (N = 0 or a
zero-size spatial dim) returns an empty output and leaves the buffers and counters untouched
(weight and bias get zero gradients), as ``torch.nn.BatchNorm2d`` leaves its statistics. A forward recomputed during backward (activation checkpointing) raises ``RuntimeError``.

Kernel backends (:mod:`abnexp.norm.backends`, unless switched off or the activation has a negative
slope / alpha): the current statistics are the ``statistics`` operator with the closed-form
backward dL/dx = (dL/dmu + 2 dL/dsigma^2 (x - mu)) / m (:class:`_BatchMoments`), and
normalization, affine and activation are one fused ``forward`` pass whose backward reads x and z
once for the sums and once for dL/dx (:class:`_FusedNormalize`); the window's (C,) statistics
stay in autograd.
"""
from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from abnexp.norm import backends

from abnexp.norm.base import NormActBase
from abnexp.norm.activations import activate, output_to_keep
from abnexp.norm.functional import (affine_params, check_batch_size, compute_dtype, reduce_dims,
                                    update_running_stats, values_per_channel)
from abnexp.norm.grouping import affine_normalize, refuse_recompute, split_groups

INVALID_STATS = ("max", "drop")
NO_CONV_WARNING = ("CBN2d with conv=None (no convolution directly precedes this norm, e.g. the first norm "
                   "of a pre-activation block or bn_out) uses plain BatchNorm statistics there")


def conv_statistics_grads(conv_input: Tensor, output: Tensor, conv: nn.Conv2d) -> tuple[Tensor, Tensor]:
    """Closed forms of d mean(x_c)/d theta_c and d mean(x_c^2)/d theta_c (CBN Appendix B).

    Args:
        conv_input: u, (N, C_in, H, W), the conv's input.
        output: x = conv(u), (N, C_out, H', W').
        conv: the ``nn.Conv2d`` (its stride, padding, dilation, groups G and kernel size).

    Returns:
        (dmu, dnu): dmu (G, C_in/G, kh, kw), the mean input patch of each conv group (output
        channel c uses row c // (C_out/G)); dnu (C_out, C_in/G, kh, kw). Both in the dtype of
        the inputs, which must match.
    """
    n, c, h, w = output.shape
    m, groups = n * h * w, conv.groups
    # one weight gradient for both: per conv group, grad_output = [x_c * 2/m for its channels, 1/m]
    # (weight (G * (C/G + 1), C_in/G, kh, kw), groups G): dnu from the first C/G rows, dmu the last
    grad = output.new_empty(n, groups, c // groups + 1, h, w)
    grad[:, :, :-1].copy_(output.reshape(n, groups, c // groups, h, w)).mul_(2.0 / m)  # no out= (torch.compile)
    grad[:, :, -1] = 1.0 / m
    both = torch.nn.grad.conv2d_weight(conv_input, (groups * (c // groups + 1), *conv.weight.shape[1:]),
                                       grad.reshape(n, -1, h, w), conv.stride, conv.padding, conv.dilation, groups)
    both = both.reshape(groups, c // groups + 1, *conv.weight.shape[1:])
    return both[:, -1], both[:, :-1].reshape(conv.weight.shape)


class _BatchMoments(torch.autograd.Function):
    """(mean, biased variance) of x (N, C, *) per channel, (C,) in the compute dtype, from the
    native ``statistics`` operator; backward dL/dx = (dL/dmean + 2 dL/dvar (x - mean)) / m in
    one ``linear_backward_elementwise`` pass (b = 2 dL/dvar / m, c = (dL/dmean - 2 dL/dvar mean) / m)."""

    @staticmethod
    def forward(ctx, x):
        mean, var = backends.ops(x).statistics(x)[:2]
        ctx.save_for_backward(x, mean)
        return mean, var

    @staticmethod
    @once_differentiable
    def backward(ctx, dmean, dvar):
        x, mean = ctx.saved_tensors
        m = values_per_channel(x)
        b = dvar * (2.0 / m)
        return backends.ops(x).linear_backward_elementwise(x, x, None, torch.zeros_like(b), b,
                                                        dmean / m - b * mean, "identity", 0.0)


class _FusedNormalize(torch.autograd.Function):
    """z = phi(gamma * (x - mu) * invstd + beta) with gradients for x, mu, invstd (C,), weight
    and bias, on the native kernels; keeps x and z (x only with the identity, whose backward needs
    no z). With dL/dy = phi'(z) dL/dz, xhat = (x - mu) invstd: dL/dx = gamma invstd dL/dy, dL/dmu = -gamma invstd sum dL/dy, dL/dinvstd =
    gamma sum(dL/dy xhat) / invstd, dL/dgamma = sum dL/dy xhat, dL/dbeta = sum dL/dy."""

    @staticmethod
    def forward(ctx, x, mu, invstd, weight, bias, activation, param):
        gamma, beta = affine_params(weight, bias, x.shape[1], mu.dtype, x.device)
        z = backends.ops(x).forward(x, mu, invstd, gamma, beta, activation, param)
        ctx.save_for_backward(x, mu, invstd, weight, bias, output_to_keep(activation, z))
        ctx.act = (activation, param)
        return z

    @staticmethod
    @once_differentiable
    def backward(ctx, dz):
        x, mu, invstd, weight, bias, z = ctx.saved_tensors
        activation, param = ctx.act
        ops = backends.ops(dz)
        gamma, beta = affine_params(weight, bias, x.shape[1], mu.dtype, x.device)
        sum_dy, sum_dy_xhat = ops.xhat_backward_reduce(x, dz, z, mu, invstd, gamma, beta, activation, param)
        scale = gamma * invstd
        dx = ops.linear_backward_elementwise(x, dz, z, scale, torch.zeros_like(scale), torch.zeros_like(scale),
                                             activation, param) if ctx.needs_input_grad[0] else None
        dw = sum_dy_xhat.to(weight.dtype) if weight is not None and ctx.needs_input_grad[3] else None
        db = sum_dy.to(bias.dtype) if bias is not None and ctx.needs_input_grad[4] else None
        return dx, -scale * sum_dy, gamma * sum_dy_xhat / invstd, dw, db, None, None


class CBN2d(NormActBase):
    """Cross-Iteration BatchNorm + activation; see the module docstring for the algorithm.

    Args:
        num_features, eps, momentum, affine, activation, activation_param, device, dtype: as
            :class:`~abnexp.norm.NormActBase` (torch BatchNorm semantics).
        track_running_stats: must be True (inference uses running statistics).
        window: k, iterations averaged (current + k - 1 past); 1 = BatchNorm. Paper:
            min(ceil(16 / batch per GPU), 8); released configs 4.
        burnin_iters: iterations with window 1 (paper: 25 epochs on ImageNet, 3 on COCO).
        invalid_stats: "max" (paper Eq. 10) or "drop" (released code).
        group_size: normalization batch (0 = whole batch), see :mod:`abnexp.norm.grouping`.
        conv: the ``nn.Conv2d`` (exactly that class, zero padding mode, numeric padding)
            whose output this layer normalizes, with ``out_channels == num_features``; None
            gives plain BatchNorm (warned once).

    Input (N, C, H, W), any floating dtype (statistics in float32/float64); output the same.
    Buffers when paired (k = window - 1, F = C_in/G * kh * kw): ``past_mean``, ``past_sqmean``
    (k, C); ``past_mean_grad`` (k, G, F); ``past_sqmean_grad`` (k, C, F) -- 3-D so that
    ``model.to(memory_format=torch.channels_last)`` leaves it alone; ``past_mean_dot``,
    ``past_sqmean_dot`` (k, C), each gradient's inner product with its iteration's weights;
    ``past_valid`` (k,) bool; ``num_steps`` (training calls); BatchNorm's running statistics
    (``num_batches_tracked`` counts normalization batches). ``held_for_backward``: the windows
    (mu, nu, mask) the last training call's groups used (see
    :meth:`~abnexp.norm.NormActBase.hold_for_backward`; what makes ``torch.compile`` exact).

    Raises:
        ValueError: bad options or conv; wrong input rank or channels; one value per channel.
        RuntimeError: in training, x is not the output of the paired conv's latest call; or
            a forward recomputed during backward (activation checkpointing).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True,
                 activation: str = "leaky_relu", activation_param: float = 0.01,
                 window: int = 4, burnin_iters: int = 0, invalid_stats: str = "max",
                 group_size: int = 0, conv: Optional[nn.Conv2d] = None,
                 device: Any = None, dtype: Any = None) -> None:
        if not track_running_stats:
            raise ValueError("CBN2d needs track_running_stats=True (inference uses running statistics)")
        if window < 1 or burnin_iters < 0 or group_size < 0 or invalid_stats not in INVALID_STATS:
            raise ValueError(f"CBN2d: need window >= 1, burnin_iters >= 0, group_size >= 0, invalid_stats "
                             f"in {INVALID_STATS}; got {window}, {burnin_iters}, {group_size}, {invalid_stats!r}")
        if conv is not None and (type(conv) is not nn.Conv2d or conv.out_channels != num_features
                                 or conv.padding_mode != "zeros" or isinstance(conv.padding, str)):
            raise ValueError(f"CBN2d({num_features}) needs conv= an nn.Conv2d with out_channels="
                             f"{num_features}, padding_mode='zeros' and numeric padding, got {conv!r}")
        super().__init__(num_features, eps, momentum, affine, True, activation, activation_param,
                         device, dtype)
        self.window, self.burnin_iters = int(window), int(burnin_iters)
        self.invalid_stats, self.group_size = invalid_stats, int(group_size)
        self._captured: Optional[tuple[nn.Conv2d, Tensor, Tensor]] = None
        self.past_len = 0 if conv is None else self.window - 1
        self.register_buffer("num_steps", torch.tensor(0, dtype=torch.long, device=device))
        if conv is None:
            warnings.warn(NO_CONV_WARNING, UserWarning, stacklevel=2)
        if self.past_len:
            k, factory = self.past_len, {"device": device, "dtype": dtype}
            fan_in = conv.weight[0].numel()  # C_in/G * kh * kw; 3-D buffers (channels_last leaves them)
            self.register_buffer("past_mean", torch.zeros(k, num_features, **factory))
            self.register_buffer("past_sqmean", torch.zeros(k, num_features, **factory))
            self.register_buffer("past_mean_grad", torch.zeros(k, conv.groups, fan_in, **factory))
            self.register_buffer("past_sqmean_grad", torch.zeros(k, num_features, fan_in, **factory))
            self.register_buffer("past_mean_dot", torch.zeros(k, num_features, **factory))
            self.register_buffer("past_sqmean_dot", torch.zeros(k, num_features, **factory))
            self.register_buffer("past_valid", torch.zeros(k, dtype=torch.bool, device=device))
            conv.register_forward_hook(self._capture)

    def _capture(self, conv: nn.Conv2d, args: tuple, output: Tensor) -> None:
        """Forward hook on the paired conv: keep (conv, input, output) for the next training call."""
        self._captured = (conv, args[0], output) if self.training else None

    def reset_running_stats(self) -> None:
        """Running statistics to BatchNorm's initial values; the window emptied; counters 0."""
        super().reset_running_stats()
        if hasattr(self, "num_steps"):
            self.num_steps.zero_()
        if getattr(self, "past_len", 0):
            self.past_valid.zero_()

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, window={self.window}, burnin_iters={self.burnin_iters}, "
                f"invalid_stats={self.invalid_stats}, group_size={self.group_size}, paired={bool(self.past_len)}")

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        captured, self._captured = self._captured, None
        if not self.training or x.numel() == 0:  # an empty batch: buffers and counters untouched
            y = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                             False, 0.0, self.eps)
        else:
            refuse_recompute("CBN2d")
            if self.past_len and (captured is None or captured[2] is not x):
                raise RuntimeError(f"CBN2d({self.num_features}) is paired with a conv and must receive "
                                   f"that conv's output directly (conv -> norm), in the same call order")
            step = self.advance(self.num_steps)
            use_native = backends.enabled(x, self.activation, self.activation_param)
            y = self._train_call(x, step, *(captured[:2] if self.past_len else (None, None)), use_native)
            if use_native:
                return y  # activation fused
        return activate(self.activation, y, self.activation_param)

    def _train_call(self, x: Tensor, step: Tensor, conv: Optional[nn.Conv2d], conv_input: Optional[Tensor],
                    use_native: bool = False) -> Tensor:
        """One training call: each group of ``group_size`` samples is one iteration; returns y,
        or z = phi(y) with ``use_native`` (the native kernels, activation fused).

        The conv weights are the same for every group of a call, so the past entries are
        compensated once per call and entries written during the call need no compensation;
        statistic gradients are computed only for the groups whose entries outlive the call
        (the last k - 1), which keeps the cost per call that of one iteration.
        """
        cdt = compute_dtype(x.dtype)
        groups = split_groups(x, self.group_size)
        k = self.past_len
        window = in_window = None
        if k:  # the schedule is decided on the device: past entries count from burn-in's end on
            in_window = step > self.burnin_iters
            with torch.no_grad():
                window = self._compensated(conv.weight.detach().to(cdt), in_window)
        inputs = split_groups(conv_input, self.group_size) if k else groups
        outputs, self.held_for_backward = [], []
        n0 = self.num_batches_tracked.clone()  # read before _stats_mode updates it (see advance)
        for i, (xg, ug) in enumerate(zip(groups, inputs)):
            check_batch_size(xg, self.layer_name())
            t = n0 + (i + 1)
            _, factor, running_mean, running_var = self._stats_mode()
            if use_native:
                mean, var = _BatchMoments.apply(xg)
            else:
                xc = xg.to(cdt)
                var, mean = torch.var_mean(xc, dim=reduce_dims(xg), correction=0)
            if window is not None:  # read from the buffers updated below
                self.hold_for_backward(*window)
            mu_bar, var_bar = (mean, var) if window is None else window_statistics(mean, var, *window)
            with torch.no_grad():
                update_running_stats(running_mean, running_var, mean.detach(), var.detach(),
                                     values_per_channel(xg), factor)
                if window is not None:  # this iteration joins the window of the next groups (new tensors: held)
                    slot = torch.remainder(t - 1, k).reshape(1)
                    window = (window[0].index_copy(0, slot, mean.unsqueeze(0)),
                              window[1].index_copy(0, slot, (var + mean.square()).unsqueeze(0)),
                              window[2].index_copy(0, slot, in_window.expand(1, self.num_features)))
                if k and i >= len(groups) - k:
                    theta = conv.weight.detach().to(cdt)
                    self._record(t, mean, var, theta, *conv_statistics_grads(ug.detach().to(cdt),
                                                                             xg.detach().to(cdt), conv))
            invstd = torch.rsqrt(var_bar + self.eps)
            if use_native:
                outputs.append(_FusedNormalize.apply(xg, mu_bar, invstd, self.weight, self.bias,
                                                     self.activation, self.activation_param))
            else:
                outputs.append(affine_normalize(xc, mu_bar, invstd, self.weight, self.bias).to(x.dtype))
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)

    def _compensated(self, theta: Tensor, active: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Past (mu, nu) Taylor-compensated to ``theta`` (Eqs. 7-8), each (k-1, C), and the
        (k-1, C) mask of the entries that enter the averages (none unless ``active``, a 0-dim
        bool device tensor: past the burn-in).

        <g, theta - theta_tau> is computed as <g, theta> - <g, theta_tau>, the second term kept
        from iteration tau (``past_*_dot``): one pass over the (k-1, C, F) gradients, without a
        (k-1, C, F) weight difference (8-12x faster on CPU for ResNet-50's layers)."""
        k, c, groups = self.past_len, self.num_features, self.past_mean_grad.shape[1]
        dt = theta.dtype
        theta = theta.reshape(c, -1)
        mu = self.past_mean.to(dt) - self.past_mean_dot.to(dt) + torch.einsum(
            "kgf,gcf->kgc", self.past_mean_grad.to(dt), theta.reshape(groups, c // groups, -1)).reshape(k, c)
        nu = self.past_sqmean.to(dt) - self.past_sqmean_dot.to(dt) + torch.einsum(
            "kcf,cf->kc", self.past_sqmean_grad.to(dt), theta)
        used = self.past_valid.unsqueeze(1).expand(k, c) & active  # a new tensor: the call updates it
        if self.invalid_stats == "drop":
            used = used & (nu - mu.square() >= 0)
        return mu, nu, used

    def _record(self, t: Tensor, mean: Tensor, var: Tensor, theta: Tensor, dmu: Tensor, dnu: Tensor) -> None:
        """Write iteration t's statistics, their weight gradients and the gradients' inner
        products with the weights (<dmu, theta>, <dnu, theta> per channel) to its slot (t a 0-dim
        device tensor: the slot is indexed on the device)."""
        slot = torch.remainder(t - 1, self.past_len).reshape(1)
        dt, c, groups = self.past_mean.dtype, self.num_features, dmu.shape[0]
        theta = theta.reshape(c, -1)
        dmu, dnu = dmu.reshape(groups, -1), dnu.reshape(c, -1)
        rows = {"past_mean": mean.detach(), "past_sqmean": var.detach() + mean.detach().square(),
                "past_mean_grad": dmu, "past_sqmean_grad": dnu,
                "past_mean_dot": torch.einsum("gf,gcf->gc", dmu, theta.reshape(groups, c // groups, -1)).reshape(c),
                "past_sqmean_dot": torch.einsum("cf,cf->c", dnu, theta)}
        for name, row in rows.items():
            getattr(self, name).index_copy_(0, slot, row.unsqueeze(0).to(dt))
        self.past_valid.index_fill_(0, slot, True)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        """Checkpoints written before ``past_*_dot`` kept the past weights (``past_weight``, (k-1,
        C, F)) instead: the inner products are computed from them."""
        weight = state_dict.pop(prefix + "past_weight", None)
        if weight is not None and prefix + "past_mean_grad" in state_dict:
            c, groups = weight.shape[1], state_dict[prefix + "past_mean_grad"].shape[1]
            state_dict[prefix + "past_mean_dot"] = torch.einsum(
                "kgf,kgcf->kgc", state_dict[prefix + "past_mean_grad"],
                weight.reshape(weight.shape[0], groups, c // groups, -1)).reshape(weight.shape[:2])
            state_dict[prefix + "past_sqmean_dot"] = torch.einsum(
                "kcf,kcf->kc", state_dict[prefix + "past_sqmean_grad"], weight)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


def window_statistics(mean: Tensor, var: Tensor, past_mean: Tensor, past_sqmean: Tensor,
                      used: Tensor) -> tuple[Tensor, Tensor]:
    """(mu_bar, sigma_bar^2) of Eqs. 9-11 over the current (mean, biased var) and the ``used``
    past entries: mean of the mu's; mean(max(nu - mu^2, 0)) + mean((mu - mu_bar)^2), which
    equals mean(max(nu, mu^2)) - mu_bar^2. Shapes: (C,) current, (k-1, C) past."""
    w = used.to(mean.dtype)
    count = 1.0 + w.sum(0)
    mu_bar = (mean + (w * past_mean).sum(0)) / count
    past_var = (past_sqmean - past_mean.square()).clamp(min=0)
    spread = (mean - mu_bar).square() + (w * (past_mean - mu_bar).square()).sum(0)
    return mu_bar, (var + (w * past_var).sum(0) + spread) / count
