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
import math
import os
import signal
import time
from contextlib import closing, nullcontext
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from abnexp.data.sampling import EpochBatches, ResumableSampler, SeededDataset
from abnexp.engine.checkpoint import (EXIT_PREEMPTED, Checkpoints, PreemptionSignals, check_checkpoint_settings,
                                      find_resume, rng_state, set_rng_state)
from abnexp.distributed import all_reduce_sum, init_distributed, sync_group
from abnexp.engine.logging import RunLogger, peak_memory_bytes, run_hparams
from abnexp.engine.optim import EpochLR, build_optimizer, schedule_warnings
from abnexp.engine.runtime import make_eval_loader, run_context, unwrap
from abnexp.errors import AbnexpError, ConfigError
from abnexp.norm import backends
from abnexp.norm.mabn import set_loss_scale
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
    kernels = backends.describe(device.type)  # raises now, not mid-step, if ABNEXP_KERNELS cannot serve device
    if env.is_main:
        log.info("normalization kernels: %s (%s)", kernels, backends.BACKENDS[kernels].summary)
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
    # generator: starting the workers draws their base seed from it, not from the global RNG that
    # training consumes (detection's RPN / RoI sampling), so a mid-epoch resume stays exact
    # (SeededDataset seeds every sample itself, so the workers' seeds do not matter). Persistent
    # workers: started once, not at every epoch; the epoch reaches them with each index (EpochBatches).
    workers = cfg.data.num_workers
    loader = DataLoader(train_set, batch_sampler=EpochBatches(batch_sampler, sampler), num_workers=workers,
                        persistent_workers=workers > 0, pin_memory=device.type == "cuda", collate_fn=collate_fn,
                        generator=torch.Generator())
    val_loader = make_eval_loader(val_set, cfg, env=env, collate_fn=collate_fn)
    autocast_dtype = ctx.amp_dtype
    optimizer = build_optimizer(model, cfg.optim, batch_size * env.world_size,
                                loss_scaling=autocast_dtype == torch.float16)
    scheduler = EpochLR(optimizer, cfg.sched, cfg.trainer.epochs)
    for warning in schedule_warnings(cfg.sched, cfg.trainer.epochs) if env.is_main else ():
        log.warning(warning)
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype == torch.float16)

    epoch, step, metrics, best = 0, 0, {}, None
    found = find_resume(cfg.resume, run_dir)
    resume_from = found[0] if found else None
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
    if restarts and found is None:
        log.warning("torchrun restarted the workers (restart %d) but %s holds no checkpoint: training starts "
                    "from scratch. Give hydra.run.dir explicitly (the default has a timestamp) and "
                    "trainer.checkpoint_every or trainer.checkpoint_minutes, so a restart resumes", restarts, run_dir)
    if found is not None:
        state = found[1]
        model.load_state_dict(state["model"])
        fused = [g["fused"] for g in optimizer.param_groups]
        optimizer.load_state_dict(state["optimizer"])
        for g, f in zip(optimizer.param_groups, fused):  # this run's choice (build_optimizer), not the saved one
            g["fused"] = f
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        epoch, step, metrics, best = state["epoch"], state["step"], state["metrics"], state.get("best")
        if step - epoch * steps_per_epoch and state["steps_per_epoch"] != steps_per_epoch:
            log.warning("resuming mid-epoch with a different number of steps per epoch (%d, was %d): "
                        "epoch %d restarts from its beginning", steps_per_epoch, state["steps_per_epoch"], epoch)
            step = epoch * steps_per_epoch
        log.info("resumed from %s (epoch %d, step %d)", resume_from, epoch, step)
    if scaler.is_enabled():  # MABN stores Psi of unscaled gradients: it divides by this tensor on the device
        scaler.scale(torch.zeros((), device=device))  # creates the scale tensor (GradScaler makes it lazily)
        set_loss_scale(model, scaler._scale)  # updated in place by scaler.update(): one hand-off suffices
    if env.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.trainer.compile:  # after DDP, as PyTorch's DDP + torch.compile notes advise
        model = torch.compile(model, mode=cfg.trainer.compile_mode)

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

    # the losses since the last check, summed on the device: a non-finite loss poisons the sum, which
    # is read (one host synchronization) at each log line and before each checkpoint, not every step
    window = {"loss": torch.zeros((), dtype=torch.float64, device=device), "steps": 0, "images": 0,
              "since": step, "start": time.perf_counter()}

    def window_mean_loss() -> float:
        """The global batch's mean loss over the window (a collective); raises TrainingDiverged if any
        rank's loss was not finite in it, before anything is saved."""
        mean = all_reduce_sum(window["loss"] / max(window["steps"], 1)).item() / env.world_size
        if not math.isfinite(mean):
            raise TrainingDiverged(
                f"the loss became {mean} between steps {window['since'] + 1} and {step} (epoch {epoch}): training "
                f"stopped. The last good checkpoint ({ckpts.latest or resume_from or 'none written yet'}) is "
                f"intact. Lower optim.lr, set trainer.grad_clip, or use amp=none.")
        return mean

    def reset_window() -> None:
        window.update(loss=torch.zeros_like(window["loss"]), steps=0, images=0, since=step,
                      start=time.perf_counter())

    def checkpoint(step_file: bool = False, is_best: bool = False) -> None:
        window_mean_loss()  # never save a model a non-finite loss has updated
        check_running_stats_synchronized(unwrap(model))  # on every rank: a collective
        state = {} if not env.is_main else {
            "model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "rng": rng_state(),
            "epoch": epoch, "step": step, "steps_per_epoch": steps_per_epoch, "metrics": metrics,
            "config": OmegaConf.to_yaml(cfg, resolve=True)}
        ckpts.write(state, step_file=step_file, best=is_best)

    def on_any_rank(*flags: bool) -> list[bool]:
        """``flags`` or-ed over the ranks (every rank must take the same branch around collectives);
        a CPU tensor (gloo), so the vote does not wait for the GPU."""
        if not env.distributed:
            return list(flags)
        votes = all_reduce_sum(torch.tensor([int(f) for f in flags]))
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
            sampler.set_epoch(epoch, start=done_in_epoch * batch_size)
            reset_window()
            preempted = False
            for i, batch in enumerate(loader, start=done_in_epoch):
                if i >= steps_per_epoch:
                    break
                scheduler.set_progress(epoch + i / steps_per_epoch)
                with amp:
                    loss, n = task.loss(model, batch, ctx)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if cfg.trainer.grad_clip > 0:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.trainer.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                step += 1
                window["loss"] += loss.detach()
                window["steps"] += 1
                window["images"] += n * env.world_size
                if step % cfg.trainer.log_every == 0 or i + 1 == steps_per_epoch:
                    mean_loss = window_mean_loss()
                    seconds = time.perf_counter() - window["start"]
                    logger.train(step, epoch, {
                        "loss": mean_loss, "lr": scheduler.get_last_lr()[0],
                        "images_per_s": window["images"] / max(seconds, 1e-9),
                        "peak_memory_bytes": peak_memory_bytes(device)}, advance=window["steps"])
                    reset_window()
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
                    window_mean_loss()  # a diverged model is not validated
                    metrics = task.validate(unwrap(model), val_loader, ctx)
                    logger.val(step, epoch, metrics)
                    improved = ckpts.improved(metrics)
            checkpoint(is_best=improved)
            if not finished() and on_any_rank(signals.received is not None)[0]:  # during validation
                exit_preempted()
        logger.hparams({**run_hparams(cfg, env.world_size), "kernels": kernels}, metrics)  # TensorBoard HParams, at the end only
    log.info("run dir: %s", run_dir)
    return metrics
