"""scripts/small_batch_experiment.py end to end at a tiny scale (one step per run): the lr search
trains on the held-out split, the table and the figure are written, the settings reach the runs."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]


def load_script():
    spec = importlib.util.spec_from_file_location("small_batch_experiment", ROOT / "scripts" / "small_batch_experiment.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_paper_settings_scale_the_iteration_counts():
    rows = load_script().paper_settings(90)
    assert "norm.burnin_iters=25" in rows["CBN (2)"] and "norm.window=8" in rows["CBN (2)"]  # 25 of 90
    assert "norm.buffer_size=16" in rows["MABN (2)"] and "norm.warmup_iters=1" in rows["MABN (2)"]
    assert all("norm.group_size=2" in o for n, o in rows.items() if "(2)" in n)
    assert not any(o.startswith("norm.group_size") for o in rows["BN (32)"] + rows["GN"])


@pytest.mark.slow
def test_one_command_writes_table_figure_and_runs(tmp_path):
    out, figure, runs = tmp_path / "sb.md", tmp_path / "sb.png", tmp_path / "runs"
    threads = torch.get_num_threads()
    load_script().main(["--configs", "BN (2)", "--lrs", "0.05,0.1", "--seeds", "0", "--epochs", "1",
                        "--max-steps", "1", "--precise-batches", "1", "--runs", str(runs), "--out", str(out),
                        "--figure", str(figure), "--threads", str(threads)])
    text = out.read_text()
    study = json.loads(out.with_suffix(".json").read_text())
    row = next(line for line in text.splitlines() if line.startswith("| BN (2) |"))
    grid = {float(k): v["precise"] for k, v in study["search"]["BN (2)"].items()}
    assert float(row.split("|")[2]) == max(grid, key=grid.get) and len(study["final"]["BN (2)"]) == 1
    assert "Partial" not in text and "norm.window" not in text  # CBN was not run
    with Image.open(figure) as im:
        assert im.format == "PNG" and im.size[0] > 300
    search = OmegaConf.load(runs / "search" / "BN_2" / "lr0.05" / "config.yaml")
    final = OmegaConf.load(runs / "final" / "BN_2" / "seed0" / "config.yaml")
    assert search.data.holdout == 0.25 and final.data.holdout == 0.0 and final.seed == 0
    assert final.norm.group_size == 2 and final.model.zero_init_residual and final.data.crop_size == 64
