"""The task protocol: everything piip does that depends on the task, and the registry of tasks.

The training engine (:func:`piip.engine.train`) and the commands (``piip train / eval / predict /
convert``, :func:`piip.load`, :func:`piip.predict`) know no task: they look one up here by name, by
the checkpoint kind it rebuilds or by the model it owns, and call it. A task is one folder under
:mod:`piip.tasks` with a class following :class:`Task`, registered by one line in
``piip/tasks/__init__.py``. Rule of thumb: the engine never says "cls" or "det"; a task never
touches DDP, checkpoints or the optimiser.

The protocol lives with the engine (its first user) so that the engine and the checkpoint reader
sit below the tasks: registration points downwards, nothing here imports a task.
"""
from __future__ import annotations

import argparse
from typing import Any, Callable, ClassVar, Protocol, Sequence, runtime_checkable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..weights.checkpoint import register_model_kind

__all__ = ["Task", "register_task", "get_task_class", "task_names", "task_classes", "task_for_model"]


@runtime_checkable
class Task(Protocol):
    """One task (classification, detection, segmentation) in all piip does with it.

    Class attributes:
        name: the task's name on the command line (``piip train NAME``, ``piip eval NAME``).
        data_config: the dataclass of the run config's ``data`` section for this task.
        metric / higher_is_better: the evaluation result that selects the best checkpoint.
        model_kind / model_config: the kind of piip checkpoint the task's models are saved as
            (``"piip"``, ``"detector"``, ...) and the config class stored in it.

    Optional: ``batch_groups(dataset) -> list[int]``, a group per sample (e.g. its aspect ratio),
    which the engine then batches together; ``find_unused_parameters = True`` when some parameters
    may get no gradient in a step (DDP must be told); ``checkpoint_metadata() -> dict[str, str] |
    None``, header strings of the run's checkpoints (a classifier's class names), which the engine
    writes into a sharded checkpoint's header as the task's ``export`` does into its file.
    """

    name: ClassVar[str]
    data_config: ClassVar[type]
    metric: ClassVar[str]
    higher_is_better: ClassVar[bool]
    model_kind: ClassVar[str]
    model_config: ClassVar[type]

    # -- training (an instance holds one run's config) --------------------------------------------
    def build_datasets(self, cfg: Any) -> tuple[Dataset, Dataset | None]:
        """The training and validation datasets of a run config (validation may be ``None``)."""

    def collate(self, batch: list) -> Any:
        """Merge a list of dataset items into one batch."""

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

    # -- a saved model (class-level: no run config) -------------------------------------------------
    @staticmethod
    def model_from_config(config: Any) -> nn.Module:
        """The untrained model a checkpoint of ``model_kind`` with this config holds."""

    @classmethod
    def owns(cls, model: nn.Module) -> bool:
        """Whether ``model`` is this task's (``piip.predict`` dispatches on it)."""

    @classmethod
    def evaluate_checkpoint(cls, checkpoint: str, data: Any, *, split: str = "val", batch_size: int | None = None,
                            workers: int = 0, device: str | torch.device = "cpu",
                            amp_dtype: torch.dtype | None = None, save_to: str | None = None,
                            progress: bool = False, **options: Any) -> Any:
        """Load a checkpoint and score it on ``split`` of ``data`` (a ``data_config``); ``options``
        are the task's inference settings (segmentation: ``mode``, ``flip``). Returns the task's
        metrics (an object with ``to_dict()``)."""

    @classmethod
    def predict(cls, model: nn.Module, images: Sequence[torch.Tensor], *, score_threshold: float, topk: int,
                class_names: Sequence[str] | None, device: torch.device) -> list[dict[str, Any]]:
        """Predictions for float (3, H, W) images in [0, 1] (see :func:`piip.predict`)."""

    @classmethod
    def save_prediction(cls, model: nn.Module, image: torch.Tensor, prediction: dict[str, Any], out_dir: Any,
                        stem: str, class_names: Sequence[str] | None, *, draw: bool = True
                        ) -> tuple[dict[str, Any], list[str]]:
        """One image's JSON record, and its files in ``out_dir`` (the pictures only with ``draw``;
        data that does not fit a JSON line, a segmenter's label map, always); returns the record and
        the pictures drawn."""

    @staticmethod
    def describe_prediction(record: dict[str, Any]) -> str:
        """One line for a person about one image's JSON record."""

    # -- the command line and the authors' files ----------------------------------------------------
    eval_help: ClassVar[str]  # the one-line help of ``piip eval NAME``

    @staticmethod
    def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
        """The task's ``piip eval NAME`` options (data layout, inference settings)."""

    @classmethod
    def run_eval_command(cls, args: argparse.Namespace, console: Any) -> None:
        """``piip eval NAME``: evaluate ``args.checkpoint`` and print (or ``--json``) the metrics."""

    @staticmethod
    def has_authors_heads(extra: dict[str, dict[str, torch.Tensor]]) -> bool:
        """Whether the non-backbone tensors of an authors' checkpoint are this task's heads."""

    @staticmethod
    def with_authors_heads(backbone: nn.Module, converted: dict[str, torch.Tensor], extra: dict,
                           settings: dict[str, Any]) -> tuple[nn.Module, dict, int]:
        """The whole model from a converted backbone and the authors' heads: ``(model, extra tensors
        left over, tensors loaded)``."""


_TASKS: dict[str, type] = {}


def register_task(cls: type) -> type:
    """Make the task ``cls`` available by its ``name``, and its checkpoints loadable by their kind."""
    if cls.name in _TASKS and _TASKS[cls.name] is not cls:
        raise ValueError(f"task {cls.name!r} registered twice")
    _TASKS[cls.name] = cls
    register_model_kind(cls.model_kind, cls.model_config, cls.model_from_config)
    return cls


def task_names() -> list[str]:
    return sorted(_TASKS)


def task_classes() -> list[type]:
    """The registered task classes, by name."""
    return [_TASKS[name] for name in sorted(_TASKS)]


def get_task_class(name: str) -> type:
    """The task class registered under ``name`` (``"cls"``, ``"det"``, ...)."""
    if name not in _TASKS:
        raise ValueError(f"unknown task {name!r}; tasks are {sorted(_TASKS)}")
    return _TASKS[name]


def task_for_model(model: nn.Module) -> type:
    """The task whose model ``model`` is (a detector, a segmenter, a classifier)."""
    for cls in task_classes():
        if cls.owns(model):
            return cls
    raise ValueError(f"no task owns a {type(model).__name__} (tasks: {task_names()}); a dense backbone alone "
                     "has no predictions to show")
