#!/usr/bin/env python
"""Small-batch normalization on the demo data: normalization batch 2 vs BatchNorm at 32.

The MABN paper's ImageNet protocol in miniature (Yan et al., ICLR 2020, §5.1, Table 1): ResNet-18,
the same gradient batch of 32 per step, statistics over groups of 2 consecutive samples
(``norm.group_size=2``) under BN, BRN, MABN and CBN, GroupNorm (batch-independent), and BN over
the whole batch of 32 (the reference); zero-initialized residual branches for all. Demo data
(abnexp.data.demo: 10 classes, 800 training / 1,000 validation images, 64 px, trained and
evaluated at 64 px).

Protocol, in one command:

1. learning rate: for every norm and every value of ``--lrs``, one run (seed ``--select-seed``)
   trained on 75 % of the training split and evaluated (precise BN) on the held-out 25 %
   (``data.holdout``); the best value is kept. The validation split is not looked at.
2. ``--seeds`` runs per norm at that learning rate on the whole training split, each evaluated on
   the validation split twice: with the running statistics, and with statistics re-estimated on
   ``--precise-batches`` training batches after training (abnexp.eval.precise_bn).
3. ``--out`` (markdown: the settings, the table, mean +- standard deviation over seeds, the lr
   search) and ``--figure`` (top-1 per norm with error bars), rewritten after every run.

The papers' iteration counts are scaled to this run's length T (``paper_settings``). One process,
``--threads`` torch threads (1 by default: the machine is shared).

Example (about an hour on one CPU core):
``python scripts/small_batch_experiment.py``
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]
HOLDOUT = 0.25  # fraction of each class of the training split held out for the lr search
CBN_WINDOW = 8  # CBN paper §3.3: k = min(ceil(16 / images per GPU), 8) at 2 images -> 2k = 16
CBN_BURNIN = 25 / 90  # CBN paper §4.1: plain BN for the first 25 of 90 ImageNet epochs
MABN_BUFFER = 16  # MABN reference: buffer of 16 normalization batches
MABN_WARMUP = 100 / 600_000  # MABN reference: 100 warm-up iterations of 600k


def paper_settings(iterations: int) -> dict[str, list[str]]:
    """Table row -> its overrides, for a run of ``iterations`` optimizer steps (= training calls).

    MABN: buffer 16, warm-up the reference's fraction 100 / 600k of training (at least 1
    iteration; the SMA also waits until the buffer is full); its r stays 1 for the first 1000
    iterations (the reference's r warm-up), i.e. throughout a run this short. CBN: window
    k = 8 and plain BN during the first 25/90 of training. BRN: Ioffe's schedule (r_max, d_max
    open from 5k, reach 3 / 5 at 40k / 25k) scaled so that they open at 1/8 of the run and reach
    their limits at 5/8 and 1/2.
    """
    brn = [f"norm.renorm_start_iters={iterations // 8}", f"norm.r_max_iters={5 * iterations // 8}",
           f"norm.d_max_iters={iterations // 2}"]
    return {
        "BN (32)": ["norm=bn"],
        "BN (2)": ["norm=bn", "norm.group_size=2"],
        "BRN (2)": ["norm=brn", "norm.group_size=2", *brn],
        "GN": ["norm=gn"],
        "MABN (2)": ["norm=mabn", "norm.group_size=2", f"norm.buffer_size={MABN_BUFFER}",
                     f"norm.warmup_iters={max(round(MABN_WARMUP * iterations), 1)}"],
        "CBN (2)": ["norm=cbn", "norm.group_size=2", f"norm.window={CBN_WINDOW}",
                    f"norm.burnin_iters={round(CBN_BURNIN * iterations)}"],
    }


def train_and_evaluate(overrides: list[str], run_dir: Path, precise_batches: int) -> dict:
    """Trains ``overrides`` through abnexp's trainer, then evaluates its ``last.pt`` on the run's
    validation set (the held-out part of the training split when ``data.holdout`` > 0):
    {"running": top-1 %, "precise": top-1 % after precise BN (= running for norms without running
    statistics), "seconds": wall time}. The result is kept in ``run_dir/result.json`` and read back
    when the study is started again (the trainer resumes an unfinished run from its checkpoint)."""
    import torch
    from torch.utils.data import DataLoader

    from abnexp.config import compose
    from abnexp.engine.trainer import train
    from abnexp.eval.classification import evaluate
    from abnexp.eval.precise_bn import precise_bn, running_stats_layers
    from abnexp.tasks import build_task

    saved = run_dir / "result.json"
    if saved.is_file():
        return json.loads(saved.read_text())
    cfg = compose(overrides)
    t0 = time.perf_counter()
    metrics = train(cfg, run_dir)
    task = build_task(cfg)
    model = task.build_model()
    model.load_state_dict(torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"])
    train_set, val_set = task.datasets()
    val_loader = DataLoader(val_set, batch_size=100)
    cpu = torch.device("cpu")
    running = evaluate(model, val_loader, cpu)["top1"]
    if "top1" in metrics and abs(running - metrics["top1"]) > 1e-6:  # none when trainer.max_steps cut the epoch
        raise RuntimeError(f"{run_dir}: re-evaluated top-1 {running} differs from the trainer's {metrics['top1']}")
    precise = running
    if running_stats_layers(model):
        torch.manual_seed(cfg.seed)  # the batches and their augmentation
        loader = DataLoader(train_set, batch_size=cfg.data.batch_size, shuffle=True, drop_last=True)
        precise_bn(model, (images for images, _ in loader), precise_batches)
        precise = evaluate(model, val_loader, cpu)["top1"]
    result = {"running": running, "precise": precise, "seconds": time.perf_counter() - t0}
    saved.write_text(json.dumps(result) + "\n")
    return result


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--lrs", default="0.025,0.1", help="learning-rate grid searched per norm")
    p.add_argument("--select-seed", type=int, default=100, help="seed of the lr-search runs")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--max-steps", type=int, default=0, help="stop every run after N steps (0 = no cap; for tests)")
    p.add_argument("--precise-batches", type=int, default=16, help="training batches of precise BN")
    p.add_argument("--batch-size", type=int, default=32, help="gradient batch per step")
    p.add_argument("--configs", default=None, help="comma-separated subset of the table rows")
    p.add_argument("--runs", default=str(ROOT / "runs" / "small_batch_study"),
                   help="run folders; the same command started again continues the study there")
    p.add_argument("--out", default=str(ROOT / "results" / "small_batch.md"))
    p.add_argument("--figure", default=str(ROOT / "results" / "small_batch.png"))
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = p.parse_args(argv)

    import torch

    from abnexp.data.demo import PER_CLASS, SOURCES

    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    lrs = [float(v) for v in args.lrs.split(",")]
    n_train = PER_CLASS["train"] * len(SOURCES)
    n_search = n_train - len(SOURCES) * math.ceil(HOLDOUT * PER_CLASS["train"])
    steps = {"final": args.epochs * (n_train // args.batch_size), "search": args.epochs * (n_search // args.batch_size)}
    rows = {phase: paper_settings(t) for phase, t in steps.items()}
    names = args.configs.split(",") if args.configs else list(rows["final"])
    unknown = sorted(set(names) - set(rows["final"]))
    if unknown:
        raise SystemExit(f"--configs: unknown rows {unknown}; valid: {', '.join(rows['final'])}")
    runs = Path(args.runs)
    common = ["model=resnet18", "model.zero_init_residual=true", f"data.batch_size={args.batch_size}",
              "data.crop_size=64", "data.large_crop_size=64", "data.resize_ratio=1.0",
              # the study's augmentation, ImageNet's strength (the demo recipe's became lighter)
              "data.color_jitter=0.4", "data.lighting=0.1", "data.min_scale=0.25",
              f"trainer.epochs={args.epochs}", f"trainer.eval_every={args.epochs}",
              f"trainer.max_steps={args.max_steps}", "sched=cosine", "sched.warmup_epochs=0",
              "optim.scale_lr=false",  # the lr values are per run, not per 256 images as in the demo's recipe
              "data.num_workers=0", "device=cpu", "trainer.log_every=1000"]
    study = {"command": shlex.join(["python", "scripts/small_batch_experiment.py",
                                    *(argv if argv is not None else sys.argv[1:])]),
             "epochs": args.epochs, "select_seed": args.select_seed, "steps": steps, "lrs": lrs, "seeds": seeds, "batch_size": args.batch_size,
             "precise_batches": args.precise_batches, "threads": args.threads, "torch": torch.__version__,
             "settings": {n: rows["final"][n] for n in names}, "search": {n: {} for n in names},
             "lr": {}, "final": {n: [] for n in names}}
    t_start = time.perf_counter()

    def run(name: str, phase: str, extra: list[str], tag: str) -> dict:
        folder = runs / phase / name.replace(" ", "").replace("(", "_").replace(")", "") / tag
        r = train_and_evaluate(common + rows[phase][name] + extra, folder, args.precise_batches)
        print(f"[{(time.perf_counter() - t_start) / 60:5.1f} min] {phase:6s} {name:9s} {tag}: top-1 running "
              f"{r['running']:.1f} %, precise BN {r['precise']:.1f} % ({r['seconds']:.0f} s)", flush=True)
        return r

    for name in names:  # 1. the lr search on the held-out part of the training split
        for lr in lrs:
            study["search"][name][lr] = run(name, "search", [f"optim.lr={lr}", f"data.holdout={HOLDOUT}",
                                                              f"seed={args.select_seed}"], f"lr{lr}")
        study["lr"][name] = max(lrs, key=lambda lr: study["search"][name][lr]["precise"])  # ties: the first
        write_outputs(study, Path(args.out), Path(args.figure))
    for seed in seeds:  # 2. seeds outermost: every row has a value if the study is stopped early
        for name in names:
            r = run(name, "final", [f"optim.lr={study['lr'][name]}", f"seed={seed}"], f"seed{seed}")
            study["final"][name].append({"seed": seed, **r})
            write_outputs(study, Path(args.out), Path(args.figure))
    print(f"wrote {args.out} and {args.figure} in {(time.perf_counter() - t_start) / 60:.1f} min")


def _mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}" if len(values) > 1 else f"{values[0]:.1f}"


def write_outputs(study: dict, out: Path, figure: Path) -> None:
    """``out``: the markdown report of ``study``; ``figure``: top-1 per norm, mean ± std over seeds
    with and without precise BN (PNG); ``out`` with suffix .json: the raw numbers."""
    from abnexp.data.demo import PER_CLASS, SOURCES, VERSION

    s, final = study, study["final"]
    n_train, n_val = (len(SOURCES) * PER_CLASS[split] for split in ("train", "val"))
    done = sum(len(r) for r in final.values())
    total = len(s["seeds"]) * len(final)
    minutes = sum(r["seconds"] for rows in final.values() for r in rows) / 60 + sum(
        r["seconds"] for grid in s["search"].values() for r in grid.values()) / 60
    settings = "; ".join(f"{n}: `{' '.join(o for o in opts if not o.startswith('norm='))}`"
                         for n, opts in s["settings"].items() if len(opts) > 1)
    lines = [
        "# Small-batch normalization on the demo data, the quick version (normalization batch 2 vs BN at 32)", "",
        "Minutes on a CPU, and too small to separate the norms (one seed moves a row by several points): "
        "the same study on real images, with intervals, is scripts/fashion_mnist_studies.py "
        "(results/fashion_mnist_small_batch.md).", "",
        f"Command: `{s['command']}` ({minutes:.0f} min of training and evaluation, one process, "
        f"{s['threads']} torch thread, torch {s['torch']}).", "",
        f"ResNet-18 (torchvision's, zero-initialized residual branches: `model.zero_init_residual=true`), "
        f"demo data (version {VERSION}: 10 classes, {n_train} train / {n_val} val images of 64 px, trained and "
        f"evaluated at 64 px), "
        f"gradient batch {s['batch_size']}, {s['epochs']} epochs = {s['steps']['final']} steps, SGD "
        f"(Nesterov, momentum 0.9, wd 1e-4), cosine schedule. (2) = statistics over groups of 2 consecutive "
        f"samples of the batch of 32 (`norm.group_size=2`, the MABN paper's normalization batch). The papers' "
        f"settings scaled to T = {s['steps']['final']} steps: MABN buffer {MABN_BUFFER} normalization batches, "
        f"warm-up 100/600k of T (the reference's; r = 1 throughout, its r warm-up being 1000 iterations); "
        f"CBN window k = {CBN_WINDOW} (2k = 16), burn-in 25/90 of T (the paper's 25 of 90 epochs); BRN's "
        f"r_max / d_max schedule scaled to T. Overrides: {settings}.", "",
        f"Learning rate per norm: the best (precise-BN top-1) of {', '.join(map(str, s['lrs']))} in one run "
        f"(seed {s['select_seed']}) trained on 75 % of the training split and "
        f"evaluated on the held-out 25 % (`data.holdout=0.25`, {s['steps']['search']} steps); the validation "
        f"split is used only for the table below.", "",
        "| norm (normalization batch) | lr | top-1 % running stats | top-1 % precise BN | per seed (running / precise) |",
        "|---|---|---|---|---|"]
    for name, rows in final.items():
        if not rows:
            continue
        lines.append(f"| {name} | {s['lr'][name]} | {_mean_std([r['running'] for r in rows])} | "
                     f"{_mean_std([r['precise'] for r in rows])} | "
                     f"{', '.join('{seed}: {running:.1f} / {precise:.1f}'.format(**r) for r in rows)} |")
    lines += ["", f"Top-1 = center-crop validation accuracy after the last epoch, mean ± standard deviation over "
              f"seeds {', '.join(map(str, s['seeds']))} ({n_val} images: one image = {100 / n_val:g} %). Running stats: the "
              f"statistics kept during training; precise BN: re-estimated with the final weights as the "
              f"cumulative average over {s['precise_batches']} training batches of {s['batch_size']} "
              f"(abnexp.eval.precise_bn; GN has no running statistics, both columns are the same run).", "",
              "Learning-rate search (held-out top-1 %, running / precise):", "",
              "| norm | " + " | ".join(f"lr {lr}" for lr in s["lrs"]) + " |", "|---|" + "---|" * len(s["lrs"])]
    for name, grid in s["search"].items():
        if grid:
            lines.append(f"| {name} | " + " | ".join(
                f"{grid[lr]['running']:.1f} / {grid[lr]['precise']:.1f}" if lr in grid else "-" for lr in s["lrs"]) + " |")
    if done < total:
        lines += ["", f"**Partial: {done} of {total} runs finished when this file was written.**"]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(study, indent=1, default=str) + "\n")
    plot(final, figure)


def plot(final: dict, figure: Path) -> None:
    """Bar chart: top-1 % per norm, running statistics vs precise BN, error bars = std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, rows in final.items() if rows]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for k, (key, label) in enumerate((("running", "running statistics"), ("precise", "precise BN"))):
        values = [[r[key] for r in final[n]] for n in names]
        ax.bar([i + (k - 0.5) * 0.38 for i in range(len(names))], [statistics.mean(v) for v in values], 0.38,
               yerr=[statistics.stdev(v) if len(v) > 1 else 0 for v in values], capsize=3, label=label)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("validation top-1 [%]")
    ax.set_ylim(0, 100)
    ax.axhline(10, color="gray", lw=0.8, ls=":")  # chance: 10 classes
    ax.set_title("ResNet-18 on the demo data: normalization batch 2 vs BN(32)")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    figure.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(figure, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
