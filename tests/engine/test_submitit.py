"""Hydra's submitit launcher (hydra-submitit-launcher): ranks from a submitit job's environment,
submitit's checkpoint-and-requeue protocol after the trainer's preemption exit, the sbatch script
of abnexp's SLURM defaults, and a real ``hydra/launcher=submitit_local`` sweep of 2 jobs × 2
processes (gloo on CPU)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import submitit
import torch
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher
from submitit.core.utils import DelayedSubmission
from submitit.local.local import LOCAL_REQUEUE_RETURN_CODE

from abnexp.distributed import DistEnv, dist_env, preemption_signal
from abnexp.engine.checkpoint import EXIT_PREEMPTED, PreemptionSignals

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def local_task(monkeypatch, tmp_path):
    """This process as task ``rank`` of 2 of a submitit local job (the variables submitit's local
    controller sets); returns a function setting the rank."""
    for name in TORCHRUN_VARS:
        monkeypatch.delenv(name, raising=False)
    env = {"SUBMITIT_EXECUTOR": "local", "SUBMITIT_LOCAL_JOB_ID": "4242", "SUBMITIT_LOCAL_NTASKS": "2",
           "SUBMITIT_LOCAL_JOB_NUM_NODES": "1", "SUBMITIT_LOCAL_NODEID": "0", "SUBMITIT_FOLDER": str(tmp_path)}
    for k, v in env.items():
        monkeypatch.setenv(k, v)

    def set_rank(rank: int) -> None:
        monkeypatch.setenv("SUBMITIT_LOCAL_GLOBALID", str(rank))
        monkeypatch.setenv("SUBMITIT_LOCAL_LOCALID", str(rank))

    set_rank(0)
    return set_rank


def test_rank_comes_from_the_submitit_job_when_torchrun_set_none(local_task, monkeypatch):
    local_task(1)
    assert dist_env() == DistEnv(rank=1, world_size=2, local_rank=1, started_by="submitit")
    # a SLURM job of submitit: SLURM's variables (3rd of 8 tasks on the 2nd node of 2)
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    for k, v in {"SLURM_JOB_ID": "77", "SLURM_PROCID": "6", "SLURM_NTASKS": "8", "SLURM_LOCALID": "2",
                 "SLURM_NODEID": "1", "SLURM_JOB_NUM_NODES": "2"}.items():
        monkeypatch.setenv(k, v)
    assert dist_env() == DistEnv(rank=6, world_size=8, local_rank=2, started_by="submitit")
    assert preemption_signal() == signal.SIGUSR2  # submitit's default (SUBMITIT_PREEMPT_SIGNAL unset)
    # torchrun inside the job (srun torchrun, or launcher.nproc_per_node workers): torchrun's ranks win
    for k, v in {"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}.items():
        monkeypatch.setenv(k, v)
    assert dist_env() == DistEnv(rank=1, world_size=4, local_rank=1, started_by="torchrun")
    assert preemption_signal() is None


def test_no_launcher_environment_is_one_process(monkeypatch):
    for name in (*TORCHRUN_VARS, "SUBMITIT_EXECUTOR"):
        monkeypatch.delenv(name, raising=False)
    assert dist_env() == DistEnv(0, 1, 0, None) and not dist_env().distributed


def preempt(tmp_path: Path) -> int:
    """Installs submitit's own signal handlers for a job running Hydra's LocalLauncher (as
    submitit.core.submission.process_job does), sends submitit's time-out signal while the trainer's
    PreemptionSignals is active, and leaves it as the trainer does after its checkpoint; returns the
    exit code."""
    env = submitit.JobEnvironment()
    delayed = DelayedSubmission(LocalLauncher(submitit_folder=str(tmp_path)))
    delayed.set_timeout(timeout_min=60, max_num_timeout=3)
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGCONT, signal.SIGUSR2)}
    try:
        env._handle_signals(env.paths, delayed)
        submitits = signal.getsignal(signal.SIGUSR2)
        with pytest.raises(SystemExit) as exit_info:
            with PreemptionSignals() as signals:
                os.kill(os.getpid(), signal.SIGUSR2)
                assert signals.received == signal.SIGUSR2  # recorded only: training finishes its step
                assert not env.paths.submitted_pickle.exists()
                raise SystemExit(EXIT_PREEMPTED)  # the trainer, after writing last.pt
        assert signal.getsignal(signal.SIGUSR2) == submitits  # restored
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
    return exit_info.value.code


def test_preemption_exit_hands_the_signal_to_submitit_which_requeues(local_task, tmp_path):
    code = preempt(tmp_path)
    assert code == LOCAL_REQUEUE_RETURN_CODE  # task 0: the local controller starts the job again
    requeued = DelayedSubmission.load(submitit.JobEnvironment().paths.submitted_pickle)
    assert isinstance(requeued.function, LocalLauncher)  # the Hydra launcher's own checkpoint()
    assert requeued._timeout_countdown == 3  # a preemption (not a time-out) uses no requeue


def test_other_tasks_exit_preempted_and_leave_the_requeue_to_task_0(local_task, tmp_path):
    local_task(1)
    code = preempt(tmp_path)
    assert code == EXIT_PREEMPTED
    assert not submitit.JobEnvironment().paths.submitted_pickle.exists()


def test_a_run_that_ends_normally_does_not_call_the_previous_handler():
    calls = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: calls.append(signum))
    try:
        with PreemptionSignals() as signals:
            os.kill(os.getpid(), signal.SIGUSR1)
        assert signals.received == signal.SIGUSR1 and calls == []
        with pytest.raises(SystemExit):
            with PreemptionSignals():
                os.kill(os.getpid(), signal.SIGUSR1)
                raise SystemExit(EXIT_PREEMPTED)
        assert calls == [signal.SIGUSR1]
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_slurm_job_script_of_the_abnexp_defaults_has_one_task_per_gpu(tmp_path, monkeypatch):
    """The sbatch script submitit writes for ``hydra/launcher=submitit_slurm`` (no cluster needed:
    a stand-in ``srun`` on PATH, and the submission stopped before ``sbatch``)."""
    from hydra import compose, initialize_config_module
    from hydra.utils import instantiate

    from abnexp.commands import train  # noqa: F401  (the schema-matching warning filter)
    from abnexp.config import register_configs

    (tmp_path / "srun").write_text("#!/bin/sh\nexit 1\n")
    (tmp_path / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    register_configs()
    with initialize_config_module("abnexp.configs", version_base="1.3"):
        cfg = compose("config", return_hydra_config=True, overrides=[
            "hydra/launcher=submitit_slurm", f"hydra.sweep.dir={tmp_path / 'sweep'}", "hydra.launcher.nodes=2",
            "hydra.launcher.partition=gpu", "hydra.launcher.account=abn"])
    launcher = instantiate(cfg.hydra.launcher)
    launcher.config = cfg
    submitted = {}

    def stop_before_sbatch(executor, fn, *args):
        submitted["executor"] = executor._executor
        raise InterruptedError

    monkeypatch.setattr(submitit.AutoExecutor, "map_array", stop_before_sbatch)
    with pytest.raises(InterruptedError):
        launcher.launch([["model=resnet18"]], initial_job_idx=0)
    executor = submitted["executor"]
    script = executor._make_submission_file_text("python -m submitit.core._submit FOLDER", "uid")
    for line in ("--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8", "--cpus-per-task=10", "--time=1440",
                 "--signal=USR2@120", "--partition=gpu", "--account=abn"):
        assert f"#SBATCH {line}\n" in script, line
    assert "export SUBMITIT_EXECUTOR=slurm\nsrun " in script  # one srun: every task a training process
    assert executor.max_num_timeout == 20  # requeues after time-outs


@pytest.mark.slow  # 2 submitit jobs × 2 training processes
def test_submitit_local_sweep_of_two_jobs_with_two_processes_each(demo_root, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata, plugin_data_pb2

    env = {**os.environ, "ABNEXP_NATIVE": "0", "OMP_NUM_THREADS": "1"}  # no kernel build in the jobs
    for name in (*TORCHRUN_VARS, "SUBMITIT_EXECUTOR"):
        env.pop(name, None)
    result = subprocess.run(
        [sys.executable, "-m", "abnexp", "train", "-m", "hydra/launcher=submitit_local",
         "hydra.launcher.tasks_per_node=2", "hydra.sweep.dir=sweep", "model=resnet18", "norm=gn,syncbn",
         "data.crop_size=32", "data.large_crop_size=40", "data.num_workers=0", "data.batch_size=8",
         "trainer.max_steps=2", "trainer.log_every=1"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = tmp_path / "sweep"
    runs = sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert [r.name for r in runs] == ["0_resnet18-gn", "1_resnet18-syncbn"]
    for run in runs:
        events = list(run.glob("events.out.tfevents.*"))
        assert len(events) == 1, events  # only rank 0 writes TensorBoard
        state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
        assert state["step"] == 2 and state["steps_per_epoch"] == 800 // (2 * 8)  # 800 images over 2 ranks
        acc = EventAccumulator(str(events[0]))
        acc.Reload()
        start = plugin_data_pb2.HParamsPluginData.FromString(
            acc.PluginTagToContent(metadata.PLUGIN_NAME)[metadata.SESSION_START_INFO_TAG]).session_start_info
        assert start.hparams["world_size"].number_value == 2
        assert start.hparams["norm"].string_value == run.name.split("-")[1]
        assert "submitit job: world size 2" in (run / "train.log").read_text()
        steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert steps == [1, 2]  # logged once, by rank 0
    tasks = sorted(p.name for p in (sweep / ".submitit").rglob("*_log.out"))
    assert len(tasks) == 4  # 2 jobs × 2 tasks
