"""Every model × norm × data option composes against the schema and builds."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from abnexp.config import compose
from abnexp.errors import ConfigError


def options(group: str) -> list[str]:
    import abnexp.configs

    return sorted(p.stem for p in (Path(abnexp.configs.__file__).parent / group).glob("*.yaml"))


def compose_cfg(*overrides: str):
    return compose(list(overrides))


def test_groups_have_the_expected_options():
    assert options("model") == sorted(["resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
                                       "resnext50", "resnext101", "resnext152", "wideresnet38"])
    assert {"bn", "checkpoint", "checkpoint_proposed", "inplace_abn", "inplace_abn_ii"} <= set(options("norm"))
    assert {"demo", "imagenet"} <= set(options("data"))
    assert options("sched") == ["cosine", "linear", "poly", "step"]


@pytest.mark.slow  # 234 models built
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


@pytest.mark.parametrize("overrides, key", [
    (["norm=gn", "norm.window=4"], "norm.window"),  # CBN's window: GroupNorm has none
    (["norm=bn", "norm.buffer_size=8"], "norm.buffer_size"),  # MABN's buffer
    (["norm=gn", "norm.momentum=0.1"], "norm.momentum"),  # no running statistics
    (["data=demo", "data.scale_range=[0.5,1.0]"], "data.scale_range"),  # a segmentation key on classification data
    (["task=semseg", "data.min_size=600"], "data.min_size"),  # a detection key on segmentation data
    (["task=cls", "task.eval_scales=[1.0]"], "task.eval_scales"),  # a semseg key under task=cls
])
def test_a_key_the_option_does_not_have_fails_at_composition(overrides, key):
    with pytest.raises(ConfigError, match=rf"Could not override '{key}': no such config key"):
        compose(overrides)


def test_option_keys_compose_into_their_own_schema():
    cfg = compose(["norm=cbn", "norm.window=4"])
    assert cfg.norm.window == 4 and cfg.norm.burnin_iters == 100  # configs/norm/cbn.yaml's value
    assert compose(["norm=mabn", "norm.buffer_size=8"]).norm.buffer_size == 8
    semseg = compose(["task=semseg", "data.scale_range=[0.75,1.25]"])
    assert list(semseg.data.scale_range) == [0.75, 1.25] and semseg.task.head_channels == 256
    assert compose(["task=detection"]).data.min_size == 128  # demo_coco's


def test_compose_on_a_run_config_keeps_its_values_under_the_overrides():
    from omegaconf import OmegaConf

    run = OmegaConf.to_yaml(compose(["norm=cbn", "norm.window=6", "data.batch_size=7", "optim.lr=0.3"]))
    again = compose(["optim.lr=0.5"], run=run)
    assert again.norm.name == "cbn" and again.norm.window == 6 and again.data.batch_size == 7
    assert again.optim.lr == 0.5
    switched = compose(["data=imagenet"], run=run)  # a group switch takes that option's values
    assert switched.data.name == "imagenet" and switched.data.batch_size == 64 and switched.norm.window == 6
    with pytest.raises(ConfigError, match="no such config key"):
        compose(["norm.r_max=2"], run=run)


def test_a_moved_recipe_names_its_new_name_and_an_unknown_one_fails():
    with pytest.raises(ConfigError, match="experiment=cbn_t3_cbn_bs2 has moved: use experiment=cbn_t3/cbn_bs2"):
        compose(["experiment=cbn_t3_cbn_bs2"])
    with pytest.raises(ConfigError, match="Could not find 'experiment/no_such_recipe'"):
        compose(["experiment=no_such_recipe"])  # not silently the default config


def test_model_keys_belong_to_their_models():
    assert compose(["model=resnext50", "model.input_3x3=true"]).model.input_3x3 is True
    with pytest.raises(ConfigError, match="Could not override 'model.input_3x3': no such config key"):
        compose(["model=resnet18", "model.input_3x3=true"])
    with pytest.raises(ConfigError, match="no such config key"):
        compose(["task=detection", "head=faster_rcnn_fpn", "head.mask_head_convs=2"])


def test_every_option_file_has_a_table_entry_and_its_schema():
    from abnexp.data import DATASETS
    from abnexp.models import MODELS
    from abnexp.models.detection import HEADS
    from abnexp.norm import NORMS
    from abnexp.tasks import TASKS

    for group, table in {"model": MODELS, "norm": NORMS, "data": DATASETS, "task": TASKS, "head": HEADS}.items():
        assert options(group) == sorted(table), group
        for name, spec in table.items():
            cfg = compose([f"{group}={name}"] + (["task=detection"] if group == "head" else []))
            assert type(cfg[group]._metadata.object_type) is type and cfg[group]._metadata.object_type is spec.options
