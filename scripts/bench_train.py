#!/usr/bin/env python
"""Training-step speed of abnexp's ResNet-50 under every norm, against torchvision's ResNet-50.

One step = ``zero_grad`` + forward + cross-entropy + backward + SGD step (momentum 0.9) on a
random batch (default 16 x 3 x 112 x 112, float32). All models are timed in one process,
interleaved (each round runs every model once, in its own seeded order), and the median per
model is reported with the median of its per-round ratios to torchvision's ``resnet50``
(BatchNorm2d + ReLU), so changes of the machine's load between rounds cancel. The synchronized norms run twice: in one process (their local path) and
with ``--world-size`` gloo processes under ``DistributedDataParallel`` (each process holding
``batch / world-size`` samples and ``threads / world-size`` threads), where they are compared
with their local counterparts (syncbn with bn, inplace_abn_sync with inplace_abn) wrapped in
DDP the same way. Goals (issue 15): bn and inplace_abn <= 1.00x torchvision, mabn <= 1.10x,
cbn <= 1.25x (the CBN paper's Table 8), the synchronized layers <= 1.10x their local
counterparts under DDP.

Writes ``results/bench_train_cpu.md`` (on a GPU: ``results/bench_train_<gpu>.md``) with the
command, the machine, the thread count, the load average and the torch version.

Example: ``OMP_NUM_THREADS=2 python scripts/bench_train.py --repeats 9 --warmup 3``
"""
from __future__ import annotations

import argparse
import ctypes
import os
import platform
import random
import re
import resource
import shlex
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from abnexp.models import build_model  # noqa: E402
from abnexp.norm import backends, build_norm_act  # noqa: E402
from abnexp.norm.sync import SYNC_LAYERS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NORMS = ("bn", "inplace_abn", "inplace_abn_ii", "checkpoint", "checkpoint_proposed", "gn", "mabn",
         "cbn", "brn", "syncbn", "inplace_abn_sync")
NORM_OPTIONS = {"cbn": {"burnin_iters": 0}}  # the full window from the start: Taylor terms active
GOALS = {"bn": 1.00, "inplace_abn": 1.00, "mabn": 1.10, "cbn": 1.25}
"""norm -> goal for the ratio to torchvision's ResNet-50 step (issue 15)."""
DDP_PAIRS = {"syncbn": "bn", "inplace_abn_sync": "inplace_abn"}
"""synchronized norm -> local counterpart it is compared with under DDP (goal <= DDP_GOAL)."""
DDP_GOAL = 1.10
TORCHVISION = "torchvision resnet50"
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (glibc's malloc.h)


def keep_freed_memory() -> bool:
    """Tells glibc's malloc to keep freed memory in the process: no heap trim below 1 GiB free,
    heap (not mmap) allocations up to 32 MiB, the maximum. With the defaults the heap is trimmed
    and regrown from step to step, and the page faults (0 to 60 000 per ResNet-50 step here) land
    on different models in different runs; PyTorch's CPU tuning guide's advice (jemalloc or
    tcmalloc) removes them the same way. Returns False where there is no glibc (nothing changed)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(M_TRIM_THRESHOLD, 2**30)) and bool(libc.mallopt(M_MMAP_THRESHOLD, 2**25))


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def make_models(norms, device) -> dict[str, torch.nn.Module]:
    """torchvision's resnet50 and abnexp's resnet50 per norm (train mode, on ``device``)."""
    torch.manual_seed(0)
    models = {TORCHVISION: torchvision.models.resnet50()}
    for name in norms:
        models[name] = build_model("resnet50", build_norm_act(name, **NORM_OPTIONS.get(name, {})), 1000)
    return {k: m.to(device).train() for k, m in models.items()}


def make_step(model, x, y, opt=None):
    """One training step of ``model`` (DDP-wrapped or not) on the fixed batch (x, y); ``opt``
    defaults to torch's SGD (momentum 0.9, torch's default implementation)."""
    opt = opt or torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return step


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(steps: dict, repeats: int, warmup: int, device
                     ) -> tuple[dict[str, list[float]], dict[str, list[int]]]:
    """Seconds and minor page faults per step of every entry of ``steps``, ``repeats``
    interleaved rounds after ``warmup`` rounds (CBN's window, k = 4, is full after 3 steps).
    Each round visits the entries in its own order (a permutation seeded by the round's number,
    the same on every rank), so no model always runs after the same one."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    times, faults = {k: [] for k in steps}, {k: [] for k in steps}
    for r in range(repeats):
        order = list(steps)
        random.Random(r).shuffle(order)
        for name in order:
            step = steps[name]
            if dist.is_initialized():
                dist.barrier()
            sync(device)
            f0, t0 = minor_faults(), time.perf_counter()
            step()
            sync(device)
            times[name].append(time.perf_counter() - t0)
            faults[name].append(minor_faults() - f0)
    return times, faults


def batch(n, args, device):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, args.crop, args.crop, generator=g).to(device)
    return x, torch.randint(0, 1000, (n,), generator=g).to(device)


def paired_ratio(times: dict[str, list[float]], name: str, reference: str) -> float:
    """Median over the rounds of ``name``'s time / ``reference``'s time in the same round: a paired
    comparison, so a change of the machine's speed between rounds cancels."""
    return statistics.median(t / ref for t, ref in zip(times[name], times[reference]))


def bench_local(args, device) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    """Median seconds per step, paired ratio to torchvision's and median minor page faults per
    step; one process, every norm and torchvision."""
    models = make_models(args.norms, device)
    x, y = batch(args.batch, args, device)
    steps = {k: make_step(m, x, y) for k, m in models.items()}
    times, faults = time_interleaved(steps, args.repeats, args.warmup, device)
    return ({k: statistics.median(v) for k, v in times.items()},
            {k: paired_ratio(times, k, TORCHVISION) for k in times},
            {k: statistics.median(v) for k, v in faults.items()})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_worker(rank: int, world: int, port: int, args, queue) -> None:
    """One gloo process: the DDP pairs interleaved; rank 0 puts the medians on ``queue``."""
    torch.set_num_threads(max(1, args.threads // world))
    if args.malloc == "keep":
        keep_freed_memory()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        device = torch.device("cpu")
        names = [n for pair in DDP_PAIRS.items() for n in pair]
        models = make_models(names, device)
        del models[TORCHVISION]
        x, y = batch(args.batch, args, device)
        share = args.batch // world
        x, y = x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share]
        steps = {k: make_step(torch.nn.parallel.DistributedDataParallel(m), x, y) for k, m in models.items()}
        times = time_interleaved(steps, args.repeats, args.warmup, device)[0]
        latency = collective_latency()
        if rank == 0:
            layers = sum(isinstance(m, SYNC_LAYERS) for m in models["syncbn"].modules())
            ratios = {k: paired_ratio(times, k, local) for k, local in DDP_PAIRS.items()}
            queue.put(({k: statistics.median(v) for k, v in times.items()}, ratios, latency, layers))
    finally:
        dist.destroy_process_group()


def collective_latency(channels: int = 2048, rounds: int = 200) -> dict[str, float]:
    """Seconds per call of the synchronized layers' two collectives on the default group: the
    forward's all_gather of the (3, C) statistics and the backward's all_reduce of the (2, C)
    sums, C = ResNet-50's widest layer; mean over ``rounds`` calls after a barrier."""
    world = dist.get_world_size()
    calls = {"all_gather": lambda: dist.all_gather(parts, stats), "all_reduce": lambda: dist.all_reduce(sums)}
    stats, sums = torch.zeros(3, channels), torch.zeros(2, channels)
    parts = [torch.empty_like(stats) for _ in range(world)]
    out = {}
    for name, call in calls.items():
        for _ in range(20):
            call()
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(rounds):
            call()
        out[name] = (time.perf_counter() - t0) / rounds
    return out


def bench_ddp(args) -> tuple[dict[str, float], dict[str, float], dict[str, float], int]:
    """Median seconds per step of the DDP pairs with ``args.world_size`` gloo processes (CPU), the
    synchronized norms' paired ratios to their counterparts, the collectives' latency
    (:func:`collective_latency`) and the synchronized layers per model."""
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(ddp_worker, args=(args.world_size, free_port(), args, queue), nprocs=args.world_size,
                       join=True, start_method="spawn")
    return queue.get()


TRAINER = ["data=demo", "model=resnet18", "norm=bn", "trainer.log_every=5"]
"""The demo job the trainer is timed on (data.batch_size, data.crop_size, data.num_workers: the demo's)."""


def trainer_images_per_s(overrides: list[str], steps: int) -> float:
    """Median images/s of ``abnexp train`` (abnexp.engine.trainer.train in this process) over its
    log windows, the first window (worker start, torch.compile) left out."""
    import json
    import tempfile

    from abnexp.config import compose
    from abnexp.engine.trainer import train

    cfg = compose([*TRAINER, *overrides, f"trainer.max_steps={steps}"])
    with tempfile.TemporaryDirectory() as run:
        train(cfg, run)
        rows = [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]
    return statistics.median([r["images_per_s"] for r in rows if r["split"] == "train"][1:])


def bare_images_per_s(overrides: list[str], repeats: int, warmup: int, device) -> float:
    """Images/s of the same model's bare step (random batch of the trainer's shape, the trainer's
    optimizer, no data loading, no logging), ``torch.compile``'d when the overrides say
    trainer.compile=true."""
    from abnexp.config import compose
    from abnexp.engine.optim import build_optimizer
    from abnexp.tasks import build_task

    cfg = compose([*TRAINER, *overrides])
    torch.manual_seed(0)
    model = build_task(cfg).build_model().to(device).train()
    optimizer = build_optimizer(model, cfg.optim, cfg.data.batch_size)
    if cfg.trainer.compile:
        model = torch.compile(model, mode=cfg.trainer.compile_mode)
    n, crop = cfg.data.batch_size, cfg.data.crop_size
    x = torch.randn(n, 3, crop, crop, device=device)
    y = torch.randint(0, cfg.data.num_classes, (n,), device=device)
    times = time_interleaved({"bare": make_step(model, x, y, optimizer)}, repeats, warmup, device)[0]["bare"]
    return n / statistics.median(times)


def loading_seconds_per_image(samples: int = 400) -> float:
    """CPU seconds to load one training image of the demo job (decode + augmentation, as a loader
    worker does it: one thread), median of 5 rounds of ``samples`` images."""
    from abnexp.config import compose
    from abnexp.data.sampling import SeededDataset
    from abnexp.tasks import build_task

    dataset = SeededDataset(build_task(compose(TRAINER)).datasets()[0], 0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rounds = []
        for r in range(6):
            t0 = time.perf_counter()
            for i in range(samples):
                dataset[(r, i % len(dataset.dataset))]
            rounds.append((time.perf_counter() - t0) / samples)
    finally:
        torch.set_num_threads(threads)
    return statistics.median(rounds[1:])


def trainer_section(args) -> list[str]:
    """The trainer against the bare step (issue 15's goal: >= 0.90x), trainer.compile off and on,
    and with the loading in the training process (data.num_workers=0); the ceiling that loading on
    the same cores leaves: 1 / (1 / bare + loading seconds per image / cores)."""
    from abnexp.config import compose

    device = torch.device(args.device)
    cfg = compose(TRAINER)
    load = loading_seconds_per_image()
    cores = os.cpu_count() if device.type == "cpu" else None
    lines = ["## The trainer against the bare model step", "",
             f"`abnexp train {' '.join(TRAINER)} trainer.max_steps={args.trainer_steps}` (batch "
             f"{cfg.data.batch_size}, {cfg.data.crop_size}² crops, {cfg.data.num_workers} loader workers, "
             "persistent): median images/s over the log windows after the first (worker start and "
             "compilation left out). Bare step: the same model, a random batch of the same shape, no "
             f"data loading, the trainer's optimizer; median of {args.repeats} steps after {args.warmup} warm-up steps. Goal: trainer "
             f">= 0.90x bare. Loading one training image (decode + augmentation, one thread) takes "
             f"{1e3 * load:.2f} ms"]
    if cores:
        lines[-1] += (f"; on a CPU the loader workers share the {cores} cores with the model, so the "
                      "trainer cannot exceed the *loading ceiling* 1 / (1 / bare + loading time / cores)")
    lines[-1] += "."
    lines += ["", "| trainer.compile | data.num_workers | trainer images/s | bare step images/s | trainer / bare "
              "| goal | loading ceiling / bare | trainer / ceiling |", "|---|---|---|---|---|---|---|---|"]
    for compiled, workers in ((False, cfg.data.num_workers), (False, 0), (True, cfg.data.num_workers)):
        overrides = [f"trainer.compile={str(compiled).lower()}", f"data.num_workers={workers}"]
        trained = trainer_images_per_s(overrides, args.trainer_steps)
        bare = bare_images_per_s(overrides, args.repeats, args.warmup, device)
        # with the loading in the training process it runs between steps on one core: ceiling 1 / (1 / bare + load)
        ceiling = 1 / (1 / bare + load / (cores if workers else 1)) if cores else bare
        print(f"trainer compile={compiled} workers={workers}: {trained:.0f} images/s, bare step {bare:.0f} "
              f"images/s, loading ceiling {ceiling:.0f}", flush=True)
        lines.append(f"| {str(compiled).lower()} | {workers} | {trained:.0f} | {bare:.0f} | {trained / bare:.3f} | "
                     f">= 0.90 ({'met' if trained / bare >= 0.90 else 'NOT met'}) | {ceiling / bare:.2f} | "
                     f"{trained / ceiling:.2f} |")
    return lines


def report(args, device, local, ratios, faults, ddp) -> Path:
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    if device.type == "cuda":
        machine = torch.cuda.get_device_name(device)
        out = ROOT / "results" / f"bench_train_{re.sub(r'[^a-z0-9]+', '_', machine.lower()).strip('_')}.md"
    else:
        machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
        out = ROOT / "results" / "bench_train_cpu.md"
    out = Path(args.out) if args.out else out
    ref = local[TORCHVISION]
    command = " ".join(["python", "scripts/bench_train.py"] + [shlex.quote(a) for a in sys.argv[1:]])
    lines = ["# Training-step speed: abnexp ResNet-50 per norm vs torchvision's ResNet-50", "",
             f"`OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '(unset)')} {command}`", "",
             f"Machine: {machine}; {args.threads} threads; torch {torch.__version__}; native kernels "
             f"{'on' if backends.REQUESTED != 'torch' else 'off (ABNEXP_NATIVE=0)'}; load average (1, 5, 15 min) at the "
             f"end {load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f}; malloc: "
             + ("freed memory kept in the process (glibc mallopt M_TRIM_THRESHOLD 1 GiB, M_MMAP_THRESHOLD "
                "32 MiB: no page faults from heap trims, see keep_freed_memory)." if args.malloc == "keep"
                else "the C library's defaults."), "",
             f"One step = zero_grad + forward + cross-entropy + backward + SGD (momentum 0.9), "
             f"{args.batch} x 3 x {args.crop} x {args.crop} float32, contiguous; {args.repeats} interleaved "
             f"rounds (each in its own shuffled order) after {args.warmup} warm-up rounds: the median time, "
             "and the median over the rounds of the time / torchvision's time in the same round. Each norm's defaults "
             "(leaky_relu 0.01; CBN window 4 with burnin_iters=0, so the compensated window is in "
             "use; MABN with CenConv2d). The synchronized norms in one process take their local path.",
             "", "| model | ms / step | x torchvision | goal | minor page faults / step |", "|---|---|---|---|---|",
             f"| {TORCHVISION} | {1e3 * ref:.0f} | 1.000 | | {faults[TORCHVISION]:.0f} |"]
    for name in args.norms:
        ratio, goal = ratios[name], GOALS.get(name)
        mark = "" if goal is None else f"<= {goal:.2f} ({'met' if ratio <= goal else 'NOT met'})"
        lines.append(f"| abnexp resnet50 norm={name}{' (1 process)' if name in DDP_PAIRS else ''} | "
                     f"{1e3 * local[name]:.0f} | {ratio:.3f} | {mark} | {faults[name]:.0f} |")
    if ddp:
        lines += ["", f"## {args.world_size} gloo processes under DistributedDataParallel", "",
                  f"{args.batch // args.world_size} samples and {max(1, args.threads // args.world_size)} "
                  f"thread(s) per process (global batch {args.batch}), the same step, interleaved; rank 0's "
                  "medians, the ratio paired by round.", "",
                  "| norm | ms / step | local counterpart | ms / step | ratio | goal |", "|---|---|---|---|---|---|"]
        ddp, ddp_ratios, latency, layers = ddp
        for sync_name, local_name in DDP_PAIRS.items():
            ratio = ddp_ratios[sync_name]
            lines.append(f"| {sync_name} | {1e3 * ddp[sync_name]:.0f} | {local_name} | "
                         f"{1e3 * ddp[local_name]:.0f} | {ratio:.3f} | <= {DDP_GOAL:.2f} "
                         f"({'met' if ratio <= DDP_GOAL else 'NOT met'}) |")
        wait = layers * sum(latency.values())
        lines += ["", f"Each of the {layers} synchronized layers makes two collectives per step: the forward's "
                  f"all_gather of the statistics ({1e3 * latency['all_gather']:.2f} ms per call here) and the "
                  f"backward's all_reduce of two sums ({1e3 * latency['all_reduce']:.2f} ms), both on the critical "
                  f"path (the next layer needs the result): {1e3 * wait:.0f} ms per step, "
                  f"{100 * wait / ddp['bn']:.0f} % of bn's DDP step, before any wait for the slower rank at each "
                  "layer (a 2-process gloo job on 2 cores: each collective is also a rendezvous of the ranks)."]
    lines += [""] + trainer_section(args)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--crop", type=int, default=112)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--norms", nargs="+", default=list(NORMS), choices=NORMS)
    parser.add_argument("--world-size", type=int, default=2, help="DDP processes (0: skip the DDP part)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None, help="report path (default results/bench_train_<device>.md)")
    parser.add_argument("--malloc", choices=("keep", "default"), default="keep",
                        help="keep: glibc's malloc keeps freed memory (keep_freed_memory); default: untouched")
    parser.add_argument("--trainer-steps", type=int, default=60, help="optimizer steps of each timed abnexp train")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.malloc == "keep" and not keep_freed_memory():
        args.malloc = "default"
    device = torch.device(args.device)
    local, ratios, faults = bench_local(args, device)
    for name, sec in local.items():
        print(f"{name:28s} {1e3 * sec:8.0f} ms  {ratios[name]:.3f}x", flush=True)
    ddp = bench_ddp(args) if args.world_size > 1 and device.type == "cpu" else ()
    for name, sec in (ddp[0] if ddp else {}).items():
        print(f"DDP x{args.world_size} {name:20s} {1e3 * sec:8.0f} ms", flush=True)
    print(f"wrote {report(args, device, local, ratios, faults, ddp)}")


if __name__ == "__main__":
    main()
