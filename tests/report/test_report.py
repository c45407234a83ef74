"""Paper recipes build their models; `abnexp table` fills the paper's cells from runs, beside the
paper's numbers (abnexp.report.paper_tables). The recipes' settings: tests/report/test_recipes.py."""
from __future__ import annotations

import csv
import json

import pytest
import torch

from abnexp.report.experiments import experiments
from abnexp.report.paper_tables import TABLES
from conftest import run_cli

RECIPES = experiments()


@pytest.mark.slow  # 89 models built (their composition is checked in test_recipes.py)
@pytest.mark.parametrize("name", [m["name"] for m in RECIPES])
def test_recipe_builds(name):
    from abnexp.config import compose
    from abnexp.tasks import build_task

    cfg = compose([f"experiment={name}"])
    with torch.device("meta"):
        model = build_task(cfg).build_model()
    assert sum(p.numel() for p in model.parameters()) > 1_000_000


def test_every_table_row_has_a_recipe():
    for table in TABLES.values():
        rows = {m["row"] for m in RECIPES if m["table"] == table.key}
        assert rows == set(table.rows), table.key


TINY = ["data=demo", "model=resnet18", "trainer.max_steps=1", "trainer.epochs=1", "data.batch_size=8",
        "data.crop_size=32", "data.large_crop_size=32", "data.num_workers=0"]


@pytest.mark.slow  # trains and evaluates runs through the CLI
def test_table_fills_the_cells_of_the_runs(tiny_root, tmp_path, capsys):
    runs = tmp_path / "runs"  # trained and evaluated on the tiny demo split (20 validation images)
    recipe = "inplace_abn_t2/resnext101_bn"
    for i in range(2):  # two seeds of one row: averaged
        assert run_cli(["train", f"experiment={recipe}", *TINY, f"data.root={tiny_root}", f"seed={i}",
                        f"hydra.run.dir={runs / f'r{i}'}"], capsys)[0] == 0
        assert run_cli(["eval", f"checkpoint={runs / f'r{i}' / 'checkpoints' / 'last.pt'}"], capsys)[0] == 0
    plain = tmp_path / "plain"  # a run of no recipe goes to the plain table
    assert run_cli(["train", *TINY, f"data.root={tiny_root}", f"hydra.run.dir={plain}"], capsys)[0] == 0
    assert run_cli(["eval", f"checkpoint={plain / 'checkpoints' / 'last.pt'}"], capsys)[0] == 0

    out = tmp_path / "tables"
    code, stdout, err = run_cli(["table", str(runs), str(plain), f"out={out}"], capsys)
    assert code == 0, err
    rows = list(csv.reader(open(out / "inplace_abn_t2.csv")))
    header, body = rows[0], {r[0]: r[1:] for r in rows[1:]}
    assert list(body) == list(TABLES["inplace_abn_t2"].rows)  # the paper's rows, in order
    ours_top1 = [json.loads((runs / f"r{i}" / "eval.json").read_text())["protocols"]["center"]["top1"]
                 for i in range(2)]
    row = dict(zip(header[1:], body["ResNeXt-101, std-BN (batch 256)"]))
    assert row["224² center top-1 paper"] == "77.04"
    assert row["224² center top-1 ours"] == f"{sum(ours_top1) / 2:.2f} (n=2)"
    assert float(row["224² center top-1 Δ"]) == pytest.approx(sum(ours_top1) / 2 - 77.04, abs=0.011)
    other = dict(zip(header[1:], body["ResNeXt-152, InPlace-ABN (batch 256)"]))
    assert other["224² center top-1 paper"] == "78.28" and other["224² center top-1 ours"] == "—"
    assert "| resnet18 | bn | demo |" in (out / "runs.md").read_text().replace(str(plain), "")
    assert (out / "inplace_abn_t2.md").read_text().startswith("## InPlace-ABN Table 2")


@pytest.mark.slow  # trains a two-run sweep through the CLI
def test_table_on_a_fresh_sweep_uses_its_training_time_validation(tiny_root, tmp_path, capsys):
    sweep = tmp_path / "sweep"  # one epoch of 5 steps each (40 images), then validation
    tiny = [a for a in TINY if not a.startswith("trainer.max_steps")]
    assert run_cli(["train", "-m", "seed=0,1", *tiny, f"data.root={tiny_root}", "trainer.log_every=1",
                    f"hydra.sweep.dir={sweep}"], capsys)[0] == 0
    assert not list(sweep.rglob("eval.json"))
    pending = sweep / "2_stopped_before_validation"  # a run of the sweep with train rows only
    pending.mkdir()
    first = next(sweep.glob("0_*"))
    (pending / "config.yaml").write_text((first / "config.yaml").read_text())
    train_rows = [line for line in (first / "metrics.jsonl").read_text().splitlines() if '"val"' not in line]
    (pending / "metrics.jsonl").write_text("\n".join(train_rows) + "\n")
    out = tmp_path / "tables"
    code, stdout, err = run_cli(["table", str(sweep), f"out={out}"], capsys)
    assert code == 0, err
    assert "left out 1 run(s) with no result yet" in stdout and str(pending) in stdout
    assert str(pending) not in (out / "runs.md").read_text()
    assert {p.name for p in out.iterdir()} == {"runs.md", "runs_loss.png"}
    table = (out / "runs.md").read_text()
    for run in set(sweep.glob("*/metrics.jsonl")) - {pending / "metrics.jsonl"}:
        last = [json.loads(line) for line in run.read_text().splitlines() if '"val"' in line][-1]
        assert f"| {round(last['top1'], 2)} | validation, epoch 1 †" in table


def test_table_without_runs_fails_clearly(tmp_path, capsys):
    code, _, err = run_cli(["table", str(tmp_path), f"out={tmp_path / 'tables'}"], capsys)
    assert code == 1 and "no run with a result" in err and "abnexp eval" in err
    assert not (tmp_path / "tables").exists()  # nothing written, not even an empty folder
    code, _, err = run_cli(["table", str(tmp_path / "missing")], capsys)
    assert code == 1 and "does not exist" in err
