"""abnexp.memory.saved.kept_by_savers on fake tensors: who allocated and who saved each kept
storage, against hand-counted bytes and the InPlace-ABN paper's buffer sharing (§3)."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from abnexp.memory.saved import kept_by_savers
from abnexp.norm import build_norm_act

N, C, S = 2, 4, 8  # batch, channels, side


def _kept(norm: str) -> dict[tuple[str, frozenset], int]:
    with FakeTensorMode():
        model = nn.Sequential(nn.Conv2d(3, C, 3, padding=1, bias=False), build_norm_act(norm)(C),
                              nn.Conv2d(C, C, 3, padding=1, bias=False), nn.MaxPool2d(2)).train()
        x = torch.randn(N, 3, S, S)
        kept = kept_by_savers(model, lambda: model(x).sum())
    return {(k.module, k.savers): k.nbytes for k in kept}


@pytest.mark.parametrize("norm, norm_input_savers", [
    ("bn", {"1"}),  # std-BN: its input is its own; its output (another buffer) is the next conv's
    ("inplace_abn", {"1", "2"}),  # InPlace-ABN: one buffer for the norm's z and the next conv's input
])
def test_who_saves_what(norm, norm_input_savers):
    kept = _kept(norm)
    plane = N * C * S * S * 4  # float32 bytes of one (N, C, S, S) map
    assert kept[("0", frozenset(norm_input_savers))] == plane  # the first conv's output
    assert kept[("2", frozenset({"3"}))] == plane  # the max-pool keeps its input ...
    assert kept[("3", frozenset({"3"}))] == N * C * (S // 2) ** 2 * 8  # ... and its int64 indices
    if norm == "bn":
        assert kept[("1", frozenset({"1", "2"}))] == plane
    # in place, the norm allocates no map of its own (only its (C,) statistics)
    assert all(k[0] != "1" or nbytes < plane for k, nbytes in kept.items()) == (norm == "inplace_abn")
