"""Top-k accuracy and ten-crop averaging on hand-made cases."""
from __future__ import annotations

import pytest
import torch

from abnexp.eval.classification import evaluate, protocols, topk_correct


def test_topk_hand_made():
    logits = torch.tensor([[0.1, 0.9, 0.0, 0.0, 0.0, 0.0],   # target 1: top-1 hit
                           [0.5, 0.4, 0.3, 0.2, 0.1, 0.0],   # target 4: 5th best → top-5 hit only
                           [0.5, 0.4, 0.3, 0.2, 0.1, 0.0]])  # target 5: 6th best → miss
    assert topk_correct(logits, torch.tensor([1, 4, 5]), (1, 5)) == [1, 2]


class Lookup(torch.nn.Module):
    """'Model' whose logits are the mean pixel of each image, spread as a one-hot vector."""

    def forward(self, x):
        return torch.nn.functional.one_hot(x.mean(dim=(1, 2, 3)).round().long(), 3).float()


def test_ten_crop_logits_are_averaged():
    # Image 0: 6 crops vote class 2, 4 vote class 0 → averaged logits pick 2 (target 2: hit).
    # Image 1: crops vote 1,1,1,0,... 3 for class 1 and 7 for class 0 → picks 0 (target 1: miss).
    votes = torch.tensor([[2] * 6 + [0] * 4, [1] * 3 + [0] * 7], dtype=torch.float32)
    images = votes.view(2, 10, 1, 1, 1).expand(2, 10, 3, 2, 2).contiguous()
    loader = [(images, torch.tensor([2, 1]))]
    result = evaluate(Lookup(), loader, torch.device("cpu"))
    assert result == {"top1": 50.0, "top5": 100.0, "num_samples": 2}


def test_protocol_names_follow_the_paper():
    assert [(p.name, p.crop) for p in protocols(224, 320)] == [("center", 224), ("ten_crop", 224),
                                                              ("large_center", 320)]
    assert [p.ten_crop for p in protocols(224, 320)] == [False, True, False]
