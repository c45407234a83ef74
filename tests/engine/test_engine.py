"""Unit tests of the engine pieces against hand-computed values."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from abnexp.engine.checkpoint import load_checkpoint, save_checkpoint
from abnexp.engine.optim import EpochLR, build_optimizer, param_groups, schedule_warnings
from abnexp.errors import ConfigError


def sched(name, **kw):
    base = dict(name=name, warmup_epochs=0.0, warmup_factor=0.1, milestones=[30, 60], gamma=0.1,
                power=0.9, final_lr=0.0)
    base.update(kw)
    return SimpleNamespace(**base)


def lr_after(cfg, t, total=90, lr=0.1):
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    s = EpochLR(opt, cfg, total)
    s.set_progress(t)
    return opt.param_groups[0]["lr"]


@pytest.mark.parametrize("t,expected", [(0, 0.1), (29.99, 0.1), (30, 0.01), (59, 0.01), (60, 0.001), (89, 0.001)])
def test_step_schedule(t, expected):
    assert lr_after(sched("step"), t) == pytest.approx(expected)


def test_linear_poly_cosine_and_warmup():
    assert lr_after(sched("linear", final_lr=1e-6), 45) == pytest.approx((0.1 + 1e-6) / 2)
    assert lr_after(sched("linear", final_lr=1e-6), 90) == pytest.approx(1e-6)
    assert lr_after(sched("poly"), 45) == pytest.approx(0.1 * 0.5 ** 0.9)
    assert lr_after(sched("cosine"), 30) == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi / 3)))
    # warm-up over 5 epochs from 0.1×: at 2.5 epochs the factor is 0.1 + 0.9 × 0.5 = 0.55
    assert lr_after(sched("step", warmup_epochs=5), 2.5) == pytest.approx(0.1 * 0.55)
    with pytest.raises(ConfigError):
        lr_after(sched("exp"), 1)


@pytest.mark.parametrize("cfg, epochs, keys", [
    (sched("step"), 12, ["sched.milestones=[30,60]"]),  # ImageNet's milestones on a 12-epoch run
    (sched("step"), 30, ["sched.milestones=[30,60]"]),  # the first decay would come after the last step
    (sched("step"), 31, []),  # decays once, at 30
    (sched("step", milestones=[]), 12, []),  # a constant lr, as written
    (sched("cosine"), 12, []),  # cosine ignores milestones
    (sched("cosine", warmup_epochs=12), 12, ["sched.warmup_epochs=12"]),
    (sched("step", warmup_epochs=40), 20, ["sched.milestones=[30,60]", "sched.warmup_epochs=40"]),
    (sched("cosine", warmup_epochs=0.5), 1, []),
])
def test_schedule_warnings_name_the_key_and_a_fix(cfg, epochs, keys):
    warnings = schedule_warnings(cfg, epochs)
    assert [w.split(" ", 1)[0] for w in warnings] == keys
    assert all(f"trainer.epochs={epochs}" in w and ("sched=cosine" in w or "lower sched.warmup_epochs" in w)
               for w in warnings)
    # what the warnings say is what the schedule does: the lr never decays / never reaches optim.lr
    lrs = [lr_after(cfg, t * epochs / 50, total=epochs) for t in range(50)]
    if keys == ["sched.milestones=[30,60]"]:
        assert lrs == pytest.approx([0.1] * 50)
    elif not keys and cfg.name == "step" and cfg.milestones:
        assert lrs[-1] == pytest.approx(0.01)
    if any(k.startswith("sched.warmup_epochs") for k in keys):
        assert max(lrs) < 0.1


def test_scheduler_state_restores_progress_not_base_lr():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    s = EpochLR(opt, sched("step"), 90)
    s.set_progress(40)
    opt2 = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.2)
    s2 = EpochLR(opt2, sched("step"), 90)
    s2.load_state_dict(s.state_dict())
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.02)


def test_param_groups_exclude_norm_and_bias():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Linear(4, 2))
    groups = param_groups(model, 1e-4, decay_norm_and_bias=False)
    assert [len(g["params"]) for g in groups] == [2, 4]  # conv.w, fc.w | conv.b, bn.w, bn.b, fc.b
    assert groups[1]["weight_decay"] == 0.0
    assert len(param_groups(model, 1e-4, decay_norm_and_bias=True)) == 1


def test_build_optimizer_steps_nesterov_sgd_with_decay_on_weights_only():
    """Two steps of the (fused) optimizer against SGD with Nesterov momentum written out by hand
    (torch's documented update: g = grad + wd p; b = g, then mu b + g; p -= lr (g + mu b))."""
    optim = OmegaConf.create({"name": "sgd", "lr": 0.1, "base_batch_size": 256, "scale_lr": False,
                              "momentum": 0.9, "nesterov": True, "weight_decay": 0.01,
                              "decay_norm_and_bias": False})
    model = torch.nn.Linear(3, 2).double()
    opt = build_optimizer(model, optim, 256)
    assert opt.defaults["fused"]  # CPU float parameters: the fused update
    grads = [torch.linspace(-1, 1, 6, dtype=torch.float64).view(2, 3), torch.tensor([0.5, -2.0], dtype=torch.float64)]
    expected, buffers = [p.detach().clone() for p in model.parameters()], [None, None]
    for step in range(2):
        for i, (p, g) in enumerate(zip(model.parameters(), grads)):
            p.grad = g * (step + 1)
            d = p.grad + (0.01 * expected[i] if i == 0 else 0.0)  # bias: no decay
            buffers[i] = d if buffers[i] is None else 0.9 * buffers[i] + d
            expected[i] = expected[i] - 0.1 * (d + 0.9 * buffers[i])
        opt.step()
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-12, atol=1e-12)


def test_loss_scaling_optimizer_skips_an_overflowing_first_step():
    """Under a GradScaler (amp=fp16) the first step's gradients overflow (the initial scale is
    65536): the step must be skipped and leave no momentum, so the next step is SGD's first step
    written out by hand. torch's fused SGD fails this (its unwritten momentum buffer is read at the
    next step: non-finite or garbage weights), so build_optimizer does not fuse under loss scaling."""
    optim = OmegaConf.create({"name": "sgd", "lr": 0.1, "base_batch_size": 256, "scale_lr": False,
                              "momentum": 0.9, "nesterov": True, "weight_decay": 0.0,
                              "decay_norm_and_bias": False})
    model = torch.nn.Linear(3, 2)
    opt = build_optimizer(model, optim, 256, loss_scaling=True)
    assert not opt.defaults["fused"]
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    start = [p.detach().clone() for p in model.parameters()]
    x = torch.tensor([[1.0, -2.0, 0.5]])
    for inputs in (torch.full_like(x, float("inf")), x):  # an overflowing step, then a finite one
        opt.zero_grad()
        scaler.scale(model(inputs).sum()).backward()
        scaler.step(opt)
        scaler.update()
        if inputs is not x:
            assert scaler.get_scale() == 2.0  # skipped: the scale halved
            assert all(torch.equal(p, s) for p, s in zip(model.parameters(), start))
            assert not opt.state  # no momentum buffer (fused SGD keeps an unwritten one here)
    grads = [torch.cat([x, x]), torch.ones(2)]  # d sum(W x + b) / dW, / db
    for p, s, g in zip(model.parameters(), start, grads):  # first step: b = g; p -= lr (g + mu b)
        torch.testing.assert_close(p.detach(), s - 0.1 * (g + 0.9 * g))


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "last.pt"
    save_checkpoint({"model": {"w": torch.ones(2)}, "config": "a: 1", "epoch": 1}, path)
    good = path.read_bytes()

    def crash(obj, f, *a, **k):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"model": {}, "config": "", "epoch": 2}, path)
    assert path.read_bytes() == good
    assert list(path.parent.iterdir()) == [path]  # no temporary file left behind
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1


def test_load_checkpoint_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_checkpoint(tmp_path / "x.pt")
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    with pytest.raises(ConfigError, match="cannot be read"):
        load_checkpoint(tmp_path / "bad.pt")
    torch.save({"weights": torch.ones(1)}, tmp_path / "other.pt")
    with pytest.raises(ConfigError, match="not an abnexp checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


def test_rng_state_roundtrip_is_weights_only_loadable(tmp_path):
    import random

    import numpy as np

    from abnexp.engine.checkpoint import rng_state, set_rng_state

    torch.manual_seed(3), random.seed(3), np.random.seed(3)
    save_checkpoint({"model": {}, "config": "", "rng": rng_state()}, tmp_path / "c.pt")
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.rand(5), random.random(), np.random.rand(4)
    set_rng_state(load_checkpoint(tmp_path / "c.pt")["rng"])
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(got[0], expected[0]) and got[1] == expected[1] and got[2] == expected[2]
