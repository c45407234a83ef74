"""MABN (+ CenConv2d), CBN, BRN, GroupNorm, frozen BN and the normalization batch (group_size).

Factory, model pairing and CLI runs: test_norm_small_batch_models.py.

Every expected value is computed here from the papers' formulas (MABN Algorithm 1, CBN Eqs. 7-12, BRN Algorithm 1)
(or torch's own BatchNorm / GroupNorm / autograd), never by the layer under test.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from abnexp.norm import (BatchRenorm2d, CBN2d, CenConv2d, FrozenBatchNorm2d, GroupedABN, GroupNormAct,
                         MABN2d)
from abnexp.norm.brn import renorm_limits
from abnexp.norm.cbn import conv_statistics_grads

D = torch.float64
DIMS = (0, 2, 3)
EPS = 1e-5


def ch(v: torch.Tensor) -> torch.Tensor:
    return v.reshape(1, -1, 1, 1)


def randn(*shape, scale=1.0, shift=0.0, requires_grad=False):
    return (torch.randn(*shape, dtype=D) * scale + shift).requires_grad_(requires_grad)


def set_affine(layer, gen_seed=0):
    g = torch.Generator().manual_seed(gen_seed)
    with torch.no_grad():
        layer.weight.copy_(torch.rand(layer.num_features, generator=g, dtype=D) + 0.5)
        layer.bias.copy_(torch.randn(layer.num_features, generator=g, dtype=D))
    return layer


# ----------------------------------------------------------------------------------------------
# MABN
# ----------------------------------------------------------------------------------------------
def mabn(c=3, **kw):
    kw.setdefault("activation", "identity")
    return set_affine(MABN2d(c, dtype=D, **kw))


def test_mabn_warmup_normalizes_by_current_second_moment():
    torch.manual_seed(0)
    layer = mabn()
    for _ in range(3):  # t = 1..3 <= buffer_size: warm-up, r = 1
        x = randn(4, 3, 5, 5, scale=2.0, shift=1.0)
        expected = ch(layer.weight) * x / (x.square().mean(DIMS) + EPS).sqrt().reshape(1, -1, 1, 1) + ch(layer.bias)
        torch.testing.assert_close(layer(x), expected.detach())


def reference_mabn(xs, dys, m, momentum, rv0, gamma, beta):
    """The reference algorithm step by step (r = 1 throughout: t <= 1000): outputs, dx, running_var."""
    x2s, gzs, rv, outs, dxs = [], [], rv0.clone(), [], []
    for t, (x, dy) in enumerate(zip(xs, dys), start=1):
        x2s.append(x.square().mean(DIMS))
        var = x2s[-1] if t <= m else torch.stack(x2s[-m:]).mean(0)
        z = x / (var + EPS).sqrt().reshape(1, -1, 1, 1)
        outs.append(ch(gamma) * z + ch(beta))
        g = dy * ch(gamma)
        gzs.append((g * z).mean(DIMS))
        psi = gzs[-1] if t <= m else torch.stack(gzs[-m:]).mean(0)
        dxs.append((g - z * ch(psi)) / (var + EPS).sqrt().reshape(1, -1, 1, 1))
        rv = (1 - momentum) * rv + momentum * var
    return outs, dxs, rv


def test_mabn_moving_averages_after_warmup_forward_backward_and_running_var():
    torch.manual_seed(1)
    m, steps = 3, 7
    layer = mabn(buffer_size=m, warmup_iters=0)
    xs = [randn(2, 3, 4, 4, scale=1.0 + 0.3 * i, shift=0.2 * i) for i in range(steps)]
    dys = [randn(2, 3, 4, 4) for _ in range(steps)]
    outs, dxs, rv = reference_mabn(xs, dys, m, 0.02, torch.ones(3, dtype=D), layer.weight.detach(),
                                   layer.bias.detach())
    for x, dy, out, dx in zip(xs, dys, outs, dxs):
        x = x.clone().requires_grad_()
        y = layer(x)
        y.backward(dy)
        torch.testing.assert_close(y.detach(), out)
        torch.testing.assert_close(x.grad, dx)
    torch.testing.assert_close(layer.running_var, rv)
    assert int(layer.num_batches_tracked) == steps
    torch.testing.assert_close(layer.buffer_x2.sum(0), sum(x.square().mean(DIMS) for x in xs[-m:]))


def test_mabn_buffer_size_one_equals_autograd_of_stop_gradient_formula():
    torch.manual_seed(2)
    layer = mabn(buffer_size=1, warmup_iters=0, r_warmup_iters=0)
    for step in range(3):
        rv = layer.running_var.clone()
        x = randn(3, 3, 4, 4, scale=1.5, shift=0.5, requires_grad=True)
        dy = randn(3, 3, 4, 4)
        y = layer(x)
        grads = torch.autograd.grad(y, (x, layer.weight, layer.bias), dy)
        # reference: gamma * stopgrad(r) * x / sqrt(mean(x^2) + eps) + beta
        x_ref = x.detach().clone().requires_grad_()
        w_ref = layer.weight.detach().clone().requires_grad_()
        b_ref = layer.bias.detach().clone().requires_grad_()
        std = (x_ref.square().mean(DIMS) + EPS).sqrt()
        r = (std.detach() / (rv + EPS).sqrt()).clamp(0.2, 5.0)
        y_ref = ch(w_ref) * ch(r) * x_ref / ch(std) + ch(b_ref)
        ref_grads = torch.autograd.grad(y_ref, (x_ref, w_ref, b_ref), dy)
        torch.testing.assert_close(y.detach(), y_ref.detach())
        for a, b in zip(grads, ref_grads):
            torch.testing.assert_close(a, b)
        assert step == 0 or not torch.allclose(r, torch.ones_like(r))  # r really in play


def test_mabn_r_is_clipped_to_one_fifth_and_five():
    layer = mabn(buffer_size=1, warmup_iters=0, r_warmup_iters=0)
    x = randn(2, 3, 3, 3)
    with torch.no_grad():
        layer.running_var.copy_(torch.tensor([1e4, 1e-4, 1.0], dtype=D) * x.square().mean(DIMS))
    std = (x.square().mean(DIMS) + EPS).sqrt()
    r = (std / (layer.running_var + EPS).sqrt()).clamp(0.2, 5.0)
    assert r[0] == 0.2 and r[1] == 5.0
    torch.testing.assert_close(layer(x).detach(), ch(layer.weight) * ch(r) * x / ch(std) + ch(layer.bias))


def test_mabn_eval_uses_running_var_only_and_leaves_buffers():
    layer = mabn()
    with torch.no_grad():
        layer.running_var.copy_(torch.tensor([0.5, 2.0, 4.0], dtype=D))
    before = copy.deepcopy(layer.state_dict())
    x = randn(2, 3, 3, 3, shift=3.0)
    y = layer.eval()(x)
    torch.testing.assert_close(y, ch(layer.weight) * x / ch((layer.running_var + EPS).sqrt()) + ch(layer.bias))
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_mabn_empty_batch_leaves_state_untouched():
    layer = mabn()
    layer(randn(2, 3, 3, 3))
    before = copy.deepcopy(layer.state_dict())
    x = randn(0, 3, 3, 3, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    assert y.shape == x.shape
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_mabn_two_calls_per_step_keep_their_own_slots():
    layer = mabn(buffer_size=4)
    xs = [randn(2, 3, 3, 3, shift=1.0), randn(2, 3, 3, 3, scale=3.0)]
    dys = [randn(2, 3, 3, 3), randn(2, 3, 3, 3)]
    ys = [layer(x.requires_grad_()) for x in xs]  # two forwards, then one backward
    torch.autograd.backward(ys, dys)
    for t, (x, dy) in enumerate(zip(xs, dys), start=1):
        z = x.detach() / ch((x.detach().square().mean(DIMS) + EPS).sqrt())
        torch.testing.assert_close(layer.buffer_gz[t % 4], (dy * ch(layer.weight.detach()) * z).mean(DIMS))
        torch.testing.assert_close(layer.buffer_x2[t % 4], x.detach().square().mean(DIMS))


@pytest.mark.parametrize("name", ["mabn", "cbn"])
@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_is_refused(name, reentrant):
    module = mabn() if name == "mabn" else nn.Sequential(*cbn_pair(c_in=3, window=2))
    x = randn(2, 3, 4, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match="activation checkpointing"):
        checkpoint(module, x, use_reentrant=reentrant).sum().backward()


def test_mabn_gradcheck_float64_during_warmup():
    layer = mabn(2, warmup_iters=10**6)
    x = randn(3, 2, 2, 2, scale=2.0, requires_grad=True)
    assert torch.autograd.gradcheck(lambda inp: layer(inp), (x,))
    w, b = layer.weight, layer.bias
    assert torch.autograd.gradcheck(
        lambda ww, bb: torch.func.functional_call(layer, {"weight": ww, "bias": bb}, (x.detach(),)),
        (w.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()))


def test_mabn_state_dict_resume_continues_identically():
    torch.manual_seed(3)
    layer = mabn(buffer_size=2, warmup_iters=0, r_warmup_iters=1)
    for _ in range(3):
        x = randn(2, 3, 3, 3, requires_grad=True)
        layer(x).backward(randn(2, 3, 3, 3))
    restored = mabn(buffer_size=2, warmup_iters=0, r_warmup_iters=1)
    restored.load_state_dict(layer.state_dict())
    assert {"buffer_x2", "buffer_gz", "running_var", "num_batches_tracked"} <= set(layer.state_dict())
    x, dy = randn(2, 3, 3, 3), randn(2, 3, 3, 3)
    outs = []
    for mod in (layer, restored):
        xi = x.clone().requires_grad_()
        y = mod(xi)
        y.backward(dy)
        outs.append((y.detach(), xi.grad))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


def test_cenconv_centralizes_each_filter():
    conv = CenConv2d(3, 4, 3, bias=False).double()
    assert conv(torch.full((2, 3, 5, 5), 1.7, dtype=D)).abs().max() < 1e-12  # constant input, no padding
    x = randn(2, 3, 6, 6, requires_grad=True)
    w = conv.weight.detach().clone().requires_grad_()
    ref = F.conv2d(x, w - w.mean(dim=(1, 2, 3), keepdim=True))
    torch.testing.assert_close(conv(x), ref)
    g_ref = torch.autograd.grad(ref.square().sum(), w)[0]
    g = torch.autograd.grad(conv(x).square().sum(), conv.weight)[0]
    torch.testing.assert_close(g, g_ref)
    assert g.sum(dim=(1, 2, 3)).abs().max() < 1e-9  # the gradient is centralized too


# ----------------------------------------------------------------------------------------------
# CBN
# ----------------------------------------------------------------------------------------------
def cbn_pair(c_in=2, c_out=3, window=3, groups=1, **kw):
    conv = nn.Conv2d(c_in, c_out, 3, padding=1, groups=groups, bias=False).double()
    kw.setdefault("activation", "identity")
    return conv, set_affine(CBN2d(c_out, window=window, conv=conv, dtype=D, **kw))


@pytest.mark.parametrize("geometry", [
    dict(kernel_size=3, padding=1), dict(kernel_size=3, stride=2, padding=2, dilation=2),
    dict(kernel_size=1, groups=2), dict(kernel_size=3, groups=4, padding=1, bias=True)])
def test_cbn_closed_form_statistic_gradients_equal_autograd(geometry):
    torch.manual_seed(4)
    conv = nn.Conv2d(4, 8, **{"bias": False, **geometry}).double()
    u = randn(3, 4, 7, 6, shift=0.5)
    x = conv(u)
    dmu_ref = torch.autograd.grad(x.mean(DIMS).sum(), conv.weight, retain_graph=True)[0]
    dnu_ref = torch.autograd.grad(x.square().mean(DIMS).sum(), conv.weight)[0]
    dmu, dnu = conv_statistics_grads(u, x.detach(), conv)
    assert dmu.shape == (conv.groups, 4 // conv.groups, *conv.kernel_size)
    torch.testing.assert_close(dmu.repeat_interleave(8 // conv.groups, dim=0), dmu_ref)
    torch.testing.assert_close(dnu, dnu_ref)


def test_cbn_window_one_equals_batchnorm():
    torch.manual_seed(5)
    conv, layer = cbn_pair(window=1)
    bn = nn.BatchNorm2d(3).double()
    bn.load_state_dict({k: v for k, v in layer.state_dict().items() if k != "num_steps"})
    for _ in range(2):
        u = randn(2, 2, 5, 5, shift=1.0, requires_grad=True)
        dy = randn(2, 3, 5, 5)
        y = layer(conv(u))
        g = torch.autograd.grad(y, (u, layer.weight, layer.bias), dy)
        y_ref = bn(conv(u))
        g_ref = torch.autograd.grad(y_ref, (u, bn.weight, bn.bias), dy)
        torch.testing.assert_close(y, y_ref)
        for a, b in zip(g, g_ref):
            torch.testing.assert_close(a, b)
    torch.testing.assert_close(layer.running_mean, bn.running_mean)
    torch.testing.assert_close(layer.running_var, bn.running_var)


def test_cbn_unchanged_weights_give_the_plain_window_average():
    torch.manual_seed(6)
    conv, layer = cbn_pair(window=3)
    stats, out = [], None
    for i in range(4):
        u = randn(2, 2, 4, 4, scale=1 + i, shift=i)
        x = conv(u)
        out = layer(x)
        stats.append((x.detach().mean(DIMS), x.detach().square().mean(DIMS)))
    mu = torch.stack([s[0] for s in stats[-3:]]).mean(0)
    nu = torch.stack([s[1] for s in stats[-3:]]).mean(0)
    expected = ch(layer.weight) * (x - ch(mu)) / ch((nu - mu.square() + EPS).sqrt()) + ch(layer.bias)
    torch.testing.assert_close(out, expected)
    assert int(layer.past_valid.sum()) == 2


def test_cbn_changed_weights_compensate_the_mean_exactly_on_the_same_input():
    torch.manual_seed(7)
    conv, layer = cbn_pair(window=2)
    with torch.no_grad():
        layer.weight.fill_(1.0)
        layer.bias.zero_()
    u = randn(2, 2, 5, 5, scale=2.0, shift=0.5)
    mu_old = conv(u).detach().mean(DIMS)
    layer(conv(u))
    delta = 0.05 * torch.randn_like(conv.weight)
    with torch.no_grad():
        conv.weight.add_(delta)
    x = conv(u)
    y = layer(x)
    assert (x.detach().mean(DIMS) - mu_old).abs().min() > 1e-2  # the raw past mean is stale
    torch.testing.assert_close(y.mean(DIMS), torch.zeros(3, dtype=D), atol=1e-10, rtol=0)  # mu_bar = mu_t
    # nu is quadratic in theta: first-order compensation misses exactly mean(conv(u; delta)^2)
    mu_t, nu_t = x.detach().mean(DIMS), x.detach().square().mean(DIMS)
    nu_comp = nu_t - F.conv2d(u, delta, padding=1).square().mean(DIMS)
    assert torch.all(nu_comp > mu_t.square())  # a valid compensated entry: max() is not what decides
    var_bar = (nu_t + nu_comp) / 2 - mu_t.square()
    torch.testing.assert_close(y, (x - ch(mu_t)) / ch((var_bar + EPS).sqrt()))


def test_cbn_burnin_uses_batch_statistics():
    torch.manual_seed(8)
    conv, layer = cbn_pair(window=3, burnin_iters=2)
    outs = []
    for i in range(3):
        x = conv(randn(2, 2, 4, 4, shift=i))
        out = layer(x)
        bn = F.batch_norm(x, None, None, layer.weight, layer.bias, True, 0.0, EPS)
        outs.append(torch.allclose(out, bn))
    assert outs == [True, True, False]


@pytest.mark.parametrize("invalid", ["max", "drop"])
def test_cbn_invalid_past_entries(invalid):
    torch.manual_seed(9)
    conv, layer = cbn_pair(window=2, invalid_stats=invalid)
    u = randn(2, 2, 4, 4, shift=1.0)
    layer(conv(u))
    with torch.no_grad():
        layer.past_sqmean.zero_()  # nu = 0 < mu^2: an invalid past entry (weights unchanged)
    mu_p = layer.past_mean[0].clone()
    x = conv(randn(2, 2, 4, 4, shift=-1.0))
    out = layer(x)
    mu_t, var_t = x.detach().mean(DIMS), x.detach().var(DIMS, unbiased=False)
    if invalid == "drop":
        mu_bar, var_bar = mu_t, var_t
    else:  # nu_bar = mean(max(nu, mu^2)) = (nu_t + mu_p^2) / 2
        mu_bar = (mu_t + mu_p) / 2
        var_bar = (var_t + mu_t.square() + mu_p.square()) / 2 - mu_bar.square()
    expected = ch(layer.weight) * (x - ch(mu_bar)) / ch((var_bar + EPS).sqrt()) + ch(layer.bias)
    torch.testing.assert_close(out, expected)


def test_cbn_without_conv_warns_and_is_batchnorm():
    with pytest.warns(UserWarning, match="conv=None"):
        layer = set_affine(CBN2d(3, activation="identity", dtype=D))
    x = randn(2, 3, 4, 4)
    torch.testing.assert_close(layer(x), F.batch_norm(x, None, None, layer.weight, layer.bias, True, 0.0, EPS))
    assert not any(k.startswith("past_") for k in layer.state_dict())


def test_cbn_rejects_an_input_that_is_not_its_conv_output():
    conv, layer = cbn_pair()
    x = conv(randn(2, 2, 4, 4))
    with pytest.raises(RuntimeError, match="conv's output"):
        layer(x + 1)
    with pytest.raises(ValueError, match="out_channels=5"):
        CBN2d(5, conv=conv)


def test_cbn_empty_batch_and_state_dict_resume():
    torch.manual_seed(10)
    conv, layer = cbn_pair(window=3)
    for i in range(2):
        layer(conv(randn(2, 2, 4, 4, shift=i)))
    before = copy.deepcopy(layer.state_dict())
    assert layer(conv(randn(0, 2, 4, 4))).shape == (0, 3, 4, 4)
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), k
    conv2, restored = cbn_pair(window=3)
    conv2.load_state_dict(conv.state_dict())
    restored.load_state_dict(before)
    u = randn(2, 2, 4, 4, shift=5.0)
    torch.testing.assert_close(layer(conv(u)), restored(conv2(u)), rtol=0, atol=0)


def test_cbn_loads_a_checkpoint_that_kept_the_past_weights():
    """Checkpoints written before past_*_dot kept past_weight (k, C, F): loading one gives the
    layer that wrote it."""
    torch.manual_seed(11)
    conv, layer = cbn_pair(window=3, groups=2, c_in=2, c_out=4)
    weights = []
    for i in range(2):  # iterations t = 1, 2 fill slots 0, 1
        weights.append(conv.weight.detach().reshape(4, -1).clone())
        layer(conv(randn(2, 2, 4, 4, shift=i)))
        with torch.no_grad():
            conv.weight.add_(0.1 * torch.randn_like(conv.weight))
    old = {k: v for k, v in layer.state_dict().items() if not k.endswith("_dot")}
    old["past_weight"] = torch.stack(weights)
    conv2, restored = cbn_pair(window=3, groups=2, c_in=2, c_out=4)
    conv2.load_state_dict(conv.state_dict())
    restored.load_state_dict(old)
    u = randn(2, 2, 4, 4, shift=3.0)
    torch.testing.assert_close(restored(conv2(u)), layer(conv(u)))


def test_cbn_channels_last_model_matches_contiguous():
    torch.manual_seed(16)
    net = nn.Sequential(*cbn_pair(window=2))
    net_cl = copy.deepcopy(net).to(memory_format=torch.channels_last)  # the deep copy re-pairs its conv
    for i in range(3):
        u = randn(2, 2, 4, 4, shift=i)
        torch.testing.assert_close(net_cl(u.contiguous(memory_format=torch.channels_last)), net(u))
        with torch.no_grad():
            for m in (net, net_cl):
                m[0].weight.mul_(1.1)
    assert int(net_cl[1].past_valid.sum()) == 1


def test_cbn_gradcheck_float64_with_a_full_window():
    torch.manual_seed(11)
    conv, layer = cbn_pair(c_in=2, c_out=2, window=3)
    conv.weight.requires_grad_(False)
    for i in range(3):
        layer(conv(randn(2, 2, 3, 3, shift=i)))
        with torch.no_grad():
            conv.weight.add_(0.05 * torch.randn_like(conv.weight))  # past entries need compensation
    state = {k: v.clone() for k, v in layer.named_buffers()}

    def f(u):
        with torch.no_grad():  # every evaluation sees the same window
            for k, v in layer.named_buffers():
                v.copy_(state[k])
        return layer(conv(u))

    assert torch.autograd.gradcheck(f, (randn(2, 2, 3, 3, shift=0.5, requires_grad=True),))


# ----------------------------------------------------------------------------------------------
# BRN
# ----------------------------------------------------------------------------------------------
def brn(c=3, **kw):
    kw.setdefault("activation", "identity")
    return set_affine(BatchRenorm2d(c, dtype=D, **kw))


def test_brn_with_rmax_one_dmax_zero_equals_batchnorm():
    torch.manual_seed(12)
    layer = brn(r_max=1.0, d_max=0.0, renorm_start_iters=0, r_max_iters=0, d_max_iters=0)
    bn = nn.BatchNorm2d(3).double()
    bn.load_state_dict({k: v for k, v in layer.state_dict().items() if k != "num_steps"})
    for _ in range(3):
        x = randn(2, 3, 4, 4, scale=2.0, shift=1.0, requires_grad=True)
        dy = randn(2, 3, 4, 4)
        g = torch.autograd.grad(layer(x), (x, layer.weight, layer.bias), dy)
        g_ref = torch.autograd.grad(bn(x), (x, bn.weight, bn.bias), dy)
        for a, b in zip(g, g_ref):
            torch.testing.assert_close(a, b)
    torch.testing.assert_close(layer.running_mean, bn.running_mean)
    torch.testing.assert_close(layer.running_var, bn.running_var)


def test_brn_running_equal_to_batch_statistics_gives_batchnorm():
    layer = brn(renorm_start_iters=0, r_max_iters=0, d_max_iters=0)  # r_max = 3, d_max = 5 from step 1
    x = randn(2, 3, 4, 4, scale=3.0, shift=2.0)
    with torch.no_grad():
        layer.running_mean.copy_(x.mean(DIMS))
        layer.running_var.copy_(x.var(DIMS, unbiased=False))
    torch.testing.assert_close(layer(x), F.batch_norm(x, None, None, layer.weight, layer.bias, True, 0.0, EPS))


def test_brn_clipped_r_and_d_and_gradcheck():
    layer = brn(r_max=2.0, d_max=0.5, renorm_start_iters=0, r_max_iters=0, d_max_iters=0, momentum=0.0)
    with torch.no_grad():
        layer.running_mean.fill_(-10.0)
        layer.running_var.fill_(100.0)
    x = randn(2, 3, 4, 4, shift=1.0, requires_grad=True)
    mu, var = x.detach().mean(DIMS), x.detach().var(DIMS, unbiased=False)
    r = ((var + EPS).sqrt() / (100.0 + EPS) ** 0.5).clamp(0.5, 2.0)
    d = ((mu + 10.0) / (100.0 + EPS) ** 0.5).clamp(-0.5, 0.5)
    assert torch.all(r == 0.5) and torch.all(d == 0.5)
    xhat = (x.detach() - ch(mu)) / ch((var + EPS).sqrt()) * ch(r) + ch(d)
    torch.testing.assert_close(layer(x).detach(), ch(layer.weight) * xhat + ch(layer.bias))
    assert torch.autograd.gradcheck(lambda inp: layer(inp), (x,))  # r, d clipped: locally constant


def test_renorm_schedule():
    lim = lambda t: renorm_limits(t, 3.0, 5.0, 5000, 40000, 25000)  # noqa: E731
    assert lim(1) == (1.0, 0.0) and lim(5000) == (1.0, 0.0)
    assert lim(22500) == pytest.approx((2.0, 4.375))
    assert lim(40000) == (3.0, 5.0) and lim(10**6) == (3.0, 5.0)


# ----------------------------------------------------------------------------------------------
# GroupNorm, frozen BN
# ----------------------------------------------------------------------------------------------
def test_group_norm_act_equals_torch_group_norm_then_activation():
    layer = GroupNormAct(64, activation="leaky_relu", activation_param=0.1, dtype=D)
    ref = nn.GroupNorm(32, 64).double()
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.normal_()
    ref.load_state_dict(layer.state_dict())
    x = randn(2, 64, 3, 3, requires_grad=True)
    torch.testing.assert_close(layer(x), F.leaky_relu(ref(x), 0.1))
    with pytest.raises(ValueError, match="divisible by 32"):
        GroupNormAct(48)


def test_frozen_bn_is_eval_batchnorm_with_no_parameters():
    bn = nn.BatchNorm2d(4)
    with torch.no_grad():
        for t in (bn.weight, bn.bias, bn.running_mean):
            t.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    frozen = FrozenBatchNorm2d(4, activation="relu")
    frozen.load_state_dict(bn.state_dict())  # num_batches_tracked is ignored
    assert list(frozen.parameters()) == []
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    y = frozen.train()(x)
    torch.testing.assert_close(y, F.relu(bn.eval()(x)))
    y.sum().backward()
    assert x.grad is not None
    torch.testing.assert_close(frozen.running_mean, bn.running_mean)


# ----------------------------------------------------------------------------------------------
# normalization batch (group_size)
# ----------------------------------------------------------------------------------------------
def test_grouped_bn_equals_batchnorm_applied_group_by_group():
    torch.manual_seed(13)
    layer = set_affine(GroupedABN(3, group_size=2, activation="identity", dtype=D))
    bn = nn.BatchNorm2d(3).double()
    bn.load_state_dict(layer.state_dict())
    x = randn(6, 3, 3, 3, shift=1.0, requires_grad=True)
    dy = randn(6, 3, 3, 3)
    g = torch.autograd.grad(layer(x), (x, layer.weight), dy)
    y_ref = torch.cat([bn(c) for c in x.split(2)])
    g_ref = torch.autograd.grad(y_ref, (x, bn.weight), dy)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(layer.running_var, bn.running_var)
    assert int(layer.num_batches_tracked) == 3
    layer.eval()
    torch.testing.assert_close(layer(x), bn.eval()(x))


@pytest.mark.parametrize("name", ["brn", "mabn"])
def test_group_size_makes_each_group_one_normalization_batch(name):
    torch.manual_seed(14)
    kw = dict(activation="identity", dtype=D)
    make = (lambda gs: BatchRenorm2d(3, group_size=gs, renorm_start_iters=0, r_max_iters=0, d_max_iters=0, **kw)) \
        if name == "brn" else (lambda gs: MABN2d(3, group_size=gs, buffer_size=2, warmup_iters=0, **kw))
    grouped, single = make(2), make(0)
    x = randn(8, 3, 3, 3, shift=1.0)
    y = grouped(x)
    y_ref = torch.cat([single(c) for c in x.split(2)])
    torch.testing.assert_close(y, y_ref)
    for k, v in single.state_dict().items():
        if k != "num_steps":
            torch.testing.assert_close(grouped.state_dict()[k], v)
    assert int(grouped.num_batches_tracked) == 4 and int(grouped.num_steps) == 1 and int(single.num_steps) == 4


def test_schedules_count_training_steps_not_groups():
    brn_layer = brn(group_size=2, renorm_start_iters=1, r_max_iters=2, d_max_iters=2)
    with torch.no_grad():
        brn_layer.running_mean.fill_(5.0)  # r and d would be far from (1, 0) if the limits were open
    x = randn(8, 3, 3, 3)
    bn_groups = torch.cat([F.batch_norm(c, None, None, brn_layer.weight, brn_layer.bias, True, 0.0, EPS)
                           for c in x.split(2)])
    torch.testing.assert_close(brn_layer(x), bn_groups)  # step 1 of the schedule for all 4 groups
    assert not torch.allclose(brn_layer(x), bn_groups)  # step 2: r_max = 3, d_max = 5
    layer = mabn(group_size=2, buffer_size=2, warmup_iters=2)
    x2 = [c.square().mean(DIMS) for c in x.split(2)]
    out = layer(x)  # step 1 < warmup_iters: every group by its own E[x^2]
    torch.testing.assert_close(out[6:], ch(layer.weight) * x[6:] / ch((x2[3] + EPS).sqrt()) + ch(layer.bias))
    out = layer(x)  # step 2, normalization batches 5..8 > buffer_size: the moving average
    torch.testing.assert_close(out[6:], ch(layer.weight) * x[6:] / ch(((x2[2] + x2[3]) / 2 + EPS).sqrt())
                               + ch(layer.bias))


def test_cbn_group_size_pairs_each_group_with_its_conv_input_rows():
    torch.manual_seed(15)
    conv, grouped = cbn_pair(window=3, group_size=2)
    conv1, single = cbn_pair(window=3)
    conv1.load_state_dict(conv.state_dict())
    for step in range(2):  # the second call compensates the first call's entries (weights changed)
        u = randn(6, 2, 4, 4, shift=1.0 + step)
        y = grouped(conv(u))
        y_ref = torch.cat([single(conv1(c)) for c in u.split(2)])
        torch.testing.assert_close(y, y_ref)
        torch.testing.assert_close(grouped.past_sqmean_grad, single.past_sqmean_grad)
        torch.testing.assert_close(grouped.past_valid, single.past_valid)
        with torch.no_grad():
            delta = 0.05 * torch.randn_like(conv.weight)
            conv.weight.add_(delta)
            conv1.weight.add_(delta)
