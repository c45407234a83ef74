"""The small-batch norms in the factory, the models and the CLI: options, conv pairing, CenConv2d,
two training steps per norm (and resume of CBN's window). Layer math: test_norm_small_batch.py."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from abnexp.norm import ABN, CenConv2d, NormAct, build_norm_act


def test_factory_options_and_errors():
    assert build_norm_act("mabn").conv is CenConv2d and build_norm_act("cbn").takes_conv
    assert build_norm_act("bn", group_size=2)(4).group_size == 2 and type(build_norm_act("bn")(4)) is ABN
    with pytest.raises(ValueError, match="group_size"):
        build_norm_act("inplace_abn", group_size=2)
    with pytest.raises(ValueError, match="norm.window=8 applies to norm=cbn"):
        build_norm_act("bn", window=8)
    build_norm_act("gn", group_size=2)  # per-sample statistics: accepted, nothing to group


# ----------------------------------------------------------------------------------------------
# models: conv pairing, CenConv, training through the CLI
# ----------------------------------------------------------------------------------------------
def recorded_pairs(model_name):
    """The model built with a recording factory: [(norm module, num_features, conv or None)]."""
    from abnexp.models import build_model

    pairs = []

    def layer(num_features, conv=None, **kw):
        pairs.append((nn.Identity(), num_features, conv))
        return pairs[-1][0]

    with torch.device("meta"):
        net = build_model(model_name, NormAct(layer=layer, takes_conv=True, name="record"), 10)
    return net, pairs


def test_resnet50_pairs_every_norm_with_its_conv():
    net, pairs = recorded_pairs("resnet50")
    assert len(pairs) == 53
    assert all(isinstance(conv, nn.Conv2d) and conv.out_channels == c for _, c, conv in pairs)
    named = {id(m): name for name, m in net.named_modules()}
    assert named[id(pairs[0][0])] == "bn1" and pairs[0][2] is net.conv1
    assert all(named[id(m)] for m, _, _ in pairs)  # every recorded norm is part of the model


def test_resnext50_unpaired_norms_are_exactly_block_bn1_and_bn_out():
    from abnexp.models.blocks import IdentityResidualBlock

    net, pairs = recorded_pairs("resnext50")
    blocks = [m for m in net.modules() if isinstance(m, IdentityResidualBlock)]
    assert len(blocks) == 16
    unpaired = {id(m) for m, _, conv in pairs if conv is None}
    assert unpaired == {id(b.bn1) for b in blocks} | {id(net.bn_out)}
    assert all(conv.out_channels == c for _, c, conv in pairs if conv is not None)


def test_mabn_builds_every_conv_as_cenconv():
    from abnexp.models import build_model

    with torch.device("meta"):
        net = build_model("resnext50", build_norm_act("mabn"), 10)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(isinstance(m, CenConv2d) for m in convs)


@pytest.mark.parametrize("norm", ["mabn", "cbn", "brn", "gn", "frozen_bn"])
def test_cli_trains_two_steps(norm, tmp_path, capsys):
    from conftest import run_cli

    args = ["train", f"norm={norm}", "trainer.max_steps=2", "data.num_workers=0", "data.batch_size=8",
            "data.crop_size=32", f"hydra.run.dir={tmp_path}"]
    if norm == "cbn":
        args.append("norm.burnin_iters=0")
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    if norm == "cbn":  # resume restores the window: a third step fills the third slot
        assert state["model"]["layer1.0.bn1.past_valid"].tolist() == [True, True, False]
        assert run_cli(args[:2] + ["trainer.max_steps=3"] + args[3:], capsys)[0] == 0
        state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
        assert state["model"]["layer1.0.bn1.past_valid"].tolist() == [True, True, True]
        assert int(state["model"]["layer1.0.bn1.num_batches_tracked"]) == 3
    if norm == "frozen_bn":  # only convs and the classifier are optimized
        assert sum(len(g["params"]) for g in state["optimizer"]["param_groups"]) == 22
