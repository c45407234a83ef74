#!/usr/bin/env python
"""Benchmark the five BN + activation strategies (abnexp.norm.NORM_LAYERS).

For each strategy and memory layout it reports

* forward + backward wall time of the layer alone (median over ``--repeats``, ms);
* bytes autograd keeps for backward (``saved_tensors_hooks``, each distinct storage once)
  for the layer alone and for a BN -> act -> conv3x3 block, absolute and relative to ABN;
* on CUDA, the peak memory (``torch.cuda.max_memory_allocated``) of the block's
  forward + backward above what was allocated before.

Writes a markdown table to ``results/bench_norm_<device>.md`` (or ``--out``).

With ``--compare-torch`` it also times, interleaved in one loop (so machine load hits all
alike), torch's ``BatchNorm2d`` + in-place ``LeakyReLU`` against InPlace-ABN I / II on the
native kernels and on the PyTorch reference path, and reports medians and ratios (the native
kernels' speed bar: <= 1.3x torch's BN + LeakyReLU on CPU).

With ``--small-batch`` it instead measures whole models (the small-batch norms' overhead, as
the CBN paper's Table 8): forward+backward time, conv/matmul FLOPs (forward+backward, including
CBN's statistic gradients), bytes kept for backward and bytes of the persistent state (buffers)
per norm relative to BN, and writes ``results/bench_small_batch_<device>.md``. CBN is left out
of the per-layer table (it needs its conv; the model table covers it).

Example: ``python scripts/bench_norm.py --shape 16,64,56,56 --dtype float32 --layout both``
"""
from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from abnexp.norm import NORM_LAYERS, backends, native  # noqa: E402

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float64": torch.float64}


class SavedBytes:
    """Sum of the distinct storages autograd saves inside the context (bytes)."""

    def __init__(self, exclude=()):
        self.storages: dict[int, int] = {}
        self.exclude = {p.untyped_storage().data_ptr() for p in exclude}

    def _pack(self, t):
        s = t.untyped_storage()
        if s.data_ptr() not in self.exclude:
            self.storages[s.data_ptr()] = s.nbytes()
        return t

    def __enter__(self):
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.storages.values())


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_input(shape, dtype, layout, device):
    x = torch.randn(shape, device=device).mul_(2).add_(0.5).to(dtype)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last if len(shape) == 4 else torch.channels_last_3d)
    return x


def autocast_ctx(device, dtype):
    if dtype in (torch.float16, torch.bfloat16):
        return torch.autocast(device.type, dtype=dtype)
    return contextlib.nullcontext()


def bench_one(name, args, shape, dtype, layout, device):
    c = shape[1]
    layer = NORM_LAYERS[name](c, activation=args.activation,
                              activation_param=args.activation_param).to(device).train()
    conv = nn.Conv2d(c, c, 3, padding=1, bias=False).to(device) if len(shape) == 4 else None
    base = make_input(shape, dtype, layout, device)
    grad = torch.randn_like(base)
    leaf = base.clone().requires_grad_()

    def fwd_bwd(module):
        x = leaf.clone()  # non-leaf input (in-place layers need one); CloneBackward is free
        sync(device)
        t0 = time.perf_counter()
        with autocast_ctx(device, dtype):
            out = module(x)
        out.backward(grad if out.shape == grad.shape else torch.ones_like(out))
        sync(device)
        return time.perf_counter() - t0

    for _ in range(args.warmup):
        fwd_bwd(layer)
    times = [fwd_bwd(layer) for _ in range(args.repeats)]

    with SavedBytes(exclude=list(layer.parameters())) as saved_layer:
        with autocast_ctx(device, dtype):
            out = layer(leaf.clone())
    del out
    block_bytes, peak = None, None
    if conv is not None:
        block = nn.Sequential(layer, conv)
        with SavedBytes(exclude=list(block.parameters())) as saved_block:
            with autocast_ctx(device, dtype):
                out = block(leaf.clone())
        del out
        block_bytes = saved_block.total
        if device.type == "cuda":
            x = leaf.clone()
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            with autocast_ctx(device, dtype):
                out = block(x)
            out.backward(torch.ones_like(out))
            sync(device)
            peak = torch.cuda.max_memory_allocated(device) - before
            del out, x
    return {"name": name, "layout": layout, "ms": 1e3 * statistics.median(times),
            "layer_bytes": saved_layer.total, "block_bytes": block_bytes, "peak": peak}


def compare_torch(args, shape, dtype, layout, device):
    """Interleaved medians (ms) of forward+backward: torch BN + LeakyReLU_ and InPlace-ABN I/II
    on the native and the reference path; returns {variant: ms}."""
    c = shape[1]
    variants = {"torch BatchNorm2d + LeakyReLU_": (nn.Sequential(
        nn.BatchNorm2d(c), nn.LeakyReLU(args.activation_param, inplace=True)), True)}
    for name in ("inplace_abn", "inplace_abn_ii"):
        for path, enabled in (("native", True), ("reference", False)):
            layer = NORM_LAYERS[name](c, activation="leaky_relu",
                                      activation_param=args.activation_param)
            variants[f"{name} ({path})"] = (layer, enabled)
    leaf = make_input(shape, dtype, layout, device).requires_grad_()
    grad = torch.randn_like(leaf)
    times = {k: [] for k in variants}
    for i in range(args.warmup + args.repeats):
        for key, (module, enabled) in variants.items():
            backends.REQUESTED = "auto" if enabled else "torch"
            module.to(device).train()
            x = leaf.clone()
            sync(device)
            t0 = time.perf_counter()
            with autocast_ctx(device, dtype):
                out = module(x)
            out.backward(grad)
            sync(device)
            if i >= args.warmup:
                times[key].append(time.perf_counter() - t0)
            del out, x
    backends.REQUESTED = "auto"
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


SMALL_BATCH_NORMS = ("bn", "brn", "mabn", "cbn", "gn", "frozen_bn")


def bench_small_batch(args, device) -> Path:
    """Model-level overhead of the small-batch norms (``--small-batch``); returns the file written."""
    from torch.utils.flop_counter import FlopCounterMode

    from abnexp.memory import SavedBytes as Saved
    from abnexp.models import build_model
    from abnexp.norm import build_norm_act

    x = torch.randn(args.sb_batch, 3, args.sb_crop, args.sb_crop, device=device)
    models = {}
    for name in SMALL_BATCH_NORMS:
        options = {"burnin_iters": 0} if name == "cbn" else {}  # the full window: Taylor terms active
        models[name] = build_model(args.sb_model, build_norm_act(name, **options), 1000).to(device).train()

    def step(model):
        model.zero_grad(set_to_none=True)
        model(x).logsumexp(1).sum().backward()

    for model in models.values():
        for _ in range(max(args.warmup, 4)):  # CBN's window (k = 4) is full after 3 steps
            step(model)
    times = {name: [] for name in models}
    for _ in range(args.repeats):  # interleaved, so changes of the machine's load hit all norms alike
        for name, model in models.items():
            sync(device)
            t0 = time.perf_counter()
            step(model)
            sync(device)
            times[name].append(time.perf_counter() - t0)
    rows = {}
    for name, model in models.items():
        with FlopCounterMode(display=False) as flops:
            step(model)
        with Saved(exclude=list(model.parameters())) as saved:
            out = model(x)
        del out
        rows[name] = {"ms": 1e3 * statistics.median(times[name]), "flops": flops.get_total_flops(),
                      "saved": saved.total, "state": sum(b.numel() * b.element_size() for b in model.buffers()),
                      "params": sum(p.numel() * p.element_size() for p in model.parameters())}
        print(f"{name:10s} {rows[name]['ms']:9.1f} ms  {rows[name]['flops'] / 1e9:8.2f} GFLOP  kept "
              f"{rows[name]['saved'] / 2**20:8.1f} MiB  state {rows[name]['state'] / 2**20:7.1f} MiB", flush=True)
    ref = rows["bn"]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    dev_name = (torch.cuda.get_device_name(device) if device.type == "cuda"
                else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    lines = [f"# Small-batch norms: whole-model overhead ({device.type})", "",
             f"`python scripts/bench_norm.py --small-batch --sb-model {args.sb_model} --sb-batch {args.sb_batch} "
             f"--sb-crop {args.sb_crop} --repeats {args.repeats}`", "",
             f"{args.sb_model}, training step on {args.sb_batch}x3x{args.sb_crop}x{args.sb_crop} float32 "
             f"(forward + backward, no optimizer), default options of each norm (CBN window 4 filled, past "
             f"its burn-in; MABN with CenConv2d). device: {dev_name}; torch {torch.__version__}; median of "
             f"{args.repeats} interleaved steps; 1-min load average at the end {load:.1f}. FLOPs: "
             "torch.utils.flop_counter (convolutions and matmuls only, forward + backward). *kept* = bytes "
             "autograd saves for backward (parameters excluded); *state* = persistent buffers (running "
             "statistics, MABN's and CBN's moving-average buffers), next to the parameters' bytes.",
             "", "| norm | fwd+bwd ms | x BN | GFLOP | x BN | kept MiB | x BN | state MiB | params MiB | "
             "(kept + state + 3 x params) x BN |", "|---|---|---|---|---|---|---|---|---|---|"]
    total = lambda r: r["saved"] + r["state"] + 3 * r["params"]  # noqa: E731  params + grads + momentum
    for name, r in rows.items():
        lines.append(f"| {name} | {r['ms']:.1f} | {r['ms'] / ref['ms']:.2f} | {r['flops'] / 1e9:.2f} | "
                     f"{r['flops'] / ref['flops']:.3f} | {r['saved'] / 2**20:.1f} | {r['saved'] / ref['saved']:.2f} "
                     f"| {r['state'] / 2**20:.1f} | {r['params'] / 2**20:.1f} | {total(r) / total(ref):.3f} |")
    lines += ["", "CBN paper, Table 8 (Mask R-CNN R50-FPN, GPU): memory 14.1 -> 15.1 GB (+7 %), FLOPs "
              "5155 -> 5810 M (+11 %), training 1.3 -> 1.0 it/s, inference unchanged."]
    out = Path(args.out) if args.out else (Path(__file__).resolve().parents[1] / "results"
                                           / f"bench_small_batch_{device.type}.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    return out


def kernel_bandwidth(args, shape, dtype, layout, device):
    """Achieved bandwidth (GB/s) of the native statistics and forward_ kernels and of a
    same-size tensor copy (read + write), medians of interleaved repeats."""
    x = make_input(shape, dtype, layout, device)
    y = torch.empty_like(x)
    ops, c = native.ops(), shape[1]
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    mean, var, _ = ops.statistics(x)
    invstd, gamma, beta = torch.rsqrt(var + 1e-5), torch.ones(c, dtype=cdt, device=device), \
        torch.zeros(c, dtype=cdt, device=device)
    kernels = {"copy (read + write)": (lambda: y.copy_(x), 2),
               "statistics (read)": (lambda: ops.statistics(x), 1),
               "forward_ (read + write)": (lambda: ops.forward_(y, mean, invstd, gamma, beta,
                                                                "leaky_relu", 0.01), 2)}
    times = {k: [] for k in kernels}
    for i in range(args.warmup + args.repeats):
        for key, (fn, _) in kernels.items():
            y.copy_(x)
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            if i >= args.warmup:
                times[key].append(time.perf_counter() - t0)
    nbytes = x.numel() * x.element_size()
    return {k: passes * nbytes / statistics.median(times[k]) / 1e9 for k, (_, passes) in kernels.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="16,64,56,56", help="N,C[,D],H,W (default 16,64,56,56)")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES),
                   help="input dtype; float16/bfloat16 run under torch.autocast with float32 "
                        "parameters")
    p.add_argument("--layout", default="both", choices=["contiguous", "channels_last", "both"])
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto (default)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--activation", default="leaky_relu")
    p.add_argument("--activation-param", type=float, default=0.01)
    p.add_argument("--strategies", default=",".join(n for n in NORM_LAYERS if n != "cbn"),
                   help="per-layer table (cbn needs its conv: see --small-batch)")
    p.add_argument("--small-batch", action="store_true",
                   help="whole-model overhead of bn/brn/mabn/cbn/gn/frozen_bn instead of the layer table")
    p.add_argument("--sb-model", default="resnet50")
    p.add_argument("--sb-batch", type=int, default=2)
    p.add_argument("--sb-crop", type=int, default=224)
    p.add_argument("--compare-torch", action="store_true",
                   help="also time torch BatchNorm2d + LeakyReLU_ against InPlace-ABN I/II on the "
                        "native and reference paths (interleaved)")
    p.add_argument("--out", default=None, help="markdown output (default "
                   "results/bench_norm_<device>.md)")
    args = p.parse_args(argv)

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    if args.small_batch:
        torch.manual_seed(0)
        print(f"wrote {bench_small_batch(args, device)}")
        return
    shape = tuple(int(s) for s in args.shape.split(","))
    dtype = DTYPES[args.dtype]
    layouts = ["contiguous", "channels_last"] if args.layout == "both" else [args.layout]
    if len(shape) < 4:
        layouts = ["contiguous"]
    torch.manual_seed(0)

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    rows = []
    for layout in layouts:
        for name in args.strategies.split(","):
            r = bench_one(name, args, shape, dtype, layout, device)
            rows.append(r)
            print(f"{layout:13s} {name:20s} fwd+bwd {r['ms']:8.2f} ms  layer kept "
                  f"{r['layer_bytes'] / 2**20:8.2f} MiB  block kept "
                  f"{(r['block_bytes'] or 0) / 2**20:8.2f} MiB", flush=True)

    dev_name = (torch.cuda.get_device_name(device) if device.type == "cuda"
                else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    lines = [f"# BN + activation strategies: forward+backward time and memory ({device.type})", "",
             f"Input {'x'.join(map(str, shape))} {args.dtype}"
             f"{' (torch.autocast, float32 parameters)' if dtype in (torch.float16, torch.bfloat16) else ''}, "
             f"activation {args.activation}({args.activation_param}), training mode; "
             f"device: {dev_name}; torch {torch.__version__}; median of {args.repeats} runs "
             f"after {args.warmup} warm-up; 1-min load average at start {load:.1f} "
             f"(timings are only comparable within one run).", "",
             f"Command: `python scripts/bench_norm.py {' '.join(sys.argv[1:] if argv is None else argv)}`", "",
             "Bytes kept for backward = distinct storages saved by autograd (parameters "
             "excluded): *layer* = the norm layer alone, *block* = norm -> conv3x3 (the conv "
             "keeps its input z too). Ratios are relative to ABN (norm=bn) in the same layout.",
             ("Implementation: native kernels (abnexp.norm.native: kernels/ C++/CUDA, "
              f"{native.probe(device.type) is None and 'built' or 'unavailable'}) for every strategy, "
              "else the plain-PyTorch reference path (ABN uses F.batch_norm; the others are "
              "autograd.Functions built from abnexp.norm.functional)." if backends.REQUESTED != "torch" else
              "Implementation: plain-PyTorch reference path of abnexp.norm (ABNEXP_NATIVE=0)."),
             ""]
    peak_col = device.type == "cuda"
    header = ("| layout | strategy | fwd+bwd ms | layer kept MiB | layer / ABN | block kept MiB "
              "| block / ABN |" + (" peak MiB (block fwd+bwd) |" if peak_col else ""))
    lines += [header, "|" + "---|" * (header.count("|") - 1)]
    for layout in layouts:
        ref = next(r for r in rows if r["layout"] == layout and r["name"] == "bn") \
            if any(r["name"] == "bn" and r["layout"] == layout for r in rows) else None
        for r in (r for r in rows if r["layout"] == layout):
            lr = f"{r['layer_bytes'] / ref['layer_bytes']:.2f}" if ref else "-"
            bb = r["block_bytes"]
            br = f"{bb / ref['block_bytes']:.2f}" if ref and bb else "-"
            line = (f"| {layout} | {r['name']} | {r['ms']:.2f} | {r['layer_bytes'] / 2**20:.2f} "
                    f"| {lr} | {'-' if bb is None else f'{bb / 2**20:.2f}'} | {br} |")
            if peak_col:
                peak = "-" if r["peak"] is None else f"{r['peak'] / 2**20:.1f}"
                line += f" {peak} |"
            lines.append(line)
    if args.compare_torch and len(shape) == 4:
        lines += ["", "## Native kernels vs torch BatchNorm2d + in-place LeakyReLU", "",
                  f"Forward+backward, interleaved repeats (median of {args.repeats} after "
                  f"{args.warmup} warm-up), same input and gradient; ratio = time / torch's.", "",
                  "| layout | variant | fwd+bwd ms | x torch BN+LeakyReLU_ |", "|---|---|---|---|"]
        for layout in layouts:
            ms = compare_torch(args, shape, dtype, layout, device)
            base = ms["torch BatchNorm2d + LeakyReLU_"]
            for key, value in ms.items():
                lines.append(f"| {layout} | {key} | {value:.2f} | {value / base:.2f} |")
                print(f"{layout:13s} {key:32s} {value:8.2f} ms  {value / base:5.2f}x torch", flush=True)
        lines += ["", "Achieved bandwidth of the native kernels vs a tensor copy of the same size:", "",
                  "| layout | kernel | GB/s | fraction of copy |", "|---|---|---|---|"]
        for layout in layouts:
            bw = kernel_bandwidth(args, shape, dtype, layout, device)
            copy = bw["copy (read + write)"]
            lines += [f"| {layout} | {k} | {v:.1f} | {v / copy:.2f} |" for k, v in bw.items()]
    out = Path(args.out) if args.out else (Path(__file__).resolve().parents[1] / "results"
                                           / f"bench_norm_{device.type}.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
