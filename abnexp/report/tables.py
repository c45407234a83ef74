"""``abnexp table``: collect the results of runs and write the papers' tables, ours beside theirs.

A run is a folder holding ``config.yaml`` (written by ``abnexp train``) and its results: its
``eval.json`` (written by ``abnexp eval``) or, before it is evaluated, the last validation row of
its ``metrics.jsonl`` read as the protocol that the training-time validation computes
(:data:`TRAINING_VALIDATION`), marked with :data:`PROVISIONAL` in the tables; ``eval.json`` wins
where both exist. Runs whose config has ``experiment.table`` fill the cells of
that paper table (several runs of one cell — seeds — are averaged, and their count shown);
the others are listed in a plain table, and the paper's numbers (abnexp.report.paper_tables) go
beside ours. Output per table: ``<key>.md`` and ``<key>.csv``, and its pictures
(abnexp.report.plots): ``<key>_trend.png`` where the paper draws the table as a trend (CBN
Table 3), ``<key>_loss.png`` with the training loss curves of the table's runs (``runs_loss.png``
for the runs of no table).
"""
from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path
from statistics import mean

from omegaconf import OmegaConf

from abnexp.errors import ConfigError
from abnexp.report.paper_tables import TABLES, PaperTable, paper_values
from abnexp.report.plots import write_figures

MISSING = "—"
PROVISIONAL = "†"
PROVISIONAL_NOTE = (f"{PROVISIONAL} training-time validation (the run's last validation in metrics.jsonl; "
                    f"`abnexp eval` not run yet)")


def _unflatten(row: dict) -> dict:
    """Detection's validation keys (``bbox_AP``, ``segm_AP50``, ...) as protocols (``bbox.AP``)."""
    out: dict = defaultdict(dict)
    for key, value in row.items():
        protocol, _, name = key.partition("_")
        if protocol in ("bbox", "segm") and name:
            out[protocol][name] = value
    return dict(out)


TRAINING_VALIDATION = {
    "cls": lambda row: {"center": row},  # validate() = the center-crop protocol at data.crop_size
    "semseg": lambda row: {"single_scale": row},  # single scale, no flip
    "detection": _unflatten,  # COCOeval of the val split, flattened as <iou type>_<metric>
}
"""task name -> the eval.json protocols that its training-time validation row (abnexp.tasks:
``Task.validate``, logged to metrics.jsonl) is."""


def _last_validation(run: Path) -> dict | None:
    path = run / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    vals = [r for r in rows if r.get("split") == "val"]
    return vals[-1] if vals else None


def run_result(run: Path, cfg) -> tuple[dict, bool] | None:
    """(eval.json-like result, whether it is provisional) of ``run``: its eval.json, else its last
    training-time validation (:data:`TRAINING_VALIDATION`), else None."""
    if (run / "eval.json").is_file():
        return json.loads((run / "eval.json").read_text()), False
    row = _last_validation(run)
    task = cfg.get("task", {}).get("name", "cls")
    if row is None or task not in TRAINING_VALIDATION:
        return None
    return {"protocols": TRAINING_VALIDATION[task](row), "epoch": row.get("epoch")}, True


def find_runs(paths: list[str]) -> list[Path]:
    """Run dirs (``config.yaml`` + ``eval.json`` or ``metrics.jsonl``) at or below ``paths``.

    Raises:
        ConfigError: a path does not exist.
    """
    runs = []
    for p in map(Path, paths):
        if not p.exists():
            raise ConfigError(f"{p} does not exist (give run dirs or a sweep dir)")
        runs += [c.parent for pattern in ("eval.json", "metrics.jsonl") for c in p.rglob(pattern)
                 if (c.parent / "config.yaml").is_file()]
    return sorted(set(runs))


def pending_runs(paths: list[str]) -> list[Path]:
    """The run dirs at or below ``paths`` with no result yet (no eval.json and no validation row in
    metrics.jsonl, e.g. a sweep stopped by ``trainer.max_steps`` before its first validation): the
    runs :func:`collect` leaves out."""
    return [run for run in find_runs(paths) if run_result(run, OmegaConf.load(run / "config.yaml")) is None]


def metric(result: dict, path: str) -> float | None:
    """The value at dotted ``path`` of an eval.json dict (``100-path``: 100 minus it), or None."""
    complement = path.startswith("100-")
    node = result
    for part in path.removeprefix("100-").split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return 100.0 - node if complement else float(node)


def collect(runs: list[Path]) -> tuple[dict, list[dict], set]:
    """({(table, row, column): [our values]}, [plain rows of runs without a table], the cells with a
    provisional value (:func:`run_result`)); runs with no result yet are left out."""
    cells: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    plain, provisional = [], set()
    for run in runs:
        cfg = OmegaConf.load(run / "config.yaml")
        found = run_result(run, cfg)
        if found is None:
            continue
        result, training_time = found
        exp = cfg.get("experiment")
        exp = OmegaConf.to_container(exp, resolve=True) if exp is not None else {}
        table = TABLES.get(exp.get("table"))
        if table is None:
            source = f"validation, epoch {result['epoch']} {PROVISIONAL}" if training_time else "eval.json"
            plain.append({"run": str(run), "model": cfg.model.name, "norm": cfg.norm.name,
                          "data": cfg.data.name, **_headline(result), "source": source})
            continue
        for col in table.columns:
            if exp.get("column") not in (None, col.label):
                continue
            value = metric(result, col.metric)
            if value is not None:
                cells[(table.key, exp["row"], col.label)].append(value)
                if training_time:
                    provisional.add((table.key, exp["row"], col.label))
    return cells, plain, provisional


def labelled_runs(runs: list[Path]) -> dict[str, list[tuple[str, Path]]]:
    """{table key, or "runs" for runs of no table: [(legend label, run dir)]}: a table's runs are
    labelled by their row (and column) and seed, the others by model, norm and run dir name."""
    out: dict[str, list[tuple[str, Path]]] = defaultdict(list)
    for run in runs:
        cfg = OmegaConf.load(run / "config.yaml")
        exp = cfg.get("experiment")
        if exp is not None and exp.get("table") in TABLES:
            cell = " / ".join(str(v) for v in (exp.row, exp.get("column")) if v)
            out[exp.table].append((f"{cell}, seed {cfg.seed}", run))
        else:
            out["runs"].append((f"{cfg.model.name}-{cfg.norm.name} ({run.name})", run))
    return out


HEADLINES = {"top1": "top-1", "miou": "mIoU", "AP": "AP"}
"""eval.json metric -> its column heading in the plain table (per protocol)."""


def _headline(result: dict) -> dict:
    """A few headline numbers of any eval.json for the plain table."""
    out = {}
    for name, r in (result.get("protocols") or {}).items():
        for key, heading in HEADLINES.items():
            if isinstance(r, dict) and isinstance(r.get(key), (int, float)):
                out[f"{name} {heading}"] = round(r[key], 2)
    return out


def _fmt(x: float | None) -> str:
    return MISSING if x is None else f"{x:.2f}"


def render(table: PaperTable, paper: dict, ours: dict, provisional: set = frozenset()) -> tuple[str, list[list[str]]]:
    """Markdown and CSV rows of one table: per column the paper's number, ours and ours − paper;
    ours marked :data:`PROVISIONAL` where a run of the cell has no eval.json yet."""
    header = ["row"] + [f"{c.label} {k}" for c in table.columns for k in ("paper", "ours", "Δ")]
    rows = []
    for row in table.rows:
        line = [row]
        for col in table.columns:
            p = paper.get((table.key, row, col.label))
            values = ours.get((table.key, row, col.label), [])
            o = mean(values) if values else None
            diff = o - p if (o is not None and p is not None) else None
            mark = PROVISIONAL if (table.key, row, col.label) in provisional else ""
            line += [_fmt(p), _fmt(o) + mark + (f" (n={len(values)})" if len(values) > 1 else ""),
                     MISSING if diff is None else f"{diff:+.2f}"]
        rows.append(line)
    md = [f"## {table.title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    if table.note:
        md += ["", table.note]
    if any(k[0] == table.key for k in provisional):
        md += ["", PROVISIONAL_NOTE]
    return "\n".join(md) + "\n", [header] + rows


def write_tables(paths: list[str], out_dir: Path) -> list[Path]:
    """Writes ``<table>.md``/``.csv`` (and its PNGs, :func:`abnexp.report.plots.write_figures`) for
    every paper table with at least one run, and ``runs.md`` (and ``runs_loss.png``) for runs that
    reproduce no table row; returns the files written. The paper's
    numbers come from :data:`abnexp.report.paper_tables.TABLES`.

    Raises:
        ConfigError: a path does not exist.
    """
    runs = find_runs(paths)
    cells, plain, provisional = collect(runs)
    paper = paper_values()
    figure_runs = labelled_runs(runs)
    if cells or plain:
        out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for table in TABLES.values():
        if not any(k[0] == table.key for k in cells):
            continue
        md, rows = render(table, paper, cells, provisional)
        (out_dir / f"{table.key}.md").write_text(md)
        with open(out_dir / f"{table.key}.csv", "w", newline="") as f:
            csv.writer(f).writerows(rows)
        written += [out_dir / f"{table.key}.md", out_dir / f"{table.key}.csv"]
        written += write_figures(table.key, paper, cells, figure_runs.get(table.key, []), out_dir)
    if plain:
        keys = list(dict.fromkeys(k for r in plain for k in r))
        lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        lines += ["| " + " | ".join(str(r.get(k, MISSING)) for k in keys) + " |" for r in plain]
        if any(PROVISIONAL in r["source"] for r in plain):
            lines += ["", PROVISIONAL_NOTE]
        (out_dir / "runs.md").write_text("## Runs that reproduce no paper table row\n\n" + "\n".join(lines) + "\n")
        written.append(out_dir / "runs.md")
        written += write_figures("runs", paper, cells, figure_runs.get("runs", []), out_dir)
    return written
