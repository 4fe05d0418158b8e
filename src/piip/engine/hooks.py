"""The training loop's hooks, after detectron2's ``hooks``: the loop
(:class:`~piip.engine.trainer.TrainLoop`) only trains; logging, evaluation, best-checkpoint
selection and checkpointing watch it from here.

The loop calls ``before_train`` once, ``after_step`` after every optimiser step, ``after_epoch``
after every completed epoch (not the one cut short by ``run.halt_at_step``) and ``after_train``
once at the end, also when training raised. Hooks run in the order the loop was given them, which
matters at the end of an epoch: the evaluation is logged and picks the best score before the
checkpoint that records that score is written.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader, Dataset

from . import distributed as D
from ..weights.checkpoint import checkpoint_header, model_kind
from .checkpoint import atomic_torch_save, save_sharded_checkpoint, save_training_checkpoint
from .sampling import ShardSampler
from .distributed import bare_model

__all__ = ["Hook", "MetricsLogger", "Evaluator", "BestMetric", "Checkpointer"]


class Hook:
    """Does nothing at every point of the loop; a hook overrides the points it acts at. ``loop``
    is the :class:`~piip.engine.trainer.TrainLoop` running it (set before ``before_train``)."""

    loop: Any  # the TrainLoop (not imported: the loop imports its hooks)

    def before_train(self) -> None:
        """Once, before the first step (after a resume's state is loaded)."""

    def after_step(self) -> None:
        """After every optimiser step (``loop.step`` is its number, ``loop.loss`` its loss)."""

    def after_epoch(self) -> None:
        """After every completed epoch (``loop.epoch`` counts the completed ones)."""

    def after_train(self) -> None:
        """Once at the end, also when a step raised."""


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


class MetricsLogger(Hook):
    """``<out_dir>/metrics.jsonl`` (one JSON record a line), TensorBoard scalars and the progress
    bar, all from the main process: a ``train`` record every ``log_every`` optimiser steps and at
    the last one; other hooks add theirs through :meth:`write`.

    A resumed run keeps the records up to its checkpoint's step and drops those of the steps it is
    about to run again; a fresh run starts an empty file.
    """

    def __init__(self, out_dir: Path, *, log_every: int, resumed: bool, tensorboard: bool, progress: bool):
        self.path = out_dir / "metrics.jsonl"
        self.tensorboard_dir = out_dir / "tensorboard"
        self.log_every, self.resumed = log_every, resumed
        self.tensorboard, self.progress_bar = tensorboard, progress
        self.writer = None

    def before_train(self) -> None:
        main = self.loop.is_main
        if main:
            kept = self._records_up_to(self.loop.step) if self.resumed else []
            self.path.write_text("".join(line + "\n" for line in kept))
        if main and self.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(self.tensorboard_dir))
            except ImportError:
                print("warning: tensorboard is not installed; run.tensorboard ignored", file=sys.stderr)
        self.progress = _Progress(main and self.progress_bar and sys.stderr.isatty(), self.loop.last_step,
                                  self.loop.step)
        # images/s is measured over the steps since the last train record
        self.window_start, self.window_images = time.perf_counter(), 0

    def _records_up_to(self, step: int) -> list[str]:
        """The file's lines whose records are of ``step`` or before."""
        if not self.path.exists():
            return []
        return [line for line in self.path.read_text().splitlines() if json.loads(line).get("step", 0) <= step]

    def write(self, record: dict[str, Any]) -> None:
        """Append ``record`` (its numbers also as TensorBoard scalars ``<kind>/<key>``)."""
        if not self.loop.is_main:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step", "epoch"):
                    self.writer.add_scalar(f"{record.get('kind', 'train')}/{key}", value, record["step"])

    def after_step(self) -> None:
        loop = self.loop
        self.window_images += loop.step_images
        if loop.step % self.log_every != 0 and loop.step != loop.last_step:
            return
        now = time.perf_counter()
        images_per_s = self.window_images / max(now - self.window_start, 1e-9)
        self.window_start, self.window_images = now, 0
        # the schedule's lr of the base rate (parameter groups scale it by their multipliers)
        lr = loop.cfg.optim.lr * loop.scheduler.lr_lambdas[0](loop.scheduler.last_epoch)
        record = {"kind": "train", "step": loop.step, "epoch": loop.epoch, "loss": loop.loss, "lr": lr}
        if loop.grad_norm is not None:
            record["grad_norm"] = loop.grad_norm
        self.write({**record, "images_per_s": images_per_s, "time": time.time()})
        self.progress.update(loop.step, f"loss {loop.loss:.4f}  lr {lr:.2e}  {images_per_s:.1f} img/s")

    def after_train(self) -> None:
        self.progress.close()
        if self.writer is not None:
            self.writer.close()


class Evaluator(Hook):
    """The task's evaluation of ``dataset`` after every ``every``-th epoch (0: none) and after the
    last, logged through ``log`` as an ``eval`` record. Every rank evaluates its own shard (the task
    gathers through ``D.gather_objects``); the main process's files (predictions) go to ``save_to``.

    ``result`` is the evaluation of the epoch just completed (``None`` when none ran), ``last`` the
    run's last one.
    """

    def __init__(self, dataset: Dataset | None, *, every: int, save_to: Path, log: Callable[[dict], None]):
        self.dataset, self.every, self.save_to, self.log = dataset, every, save_to, log
        self.result: dict | None = None
        self.last: dict | None = None

    def after_epoch(self) -> None:
        loop = self.loop
        due = self.every and loop.epoch % self.every == 0
        self.result = None
        if self.dataset is None or not (due or loop.epoch == loop.num_epochs):
            return
        self.result = self.last = self.evaluate()
        self.log({"kind": "eval", "step": loop.step, "epoch": loop.epoch, "train_time_s": loop.train_time_s,
                  **self.result})

    def evaluate(self) -> dict:
        """The task's metrics of the model (and of its EMA, as ``ema_<key>``), in batches of the
        training micro-batch size (with the strategy's whole parameters: under fsdp gathered once,
        so each process runs its own number of batches)."""
        loop, task = self.loop, self.loop.task
        generator = torch.Generator().manual_seed(0)  # keep the global RNG untouched
        D.broadcast_buffers(loop.model)
        loader = DataLoader(self.dataset, batch_size=loop.micro_batch,
                            sampler=ShardSampler(len(self.dataset), D.rank(), D.world_size()),
                            num_workers=loop.cfg.run.num_workers, collate_fn=task.collate, generator=generator)
        was_training = loop.model.training
        with loop.strategy.full_params(loop.model):
            result = task.evaluate(loop.model, loader, loop.device, loop.amp_dtype, gather=D.gather_objects,
                                   save_to=str(self.save_to) if loop.is_main else None)
        if loop.ema is not None:
            ema_result = task.evaluate(loop.ema.module, loader, loop.device, loop.amp_dtype, gather=D.gather_objects)
            result.update({f"ema_{k}": v for k, v in ema_result.items() if k != "num_samples"})
        loop.model.train(was_training)
        return result


class BestMetric(Hook):
    """Best-checkpoint selection: whether the ``evaluator``'s result of the epoch beats
    ``loop.best`` on the task's ``metric`` (larger when ``task.higher_is_better``). A better score
    becomes ``loop.best``, which every checkpoint records so that a resumed run keeps comparing
    against it, and sets ``improved`` for the :class:`Checkpointer`."""

    def __init__(self, evaluator: Evaluator):
        self.evaluator = evaluator
        self.improved = False

    def after_epoch(self) -> None:
        self.improved = False
        result = self.evaluator.result
        if result is None:
            return
        task, best = self.loop.task, self.loop.best
        score, higher_is_better = result.get(task.metric), task.higher_is_better
        if score is None:  # the task reported no score this time
            return
        self.improved = best is None or (score > best if higher_is_better else score < best)
        if self.improved:
            self.loop.best = score


class Checkpointer(Hook):
    """Training checkpoints in ``directory`` (see :mod:`piip.engine.checkpoint`): ``step-<step>.pt``
    every ``every_steps`` optimiser steps (0: never mid-epoch) and after every epoch, the last
    ``keep_last`` kept; and ``best.pt`` after an epoch whose evaluation ``best`` found better.
    Under a sharded strategy (zero1, fsdp) they are folders, ``step-<step>/`` and ``best/``.

    Every rank takes part in a save (the RNG states of all ranks are gathered); only the main
    process writes, except the shards of a sharded checkpoint (each process its own).
    ``last_path`` is the last step checkpoint written (``None`` on the other ranks).
    """

    def __init__(self, directory: Path, *, every_steps: int, keep_last: int, best: BestMetric | None = None):
        self.directory, self.every_steps, self.keep_last, self.best = directory, every_steps, keep_last, best
        self.last_path: Path | None = None

    def after_step(self) -> None:
        if self.every_steps and self.loop.step % self.every_steps == 0:
            self.last_path = self.save_step()

    def after_epoch(self) -> None:
        self.last_path = self.save_step()
        if self.best is not None and self.best.improved:
            self.save_best()

    def save_step(self) -> Path | None:
        """``step-<step>.pt`` (or folder), ``latest`` pointing at it, older step checkpoints pruned."""
        if self.loop.strategy.sharded:
            return self._save_sharded(f"step-{self.loop.step:08d}", latest=True)
        return self._save(lambda state: save_training_checkpoint(self.directory, state, self.loop.step,
                                                                 keep=self.keep_last))

    def save_best(self) -> Path | None:
        if self.loop.strategy.sharded:
            return self._save_sharded("best", latest=False)
        return self._save(lambda state: atomic_torch_save(state, self.directory / "best.pt"))

    def _save(self, write: Callable[[dict], Path]) -> Path | None:
        state = self.loop.state_dict()  # on every rank: it gathers their RNG states
        path = write(state) if self.loop.is_main else None
        D.barrier()  # no rank runs ahead of a checkpoint being written
        return path

    def _save_sharded(self, name: str, latest: bool) -> Path | None:
        """The folder ``name``, every process writing its shards; with the model's piip header (and
        the task's ``checkpoint_metadata()``, as its export writes them), so that ``piip.load`` reads
        the folder as the whole model."""
        model, task = bare_model(self.loop.model), self.loop.task
        metadata = task.checkpoint_metadata() if hasattr(task, "checkpoint_metadata") else None
        header = checkpoint_header(model, metadata) if model_kind(getattr(model, "config", None)) else None
        path = save_sharded_checkpoint(self.directory, self.loop.state_dict(), name, header=header,
                                       latest=latest, keep=self.keep_last)
        return path if self.loop.is_main else None
