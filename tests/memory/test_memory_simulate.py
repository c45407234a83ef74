"""The fake-tensor step simulation against a real CPU step measured by another mechanism
(torch.profiler's allocation events: the CPU allocator's own running total), and the
breakdown against hand-computed byte counts."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

from abnexp.config import compose
from abnexp.memory import Simulator, StepSpec, max_batch, max_crop
from abnexp.report.memory_report import step_spec


def _storage_bytes(tensors) -> int:
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


def real_peak(spec: StepSpec, batch: int, crop: int, amp=None, make_inputs=None) -> int:
    """Peak bytes of a real steady-state step (under CPU autocast to ``amp``, as the trainer on a
    CPU) on ``make_inputs()`` (default: ``spec.inputs(batch, crop)``): the persistent tensors'
    bytes plus the highest running total the profiler's allocation events report during the step."""
    torch.manual_seed(0)
    model = spec.model().train()
    optimizer = spec.optimizer(model)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    state = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    persistent = _storage_bytes([*model.parameters(), *model.buffers(), *state])
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        inputs = make_inputs() if make_inputs else spec.inputs(batch, crop)
        with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
            loss = spec.loss(model, inputs)
        loss.backward()
        del loss
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        del inputs
    totals, stack = [0], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            totals.append(node.extra_fields.total_allocated)
        stack.extend(node.children)
    return persistent + max(totals)


@pytest.mark.slow
@pytest.mark.parametrize("norm", ["bn", "inplace_abn", "inplace_abn_ii", "checkpoint"])
def test_simulated_peak_equals_the_real_steps_within_2_percent(norm):
    # classification at 128² (layer4 at 4²): CPU convolutions without kernel workspaces. The dilated
    # ones of DeepLabV3, and at 64² layer4's 3x3 convolutions on 2² maps (oneDNN's weight gradient:
    # 4 weights' bytes per thread, 75 MB on 2 threads), allocate one inside convolution_backward,
    # which the profiler counts and no tensor owns (library workspaces: memory.reserved_gb)
    cfg = compose(["model=resnet18", f"norm={norm}", "data.crop_size=128", "data.batch_size=4"])
    spec = step_spec(cfg)
    simulated = Simulator(spec).step(4, 128)
    measured = real_peak(spec, 4, 128)
    assert abs(simulated.tensor_peak_bytes - measured) <= 0.02 * measured, (simulated.tensor_peak_bytes, measured)


@pytest.mark.slow
@pytest.mark.parametrize("norm", ["bn", "inplace_abn"])
def test_simulated_bf16_peak_equals_the_real_autocast_steps_within_2_percent(norm):
    # bfloat16 autocast keeps the convolutions' outputs and their weights' bf16 copies (the
    # autocast cache) for backward; the norm layers and the loss run in float32 (their inputs
    # are bf16); gradients and momentum stay float32
    cfg = compose(["model=resnet18", f"norm={norm}", "data.crop_size=64", "data.batch_size=8", "amp=bf16"])
    spec = step_spec(cfg)
    assert spec.amp == torch.bfloat16
    simulated = Simulator(spec).step(8, 64)
    measured = real_peak(spec, 8, 64, amp=torch.bfloat16)
    assert abs(simulated.tensor_peak_bytes - measured) <= 0.02 * measured, (simulated.tensor_peak_bytes, measured)


class _Linear(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(100, 10, bias=False)

    def forward(self, x):
        return self.fc(x.flatten(1))


def _linear_spec() -> StepSpec:
    return StepSpec(model=_Linear, optimizer=lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
                    inputs=lambda batch, side: torch.randn(batch, side * side),
                    loss=lambda m, x: m(x).square().sum())


def test_breakdown_of_a_linear_layer_by_hand():
    r = Simulator(_linear_spec()).step(8, 10)  # x (8, 100) float32, W (10, 100)
    weight, x, out = 10 * 100 * 4, 8 * 100 * 4, 8 * 10 * 4
    assert r.parameters_bytes == weight and r.optimizer_bytes == weight and r.gradients_bytes == weight
    assert r.inputs_bytes == x
    assert r.activations_bytes >= out  # the output (kept by square's backward) and its square
    assert r.at_peak["parameters"] == weight and r.at_peak["optimizer"] == weight and r.at_peak["inputs"] == x
    assert r.top_modules[0][0] == "fc" and r.top_modules[0][1] == out
    assert r.tensor_peak_bytes >= 3 * weight + x + out
    assert r.allocated_peak_bytes >= r.tensor_peak_bytes  # blocks are 512-byte multiples


def _conv_spec() -> StepSpec:
    return StepSpec(model=lambda: nn.Conv2d(3, 8, 3, padding=1, bias=False),
                    optimizer=lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
                    inputs=lambda batch, side: torch.randn(batch, 3, side, side),
                    loss=lambda m, x: m(x).square().sum())


def test_bf16_conv_keeps_half_precision_copies_by_hand():
    # autocast casts input and weight to bf16 (2 bytes) and conv2d keeps both for backward; its
    # bf16 output is kept by square's backward; the float32 master weight, its gradient and
    # momentum stay float32
    spec = _conv_spec()
    spec = StepSpec(spec.model, spec.optimizer, spec.inputs, spec.loss, amp=torch.bfloat16)
    r = Simulator(spec).step(4, 16)  # x (4, 3, 16, 16), W (8, 3, 3, 3)
    x16, w16, out16 = 4 * 3 * 16 * 16 * 2, 8 * 3 * 3 * 3 * 2, 4 * 8 * 16 * 16 * 2
    assert r.parameters_bytes == r.gradients_bytes == r.optimizer_bytes == 8 * 3 * 3 * 3 * 4
    assert r.inputs_bytes == 4 * 3 * 16 * 16 * 4
    assert dict(r.top_modules)["(model)"] == x16 + w16 + out16


def test_search_finds_the_boundary():
    sim = Simulator(_conv_spec())
    assert max_batch(sim, 8, capacity=2**20) == 0  # not even one 2 MiB segment
    capacity = 64 * 2**20
    b = max_batch(sim, 32, capacity)
    assert sim.try_step(b, 32).fits(capacity) and not sim.try_step(b + 1, 32).fits(capacity)
    assert sim.try_step(b, 32).tensor_peak_bytes <= capacity < 2 * sim.try_step(b + 1, 32).allocated_peak_bytes
    crop = max_crop(sim, 4, capacity, start=16, multiple=1, upper=2048)
    assert sim.try_step(4, crop).fits(capacity) and not sim.try_step(4, crop + 1).fits(capacity)


@pytest.mark.slow
def test_semseg_bn_at_batch_1_is_not_a_fit():
    cfg = compose(["task=semseg", "model=resnet18", "norm=bn", "data.crop_size=32", "task.head_channels=16"])
    sim = Simulator(step_spec(cfg))
    assert sim.try_step(1, 32) is None  # BatchNorm's one value per channel in the pooling branch
    assert max_batch(sim, 32, capacity=2**30) > 2
