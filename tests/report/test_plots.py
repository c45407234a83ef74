"""``abnexp table``'s PNGs: CBN Table 3 as the paper's Figure 1 (top-1 against batch per GPU, one
line per norm, the paper's values marked) and the loss curves of a table's runs."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from matplotlib.image import imread
from omegaconf import OmegaConf

from abnexp.config import compose
from abnexp.report.paper_tables import TABLES, paper_values
from abnexp.report.plots import loss_figure, trend_figure
from abnexp.report.tables import write_tables

# CBN paper, Table 3 (ResNet-18, ImageNet top-1 [%]), typed from the paper: batch per GPU -> top-1
CBN_PAPER = {32: 70.2, 16: 70.2, 8: 70.1, 4: 70.0, 2: 69.6, 1: 69.3}
BN_PAPER = {32: 70.2, 16: 70.2, 8: 68.4, 4: 65.1, 2: 55.9}  # no bs 1 for BN


def fake_run(root: Path, name: str, overrides: list[str], top1: float, losses: list[float]) -> Path:
    """A run dir as `abnexp train` + `abnexp eval` leave it: config.yaml, eval.json, metrics.jsonl."""
    run = root / name
    run.mkdir(parents=True)
    OmegaConf.save(compose(overrides), run / "config.yaml", resolve=True)
    (run / "eval.json").write_text(json.dumps({"protocols": {"center": {"crop": 224, "top1": top1, "top5": 90.0}}}))
    rows = [{"split": "train", "step": i + 1, "epoch": 0, "loss": v} for i, v in enumerate(losses)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def test_cbn_table3_trend_has_one_line_per_norm_and_the_paper_values():
    table = TABLES["cbn_t3"]
    ours = {("cbn_t3", "CBN", "bs 2"): [60.0, 62.0], ("cbn_t3", "CBN", "bs 8"): [65.0]}
    fig = trend_figure(table, paper_values(), ours)
    ax = fig.axes[0]
    assert ax.get_xlabel() == "batch size per GPU" and "top-1" in ax.get_ylabel()
    lines = {line.get_label(): line for line in ax.lines}
    assert set(lines) == {"BN (paper)", "GN (paper)", "BRN (paper)", "CBN (paper)", "CBN (ours)"}
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [line.get_label() for line in ax.lines]
    for label, expected in (("CBN (paper)", CBN_PAPER), ("BN (paper)", BN_PAPER)):
        xs, ys = lines[label].get_data()
        assert dict(zip(xs, ys)) == expected
        assert lines[label].get_linestyle() == "--" and lines[label].get_markerfacecolor() == "none"
    xs, ys = lines["CBN (ours)"].get_data()
    assert list(xs) == [2, 8] and list(ys) == [61.0, 65.0]  # two seeds of bs 2 averaged
    assert lines["CBN (ours)"].get_color() == lines["CBN (paper)"].get_color()


def test_loss_figure_plots_each_runs_train_rows(tmp_path):
    a = fake_run(tmp_path, "a", ["experiment=cbn_t3/bn_bs2"], 50.0, [3.0, 2.5, 2.0])
    b = fake_run(tmp_path, "b", ["experiment=cbn_t3/gn_bs2"], 50.0, [4.0, 1.0])
    with open(b / "metrics.jsonl", "a") as f:  # a validation row and a step logged again after a resume
        f.write(json.dumps({"split": "val", "step": 2, "epoch": 1, "top1": 50.0}) + "\n")
        f.write(json.dumps({"split": "train", "step": 2, "epoch": 0, "loss": 1.5}) + "\n")
    ax = loss_figure([("BN", a), ("GN", b)], "t").axes[0]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("optimizer step", "training loss")
    data = {line.get_label(): [list(v) for v in line.get_data()] for line in ax.lines}
    assert data == {"BN": [[1, 2, 3], [3.0, 2.5, 2.0]], "GN": [[1, 2], [4.0, 1.5]]}


def test_table_writes_its_pngs_beside_its_tables(tmp_path):
    runs = tmp_path / "runs"
    for i, (recipe, top1) in enumerate((("cbn_t3/cbn_bs2", 61.0), ("cbn_t3/bn_bs2", 40.0),
                                        ("inplace_abn_t2/resnext101_bn", 70.0))):
        fake_run(runs, f"r{i}", [f"experiment={recipe}"], top1, [3.0, 2.0 + i])
    fake_run(runs, "plain", ["model=resnet50"], 10.0, [5.0, 4.0])
    out = tmp_path / "tables"
    written = write_tables([str(runs)], out)
    pngs = sorted(p.name for p in written if p.suffix == ".png")
    # a trend only for the table whose paper draws one; loss curves for every table with runs
    assert pngs == ["cbn_t3_loss.png", "cbn_t3_trend.png", "inplace_abn_t2_loss.png", "runs_loss.png"]
    for name in pngs:
        image = imread(out / name)
        assert image.shape[0] > 300 and image.shape[1] > 500 and np.ptp(image[..., :3]) > 0.5  # drawn, not blank
    assert {p.name for p in written} >= {"cbn_t3.md", "cbn_t3.csv", "inplace_abn_t2.md", "runs.md"}


def test_a_sweep_not_evaluated_yet_is_compared_by_its_training_time_validation(tmp_path):
    """Fresh sweep, no eval.json: each run's last validation row in metrics.jsonl fills its cell, marked
    as training-time validation; a run's eval.json wins over its validation rows."""
    runs = tmp_path / "sweep"
    val = {"split": "val", "step": 2, "epoch": 1, "top5": 90.0, "num_samples": 200}
    for name, recipe, top1s in (("0_bn", "cbn_t3/bn_bs2", [30.0, 40.0]), ("1_cbn", "cbn_t3/cbn_bs2", [50.0, 61.5]),
                                ("2_plain", None, [20.0, 25.0])):
        run = fake_run(runs, name, [f"experiment={recipe}"] if recipe else ["model=resnet50"], 0.0, [3.0, 2.0])
        (run / "eval.json").unlink()
        with open(run / "metrics.jsonl", "a") as f:
            for epoch, top1 in enumerate(top1s, 1):
                f.write(json.dumps({**val, "epoch": epoch, "top1": top1}) + "\n")
    (runs / "0_bn" / "eval.json").write_text(json.dumps({"protocols": {"center": {"top1": 42.25, "top5": 91.0}}}))
    out = tmp_path / "tables"
    written = {p.name for p in write_tables([str(runs)], out)}
    assert {"cbn_t3.md", "cbn_t3_loss.png", "runs.md", "runs_loss.png"} <= written
    rows = {line.split(" | ")[0].strip("| "): line for line in (out / "cbn_t3.md").read_text().splitlines()}
    assert "| 61.50† |" in rows["CBN"] and "| 42.25 |" in rows["BN"]  # the last epoch; eval.json wins for BN
    assert "† training-time validation" in (out / "cbn_t3.md").read_text()
    plain = (out / "runs.md").read_text()
    assert "| 25.0 |" in plain and "validation, epoch 2 †" in plain
