"""``abnexp eval checkpoint=PATH [overrides]``: rebuild the model from the config stored in the
checkpoint, evaluate it under the task's protocols, print a table and write ``eval.json``."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from omegaconf import OmegaConf

from abnexp.config import Config
from abnexp.engine.checkpoint import load_checkpoint
from abnexp.engine.distributed import DistEnv
from abnexp.engine.trainer import amp_dtype, make_eval_loader, select_device, unwrap
from abnexp.errors import ConfigError
from abnexp.tasks import build_task

log = logging.getLogger("abnexp")


def config_from_checkpoint(yaml_text: str, overrides: list[str]):
    """The checkpoint's config validated against the schema, with the recipe's
    ``experiment.eval_overrides`` and then the ``key=value`` overrides applied.

    Raises:
        ConfigError: an override is malformed or names a key the schema does not have.
    """
    cfg = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(yaml_text))
    if cfg.experiment is not None:  # a recipe's evaluation settings come first, the command line's last
        overrides = [*cfg.experiment.eval_overrides, *overrides]
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (e.g. data.root=/data/imagenet)")
        key, value = item.split("=", 1)
        if OmegaConf.select(cfg, key, default="__missing__") == "__missing__":
            raise ConfigError(f"override {key!r}: no such config key (see the run's config.yaml)")
        try:
            OmegaConf.update(cfg, key, OmegaConf.create(f"v: {value}").v if value else None, merge=False)
        except Exception as e:  # OmegaConf's validation errors: wrong type / enum value
            raise ConfigError(f"override {item!r}: {e}".splitlines()[0]) from None
    return cfg


def output_path(checkpoint: Path) -> Path:
    """``<run dir>/eval.json`` for ``<run dir>/checkpoints/x.pt``, else next to the checkpoint."""
    folder = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent
    return folder / "eval.json"


def format_table(results: dict) -> str:
    lines = ["| protocol | top-1 [%] | top-5 [%] | images |", "|---|---|---|---|"]
    for name, r in results.items():
        label = f"{r['crop']}² {'10-crop' if r['ten_crop'] else 'center'}"
        lines.append(f"| {label} ({name}) | {r['top1']:.2f} | {r['top5']:.2f} | {r['num_samples']} |")
    return "\n".join(lines)


def run_eval(checkpoint: str, overrides: list[str]) -> dict:
    """Evaluates ``checkpoint``; returns the eval.json content {protocol: {"top1", "top5", ...}, ...}."""
    path = Path(checkpoint).expanduser()
    state = load_checkpoint(path)
    cfg = config_from_checkpoint(state["config"], overrides)
    device = select_device(cfg.device, DistEnv())
    task = build_task(cfg)
    model = task.build_model()
    model.load_state_dict(state["model"])
    model = model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    results = task.evaluate_protocols(unwrap(model), device, amp_dtype(cfg), cfg.channels_last,
                                      lambda ds, ten_crop: make_eval_loader(ds, cfg, ten_crop,
                                                                            collate_fn=getattr(task, "collate_fn", None)))
    out = {"checkpoint": str(path.resolve()), "epoch": state["epoch"], "step": state["step"],
           "model": cfg.model.name, "norm": cfg.norm.name, "data": cfg.data.name, "protocols": results}
    target = output_path(path)
    tmp = target.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(out, indent=2) + "\n")
    tmp.replace(target)
    print(task.format_table(results) if hasattr(task, "format_table") else format_table(results))
    print(f"wrote {target}")
    return out
