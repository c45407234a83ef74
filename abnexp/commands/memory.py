"""``abnexp memory [overrides]``: what fits in ``memory.device_gb`` for the configured model, norm,
crop and batch (abnexp.memory; InPlace-ABN §4.2, Table 3's fixed-crop / fixed-batch regimes)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from abnexp.config import compose
from abnexp.report.memory_report import format_plan, measured_max_batch, plan_for


def memory_command(argv: list[str]) -> dict:
    """Prints the plan; writes it as JSON to ``memory.json`` if set; returns it.

    Raises:
        ConfigError: a composition error, or a task the planner does not support.
    """
    cfg = compose(argv)
    result = plan_for(cfg)
    print(format_plan(result))
    if cfg.memory.measure:
        result["measured_max_batch"] = measured_max_batch(cfg, result["crop"])
        print(f"  measured on {torch.cuda.get_device_name()}: largest batch {result['measured_max_batch']}")
    if cfg.memory.json:
        Path(cfg.memory.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {cfg.memory.json}")
    return result
