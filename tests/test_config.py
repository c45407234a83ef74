"""Every model × norm × data option composes against the schema and builds."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module

from abnexp.config import register_configs


def options(group: str) -> list[str]:
    import abnexp.configs

    return sorted(p.stem for p in (Path(abnexp.configs.__file__).parent / group).glob("*.yaml"))


def compose_cfg(*overrides: str):
    register_configs()
    with initialize_config_module(config_module="abnexp.configs", version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def test_groups_have_the_expected_options():
    assert options("model") == sorted(["resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
                                       "resnext50", "resnext101", "resnext152", "wideresnet38"])
    assert {"bn", "checkpoint", "checkpoint_proposed", "inplace_abn", "inplace_abn_ii"} <= set(options("norm"))
    assert {"demo", "imagenet"} <= set(options("data"))
    assert options("sched") == ["cosine", "linear", "poly", "step"]


@pytest.mark.parametrize("data", ["demo", "imagenet"])
@pytest.mark.parametrize("norm", options("norm"))
@pytest.mark.parametrize("model", options("model"))
def test_compose_and_build(model, norm, data):
    from abnexp.models import MODELS
    from abnexp.norm import NORM_LAYERS
    from abnexp.tasks import build_task

    cfg = compose_cfg(f"model={model}", f"norm={norm}", f"data={data}")
    assert cfg.model.name == model and cfg.norm.name == norm and cfg.data.name == data
    assert cfg.model.name in MODELS and cfg.norm.name in NORM_LAYERS
    assert cfg.trainer.epochs == (90 if data == "imagenet" else 12)
    with torch.device("meta"):  # construction only: no memory, no init cost
        net = build_task(cfg).build_model()
    assert net.out_channels > 0
    assert sum(p.numel() for p in net.parameters()) > 1_000_000


def test_group_options_set_their_own_name():
    for group in ("model", "norm", "data", "sched"):
        for option in options(group):
            cfg = compose_cfg(f"{group}={option}")
            assert getattr(cfg, group).name == option, (group, option)
