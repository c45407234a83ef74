"""Elastic restarts for real: torchrun --max-restarts=3 with 2 gloo processes, one rank SIGKILLed
mid-epoch; torchrun restarts the workers, they resume from the newest checkpoint in the run dir and
the job ends 0 with the per-step losses of an uninterrupted run. Three restarts, not one: on one
host gloo's connection of the restarted ranks occasionally times out ("connectFullMesh failed"),
which torchrun answers with one more restart, as it would on a cluster."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow,  # torchrun: 2 gloo processes, started three times
              pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the ranks through /proc"),
              # flaky on one host: gloo's connection of the restarted ranks often times out
              # ("connectFullMesh failed ... Connection refused"), cause not found yet (issue 13)
              pytest.mark.skipif(not os.environ.get("ABNEXP_ELASTIC_TEST"),
                                 reason="flaky (gloo reconnect after a torchrun restart); run with ABNEXP_ELASTIC_TEST=1")]

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
# 40 training images, 4 per rank and step: 5 steps per epoch, 20 in all, a step checkpoint every 2
TINY = ["model=resnet18", "norm=inplace_abn_sync", "data.batch_size=4", "data.crop_size=32",
        "data.large_crop_size=40", "data.num_workers=0", "trainer.log_every=1", "trainer.epochs=4",
        "trainer.checkpoint_every=2", "optim.lr=0.01"]
TIMEOUT = 300  # seconds for one torchrun job


def train_losses(run: Path) -> dict[int, float]:
    """step -> loss of metrics.jsonl's train rows (a row logged again after a resume wins)."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


def worker_of_rank(agent: int, rank: int) -> int | None:
    """The pid of the torchrun agent's worker process with RANK=rank, or None (not started yet)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):  # the process ended meanwhile
            continue
        if parent == agent and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    return None


def test_sigkilled_rank_restarts_and_resumes_exactly(tiny_root, tmp_path):
    data = f"data.root={tiny_root}"
    reference = tmp_path / "reference"
    done = subprocess.run([*TORCHRUN, "-m", "abnexp", "train", f"hydra.run.dir={reference}", *TINY, data],
                          cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(train_losses(reference)) == list(range(1, 21))

    run = tmp_path / "elastic"
    with (tmp_path / "agent.txt").open("w") as out:
        agent = subprocess.Popen([*TORCHRUN, "--max-restarts=3", "-m", "abnexp", "train", f"hydra.run.dir={run}",
                                  *TINY, data], cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + TIMEOUT
            while not (run / "checkpoints" / "step_2.pt").is_file():  # the first step checkpoint: mid-epoch 0
                assert agent.poll() is None and time.monotonic() < deadline, "no step checkpoint was written"
                time.sleep(0.02)
            victim = worker_of_rank(agent.pid, 1)
            assert victim is not None
            os.kill(victim, signal.SIGKILL)
            killed_after = max(train_losses(run))
            assert agent.wait(timeout=TIMEOUT) == 0, (tmp_path / "agent.txt").read_text()[-3000:]
        finally:
            if agent.poll() is None:
                agent.kill()
    assert killed_after < 20  # the kill came mid-run
    log = (run / "train.log").read_text()
    assert log.count("resumed from") >= 1 and "(epoch 0, step" in log.split("resumed from", 1)[1]
    got, want = train_losses(run), train_losses(reference)
    assert sorted(got) == sorted(want)
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-5, abs=1e-6), step
