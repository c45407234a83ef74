"""data.num_workers defaults to what the machine can feed: the CPUs of this process divided among the
training processes of the node, at most 8 (abnexp.config.default_workers), and stays overridable."""
from __future__ import annotations

from pathlib import Path

import pytest

from abnexp.config import compose


def data_options() -> list[str]:
    import abnexp.configs

    return sorted(p.stem for p in (Path(abnexp.configs.__file__).parent / "data").glob("*.yaml"))


@pytest.fixture
def cpus(monkeypatch):
    def set_cpus(n: int) -> None:
        monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(n)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    return set_cpus


@pytest.mark.parametrize("data", data_options())
def test_every_dataset_follows_the_machine(data, cpus):
    cpus(64)
    assert compose([f"data={data}"]).data.num_workers == 8  # 64 CPUs, one process: capped at 8
    cpus(2)
    assert compose([f"data={data}"]).data.num_workers == 2  # a 2-core machine: 2, where 8 made PyTorch warn


@pytest.mark.parametrize("n_cpus, overrides, env, expected", [
    (64, ["launcher.nproc_per_node=16"], None, 4),  # 16 training processes share 64 CPUs
    (64, [], "32", 2),  # torchrun's 32 local processes (started by the user)
    (3, ["launcher.nproc_per_node=2"], None, 1),
    (1, ["launcher.nproc_per_node=2"], None, 0),  # fewer CPUs than processes: load in the process
    (64, ["data.num_workers=3"], "32", 3),  # an explicit value wins
])
def test_workers_per_process(n_cpus, overrides, env, expected, cpus, monkeypatch):
    cpus(n_cpus)
    if env:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", env)
    assert compose(["data=imagenet", *overrides]).data.num_workers == expected


def test_the_run_config_records_the_number(cpus, tmp_path):
    from omegaconf import OmegaConf

    cpus(4)
    text = OmegaConf.to_yaml(compose([]), resolve=True)  # as the trainer writes config.yaml
    assert OmegaConf.create(text).data.num_workers == 4
