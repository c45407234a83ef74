"""``abnexp table``'s pictures (matplotlib, PNG): a paper table's trend where the paper draws one
(:data:`TRENDS`: CBN Table 3 as the paper's Figure 1, top-1 against the batch size per GPU, one
line per norm, ours solid and the paper's dashed with hollow markers), and the training loss
curves of a table's runs (from their ``metrics.jsonl``).

Figures are built with :class:`matplotlib.figure.Figure` (no pyplot, no GUI backend) and written
with its Agg canvas.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from statistics import mean
from typing import Callable

from matplotlib.figure import Figure

from abnexp.report.paper_tables import TABLES, PaperTable


@dataclass(frozen=True)
class Trend:
    """How a table's columns lie on an x axis: one line per table row."""

    x_label: str
    y_label: str
    x_of: Callable[[str], float]  # column label -> x
    log2_x: bool = False
    title: str = ""


TRENDS: dict[str, Trend] = {
    "cbn_t3": Trend("batch size per GPU", "top-1 [%], center crop (paper: ImageNet, 224²)",
                    lambda label: float(label.removeprefix("bs ")), log2_x=True,
                    title="CBN Table 3 / Figure 1: ResNet-18 top-1 vs batch size per GPU"),
}
"""Table key -> its trend; tables not listed have no trend figure."""

DPI = 120


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return path


def trend_figure(table: PaperTable, paper: dict, ours: dict) -> Figure:
    """The :data:`TRENDS` figure of ``table``: per row, our means (solid line, filled markers; rows
    without a run are left out) and the paper's numbers (dashed, hollow markers, "paper" in the
    legend), in the row's colour.

    Args:
        paper: {(table key, row, column label): the paper's number} (paper_tables.paper_values()).
        ours: {(table key, row, column label): [our values]} (runs of one cell are averaged).

    Raises:
        KeyError: ``table`` has no trend in :data:`TRENDS`.
    """
    trend = TRENDS[table.key]
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    for i, row in enumerate(table.rows):
        colour = f"C{i}"
        for source, style in (("paper", dict(ls="--", marker="o", mfc="none")), ("ours", dict(ls="-", marker="s"))):
            points = []
            for col in table.columns:
                key = (table.key, row, col.label)
                value = paper.get(key) if source == "paper" else (mean(ours[key]) if ours.get(key) else None)
                if value is not None:
                    points.append((trend.x_of(col.label), value))
            if points:
                xs, ys = zip(*sorted(points))
                ax.plot(xs, ys, color=colour, label=f"{row} ({source})", **style)
    if trend.log2_x:
        ax.set_xscale("log", base=2)
        ticks = sorted({trend.x_of(c.label) for c in table.columns})
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.set_xlabel(trend.x_label)
    ax.set_ylabel(trend.y_label)
    ax.set_title(trend.title or table.title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncols=2)
    return fig


def train_losses(run: Path) -> tuple[list[int], list[float]]:
    """(steps, losses) of the train rows of ``<run>/metrics.jsonl`` (a step logged again after a
    resume keeps its last value); empty lists without the file."""
    path = run / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    by_step = {r["step"]: r["loss"] for r in rows if r.get("split") == "train"}
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def loss_figure(runs: list[tuple[str, Path]], title: str) -> Figure:
    """Training loss (global batch mean per log line) against the optimizer step, one line per run.

    Args:
        runs: (legend label, run dir) pairs; runs without train rows are left out.
    """
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    for label, run in runs:
        steps, losses = train_losses(run)
        if steps:
            ax.plot(steps, losses, label=label, marker="." if len(steps) < 30 else None)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)
    return fig


def write_figures(table_key: str, paper: dict, ours: dict, runs: list[tuple[str, Path]], out_dir: Path) -> list[Path]:
    """Writes ``<table>_trend.png`` (tables of :data:`TRENDS`) and ``<table>_loss.png`` (if a run has
    train rows) into ``out_dir``; returns the files written."""
    written = []
    table = TABLES.get(table_key)
    if table is not None and table_key in TRENDS:
        written.append(_save(trend_figure(table, paper, ours), out_dir / f"{table_key}_trend.png"))
    if any(train_losses(run)[0] for _, run in runs):
        title = f"{table.title.split(':')[0] if table else 'Runs of no paper table'}: training loss"
        written.append(_save(loss_figure(runs, title), out_dir / f"{table_key}_loss.png"))
    return written
