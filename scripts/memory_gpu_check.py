"""On a GPU: the memory planner's simulated peaks against a real training step's, two settings.

    python scripts/memory_gpu_check.py [--out results/memory_gpu.md]

For each setting, one warm-up step (the momentum buffers), then one measured step with
``torch.cuda.reset_peak_memory_stats``: ``max_memory_allocated`` / ``max_memory_reserved``
beside the simulation's ``allocated_peak_bytes`` / ``peak_bytes`` (abnexp.report.memory_report).
The real peaks include cuDNN's workspaces, which the simulation does not count.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from abnexp.config import compose
from abnexp.memory import GIB
from abnexp.report.memory_report import plan_for, step_spec

SETTINGS = (
    ["task=semseg", "data=cityscapes", "model=resnext101", "model.output_stride=8", "data.crop_size=512",
     "data.batch_size=4", "norm=bn"],
    ["task=semseg", "data=cityscapes", "model=resnext101", "model.output_stride=8", "data.crop_size=512",
     "data.batch_size=4", "norm=inplace_abn"],
)


def real_peaks(overrides: list[str]) -> tuple[int, int]:
    """(max allocated, max reserved) bytes of a steady-state step on the GPU."""
    cfg = compose(overrides)
    device = torch.device("cuda")
    spec = step_spec(cfg, device)
    model = spec.model().to(device).train()
    optimizer = spec.optimizer(model)
    batch, crop = cfg.data.batch_size, cfg.data.crop_size

    def step() -> None:
        spec.loss(model, spec.inputs(batch, crop)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/memory_gpu.md")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    lines = [f"# Simulated vs real peak memory on {torch.cuda.get_device_name()}", "",
             "Regenerate: `python scripts/memory_gpu_check.py` (on a GPU).", "",
             "| setting | simulated allocated / reserved GiB | real allocated / reserved GiB | allocated real / sim |",
             "|---|---|---|---|"]
    for overrides in SETTINGS:
        sim = plan_for(compose(overrides), search=False)
        allocated, reserved = real_peaks(overrides)
        torch.cuda.empty_cache()
        simulated = f"{sim['allocated_peak_bytes'] / GIB:.3f} / {sim['peak_bytes'] / GIB:.3f}"
        lines.append(f"| {' '.join(overrides)} | {simulated} | {allocated / GIB:.3f} / {reserved / GIB:.3f} "
                     f"| {allocated / sim['allocated_peak_bytes']:.3f} |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
