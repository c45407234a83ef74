"""Empty batches, zero-size spatial dims and one value per channel, for all 13 norms (issue 25).

The reference is ``torch.nn.BatchNorm2d`` run on the same sequence: for an input without values
it returns an empty output of the input's shape, leaves its running statistics untouched (its
``num_batches_tracked`` counts the call, which the BatchNorm-like layers follow; MABN, CBN and BRN
leave their schedule counters untouched too), gives zero gradients to weight and bias, and raises
``ValueError`` for one value per channel in training. Every layer runs on each kernel backend
present (the PyTorch path always, the native C++ kernels when they build here, the Triton
kernels under ``TRITON_INTERPRET=1`` in a subprocess when Triton and abnexp.norm.triton_backend
are installed); the native operators themselves are checked on empty inputs too (a zero-size
spatial dim used to kill the process with SIGFPE).
"""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from abnexp.norm import NORMS, backends, build_norm_act, native
from abnexp.norm.sync import InPlaceABNSync, SyncABN

C = 32  # GroupNorm's 32 groups
BN_LIKE = ("bn", "checkpoint", "checkpoint_proposed", "inplace_abn", "inplace_abn_ii", "syncbn",
           "inplace_abn_sync", "inplace_abn_sync_ii")
"""Layers that count an empty call in num_batches_tracked as BatchNorm2d does."""
PER_SAMPLE = ("gn", "frozen_bn")
"""No batch statistics (and no counters)."""
EMPTY_SHAPES = [(0, 3, 5, 5), (2, C, 0, 5)]
"""N = 0 (a conv input: the norm gets the conv's empty output); a zero-size spatial dim (the norm's
input itself: no convolution takes it)."""
TRITON_SKIP = ("needs Triton and abnexp.norm.triton_backend (the Triton backend) installed"
               if importlib.util.find_spec("triton") is None
               or importlib.util.find_spec("abnexp.norm.triton_backend") is None else None)
INTERPRETED = TRITON_SKIP is None and os.environ.get("TRITON_INTERPRET") == "1"
"""Set in the subprocess of test_triton_backend_takes_empty_inputs only."""
KERNEL_BACKENDS = (["torch"] + (["native"] if native.probe("cpu") is None else [])
                   + (["triton"] if INTERPRETED else []))
CPU_OPS_SKIP = "the native C++ kernels do not build here"


def test_thirteen_norms():
    assert set(BN_LIKE) | {"mabn", "cbn", "brn"} | set(PER_SAMPLE) == set(NORMS) and len(NORMS) == 13


def build(name, kernel=3, seed=0):
    """(conv, norm): the norm paired with the conv feeding it, as models build them."""
    torch.manual_seed(seed)
    norm_act = build_norm_act(name, **({"warmup_iters": 1, "buffer_size": 2} if name == "mabn" else {}))
    conv = norm_act.conv(3, C, kernel, padding=kernel // 2, bias=False)
    norm = norm_act(C, conv=conv)
    with torch.no_grad():
        for p in norm.parameters():
            p.uniform_(0.5, 1.5)
    return conv, norm


def step(conv, norm, x):
    """One training step (forward, backward of the sum, SGD): the norm of conv(x), or of a copy of
    x itself when x has the norm's channels."""
    params = list(conv.parameters()) + list(norm.parameters())
    opt = torch.optim.SGD(params, lr=0.1)
    opt.zero_grad()
    y = norm(conv(x) if x.shape[1] == conv.in_channels else x.requires_grad_().clone())
    y.sum().backward()
    opt.step()
    return y


def state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.fixture(params=KERNEL_BACKENDS)
def kernels(request, monkeypatch):
    monkeypatch.setattr(backends, "REQUESTED", request.param)
    return request.param


@pytest.mark.filterwarnings("ignore:.*torch.distributed is not initialized")
@pytest.mark.parametrize("shape", EMPTY_SHAPES, ids=["N0", "H0"])
@pytest.mark.parametrize("name", list(NORMS))
def test_empty_batch_as_batchnorm2d(name, shape, kernels):
    conv, norm = build(name)
    bn = nn.BatchNorm2d(C)
    g = torch.Generator().manual_seed(1)
    for _ in range(2):  # ordinary steps first: non-trivial statistics, windows and counters
        x = torch.randn(2, 3, 5, 5, generator=g)
        step(conv, norm, x)
        step(nn.Conv2d(3, C, 3, padding=1), bn, x)
    before, bn_before, params = state(norm), state(bn), [p.detach().clone() for p in norm.parameters()]
    x = torch.randn(*shape, generator=g)
    y = step(conv, norm, x)
    ref = step(nn.Conv2d(3, C, 3, padding=1), bn, x)
    assert y.shape == ref.shape == (shape[0], C) + shape[2:]
    assert y.dtype == ref.dtype
    bn_delta = int(bn.num_batches_tracked - bn_before["num_batches_tracked"])
    assert bn_delta == 1 and torch.equal(bn.running_mean, bn_before["running_mean"])
    after = state(norm)
    for key, value in before.items():
        expected = value + bn_delta if (name in BN_LIKE and key == "num_batches_tracked") else value
        assert torch.equal(after[key], expected), f"{name}: {key} changed by an empty batch"
    for p, p0, ref_p in zip(norm.parameters(), params, bn.parameters()):
        assert torch.equal(p.grad, torch.zeros_like(p)) and torch.equal(ref_p.grad, torch.zeros_like(ref_p))
        assert torch.equal(p.detach(), p0)  # zero gradient, no momentum left: unchanged
    norm.eval()
    with torch.no_grad():
        assert norm(conv(x) if x.shape[1] == 3 else x.clone()).shape == y.shape
    assert all(torch.equal(v, after[k]) for k, v in state(norm).items())


@pytest.mark.filterwarnings("ignore:.*torch.distributed is not initialized")
@pytest.mark.parametrize("name", list(NORMS))
def test_one_value_per_channel_raises_as_batchnorm2d(name, kernels):
    x = torch.randn(1, 3, 1, 1)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        nn.BatchNorm2d(C)(torch.randn(1, C, 1, 1))
    conv, norm = build(name, kernel=1)
    if name == "frozen_bn":  # no batch statistics: as torchvision's FrozenBatchNorm2d, no error
        assert norm(conv(x)).shape == (1, C, 1, 1)
        return
    if name == "gn":  # nn.GroupNorm refuses one value per group (N * C/G * H * W == 1), in eval too
        with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
            nn.GroupNorm(C, C)(torch.randn(1, C, 1, 1))
        norm.eval()
    message = re.escape(f"{type(norm).__name__}({C}): Expected more than 1 value per channel when training, "
                        f"got input size {torch.Size([1, C, 1, 1])}")
    with pytest.raises(ValueError, match=message):
        norm(conv(x))
    if name == "gn":
        return
    norm.eval()  # running statistics: fine, as BatchNorm2d
    assert norm(conv(x)).shape == (1, C, 1, 1)


# --- the synchronized layers over a process group ---------------------------------------------------
@pytest.fixture(scope="module")
def one_rank_group(tmp_path_factory):
    """A one-rank gloo group (file store), destroyed at the end unless one existed before."""
    if dist.is_initialized():
        yield dist.group.WORLD
        return
    dist.init_process_group("gloo", init_method=f"file://{tmp_path_factory.mktemp('dist') / 'store'}",
                            rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


@pytest.fixture
def peer(monkeypatch, one_rank_group):
    """Make the synchronized layers run their group path as rank 0 of two, the other rank (not
    simulated beyond its statistics) holding ``peer.batch``: all_gather returns this rank's part and
    the peer's statistics; every collective this rank joins is recorded with what it sent."""
    class Peer:
        batch = torch.randn(3, C, 4, 4, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
        sent: list = []

    def all_gather(parts, local, group=None):
        Peer.sent.append(("all_gather", local.clone()))
        var, mean = torch.var_mean(Peer.batch, dim=(0, 2, 3), correction=0)
        parts[0].copy_(local)
        parts[1].copy_(torch.cat([mean, var, torch.tensor([Peer.batch[:, 0].numel()], dtype=torch.float64)]))

    def all_reduce(tensor, group=None, op=None):
        Peer.sent.append(("all_reduce", tensor.clone()))

    for cls in (SyncABN, InPlaceABNSync):
        monkeypatch.setattr(cls, "sync_group", lambda self: one_rank_group if self.training else None)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "all_gather", all_gather)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    return Peer


@pytest.mark.parametrize("shape", [(0, C, 4, 4), (2, C, 0, 4)], ids=["N0", "H0"])
@pytest.mark.parametrize("name", ["syncbn", "inplace_abn_sync", "inplace_abn_sync_ii"])
def test_sync_empty_rank_joins_and_contributes_nothing(name, shape, peer, kernels):
    """The running statistics become BatchNorm2d's on the other rank's batch alone; this rank
    joins the forward all_gather (count 0) and the backward all_reduce (zero sums)."""
    norm = NORMS[name].layer(C).double()
    bn = nn.BatchNorm2d(C).double()
    bn(peer.batch)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    y = norm(x.clone())
    y.sum().backward()
    assert y.shape == shape
    assert [kind for kind, _ in peer.sent] == ["all_gather", "all_reduce"]
    assert peer.sent[0][1][-1] == 0 and not peer.sent[1][1].any()
    torch.testing.assert_close(norm.running_mean, bn.running_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(norm.running_var, bn.running_var, rtol=1e-12, atol=1e-12)
    assert not norm.weight.grad.any() and not norm.bias.grad.any() and x.grad.shape == shape


@pytest.mark.parametrize("name", ["syncbn", "inplace_abn_sync", "inplace_abn_sync_ii"])
def test_sync_all_ranks_empty_leaves_statistics(name, one_rank_group, monkeypatch, kernels):
    for cls in (SyncABN, InPlaceABNSync):
        monkeypatch.setattr(cls, "sync_group", lambda self: one_rank_group if self.training else None)
    norm = NORMS[name].layer(C)
    before = state(norm)
    y = norm(torch.randn(0, C, 4, 4, requires_grad=True).clone())
    y.sum().backward()
    assert torch.equal(norm.running_mean, before["running_mean"])
    assert torch.equal(norm.running_var, before["running_var"])
    assert not norm.weight.grad.any()


# --- the operators themselves ------------------------------------------------------------------------
def check_empty_operators(ops) -> None:
    """Every operator of a kernel backend on inputs without values, both layouts: statistics are
    NaN with count 0 (torch.var_mean of an empty reduction), per-channel sums 0 (torch.sum),
    full-size results empty with the input's shape and strides."""
    c = 3
    vec = {name: torch.rand(c) + 0.5 for name in ("mean", "invstd", "gamma", "beta", "s1", "s2", "a", "b", "c")}
    for shape in [(0, c, 4, 4), (2, c, 0, 4), (2, c, 4, 0), (0, c), (3, c, 0)]:
        layouts = [torch.contiguous_format] + ([torch.channels_last] if len(shape) == 4 else [])
        for layout in layouts:
            x = torch.randn(shape).contiguous(memory_format=layout)
            dz = torch.randn(shape).contiguous(memory_format=layout)
            with warnings.catch_warnings():  # "degrees of freedom is <= 0"
                warnings.simplefilter("ignore")
                var, mean = torch.var_mean(x, dim=[0] + list(range(2, len(shape))), correction=0)
            got = ops.statistics(x)
            torch.testing.assert_close(got[:2], (mean, var), equal_nan=True)
            assert got[2] == 0
            z = ops.forward(x, vec["mean"], vec["invstd"], vec["gamma"], vec["beta"], "leaky_relu", 0.1)
            assert z.shape == x.shape and z.stride() == x.stride()
            ops.forward_(x, vec["mean"], vec["invstd"], vec["gamma"], vec["beta"], "leaky_relu", 0.1)
            zero = torch.zeros(c)
            for sums in (ops.inplace_backward_reduce(x, dz, vec["gamma"], vec["beta"], "leaky_relu", 0.1, "I"),
                         ops.xhat_backward_reduce(x, dz, x, vec["mean"], vec["invstd"], vec["gamma"], vec["beta"],
                                                  "leaky_relu", 0.1),
                         ops.linear_backward_reduce(x, dz, x, "leaky_relu", 0.1)):
                assert all(torch.equal(s, zero) for s in sums)
            for count in (0, 5):  # this rank's count (0), or a process group's
                dx = ops.inplace_backward_elementwise(x, dz, vec["invstd"], vec["gamma"], vec["beta"], vec["s1"],
                                                      vec["s2"], count, True, "leaky_relu", 0.1, "II")
                assert dx.shape == x.shape
                ops.inplace_backward_elementwise_(x, dz, vec["invstd"], vec["gamma"], vec["beta"], vec["s1"],
                                                  vec["s2"], count, True, "leaky_relu", 0.1, "I")
                dx = ops.xhat_backward_elementwise(x, dz, None, vec["mean"], vec["invstd"], vec["gamma"],
                                                   vec["beta"], vec["s1"], vec["s2"], count, True, "elu", 1.0)
                assert dx.shape == x.shape
                ops.xhat_backward_elementwise_(x, dz, None, vec["mean"], vec["invstd"], vec["gamma"], vec["beta"],
                                               vec["s1"], vec["s2"], count, True, "elu", 1.0)
            dx = ops.linear_backward_elementwise(x, dz, None, vec["a"], vec["b"], vec["c"], "identity", 0.0)
            assert dx.shape == x.shape and dx.stride() == x.stride()
            ops.linear_backward_elementwise_(x, dz, None, vec["a"], vec["b"], vec["c"], "identity", 0.0)


@pytest.mark.skipif(native.probe("cpu") is not None, reason=CPU_OPS_SKIP)
def test_native_operators_take_empty_inputs():
    check_empty_operators(torch.ops.abnexp)


@pytest.mark.slow
@pytest.mark.skipif(TRITON_SKIP is not None, reason=TRITON_SKIP or "")
def test_triton_backend_takes_empty_inputs():
    """The Triton backend under its interpreter (CPU tensors; a fresh process, since
    TRITON_INTERPRET must be set before Triton is imported): the operator checks and every layer's
    empty batch, in a subprocess running this module's layer tests on the triton backend."""
    here = Path(__file__).parent
    code = ("import sys, torch; sys.path.insert(0, %r); import test_edges; "
            "from abnexp.norm import triton_backend; assert triton_backend.probe('cpu') is None, "
            "triton_backend.probe('cpu'); test_edges.check_empty_operators(torch.ops.abnexp_triton)" % str(here))
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                           str(here / "test_edges.py"), "-k", "triton and not takes_empty"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:]
