"""Values are validated at composition, before a run dir exists (abnexp.config.validate)."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from abnexp.config import compose, validate
from abnexp.errors import ConfigError
from conftest import run_cli

INT_KEYS = ["data.batch_size", "data.num_workers", "data.crop_size", "data.large_crop_size", "trainer.epochs",
            "trainer.max_steps", "trainer.log_every", "trainer.eval_every", "optim.base_batch_size",
            "norm.group_size", "launcher.nproc_per_node", "model.output_stride"]
FLOAT_KEYS = ["optim.lr", "optim.momentum", "optim.weight_decay", "sched.warmup_epochs", "sched.gamma",
              "data.resize_ratio", "data.min_scale", "trainer.grad_clip", "trainer.label_smoothing", "norm.eps"]


@pytest.mark.parametrize("overrides, message", [
    (["data.batch_size=0"], "data.batch_size=0: valid values are >= 1"),
    (["data.batch_size=-1"], "data.batch_size=-1: valid values are >= 1"),
    (["data.num_workers=-3"], "data.num_workers=-3: valid values are >= 0"),
    (["trainer.epochs=0"], "trainer.epochs=0: valid values are >= 1"),
    (["optim.lr=0"], "optim.lr=0.0: valid values are > 0"),
    (["model.output_stride=4"], "model.output_stride=4: valid values are one of 8, 16, 32"),
    (["sched=step", "sched.milestones=[60,30]"], "sched.milestones=[60, 30]: expected increasing epochs"),
    (["norm=mabn", "norm.group_size=3"], "norm.group_size=3 does not divide data.batch_size=32"),
    (["norm=cbn", "norm.window=0"], "norm.window=0: valid values are >= 1"),
    (["data.crop_size=16"], "data.crop_size=16 is smaller than model.output_stride=32"),
    (["task=semseg", "data.class_uniform=1.5"], "data.class_uniform=1.5: valid values are in [0, 1]"),
])
def test_a_value_out_of_range_names_the_key_the_value_and_the_range(overrides, message, tmp_path, capsys):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        validate(compose(overrides))
    code, _, err = run_cli(["train", f"hydra.run.dir={tmp_path / 'run'}", *overrides], capsys)
    assert code == 1 and err.strip() == f"abnexp: error: {err.strip().split('abnexp: error: ', 1)[-1]}"
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # refused before Hydra made the run dir


@pytest.mark.slow  # composes all 89 recipes
def test_the_shipped_configs_and_every_recipe_are_valid():
    from abnexp.report.experiments import experiments

    refused = {}
    for overrides in ([], ["task=semseg"], ["task=detection"], *[[f"experiment={e['name']}"] for e in experiments()]):
        try:
            validate(compose(overrides))
        except ConfigError as e:
            refused[" ".join(overrides)] = str(e)
    assert refused == {}


@pytest.mark.slow  # 30 drawn configs through the CLI
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(INT_KEYS + FLOAT_KEYS), ivalue=st.integers(-3, 70),
       fvalue=st.floats(-1.0, 3.0, allow_nan=False).map(lambda v: round(v, 3)))
def test_any_drawn_value_is_either_a_valid_config_or_one_error_line(key, ivalue, fvalue, tmp_path, capsys):
    value = ivalue if key in INT_KEYS else fvalue
    run = tmp_path / f"run_{key}_{value}"
    code, out, err = run_cli(["train", "--cfg", "job", f"hydra.run.dir={run}", f"{key}={value}"], capsys)
    if code == 0:  # a valid config: printed, and valid by the same checks the trainer meets
        assert key.rsplit(".", 1)[-1] + ":" in out
        validate(compose([f"{key}={value}"]))
    else:
        lines = err.strip().splitlines()
        assert code == 1 and len(lines) == 1 and lines[0].startswith("abnexp: error: "), err
        assert key in lines[0] or key.rsplit(".", 1)[0] in lines[0]
        code, _, _ = run_cli(["train", f"hydra.run.dir={run}", f"{key}={value}"], capsys)
        assert code == 1 and not run.exists()
