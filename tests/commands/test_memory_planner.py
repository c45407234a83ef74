"""The memory planner against hand-computed byte counts, and `abnexp memory` end to end."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from abnexp.memory import GIB, activation_bytes, module_bytes, plan
from conftest import run_cli


def test_activation_bytes_of_a_conv_is_its_input():
    model = nn.Conv2d(3, 8, 1, bias=False)  # keeps its input (weights excluded)
    assert activation_bytes(model, batch=2, crop=16) == 2 * 3 * 16 * 16 * 4


def test_plan_hand_computed():
    model = nn.Conv2d(3, 8, 1, bias=False)  # 24 float32 weights: 96 bytes, ×3 with grads + momentum
    assert module_bytes(model) == {"params_bytes": 96, "grads_bytes": 96, "optimizer_bytes": 96}
    r = plan(model, device_gb=1.0, reserved_gb=0.0, crop=32, batch=4, probe_crop=16, probe_batch=2)
    per_sample = 3 * 32 * 32 * 4  # measured at 16² and scaled by pixels
    assert r["activation_bytes_per_sample"] == per_sample
    assert r["max_batch"] == (GIB - 288) // per_sample
    side = ((GIB - 288) / (4 * 3 * 4)) ** 0.5  # bytes per pixel per sample: 3 channels × 4 bytes
    assert r["max_crop"] == int(side // 8 * 8)


def test_memory_command_writes_json_and_inplace_fits_more(tmp_path, capsys):
    results = {}
    for norm in ("bn", "inplace_abn"):
        path = tmp_path / f"{norm}.json"
        code, out, err = run_cli(["memory", "model=resnet18", f"norm={norm}", "memory.probe_crop=64",
                                  "data.crop_size=64", f"memory.json={path}"], capsys)
        assert code == 0, err
        results[norm] = json.loads(path.read_text())
        assert {"params_bytes", "activation_bytes_per_sample", "max_batch", "max_crop"} <= set(results[norm])
        assert f"largest batch at 64²: {results[norm]['max_batch']}" in out
    assert results["bn"]["params_bytes"] == results["inplace_abn"]["params_bytes"]
    assert results["inplace_abn"]["max_batch"] > 1.3 * results["bn"]["max_batch"]


def test_memory_command_bad_override(capsys):
    code, _, err = run_cli(["memory", "model=resnet19"], capsys)
    assert code == 1 and "resnet19" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error path")
def test_measure_needs_a_gpu(capsys):
    code, _, err = run_cli(["memory", "model=resnet18", "memory.probe_crop=32", "data.crop_size=32",
                            "memory.measure=true"], capsys)
    assert code == 1 and "needs a CUDA device" in err


def test_measure_max_batch_binary_search():
    from abnexp.memory import measure_max_batch

    limit = 37  # a fake device on which batches above 37 run out of memory

    def step(batch, crop):
        if batch > limit:
            raise torch.cuda.OutOfMemoryError("fake")

    calls = []
    assert measure_max_batch(lambda b, c: (calls.append(b), step(b, c)), 64, torch.device("cpu")) == limit
    assert len(calls) < 15
