"""Mixed precision (issue 25): MABN's gradient window under a loss scaler, and every norm training
under ``amp=bf16`` / ``amp=fp16`` on CPU.

MABN keeps a moving average of Psi_B (``buffer_gz``), a statistic of the gradients its backward
receives. Under fp16 AMP those are scaled by the GradScaler's loss scale, which changes during
training; the window must hold the *unscaled* statistic (the trainer hands the scale tensor to the
layers, :func:`abnexp.norm.mabn.set_loss_scale`) and an overflow step must leave it as it was. The
reference is the same run in float32 without scaling, where the loss scale cannot enter: the
windows must agree to fp16 / bf16 tolerance (a window stored in loss-scale units is off by the
scale, >= 16 here), and only the injected overflow step may be skipped.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from abnexp.norm.mabn import CenConv2d, MABN2d, set_loss_scale
from conftest import run_cli, train_losses

STEPS = 10


def mabn_net():
    torch.manual_seed(0)
    return nn.Sequential(CenConv2d(3, 8, 3, padding=1, bias=False),
                         MABN2d(8, buffer_size=4, warmup_iters=2, r_warmup_iters=3),
                         CenConv2d(8, 8, 3, padding=1, bias=False),
                         MABN2d(8, buffer_size=4, warmup_iters=2, r_warmup_iters=3),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


def run(amp, overflow_at=None, growth_interval=2000, init_scale=2.0 ** 8):
    """STEPS SGD steps of :func:`mabn_net`; ``amp``: None (float32), torch.float16 (with a GradScaler
    whose scale tensor the layers get) or torch.bfloat16. ``overflow_at``: that step's loss is made
    infinite (every gradient non-finite, as a real overflow makes them). The float32 run skips a
    step with a non-finite gradient, as the scaler does. Returns (model, skipped steps, scales)."""
    model = mabn_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=growth_interval,
                                  enabled=amp == torch.float16)
    if scaler.is_enabled():
        scaler.scale(torch.zeros(()))
        assert set_loss_scale(model, scaler._scale) == 2
    g = torch.Generator().manual_seed(3)
    skipped, scales = [], []
    for step in range(STEPS):
        x, target = torch.randn(6, 3, 8, 8, generator=g) + 1.0, torch.randint(0, 4, (6,), generator=g)
        with torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None):
            loss = nn.functional.cross_entropy(model(x).float(), target)
        if step == overflow_at:
            loss = loss * math.inf
        opt.zero_grad()
        scales.append(scaler.get_scale() if scaler.is_enabled() else 1.0)
        scaler.scale(loss).backward()
        if scaler.is_enabled():
            scaler.step(opt)
            scaler.update()
            if scaler.get_scale() < scales[-1]:
                skipped.append(step)
        elif all(p.grad.isfinite().all() for p in model.parameters()):
            opt.step()
        else:
            skipped.append(step)
    return model, skipped, scales


def windows(model):
    return [m.buffer_gz for m in model if isinstance(m, MABN2d)]


def assert_windows_close(got, ref, rel):
    for a, b in zip(windows(got), windows(ref)):
        assert a.isfinite().all()
        torch.testing.assert_close(a, b, rtol=rel, atol=rel * b.abs().max().item())


def test_fp16_scale_changes_keep_unscaled_window():
    ref, ref_skipped, _ = run(None)
    got, skipped, scales = run(torch.float16, growth_interval=1, init_scale=2.0 ** 4)
    assert ref_skipped == skipped == []
    assert len(set(scales)) == STEPS  # the scale doubled at every step: 16 ... 8192
    assert_windows_close(got, ref, 0.05)


def test_fp16_overflow_step_leaves_window_and_is_skipped_once():
    ref, ref_skipped, _ = run(None, overflow_at=6)
    got, skipped, scales = run(torch.float16, overflow_at=6)
    assert ref_skipped == skipped == [6]  # one skipped step, not the buffer's 4 that follow
    assert scales[7] == scales[6] / 2 and scales[-1] == scales[7]
    assert_windows_close(got, ref, 0.05)


def test_bf16_window_matches_float32():
    ref, _, _ = run(None, overflow_at=5)
    got, skipped, _ = run(torch.bfloat16, overflow_at=5)
    assert skipped == [5]
    assert_windows_close(got, ref, 0.1)
    for m in got:
        if isinstance(m, MABN2d):  # statistics and buffers kept in float32
            assert {b.dtype for b in (m.buffer_gz, m.buffer_x2, m.running_var)} == {torch.float32}


# --- every norm under amp on the demo data (the CLI) ------------------------------------------------
TINY = ["model=resnet18", "data.batch_size=8", "data.crop_size=32", "data.large_crop_size=40",
        "data.num_workers=0", "trainer.log_every=1", "trainer.epochs=1", "trainer.max_steps=3"]


def _every_norm_amp():
    from abnexp.norm import NORMS

    return [(name, amp) for amp in ("bf16", "fp16") for name in NORMS]


@pytest.mark.slow  # 26 short CLI runs (about 3-4 s each on 2 cores)
@pytest.mark.parametrize("name, amp", _every_norm_amp())
def test_every_norm_trains_under_amp(name, amp, tmp_path, capsys):
    run_dir = tmp_path / f"{name}-{amp}"
    code, _, err = run_cli(["train", f"hydra.run.dir={run_dir}", *TINY, f"norm={name}", f"amp={amp}"], capsys)
    assert code == 0, f"norm={name} amp={amp}: {err[-2000:]}"
    losses = train_losses(run_dir)
    assert sorted(losses) == [1, 2, 3] and all(math.isfinite(v) for v in losses.values()), (name, losses)
