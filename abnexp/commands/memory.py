"""``abnexp memory [overrides]``: the peak memory of the configured training step, simulated on
fake tensors, and what fits ``memory.device`` (or ``memory.device_gb``): the largest batch at the
crop and the largest square crop at the batch (abnexp.memory; InPlace-ABN §4.2, Table 3's
fixed-crop / fixed-batch regimes)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from abnexp.config import compose, validate
from abnexp.report.memory_report import check_measure, format_plan, measured_max_batch, plan_for


def memory_command(argv: list[str]) -> dict:
    """Prints the plan; writes it as JSON to ``memory.json`` if set (keys: ``max_batch``,
    ``max_crop``, ``peak_bytes`` and the breakdown of abnexp.report.memory_report.plan_for);
    returns it. ``memory.measure=true`` adds ``measured_max_batch`` (real steps on this GPU, its
    memory capped at the planned device's).

    Raises:
        ConfigError: a composition error, a value out of its range (abnexp.config.validate), an
            unknown device, a task the planner does not support, or ``memory.measure=true``
            without a (large enough) GPU.
    """
    cfg = compose(argv)
    validate(cfg)
    if cfg.memory.measure:
        check_measure(cfg)
    result = plan_for(cfg)
    print(format_plan(result))
    if cfg.memory.measure:
        result["measured_max_batch"] = measured_max_batch(cfg, result["crop"], upper=4 * result["max_batch"] + 8)
        print(f"  measured on {torch.cuda.get_device_name()}: largest batch {result['measured_max_batch']}")
    if cfg.memory.json:
        Path(cfg.memory.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {cfg.memory.json}")
    return result
