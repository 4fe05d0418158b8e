"""The task protocol: what the engine needs from a task, and the registry of tasks.

The training engine (:func:`piip.engine.train`) knows no task. A task supplies its data, its model
and what a batch costs; the engine owns the loop, the optimiser, distribution, checkpoints and
logging. Rule of thumb: the engine never says "cls" or "det"; a task never touches DDP,
checkpoints or the optimiser. Below the registry: what several tasks share (the ``model.head``
check, the missing-validation fallback, fine-tuning a whole checkpointed model, the evaluation
progress bar).
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, ClassVar, Iterator, Protocol, runtime_checkable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

__all__ = ["Task", "register_task", "get_task_class", "task_names", "head_settings", "evaluation_progress",
           "optional_validation", "whole_model_checkpoint"]


@runtime_checkable
class Task(Protocol):
    """One task (classification, detection, ...) on the shared engine.

    Class attributes:
        name: the task's name on the command line (``piip train NAME``).
        data_config: the dataclass of the run config's ``data`` section for this task.
        metric: the evaluation result that selects the best checkpoint.
        higher_is_better: whether a larger ``metric`` is better.
    """

    name: ClassVar[str]
    data_config: ClassVar[type]
    metric: ClassVar[str]
    higher_is_better: ClassVar[bool]

    def build_datasets(self, cfg: Any) -> tuple[Dataset, Dataset | None]:
        """The training and validation datasets of a run config (validation may be ``None``)."""

    def collate(self, batch: list) -> Any:
        """Merge a list of dataset items into one batch."""

    # optional: ``batch_groups(dataset) -> list[int]``, a group per sample (e.g. its aspect ratio),
    # which the engine then batches together; ``find_unused_parameters = True`` when some
    # parameters may get no gradient in a step (DDP must be told)

    def build_model(self, cfg: Any, train_dataset: Dataset) -> nn.Module:
        """The model to train (weights from ``cfg.model``: pretrained branches or a checkpoint)."""

    def loss(self, model: nn.Module, batch: Any, device: torch.device) -> tuple[torch.Tensor, int]:
        """``(scalar loss, images in the batch)`` of one micro-batch."""

    def evaluate(self, model: nn.Module, loader: DataLoader, device: torch.device,
                 amp_dtype: torch.dtype | None, gather: Callable[[list], list],
                 save_to: str | None = None) -> dict[str, float]:
        """Metrics on ``loader``, this process's shard of the validation set; ``gather(items)``
        returns every process's ``items`` (the engine's all-gather), so the task can combine them.
        ``save_to``: a folder for the evaluation's files (predictions), given to one process only."""

    def export(self, model: nn.Module, path: str) -> str:
        """Write the trained model as a self-describing piip checkpoint; returns the path."""


_TASKS: dict[str, type] = {}


def register_task(cls: type) -> type:
    """Class decorator: make a task available by its ``name``."""
    if cls.name in _TASKS and _TASKS[cls.name] is not cls:
        raise ValueError(f"task {cls.name!r} registered twice")
    _TASKS[cls.name] = cls
    return cls


def _ensure_loaded() -> None:
    from . import classification, detection, segmentation  # noqa: F401  (register on import)


def task_names() -> list[str]:
    _ensure_loaded()
    return sorted(_TASKS)


def get_task_class(name: str) -> type:
    """The task class registered under ``name`` (``"cls"``, ``"det"``, ...)."""
    _ensure_loaded()
    if name not in _TASKS:
        raise ValueError(f"unknown task {name!r}; tasks are {sorted(_TASKS)}")
    return _TASKS[name]


def head_settings(head: dict[str, Any], config_cls: type, derived: tuple[str, ...], what: str) -> dict[str, Any]:
    """``model.head`` of a run, checked against the fields of the task model's config ``config_cls``
    (those in ``derived`` come from the backbone and the data, not from the run): unknown names and
    values that do not fit a field's declared type are refused in one line naming
    ``model.head.<field>``; ``null`` for a field that cannot be ``None`` means its default (the key
    is dropped: ``model.head.class_weight=null`` removes a recipe's weights), as everywhere in the
    run config (:mod:`piip.engine.config`)."""
    import dataclasses
    import typing

    from ..engine.config import accepts_none, check_value

    if not isinstance(head, dict):
        raise ValueError(f"model.head must be a mapping of {what} settings, got {head!r}")
    allowed = sorted(f.name for f in dataclasses.fields(config_cls) if f.name not in derived)
    unknown = sorted(set(head) - set(allowed))
    if unknown:
        raise ValueError(f"unknown {what} setting(s) model.head.{unknown}; {what} settings are {allowed}")
    hints = typing.get_type_hints(config_cls)
    settings = {}
    for name, value in head.items():
        if value is None and not accepts_none(hints[name]):
            continue  # null: the field's default
        settings[name] = check_value(hints[name], value, f"model.head.{name}")
    return settings


@contextlib.contextmanager
def evaluation_progress(enabled: bool, total: int, label: str) -> Iterator[Callable[[], None]]:
    """A rich progress bar over ``total`` batches while the block runs; yields the function that
    advances it by one (which does nothing when ``enabled`` is false)."""
    if not enabled:
        yield lambda: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  transient=True) as bar:
        task = bar.add_task("", total=total)
        yield lambda: bar.update(task, advance=1)


def optional_validation(build: Callable[[], Dataset], explicit: bool) -> Dataset | None:
    """The validation dataset ``build`` returns; when the data has no validation split and the run
    did not name one (``explicit``), ``None`` with a warning: the run trains without evaluation."""
    try:
        return build()
    except (FileNotFoundError, ValueError) as err:
        if explicit:
            raise
        import warnings

        warnings.warn(f"no validation split ({err}); training without evaluation", RuntimeWarning, stacklevel=3)
        return None


def whole_model_checkpoint(model_cfg: Any, kind: str) -> nn.Module | None:
    """The run's ``model.checkpoint`` loaded whole, in training mode, when it holds a model of
    ``kind`` (fine-tuning a whole detector or segmenter); ``None`` when the run builds its model (the
    checkpoint then holds a backbone). The weight sources are checked either way."""
    from ..models.factory import check_weight_sources
    from ..weights.checkpoint import load_checkpoint, read_checkpoint

    check_weight_sources(model_cfg.pretrained, model_cfg.branch_weights, model_cfg.checkpoint)
    if model_cfg.checkpoint is not None and read_checkpoint(model_cfg.checkpoint)["kind"] == kind:
        return load_checkpoint(model_cfg.checkpoint).train()
    return None
