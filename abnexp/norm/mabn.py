"""Moving Average Batch Normalization (MABN) + activation, and the weight-centralized conv.

Source: Yan, Wan, Zhang, Zhang, Wei, Sun, "Towards Stabilizing Batch Statistics in Backward
Propagation of Batch Normalization" (ICLR 2020), Sec. 4 (moving-average statistics in forward
*and* backward, the uncentred "modified normalization" of Sec. 4.2, weight centralization), as
the authors' code (megvii-model/MABN) computes it (Algorithm 1 of the paper).

Per channel, with reductions over N and the spatial positions, at training iteration t (the
first is 1; ``num_steps``), normalization batch n (``num_batches_tracked``; n = t unless
``group_size`` splits the batch), buffer size m:

* forward: ``x2 = mean(x^2)`` is written to ``buffer_x2[n mod m]``; ``var = x2`` during the
  warm-up (``n <= m`` or ``t < warmup_iters``), else the simple moving average
  ``mean(buffer_x2)``; ``z = x / sqrt(var + eps)``; ``r = sqrt(var + eps) / sqrt(running_var +
  eps)`` (running_var from before this update) clamped to [1/5, 5], ``r = 1`` while
  ``t <= max(r_warmup_iters, warmup_iters)``; ``y = gamma * r * z + beta``; then
  ``running_var <- (1 - momentum) * running_var + momentum * var``. No mean is subtracted.
* backward (custom, r a constant): ``g = dL/dy * gamma * r``, ``gz = mean(g * z)`` (Psi_B) is
  written to ``buffer_gz[n mod m]``; ``Psi = gz`` during the warm-up, else ``mean(buffer_gz)``;
  ``dL/dx = (g - z * Psi) / sqrt(var + eps)``, ``dL/dgamma = sum(dL/dy * r * z)``,
  ``dL/dbeta = sum(dL/dy)``.
* inference: ``y = gamma * x / sqrt(running_var + eps) + beta`` (linear in x, foldable into the
  preceding conv; ``running_mean`` is kept at 0 so this is exactly ``F.batch_norm``).
* normalization batch (``group_size`` g, paper Sec. 5.1 and Appendix B.2): a training call of
  batch N is exactly its groups (:func:`~abnexp.norm.grouping.split_groups`) run as consecutive
  calls, each followed by its own backward, that share one t (t counts optimizer steps, n counts groups): groups are visited in batch order in
  forward *and* in backward, so both moving averages of group i cover the m normalization
  batches ending at i -- for m = N/g, the previous call's groups i+1.. and this call's 0..i, as
  in the authors' ImageNet code. dL/dgamma and dL/dbeta are summed over the groups.

``momentum`` follows torch's convention (factor of the *new* value): the reference's 0.98 on
the old value is ``momentum=0.02`` here.

State across iterations (all registered buffers, so checkpoints save and resume restores
them): ``buffer_x2`` and ``buffer_gz`` (m, C), ``running_var``, ``num_steps`` and
``num_batches_tracked`` (the counters t and n). Deviations from the reference, where it
corrupts its buffers:

* an empty batch (N = 0 or a zero-size spatial dim) returns an empty output and leaves every
  buffer and counter untouched (weight and bias get zero gradients);
* under fp16 AMP the window holds Psi of the *unscaled* gradients (:func:`set_loss_scale`: the
  trainer hands the GradScaler's scale tensor to the layers), and a non-finite x2 or Psi_B (an
  overflow step) is not written: the slot keeps its value, so one overflow cannot make the next m
  backward passes non-finite;
* the counters t and n are read on the device only (slots, warm-up and r schedule are device
  tensors): no host synchronization and no graph break under ``torch.compile``;
* each training-mode call is one iteration that owns its buffer slot: its backward writes its
  Psi_B into the slot its forward wrote x2 to, so a layer called several times per optimizer
  step (a head shared across inputs) keeps consistent buffers -- each call counts as one
  iteration (with ``norm.group_size`` each group owns a slot, see :mod:`abnexp.norm.grouping`);
* activation checkpointing is refused: a forward recomputed during backward
  (``torch.utils.checkpoint``) would count a second iteration and see updated buffers, so it
  raises ``RuntimeError``; do not checkpoint segments that contain MABN layers;
* a training-mode call under ``torch.no_grad()`` updates buffer_x2, running_var and the
  counter; its Psi slot keeps its previous value (there is no backward).

Kernel backends (:mod:`abnexp.norm.backends`, unless switched off or the activation has a negative
slope / alpha): x2 is the ``linear_backward_reduce`` of (x, x) (sum x^2), the normalization is
one fused ``forward`` pass with the activation (z kept, as autograd keeps it for the activation
on the PyTorch path; not with the identity, which needs none), the backward one
``linear_backward_reduce`` pass for (sum dL/dy, sum dL/dy * x) -- Psi_B = gamma r invstd sum(dL/dy x) / m -- and one ``linear_backward_elementwise`` pass
for dL/dx = gamma r invstd dL/dy - invstd^2 Psi x.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from abnexp.norm import backends
from abnexp.norm.abn import NormActBase
from abnexp.norm.activations import activate, output_to_keep
from abnexp.norm.functional import affine_params, channel, compute_dtype, reduce_dims, values_per_channel
from abnexp.norm.grouping import refuse_recompute, split_groups

R_MAX = 5.0  # r is clamped to [1/R_MAX, R_MAX] (reference code)


class CenConv2d(nn.Conv2d):
    """Weight-centralized convolution (MABN paper Sec. 4.3): ``nn.Conv2d`` computed with
    ``W - mean(W)``, the mean taken per output filter over (C_in/groups, kh, kw), inside
    autograd. Same constructor, parameters and input/output shapes as ``nn.Conv2d``; the
    stored ``weight`` is the raw (uncentred) parameter. Used for every conv that feeds an MABN
    layer when ``norm=mabn`` (models build such convs with ``norm_act.conv``)."""

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, _Centralize.apply(self.weight), self.bias)


class _Centralize(torch.autograd.Function):
    """w - mean(w) per output filter (over dims 1-3). The map is the orthogonal projection
    P = I - 11^T / n on each filter, which is symmetric, so dL/dw = P dL/dw_c: the same two ops
    backward as forward (autograd through mean and sub takes seven)."""

    @staticmethod
    def forward(ctx, w: Tensor) -> Tensor:
        return w - w.mean(dim=(1, 2, 3), keepdim=True)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad - grad.mean(dim=(1, 2, 3), keepdim=True)


class _MABNFunction(torch.autograd.Function):
    """y = gamma * r * x * invstd + beta with MABN's moving-average backward (module docstring),
    for all the normalization batches (groups) of one training call at once.

    ``invstd``, ``r``: (G, C), one row per group of ``split_groups(x, group_size)``; ``slots``
    (G,) int64, ``use_sma`` (G,) bool: device tensors (no host read decides anything).
    Backward visits the groups in batch order, each writing its Psi_B before averaging
    ``buffer_gz``, as G consecutive calls would (:func:`_store_psi`: unscaled by ``loss_scale``, a
    0-dim device tensor or None). ``activation`` is fused (z = phi(y) returned and kept) on the
    native path only (``use_native``); the PyTorch path returns y and takes "identity"."""

    @staticmethod
    def forward(ctx, x, weight, bias, invstd, r, buffer_gz, slots, use_sma, loss_scale, group_size,
                activation, param, use_native):
        cdt = compute_dtype(x.dtype)
        ys = []
        gamma, beta = affine_params(weight, bias, x.shape[1], cdt, x.device)
        for i, xg in enumerate(split_groups(x, group_size)):
            if use_native:
                ys.append(backends.ops(xg).forward(xg, torch.zeros_like(r[i]), r[i] * invstd[i], gamma,
                                               beta, activation, param))
                continue
            scale = (weight.to(cdt) * r[i] * invstd[i]) if weight is not None else r[i] * invstd[i]
            y = xg.to(cdt) * channel(scale, xg)
            if bias is not None:
                y = y + channel(bias.to(cdt), xg)
            ys.append(y)
        out = (ys[0] if len(ys) == 1 else torch.cat(ys)).to(x.dtype)
        ctx.save_for_backward(x, weight, invstd, r, slots, use_sma, loss_scale,
                              *((output_to_keep(activation, out),) if use_native else ()))
        ctx.buffer_gz, ctx.group_size = buffer_gz, group_size
        ctx.act = (activation, param, use_native)
        return out

    @staticmethod
    def backward(ctx, dy):
        if ctx.act[2]:
            return _native_backward(ctx, dy)
        x, weight, invstd, r, slots, use_sma, loss_scale = ctx.saved_tensors
        cdt = compute_dtype(x.dtype)
        dims = reduce_dims(x)
        need_w, need_b = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        dxs, dweight, dbias = [], None, None
        groups = zip(split_groups(x, ctx.group_size), split_groups(dy, ctx.group_size))
        for i, (xg, dyg) in enumerate(groups):
            dyc = dyg.to(cdt)
            z = xg.to(cdt) * channel(invstd[i], xg)
            gamma = weight.to(cdt) if weight is not None else torch.ones_like(r[i])
            g = dyc * channel(gamma * r[i], xg)
            psi = _store_psi(ctx.buffer_gz, (g * z).mean(dims), slots[i], use_sma[i], loss_scale)
            dxs.append(((g - z * channel(psi, xg)) * channel(invstd[i], xg)).to(x.dtype))
            if need_w:  # summed over the groups, as over consecutive calls
                dw = ((dyc * z).sum(dims) * r[i]).to(weight.dtype)
                dweight = dw if dweight is None else dweight + dw
            if need_b:
                db = dyc.sum(dims).to(weight.dtype)  # affine: weight and bias both or neither
                dbias = db if dbias is None else dbias + db
        dx = dxs[0] if len(dxs) == 1 else torch.cat(dxs)
        return dx, dweight, dbias, None, None, None, None, None, None, None, None, None, None


def _store_psi(buffer_gz: Tensor, gz: Tensor, slot: Tensor, sma: Tensor, loss_scale: Optional[Tensor]) -> Tensor:
    """Write Psi_B = ``gz`` (C,), computed from the gradients backward received (scaled by the
    loss scale s under fp16 AMP), to ``buffer_gz[slot]`` as ``gz / s`` -- the window holds unscaled
    statistics whatever the scale of each step -- and only where finite (an overflow step leaves
    the slot as it was, so it cannot poison the next m steps). Returns Psi in gz's units: the
    window's mean times s when ``sma``, else gz. ``slot``, ``sma``, s: 0-dim device tensors."""
    unscaled = gz if loss_scale is None else gz / loss_scale.to(gz.dtype)
    slot = slot.reshape(1)
    old = buffer_gz.index_select(0, slot)[0].to(gz.dtype)
    buffer_gz.index_copy_(0, slot, torch.where(unscaled.isfinite(), unscaled, old).unsqueeze(0).to(buffer_gz.dtype))
    window = buffer_gz.to(gz.dtype).mean(0)
    return torch.where(sma, window if loss_scale is None else window * loss_scale.to(gz.dtype), gz)


@once_differentiable
def _native_backward(ctx, dz):
    """:class:`_MABNFunction`'s backward with the native linear-form operators (module docstring)."""
    x, weight, invstd, r, slots, use_sma, loss_scale, z = ctx.saved_tensors
    activation, param, _ = ctx.act
    ops = backends.ops(dz)
    need_w, need_b = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
    dxs, dweight, dbias = [], None, None
    x_groups = split_groups(x, ctx.group_size)
    groups = zip(x_groups, split_groups(dz, ctx.group_size),
                 split_groups(z, ctx.group_size) if z is not None else (None,) * len(x_groups))
    gamma, _ = affine_params(weight, None, x.shape[1], invstd.dtype, x.device)
    for i, (xg, dzg, zg) in enumerate(groups):
        sum_dy, sum_dy_x = ops.linear_backward_reduce(xg, dzg, zg, activation, param)
        scale = gamma * r[i] * invstd[i]                      # g = dL/dy * scale, z = x * invstd
        gz = scale * sum_dy_x / values_per_channel(xg)        # Psi_B = mean(g * z)
        psi = _store_psi(ctx.buffer_gz, gz, slots[i], use_sma[i], loss_scale)
        dxs.append(ops.linear_backward_elementwise(xg, dzg, zg, scale, -invstd[i].square() * psi,
                                                   torch.zeros_like(psi), activation, param))
        if need_w:
            dw = (sum_dy_x * invstd[i] * r[i]).to(weight.dtype)
            dweight = dw if dweight is None else dweight + dw
        if need_b:
            db = sum_dy.to(weight.dtype)
            dbias = db if dbias is None else dbias + db
    dx = dxs[0] if len(dxs) == 1 else torch.cat(dxs)
    return dx, dweight, dbias, None, None, None, None, None, None, None, None, None, None


class MABN2d(NormActBase):
    """MABN + activation (``norm=mabn``); see the module docstring for the algorithm.

    Args:
        num_features, eps, affine, activation, activation_param, device, dtype: as
            :class:`~abnexp.norm.NormActBase`.
        momentum: running_var update factor of the new value (default 0.02 = the reference's
            0.98 on the old value); None = cumulative average.
        track_running_stats: must be True (r and inference need running_var).
        buffer_size: m, normalization batches in the moving averages (iterations when
            group_size=0; paper: 16 on COCO, 16/32 in the tables).
        warmup_iters: iterations that use the current batch's statistics (at least m).
        r_warmup_iters: iterations with r = 1 (reference: 1000; at least ``warmup_iters``).
        group_size: normalization batch (0 = whole batch), see :mod:`abnexp.norm.grouping`.

    Input (N, C, *) with 0-3 spatial dims, float64/32/16/bfloat16 (statistics in float32 or
    float64); output the same shape and dtype. ``running_mean`` stays 0 (MABN subtracts no
    mean); ``num_steps`` counts training calls (t, the iterations of ``warmup_iters`` and
    ``r_warmup_iters``, also with ``group_size``), ``num_batches_tracked`` normalization
    batches (n, the slots of the buffers). Yan et al., ICLR 2020, Sec. 4 and Algorithm 1.

    Raises:
        ValueError: bad sizes / options; wrong input rank or channels.
        RuntimeError: a training-mode forward recomputed during backward (checkpointing).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.02,
                 affine: bool = True, track_running_stats: bool = True,
                 activation: str = "leaky_relu", activation_param: float = 0.01,
                 buffer_size: int = 16, warmup_iters: int = 100, r_warmup_iters: int = 1000,
                 group_size: int = 0, device: Any = None, dtype: Any = None) -> None:
        if not track_running_stats:
            raise ValueError("MABN2d needs track_running_stats=True (r and inference use running_var)")
        if buffer_size < 1 or warmup_iters < 0 or r_warmup_iters < 0 or group_size < 0:
            raise ValueError(f"MABN2d: need buffer_size >= 1, warmup_iters >= 0, r_warmup_iters >= 0, "
                             f"group_size >= 0; got {buffer_size}, {warmup_iters}, {r_warmup_iters}, "
                             f"{group_size}")
        super().__init__(num_features, eps, momentum, affine, True, activation, activation_param,
                         device, dtype)
        self.buffer_size, self.warmup_iters = int(buffer_size), int(warmup_iters)
        self.r_warmup_iters, self.group_size = int(r_warmup_iters), int(group_size)
        factory = {"device": device, "dtype": dtype}
        self.register_buffer("buffer_x2", torch.zeros(buffer_size, num_features, **factory))
        self.register_buffer("buffer_gz", torch.zeros(buffer_size, num_features, **factory))
        self.register_buffer("num_steps", torch.tensor(0, dtype=torch.long, device=device))
        self.loss_scale: Optional[Tensor] = None  # see set_loss_scale

    def reset_running_stats(self) -> None:
        """running_var <- 1, statistic buffers <- 0, counters <- 0."""
        super().reset_running_stats()
        if hasattr(self, "num_steps"):
            self.buffer_x2.zero_()
            self.buffer_gz.zero_()
            self.num_steps.zero_()

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, buffer_size={self.buffer_size}, warmup_iters="
                f"{self.warmup_iters}, r_warmup_iters={self.r_warmup_iters}, group_size={self.group_size}")

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        if not self.training or x.numel() == 0:  # an empty batch: buffers and counters untouched
            y = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                             False, 0.0, self.eps)
        else:
            refuse_recompute("MABN2d")
            t = self.advance(self.num_steps)
            if backends.enabled(x, self.activation, self.activation_param):
                return self._train_iteration(x, t, True)  # activation fused
            y = self._train_iteration(x, t, False)
        return activate(self.activation, y, self.activation_param)

    def _train_iteration(self, x: Tensor, t: Tensor, use_native: bool) -> Tensor:
        """One training iteration on (N, C, *): per normalization batch (group, in batch order)
        statistics and buffers, then one custom Function for the whole batch (returning
        z = phi(y) with ``use_native``, else y)."""
        cdt = compute_dtype(x.dtype)
        invstds, rs, slots, use_sma = [], [], [], []
        r_free = max(self.r_warmup_iters, self.warmup_iters)
        with torch.no_grad():
            n0 = self.num_batches_tracked.clone()  # read before _stats_mode updates it (see advance)
            for i, xg in enumerate(split_groups(x.detach(), self.group_size)):
                n = n0 + (i + 1)  # device tensors: no host read
                _, factor, _, running_var = self._stats_mode()  # num_batches_tracked += 1
                if use_native:
                    x2 = backends.ops(xg).linear_backward_reduce(xg, xg, None, "identity", 0.0)[1]
                    x2 = x2 / values_per_channel(xg)
                else:
                    x2 = xg.to(cdt).square().mean(reduce_dims(xg))
                slot = torch.remainder(n, self.buffer_size).reshape(1)
                x2 = torch.where(x2.isfinite(), x2, self.buffer_x2.index_select(0, slot)[0].to(cdt))
                self.buffer_x2.index_copy_(0, slot, x2.unsqueeze(0).to(self.buffer_x2.dtype))
                sma = (n > self.buffer_size) & (t >= self.warmup_iters)
                var = torch.where(sma, self.buffer_x2.to(cdt).mean(0), x2)
                std = (var + self.eps).sqrt()
                r = torch.where(t <= r_free, 1.0,
                                (std / (running_var.to(cdt) + self.eps).sqrt()).clamp_(1.0 / R_MAX, R_MAX))
                running_var.mul_(1.0 - factor).add_(var.to(running_var.dtype), alpha=factor)
                invstds.append(std.reciprocal())
                rs.append(r)
                slots.append(slot[0])
                use_sma.append(sma)
        act = (self.activation, self.activation_param) if use_native else ("identity", 0.0)
        return _MABNFunction.apply(x, self.weight, self.bias, torch.stack(invstds), torch.stack(rs),
                                   self.buffer_gz, torch.stack(slots), torch.stack(use_sma), self.loss_scale,
                                   self.group_size, *act, use_native)


def set_loss_scale(model: nn.Module, scale: Optional[Tensor]) -> int:
    """Tell every :class:`MABN2d` of ``model`` the loss scale its backward receives gradients in:
    ``scale`` is the 0-dim float32 device tensor that multiplies the loss (``GradScaler``'s, which
    it updates in place, so one call at the start of training suffices), or None (no scaling: fp32,
    bf16). The layers divide their Psi_B by it before storing it in ``buffer_gz`` and multiply the
    window's mean back, on the device (no host read), so the window holds unscaled statistics across
    scale changes (MABN's moving average of Psi would otherwise mix loss scales). Returns the number
    of layers set."""
    layers = [m for m in model.modules() if isinstance(m, MABN2d)]
    for m in layers:
        m.loss_scale = scale
    return len(layers)
