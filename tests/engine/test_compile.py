"""trainer.compile=true: a torch.compile'd model trains, checkpoints the plain module's keys and
resumes, with the per-step losses of the eager model (to float32 rounding of a fused graph)."""
from __future__ import annotations


import pytest
import torch

from abnexp.config import compose
from abnexp.tasks import build_task
from conftest import run_cli, train_losses

pytestmark = pytest.mark.slow  # compiles a model with inductor (about a minute on 2 cores)

TINY = ["model=resnet18", "norm=inplace_abn", "data.batch_size=16", "data.crop_size=32",
        "data.large_crop_size=40", "data.num_workers=0", "trainer.log_every=1", "trainer.epochs=1"]


def test_compiled_training_checkpoints_and_resumes_like_eager(tmp_path, capsys):
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    assert run_cli(["train", f"hydra.run.dir={eager}", *TINY, "trainer.max_steps=4"], capsys)[0] == 0
    assert run_cli(["train", f"hydra.run.dir={compiled}", *TINY, "trainer.max_steps=2",
                    "trainer.compile=true"], capsys)[0] == 0
    state = torch.load(compiled / "checkpoints" / "last.pt", weights_only=True)
    plain = build_task(compose(TINY)).build_model()
    assert set(state["model"]) == set(plain.state_dict())  # no torch.compile / DDP prefixes
    # the same run dir again: resumes from step 2 (compiling again) and continues to step 4
    assert run_cli(["train", f"hydra.run.dir={compiled}", *TINY, "trainer.max_steps=4",
                    "trainer.compile=true"], capsys)[0] == 0
    reference, resumed = train_losses(eager), train_losses(compiled)
    assert sorted(resumed) == sorted(reference) == [1, 2, 3, 4]
    for step in reference:
        assert resumed[step] == pytest.approx(reference[step], rel=1e-3), step
