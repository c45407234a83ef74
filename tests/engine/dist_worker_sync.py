"""Run by tests/test_distributed.py under ``torchrun --nproc_per_node=2`` (CPU, gloo).

Synchronized layers: every rank holds its part of one global batch; the layers' outputs, input
gradients, parameter gradients (summed over ranks) and running statistics are compared with
(a) torch.nn.functional.batch_norm + activation (autograd) and (b) abnexp's local layer, each
applied in one process to the concatenation of all ranks' batches.
Sharded evaluation: top-1/top-5 over an odd-sized set split across ranks against the same
accuracies computed directly on all of it.
Rank 0 writes the largest differences (over ranks) and the other outcomes to the JSON file
``argv[1]``.
"""
from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from abnexp.distributed import dist_env
from abnexp.engine.runtime import make_eval_loader
from abnexp.eval.classification import evaluate
from abnexp.norm import NORM_LAYERS
from abnexp.norm.sync import StatisticsMismatch, check_running_stats_synchronized

C, SLOPE, EPS, MOMENTUM = 4, 0.1, 1e-5, 0.1
WEIGHT, BIAS = [1.5, -0.7, 0.3, 2.0], [0.1, -0.2, 0.3, 0.0]  # a negative weight: the |w| flip
RUNNING_MEAN, RUNNING_VAR = [0.5, -0.5, 1.0, 0.0], [2.0, 0.5, 1.0, 3.0]
LOCAL = {"syncbn": "bn", "inplace_abn_sync": "inplace_abn", "inplace_abn_sync_ii": "inplace_abn_ii"}


def make_layer(name: str, dtype: torch.dtype):
    """A layer with fixed non-trivial parameters and running statistics (same on every rank)."""
    layer = NORM_LAYERS[name](C, eps=EPS, momentum=MOMENTUM, activation="leaky_relu",
                              activation_param=SLOPE).to(dtype)
    with torch.no_grad():
        for tensor, values in ((layer.weight, WEIGHT), (layer.bias, BIAS), (layer.running_mean, RUNNING_MEAN),
                               (layer.running_var, RUNNING_VAR)):
            tensor.copy_(torch.tensor(values, dtype=dtype))
    return layer


def global_batch(sizes: list[int], dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    shape = (sum(sizes), C, 3, 2)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * torch.tensor([1.0, 3.0, 0.5, 2.0]).view(1, C, 1, 1)
         + torch.tensor([2.0, -1.0, 0.0, 5.0]).view(1, C, 1, 1))
    w = torch.randn(shape, generator=g, dtype=torch.float64)  # the fixed loss weights
    return x.to(dtype), w.to(dtype)


def torch_reference(name: str, x: torch.Tensor, w: torch.Tensor, dtype: torch.dtype) -> dict:
    """F.batch_norm + leaky_relu with autograd on the whole batch."""
    weight = torch.tensor(WEIGHT, dtype=dtype, requires_grad=True)
    bias = torch.tensor(BIAS, dtype=dtype, requires_grad=True)
    rm, rv = torch.tensor(RUNNING_MEAN, dtype=dtype), torch.tensor(RUNNING_VAR, dtype=dtype)
    gamma = weight if name == "syncbn" else weight.abs() + EPS  # in-place layers: |w| + eps
    x = x.clone().requires_grad_()
    out = F.leaky_relu(F.batch_norm(x, rm, rv, gamma, bias, True, MOMENTUM, EPS), SLOPE)
    (out * w).sum().backward()
    return {"out": out.detach(), "dx": x.grad, "dw": weight.grad, "db": bias.grad, "rm": rm, "rv": rv}


def layer_run(layer, x: torch.Tensor, w: torch.Tensor) -> dict:
    """Forward + backward of the loss sum(out * w); returns what the comparison needs."""
    layer.train()
    leaf = x.clone().requires_grad_()
    out = layer(leaf.clone())  # in-place layers overwrite their input: not the leaf
    (out * w).sum().backward()
    return {"out": out.detach().clone(), "dx": leaf.grad, "dw": layer.weight.grad.clone(),
            "db": layer.bias.grad.clone(), "rm": layer.running_mean.clone(), "rv": layer.running_var.clone()}


def compare(name: str, sizes: list[int], dtype: torch.dtype, rank: int, layer=None) -> dict:
    """Largest |difference| per quantity (max over ranks) against both references."""
    x, w = global_batch(sizes, dtype, seed=len(sizes) * 100 + sum(sizes))
    begin = sum(sizes[:rank])
    part = slice(begin, begin + sizes[rank])
    mine = layer_run(layer if layer is not None else make_layer(name, dtype), x[part], w[part])
    for key in ("dw", "db"):  # parameter gradients: summed over ranks (what DDP communicates)
        dist.all_reduce(mine[key])
    refs = {"torch": torch_reference(name, x, w, dtype),
            "local": layer_run(make_layer(LOCAL[name], dtype), x, w)}
    diffs = {}
    for ref_name, ref in refs.items():
        for key, value in mine.items():
            expected = ref[key][part] if key in ("out", "dx") else ref[key]
            d = torch.tensor((value - expected).abs().max().item() if value.numel() else 0.0,
                             dtype=torch.float64)
            dist.all_reduce(d, op=dist.ReduceOp.MAX)
            diffs[f"{ref_name}/{key}"] = d.item()
    return diffs


def ranks_raising(fn, error: type) -> float:
    """How many ranks raised ``error`` calling ``fn`` (every rank learns the count)."""
    try:
        fn()
        raised = 0.0
    except error:
        raised = 1.0
    flag = torch.tensor(raised)
    dist.all_reduce(flag)
    return flag.item()


def sharded_evaluation(results: dict) -> None:
    g = torch.Generator().manual_seed(3)
    images, targets = torch.randn(7, 3, 4, 4, generator=g), torch.randint(0, 6, (7,), generator=g)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 6))
    torch.nn.init.normal_(model[1].weight, generator=g)
    torch.nn.init.normal_(model[1].bias, generator=g)  # not each rank's own global RNG: one model on every rank
    dataset = TensorDataset(images, targets)
    cfg = OmegaConf.create({"data": {"batch_size": 2, "num_workers": 0}})
    results["eval"] = evaluate(model, make_eval_loader(dataset, cfg, env=dist_env()), torch.device("cpu"))
    with torch.no_grad():
        logits = model(images)
    results["eval_expected"] = {
        "top1": 100.0 * (logits.argmax(1) == targets).float().mean().item(),
        "top5": 100.0 * (logits.topk(5, dim=1).indices == targets[:, None]).any(1).float().mean().item(),
        "num_samples": 7}
    padded = DataLoader(dataset, batch_size=2, sampler=DistributedSampler(dataset, shuffle=False))  # 8 = 7 + 1 pad
    results["eval_padded_ranks_raising"] = ranks_raising(lambda: evaluate(model, padded, torch.device("cpu")),
                                                         RuntimeError)


def main() -> None:
    out_path = sys.argv[1]
    early = make_layer("inplace_abn_sync", torch.float64)  # built before the group exists (issue #219)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    results: dict = {"parity": {}}
    for name in LOCAL:
        for sizes in ([3, 5], [0, 4]):
            for dtype in (torch.float64, torch.float32):
                key = f"{name}/{sizes[0]}+{sizes[1]}/{str(dtype).split('.')[-1]}"
                results["parity"][key] = compare(name, sizes, dtype, rank)
    results["built_before_init"] = compare("inplace_abn_sync", [3, 5], torch.float64, rank, layer=early)
    both = dist.new_group([0, 1])  # a group given explicitly (not the default one)
    layer = make_layer("syncbn", torch.float64)
    layer.process_group = both
    results["explicit_group"] = compare("syncbn", [3, 5], torch.float64, rank, layer=layer)

    # A process group of one rank each (e.g. per node): no synchronization, so each rank
    # matches the reference applied to its own batch only.
    own_group = dist.new_subgroups(1)[0]
    layer = make_layer("inplace_abn_sync", torch.float64)
    layer.process_group = own_group
    x, w = global_batch([3, 5], torch.float64, seed=7)
    begin = [0, 3][rank]
    part = slice(begin, begin + [3, 5][rank])
    mine, ref = layer_run(layer, x[part], w[part]), torch_reference("inplace_abn_sync", x[part], w[part], torch.float64)
    d = torch.tensor(max((mine[k] - ref[k]).abs().max().item() for k in ("out", "dx", "dw", "rm", "rv")),
                     dtype=torch.float64)
    dist.all_reduce(d, op=dist.ReduceOp.MAX)
    results["own_group_vs_own_batch"] = d.item()

    # One value per channel over the whole group: torch's ValueError, on every rank.
    layer = make_layer("syncbn", torch.float64)
    results["single_value_ranks_raising"] = ranks_raising(
        lambda: layer(torch.randn([1, 0][rank], C, 1, 1, dtype=torch.float64)), ValueError)

    # Running statistics: equal after synchronized steps; a difference is caught on every rank.
    model = torch.nn.Sequential(make_layer("syncbn", torch.float64), make_layer("inplace_abn_sync_ii", torch.float64))
    model[1].process_group = both  # the check compares within each layer's group
    for step in range(2):
        g = torch.Generator().manual_seed(10 * step + rank)
        model(torch.randn(2 + 3 * rank, C, 3, 2, generator=g, dtype=torch.float64) * (1 + rank))
    check_running_stats_synchronized(model)  # raises if they differ
    with torch.no_grad():
        model[1].running_var[2] += 1e-6 * rank
    results["mismatch_ranks_raising"] = ranks_raising(lambda: check_running_stats_synchronized(model),
                                                      StatisticsMismatch)
    sharded_evaluation(results)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
