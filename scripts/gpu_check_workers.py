"""The measuring side of scripts/gpu_check.py: one subcommand per stage, each run in its own
process (a crash, a hang or a CUDA error stays in that stage) and each writing its figures as
JSON, rewritten after every measurement so that a stage stopped at its time budget keeps what
it had.

    python scripts/gpu_check_workers.py env    --json PATH
    python scripts/gpu_check_workers.py build  --json PATH (--cuda | --cpu [--cached-only])
    python scripts/gpu_check_workers.py bench  --json PATH [--dry-run]
    python scripts/gpu_check_workers.py memory --json PATH [--cap-gib G] [--fake-oom-above B] -- OVERRIDES

It is also a pytest plugin (``-p gpu_check_workers`` with scripts/ on PYTHONPATH): with
``ABNEXP_GPU_CHECK_SELECT=cuda`` it keeps only the CUDA tests (those skipped with the project's
reason "needs a CUDA GPU" when no GPU is visible) and the tests named explicitly on the command line.

Units: bytes, seconds (milliseconds where a key ends in ``_ms``), GB/s = 1e9 bytes per second.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CUDA_SKIP_REASON = "needs a CUDA GPU"
"""The skip reason that marks a test as a CUDA test (tests/test_kernels.py, tests/norm/test_cuda.py)."""


def write_json(path: str | Path, data: dict) -> None:
    """Writes ``data`` atomically (temporary file + rename), so a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# pytest plugin: select the CUDA tests
# ----------------------------------------------------------------------------------------------
def _is_cuda_test(item) -> bool:
    return any(CUDA_SKIP_REASON in str(m.kwargs.get("reason", "")) for m in item.iter_markers("skipif"))


def pytest_collection_modifyitems(config, items):
    """Keeps the CUDA tests and the explicitly named node ids (``file.py::test[param]``)."""
    if os.environ.get("ABNEXP_GPU_CHECK_SELECT") != "cuda":
        return
    named = {a.replace("\\", "/").split("/")[-1] for a in config.args if "::" in a}
    keep = [i for i in items if _is_cuda_test(i) or i.nodeid.split("/")[-1] in named]
    config.hook.pytest_deselected(items=[i for i in items if i not in keep])
    items[:] = keep


# ----------------------------------------------------------------------------------------------
# env: what the figures were measured on
# ----------------------------------------------------------------------------------------------
def _first_line(cmd: list[str]) -> str | None:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = [ln.strip() for ln in done.stdout.splitlines() if ln.strip()]
    return lines[0] if done.returncode == 0 and lines else None


def env_main(args) -> int:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__,
            "torch_cuda": torch.version.cuda, "cpu_count": os.cpu_count(), "host": platform.node(),
            "cuda_available": torch.cuda.is_available(), "cuda_home": os.environ.get("CUDA_HOME")}
    for name in ("torchvision", "hydra", "omegaconf"):
        try:
            info[name] = __import__(name).__version__
        except Exception as err:  # a missing package is a finding, not a crash
            info[name] = f"missing ({type(err).__name__})"
    home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    nvcc = _first_line(["bash", "-c", f"'{home}/bin/nvcc' --version | tail -n 2 | head -n 1"])
    info["nvcc"] = nvcc or f"not found under {home}/bin"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device=torch.cuda.get_device_name(0), device_count=torch.cuda.device_count(),
                    total_memory_bytes=props.total_memory, capability=f"{props.major}.{props.minor}",
                    multiprocessors=props.multi_processor_count, cudnn=torch.backends.cudnn.version())
        try:
            info["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        except Exception as err:
            info["nccl"] = f"unknown ({type(err).__name__})"
        info["driver"] = _first_line(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
        if info["driver"] is None:
            try:
                import pynvml

                pynvml.nvmlInit()
                info["driver"] = pynvml.nvmlSystemGetDriverVersion()
            except Exception:
                info["driver"] = "unknown (no nvidia-smi, no pynvml)"
    else:
        info["device"] = f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    write_json(args.json, info)
    print(json.dumps(info, indent=1))
    return 0


# ----------------------------------------------------------------------------------------------
# build: the native module (abnexp.norm.native)
# ----------------------------------------------------------------------------------------------
def _cached_build(native) -> tuple[str, str, bool]:
    """(extension name, build folder, whether a library newer than every kernel source is
    there) of the CPU-only module, without building it."""
    name = native.extension_name(False)  # native.build()'s name for the CPU-only module
    folder = native.cpp_extension_module()._get_build_directory(name, False)
    library = Path(folder) / f"{name}.so"
    sources = list(native.kernels_dir().glob("*.[ch]*"))
    fresh = library.is_file() and all(library.stat().st_mtime >= s.stat().st_mtime for s in sources)
    return name, folder, fresh


def build_main(args) -> int:
    from abnexp.norm import native

    result = {"cuda_requested": args.cuda, "status": "building"}
    if not args.cuda:
        name, folder, fresh = _cached_build(native)
        result.update(name=name, build_dir=folder, cached=fresh)
        if args.cached_only and not fresh:
            result.update(status="skipped", reason=f"the CPU-only module {name} is not cached in {folder}; "
                          "the dry run does not build it (a fresh CPU build takes ~35 s on 2 cores)")
            write_json(args.json, result)
            print(result["reason"])
            return 0
    write_json(args.json, result)
    start = time.perf_counter()
    try:
        info = native.build(cuda=args.cuda, verbose=args.verbose)
    except native.KernelBuildError as err:
        result.update(status="failed", reason=str(err), seconds=time.perf_counter() - start)
        write_json(args.json, result)
        print(f"build failed: {err}", file=sys.stderr)
        return 1
    result.update(status="ok", name=info.name, library=info.library, cuda=info.cuda,
                  cuda_archs=list(info.cuda_archs), cflags=list(info.cflags), seconds=info.seconds,
                  build_dir=str(Path(info.library).parent))
    if args.cuda:
        import torch

        result["cuda_kernels_serve_cuda"] = bool(torch.cuda.is_available() and native.probe("cuda") is None)
    write_json(args.json, result)
    print(json.dumps(result, indent=1))
    return 0


# ----------------------------------------------------------------------------------------------
# bench: forward + backward vs torch BatchNorm2d + LeakyReLU_, kernel bandwidth vs a copy
# ----------------------------------------------------------------------------------------------
FULL_SHAPES = ((32, 256, 56, 56), (8, 2048, 64, 64))
DRY_SHAPES = ((4, 16, 8, 8), (2, 32, 6, 6))
SLOPE = 0.01
FLUSH_BYTES = 256 * 2**20  # > the H200's 60 MB L2: written before every timed call


class Timer:
    """Times one call: CUDA events on a GPU (milliseconds of GPU time between the two
    events), ``time.perf_counter`` around the call elsewhere. ``prepare`` runs untimed first."""

    def __init__(self, device):
        import torch

        self.torch, self.cuda = torch, device.type == "cuda"
        self.flush = torch.empty(FLUSH_BYTES // 4, dtype=torch.float32, device=device) if self.cuda else None

    def __call__(self, fn, prepare=None) -> float:
        """Milliseconds of one ``fn()``."""
        torch = self.torch
        if prepare is not None:
            prepare()
        if self.cuda:
            self.flush.zero_()  # evict the operands from L2: every pass reads from HBM
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - t0)


def interleaved_medians(timer, calls: dict, warmup: int, repeats: int) -> dict:
    """{name: median ms} of ``calls`` ({name: (fn, prepare)}) timed in turn, ``warmup`` + ``repeats``
    rounds, so clock and load changes hit every candidate alike."""
    times = {k: [] for k in calls}
    for r in range(warmup + repeats):
        for name, (fn, prepare) in calls.items():
            ms = timer(fn, prepare)
            if r >= warmup:
                times[name].append(ms)
    return {k: statistics.median(v) for k, v in times.items()}


def kernel_names(fn, limit: int = 6) -> list[str]:
    """Distinct names of the GPU kernels one ``fn()`` launches (torch.profiler), for the record
    of which implementation torch picked (cuDNN's or its own)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        names = []
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA and e.name not in names:
                names.append(e.name)
        return [n[:70] for n in names[:limit]]
    except Exception as err:  # the profiler is a nicety: never let it sink the benchmark
        return [f"profiler failed: {type(err).__name__}: {err}"[:120]]


def bench_config(shape, dtype, layout, device, warmup, repeats):
    """Forward + backward medians (ms) of torch BN + F.leaky_relu_ and InPlace-ABN I / II, and the
    bandwidth of the statistics / forward / forward_ kernels of the backend serving the device
    (``ABNEXP_KERNELS``) vs a copy, for one input."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    from abnexp.norm import InPlaceABN, backends

    c = shape[1]
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    gen = torch.Generator(device=device).manual_seed(0)
    base = (torch.randn(shape, device=device, generator=gen) * 2 + 0.5).to(dtype).contiguous(memory_format=fmt)
    grad = torch.randn(shape, device=device, generator=gen).to(dtype).contiguous(memory_format=fmt)
    leaf = base.clone().requires_grad_()
    bn = nn.BatchNorm2d(c).to(device).train()
    modules = {"torch BatchNorm2d + F.leaky_relu_": lambda x: F.leaky_relu_(bn(x), SLOPE),
               "InPlace-ABN I": InPlaceABN(c, activation="leaky_relu", activation_param=SLOPE, variant="I").to(device),
               "InPlace-ABN II": InPlaceABN(c, activation="leaky_relu", activation_param=SLOPE, variant="II").to(device)}
    state = {}

    def prepare():
        leaf.grad = None
        state["x"] = leaf.clone()  # a non-leaf input (the in-place layers need one); untimed

    def fwd_bwd(module):
        def run():
            module(state.pop("x")).backward(grad)
        return run

    timer = Timer(device)
    ms = interleaved_medians(timer, {k: (fwd_bwd(m), prepare) for k, m in modules.items()}, warmup, repeats)
    base_ms = ms["torch BatchNorm2d + F.leaky_relu_"]
    rows = [{"variant": k, "ms": v, "x_torch": v / base_ms} for k, v in ms.items()]
    out = {"shape": list(shape), "dtype": str(dtype).replace("torch.", ""), "layout": layout, "fwd_bwd": rows,
           "backend": backends.choose(device.type)}
    if device.type == "cuda":
        prepare()  # outside the profiled call: only the layer's own kernels are listed
        out["torch_bn_kernels"] = kernel_names(fwd_bwd(modules["torch BatchNorm2d + F.leaky_relu_"]), limit=8)
    if out["backend"] == "torch":
        out["bandwidth"] = []
        out["bandwidth_note"] = "no kernel backend serves these tensors (the reference path)"
        return out
    x = base
    ops = backends.ops(x)
    y = torch.empty_like(x)
    mean, var, _ = ops.statistics(x)
    invstd = torch.rsqrt(var + 1e-5)
    gamma, beta = torch.ones_like(mean), torch.zeros_like(mean)
    nbytes = x.numel() * x.element_size()
    kernels = {  # name: (call, bytes it must move at least, prepare)
        "copy_ (device to device)": (lambda: y.copy_(x), 2 * nbytes, None),
        "statistics": (lambda: ops.statistics(x), nbytes, None),
        "forward": (lambda: ops.forward(x, mean, invstd, gamma, beta, "leaky_relu", SLOPE), 2 * nbytes, None),
        "forward_ (in place)": (lambda: ops.forward_(y, mean, invstd, gamma, beta, "leaky_relu", SLOPE),
                                2 * nbytes, lambda: y.copy_(x)),
    }
    kms = interleaved_medians(timer, {k: (fn, prep) for k, (fn, _, prep) in kernels.items()}, warmup, repeats)
    copy_gbps = kernels["copy_ (device to device)"][1] / (kms["copy_ (device to device)"] * 1e-3) / 1e9
    out["bandwidth"] = [{"kernel": k, "bytes": b, "ms": kms[k], "GBps": b / (kms[k] * 1e-3) / 1e9,
                         "x_copy": b / (kms[k] * 1e-3) / 1e9 / copy_gbps} for k, (_, b, _) in kernels.items()]
    return out


def bench_main(args) -> int:
    import torch

    from abnexp.norm import backends

    device = torch.device("cpu" if args.dry_run or not torch.cuda.is_available() else "cuda")
    shapes = DRY_SHAPES if args.dry_run else FULL_SHAPES
    warmup, repeats = (1, 3) if args.dry_run else (args.warmup, args.repeats)
    result = {"device": device.type, "warmup": warmup, "repeats": repeats, "slope": SLOPE,
              "requested_backend": backends.REQUESTED, "configs": [], "errors": []}
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = False
        result["cudnn_enabled"] = torch.backends.cudnn.enabled
    for shape in shapes:
        for dtype in (torch.float32, torch.bfloat16):
            for layout in ("contiguous", "channels_last"):
                tag = f"{'x'.join(map(str, shape))} {dtype} {layout}"
                t0 = time.perf_counter()
                try:
                    result["configs"].append(bench_config(shape, dtype, layout, device, warmup, repeats))
                except Exception as err:  # record and go on with the next configuration
                    result["errors"].append(f"{tag}: {type(err).__name__}: {err}"[:500])
                    print(f"  {tag}: FAILED {type(err).__name__}: {err}", flush=True)
                else:
                    c = result["configs"][-1]
                    print(f"  {tag}: " + ", ".join(f"{r['variant']} {r['ms']:.3f} ms ({r['x_torch']:.2f}x)"
                                                   for r in c["fwd_bwd"]) +
                          "".join(f"; {b['kernel']} {b['GBps']:.0f} GB/s" for b in c["bandwidth"]) +
                          f"  [{time.perf_counter() - t0:.1f} s]", flush=True)
                write_json(args.json, result)
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    write_json(args.json, result)
    return 1 if result["errors"] else 0


# ----------------------------------------------------------------------------------------------
# memory: the largest batch by real allocation under a memory cap
# ----------------------------------------------------------------------------------------------
def largest_fitting(fits, start: int = 2, upper: int = 64) -> int:
    """The largest batch in [start, upper] for which ``fits(batch)`` is True (0 if ``start``
    does not fit), doubling from ``start`` then bisecting: about 2·log2(answer) probes.
    Starts at 2: a DeepLabV3 head's pooled branch normalizes one value per crop and channel,
    which batch normalization refuses for a batch of 1."""
    lo, hi = 0, start
    while hi <= upper and fits(hi):
        lo, hi = hi, hi * 2
    if lo == 0:
        return 0
    hi = min(hi, upper + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def memory_main(args) -> int:
    import torch

    from abnexp.memory import SavedBytes
    from abnexp.tasks import build_task

    cuda = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda" if cuda else "cpu")
    result = {"overrides": args.overrides, "device": device.type, "probes": [], "status": "running"}
    if cuda and args.cap_gib:
        total = torch.cuda.get_device_properties(0).total_memory
        fraction = args.cap_gib * 2**30 / total
        torch.cuda.set_per_process_memory_fraction(fraction, 0)
        result.update(cap_bytes=int(args.cap_gib * 2**30), cap_fraction=fraction, device_total_bytes=total)
    write_json(args.json, result)
    from abnexp.config import compose

    cfg = compose(args.overrides)
    crop = int(cfg.data.crop_size)
    torch.manual_seed(0)
    model = build_task(cfg).build_model().to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-6, momentum=0.9)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    result.update(crop=crop, params_bytes=params, fixed_bytes=3 * params)  # params + grads + momentum

    # the paper's quantity on this device: bytes autograd keeps for backward, per crop (batch 2)
    with SavedBytes(exclude=list(model.parameters())) as saved:
        out = model(torch.randn(2, 3, crop, crop, device=device))
    del out
    result["kept_bytes_per_crop"] = saved.total / 2
    write_json(args.json, result)

    def step(batch: int) -> None:
        """One training step as ``memory.measure=true`` takes it: forward, mean of the logits,
        backward, SGD momentum update."""
        optimizer.zero_grad(set_to_none=True)
        out = model(torch.randn(batch, 3, crop, crop, device=device))
        out.float().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def fits(batch: int) -> bool:
        probe = {"batch": batch}
        t0 = time.perf_counter()
        try:
            if args.fake_oom_above and batch > args.fake_oom_above:
                raise torch.cuda.OutOfMemoryError(f"simulated: batch > {args.fake_oom_above} (dry run)")
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            step(batch)
            if cuda:
                torch.cuda.synchronize()
                probe["peak_bytes"] = torch.cuda.max_memory_allocated()
            probe["fits"] = True
        except torch.cuda.OutOfMemoryError as err:
            probe.update(fits=False, error=str(err).splitlines()[0][:200])
        except RuntimeError as err:  # cuDNN / cuBLAS workspace failures under the cap
            if "out of memory" not in str(err) and "ALLOC_FAILED" not in str(err):
                raise
            probe.update(fits=False, error=str(err).splitlines()[0][:200])
        finally:
            optimizer.zero_grad(set_to_none=True)
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
        probe["seconds"] = time.perf_counter() - t0
        result["probes"].append(probe)
        write_json(args.json, result)
        print(f"  batch {batch}: {'fits' if probe['fits'] else 'out of memory'}"
              + (f", peak {probe['peak_bytes'] / 2**30:.2f} GiB" if "peak_bytes" in probe else "")
              + f" [{probe['seconds']:.1f} s]", flush=True)
        return probe["fits"]

    result["max_batch"] = largest_fitting(fits, start=2, upper=args.upper)
    ok = sorted((p["batch"], p["peak_bytes"]) for p in result["probes"] if p["fits"] and "peak_bytes" in p)
    if len(ok) >= 2 and ok[-1][0] > ok[0][0]:
        result["peak_bytes_per_crop"] = (ok[-1][1] - ok[0][1]) / (ok[-1][0] - ok[0][0])
        result["peak_slope_batches"] = [ok[0][0], ok[-1][0]]
    result["status"] = "ok"
    write_json(args.json, result)
    return 0


# ----------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("env")
    e.add_argument("--json", required=True)
    b = sub.add_parser("build")
    b.add_argument("--json", required=True)
    mode = b.add_mutually_exclusive_group(required=True)
    mode.add_argument("--cuda", action="store_true", help="build the CPU and CUDA kernels")
    mode.add_argument("--cpu", dest="cuda", action="store_false", help="build the CPU kernels only")
    b.add_argument("--cached-only", action="store_true", help="with --cpu: load a cached build, never compile")
    b.add_argument("--verbose", action="store_true")
    be = sub.add_parser("bench")
    be.add_argument("--json", required=True)
    be.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU")
    be.add_argument("--warmup", type=int, default=5)
    be.add_argument("--repeats", type=int, default=15)
    m = sub.add_parser("memory")
    m.add_argument("--json", required=True)
    m.add_argument("--cap-gib", type=float, default=0.0, help="per-process GPU memory cap [GiB]; 0 = none")
    m.add_argument("--upper", type=int, default=64, help="largest batch probed")
    m.add_argument("--fake-oom-above", type=int, default=0, help="dry run: batches above this 'run out of memory'")
    m.add_argument("--cpu", action="store_true", help="measure on the CPU even if a GPU is visible")
    m.add_argument("overrides", nargs="*", help="Hydra overrides of the model (after --)")
    args = p.parse_args(argv)
    return {"env": env_main, "build": build_main, "bench": bench_main, "memory": memory_main}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
