"""Elastic restarts for real: torchrun --max-restarts=1 with 2 gloo processes, one rank SIGKILLed
mid-epoch; torchrun restarts the workers, they resume from the newest checkpoint in the run dir and
the job ends 0 with the per-step losses of an uninterrupted run. One restart only: the restarted
workers must connect at the first try, although torchrun's agent keeps the killed workers' store
entries (abnexp.distributed._attempt_store)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.distributed as dist

from abnexp.distributed import DistEnv, _attempt_store
from conftest import train_losses


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
# 40 training images, 4 per rank and step: 5 steps per epoch, 20 in all, a step checkpoint every 2
TINY = ["model=resnet18", "norm=inplace_abn_sync", "data.batch_size=4", "data.crop_size=32",
        "data.large_crop_size=40", "data.num_workers=0", "trainer.log_every=1", "trainer.epochs=4",
        "trainer.checkpoint_every=2", "optim.lr=0.01"]
TIMEOUT = 300  # seconds for one torchrun job


@pytest.fixture
def agent_store(monkeypatch):
    """A TCPStore server standing in for torchrun's agent, and the variables torchrun sets for it."""
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    for name, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(server.port),
                        "TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_RESTART_COUNT": "0"}.items():
        monkeypatch.setenv(name, value)
    return server


def test_a_restarted_attempt_does_not_see_the_previous_attempts_keys(agent_store, monkeypatch):
    worker = DistEnv(1, 2, 1, "torchrun")
    _attempt_store(worker).set("rank_1", "address of the killed worker")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    restarted = _attempt_store(worker)
    assert not restarted.check(["rank_1"])  # the killed worker's entry is not visible
    restarted.set("rank_1", "new address")
    assert _attempt_store(DistEnv(0, 2, 0, "torchrun")).get("rank_1") == b"new address"  # a peer of attempt 1 sees it
    assert agent_store.check(["abnexp/attempt_0/rank_1", "abnexp/attempt_1/rank_1"])


def test_without_the_agents_store_init_process_group_makes_its_own(agent_store, monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")  # torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
    assert _attempt_store(DistEnv(0, 2, 0, "torchrun")) is None
    assert _attempt_store(DistEnv(0, 2, 0, "submitit")) is None


def test_multinode_restarts_warn_to_disable_the_shared_store(agent_store, monkeypatch, caplog):
    monkeypatch.setenv("GROUP_WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "3")
    _attempt_store(DistEnv(0, 2, 0, "torchrun"))
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in caplog.text
    caplog.clear()
    monkeypatch.setenv("GROUP_WORLD_SIZE", "1")
    _attempt_store(DistEnv(0, 2, 0, "torchrun"))
    assert not caplog.records


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


@pytest.mark.slow  # torchrun: 2 gloo processes, started three times
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the ranks through /proc")
def test_sigkilled_rank_restarts_and_resumes_exactly(tiny_root, tmp_path):
    data = f"data.root={tiny_root}"
    reference = tmp_path / "reference"
    done = subprocess.run([*TORCHRUN, "-m", "abnexp", "train", f"hydra.run.dir={reference}", *TINY, data],
                          cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(train_losses(reference)) == list(range(1, 21))

    run = tmp_path / "elastic"
    with (tmp_path / "agent.txt").open("w") as out:
        agent = subprocess.Popen([*TORCHRUN, "--max-restarts=1", "-m", "abnexp", "train", f"hydra.run.dir={run}",
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
