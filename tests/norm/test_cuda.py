"""The normalization layers on a CUDA GPU, against torch's own layers (independent references).

* every strategy (bn, checkpoint, checkpoint_proposed, inplace_abn, inplace_abn_ii) on a GPU
  kernel backend against ``torch.nn.BatchNorm2d`` + ``F.leaky_relu`` (cuDNN) in float32,
  float16 and bfloat16, contiguous and channels_last: outputs, dL/dx, dL/dweight, dL/dbias and
  running statistics over two training steps and one eval step;
* ``torch.compile(fullgraph=True)`` (inductor) of a model of the layers, without graph breaks;
* the synchronized layers through NCCL collectives, in one process (a process group of one).

The backend is ``ABNEXP_KERNELS`` when it names one (native: kernels/abn_cuda.cu; triton:
kernels/abn_triton.py; scripts/gpu_check.sh runs this file once with each), else the native
module. Half-precision inputs are compared with the reference on the same values in float32, to
a few units of the dtype's rounding. Every test skips without a GPU.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from abnexp.norm import ABN, NORM_LAYERS, CheckpointedABN, InPlaceABN, backends, native
from conftest import STRATEGIES

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SLOPE = 0.01
DTYPES = {"float32": (torch.float32, 1e-4), "float16": (torch.float16, 4e-3), "bfloat16": (torch.bfloat16, 3e-2)}
"""dtype -> (torch dtype, relative tolerance: float32 accumulation, else ~4 units of rounding)."""
SHAPES = [(5, 24, 13, 11), (32, 64, 28, 28)]  # odd sizes; several blocks per channel
TESTS = Path(__file__).resolve().parents[1]
BACKEND = os.environ["ABNEXP_KERNELS"] if os.environ.get("ABNEXP_KERNELS") in ("native", "triton") else "native"
"""The GPU kernel backend under test: ABNEXP_KERNELS when it names one, else native."""


@pytest.fixture(scope="module", autouse=True)
def gpu_backend():
    """The layers run BACKEND for CUDA tensors (for native: the module built with its CUDA kernels);
    a GPU machine where it cannot serve them fails here."""
    if BACKEND == "native":
        assert native.build(cuda=True).cuda
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(backends, "REQUESTED", BACKEND)
        assert backends.choose("cuda") == BACKEND
        yield BACKEND


def make_pair(name: str, c: int, seed: int = 0):
    """(layer under test, reference nn.BatchNorm2d) on the GPU with equal random parameters.
    In-place layers scale by |weight| + eps, so their reference gets weight + eps."""
    g = torch.Generator().manual_seed(seed)
    layer = NORM_LAYERS[name](c, activation="leaky_relu", activation_param=SLOPE)
    bn = nn.BatchNorm2d(c)
    w, b = torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g) * 0.3
    with torch.no_grad():
        layer.weight.copy_(w)
        layer.bias.copy_(b)
        bn.weight.copy_(w + (layer.eps if layer.inplace else 0.0))
        bn.bias.copy_(b)
    return layer.cuda(), bn.cuda()


def make_input(shape, dtype, layout, seed):
    """Per-channel mean in [-3, 3] and std in [0.5, 3], in ``dtype`` and ``layout``, on the GPU."""
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    mean = (torch.rand(c, generator=g) * 6 - 3).view(1, c, 1, 1)
    std = (torch.rand(c, generator=g) * 2.5 + 0.5).view(1, c, 1, 1)
    x = (torch.randn(shape, generator=g) * std + mean).to(dtype)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    return x.cuda().contiguous(memory_format=fmt)


def away_from_kink(g, x, bn):
    """``g`` with zeros where BN's output y is within 1e-3 * max|y| of 0: there leaky_relu's
    derivative jumps from 1 to the slope, so float32 rounding (either side's) could pick either
    and flip one element's gradient; a zero upstream gradient makes the choice irrelevant."""
    with torch.no_grad():
        rm, rv = bn.running_mean.double().clone(), bn.running_var.double().clone()
        y = F.batch_norm(x.double(), rm, rv, bn.weight.double(), bn.bias.double(), bn.training, 0.0, bn.eps)
        return g.masked_fill(y.abs() < 1e-3 * y.abs().max(), 0)


def close(got, ref, tol, scale, what):
    torch.testing.assert_close(got.float(), ref.float(), rtol=tol, atol=tol * scale,
                               msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("name", STRATEGIES)
def test_parity_with_torch_batchnorm2d_on_cuda(name, dtype, layout, shape):
    dt, tol = DTYPES[dtype]
    layer, bn = make_pair(name, shape[1])
    for step in range(3):  # two training steps (running statistics accumulate), then eval
        if step == 2:
            layer.eval(), bn.eval()
        x = make_input(shape, dt, layout, 10 + step)
        g = away_from_kink(make_input(shape, dt, layout, 20 + step), x, bn)
        xa = x.clone().requires_grad_()
        xb = x.float().requires_grad_()
        out = layer(xa.clone() if layer.inplace else xa)
        ref = F.leaky_relu(bn(xb), SLOPE)
        out.backward(g)
        ref.backward(g.float())
        assert out.dtype == dt and xa.grad.dtype == dt
        assert out.is_contiguous(memory_format=torch.channels_last if layout == "channels_last"
                                 else torch.contiguous_format)
        what = f"{name} {dtype} {layout} step {step}"
        close(out, ref, tol, ref.abs().max().item(), f"{what} output")
        # dL/dx is a difference of terms of size |g| * gamma / sigma: the tolerance is relative to it
        sigma = xb.detach().var(dim=(0, 2, 3), unbiased=False).add(bn.eps).sqrt().min().item()
        close(xa.grad, xb.grad, tol, g.abs().max().item() * bn.weight.abs().max().item() / sigma, f"{what} dL/dx")
        close(layer.weight.grad, bn.weight.grad, 2 * tol, bn.weight.grad.abs().max().item(), f"{what} dL/dweight")
        close(layer.bias.grad, bn.bias.grad, 2 * tol, bn.bias.grad.abs().max().item(), f"{what} dL/dbias")
        close(layer.running_mean, bn.running_mean, 1e-4, bn.running_mean.abs().max().item(), f"{what} running_mean")
        close(layer.running_var, bn.running_var, 1e-4, bn.running_var.abs().max().item(), f"{what} running_var")
        layer.zero_grad(), bn.zero_grad()


def small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), InPlaceABN(8), nn.Conv2d(8, 8, 1),
                         ABN(8), nn.Conv2d(8, 8, 1), CheckpointedABN(8, variant="proposed"),
                         nn.Conv2d(8, 4, 1))


def test_torch_compile_on_cuda_without_graph_breaks(monkeypatch):
    """dynamo sees one graph holding the native operators; inductor's compiled forward and
    backward equal eager mode's (TF32 off for both, so that only the compilation differs)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    model, x = small_model().cuda(), torch.randn(4, 3, 16, 16, device="cuda")
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(x)
    assert explained.graph_break_count == 0, explained.break_reasons
    code = "\n".join(m.code for g in explained.graphs for m in g.modules() if hasattr(m, "code"))
    namespace = backends.BACKENDS[BACKEND].namespace
    for op in ("statistics", "forward_", "forward"):
        assert f"torch.ops.{namespace}.{op}(" in code, op
    ref = model(x)
    ref.square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    torch._dynamo.reset()
    out = torch.compile(model, fullgraph=True)(x)  # the default backend: inductor
    out.square().sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    # some of these gradients are pure cancellation (a conv bias before a norm: ~0), so the
    # absolute tolerance is relative to the largest gradient of the model
    scale = max(g.abs().max().item() for g in grads)
    for p, g in zip(model.parameters(), grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-3, atol=1e-5 * scale)


# ------------------------------------------------------------------------------ NCCL, one process
SYNC = {"syncbn": False, "inplace_abn_sync": True, "inplace_abn_sync_ii": True}  # name -> in place


def nccl_worker(path: str) -> None:
    """Run in a subprocess by the test below: a process group of one rank over NCCL; each
    synchronized layer is forced onto its synchronized path (all_gather of the statistics,
    all_reduce of the gradient sums, on CUDA tensors) and compared with nn.BatchNorm2d +
    leaky_relu on the same batch. Writes {case: {quantity: relative error}} and the number
    of collectives called as JSON to ``path``."""
    import torch.distributed as dist

    torch.cuda.set_device(0)
    dist.init_process_group("nccl", store=dist.FileStore(path + ".store", 1), rank=0, world_size=1)
    calls = {"all_gather": 0, "all_reduce": 0}
    real = {k: getattr(dist, k) for k in calls}

    def counting(name):
        def call(*args, **kwargs):
            calls[name] += 1
            return real[name](*args, **kwargs)
        return call

    results = {}
    try:
        for k in calls:
            setattr(dist, k, counting(k))
        for name in SYNC:
            for layout in ("contiguous", "channels_last"):
                layer, bn = make_pair(name, 16, seed=3)
                layer.sync_group = lambda: dist.group.WORLD  # the synchronized path with one rank
                x = make_input((6, 16, 9, 7), torch.float32, layout, 4)
                g = away_from_kink(make_input((6, 16, 9, 7), torch.float32, layout, 5), x, bn)
                xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
                out = layer(xa.clone() if SYNC[name] else xa)
                ref = F.leaky_relu(bn(xb), SLOPE)
                out.backward(g)
                ref.backward(g)
                pairs = {"out": (out, ref), "dx": (xa.grad, xb.grad), "dw": (layer.weight.grad, bn.weight.grad),
                         "db": (layer.bias.grad, bn.bias.grad), "rm": (layer.running_mean, bn.running_mean),
                         "rv": (layer.running_var, bn.running_var)}
                results[f"{name}/{layout}"] = {k: ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()
                                               for k, (a, b) in pairs.items()}
        torch.cuda.synchronize()
    finally:
        for k in calls:
            setattr(dist, k, real[k])
        dist.destroy_process_group()
    Path(path).write_text(json.dumps({"errors": results, "calls": calls, "backend": "nccl"}))


def test_sync_layers_over_nccl_in_one_process(tmp_path):
    out = tmp_path / "nccl.json"
    code = f"import test_cuda; test_cuda.nccl_worker({str(out)!r})"
    env = dict(os.environ, ABNEXP_KERNELS=BACKEND,
               PYTHONPATH=os.pathsep.join([str(TESTS / "norm"), str(TESTS), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result["errors"]) == {f"{n}/{layout}" for n in SYNC for layout in ("contiguous", "channels_last")}
    assert result["calls"]["all_gather"] >= 6 and result["calls"]["all_reduce"] >= 6, result["calls"]
    for case, errors in result["errors"].items():
        assert max(errors.values()) <= 1e-4, (case, errors)
