"""scripts/gpu_check.sh --dry-run: every stage of the GPU validation pack, on the CPU on tiny
inputs, so that the script the GPU machine runs cannot rot between its (rare) GPU runs."""
from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SECTIONS = ("## 0. Environment", "## Goals", "## 1a. Native build", "## 1b. CUDA tests", "## 2. Benchmarks",
            "## 3. Memory: Table 3 by real allocation", "## 4. Training throughput", "## Stages")


def snapshot(folder: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under ``folder``."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_dry_run_exercises_every_stage_and_leaves_results_alone(tmp_path):
    before = snapshot(ROOT / "results")
    out = tmp_path / "out"
    done = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run", "--out", str(out), "--work", str(tmp_path / "work")],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    report = out / "gpu_dry_run.md"
    assert report.is_file(), done.stdout[-2000:]
    text = report.read_text()
    for section in SECTIONS:
        assert section in text, section
    stages = text[text.index("## Stages"):]
    for stage in ("0. Environment", "1a. Native build", "1b. CUDA tests", "2. Benchmarks", "3. Memory", "4. Training"):
        row = next(line for line in stages.splitlines() if line.startswith(f"| {stage}"))
        assert "| ok" in row or "| skipped" in row, row
    assert "InPlace-ABN I" in text and "torch BN + leaky_relu_" in text  # the benchmark table
    assert "| resnet18 | bn |" not in text and "| ResNet-18 (dry run) | inplace_abn |" in text  # memory rows
    assert "images/s" in text and "| inplace_abn |" in text
    assert snapshot(ROOT / "results") == before
