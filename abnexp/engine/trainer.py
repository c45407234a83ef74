"""The training loop shared by every task (modelled on torchvision's reference scripts).

One call of :func:`train` runs a whole job in ``run_dir``: build data, model, optimizer and
schedule from the config; resume if a checkpoint is given or the run dir already has one;
train for ``trainer.epochs`` (or until ``trainer.max_steps`` optimizer steps); validate and
checkpoint every epoch and at the end (also every ``trainer.checkpoint_every`` steps /
``trainer.checkpoint_minutes`` minutes, and ``best.pt``: abnexp.engine.checkpoint). SIGTERM or
SIGUSR1 finishes the current optimizer step, writes ``last.pt`` and exits with
:data:`~abnexp.engine.checkpoint.EXIT_PREEMPTED`. Under torchrun (abnexp.engine.launch) every
rank runs it: DistributedDataParallel, a DistributedSampler shard of the training set per rank,
validation shards that count every sample once, and only rank 0 logging and checkpointing.
"""
from __future__ import annotations

import logging
import signal
import time
from contextlib import closing, nullcontext
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from abnexp.data.sampling import ResumableSampler, SeededDataset
from abnexp.engine.checkpoint import (EXIT_PREEMPTED, Checkpoints, PreemptionSignals, check_checkpoint_settings,
                                      find_resume, rng_state, set_rng_state)
from abnexp.distributed import all_reduce_sum, init_distributed, sync_group
from abnexp.engine.logging import RunLogger, peak_memory_bytes
from abnexp.engine.optim import EpochLR, build_optimizer
from abnexp.engine.runtime import make_eval_loader, run_context, unwrap
from abnexp.errors import AbnexpError, ConfigError
from abnexp.norm.sync import check_running_stats_synchronized, set_process_group
from abnexp.tasks import build_task

log = logging.getLogger("abnexp")

class TrainingDiverged(AbnexpError):
    """The loss became NaN or infinite."""


def train(cfg, run_dir: str | Path) -> dict:
    """Trains ``cfg`` in ``run_dir``; returns the last validation metrics.

    Raises:
        ConfigError / DatasetError: bad configuration or data, before training starts.
        TrainingDiverged: non-finite loss; the last checkpoint written stays intact.
        SystemExit(EXIT_PREEMPTED): SIGTERM or SIGUSR1 arrived; a checkpoint was written to resume from.
    """
    check_checkpoint_settings(cfg.trainer)
    run_dir = Path(run_dir)
    env = init_distributed()
    ctx = run_context(cfg, env)
    device = ctx.device
    recipe_world = cfg.experiment.world_size if cfg.get("experiment") else env.world_size
    if recipe_world != env.world_size:
        log.warning("the recipe assumes %d processes (global batch %d) but %d are running (global batch %d): "
                    "adjust data.batch_size (per process) or optim.lr (optim.scale_lr=true scales it linearly)",
                    recipe_world, recipe_world * cfg.data.batch_size, env.world_size,
                    env.world_size * cfg.data.batch_size)
    torch.manual_seed(cfg.seed)
    task = build_task(cfg)
    model = task.build_model().to(device)
    if env.distributed and cfg.launcher.sync_group_size:
        set_process_group(model, sync_group(cfg.launcher.sync_group_size, env))
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    train_set, val_set = task.datasets()
    train_set = SeededDataset(train_set, cfg.seed)
    sampler = ResumableSampler(train_set, cfg.seed, env.world_size, env.rank)
    batch_size = cfg.data.batch_size
    steps_per_epoch = len(sampler.sampler) // batch_size
    if steps_per_epoch == 0:
        raise ConfigError(f"data.batch_size={batch_size} is larger than the {len(sampler.sampler)} training "
                          f"samples per process; lower data.batch_size")
    # the task's collation (detection: lists of images and targets) and whole batches drawn from the
    # resumable sampler (detection: aspect-ratio grouping)
    collate_fn = task.collate_fn
    batch_sampler = task.train_batch_sampler(sampler, batch_size)
    # generator: starting an epoch's iterator draws the workers' base seed from it, not from the global
    # RNG that training consumes (detection's RPN / RoI sampling), so a mid-epoch resume stays exact
    # (SeededDataset seeds every sample itself, so the workers' seeds do not matter)
    loader = DataLoader(train_set, batch_sampler=batch_sampler, num_workers=cfg.data.num_workers,
                        pin_memory=device.type == "cuda", collate_fn=collate_fn, generator=torch.Generator())
    val_loader = make_eval_loader(val_set, cfg, env=env, collate_fn=collate_fn)
    optimizer = build_optimizer(model, cfg.optim, batch_size * env.world_size)
    scheduler = EpochLR(optimizer, cfg.sched, cfg.trainer.epochs)
    autocast_dtype = ctx.amp_dtype
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype == torch.float16)

    epoch, step, metrics, best = 0, 0, {}, None
    found = find_resume(cfg.resume, run_dir)
    resume_from = found[0] if found else None
    if found is not None:
        state = found[1]
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        epoch, step, metrics, best = state["epoch"], state["step"], state["metrics"], state.get("best")
        if step - epoch * steps_per_epoch and state["steps_per_epoch"] != steps_per_epoch:
            log.warning("resuming mid-epoch with a different number of steps per epoch (%d, was %d): "
                        "epoch %d restarts from its beginning", steps_per_epoch, state["steps_per_epoch"], epoch)
            step = epoch * steps_per_epoch
        log.info("resumed from %s (epoch %d, step %d)", resume_from, epoch, step)
    if env.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    total_steps = cfg.trainer.epochs * steps_per_epoch
    if cfg.trainer.max_steps:
        total_steps = min(total_steps, cfg.trainer.max_steps)
    logger = RunLogger(run_dir, env.is_main, total_steps, start_step=step)
    t = cfg.trainer
    ckpts = Checkpoints(run_dir / "checkpoints", t.checkpoint_every, t.checkpoint_minutes, t.keep_last,
                        env.is_main, best)

    def checkpoint(step_file: bool = False, is_best: bool = False) -> None:
        check_running_stats_synchronized(unwrap(model))  # on every rank: a collective
        state = {} if not env.is_main else {
            "model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "rng": rng_state(),
            "epoch": epoch, "step": step, "steps_per_epoch": steps_per_epoch, "metrics": metrics,
            "config": OmegaConf.to_yaml(cfg, resolve=True)}
        ckpts.write(state, step_file=step_file, best=is_best)

    def on_any_rank(*flags: bool) -> list[bool]:
        """``flags`` or-ed over the ranks (every rank must take the same branch around collectives)."""
        if not env.distributed:
            return list(flags)
        votes = all_reduce_sum(torch.tensor([int(f) for f in flags], device=device))
        return [bool(v) for v in votes.tolist()]

    def exit_preempted() -> None:
        log.warning("received %s: checkpoint written at epoch %d, step %d; exiting with code %d (start again "
                    "with the same run dir to resume)", signal.Signals(signals.received).name, epoch, step,
                    EXIT_PREEMPTED)
        raise SystemExit(EXIT_PREEMPTED)

    def finished() -> bool:
        return epoch >= cfg.trainer.epochs or bool(cfg.trainer.max_steps and step >= cfg.trainer.max_steps)

    amp = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
    with PreemptionSignals() as signals, closing(logger):
        while not finished():
            model.train()
            done_in_epoch = step - epoch * steps_per_epoch
            train_set.set_epoch(epoch)
            sampler.set_epoch(epoch, start=done_in_epoch * batch_size)
            window_loss, window_steps, window_images, t0 = 0.0, 0, 0, time.perf_counter()
            preempted = False
            for i, batch in enumerate(loader, start=done_in_epoch):
                if i >= steps_per_epoch:
                    break
                scheduler.set_progress(epoch + i / steps_per_epoch)
                with amp:
                    loss, n = task.loss(model, batch, ctx)
                if not torch.isfinite(loss):
                    raise TrainingDiverged(
                        f"loss is {loss.item()} at epoch {epoch}, step {step}: training stopped. The last good "
                        f"checkpoint ({ckpts.latest or resume_from or 'none written yet'}) is intact. "
                        f"Lower optim.lr, set trainer.grad_clip, or use amp=none.")
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if cfg.trainer.grad_clip > 0:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.trainer.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                step += 1
                window_loss += loss.item()
                window_steps += 1
                window_images += n * env.world_size
                if step % cfg.trainer.log_every == 0 or i + 1 == steps_per_epoch:
                    seconds = time.perf_counter() - t0
                    mean_loss = torch.tensor(window_loss / window_steps, dtype=torch.float64, device=device)
                    mean_loss = all_reduce_sum(mean_loss).item() / env.world_size  # the global batch's loss
                    logger.train(step, epoch, {
                        "loss": mean_loss, "lr": scheduler.get_last_lr()[0],
                        "images_per_s": window_images / max(seconds, 1e-9),
                        "peak_memory_bytes": peak_memory_bytes(device)}, advance=window_steps)
                    window_loss, window_steps, window_images, t0 = 0.0, 0, 0, time.perf_counter()
                preempted, time_due = on_any_rank(signals.received is not None, ckpts.time_due())
                if preempted or finished():
                    break
                if i + 1 < steps_per_epoch and (ckpts.step_due(step) or time_due):  # else last.pt follows
                    checkpoint(step_file=True)
            if preempted:  # no validation: resuming at the epoch's last step validates then
                checkpoint()
                exit_preempted()
            improved = False
            if step == (epoch + 1) * steps_per_epoch:
                epoch += 1
                if epoch % cfg.trainer.eval_every == 0 or epoch == cfg.trainer.epochs:
                    metrics = task.validate(unwrap(model), val_loader, ctx)
                    logger.val(step, epoch, metrics)
                    improved = ckpts.improved(metrics)
            checkpoint(is_best=improved)
            if not finished() and on_any_rank(signals.received is not None)[0]:  # during validation
                exit_preempted()
    log.info("run dir: %s", run_dir)
    return metrics
