"""`abnexp memory` end to end: the JSON keys, InPlace-ABN fitting more than BN, the errors."""
from __future__ import annotations

import json

import pytest
import torch

from abnexp.memory import measure_max_batch
from conftest import run_cli

SMALL = ["model=resnet18", "data.crop_size=64", "data.batch_size=8", "memory.device_gb=1"]


@pytest.mark.slow
def test_memory_command_writes_json_and_inplace_fits_more(tmp_path, capsys):
    results = {}
    for norm in ("bn", "inplace_abn"):
        path = tmp_path / f"{norm}.json"
        code, out, err = run_cli(["memory", *SMALL, f"norm={norm}", f"memory.json={path}"], capsys)
        assert code == 0, err
        results[norm] = r = json.loads(path.read_text())
        assert {"max_batch", "max_crop", "peak_bytes", "parameters_bytes", "gradients_bytes", "optimizer_bytes",
                "activations_bytes", "backward_transient_bytes", "tensor_peak_bytes", "top_modules"} <= set(r)
        assert f"largest batch at 64²: {r['max_batch']}" in out
        assert r["gradients_bytes"] == r["optimizer_bytes"] < r["parameters_bytes"]  # momentum per weight; + BN buffers
        assert sum(r["at_peak"].values()) == r["tensor_peak_bytes"] <= r["allocated_peak_bytes"] <= r["peak_bytes"]
    assert results["bn"]["parameters_bytes"] == results["inplace_abn"]["parameters_bytes"]
    assert results["inplace_abn"]["activations_bytes"] < 0.75 * results["bn"]["activations_bytes"]
    assert results["inplace_abn"]["max_batch"] > results["bn"]["max_batch"]
    assert results["inplace_abn"]["max_crop"] > results["bn"]["max_crop"]


@pytest.mark.parametrize("args, message", [
    (["model=resnet19"], "resnet19"),
    (["memory.device=titan_x"], "memory.device='titan_x' is not a known GPU"),
    (["memory.reserved_gb=20"], "lower memory.reserved_gb"),
    (["task=detection", "memory.gt_instances=0"], "memory.gt_instances=0"),
    (["task=detection", "memory.image_size=[1333,800]"], "memory.image_size=[1333, 800]"),
])
def test_memory_command_bad_input(capsys, args, message):
    code, _, err = run_cli(["memory", *args], capsys)
    assert code == 1 and message in err and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error path")
def test_measure_needs_a_gpu(capsys):
    code, _, err = run_cli(["memory", *SMALL, "memory.measure=true"], capsys)
    assert code == 1 and "needs a CUDA device" in err


def test_measure_max_batch_starts_at_its_lower_bound():
    limit = 37  # a fake device on which batches above 37 run out of memory

    def step(batch, crop):
        assert batch >= 2  # never batch 1 (BatchNorm's one value per channel)
        if batch > limit:
            raise torch.cuda.OutOfMemoryError("fake")

    calls = []
    assert measure_max_batch(lambda b, c: (calls.append(b), step(b, c)), 64, lower=2, upper=1024) == limit
    assert len(calls) < 15 and calls[0] == 2
    assert measure_max_batch(lambda b, c: step(b, c), 64, lower=2, upper=20) == 20  # capped at upper
