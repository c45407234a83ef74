#!/usr/bin/env python
"""Small-batch normalization on the demo data: normalization batch 2 vs BatchNorm at 32.

The MABN paper's Table 1 protocol in miniature: the same ResNet-18, the same gradient batch of
32 per step, statistics computed over groups of 2 consecutive samples (``norm.group_size=2``)
under BN, BRN, MABN and CBN, GroupNorm (batch-independent), and BN with normalization batch 32
(the reference). Each configuration is trained from scratch on the generated demo data
(abnexp.data.demo, 10 classes, 800 training / 200 validation images) for a few seeds through
the normal trainer; the last center-crop top-1 goes to a markdown table with mean +- standard
deviation over seeds and the command that produced it.

BRN's schedule and CBN's burn-in (in iterations = optimizer steps) are scaled to this run's
length (see ``scaled_options``).

Example (CPU, ~20-40 minutes on 2 cores):
``python scripts/small_batch_experiment.py --seeds 0,1,2 --epochs 12 --crop 32``
"""
from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]


def scaled_options(iterations: int) -> dict[str, list[str]]:
    """name -> norm overrides for a run of ``iterations`` optimizer steps.

    BRN: the reference schedule (5k / 25k / 40k of a long run) scaled so r_max/d_max start to
    open at 1/8 of the run and reach 3 / 5 at 5/8 and 1/2 (the same proportions as 5k/40k/25k
    of Ioffe's 40k+ steps). CBN: burn-in of 1/4 of the run (the paper: 25 of ~90 epochs) and the
    paper's window for 2 images, k = min(ceil(16 / 2), 8) = 8. MABN: warm-up of 1/30 of the run
    (the reference's 100 iterations are negligible in its 600k); its r stays 1 for the first
    1000 iterations (MABN2d's r_warmup_iters), i.e. throughout a run this short.
    """
    brn = [f"norm.renorm_start_iters={iterations // 8}", f"norm.r_max_iters={5 * iterations // 8}",
           f"norm.d_max_iters={iterations // 2}"]
    return {
        "BN (32)": ["norm=bn"],
        "BN (2)": ["norm=bn", "norm.group_size=2"],
        "BRN (2)": ["norm=brn", "norm.group_size=2", *brn],
        "MABN (2)": ["norm=mabn", "norm.group_size=2", f"norm.warmup_iters={max(iterations // 30, 1)}"],
        "CBN (2)": ["norm=cbn", "norm.group_size=2", "norm.window=8", f"norm.burnin_iters={iterations // 4}"],
        "GN": ["norm=gn"],
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--crop", type=int, default=32, help="training / validation crop (pixels)")
    p.add_argument("--batch-size", type=int, default=32, help="gradient batch per step")
    p.add_argument("--model", default="resnet18")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--configs", default=None, help="comma-separated subset of the table rows")
    p.add_argument("--runs", default=None, help="run folders (default: a temporary folder)")
    p.add_argument("--out", default=str(ROOT / "results" / "small_batch.md"))
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 avoids oversubscription "
                   "on a shared machine)")
    p.add_argument("--note", default="", help="a line added under the table (e.g. seeds not run)")
    args = p.parse_args(argv)

    import torch

    from abnexp.config import compose
    from abnexp.data.demo import PER_CLASS, SOURCES
    from abnexp.engine.trainer import train

    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    steps = args.epochs * (PER_CLASS["train"] * len(SOURCES) // args.batch_size)
    table = scaled_options(steps)
    names = args.configs.split(",") if args.configs else list(table)
    runs = Path(args.runs) if args.runs else Path(tempfile.mkdtemp(prefix="small_batch_"))
    common = [f"model={args.model}", f"data.batch_size={args.batch_size}", f"data.crop_size={args.crop}",
              f"data.large_crop_size={args.crop}", f"trainer.epochs={args.epochs}", "sched=cosine",
              f"optim.lr={args.lr}", "data.num_workers=0", "device=cpu", "trainer.log_every=1000"]
    command = shlex.join(["python", "scripts/small_batch_experiment.py", *(argv if argv is not None else sys.argv[1:])])
    header = (f"{args.model}, demo data (10 classes, 800 train / 200 val images), crop {args.crop} px, gradient "
              f"batch {args.batch_size}, {args.epochs} epochs = {steps} steps, SGD lr {args.lr} (Nesterov, "
              f"momentum 0.9, wd 1e-4), cosine schedule; (2) = statistics over groups of 2 consecutive "
              f"samples (`norm.group_size=2`). BRN schedule, "
              f"CBN burn-in and window as in `scaled_options` of the script. CPU ({args.threads} thread), "
              f"torch {torch.__version__}.")
    results: dict[str, list[tuple[int, float, float]]] = {name: [] for name in names}
    for seed in seeds:  # seeds outermost: the table is complete per seed if the run stops early
        for name in names:
            cfg = compose(common + table[name] + [f"seed={seed}"])
            t0 = time.perf_counter()
            metrics = train(cfg, runs / name.replace(" ", "").replace("(", "_").replace(")", "") / f"seed{seed}")
            results[name].append((seed, metrics["top1"], time.perf_counter() - t0))
            print(f"{name:10s} seed {seed}: top-1 {metrics['top1']:.2f} % ({results[name][-1][2]:.0f} s)", flush=True)
            write_table(Path(args.out), command, header, results, len(seeds), args.note)
    print(f"wrote {args.out}")


def write_table(out: Path, command: str, header: str, results: dict, num_seeds: int, note: str) -> None:
    """The markdown table of ``results`` (name -> [(seed, top-1 %, seconds)]), rewritten after every run."""
    done = sum(len(r) for r in results.values())
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = ["# Small-batch normalization on the demo data (normalization batch 2 vs BN at 32)", "",
             f"Command: `{command}`", "", header, "",
             "| norm (normalization batch) | top-1 % mean | std over seeds | per seed (seed: top-1) | s per run |",
             "|---|---|---|---|---|"]
    for name, runs in results.items():
        if not runs:
            continue
        acc = [a for _, a, _ in runs]
        std = f"{statistics.stdev(acc):.2f}" if len(acc) > 1 else "-"
        lines.append(f"| {name} | {statistics.mean(acc):.2f} | {std} | "
                     f"{', '.join(f'{s}: {a:.1f}' for s, a, _ in runs)} | "
                     f"{statistics.mean(t for _, _, t in runs):.0f} |")
    lines += ["", "Top-1 = center-crop validation accuracy after the last epoch (200 images: one image = 0.5 %). "
              "Seconds are wall time on a shared machine (1-min load average "
              f"{load:.1f} when this file was written): compare them only roughly.", ""]
    if done < num_seeds * len(results):
        lines += [f"**Partial: {done} of {num_seeds * len(results)} runs finished when this file was written.**", ""]
    if note:
        lines += [note, ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))


if __name__ == "__main__":
    main()
