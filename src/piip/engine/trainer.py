"""The training engine: ``train(cfg)`` for every task. It knows no task: a task object (the
:class:`~piip.engine.task.Task` registered under ``cfg.task``) supplies the datasets, the model, the loss of a batch, the evaluation and
the export; the engine owns the loop, the optimiser and schedule, distribution, checkpoints and logs.
As in detectron2, the loop (:class:`TrainLoop`) only trains: logging, evaluation, best-checkpoint
selection and checkpointing are hooks on it (:mod:`piip.engine.hooks`).

Determinism and resume: the data order comes from a seeded ``DistributedSampler`` (``seed + epoch``;
used for any world size), batched by the task's grouping if it has one, and every DataLoader draws
its worker seeds from its own generator (seeded per epoch), so the global RNGs -- saved per rank in
every checkpoint -- are only consumed by the model (drop path), mixup/cutmix and in-process
transforms. A checkpoint records the epoch and the micro-batches already consumed in it;
``--resume`` skips exactly those batches, so a killed and resumed run reproduces the uninterrupted
run step for step (exactly with ``num_workers=0``; with worker processes, random per-sample
augmentations are re-seeded differently after a resume).

Distribution (``run.strategy``: ddp, zero1 or fsdp) is decided in one place,
:mod:`piip.engine.strategy`: the loop asks its strategy to wrap the model, build the optimiser,
run a micro-batch, clip, say what a checkpoint holds and gather the model for export.
"""
from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from . import distributed as D
from .checkpoint import (check_training_state, latest_checkpoint, load_sharded_tensors, load_training_checkpoint,
                         rng_state, set_rng_state)
from ..ops import onednn_linears_enabled, use_onednn_linears
from ..precision import autocast, autocast_dtype
from .config import TrainConfig
from .hooks import BestMetric, Checkpointer, Evaluator, Hook, MetricsLogger
from .optim import build_scheduler, total_steps
from .sampling import SkipBatchSampler, training_batches
from .strategy import make_strategy
from .task import get_task_class

__all__ = ["train", "build_task", "TrainLoop"]


def build_task(cfg: TrainConfig) -> Any:
    """The task object of a run (``cfg.task``: a name registered in :mod:`piip.tasks`)."""
    return get_task_class(cfg.task)(cfg)


# -- helpers -------------------------------------------------------------------------------------


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _resume_state(resume: str | bool | None, checkpoint_dir: Path) -> dict[str, Any] | None:
    """The training checkpoint ``resume`` names (see :func:`train`), read and checked; ``None`` for
    a fresh start."""
    if not resume:
        return None
    path = latest_checkpoint(checkpoint_dir) if resume is True or resume == "auto" else Path(resume)
    return check_training_state(load_training_checkpoint(path), path) if path else None


# -- the loop ------------------------------------------------------------------------------------
class TrainLoop:
    """A run's training state and its loop, after detectron2's ``SimpleTrainer``: the data order,
    the model (``model``; ``train_model``: what the steps run, wrapped by the run's ``strategy``
    across processes and compiled when ``run.compile``), optimiser, schedule, GradScaler and EMA,
    and the optimiser steps. Its hooks (:mod:`piip.engine.hooks`) do everything else.

    What a checkpoint records: ``epoch`` (completed epochs), ``micro_in_epoch`` (micro-batches of
    the current epoch consumed), ``step`` (optimiser steps done), ``best`` (the best evaluation
    score), ``train_time_s``. After each step: ``loss`` (its mean over ranks), ``grad_norm`` (the
    gradients' total norm before clipping; ``None`` without ``optim.clip_grad``), ``step_images``
    (the images it took, all ranks together) and ``step_losses`` ({step: loss} of the steps run here).
    """

    def __init__(self, cfg: TrainConfig, task: Any, info: D.DistInfo, train_dataset: Dataset,
                 amp_dtype: torch.dtype | None, state: dict[str, Any] | None = None):
        """Build the data, model and optimiser of ``cfg``; continue from ``state`` (a checkpoint) when
        given, else seed every rank's RNGs apart (``seed + rank``: its own drop path and mixup)."""
        self.cfg, self.task, self.amp_dtype = cfg, task, amp_dtype
        self.rank, self.world, self.device = info.rank, info.world_size, info.device
        self.is_main = self.rank == 0
        self.epoch, self.micro_in_epoch, self.step, self.best, self.train_time_s = 0, 0, 0, None, 0.0
        self.loss: float | None = None
        self.grad_norm: float | None = None
        self.step_images = 0
        self.step_losses: dict[int, float] = {}
        self.halted = False
        self.hooks: list[Hook] = []
        self.strategy = make_strategy(cfg.run, self.world, self.device,
                                      find_unused_parameters=getattr(task, "find_unused_parameters", False))
        if state is not None:  # before anything is built: a checkpoint of another strategy or world size
            self.strategy.check_resume(state)
        self._build_data(train_dataset)
        self._build_model(train_dataset)
        if state is not None:
            self.load_state_dict(state)
        else:
            _seed_all(cfg.run.seed + self.rank)
        self.last_step = total_steps(cfg.optim, self.steps_per_epoch)
        self.num_epochs = math.ceil(self.last_step / self.steps_per_epoch)

    def _build_data(self, dataset: Dataset) -> None:
        """The seeded sampler (any world size), its micro-batches (grouped by the task's
        ``batch_groups`` if it has one; skippable for a mid-epoch resume) and their loader."""
        o, world = self.cfg.optim, self.world
        if o.batch_size % (world * o.accum_steps):
            raise ValueError(f"optim.batch_size={o.batch_size} must be divisible by world_size ({world}) x "
                             f"accum_steps ({o.accum_steps})")
        self.micro_batch = o.batch_size // (world * o.accum_steps)
        self.sampler = DistributedSampler(dataset, num_replicas=world, rank=self.rank, shuffle=True,
                                          seed=self.cfg.run.seed, drop_last=True)
        groups = self.task.batch_groups(dataset) if hasattr(self.task, "batch_groups") else None
        self.batch_sampler = SkipBatchSampler(training_batches(self.sampler, self.micro_batch, groups))
        self.loader_generator = torch.Generator()  # the workers' seeds; seeded per epoch
        self.loader = DataLoader(dataset, batch_sampler=self.batch_sampler, num_workers=self.cfg.run.num_workers,
                                 collate_fn=self.task.collate, pin_memory=self.device.type == "cuda",
                                 generator=self.loader_generator, persistent_workers=False)
        self.micro_per_epoch = len(self.batch_sampler.batch_sampler)
        self.steps_per_epoch = self.micro_per_epoch // o.accum_steps
        if self.steps_per_epoch < 1:
            raise ValueError(f"the training set ({len(dataset)} samples) is smaller than one global "
                             f"batch ({o.batch_size})")

    def _build_model(self, dataset: Dataset) -> None:
        """The model (same seed on every rank for the initialisation), EMA, the model the steps run
        (the strategy's wrapper, compiled when ``run.compile``), optimiser, schedule and GradScaler."""
        cfg = self.cfg
        _seed_all(cfg.run.seed)
        model = self.task.build_model(cfg, dataset).to(self.device)
        route = cfg.run.onednn_linears  # the run's choice over the process setting the builders followed
        if route is None and self.world > 1:  # one route on every rank: rank 0's measured choice
            route = D.broadcast_object(onednn_linears_enabled() if D.is_main() else None)
        if route is not None:
            use_onednn_linears(model, route)
        # SyncBatchNorm needs GPU tensors; on CPU each process keeps its own statistics
        if self.world > 1 and self.device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        if cfg.run.grad_checkpointing:
            model.set_grad_checkpointing(True)
        self.ema = None
        if cfg.run.ema_decay is not None:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(model, decay=cfg.run.ema_decay)
        self.model = model
        self.train_model = self.strategy.wrap(model)  # fsdp shards ``model`` in place
        if cfg.run.compile:
            self.train_model = torch.compile(self.train_model)
        self.optimizer = self.strategy.build_optimizer(model, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, self.steps_per_epoch)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.run.amp == "fp16")

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint holds (of the model and optimiser, what the strategy says: under zero1
        and fsdp this process's shards). Across processes every rank must call it: it gathers their
        RNG states."""
        rngs = [rng_state()]
        if self.world > 1:
            rngs = [None] * self.world
            torch.distributed.all_gather_object(rngs, rng_state())
        model_state, optimizer_state = self.strategy.state(self.model, self.optimizer)
        state = {
            "model": model_state, "optimizer": optimizer_state,
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None, "rng": rngs,
            "epoch": self.epoch, "micro_in_epoch": self.micro_in_epoch, "step": self.step, "best": self.best,
            "train_time_s": self.train_time_s,
            "world_size": self.world, "config": self.cfg.to_dict(),
        }
        if self.strategy.sharded:
            state["strategy"] = self.strategy.name
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint written under the same strategy by as many processes: the
        model, optimiser, schedule, scaler, EMA, the position in the data and this rank's RNG
        states. A sharded checkpoint's tensors (``state`` holds its ``state.pt``) are read here,
        every process its own. (The strategy checked ``state`` before anything was built.)"""
        if self.strategy.sharded:
            model_state, optimizer_state = self.strategy.state(self.model, self.optimizer, template=True)
            has_ema = self.ema is not None and state.get("ema") is not None
            state = load_sharded_tensors(state, {"model": model_state, "optimizer": optimizer_state,
                                                 "ema": self.ema.state_dict() if has_ema else None})
        self.strategy.load_state(self.model, self.optimizer, state["model"], state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        self.epoch, self.micro_in_epoch, self.step = state["epoch"], state["micro_in_epoch"], state["step"]
        self.best, self.train_time_s = state.get("best"), state.get("train_time_s", 0.0)
        set_rng_state(state["rng"][self.rank])

    def run(self, hooks: list[Hook]) -> None:
        """Train to the schedule's last step, or until ``run.halt_at_step`` (``halted``), calling
        ``hooks`` in their order at each point of the loop."""
        self.hooks = hooks
        for hook in hooks:
            hook.loop = self
        for hook in hooks:
            hook.before_train()
        self.model.train()
        try:
            while self.epoch < self.num_epochs:
                self._train_epoch()
                if self.halted:
                    break
                self.epoch, self.micro_in_epoch = self.epoch + 1, 0
                for hook in hooks:
                    hook.after_epoch()
        finally:
            for hook in hooks:
                hook.after_train()

    def _train_epoch(self) -> None:
        """The optimiser steps left in the current epoch (fewer when the run halts or its last step
        comes first). Its batch iterator, and the loader's workers, end with it."""
        self.sampler.set_epoch(self.epoch)
        self.batch_sampler.skip = self.micro_in_epoch
        self.loader_generator.manual_seed(self.cfg.run.seed * 100_003 + self.epoch)
        batches = iter(self.loader)
        halt_at = self.cfg.run.halt_at_step
        while self.micro_in_epoch + self.cfg.optim.accum_steps <= self.micro_per_epoch:
            self.run_step(batches)
            for hook in self.hooks:
                hook.after_step()
            if halt_at is not None and self.step >= halt_at:
                self.halted = True
                return
            if self.step >= self.last_step:  # an iteration-based schedule may end mid-epoch
                return

    def run_step(self, batches: Iterator) -> None:
        """One optimiser step over ``optim.accum_steps`` micro-batches from ``batches``; a loss that
        is not finite raises :class:`FloatingPointError` (on every rank: it is the mean over ranks)."""
        o = self.cfg.optim
        start = time.perf_counter()
        losses = self._forward_backward(batches)
        self.micro_in_epoch += o.accum_steps
        if o.clip_grad is not None:
            self.scaler.unscale_(self.optimizer)
            self.grad_norm = float(self.strategy.clip_grad_norm(self.model, o.clip_grad))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        if self.ema is not None:
            self.ema.update(self.model, step=self.step)
        self.train_time_s += time.perf_counter() - start
        self.loss = float(D.all_reduce_mean(torch.stack(losses).mean().double().cpu()))
        self.step_losses[self.step] = self.loss
        if not math.isfinite(self.loss):
            raise FloatingPointError(f"loss is {self.loss} at step {self.step}")

    def _forward_backward(self, batches: Iterator) -> list[torch.Tensor]:
        """The summed gradients of ``optim.accum_steps`` micro-batches (synchronised as the strategy
        says: under DDP only the last one all-reduces); their losses. Sets ``step_images``."""
        accum = self.cfg.optim.accum_steps
        losses, self.step_images = [], 0
        for index in range(accum):
            batch = next(batches)
            with self.strategy.micro_batch(self.train_model, last=index == accum - 1):
                with autocast(self.device.type, self.amp_dtype):
                    loss, images = self.task.loss(self.train_model, batch, self.device)
                self.scaler.scale(loss / accum).backward()
            losses.append(loss.detach().float())
            self.step_images += images * self.world
        return losses


def train(cfg: TrainConfig, *, train_dataset: Dataset | None = None, val_dataset: Dataset | None = None,
          resume: str | bool | None = None, task: Any = None) -> dict[str, Any]:
    """Train per ``cfg``; returns a summary dict.

    Args:
        cfg: the run's :class:`TrainConfig` (saved as ``<out_dir>/config.json``).
        train_dataset, val_dataset: datasets to use instead of the task's ``build_datasets(cfg)``
            (items as the task's ``collate`` expects).
        resume: ``True``/``"auto"`` (the ``latest`` checkpoint of ``cfg.run.out_dir``; a fresh start
            when there is none) or a checkpoint: a ``step-*.pt`` file, a sharded ``step-*`` folder
            (zero1, fsdp; resumed under the same strategy and world size only) or a run folder.
        task: a task object (default: the task registered as ``cfg.task``).

    Summary keys: ``step`` (optimiser steps done), ``epoch``, ``step_losses`` ({step: mean loss over
    ranks} of the steps run by this call), ``eval`` (last evaluation), ``best``, ``train_time_s``
    (seconds spent in optimiser steps, data loading included, evaluation and checkpoint writes
    excluded; summed over resumes), ``images_seen``, ``halted``,
    ``out_dir``, ``checkpoint`` (the last step checkpoint written: a file, or a folder under zero1 and
    fsdp), ``model_path`` (final safetensors export, of the whole model under every strategy).
    """
    info = D.init_distributed(cfg.run.device)
    out_dir = Path(cfg.run.out_dir)
    task = task or build_task(cfg)
    amp_dtype = autocast_dtype(cfg.run.amp, "run.amp")
    state = _resume_state(resume, out_dir / "checkpoints")
    if info.rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(out_dir / "config.json")
    if train_dataset is None:
        train_dataset, built_val = task.build_datasets(cfg)
        val_dataset = val_dataset if val_dataset is not None else built_val

    loop = TrainLoop(cfg, task, info, train_dataset, amp_dtype, state)
    logger = MetricsLogger(out_dir, log_every=cfg.run.log_every, resumed=state is not None,
                           tensorboard=cfg.run.tensorboard, progress=cfg.run.progress)
    evaluator = Evaluator(val_dataset, every=cfg.run.eval_every, save_to=out_dir / "eval", log=logger.write)
    best = BestMetric(evaluator)
    checkpointer = Checkpointer(out_dir / "checkpoints", every_steps=cfg.run.save_every_steps,
                                keep_last=cfg.run.keep_last, best=best)
    loop.run([logger, evaluator, best, checkpointer])

    model_path = None if loop.halted else _export(loop, out_dir)
    D.barrier()
    last_checkpoint = checkpointer.last_path
    summary = {"step": loop.step, "epoch": loop.epoch, "step_losses": loop.step_losses, "eval": evaluator.last,
               "best": loop.best, "train_time_s": loop.train_time_s, "images_seen": loop.step * cfg.optim.batch_size,
               "halted": loop.halted, "out_dir": str(out_dir),
               "checkpoint": str(last_checkpoint) if last_checkpoint else None,
               "model_path": model_path, "world_size": loop.world}
    if loop.is_main:
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def _export(loop: TrainLoop, out_dir: Path) -> str | None:
    """The final safetensors files, from the main process (the model's path; ``None`` elsewhere):
    the model (gathered whole by the strategy: every process takes part), and its EMA when the run
    keeps one."""
    model = loop.strategy.full_model(loop.model)
    if not loop.is_main:
        return None
    model_path = loop.task.export(model, str(out_dir / "model.safetensors"))
    if loop.ema is not None:
        loop.task.export(loop.ema.module, str(out_dir / "model_ema.safetensors"))
    return model_path
