"""The native kernel module (kernels/, abnexp.norm.native).

References are independent of the kernels: the PyTorch reference path of abnexp.norm.functional
(operator by operator), float64 statistics, finite differences (gradcheck), and the layers with
the native path switched off. The CUDA sources are compiled (not run) when a toolkit is present;
tests that need a GPU skip without one.
"""
from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from torch import nn
from torch.func import functional_call

try:  # Python >= 3.11; the project supports 3.10, whose tomli has the same API
    import tomllib
except ModuleNotFoundError:
    import tomli as tomllib

from abnexp.norm import ABN, NORM_LAYERS, CheckpointedABN, InPlaceABN, backends, native
from abnexp.norm import functional as Fn
from abnexp.commands import kernels as K

ROOT = Path(__file__).resolve().parents[2]
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]
LAYERS = {name: NORM_LAYERS[name]  # the strategies whose layers run on the native kernels
          for name in ("bn", "checkpoint", "checkpoint_proposed", "inplace_abn", "inplace_abn_ii")}


@pytest.fixture(scope="module", autouse=True)
def built():
    missing = native.missing_tools(False)
    if missing:
        pytest.skip(f"the native kernels cannot be built here (missing {', '.join(missing)})")
    return native.build()


class OpSpy:
    """Stands in for torch.ops.abnexp and counts the operators called through it."""

    def __init__(self):
        self.calls = Counter()

    def __getattr__(self, name):
        self.calls[name] += 1
        return getattr(torch.ops.abnexp, name)


@pytest.fixture
def spy(monkeypatch):
    s = OpSpy()
    monkeypatch.setattr(backends, "ops", lambda x: s)
    return s


# --------------------------------------------------------------------------- operators
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", K.LAYOUTS)
@pytest.mark.parametrize("dtype", list(K.DTYPES))
@pytest.mark.parametrize("group", list(K.CHECKS))
def test_operator_matches_reference(group, dtype, layout, device):
    """Every operator against its reference: float64 to 1e-10, float32 to 1e-5 relative, odd
    sizes (C = 1, N*HW = 2, not multiples of the vector width), mean 1e4 / std 1 inputs."""
    results = K.run_check(torch.ops.abnexp, group, K.DTYPES[dtype], layout, device)
    bad = [r for r in results if not r[1] <= r[2]]
    assert len(results) > 10 and not bad, bad[:5]


def test_statistics_large_mean_float32_against_float64():
    x = K.make_input((16, 8, 32, 32), torch.float32, "channels_last", "cpu", large_mean=True)
    mean, var, count = torch.ops.abnexp.statistics(x)
    var64, mean64 = torch.var_mean(x.double(), dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(mean.double(), mean64, rtol=1e-7, atol=0)
    torch.testing.assert_close(var.double(), var64, rtol=1e-5, atol=0)
    assert count.item() == 16 * 32 * 32


def test_operator_errors_are_clear():
    x = torch.randn(4, 3, 5)
    v = torch.zeros(3)
    with pytest.raises(RuntimeError, match="mean must have shape"):
        torch.ops.abnexp.forward(x, torch.zeros(4), v, v, v, "leaky_relu", 0.1)
    with pytest.raises(RuntimeError, match="unknown activation 'gelu'"):
        torch.ops.abnexp.forward(x, v, v, v, v, "gelu", 0.1)
    with pytest.raises(RuntimeError, match="relu is not invertible"):
        torch.ops.abnexp.inplace_backward_reduce(x, x, v, v, "relu", 0.0, "I")
    with pytest.raises(RuntimeError, match="unknown in-place variant 'III'"):
        torch.ops.abnexp.inplace_backward_reduce(x, x, v, v, "leaky_relu", 0.1, "III")


# --------------------------------------------------------------------------- layers
def make_layer(name, act="leaky_relu", param=0.2, c=4, dtype=torch.float64):
    layer = LAYERS[name](c, activation=act, activation_param=param).to(dtype)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        layer.weight.copy_(torch.rand(c, generator=g) + 0.5)
        layer.bias.copy_(torch.rand(c, generator=g) - 0.5)
        layer.running_mean.copy_(torch.randn(c, generator=g))
        layer.running_var.copy_(torch.rand(c, generator=g) + 0.5)
    return layer


@pytest.mark.parametrize("name", list(LAYERS))
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("act,param", [("leaky_relu", 0.2), ("elu", 0.7)])
def test_layer_gradcheck_through_native_path(name, mode, layout, act, param, spy):
    layer = make_layer(name, act, param).train(mode == "train")
    x = K.make_input((3, 4, 2, 3), torch.float64, layout, "cpu").requires_grad_()
    params = {k: v.detach().clone().requires_grad_() for k, v in layer.named_parameters()}

    def fn(x, *ps):
        return functional_call(layer, dict(zip(params, ps)), (x.clone(),))

    assert torch.autograd.gradcheck(fn, (x, *params.values()), eps=1e-6, atol=1e-5, rtol=1e-4)
    assert spy.calls["statistics"] > 0 if mode == "train" else spy.calls["statistics"] == 0
    assert spy.calls["forward_" if name.startswith("inplace") else "forward"] > 0
    backward = "inplace_backward" if name.startswith("inplace") else "xhat_backward"
    assert spy.calls[backward + "_reduce"] > 0
    assert spy.calls[backward + "_elementwise"] + spy.calls[backward + "_elementwise_"] > 0


def layer_step(layer, x, g, enabled, monkeypatch):
    """Output, dL/dx and parameter gradients of one training step, native path on or off."""
    monkeypatch.setattr(backends, "REQUESTED", "auto" if enabled else "torch")
    layer.zero_grad()
    xa = x.clone().requires_grad_()
    out = layer(xa.clone())
    out.backward(g)
    return [out.detach().float(), xa.grad.float(), layer.weight.grad, layer.bias.grad]


@pytest.mark.parametrize("name", list(LAYERS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_layer_native_equals_reference_path(name, dtype, layout, monkeypatch):
    layer = make_layer(name, c=8, dtype=torch.float32)
    x = K.make_input((4, 8, 5, 7), dtype, layout, "cpu")
    g = K.make_input((4, 8, 5, 7), dtype, layout, "cpu", seed=5)
    ref = layer_step(layer, x, g, False, monkeypatch)
    got = layer_step(layer, x, g, True, monkeypatch)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for a, b, what in zip(got, ref, ["z", "dL/dx", "dL/dweight", "dL/dbias"]):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * b.abs().max().item(), msg=what)


def test_switch_forces_reference_path(monkeypatch):
    monkeypatch.setattr(backends, "REQUESTED", "torch")
    monkeypatch.setattr(backends, "ops", lambda x: pytest.fail("native operator called"))
    x = torch.randn(2, 4, 3, 3)
    assert not backends.enabled(x, "leaky_relu", 0.01)
    for name in LAYERS:
        LAYERS[name](4)(x.clone().requires_grad_().clone()).sum().backward()


def test_negative_slope_abn_stays_on_reference_path():
    x = torch.randn(2, 4, 3, 3)
    assert backends.enabled(x, "leaky_relu", 0.01) and backends.enabled(x, "relu", 0.0)
    assert not backends.enabled(x, "leaky_relu", -0.1) and not backends.enabled(x, "elu", -1.0)
    assert not backends.enabled(x.to(torch.int64), "leaky_relu", 0.01)


# --------------------------------------------------------------------------- dL/dx into dL/dz
def grad_case(case, enabled, monkeypatch, decisions):
    """conv -> InPlaceABN -> conv with different owners of the gradient reaching the layer;
    returns every gradient that must not depend on whether dL/dx was written in place."""
    monkeypatch.setattr(backends, "REQUESTED", "auto" if enabled else "torch")
    torch.manual_seed(0)
    conv1, conv2, other = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1), nn.Conv2d(3, 4, 1)
    layer = make_layer("inplace_abn", c=4, dtype=torch.float32)
    x = torch.randn(2, 3, 5, 5)
    early = other(x)  # created before the layer: its backward runs after the layer's
    out = layer(conv1(x))
    kept = {}
    if case == "conv chain":
        conv2(out).square().sum().backward()
    elif case == "explicit grad_output":
        kept["g"] = torch.randn(out.shape)
        copy = kept["g"].clone()
        out.backward(kept["g"])
        assert torch.equal(kept["g"], copy)
    elif case == "expanded (sum)":
        out.sum().backward()
    elif case == "shared by an add, other branch pending":
        conv2(out + early).square().sum().backward()
    elif case == "shared by an add, other branch done":
        conv2(out + other(x)).square().sum().backward()
    elif case == "kept by a hook":
        out.register_hook(lambda grad: kept.setdefault("hook", grad))
        conv2(out).square().sum().backward()
    return [conv1.weight.grad, layer.weight.grad, other.weight.grad] + list(kept.values())


@pytest.mark.parametrize("case,writes", [("conv chain", True), ("explicit grad_output", False),
                                         ("expanded (sum)", False),
                                         ("shared by an add, other branch pending", False),
                                         ("shared by an add, other branch done", True),
                                         ("kept by a hook", False)])
def test_grad_written_in_place_only_when_exclusive(case, writes, monkeypatch):
    decisions = []
    real = native.grad_writable
    monkeypatch.setattr(native, "grad_writable",
                        lambda dz, refs: decisions.append(real(dz, refs)) or decisions[-1])
    ref = grad_case(case, False, monkeypatch, decisions)
    got = grad_case(case, True, monkeypatch, decisions)
    assert decisions == [writes]
    for a, b in zip(got, ref):  # float32; some of these sums cancel (loss out.sum())
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-5)


# --------------------------------------------------------------------------- compile / export
def small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), InPlaceABN(8), nn.Conv2d(8, 8, 1),
                         ABN(8), nn.Conv2d(8, 8, 1), CheckpointedABN(8, variant="proposed"),
                         nn.Conv2d(8, 4, 1))


def test_torch_compile_without_graph_breaks():
    model, x = small_model(), torch.randn(2, 3, 8, 8)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(x)
    assert explained.graph_break_count == 0, explained.break_reasons
    code = "\n".join(m.code for g in explained.graphs for m in g.modules() if hasattr(m, "code"))
    for op in ("statistics", "forward_", "forward", "inplace_backward_reduce",
               "inplace_backward_elementwise", "xhat_backward_reduce"):
        assert f"torch.ops.abnexp.{op}(" in code, op
    ref = model(x)
    ref.square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    torch._dynamo.reset()
    out = torch.compile(model, backend="aot_eager", fullgraph=True)(x)
    out.square().sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for p, g in zip(model.parameters(), grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("layout", K.LAYOUTS)
def test_linear_operators_pass_opcheck(layout):
    """Schemas, fake implementations (torch.compile / torch.export) and the declared mutation of
    the linear-form operators (MABN, CBN), by torch.library.opcheck."""
    x = K.make_input((3, 4, 2, 5), torch.float32, layout, "cpu")
    dz, z = K.make_input(x.shape, torch.float32, layout, "cpu", seed=2), torch.relu(x)
    a, b, c = torch.rand(4), torch.randn(4), torch.randn(4)
    ops = torch.ops.abnexp
    for op, args in [(ops.linear_backward_reduce, (x, dz, None, "identity", 0.0)),
                     (ops.linear_backward_reduce, (x, dz, z, "relu", 0.0)),
                     (ops.linear_backward_elementwise, (x, dz, z, a, b, c, "relu", 0.0)),
                     (ops.linear_backward_elementwise_, (x, dz.clone(), None, a, b, c, "identity", 0.0))]:
        torch.library.opcheck(op, args)
    with pytest.raises(RuntimeError, match="needs the saved output z"):
        ops.linear_backward_reduce(x, dz, None, "leaky_relu", 0.1)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_torch_export(mode):
    model, x = small_model().train(mode == "train"), torch.randn(2, 3, 8, 8)
    program = torch.export.export(model, (x,))
    assert "torch.ops.abnexp.forward_" in str(program.graph_module.print_readable(print_output=False))
    torch.testing.assert_close(program.module()(x), small_model().train(mode == "train")(x))


# --------------------------------------------------------------------------- build, CLI
@pytest.fixture
def one_case(monkeypatch):
    """The CLI tests check the command, not the kernels again: one input per check."""
    monkeypatch.setattr(K, "cases", lambda layout, quick=False: [((5, 3, 7, 9), False)])


def test_cli_build_and_check(capsys, one_case):
    code, out, _ = run_cli(["kernels", "build"], capsys)
    assert code == 0 and "built abnexp_kernels" in out and "library:" in out
    code, out, _ = run_cli(["kernels", "check", "--device", "cpu"], capsys)
    assert code == 0 and "all operators match" in out and "FAIL" not in out


def test_cli_check_exits_nonzero_on_mismatch(monkeypatch, capsys, one_case):
    real = Fn.batch_statistics
    monkeypatch.setattr(Fn, "batch_statistics", lambda x: (real(x)[0] + 1e-3, real(x)[1]))
    code, out, _ = run_cli(["kernels", "check", "--device", "cpu"], capsys)
    assert code == 1 and "FAIL native cpu  statistics" in out and "mismatch:" in out


@pytest.mark.slow  # compiles
def test_without_compiler_one_warning_and_reference_path():
    script = (
        "import warnings, torch\n"
        "from abnexp.norm import InPlaceABN, native\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    for _ in range(3):\n"
        "        InPlaceABN(3)(torch.randn(4, 3, 5, 5).requires_grad_().clone()).sum().backward()\n"
        "msgs = [str(w.message) for w in caught if 'abnexp' in str(w.message)]\n"
        "print(len(msgs), native._BUILT is None)\n"
        "print(msgs[0])\n")
    env = dict(os.environ, CXX="abnexp-no-such-compiler", ABNEXP_NATIVE="1")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    count, message = done.stdout.splitlines()[:2]
    assert count == "1 True"
    assert "reference path" in message and "abnexp-no-such-compiler" in message
    assert "abnexp kernels build" in message and "ABNEXP_NATIVE=0" in message


def test_sources_ship_with_the_package():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "abnexp.kernels" in config["packages"]
    assert config["package-dir"]["abnexp.kernels"] == "kernels"
    patterns = config["package-data"]["abnexp.kernels"]
    for source in native.sources(cuda=True) + [native.kernels_dir() / h for h in
                                               ("abn.h", "abn_math.h", "abn_cpu_loops.h", "abn_cuda_ops.h")]:
        assert source.is_file()
        assert any(source.match(p) for p in patterns), source.name


@pytest.mark.skipif(native.nvcc() is None,
                    reason="no CUDA toolkit at $CUDA_HOME or /usr/local/cuda: the compile-only check of "
                           "kernels/abn_cuda.cu needs nvcc")
@pytest.mark.slow  # compiles
def test_cuda_sources_compile(tmp_path):
    """nvcc -c of the CUDA translation unit for sm_80 and sm_90 (no GPU needed)."""
    cmd = K.compile_cuda_object(tmp_path / "abn_cuda.o", archs=("8.0", "9.0"))
    assert (tmp_path / "abn_cuda.o").stat().st_size > 0
    assert "-gencode=arch=compute_90,code=sm_90" in cmd and "-gencode=arch=compute_80,code=sm_80" in cmd


@CUDA
@pytest.mark.parametrize("name", list(LAYERS))
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_layer_on_gpu_matches_cpu(name, layout, monkeypatch):
    layer = make_layer(name, c=8, dtype=torch.float32)
    x = K.make_input((4, 8, 5, 7), torch.float32, layout, "cpu")
    g = K.make_input((4, 8, 5, 7), torch.float32, layout, "cpu", seed=5)
    ref = layer_step(layer, x, g, True, monkeypatch)
    got = layer_step(layer.cuda(), x.cuda(), g.cuda(), True, monkeypatch)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-4, atol=1e-4 * b.abs().max().item())
