"""Multi-node torchrun tried on one host: two torchrun agents (``--nnodes=2 --nproc_per_node=1``,
c10d rendezvous on 127.0.0.1) run one ``abnexp train`` job, as two nodes would; it must equal the
same job run by one agent with 2 processes (``--standalone --nproc_per_node=2``)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from conftest import only_run_dir, train_losses

pytestmark = pytest.mark.slow  # three torchrun agents, four gloo processes

TIMEOUT = 300  # seconds; a hung rendezvous fails the test instead of blocking the suite
# norm=inplace_abn_sync: every step's statistics come from both processes' samples
JOB = ["-m", "abnexp", "train", "hydra.run.dir=runs/${now:%H%M%S%f}", "model=resnet18", "norm=inplace_abn_sync",
       "data.crop_size=32", "data.large_crop_size=40", "data.num_workers=0", "data.batch_size=8",
       "trainer.log_every=1", "trainer.max_steps=3", "optim.lr=0.001"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
ENV = {**os.environ, "ABNEXP_NATIVE": "0", "OMP_NUM_THREADS": "1"}  # the norms' PyTorch path: no kernel build


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_agents_with_c10d_rendezvous_equal_one_node_with_two_processes(demo_root, tmp_path):
    two_nodes, one_node = tmp_path / "two_nodes", tmp_path / "one_node"
    two_nodes.mkdir(), one_node.mkdir()
    rendezvous = ["--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d",
                  f"--rdzv_endpoint=127.0.0.1:{free_port()}", "--rdzv_id=abnexp_multinode_test"]
    commands = [([*TORCHRUN, *rendezvous, *JOB], two_nodes)] * 2  # the two "nodes"
    commands.append(([*TORCHRUN, "--standalone", "--nproc_per_node=2", *JOB], one_node))  # the reference, meanwhile
    agents = [subprocess.Popen(command, cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
              for command, cwd in commands]
    outputs = [agent.communicate(timeout=TIMEOUT)[0] for agent in agents]
    for agent, output in zip(agents, outputs):
        assert agent.returncode == 0, output[-3000:]

    run, reference_run = only_run_dir(two_nodes), only_run_dir(one_node)  # one run dir for the two agents
    assert len(list(run.glob("events.out.tfevents.*"))) == 1 and (run / "checkpoints" / "last.pt").is_file()
    got, want = train_losses(run), train_losses(reference_run)
    assert sorted(got) == sorted(want) == [1, 2, 3]
    for step in want:  # the same shards, statistics and all-reduced gradients: equal up to rounding
        assert got[step] == pytest.approx(want[step], rel=1e-6), step
