"""``abnexp table memory``: ``results/memory.md`` and ``memory.png`` from the memory planner
(abnexp.report.memory_report.plan_for).

- InPlace-ABN Table 3 (Rota Bulò et al., CVPR 2018): std-BN vs InPlace-ABN crops per 12 GB GPU
  (fixed crop) and crop side (fixed batch), each row's ratio against the interval the paper's
  counts allow, and the per-crop amount common to both norms that would give the paper's counts;
- the peak against the batch of the five BN strategies (ResNeXt-101, the PNG);
- what InPlace-ABN cannot halve (ResNeXt-101 vs WideResNet-38, Cityscapes 512²): the bytes kept
  per crop that no norm layer saves, by who allocated and who saved them (abnexp.memory.saved);
- CBN paper Table 8's step (R50 Mask R-CNN FPN, COCO, 4 images per GPU): CBN / MABN / GN over BN.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from abnexp.config import compose
from abnexp.memory import GIB, MIB, Simulator
from abnexp.memory.saved import kept_by_savers
from abnexp.norm.base import NormActBase
from abnexp.norm.cbn import CBN2d
from abnexp.report.memory_report import device_capacity, plan_for, planned_config, step_spec
from abnexp.report.paper_tables import TABLE3_MEMORY  # InPlace-ABN Table 3, per GPU
from abnexp.tasks import build_task

DATASET_OPTIONS = {"Cityscapes": "cityscapes", "COCO-Stuff": "coco_stuff"}
"""Table 3's datasets as printed -> abnexp's data option (their class counts set the logits)."""

FIGURE_NORMS = ("bn", "checkpoint", "checkpoint_proposed", "inplace_abn", "inplace_abn_ii")
FIGURE_BATCHES = (2, 4, 6, 8)
OVERHEAD_NORMS = {"bn": [], "cbn": ["norm.burnin_iters=0"], "mabn": ["norm.warmup_iters=0"], "gn": []}
"""norm -> overrides putting it past its burn-in / warm-up from the first step (MABN's r warm-up,
not a config key, only scales per channel)."""
TABLE8 = ["task=detection", "head=mask_rcnn_fpn", "model=resnet50", "data=coco", "data.batch_size=4",
          "head.norm_placement=everywhere"]
"""CBN paper Table 8's step: R50 Mask R-CNN FPN on COCO (800 x 1333), 4 images per GPU, the norm in
backbone, FPN and heads (the CBN paper's Table 5 setting)."""
CBN_TABLE8_GB = {"bn": 14.1, "cbn": 15.1, "gn": 14.1}  # CBN paper Table 8: R50 Mask R-CNN on COCO, 4 images per GPU
UNHALVED_DATASET = "Cityscapes"  # the Table 3 rows whose kept bytes are taken apart (both networks at 512²)


def _config(paper, norm: str, extra: list[str]):
    return compose(["task=semseg", f"data={DATASET_OPTIONS[paper.dataset]}", f"model={paper.model}",
                    "model.output_stride=8", f"data.crop_size={paper.crop}", f"data.batch_size={paper.std_crops}",
                    f"norm={norm}", *extra])


def _implied(plan: dict, crops: int) -> tuple[float, float]:
    """The bytes per crop for which exactly ``crops`` fit the plan's capacity, given the plan's
    fixed part (allocated peak less batch × per-crop growth): ((C − fixed)/(crops + 1), (C − fixed)/crops]."""
    free = plan["capacity_bytes"] - (plan["allocated_peak_bytes"] - plan["batch"] * plan["per_crop_bytes"])
    return free / (crops + 1), free / crops


def _common_extra(std: dict, ip: dict, paper) -> tuple[float, float]:
    """(low, high] bytes per crop that, added to both norms' growth, give the paper's two counts
    (low ≥ high: no single amount does)."""
    (s_lo, s_hi), (i_lo, i_hi) = _implied(std, paper.std_crops), _implied(ip, paper.inplace_crops)
    return (max(s_lo - std["per_crop_bytes"], i_lo - ip["per_crop_bytes"]),
            min(s_hi - std["per_crop_bytes"], i_hi - ip["per_crop_bytes"]))


def _table3_rows(extra: list[str]) -> tuple[list[str], list[bool], dict]:
    """Table 3's rows, each row's verdict, and {(network, dataset): (paper, std plan, InPlace-ABN plan)}."""
    rows, verdicts, plans = [], [], {}
    for paper in TABLE3_MEMORY:
        std, ip = (plan_for(_config(paper, norm, extra)) for norm in ("bn", "inplace_abn"))
        plans[paper.network, paper.dataset] = paper, std, ip
        ratio = std["per_crop_bytes"] / ip["per_crop_bytes"]
        lo, hi = paper.ratio_bounds()
        ok = lo < ratio < hi and abs(std["max_batch"] - paper.std_crops) <= 1 \
            and abs(ip["max_batch"] - paper.inplace_crops) <= 1
        verdicts.append(ok)
        implied = " / ".join("{:.2f}–{:.2f}".format(*(b / GIB for b in _implied(r, n)))
                             for r, n in ((std, paper.std_crops), (ip, paper.inplace_crops)))
        c_lo, c_hi = _common_extra(std, ip, paper)
        common = f"{max(c_lo, 0) / GIB:.2f}–{c_hi / GIB:.2f}" if c_lo < c_hi else "none"
        rows.append(f"| {paper.network} | {paper.dataset} | {paper.crop}² | {std['per_crop_bytes'] / GIB:.2f} / "
                    f"{ip['per_crop_bytes'] / GIB:.2f} | {implied} | {common} | {ratio:.3f} "
                    f"({'in' if lo < ratio < hi else 'NOT in'} ({lo:.2f}, {hi:.2f})) | {paper.std_crops} / "
                    f"{std['max_batch']} | {paper.inplace_crops} / {ip['max_batch']} | {paper.fixed_batch_crop} / "
                    f"{ip['max_crop']} (std-BN {std['max_crop']}) | {std['seconds']:.0f} + {ip['seconds']:.0f} s |")
    return rows, verdicts, plans


def kept_outside_norms(cfg, batch: int = 2) -> dict[str, int]:
    """Bytes per crop of what the configured forward + loss keeps for backward that no norm layer
    saves (InPlace-ABN §3: what an in-place norm cannot share), on fake tensors: {"allocated in
    <module class> → saved by <module classes>": bytes per crop}, largest first."""
    spec = step_spec(cfg)
    with torch.random.fork_rng(devices=[]), FakeTensorMode():
        model = spec.model().train()
        inputs = spec.inputs(batch, cfg.data.crop_size)
        kept = kept_by_savers(model, lambda: spec.loss(model, inputs))
    modules = dict(model.named_modules())
    kind = lambda name: type(modules[name]).__name__ if name in modules else "the loss"  # noqa: E731
    norms = {name for name, m in modules.items() if isinstance(m, NormActBase)}
    groups: dict[str, int] = {}
    for k in kept:
        if not k.savers & norms:
            label = f"{kind(k.module)} → {', '.join(sorted({kind(s) for s in k.savers}))}"
            groups[label] = groups.get(label, 0) + k.nbytes // batch
    return dict(sorted(groups.items(), key=lambda kv: -kv[1]))


def unhalved_rows(plans: dict, extra: list[str]) -> tuple[list[str], dict]:
    """For the :data:`UNHALVED_DATASET` rows: what each norm keeps per crop, what no norm layer
    saves (kept by both: InPlace-ABN halves only the rest) and the backward transients per crop
    (MiB); returns the rows and {network: (kept outside the norms, InPlace-ABN's kept) bytes}."""
    rows, shares = [], {}
    for (network, dataset), (paper, std, ip) in plans.items():
        if dataset != UNHALVED_DATASET:
            continue
        outside = kept_outside_norms(_config(paper, "inplace_abn", extra))
        kept_std, kept_ip = std["activations_per_crop"]["none"], ip["activations_per_crop"]["none"]
        shares[network] = sum(outside.values()), kept_ip
        rows.append(f"| {network} | {kept_std / MIB:.0f} / {kept_ip / MIB:.0f} | {sum(outside.values()) / MIB:.0f} "
                    f"({100 * sum(outside.values()) / kept_ip:.0f} % of InPlace-ABN's): "
                    + "; ".join(f"{label} {b / MIB:.0f}" for label, b in outside.items() if b >= MIB)
                    + f" | {kept_std / kept_ip:.3f} | {(std['per_crop_bytes'] - kept_std) / MIB:.0f} / "
                    f"{(ip['per_crop_bytes'] - kept_ip) / MIB:.0f} | {std['per_crop_bytes'] / ip['per_crop_bytes']:.3f} |")
    return rows, shares


def peak_figure(png: Path, extra: list[str] = ()) -> list[str]:
    """Plots the allocated peak (GiB, 512-byte blocks) against the batch for :data:`FIGURE_NORMS` (ResNeXt-101 +
    DeepLabV3, Cityscapes, 512², output stride 8) with the Titan Xp's capacity; returns its
    table rows (norm, GiB per batch)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    rows, capacity = [], 0
    for norm in FIGURE_NORMS:
        cfg = compose(["task=semseg", "data=cityscapes", "model=resnext101", "model.output_stride=8",
                       "data.crop_size=512", f"norm={norm}", *extra])
        capacity = device_capacity(cfg)[1]
        with torch.random.fork_rng(devices=[]):
            sim = Simulator(step_spec(cfg))
            peaks = [sim.step(b, 512).allocated_peak_bytes / GIB for b in FIGURE_BATCHES]
        ax.plot(FIGURE_BATCHES, peaks, marker="o", label=norm)
        rows.append(f"| {norm} | " + " | ".join(f"{p:.2f}" for p in peaks) + " |")
    ax.axhline(capacity / GIB, color="k", linestyle="--", linewidth=1, label="Titan Xp less reserve")
    ax.set_xlabel("crops of 512² per GPU")
    ax.set_ylabel("peak allocated memory [GiB]")
    ax.set_title("ResNeXt-101 + DeepLabV3, output stride 8: one training step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return rows


def past_weight_bytes(cfg) -> int:
    """Bytes of the k − 1 past weights of every convolution paired with a CBN layer: what the CBN
    paper counts in Table 8 (§5, "the network parameters θ_{t−1} … θ_{t−(k−1)} of previous
    iterations") and abnexp's CBN does not keep (it keeps ⟨∂ν/∂θ, θ_τ⟩ per slot instead; a
    ``past_sqmean_grad`` slot has one weight's size)."""
    with torch.random.fork_rng(devices=[]), FakeTensorMode():
        model = build_task(planned_config(cfg)).build_model()
    return sum(m.past_sqmean_grad.nbytes for m in model.modules() if isinstance(m, CBN2d) and m.past_len)


def overhead_rows(extra: list[str] = ()) -> tuple[list[str], str]:
    """CBN's, MABN's and GN's simulated peak over BN's in CBN Table 8's step (:data:`TABLE8`,
    the detection upper bound), beside the paper's 14.1 (BN, GN) vs 15.1 GB (CBN); and a note on
    CBN with the past weights the paper counts."""
    rows, base, note = [], None, ""
    for norm, overrides in OVERHEAD_NORMS.items():
        cfg = compose([*TABLE8, f"norm={norm}", *overrides, *extra])
        r = plan_for(cfg, search=False)
        base = base or r["peak_bytes"]
        paper = CBN_TABLE8_GB.get(norm)
        rows.append(f"| {norm} | {r['peak_bytes'] / GIB:.2f} | {100 * (r['peak_bytes'] / base - 1):+.1f} % | "
                    f"{r['parameters_bytes'] / MIB:.0f} | "
                    + (f"{paper} GB ({100 * (paper / CBN_TABLE8_GB['bn'] - 1):+.0f} %)" if paper else "—") + " |")
        if norm == "cbn":
            past = past_weight_bytes(cfg)
            note = (f"abnexp's CBN keeps, per layer paired with a convolution, the k − 1 = {cfg.norm.window - 1} past "
                    "iterations' statistics μ, ν, their gradients ∂μ/∂θ, ∂ν/∂θ and the inner products ⟨∂μ/∂θ, θ_τ⟩, "
                    "⟨∂ν/∂θ, θ_τ⟩ (the Taylor term needs no past weight; commit 6a69ab3), not the past weights "
                    f"θ_{{t−1}} … θ_{{t−(k−1)}} the paper's §5 counts in Table 8's (theoretical) memory: "
                    f"{past / MIB:.0f} MiB here. Kept on top of our CBN step they would make it "
                    f"{100 * ((r['peak_bytes'] + past) / base - 1):+.1f} % over BN (the paper: +7 %).")
    return rows, note


def memory_table(out: Path, extra: list[str] = ()) -> Path:
    """Writes ``out`` (markdown) and ``out``'s ``.png`` (see the module docstring). ``extra``
    overrides apply to every configuration (e.g. ``memory.reserved_gb=1``)."""
    png = out.with_suffix(".png")
    rows, verdicts, plans = _table3_rows(list(extra))
    unhalved, shares = unhalved_rows(plans, list(extra))
    paper, std, ip = plans["WideResNet-38", "Cityscapes"]
    c_lo, c_hi = _common_extra(std, ip, paper)
    rx_lo, rx_hi = _common_extra(*plans["ResNeXt-101", "Cityscapes"][1:], plans["ResNeXt-101", "Cityscapes"][0])
    overhead, cbn_note = overhead_rows(list(extra))
    lines = ["# InPlace-ABN Table 3 by the memory planner", "",
             "Regenerate: `abnexp table memory` (writes this file and `memory.png`; 15–30 minutes on 2 busy CPU "
             "cores).",
             "", "DeepLabV3 at output stride 8, one whole training step (forward, loss at full resolution, backward, "
             "SGD with momentum) simulated on fake tensors, replayed through the CUDA caching allocator model; "
             "a Titan Xp (12196 MiB) less `memory.reserved_gb` (0.5 GiB: CUDA context and library workspaces). "
             "Per GPU: the paper's totals are over 4 GPUs. *GiB per crop*: the allocated peak's growth per crop "
             "(batches 2 → 4); *ratio*: std-BN's over InPlace-ABN's, against the interval the paper's counts allow "
             "(std-BN fitting b crops and InPlace-ABN i put the true ratio in (i/(b+1), (i+1)/b)); fixed batch: the "
             "largest square crop side at std-BN's crop count.", "",
             "| network | dataset | crop | GiB per crop std-BN / InPlace-ABN | GiB per crop the paper's counts imply "
             "(std-BN / InPlace-ABN) | GiB per crop added to both that gives the paper's counts | ratio (paper "
             "interval) | std-BN crops/GPU paper / ours | InPlace-ABN crops/GPU paper / ours "
             "| fixed batch: InPlace-ABN crop side paper / ours | planning time |",
             "|---|---|---|---|---|---|---|---|---|---|---|", *rows, "",
             f"Rows inside their interval with counts within ±1 of the paper's: {sum(verdicts)} of {len(verdicts)}.", "",
             "*Implied*: with our fixed part (parameters, gradients, momentum and what does not grow with the "
             "batch) on the same capacity, the range of per-crop bytes for which exactly the paper's count fits. "
             "*Added to both*: the range of one amount per crop that, added to both norms' growth, gives both of "
             "the paper's counts.", "",
             "## What InPlace-ABN cannot halve: WideResNet-38 against ResNeXt-101", "",
             f"{UNHALVED_DATASET}, 512², MiB per crop. *Kept*: forward storages alive at the loss (batches 2 → 4). "
             "*Saved by no norm layer*: what the forward + loss keeps for backward that no norm layer saves "
             "(autograd's saved tensors on fake tensors, `abnexp.memory.saved.kept_by_savers`), as *allocated in "
             "→ saved by*: both norms keep it, so InPlace-ABN halves only the rest (std-BN keeps two buffers per "
             "norm layer, x and its output, InPlace-ABN one). *Backward transients*: the allocated peak's growth "
             "less the kept bytes' (gradients and temporaries live at the peak).", "",
             "| network | kept std-BN / InPlace-ABN | saved by no norm layer | kept ratio | backward transients "
             "std-BN / InPlace-ABN | peak growth ratio |", "|---|---|---|---|---|---|", *unhalved, "",
             "WideResNet-38's ratio is lower than ResNeXt-101's because more of what it keeps lies outside the norm "
             "layers, where InPlace-ABN shares nothing: "
             + ", ".join(f"{net} {n / MIB:.0f} MiB per crop ({100 * n / k:.0f} % of InPlace-ABN's)"
                         for net, (n, k) in shares.items())
             + ". WideResNet-38 runs its stem convolution at full resolution and mod2 at stride 2, and the max-pools "
             "after them keep their inputs and their int64 indices for backward; mod6 and mod7 keep their Dropout2d "
             "outputs for the last convolution, beside the norm's output the dropout reads. Its backward transients "
             "per crop are also larger (mod7's 4096 channels at stride 8). What is kept is autograd's own account "
             "(its saved tensors), and the simulated step matches torch.profiler's peak of real CPU steps "
             "(tests/memory); no cause in the planner showed, so the planner is unchanged.", "",
             f"The rest (the row's ratio {std['per_crop_bytes'] / ip['per_crop_bytes']:.3f} against "
             f"(i+1)/b = {paper.ratio_bounds()[1]:.3f}, counts {std['max_batch']} / {ip['max_batch']} against the "
             f"paper's {paper.std_crops} / {paper.inplace_crops}): our per-crop growth lies "
             + ("below" if all(r["per_crop_bytes"] < _implied(r, n)[0] for r, n in
                               ((std, paper.std_crops), (ip, paper.inplace_crops))) else "outside")
             + " what the paper's counts imply for both norms. "
             + (f"One amount per crop added to both norms, {max(c_lo, 0) / GIB:.2f}–{c_hi / GIB:.2f} GiB, gives "
                "this row the paper's counts (so a ratio inside its interval)" if c_lo < c_hi else
                "No single amount per crop added to both norms gives this row the paper's counts")
             + "; ResNeXt-101 on Cityscapes needs "
             + (f"{max(rx_lo, 0) / GIB:.2f}–{rx_hi / GIB:.2f} GiB" if rx_lo < rx_hi else "none")
             + " (other rows: the table's column). Such an amount is what a cost common to both norms that grows "
             "with the crop adds, and the paper's framework had two the planner has not: cuDNN's convolution "
             "workspaces (chosen by `cudnn.benchmark`, sized by the batch and crop; the planner counts them in the "
             "flat `memory.reserved_gb`) and PyTorch 0.3's allocator. 2018's cuDNN cannot be measured on this "
             "machine, so the planner does not add it: the numbers above are the evidence that the remainder lies "
             "outside the step PyTorch keeps today, not a correction.", "",
             f"## Peak memory against batch (`{png.name}`)", "",
             f"![peak vs batch]({png.name})", "",
             "ResNeXt-101 + DeepLabV3 on Cityscapes, 512², output stride 8; allocated peak [GiB]:", "",
             "| norm | " + " | ".join(f"batch {b}" for b in FIGURE_BATCHES) + " |",
             "|---|" + "---|" * len(FIGURE_BATCHES), *peak_figure(png, list(extra)), "",
             "checkpoint and checkpoint_proposed drop z inside the norm layer, but the convolution that follows "
             "keeps its input (the layer's output) for its own backward, so at the network level they keep what "
             "BatchNorm keeps (as `results/memory_resnext101.md` measured with saved-tensor hooks); the in-place "
             "strategies share that buffer with the convolution.", "",
             "## CBN's and MABN's memory over BN: CBN Table 8", "",
             "CBN paper Table 8: R50 Mask R-CNN on COCO, 4 images per GPU, window 4, 14.1 GB (BN, GN) vs 15.1 GB "
             "(CBN), +7 %. The planner's detection step (`abnexp memory " + " ".join(TABLE8) + "`) is an upper "
             "bound: 2000 RPN proposals, 512 sampled RoIs and 128 mask RoIs per image (the configured caps), "
             "800 × 1333 images (`memory.image_size`), 8 objects per image (`memory.gt_instances`); CBN past "
             "burn-in (`norm.burnin_iters=0`), MABN past warm-up:", "",
             "| norm | peak reserved GiB | over BN | parameters + buffers MiB | paper (Table 8) |",
             "|---|---|---|---|---|", *overhead, "", cbn_note]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    return out
