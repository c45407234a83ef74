"""scripts/fashion_mnist_studies.py: the intervals against hand-computed Student-t values, and one
command end to end on tiny IDX files (a few steps per run) writing the tables, JSON and figures."""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def studies():
    spec = importlib.util.spec_from_file_location("fashion_mnist_studies", ROOT / "scripts" / "fashion_mnist_studies.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_t_interval_and_paired_differences_by_hand():
    s = studies()
    m, lo, hi = s.t_interval([1.0, 2.0, 3.0])  # mean 2, sd 1, t(0.975, 2 dof) = 4.302653 (tables)
    assert m == 2.0 and hi - m == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6) and m - lo == pytest.approx(hi - m)
    a = [{"seed": 0, "x": 91.0}, {"seed": 1, "x": 92.0}, {"seed": 2, "x": 93.0}]
    b = [{"seed": 2, "x": 90.0}, {"seed": 0, "x": 90.0}, {"seed": 1, "x": 90.0}]  # paired by seed, not order
    assert s.paired(a, b, "x") == f"+2.00 [{2 - 2.4841:+.2f}, {2 + 2.4841:+.2f}] (inside the noise)"
    b = [{"seed": i, "x": 80.0 + i} for i in range(3)]  # a - b = 11 for every seed: no noise, real
    assert s.paired(a, b, "x").endswith("(real: higher)")


@pytest.mark.slow  # 10 tiny training runs through the trainer
def test_parity_study_end_to_end_on_tiny_files(tmp_path):
    import sys

    sys.path.insert(0, str(ROOT / "tests" / "data"))
    import test_fashion_mnist as fm

    fm.TRAIN_PER_CLASS, fm.TEST_PER_CLASS = 4, 2
    fm.write_fashion(tmp_path / "fm")
    fm.TRAIN_PER_CLASS, fm.TEST_PER_CLASS = 4, 2
    studies().main(["--root", str(tmp_path / "fm"), "--studies", "parity", "--seeds", "0,1", "--epochs", "1",
                    "--max-steps", "1", "--precise-batches", "1", "--threads", "1",
                    "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out")])
    report = json.loads((tmp_path / "out" / "fashion_mnist_parity.json").read_text())
    assert [len(runs) for runs in report["parity"].values()] == [2] * 5 and report["test_images"] == 20
    assert all(0 <= r["swapped"] <= 100 for runs in report["parity"].values() for r in runs)
    text = (tmp_path / "out" / "fashion_mnist_parity.md").read_text()
    assert "| InPlace-ABN + Leaky ReLU |" in text and "Partial" not in text
    assert (tmp_path / "out" / "fashion_mnist_parity.png").stat().st_size > 0


def test_runs_recorded_in_the_results_json_are_not_trained_again(tmp_path, monkeypatch):
    """A run whose result is in the study's JSON (same settings) is kept when runs/ is gone; a JSON
    written with other settings (here another epoch count) is not trusted: every run trains again."""
    import sys

    sys.path.insert(0, str(ROOT / "tests" / "data"))
    import test_fashion_mnist as fm

    fm.write_fashion(tmp_path / "fm")
    s = studies()
    trained = []

    def fake_train(overrides, run_dir, precise_batches):
        trained.append(Path(run_dir).relative_to(tmp_path / "runs").as_posix())
        return {"running": 60.0, "precise": 61.0, "seconds": 1.0}

    monkeypatch.setattr(s, "train_and_evaluate", fake_train)
    monkeypatch.setattr(s, "swapped_top1", lambda overrides, activation, run_dir: 59.0)
    argv = ["--root", str(tmp_path / "fm"), "--studies", "parity", "--seeds", "0,1", "--epochs", "1",
            "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out")]
    s.main(argv)
    assert len(trained) == 10
    report = tmp_path / "out" / "fashion_mnist_parity.json"
    kept = json.loads(report.read_text())
    kept["parity"]["BN + ReLU"] = [r for r in kept["parity"]["BN + ReLU"] if r["seed"] == 0]  # seed 1 "not finished"
    kept["parity"]["BN + Leaky ReLU"][0]["running"] = 77.0  # recorded values are read back, not recomputed
    report.write_text(json.dumps(kept))
    trained.clear()
    s.main(argv)
    assert trained == ["parity/bn_relu/seed1"]
    again = json.loads(report.read_text())
    assert again["parity"]["BN + Leaky ReLU"][0]["running"] == 77.0 and len(again["parity"]["BN + ReLU"]) == 2
    trained.clear()
    s.main([*argv[:7], "2", *argv[8:]])  # --epochs 2
    assert len(trained) == 10  # other settings: nothing recorded is reused
