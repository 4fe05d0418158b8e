"""The training engine: ``train(cfg)`` for every task. It knows no task: a task object (see
:mod:`piip.tasks.base`) supplies the datasets, the model, the loss of a batch, the evaluation and
the export; the engine owns the loop, the optimiser and schedule, distribution, checkpoints and logs.

Determinism and resume: the data order comes from a seeded ``DistributedSampler`` (``seed + epoch``;
used for any world size), batched by the task's grouping if it has one, and every DataLoader draws
its worker seeds from its own generator (seeded per epoch), so the global RNGs -- saved per rank in
every checkpoint -- are only consumed by the model (drop path), mixup/cutmix and in-process
transforms. A checkpoint records the epoch and the micro-batches already consumed in it;
``--resume`` skips exactly those batches, so a killed and resumed run reproduces the uninterrupted
run step for step (exactly with ``num_workers=0``; with worker processes, random per-sample
augmentations are re-seeded differently after a resume).
"""
from __future__ import annotations

import contextlib
import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from . import distributed as D
from .checkpoint import (atomic_torch_save, check_training_state, latest_checkpoint, load_training_checkpoint,
                         rng_state, save_training_checkpoint, set_rng_state)
from ..precision import autocast, autocast_dtype
from .config import TrainConfig
from .optim import build_optimizer, build_scheduler, total_steps
from .sampling import ShardSampler, SkipBatchSampler, training_batches

__all__ = ["train", "build_task"]


def build_task(cfg: TrainConfig) -> Any:
    """The task object of a run (``cfg.task``: a name registered in :mod:`piip.tasks`)."""
    from ..tasks.base import get_task_class

    return get_task_class(cfg.task)(cfg)


# -- helpers -------------------------------------------------------------------------------------


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _bare(model: nn.Module) -> nn.Module:
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


class _Progress:
    """rich progress bar (rank 0, terminals only) with loss, lr, images/s and ETA."""

    def __init__(self, enabled: bool, total: int, completed: int):
        self.bar = None
        if not enabled:
            return
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        self.bar = Progress(TextColumn("[bold]train[/]"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), TextColumn("ETA"),
                            TimeRemainingColumn(), transient=False)
        self.task = self.bar.add_task("train", total=total, completed=completed, stats="")
        self.bar.start()

    def update(self, step: int, stats: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step, stats=stats)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


# -- the loop ------------------------------------------------------------------------------------
def train(cfg: TrainConfig, *, train_dataset: Dataset | None = None, val_dataset: Dataset | None = None,
          resume: str | bool | None = None, task: Any = None) -> dict[str, Any]:
    """Train per ``cfg``; returns a summary dict.

    Args:
        cfg: the run's :class:`TrainConfig` (saved as ``<out_dir>/config.json``).
        train_dataset, val_dataset: datasets to use instead of the task's ``build_datasets(cfg)``
            (items as the task's ``collate`` expects).
        resume: ``True``/``"auto"`` (the ``latest`` checkpoint of ``cfg.run.out_dir``; a fresh start
            when there is none) or a checkpoint file / folder.
        task: a task object (default: the task registered as ``cfg.task``).

    Summary keys: ``step`` (optimiser steps done), ``epoch``, ``step_losses`` ({step: mean loss over
    ranks} of the steps run by this call), ``eval`` (last evaluation), ``best``, ``train_time_s``
    (seconds spent in optimiser steps, data loading included, evaluation and checkpoint writes
    excluded; summed over resumes), ``images_seen``, ``halted``,
    ``out_dir``, ``checkpoint`` (last written), ``model_path`` (final safetensors export).
    """
    info = D.init_distributed(cfg.run.device)
    rank, world, device = info.rank, info.world_size, info.device
    main = rank == 0
    out_dir = Path(cfg.run.out_dir)
    ckpt_dir = out_dir / "checkpoints"
    task = task or build_task(cfg)
    amp_dtype = autocast_dtype(cfg.run.amp, "run.amp")
    o = cfg.optim

    # resume source
    resume_path = None
    if resume:
        if resume is True or resume == "auto":
            resume_path = latest_checkpoint(ckpt_dir)
        else:
            resume_path = Path(resume)
    state = check_training_state(load_training_checkpoint(resume_path), resume_path) if resume_path else None

    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(out_dir / "config.json")

    # data
    if train_dataset is None:
        train_dataset, built_val = task.build_datasets(cfg)
        val_dataset = val_dataset if val_dataset is not None else built_val
    if o.batch_size % (world * o.accum_steps):
        raise ValueError(f"optim.batch_size={o.batch_size} must be divisible by world_size ({world}) x "
                         f"accum_steps ({o.accum_steps})")
    micro = o.batch_size // (world * o.accum_steps)
    sampler = DistributedSampler(train_dataset, num_replicas=world, rank=rank, shuffle=True,
                                 seed=cfg.run.seed, drop_last=True)
    groups = task.batch_groups(train_dataset) if hasattr(task, "batch_groups") else None
    batch_sampler = SkipBatchSampler(training_batches(sampler, micro, groups))
    loader_gen = torch.Generator()
    loader = DataLoader(train_dataset, batch_sampler=batch_sampler, num_workers=cfg.run.num_workers,
                        collate_fn=task.collate, pin_memory=device.type == "cuda", generator=loader_gen,
                        persistent_workers=False)
    micro_per_epoch = len(batch_sampler.batch_sampler)
    steps_per_epoch = micro_per_epoch // o.accum_steps
    if steps_per_epoch < 1:
        raise ValueError(f"the training set ({len(train_dataset)} samples) is smaller than one global "
                         f"batch ({o.batch_size})")

    # model, optimiser, schedule (same seed on every rank for the initialisation)
    _seed_all(cfg.run.seed)
    model = task.build_model(cfg, train_dataset).to(device)
    if world > 1 and device.type == "cuda":  # SyncBatchNorm needs GPU tensors; on CPU each process keeps its own
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if cfg.run.grad_checkpointing:
        model.set_grad_checkpointing(True)
    optimizer = build_optimizer(model, o)
    scheduler = build_scheduler(optimizer, o, steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.run.amp == "fp16")
    ema = None
    if cfg.run.ema_decay is not None:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=cfg.run.ema_decay)

    epoch, micro_done, step, best, train_time = 0, 0, 0, None, 0.0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        if ema is not None and state.get("ema") is not None:
            ema.load_state_dict(state["ema"])
        if state["world_size"] != world:
            raise ValueError(f"checkpoint was written by {state['world_size']} processes; resume with the "
                             f"same world size (got {world}) for an exact continuation")
        epoch, micro_done, step, best = state["epoch"], state["micro_in_epoch"], state["step"], state.get("best")
        train_time = state.get("train_time_s", 0.0)
        set_rng_state(state["rng"][rank])
    else:
        _seed_all(cfg.run.seed + rank)

    train_model: nn.Module = model
    if world > 1:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=getattr(task, "find_unused_parameters", False))
    if cfg.run.compile:
        train_model = torch.compile(train_model)

    # logs
    metrics_path = out_dir / "metrics.jsonl"
    if main:
        kept = []
        if state is not None and metrics_path.exists():  # drop records past the checkpoint
            for line in metrics_path.read_text().splitlines():
                rec = json.loads(line)
                if rec.get("step", 0) <= step:
                    kept.append(line)
        metrics_path.write_text("".join(k + "\n" for k in kept))
    writer = None
    if main and cfg.run.tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(out_dir / "tensorboard"))
        except ImportError:
            print("warning: tensorboard is not installed; run.tensorboard ignored", file=sys.stderr)

    def log(record: dict) -> None:
        if not main:
            return
        with open(metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if writer is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step", "epoch"):
                    writer.add_scalar(f"{record.get('kind', 'train')}/{k}", v, record["step"])

    def save(kind: str = "step") -> Path | None:
        rngs = [rng_state()]
        if world > 1:
            rngs = [None] * world
            torch.distributed.all_gather_object(rngs, rng_state())
        path = None
        if main:
            payload = {
                "model": _bare(model).state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                "ema": ema.state_dict() if ema is not None else None, "rng": rngs,
                "epoch": epoch, "micro_in_epoch": micro_done, "step": step, "best": best,
                "train_time_s": train_time,
                "world_size": world, "config": cfg.to_dict(),
            }
            if kind == "best":
                path = atomic_torch_save(payload, ckpt_dir / "best.pt")
            else:
                path = save_training_checkpoint(ckpt_dir, payload, step, keep=cfg.run.keep_last)
        D.barrier()
        return path

    last_step = total_steps(o, steps_per_epoch)
    num_epochs = math.ceil(last_step / steps_per_epoch)
    progress = _Progress(main and cfg.run.progress and sys.stderr.isatty(), last_step, step)
    step_losses: dict[int, float] = {}
    last_eval: dict | None = None
    last_ckpt = None
    halted = False
    lr_fn = scheduler.lr_lambdas[0]
    window_t, window_images = time.perf_counter(), 0
    model.train()
    try:
        while epoch < num_epochs and not halted:
            sampler.set_epoch(epoch)
            batch_sampler.skip = micro_done
            loader_gen.manual_seed(cfg.run.seed * 100_003 + epoch)
            batches = iter(loader)
            while micro_done + o.accum_steps <= micro_per_epoch:
                step_start = time.perf_counter()
                losses = []
                for a in range(o.accum_steps):
                    batch = next(batches)
                    sync = (world == 1 or a == o.accum_steps - 1
                            or not isinstance(train_model, nn.parallel.DistributedDataParallel))
                    with (contextlib.nullcontext() if sync else train_model.no_sync()):
                        with autocast(device.type, amp_dtype):
                            loss, n = task.loss(train_model, batch, device)
                        scaler.scale(loss / o.accum_steps).backward()
                    losses.append(loss.detach().float())
                    window_images += n * world
                micro_done += o.accum_steps
                if o.clip_grad is not None:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), o.clip_grad)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                step += 1
                if ema is not None:
                    ema.update(model, step=step)
                train_time += time.perf_counter() - step_start
                loss_value = float(D.all_reduce_mean(torch.stack(losses).mean().double().cpu()))
                step_losses[step] = loss_value
                if not math.isfinite(loss_value):
                    raise FloatingPointError(f"loss is {loss_value} at step {step}")
                if step % cfg.run.log_every == 0 or step == last_step:
                    now = time.perf_counter()
                    ips = window_images / max(now - window_t, 1e-9)
                    window_t, window_images = now, 0
                    lr = o.lr * lr_fn(scheduler.last_epoch)
                    log({"kind": "train", "step": step, "epoch": epoch, "loss": loss_value, "lr": lr,
                         "images_per_s": ips, "time": time.time()})
                    progress.update(step, f"loss {loss_value:.4f}  lr {lr:.2e}  {ips:.1f} img/s")
                if cfg.run.save_every_steps and step % cfg.run.save_every_steps == 0:
                    last_ckpt = save()
                if cfg.run.halt_at_step is not None and step >= cfg.run.halt_at_step:
                    halted = True
                    break
                if step >= last_step:  # an iteration-based schedule may end mid-epoch
                    break
            if halted:
                break
            epoch, micro_done = epoch + 1, 0
            del batches
            due = cfg.run.eval_every and epoch % cfg.run.eval_every == 0
            if val_dataset is not None and (due or epoch == num_epochs):
                last_eval = _evaluate(task, model, ema, val_dataset, micro, device, amp_dtype, cfg,
                                      out_dir / "eval" if main else None)
                log({"kind": "eval", "step": step, "epoch": epoch, "train_time_s": train_time, **last_eval})
                score = last_eval.get(task.metric)
                better = (lambda a, b: a > b) if task.higher_is_better else (lambda a, b: a < b)
                is_best = score is not None and (best is None or better(score, best))
                if is_best:
                    best = score
                last_ckpt = save()
                if is_best:
                    save("best")
            else:
                last_ckpt = save()
    finally:
        progress.close()
        if writer is not None:
            writer.close()

    model_path = None
    if not halted and main:
        model_path = task.export(_bare(model), str(out_dir / "model.safetensors"))
        if ema is not None:
            task.export(ema.module, str(out_dir / "model_ema.safetensors"))
    D.barrier()
    summary = {"step": step, "epoch": epoch, "step_losses": step_losses, "eval": last_eval, "best": best,
               "train_time_s": train_time, "images_seen": step * o.batch_size,
               "halted": halted, "out_dir": str(out_dir), "checkpoint": str(last_ckpt) if last_ckpt else None,
               "model_path": model_path, "world_size": world}
    if main:
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def _evaluate(task, model, ema, dataset, batch, device, amp_dtype, cfg, save_to: Path | None) -> dict:
    """The task's evaluation, every rank on its own shard; the task gathers through ``D.gather_objects``
    and writes its files (predictions) to ``save_to`` on the main process."""
    gen = torch.Generator().manual_seed(0)  # keep the global RNG untouched
    D.broadcast_buffers(model)
    loader = DataLoader(dataset, batch_size=batch, sampler=ShardSampler(len(dataset), D.rank(), D.world_size()),
                        num_workers=cfg.run.num_workers, collate_fn=task.collate, generator=gen)
    was_training = model.training
    result = task.evaluate(model, loader, device, amp_dtype, gather=D.gather_objects,
                           save_to=str(save_to) if save_to is not None else None)
    if ema is not None:
        ema_result = task.evaluate(ema.module, loader, device, amp_dtype, gather=D.gather_objects)
        result.update({f"ema_{k}": v for k, v in ema_result.items() if k != "num_samples"})
    model.train(was_training)
    return result
