"""scripts/gpu_check.sh --dry-run as a bare GPU machine runs it: every stage of the GPU validation
pack, on the CPU on tiny inputs, so that the script the GPU machine runs cannot rot between its
(rare) GPU runs.

The bare machine is emulated: a virtual environment without site packages whose site-packages
links only the installed distributions of torch, torchvision, pip and their dependencies (what a
GPU machine with torch and torchvision has), and a copy of the working tree as the device tool
copies it (tracked and untracked, not ignored, files) in a temporary folder: abnexp is installed
nowhere there, and the copy's abnexp/ has no configs. What ``bash scripts/gpu_check.sh --prepare``
carries is given the way it would be: .gpu_pack/ itself when it was prepared in this checkout (its
wheels are then installed by the script); otherwise links to this environment's copies of the
packages its wheels hold (scripts/gpu_pack_requirements.txt) and the demo dataset as $ABNEXP_CACHE.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import venv
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SECTIONS = ("## 0. Environment", "## Goals", "## 1a. Native build", "## 1b. CUDA tests", "## 2. Benchmarks",
            "## 3. Memory: Table 3 by real allocation", "## 4. Training throughput", "## Stages")


def snapshot(folder: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under ``folder``."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def closure(names) -> list[metadata.Distribution]:
    """The installed distributions of ``names`` and of everything they require (no extras)."""
    seen, todo, out = set(), list(names), []
    while todo:
        key = re.sub(r"[-_.]+", "-", todo.pop()).lower()
        if key in seen or key == "abnexp":
            continue
        seen.add(key)
        try:
            dist = metadata.distribution(key)
        except metadata.PackageNotFoundError:
            continue
        out.append(dist)
        todo += [re.split(r"[ ;<>=!~\[(]", r, maxsplit=1)[0] for r in dist.requires or [] if "extra ==" not in r]
    return out


def bare_python(folder: Path, names) -> Path:
    """A venv without site packages whose site-packages links the top-level files of the
    distributions in ``closure(names)``; returns its python."""
    venv.create(folder, with_pip=False, symlinks=True)
    python = folder / "bin" / "python"
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    ours = Path(sysconfig.get_paths()["purelib"])
    for dist in closure(names):
        tops = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in tops:
            source = Path(dist.locate_file(top))
            if source.exists() and not (site / top).exists() and source.parent in (ours, ours.resolve()):
                (site / top).symlink_to(source)
    return python


def copy_tree(dest: Path) -> None:
    """The working tree as the device tool copies it: tracked and untracked files git does not ignore."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)


@pytest.mark.slow
def test_dry_run_on_a_bare_machine_exercises_every_stage_and_leaves_results_alone(tmp_path, demo_root):
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout to copy the tree as the device tool does")
    before = snapshot(ROOT / "results")
    tree = tmp_path / "tree"
    copy_tree(tree)
    prepared = any((ROOT / ".gpu_pack" / "wheels").glob("*.whl")) and (ROOT / ".gpu_pack" / "cache").is_dir()
    requirements = [line.split(">")[0].split("<")[0].split("=")[0].strip()
                    for line in (ROOT / "scripts" / "gpu_pack_requirements.txt").read_text().splitlines()
                    if line.strip() and not line.startswith("#")]
    python = bare_python(tmp_path / "venv", ["torch", "torchvision", "pip"] + ([] if prepared else requirements))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "ABNEXP_", "VIRTUAL_ENV"))}
    # no cached native build (a bare machine has none; the dry run never compiles): its stages take the reference path
    env.update(PYTHON=str(python), PYTHONNOUSERSITE="1", TORCH_EXTENSIONS_DIR=str(tmp_path / "torch_extensions"))
    if prepared:
        shutil.copytree(ROOT / ".gpu_pack", tree / ".gpu_pack")  # as `carry` brings it
    else:
        env["ABNEXP_CACHE"] = str(demo_root.parent)  # the role of .gpu_pack/cache
    probe = subprocess.run([python, "-c", "import torch, torchvision; import abnexp"], cwd=tmp_path, env=env,
                           capture_output=True, text=True)
    assert "No module named 'abnexp'" in probe.stderr, probe.stderr[-2000:]  # torch yes, abnexp nowhere

    out = tmp_path / "out"
    done = subprocess.run(["bash", str(tree / "scripts" / "gpu_check.sh"), "--dry-run", "--out", str(out),
                           "--work", str(tmp_path / "work")], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    overlay = re.search(r"abnexp from (\S+)/abnexp/__init__\.py \(overlay of (\S+)\)", done.stdout)
    assert overlay and "abnexp_gpu_site" in overlay.group(1) and overlay.group(2) == str(tree), done.stdout[-2000:]
    text = (out / "gpu_dry_run.md").read_text()
    for section in SECTIONS:
        assert section in text, section
    stages = text[text.index("## Stages"):]
    for stage in ("0. Environment", "1a. Native build", "1b. CUDA tests", "2. Benchmarks", "3. Memory", "4. Training"):
        row = next(line for line in stages.splitlines() if line.startswith(f"| {stage}"))
        assert "| ok" in row or "| skipped" in row, row
    assert "InPlace-ABN I" in text and "torch BN + leaky_relu_" in text  # the benchmark table
    assert "| resnet18 | bn |" not in text and "| ResNet-18 (dry run) | inplace_abn |" in text  # memory rows
    assert "images/s" in text and "| inplace_abn |" in text
    assert "hydra-core | missing" not in text
    assert snapshot(ROOT / "results") == before
    assert not (tree / "results" / "gpu_dry_run.md").exists()

