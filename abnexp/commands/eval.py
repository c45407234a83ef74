"""``abnexp eval checkpoint=PATH [overrides]``: rebuild the model from the config stored in the
checkpoint, evaluate it under the task's protocols, print a table and write ``eval.json``.

Overrides use Hydra's grammar on top of the checkpoint's config (``data.root=/data/imagenet``,
``data=cityscapes`` to switch the whole data group, ...); a recipe's ``experiment.eval_overrides``
come first, the command line's last.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from abnexp.config import compose
from abnexp.engine.checkpoint import load_checkpoint
from abnexp.distributed import DistEnv
from abnexp.engine.runtime import make_eval_loader, run_context, unwrap
from abnexp.errors import ConfigError
from abnexp.tasks import build_task

log = logging.getLogger("abnexp")

USAGE = "usage: abnexp eval checkpoint=<run dir>/checkpoints/last.pt [key=value ...]"


def config_from_checkpoint(yaml_text: str, overrides: list[str]):
    """The checkpoint's config composed against the schema, with the recipe's
    ``experiment.eval_overrides`` and then ``overrides`` applied (Hydra's override grammar).

    Raises:
        ConfigError: an override is malformed or names a key / option the schema does not have.
    """
    from omegaconf import OmegaConf

    stored = OmegaConf.create(yaml_text)
    recipe = list(OmegaConf.select(stored, "experiment.eval_overrides", default=None) or [])
    return compose([*recipe, *overrides], run=stored)


def output_path(checkpoint: Path) -> Path:
    """``<run dir>/eval.json`` for ``<run dir>/checkpoints/x.pt``, else next to the checkpoint."""
    folder = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent
    return folder / "eval.json"


def run_eval(checkpoint: str, overrides: list[str]) -> dict:
    """Evaluates ``checkpoint``; returns the eval.json content {"protocols": {name: metrics}, ...}.

    Raises:
        ConfigError / DatasetError: bad overrides, a missing dataset root; CheckpointError: an
        unreadable checkpoint.
    """
    path = Path(checkpoint).expanduser()
    state = load_checkpoint(path)
    cfg = config_from_checkpoint(state["config"], overrides)
    ctx = run_context(cfg, DistEnv())
    task = build_task(cfg)
    model = task.build_model()
    model.load_state_dict(state["model"])
    model = model.to(ctx.device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    results = task.evaluate_protocols(unwrap(model), ctx, lambda ds, ten_crop: make_eval_loader(
        ds, cfg, ten_crop, collate_fn=task.collate_fn))
    out = {"checkpoint": str(path.resolve()), "epoch": state["epoch"], "step": state["step"],
           "model": cfg.model.name, "norm": cfg.norm.name, "data": cfg.data.name, "protocols": results}
    target = output_path(path)
    tmp = target.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(out, indent=2) + "\n")
    tmp.replace(target)
    print(task.format_table(results))
    print(f"wrote {target}")
    return out


def eval_command(argv: list[str]) -> None:
    """``abnexp eval checkpoint=PATH [overrides]``.

    Raises:
        ConfigError: no (or more than one) ``checkpoint=``.
    """
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s")
    checkpoint = [a.split("=", 1)[1] for a in argv if a.startswith("checkpoint=")]
    if len(checkpoint) != 1:
        raise ConfigError(USAGE)
    run_eval(checkpoint[0], [a for a in argv if not a.startswith("checkpoint=")])
