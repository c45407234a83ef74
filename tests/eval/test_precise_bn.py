"""abnexp.eval.precise_bn against per-channel statistics computed by hand from the layer's inputs."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from abnexp.eval.precise_bn import precise_bn, running_stats_layers
from abnexp.norm.abn import ABN
from abnexp.norm.brn import BatchRenorm2d
from abnexp.norm.grouping import GroupedABN
from abnexp.norm.group_norm import GroupNormAct
from abnexp.norm.mabn import MABN2d

C = 3


def tiny(norm: nn.Module) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, C, 3, bias=True), norm)


def batches(n: int = 5, size: int = 4) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(size, 2, 6, 6, generator=g) * (1 + i) + i for i in range(n)]  # stats vary by batch


def conv_outputs(model, xs, group: int) -> list[torch.Tensor]:
    """The norm's inputs, split into normalization batches of ``group`` samples (0 = whole batch)."""
    with torch.no_grad():
        outs = [model[0](x) for x in xs]
    return [g for o in outs for g in (o.split(group) if group else [o])]


def trained_state(model: nn.Sequential, xs) -> None:
    """A few training-mode calls so that every buffer holds something other than its initial value."""
    model.train()
    with torch.no_grad():
        for x in xs[:3]:
            model(x * 0.5 + 2)


@pytest.mark.parametrize("norm, group", [
    (nn.BatchNorm2d(C), 0),
    (ABN(C, activation="identity"), 0),
    (GroupedABN(C, group_size=2, activation="identity"), 2),
    (BatchRenorm2d(C, activation="identity", renorm_start_iters=0, r_max_iters=1, d_max_iters=1), 0),
], ids=["torch_bn", "abn", "abn_groups_of_2", "brn"])
def test_running_stats_become_the_average_of_batch_mean_and_unbiased_variance(norm, group):
    model, xs = tiny(norm), batches()
    trained_state(model, xs)
    tracked = int(norm.num_batches_tracked)
    model.eval()
    used = precise_bn(model, xs, num_batches=4)  # the 5th batch is not used
    groups = conv_outputs(model, xs[:4], group)
    mean = torch.stack([g.mean(dim=(0, 2, 3)) for g in groups]).mean(0)
    var = torch.stack([g.var(dim=(0, 2, 3), unbiased=True) for g in groups]).mean(0)
    assert used == 4
    torch.testing.assert_close(norm.running_mean, mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(norm.running_var, var, rtol=1e-5, atol=1e-5)
    assert not model.training and norm.momentum is not None and int(norm.num_batches_tracked) == tracked


def test_mabn_running_var_becomes_the_average_second_moment_and_other_buffers_stay():
    norm = MABN2d(C, buffer_size=4, warmup_iters=10_000, group_size=2, activation="identity")
    model, xs = tiny(norm), batches()
    trained_state(model, xs)
    before = {k: v.clone() for k, v in norm.state_dict().items() if k not in ("running_mean", "running_var")}
    precise_bn(model, xs, num_batches=10)  # more than there are: all 5
    second_moment = torch.stack([g.square().mean(dim=(0, 2, 3)) for g in conv_outputs(model, xs, 2)]).mean(0)
    torch.testing.assert_close(norm.running_var, second_moment, rtol=1e-5, atol=1e-5)
    assert torch.count_nonzero(norm.running_mean) == 0  # MABN subtracts no mean
    for k, v in before.items():  # buffer_x2, buffer_gz, num_steps, num_batches_tracked
        torch.testing.assert_close(norm.state_dict()[k], v, rtol=0, atol=0, msg=k)
    assert model.training  # the mode it had


def test_layers_without_momentum_statistics_are_left_alone_and_bad_counts_refused():
    model = tiny(GroupNormAct(C, num_groups=1, activation="identity"))
    assert running_stats_layers(model) == []
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    assert precise_bn(model, batches(2), num_batches=2) == 2
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())
    with pytest.raises(ValueError, match="num_batches >= 1"):
        precise_bn(model, batches(2), num_batches=0)
    with pytest.raises(ValueError, match="no batch"):
        precise_bn(tiny(nn.BatchNorm2d(C)), [], num_batches=3)
