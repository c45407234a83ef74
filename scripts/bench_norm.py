#!/usr/bin/env python
"""Benchmark the five BN + activation strategies (abnexp.norm.NORM_LAYERS).

For each strategy and memory layout it reports

* forward + backward wall time of the layer alone (median over ``--repeats``, ms);
* bytes autograd keeps for backward (``saved_tensors_hooks``, each distinct storage once)
  for the layer alone and for a BN -> act -> conv3x3 block, absolute and relative to ABN;
* on CUDA, the peak memory (``torch.cuda.max_memory_allocated``) of the block's
  forward + backward above what was allocated before.

Writes a markdown table to ``results/bench_norm_<device>.md`` (or ``--out``).

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
from abnexp.norm import NORM_LAYERS  # noqa: E402

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
    p.add_argument("--strategies", default=",".join(NORM_LAYERS))
    p.add_argument("--out", default=None, help="markdown output (default "
                   "results/bench_norm_<device>.md)")
    args = p.parse_args(argv)

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
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
             "Bytes kept for backward = distinct storages saved by autograd (parameters "
             "excluded): *layer* = the norm layer alone, *block* = norm -> conv3x3 (the conv "
             "keeps its input z too). Ratios are relative to ABN (norm=bn) in the same layout.",
             "Implementation: plain-PyTorch reference path of abnexp.norm (ABN uses "
             "F.batch_norm; the others are autograd.Functions built from abnexp.norm.functional).",
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
    out = Path(args.out) if args.out else (Path(__file__).resolve().parents[1] / "results"
                                           / f"bench_norm_{device.type}.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
