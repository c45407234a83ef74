"""``abnexp kernels build`` / ``abnexp kernels check``: build a kernel backend, compare it with
the PyTorch reference path.

``build --backend native`` compiles (or reuses the cached build of) the C++/CUDA module and reports
what was built; ``build --backend triton --arch sm_80,sm_90,gfx942`` compiles every Triton kernel
ahead of time for those targets (no GPU needed) and prints each kernel's registers, spills and
shared memory, exiting 1 if one fails. ``check --backend B`` runs every operator of backend B
(:mod:`abnexp.norm.backends`; ``auto``: the one chosen per device) against its reference in
:mod:`abnexp.norm.functional`
on small random inputs -- float64 / float32 / float16 / bfloat16, contiguous and channels-last,
odd sizes (C = 1, N*HW = 2, sizes that are not a multiple of the vector width) and inputs of
mean 1e4, std 1 -- prints the largest relative error per operator and exits with status 1 on a
mismatch. Errors are relative to the size of the reference values (for dL/dx, to the size of
the terms that cancel in it, |dL/dz| * gamma * invstd); tolerances: 1e-10 for float64, 1e-5
for float32, and for float16 / bfloat16 outputs one unit of their precision (sums and
statistics are float32 and use 1e-5). :func:`compile_cuda_object` compiles the CUDA sources
without a GPU (the CI check that a broken .cu never lands).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import Callable

import torch

from abnexp.norm import functional as Fn
from abnexp.norm import backends, native
from abnexp.norm.activations import get_activation

DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16,
          "bfloat16": torch.bfloat16}
LAYOUTS = ("contiguous", "channels_last")
SHAPES = ((5, 3, 7, 9), (2, 1), (1, 7, 1, 2), (3, 1, 13, 11), (2, 5), (4, 6, 3, 5, 2),
          (4, 19, 17))
"""(N, C, *) inputs; channels-last applies to the 3-D to 5-D ones."""
ACTIVATIONS = (("leaky_relu", 0.1), ("elu", 1.0), ("identity", 0.0), ("relu", 0.0))


def tolerance(dtype: torch.dtype, full_size: bool) -> float:
    """Relative tolerance of a result: compute-dtype tolerance, or the output dtype's precision
    for full-size half outputs."""
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    return max(tol, torch.finfo(dtype).eps) if full_size else tol


def relative_error(a: torch.Tensor, b: torch.Tensor, scale: float | None = None) -> float:
    a, b = a.double(), b.double()
    ref = b.abs().max().item() if scale is None else scale
    return (a - b).abs().max().item() / max(ref, 1e-30)


def make_input(shape, dtype, layout, device, large_mean=False, seed=0) -> torch.Tensor:
    """Random (N, C, *) input in ``layout``: N(0.5, 2) or, with ``large_mean``, N(1e4, 1)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    x = x + 1e4 if large_mean else x * 2 + 0.5
    x = x.to(dtype)
    if layout == "channels_last":
        x = x.movedim(1, -1).contiguous().movedim(-1, 1)
    return x.to(device)


def _params(x: torch.Tensor, seed: int = 1):
    """(mean, invstd, gamma, beta) of x: batch statistics (reference) and random gamma > 0."""
    g = torch.Generator().manual_seed(seed)
    c, cdt = x.shape[1], Fn.compute_dtype(x.dtype)
    mean, var = Fn.batch_statistics(x)
    gamma = (torch.rand(c, generator=g, dtype=torch.float64) + 0.5).to(cdt).to(x.device)
    beta = (torch.randn(c, generator=g, dtype=torch.float64) * 0.3).to(cdt).to(x.device)
    return mean, Fn.inverse_std(var, 1e-5), gamma, beta


def _grad_scale(dz, invstd, gamma) -> float:
    return dz.abs().max().item() * (gamma * invstd).abs().max().item()


# each check returns [(what, error, tolerance)] for one input, from the operators of ``ops``
def check_statistics(ops, x: torch.Tensor):
    mean, var, count = ops.statistics(x)
    ref_mean, ref_var = Fn.batch_statistics(x)
    truth_var, truth_mean = torch.var_mean(x.double(), dim=Fn.reduce_dims(x), correction=0)
    tol = tolerance(x.dtype, False)
    out = [("mean", relative_error(mean, ref_mean), tol), ("var", relative_error(var, ref_var), tol),
           ("var vs float64", relative_error(var, truth_var), tol),
           ("count", abs(count.item() - Fn.values_per_channel(x)), 0.0)]
    return out + [("mean vs float64", relative_error(mean, truth_mean), tol)]


def check_merge_statistics(ops, x: torch.Tensor):
    """Workers with unequal counts (x split along N) and an empty worker (NaN statistics):
    against the reference merge, and in float64 against the statistics of the whole batch."""
    parts = [x[:1], x[1:], x[:0]] if x.shape[0] > 1 else [x, x[:0]]
    out = []
    for dtype in (Fn.compute_dtype(x.dtype), torch.float64):
        nan = torch.full((x.shape[1],), float("nan"), dtype=dtype, device=x.device)
        stats = [Fn.batch_statistics(p.to(dtype)) if p.shape[0] else (nan, nan) for p in parts]
        args = (torch.stack([s[0] for s in stats]), torch.stack([s[1] for s in stats]),
                torch.tensor([float(Fn.values_per_channel(p)) for p in parts], dtype=dtype,
                             device=x.device))
        mean, var, total = ops.merge_statistics(*args)
        ref_mean, ref_var, ref_total = (Fn.merge_statistics(*args) if dtype != torch.float64
                                        else (*Fn.batch_statistics(x.double()), total))
        tol, tag = tolerance(dtype, False), "reference" if dtype != torch.float64 else "float64 batch"
        out += [(f"mean vs {tag}", relative_error(mean, ref_mean), tol),
                (f"var vs {tag}", relative_error(var, ref_var), tol),
                ("count", abs(total.item() - Fn.values_per_channel(x)), 0.0)]
    return out


def check_forward(ops, x: torch.Tensor):
    mean, invstd, gamma, beta = _params(x)
    out, tol = [], tolerance(x.dtype, True)
    for act, p in ACTIVATIONS:
        ref = Fn.forward(x, mean, invstd, gamma, beta, act, p)
        z = ops.forward(x, mean, invstd, gamma, beta, act, p)
        inplace = x.clone()
        ops.forward_(inplace, mean, invstd, gamma, beta, act, p)
        out += [(f"{act}", relative_error(z, ref), tol),
                (f"{act} in place", relative_error(inplace, ref), tol),
                (f"{act} strides", float(z.stride() != x.stride()), 0.0)]
    return out


def check_inplace_backward(ops, x: torch.Tensor):
    mean, invstd, gamma, beta = _params(x)
    dz = make_input(x.shape, x.dtype, "contiguous", x.device, seed=2)
    m, out = Fn.values_per_channel(x), []
    for act, p in ACTIVATIONS[:3]:
        z = Fn.forward(x, mean, invstd, gamma, beta, act, p)
        for variant in ("I", "II"):
            dy, t, s1, s2 = Fn.inplace_backward_reduce(z, dz, gamma, beta, act, p, variant)
            n1, n2 = ops.inplace_backward_reduce(z, dz, gamma, beta, act, p, variant)
            scale = dy.abs().sum(Fn.reduce_dims(dy)).max().item()
            out += [(f"{act} {variant} sum_dy", relative_error(n1, s1, scale), tolerance(x.dtype, False)),
                    (f"{act} {variant} sum_dy_t", relative_error(n2, s2, scale * t.abs().max().item()),
                     tolerance(x.dtype, False))]
            for batch_stats in (True, False):
                grad = Fn.grad_input_xhat if variant == "I" else Fn.grad_input_y
                extra = (beta,) if variant == "II" else ()
                ref = grad(dy.clone(), t, invstd, gamma, *extra, s1, s2, m, batch_stats, x.dtype)
                args = (invstd, gamma, beta, s1, s2, m, batch_stats, act, p, variant)
                dx = ops.inplace_backward_elementwise(z, dz, *args)
                into = dz.clone()
                ops.inplace_backward_elementwise_(z, into, *args)
                scale_dx = _grad_scale(dz, invstd, gamma)
                out += [(f"{act} {variant} dx (batch stats {batch_stats})",
                         relative_error(dx, ref, scale_dx), tolerance(x.dtype, True)),
                        (f"{act} {variant} dx into dz", relative_error(into, ref, scale_dx),
                         tolerance(x.dtype, True))]
    return out


def check_xhat_backward(ops, x: torch.Tensor):
    """The three xhat forms: x with mean (checkpoint baseline), xhat (proposed), x and z (ABN)."""
    mean, invstd, gamma, beta = _params(x)
    dz = make_input(x.shape, x.dtype, "contiguous", x.device, seed=3)
    m, cdt, out = Fn.values_per_channel(x), Fn.compute_dtype(x.dtype), []
    xhat_saved = Fn.normalize(x, mean, invstd)
    for act, p in ACTIVATIONS:
        z = Fn.forward(x, mean, invstd, gamma, beta, act, p)
        forms = {"x": (x, None, mean), "xhat": (xhat_saved, None, None), "x+z": (x, z, mean)}
        for form, (src, zk, mk) in forms.items():
            xhat = Fn.normalize(src, mk, invstd, dtype=cdt) if mk is not None else src.to(cdt)
            if zk is None:
                dy, s1, s2 = Fn.checkpoint_backward_reduce(xhat, dz, gamma, beta, act, p)
            else:
                dy = get_activation(act).backward(zk.to(cdt), dz.to(cdt), p)
                s1, s2 = Fn.backward_reduce(dy, xhat)
            norm = invstd if mk is not None else None
            n1, n2 = ops.xhat_backward_reduce(src, dz, zk, mk, norm, gamma, beta, act, p)
            scale = dy.abs().sum(Fn.reduce_dims(dy)).max().item()
            tol, scale_t = tolerance(x.dtype, False), scale * xhat.abs().max().item()
            out += [(f"{act} {form} sum_dy", relative_error(n1, s1, scale), tol),
                    (f"{act} {form} sum_dy_xhat", relative_error(n2, s2, scale_t), tol)]
            ref = Fn.grad_input_xhat(dy.clone(), xhat, invstd, gamma, s1, s2, m, True, x.dtype)
            args = (zk, mk, invstd, gamma, beta, s1, s2, m, True, act, p)
            dx = ops.xhat_backward_elementwise(src, dz, *args)
            into = dz.clone()
            ops.xhat_backward_elementwise_(src, into, *args)
            scale_dx, tol = _grad_scale(dz, invstd, gamma), tolerance(x.dtype, True)
            out += [(f"{act} {form} dx", relative_error(dx, ref, scale_dx), tol),
                    (f"{act} {form} dx into dz", relative_error(into, ref, scale_dx), tol)]
    return out


def check_linear_backward(ops, x: torch.Tensor):
    """The linear forms (MABN, CBN, the statistics' backward): identity without z and every
    activation with z; dL/dz = x gives (sum x, sum x^2)."""
    mean, invstd, gamma, beta = _params(x)
    dz = make_input(x.shape, x.dtype, "contiguous", x.device, seed=4)
    a, b, c = gamma * invstd, -invstd * beta, mean * 0.1
    out = []
    for act, p in ACTIVATIONS:
        for form, (zk, dk) in {"dz": (None, dz), "x^2": (None, x), "z": (Fn.forward(x, mean, invstd, gamma, beta,
                                                                              act, p), dz)}.items():
            if zk is None and act != "identity":
                continue
            s1, s2 = Fn.linear_backward_reduce(x, dk, zk, act, p)
            n1, n2 = ops.linear_backward_reduce(x, dk, zk, act, p)
            scale = dk.abs().double().sum(Fn.reduce_dims(x)).max().item()
            tol = tolerance(x.dtype, False)
            out += [(f"{act} {form} sum_dy", relative_error(n1, s1, scale), tol),
                    (f"{act} {form} sum_dy_x", relative_error(n2, s2, scale * x.abs().max().item()), tol)]
            ref = Fn.linear_grad_input(x, dk, zk, a, b, c, act, p)
            dx = ops.linear_backward_elementwise(x, dk, zk, a, b, c, act, p)
            into = dk.clone()
            ops.linear_backward_elementwise_(x, into, zk, a, b, c, act, p)
            scale_dx = ref.abs().max().item()
            out += [(f"{act} {form} dx", relative_error(dx, ref, scale_dx), tolerance(x.dtype, True)),
                    (f"{act} {form} dx into dz", relative_error(into, ref, scale_dx), tolerance(x.dtype, True))]
    return out


CHECKS: dict[str, Callable] = {
    "statistics": check_statistics,
    "merge_statistics": check_merge_statistics,
    "forward": check_forward,
    "inplace_backward": check_inplace_backward,
    "xhat_backward": check_xhat_backward,
    "linear_backward": check_linear_backward,
}
"""operator group -> check of one input; each native operator is covered by one group."""


LARGE_MEAN_SHAPES = {False: (3, 5, 123, 211), True: (3, 5, 37, 41)}
"""The mean-1e4 input, full and ``--quick``: 78k values per channel (several parallel tasks per
channel on every backend), or 4.5k (still three partials per channel for Triton's reductions;
for Triton's interpreter, which runs the kernels in numpy)."""


def cases(layout: str, quick: bool = False):
    """Input shapes of a layout (channels-last needs 3-D to 5-D inputs), plus large-mean flags."""
    shapes = [s for s in SHAPES if layout == "contiguous" or len(s) >= 3]
    return [(s, False) for s in shapes] + [(LARGE_MEAN_SHAPES[quick], True)]


def run_check(ops, name: str, dtype: torch.dtype, layout: str, device: str,
              quick: bool = False) -> list[tuple[str, float, float]]:
    """All (what, error, tolerance) of operator group ``name`` of the operator namespace ``ops``
    (``torch.ops.abnexp`` / ``torch.ops.abnexp_triton``) for one dtype / layout / device."""
    results = []
    for shape, large_mean in cases(layout, quick):
        if large_mean and dtype in (torch.float16, torch.bfloat16):
            continue  # 1e4 + N(0, 1) is not representable in half precision
        x = make_input(shape, dtype, layout, device, large_mean)
        tag = f"{tuple(shape)}{' mean 1e4' if large_mean else ''}"
        results += [(f"{tag} {what}", err, tol) for what, err, tol in CHECKS[name](ops, x)]
    return results


def compile_cuda_object(output: Path, archs=("8.0", "9.0"), timeout: float = 600) -> list[str]:
    """Compile kernels/abn_cuda.cu to an object file only (``nvcc -c``, no GPU needed) with the
    flags of the JIT build; returns the command. Used by CI to catch a broken .cu file.

    Raises:
        KernelBuildError: no CUDA toolkit, or nvcc failed (its output in the message).
    """
    nvcc = native.nvcc()
    if nvcc is None:
        raise native.KernelBuildError(f"no bin/nvcc under CUDA_HOME={native.cuda_home()!r}; set "
                                      f"CUDA_HOME to the CUDA toolkit")
    cpp_extension = native.cpp_extension_module()
    includes = cpp_extension.include_paths("cuda") + [str(native.kernels_dir())]
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}"
    cmd = ([nvcc, "-c", str(native.kernels_dir() / "abn_cuda.cu"), "-o", str(output), "-O3",
            "-std=c++20", "-Xcompiler", "-fPIC", abi, "-DTORCH_EXTENSION_NAME=abnexp_kernels"]
           + [f"-I{p}" for p in includes] + cpp_extension.COMMON_NVCC_FLAGS + native.gencode_flags(archs))
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise native.KernelBuildError(f"nvcc failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return cmd


def check_main(args) -> int:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise native.KernelBuildError("--device cuda needs a GPU (torch.cuda.is_available() is False); "
                                      "use --device cpu")
    devices = [args.device] if args.device != "all" else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    failed = 0
    for device in devices:
        name = backends.choose(device, args.backend)
        if name == "torch":
            print(f"skip {device}: no kernel backend serves {device} tensors here (see the warning above)")
            continue
        ops = getattr(torch.ops, backends.BACKENDS[name].namespace)
        for group in CHECKS:
            for dname, dtype in DTYPES.items():
                for layout in LAYOUTS:
                    results = run_check(ops, group, dtype, layout, device, args.quick)
                    bad = [r for r in results if not r[1] <= r[2]]
                    worst = max(results, key=lambda r: r[1] / max(r[2], 1e-300))
                    status = "FAIL" if bad else "ok"
                    print(f"{status:4s} {name:6s} {device:4s} {group:17s} {dname:8s} {layout:13s} "
                          f"max rel. error {worst[1]:.2e} (tol {worst[2]:.0e}) {len(results)} checks", flush=True)
                    for what, err, tol in bad[:5]:
                        print(f"       mismatch: {what}: {err:.3e} > {tol:.0e}")
                    failed += bool(bad)
    print(f"abnexp kernels check: {'all operators match' if not failed else f'{failed} mismatching groups'}")
    return 1 if failed else 0


def build_main(args) -> int:
    archs = tuple(a for a in (args.arch or "").split(",") if a)
    lines, ok = backends.BACKENDS[args.backend].build(archs, args.cuda, args.verbose)
    print("\n".join(lines))
    return 0 if ok else 1


def kernels_command(argv: list[str]) -> None:
    """Entry point of ``abnexp kernels``; exits with the status of the subcommand.

    Raises:
        KernelBuildError: the build failed, or ``--device cuda`` without a GPU.
    """
    p = argparse.ArgumentParser(prog="abnexp kernels", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    kernel_backends = [n for n, b in backends.BACKENDS.items() if b.namespace]
    b = sub.add_parser("build", help="build a backend's kernels and report them")
    b.add_argument("--backend", choices=kernel_backends, default="native",
                   help="native: build (or reuse) the C++/CUDA module; triton: compile every Triton "
                        "kernel ahead of time for --arch (no GPU needed)")
    b.add_argument("--arch", default=None,
                   help="comma-separated targets: sm_80,sm_90 (native: the CUDA kernels for these; "
                        "triton: also gfx942 and other AMD targets); default: native builds for the "
                        "visible GPUs (CPU only without one), triton compiles sm_80,sm_90,gfx942")
    b.add_argument("--cuda", action=argparse.BooleanOptionalAction, default=None,
                   help="native: compile the CUDA kernels (default: when a GPU and the toolkit are found)")
    b.add_argument("--verbose", action="store_true", help="show the compiler commands and output")
    c = sub.add_parser("check", help="compare every operator of a backend with the reference path")
    c.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    c.add_argument("--backend", choices=["auto"] + kernel_backends, default="auto",
                   help="the backend checked (auto: the one ABNEXP_KERNELS=auto picks per device)")
    c.add_argument("--quick", action="store_true",
                   help="the mean-1e4 input at (3, 5, 37, 41) instead of (3, 5, 123, 211): for Triton's "
                        "interpreter (TRITON_INTERPRET=1), where the full one takes about an hour")
    args = p.parse_args(argv)
    sys.exit(build_main(args) if args.command == "build" else check_main(args))
