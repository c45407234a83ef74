"""Shared by the export tests: a tiny network built from a norm's factory, randomized inference
statistics and affine parameters, and hand-made abnexp checkpoints."""
from __future__ import annotations

import torch
from omegaconf import OmegaConf
from torch import nn

from abnexp.config import compose
from abnexp.models.blocks import is_inplace
from abnexp.norm import build_norm_act
from abnexp.tasks import build_task


class TinyNet(nn.Module):
    """conv(bias) -> norm-act; [conv -> norm] + [1x1 conv -> norm] (a residual sum) -> norm-act (after
    the sum: no conv to fold into) -> pool -> fc. (N, 3, H, W) -> (N, 5). 32 channels (GroupNorm's 32
    groups)."""

    def __init__(self, norm: str) -> None:
        super().__init__()
        norm_act = build_norm_act(norm)
        c = 32
        self.conv1 = norm_act.conv(3, c, 3, padding=1, bias=True)
        self.bn1 = norm_act(c, conv=self.conv1)
        self.conv2 = norm_act.conv(c, c, 3, stride=2, padding=1, bias=False)
        self.bn2 = norm_act(c, activation="identity", conv=self.conv2)
        self.down = norm_act.conv(c, c, 1, stride=2, bias=False)
        self.bn_down = norm_act(c, activation="identity", conv=self.down)
        self.bn3 = norm_act(c)
        self.fc = nn.Linear(c, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn1(self.conv1(x))
        x = self.bn2(self.conv2(x)) + self.bn_down(self.down(x))
        x = self.bn3(x.clone() if is_inplace(self.bn3) else x)
        return self.fc(x.mean(dim=(2, 3)))


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Running statistics (mean ~ N(0, 0.5²), var ~ U[0.5, 1.5]) and affine parameters (γ ~ ±U[0.5, 1.5],
    β ~ N(0, 0.3²)) of every norm (frozen BN's buffers too), so the inference form is non-trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if getattr(m, "running_var", None) is not None and not isinstance(m, nn.Linear):
                c = m.running_var.numel()
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
            if hasattr(m, "activation") and getattr(m, "weight", None) is not None:
                c = m.weight.numel()
                sign = torch.randint(0, 2, (c,), generator=g) * 2 - 1
                m.weight.copy_(sign * (torch.rand(c, generator=g) + 0.5))
                m.bias.copy_(torch.randn(c, generator=g) * 0.3)
    return model


def write_checkpoint(path, overrides: list[str], seed: int = 0) -> torch.nn.Module:
    """An abnexp checkpoint ({"model", "config", "epoch", "step"}) of ``task.build_model()`` for
    ``overrides`` with randomized norms, at ``path``; returns the model (eval mode)."""
    cfg = compose(overrides)
    torch.manual_seed(seed)
    model = randomize_norms(build_task(cfg).build_model(), seed)
    torch.save({"model": model.state_dict(), "config": OmegaConf.to_yaml(cfg), "epoch": 1, "step": 1}, path)
    return model.eval()
