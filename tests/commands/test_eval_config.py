"""`abnexp eval`'s composition: Hydra's override grammar on top of a checkpoint's stored config."""
from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from abnexp.commands.eval import config_from_checkpoint
from abnexp.config import compose
from abnexp.errors import ConfigError


def stored(*overrides: str) -> str:
    """A run's resolved config, as the trainer writes it into every checkpoint."""
    return OmegaConf.to_yaml(compose(list(overrides)), resolve=True)


def test_overrides_apply_on_the_stored_values():
    cfg = config_from_checkpoint(stored("norm=mabn", "norm.buffer_size=8", "data.batch_size=5"),
                                 ["data.large_crop_size=48"])
    assert cfg.norm.name == "mabn" and cfg.norm.buffer_size == 8 and cfg.data.batch_size == 5
    assert cfg.data.large_crop_size == 48


def test_a_group_switch_replaces_that_group_only():
    cfg = config_from_checkpoint(stored("task=semseg", "norm=cbn", "norm.window=3"),
                                 ["data=cityscapes", "data.root=/data/cityscapes"])
    assert cfg.data.name == "cityscapes" and cfg.data.crop_size == 512 and cfg.data.root == "/data/cityscapes"
    assert cfg.norm.window == 3 and cfg.task.name == "semseg"


def test_the_recipe_eval_overrides_come_first_and_the_command_line_wins():
    text = stored("experiment=inplace_abn_sup_t1/leaky_relu")
    recipe = OmegaConf.create(text).experiment.eval_overrides
    assert recipe, "this recipe evaluates with another activation"
    key, value = recipe[0].split("=", 1)
    assert str(OmegaConf.select(config_from_checkpoint(text, []), key)) == value
    other = "leaky_relu" if value == "relu" else "relu"
    assert OmegaConf.select(config_from_checkpoint(text, [f"{key}={other}"]), key) == other


def test_a_bad_override_is_one_clear_error():
    with pytest.raises(ConfigError, match="Could not override 'data.rot': no such config key"):
        config_from_checkpoint(stored(), ["data.rot=/x"])
    with pytest.raises(ConfigError):
        config_from_checkpoint(stored(), ["data.batch_size"])  # not key=value
