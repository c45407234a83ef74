#!/usr/bin/env python
"""The papers' claims on real images: two studies on Fashion-MNIST's 10,000 test images (issue 27).

Study 1, InPlace-ABN parity (InPlace-ABN Table 2 and supplementary Table 1 in miniature): ``bn``,
``inplace_abn``, ``inplace_abn_ii`` and ``checkpoint_proposed`` with Leaky ReLU (slope 0.01) and
``bn`` with ReLU, the same recipe and seeds; each network evaluated with its own activation and with
the other one (ReLU <-> Leaky ReLU, the supplementary's swap). Every difference from ``bn`` + Leaky
ReLU is paired by seed (same seed = same initialization and data order) and given with its 95 %
t-interval over seeds: an interval containing 0 = inside the seed noise.

Study 2, small batches on real images: the rows of scripts/small_batch_experiment.py (BN(32),
BN(2), BRN(2), GN, MABN(2), CBN(2); normalization batch 2 inside a gradient batch of 32, the papers'
iteration counts scaled to the run, zero-initialized residual branches), the learning rate per
norm chosen on ``data.holdout`` of the training split (seed ``--select-seed``), then ``--seeds``
runs per norm evaluated on the test set with running statistics and with precise BN. Orderings
checked, each as a paired difference with its 95 % t-interval: the MABN paper's (Table 1: BN(32) ≳
MABN(2) > BRN(2) > BN(2)) and the CBN paper's Table 3 (CBN > GN > BRN > BN at batch 2).

Both use the recipe of configs/experiment/fashion_mnist (ResNet-18, small_pool stem, batch 32,
cosine lr) on a training subset (``--train-subset`` images per class) for ``--epochs`` epochs;
every cell is evaluated on the full test set. Each run's result is kept in its run folder and in the
study's results JSON, so the same command started again continues (the trainer resumes an unfinished
run; a run recorded in a JSON written with the same settings is not trained again, even when the run
folders are gone). Outputs, rewritten after every run: results/fashion_mnist_parity.{md,json,png}
and results/fashion_mnist_small_batch.{md,json,png} with the command, machine, torch version and time.

Example: ``python scripts/fashion_mnist_studies.py --root /usr/share/datasets/fashion-mnist``. Size:
45 runs of 624 steps (the lr search's too: the held-out 600 images per class come after the first
1,000), each with 3-4 passes over the test set (the search's: over the 6,000 held-out images);
measured 272-320 s per Study 1 run and 250-350 s per search run on two cores (2 torch threads), so
about 4 hours in all; ``--train-subset`` and ``--epochs`` trade it against accuracy.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

from small_batch_experiment import paper_settings, train_and_evaluate  # noqa: E402

RECIPE = "experiment=fashion_mnist/resnet18_bn"
HOLDOUT = 0.1  # of each class of the training split (600 images): the lr search's validation set
PARITY = {  # Study 1 row -> (norm option, training activation)
    "BN + Leaky ReLU": ("bn", "leaky_relu"),
    "InPlace-ABN + Leaky ReLU": ("inplace_abn", "leaky_relu"),
    "InPlace-ABN-II + Leaky ReLU": ("inplace_abn_ii", "leaky_relu"),
    "checkpoint (proposed) + Leaky ReLU": ("checkpoint_proposed", "leaky_relu"),
    "BN + ReLU": ("bn", "relu"),
}
SWAP = {"leaky_relu": "relu", "relu": "leaky_relu"}
ORDERINGS = {  # the papers' claims as (better, worse) pairs
    "MABN Table 1": [("BN (32)", "MABN (2)"), ("MABN (2)", "BRN (2)"), ("BRN (2)", "BN (2)")],
    "CBN Table 3": [("CBN (2)", "GN"), ("GN", "BRN (2)"), ("BRN (2)", "BN (2)")],
}


def t_interval(values: list[float]) -> tuple[float, float, float]:
    """(mean, low, high): the 95 % Student-t interval of the mean of ``values`` (n >= 2)."""
    from scipy import stats

    m = statistics.mean(values)
    half = stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return m, m - half, m + half


def paired(a: list[dict], b: list[dict], key: str) -> str:
    """'mean [low, high]' of a - b over the seeds both have (a markdown cell), '-' under 2 seeds."""
    by_seed = {r["seed"]: r[key] for r in b}
    diffs = [r[key] - by_seed[r["seed"]] for r in a if r["seed"] in by_seed]
    if len(diffs) < 2:
        return "-"
    m, lo, hi = t_interval(diffs)
    verdict = "inside the noise" if lo <= 0 <= hi else ("real: higher" if lo > 0 else "real: lower")
    return f"{m:+.2f} [{lo:+.2f}, {hi:+.2f}] ({verdict})"


def mean_std(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.2f}" if values else "-"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def swapped_top1(overrides: list[str], activation: str, run_dir: Path) -> float:
    """Test top-1 % of ``run_dir``'s last.pt rebuilt as ``norm=bn`` with ``norm.activation=activation``,
    kept in ``run_dir/swap.json``. The weights depend on neither: in evaluation every strategy of
    Study 1 computes the same function of the same parameters and buffers (and an in-place layer
    cannot be built with ReLU, which it could not invert in training)."""
    import torch
    from torch.utils.data import DataLoader

    from abnexp.config import compose
    from abnexp.eval.classification import evaluate
    from abnexp.tasks import build_task

    saved = run_dir / "swap.json"
    if saved.is_file():
        return json.loads(saved.read_text())["top1"]
    kept = [o for o in overrides if not o.startswith(("norm=", "norm.activation="))]
    task = build_task(compose([*kept, "norm=bn", f"norm.activation={activation}"]))
    model = task.build_model()
    model.load_state_dict(torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"])
    top1 = evaluate(model, DataLoader(task.datasets()[1], batch_size=100), torch.device("cpu"))["top1"]
    saved.write_text(json.dumps({"activation": activation, "top1": top1}) + "\n")
    return top1


def recorded(path: Path, s: dict, keys: tuple[str, ...]) -> dict:
    """The study JSON at ``path`` when it was written with the same ``keys`` of ``s`` (the settings
    its runs depend on), else {} (no file, or other settings: every run is trained again)."""
    if not path.is_file():
        return {}
    old = json.loads(path.read_text())
    same = all(old.get(k) == json.loads(json.dumps(s[k], default=str)) for k in keys)
    return old if same else {}


def header(s: dict, title: str, minutes: float) -> list[str]:
    return [f"# {title}", "",
            f"Command: `{s['command']}`; {minutes:.0f} min of training and evaluation on {s['machine']}, "
            f"torch threads: {s['threads']}, torch {s['torch']}.", "",
            f"Recipe `{RECIPE}` (ResNet-18 with the small_pool stem, SGD Nesterov, cosine lr, batch "
            f"{s['batch_size']}) for {s['epochs']} epoch(s) on the first {s['train_subset'] or 6000} training images "
            f"of each class ({s['steps']} steps); top-1 on the whole test set ({s['test_images']} images) after the "
            f"last epoch. "
            f"Intervals: 95 % Student-t over the seeds' paired differences (same seed = same initialization "
            f"and data order); one containing 0 is inside the seed noise.", ""]


def write_parity(s: dict, out: Path) -> None:
    rows = s["parity"]
    minutes = sum(r["seconds"] for runs in rows.values() for r in runs) / 60
    lines = header(s, "InPlace-ABN parity on Fashion-MNIST (Table 2 / supplementary Table 1 in miniature)", minutes)
    lines += ["| training norm + activation | top-1 % own activation | Δ vs BN + Leaky ReLU | top-1 % activation "
              "swapped | Δ swapped vs own | per seed (own / swapped) |", "|---|---|---|---|---|---|"]
    reference = rows["BN + Leaky ReLU"]
    for name, runs in rows.items():
        if runs:
            lines.append(f"| {name} | {mean_std([r['running'] for r in runs])} | "
                         f"{paired(runs, reference, 'running') if name != 'BN + Leaky ReLU' else '—'} | "
                         f"{mean_std([r['swapped'] for r in runs])} | "
                         f"{paired([{**r, 'running': r['swapped']} for r in runs], runs, 'running')} | "
                         f"{', '.join('{seed}: {running:.2f} / {swapped:.2f}'.format(**r) for r in runs)} |")
    _finish(lines, s, rows, out, "test top-1 [%] (own activation)", "running")


def write_small_batch(s: dict, out: Path) -> None:
    rows = s["small_batch"]
    minutes = (sum(r["seconds"] for runs in rows.values() for r in runs)
               + sum(r["seconds"] for grid in s["search"].values() for r in grid.values())) / 60
    lines = header(s, "Small-batch normalization on Fashion-MNIST (normalization batch 2 in 32)", minutes)
    lines += ["Every row with zero-initialized residual branches (`model.zero_init_residual=true`), as "
              "scripts/small_batch_experiment.py.", "",
              f"Learning rate per norm: the best precise-BN top-1 of {s['lrs']} (seed {s['select_seed']}) "
              f"trained without and evaluated on the last {HOLDOUT:.0%} of each class of the training split "
              f"(`data.holdout={HOLDOUT}`); the test set is used only below. Settings: "
              + "; ".join(f"{n}: `{' '.join(o)}`" for n, o in s["settings"].items()) + ".", "",
              "| norm (normalization batch) | lr | top-1 % running stats | top-1 % precise BN | 95 % interval (precise) |",
              "|---|---|---|---|---|"]
    for name, runs in rows.items():
        if runs:
            ci = t_interval([r["precise"] for r in runs]) if len(runs) > 1 else None
            lines.append(f"| {name} | {s['lr'].get(name, '-')} | {mean_std([r['running'] for r in runs])} | "
                         f"{mean_std([r['precise'] for r in runs])} | "
                         f"{f'[{ci[1]:.2f}, {ci[2]:.2f}]' if ci else '-'} |")
    for paper, pairs in ORDERINGS.items():
        lines += ["", f"{paper}'s ordering, paired differences (precise BN):", "",
                  "| claim | Δ top-1 [95 % interval] |", "|---|---|"]
        lines += [f"| {a} > {b} | {paired(rows[a], rows[b], 'precise')} |" for a, b in pairs if a in rows and b in rows]
    _finish(lines, s, rows, out, "test top-1 [%] (precise BN)", "precise")


def _finish(lines: list[str], s: dict, rows: dict, out: Path, ylabel: str, key: str) -> None:
    done, total = sum(map(len, rows.values())), len(rows) * len(s["seeds"])
    if done < total:
        lines += ["", f"**Partial: {done} of {total} runs finished when this file was written.**"]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(s, indent=1, default=str) + "\n")
    _plot(rows, key, ylabel, out.with_suffix(".png"))


def _plot(rows: dict, key: str, ylabel: str, figure: Path) -> None:
    """Each seed's top-1 as a dot, the mean as a bar, per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, runs in rows.items() if runs]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    for i, n in enumerate(names):
        values = [r[key] for r in rows[n]]
        ax.bar(i, statistics.mean(values), 0.6, color="C0", alpha=0.4)
        ax.plot([i] * len(values), values, "o", color="C0", ms=4)
    ax.set_xticks(range(len(names)), [n.replace(" + ", "\n+ ") for n in names], fontsize=7)
    ax.set_ylabel(ylabel)
    low = min(r[key] for n in names for r in rows[n])
    ax.set_ylim(max(0.0, low - 3), 100)
    fig.tight_layout()
    figure.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(figure, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", required=True, help="folder of the four Fashion-MNIST IDX files")
    p.add_argument("--studies", default="parity,small_batch")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--train-subset", type=int, default=1000, help="training images per class (0 = all 6000)")
    p.add_argument("--lrs", default="0.02,0.05", help="Study 2's learning-rate grid (per norm)")
    p.add_argument("--select-seed", type=int, default=100)
    p.add_argument("--precise-batches", type=int, default=32)
    p.add_argument("--max-steps", type=int, default=0, help="cap every run at N steps (0 = none; for checks)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", default=str(ROOT / "runs" / "fashion_mnist_studies"))
    p.add_argument("--out", default=str(ROOT / "results"), help="folder of the .md / .json / .png files")
    args = p.parse_args(argv)

    import torch

    from abnexp.data.fashion_mnist import check_root, load_split

    torch.set_num_threads(args.threads)
    test_images = len(load_split(check_root(args.root), "test"))
    seeds = [int(v) for v in args.seeds.split(",")]
    per_class = args.train_subset or 6000
    steps = args.epochs * (10 * per_class // 32)
    if args.max_steps:
        steps = min(steps, args.max_steps)
    common = [RECIPE, f"data.root={args.root}", f"data.train_subset={args.train_subset}", f"trainer.epochs={args.epochs}",
              f"trainer.eval_every={args.epochs}", f"trainer.max_steps={args.max_steps}", "data.num_workers=0",
              "device=cpu", "trainer.log_every=1000"]
    s = {"command": shlex.join(["python", "scripts/fashion_mnist_studies.py", *(argv if argv is not None else sys.argv[1:])]),
         "machine": f"{os.cpu_count()} CPUs, {platform.platform()}",
         "torch": torch.__version__, "threads": args.threads, "seeds": seeds, "epochs": args.epochs,
         "train_subset": args.train_subset, "batch_size": 32, "steps": steps, "test_images": test_images}
    same = ("epochs", "train_subset", "batch_size", "steps", "test_images", "threads")
    runs, out, t0 = Path(args.runs), Path(args.out), time.perf_counter()

    def run(folder: Path, overrides: list[str]) -> dict:
        r = train_and_evaluate(common + overrides, runs / folder, args.precise_batches)
        print(f"[{(time.perf_counter() - t0) / 60:6.1f} min] {folder}: top-1 {r['running']:.2f} % "
              f"(precise {r['precise']:.2f} %, {r['seconds']:.0f} s)", flush=True)
        return r

    if "parity" in args.studies:
        s["parity"] = {name: [] for name in PARITY}
        old = recorded(out / "fashion_mnist_parity.json", s, same)
        kept = {(name, r["seed"]): r for name, rs in old.get("parity", {}).items() for r in rs}
        for seed in seeds:  # seeds outermost: every row has values if stopped early
            for name, (norm, activation) in PARITY.items():
                overrides = [f"norm={norm}", f"norm.activation={activation}", f"seed={seed}"]
                folder = Path("parity") / f"{norm}_{activation}" / f"seed{seed}"
                r = kept.get((name, seed))
                if r is None:
                    r = {"seed": seed, **run(folder, overrides)}
                    r["swapped"] = swapped_top1(common + overrides, SWAP[activation], runs / folder)
                s["parity"][name].append(r)
                write_parity(s, out / "fashion_mnist_parity.md")
    if "small_batch" in args.studies:
        lrs = [float(v) for v in args.lrs.split(",")]
        search_steps = args.epochs * (10 * (min(per_class, 6000 - math.ceil(HOLDOUT * 6000))) // 32)
        table = {"final": paper_settings(steps), "search": paper_settings(min(search_steps, args.max_steps or search_steps))}
        zero = ["model.zero_init_residual=true"]  # as scripts/small_batch_experiment.py
        s.update(lrs=lrs, select_seed=args.select_seed, settings=table["final"], lr={},
                 search={n: {} for n in table["final"]}, small_batch={n: [] for n in table["final"]})
        old = recorded(out / "fashion_mnist_small_batch.json", s, (*same, "lrs", "select_seed", "settings"))
        kept = {(name, r["seed"]): r for name, rs in old.get("small_batch", {}).items() for r in rs}
        searched = {(name, float(lr)): r for name, grid in old.get("search", {}).items() for lr, r in grid.items()}
        tag = lambda n: n.replace(" ", "").replace("(", "_").replace(")", "")  # noqa: E731
        for name in table["final"]:
            for lr in lrs:
                s["search"][name][lr] = searched.get((name, lr)) or run(
                    Path("search") / tag(name) / f"lr{lr}",
                    [*table["search"][name], *zero, f"optim.lr={lr}", f"data.holdout={HOLDOUT}", f"seed={args.select_seed}"])
            s["lr"][name] = max(lrs, key=lambda lr: s["search"][name][lr]["precise"])
        for seed in seeds:
            for name in table["final"]:
                r = kept.get((name, seed)) or {"seed": seed, **run(
                    Path("small_batch") / tag(name) / f"seed{seed}",
                    [*table["final"][name], *zero, f"optim.lr={s['lr'][name]}", f"seed={seed}"])}
                s["small_batch"][name].append(r)
                write_small_batch(s, out / "fashion_mnist_small_batch.md")
    print(f"done in {(time.perf_counter() - t0) / 60:.1f} min; outputs in {out}")


if __name__ == "__main__":
    main()
