#!/usr/bin/env python
"""Bytes kept for backward per image by a whole ResNeXt-101 for each BN + act strategy.

Builds ``build_model("resnext101", build_norm_act(name), num_classes=1000)`` for every
strategy of :data:`abnexp.norm.NORM_LAYERS`, runs one training-mode forward pass at the
given resolution and counts, with ``torch.autograd.graph.saved_tensors_hooks``, the
distinct storages autograd keeps for backward (parameters excluded, each storage once:
a buffer shared by an in-place norm and the following conv counts once). Optionally runs
the backward pass too, which checks that the in-place strategies train without autograd
errors. Writes ``results/memory_resnext101.md``.

This measures what autograd *keeps* (the paper's quantity), not the peak of the
allocator; on CUDA the peak (``torch.cuda.max_memory_allocated``) is reported as well.

Example: ``python scripts/memory_resnext.py --batch 2 --size 224``
"""
from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from abnexp.memory import SavedBytes  # noqa: E402
from abnexp.norm import NORM_LAYERS, build_norm_act  # noqa: E402


def measure(name, args, device):
    from abnexp.models import build_model

    torch.manual_seed(0)
    model = build_model(args.model, build_norm_act(name), num_classes=1000).to(device).train()
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    t0 = time.perf_counter()
    with SavedBytes(exclude=list(model.parameters())) as saved:
        out = model(x)
    fwd = time.perf_counter() - t0
    bwd = None
    if args.backward:
        t0 = time.perf_counter()
        out.float().logsumexp(1).sum().backward()
        bwd = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated(device) - before) if device.type == "cuda" else None
    del out, model, x
    gc.collect()
    return {"name": name, "bytes": saved.total, "tensors": len(saved.storages),
            "fwd": fwd, "bwd": bwd, "peak": peak}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnext101")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--device", default="auto")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--no-backward", dest="backward", action="store_false",
                   help="skip the backward pass (it verifies the in-place graphs)")
    p.add_argument("--strategies", default=",".join(NORM_LAYERS))
    p.add_argument("--out", default=None, help="default results/memory_<model>.md")
    args = p.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)

    rows = []
    for name in args.strategies.split(","):
        r = measure(name, args, device)
        rows.append(r)
        print(f"{name:20s} kept {r['bytes'] / args.batch / 2**20:9.1f} MiB/image "
              f"({r['tensors']} storages) fwd {r['fwd']:.1f}s"
              + (f" bwd {r['bwd']:.1f}s" if r["bwd"] is not None else ""), flush=True)

    ref = next((r for r in rows if r["name"] == "bn"), None)
    lines = [f"# Bytes kept for backward by {args.model} per image ({args.size}x{args.size}, "
             f"training mode)", "",
             f"Batch {args.batch}, float32, {'channels_last' if args.channels_last else 'contiguous'}"
             f", device {device.type}, torch {torch.__version__}; activation leaky_relu(0.01). "
             "Counted with torch.autograd.graph.saved_tensors_hooks: distinct storages saved "
             "for backward, parameters excluded, divided by the batch size. "
             + ("Backward run for every strategy (no autograd errors)." if args.backward
                else "Backward not run."), "",
             "| strategy | MiB per image | relative to bn |" + (" peak MiB |" if device.type == "cuda" else ""),
             "|---|---|---|" + ("---|" if device.type == "cuda" else "")]
    for r in rows:
        rel = f"{r['bytes'] / ref['bytes']:.3f}" if ref else "-"
        line = f"| {r['name']} | {r['bytes'] / args.batch / 2**20:.1f} | {rel} |"
        if device.type == "cuda":
            line += f" {r['peak'] / 2**20:.0f} |"
        lines.append(line)
    lines += ["", "Checkpointing as a drop-in norm layer drops z inside the layer, but the "
              "following convolution keeps z as its input, so it saves (almost) nothing "
              "at the network level; the in-place strategies share z with that convolution."]
    out = Path(args.out) if args.out else (Path(__file__).resolve().parents[1] / "results"
                                           / f"memory_{args.model}.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
