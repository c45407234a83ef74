"""MABN with a normalization batch (``group_size > 0``) equals consecutive calls of that batch.

MABN (Yan et al., ICLR 2020, §5.1 and Appendix B.2): the per-process batch is split into groups
of ``group_size`` consecutive samples, each a normalization batch with its own statistics; the
moving averages of E[x^2] (forward) and of Psi (backward) run over the ``buffer_size`` most
recent normalization batches, as in the authors' ImageNet code, where group i of a call averages
the groups i-m+1 .. i (earlier ones from the previous call).

The independent reference is the same layer without grouping, called once per group in batch
order, each call followed by its own backward. Iteration counters: ``num_steps`` (t) counts
training iterations (optimizer steps) also with groups, so warm-up and r warm-up switch per step;
``num_batches_tracked`` (n) counts normalization batches. The reference reproduces that by
giving all the calls of one step the same t (its counter is set back to t - 1 before each call).
Equivalence is checked in float64 through the warm-ups (current-batch statistics, then moving
averages with r = 1, then r clipped to [1/5, 5]) for forward, dL/dx, dL/dgamma, dL/dbeta (the
reference's summed over its calls) and every buffer.
"""
from __future__ import annotations

import pytest
import torch

from abnexp.norm.mabn import MABN2d

D = torch.float64
C = 3
WARMUP, R_WARMUP, STEPS = 3, 5, 10
SCALES = [1.0, 2.0, 0.5, 1.0, 3.0, 1.0, 0.05, 8.0, 1.0, 0.3]  # steps 7 and 8 clip r (1/5, 5)


def make(group_size: int, buffer_size: int) -> MABN2d:
    return MABN2d(C, momentum=0.1, buffer_size=buffer_size, warmup_iters=WARMUP,
                  r_warmup_iters=R_WARMUP, group_size=group_size, dtype=D)


def unclipped_r_of_last_group(layer: MABN2d) -> torch.Tensor:
    """sqrt(var + eps) / sqrt(running_var + eps) of the layer's last normalization batch (after
    warm-up: var = mean(buffer_x2); running_var before that batch's update)."""
    var, f = layer.buffer_x2.mean(0), layer.momentum
    rv_before = (layer.running_var - f * var) / (1 - f)
    return ((var + layer.eps) / (rv_before + layer.eps)).sqrt()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


@pytest.mark.parametrize("buffer_size,batch,group", [(4, 8, 2), (3, 8, 2), (2, 6, 3), (6, 8, 2), (4, 7, 2)])
def test_grouped_call_equals_consecutive_calls_of_the_normalization_batch(buffer_size, batch, group):
    torch.manual_seed(100 * buffer_size + 10 * batch + group)
    grouped, single = make(group, buffer_size), make(0, buffer_size)
    n_groups = -(-batch // group)
    clipped = False
    for t in range(1, STEPS + 1):
        gamma, beta = 1.0 + 0.5 * torch.randn(C, dtype=D), 0.3 * torch.randn(C, dtype=D)
        for layer in (grouped, single):
            with torch.no_grad():
                layer.weight.copy_(gamma)
                layer.bias.copy_(beta)
            layer.weight.grad = layer.bias.grad = None
        x = SCALES[t - 1] * torch.randn(batch, C, 3, 3, dtype=D) + 0.2
        dy = torch.randn(batch, C, 3, 3, dtype=D)

        xg = x.clone().requires_grad_()
        yg = grouped(xg)
        yg.backward(dy)

        ys, dxs = [], []
        for xc, dyc in zip(x.split(group), dy.split(group)):
            single.num_steps.fill_(t - 1)  # every normalization batch of step t sees t
            xc = xc.clone().requires_grad_()
            yc = single(xc)
            yc.backward(dyc)
            ys.append(yc.detach())
            dxs.append(xc.grad)
        y_ref, dx_ref = torch.cat(ys), torch.cat(dxs)

        for name, a, b in [("y", yg.detach(), y_ref), ("dx", xg.grad, dx_ref),
                           ("dgamma", grouped.weight.grad, single.weight.grad),
                           ("dbeta", grouped.bias.grad, single.bias.grad)]:
            diff = max_diff(a, b)
            assert diff <= 1e-12 * max(1.0, float(b.abs().max())), (t, name, diff)
        for key, ref in single.state_dict().items():
            got = grouped.state_dict()[key]
            if ref.is_floating_point():
                diff = max_diff(got, ref)
                assert diff <= 1e-12, (t, key, diff)
            else:
                assert torch.equal(got, ref), (t, key, got, ref)
        assert int(grouped.num_steps) == t and int(grouped.num_batches_tracked) == t * n_groups
        r = unclipped_r_of_last_group(single)
        clipped |= t > R_WARMUP and bool(((r > 5) | (r < 0.2)).any())
    assert clipped  # the schedule reaches the clipped-r phase


def test_grouped_backward_uses_the_window_ending_at_each_group():
    """Second step, buffer 4, batch 8 in groups of 2 (after warm-up): group 1's Psi is the mean
    of the previous step's groups 2, 3 and this step's groups 0, 1 (computed here by hand)."""
    torch.manual_seed(7)
    layer = MABN2d(C, buffer_size=4, warmup_iters=0, r_warmup_iters=10, group_size=2,
                   activation="identity", dtype=D)
    dims = (0, 2, 3)
    psis = []
    for _ in range(2):
        x = torch.randn(8, C, 2, 2, dtype=D).requires_grad_()
        dy = torch.randn(8, C, 2, 2, dtype=D)
        layer(x).backward(dy)
        x2 = [c.square().mean(dims) for c in x.detach().split(2)]
        psis.append((x, dy, x2))
    (x_prev, dy_prev, x2_prev), (x, dy, x2) = psis
    inv = [((x2_prev[2] + x2_prev[3] + x2[0] + x2[1]) / 4 + layer.eps).rsqrt()]  # group 1
    # step 1 (normalization batches 1-4 <= buffer_size) is warm-up: each group's own x2 and gz;
    # gamma = 1 and r = 1, so g = dL/dy
    gz_prev = [((dc * xc * (xs + layer.eps).rsqrt().view(1, -1, 1, 1)).mean(dims))
               for xc, dc, xs in zip(x_prev.detach().split(2), dy_prev.split(2), x2_prev)]
    z1 = x.detach()[2:4] * inv[0].view(1, -1, 1, 1)
    gz1 = (dy[2:4] * z1).mean(dims)
    x2_g0_window = (x2_prev[1] + x2_prev[2] + x2_prev[3] + x2[0]) / 4
    z0 = x.detach()[0:2] * (x2_g0_window + layer.eps).rsqrt().view(1, -1, 1, 1)
    gz0 = (dy[0:2] * z0).mean(dims)
    psi1 = (gz_prev[2] + gz_prev[3] + gz0 + gz1) / 4
    dx1 = (dy[2:4] - z1 * psi1.view(1, -1, 1, 1)) * inv[0].view(1, -1, 1, 1)
    torch.testing.assert_close(x.grad[2:4], dx1, rtol=1e-12, atol=1e-12)
