"""What several tasks share: the ``model.head`` check, the missing-validation fallback,
fine-tuning a whole checkpointed model, the evaluation progress bar. The task protocol and the
registry are :mod:`piip.engine.task` (re-exported here)."""
from __future__ import annotations

import contextlib
import dataclasses
import typing
import warnings
from typing import Any, Callable, Iterator

from torch import nn
from torch.utils.data import Dataset

from ..config.typed import accepts_none, check_value
from ..engine.task import Task, get_task_class, register_task, task_classes, task_for_model, task_names
from ..models.factory import check_weight_sources
from ..weights.checkpoint import load_checkpoint, read_checkpoint

__all__ = ["Task", "BaseTask", "register_task", "get_task_class", "task_names", "task_classes", "task_for_model",
           "head_settings", "evaluation_progress", "optional_validation", "whole_model_checkpoint"]


class BaseTask:
    """What makes a task folder a :class:`~piip.engine.task.Task`, declared in the class statement::

        class DetectionTask(BaseTask, name="det", data_config=DetectionDataConfig, metric="bbox_AP",
                            model_kind="detector", model_config=DetectorConfig,
                            model_from_config=build_detector_from_config, evaluate_checkpoint=evaluate_checkpoint,
                            cli=cli, inference=inference, authors_heads=(has_heads, with_heads)):

    ``cli`` is the folder's module with ``HELP``, ``add_eval_arguments`` and ``run_eval_command``;
    ``inference`` the one with ``predict``, ``save_prediction`` and ``describe_prediction``;
    ``authors_heads`` the pair (recognise, convert) for the authors' task heads, if the task has any.
    The class body holds the training members (``build_datasets``, ``build_model``, ``loss``, ...) and
    ``owns(model)``.
    """

    def __init_subclass__(cls, *, name: str, data_config: type, metric: str, model_kind: str, model_config: type,
                          model_from_config: Callable, evaluate_checkpoint: Callable, cli: Any, inference: Any,
                          authors_heads: tuple[Callable, Callable] | None = None, higher_is_better: bool = True,
                          **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.name, cls.data_config, cls.metric, cls.higher_is_better = name, data_config, metric, higher_is_better
        cls.model_kind, cls.model_config = model_kind, model_config
        cls.model_from_config = staticmethod(model_from_config)
        cls.evaluate_checkpoint = staticmethod(evaluate_checkpoint)
        cls.eval_help = cli.HELP
        cls.add_eval_arguments = staticmethod(cli.add_eval_arguments)
        cls.run_eval_command = staticmethod(cli.run_eval_command)
        cls.predict = staticmethod(inference.predict)
        cls.save_prediction = staticmethod(inference.save_prediction)
        cls.describe_prediction = staticmethod(inference.describe_prediction)
        if authors_heads is not None:
            cls.has_authors_heads, cls.with_authors_heads = (staticmethod(f) for f in authors_heads)

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg

    @staticmethod
    def has_authors_heads(extra: dict) -> bool:
        return False  # a task without heads of its own in the authors' files

    @staticmethod
    def with_authors_heads(backbone: nn.Module, converted: dict, extra: dict, settings: dict):
        raise NotImplementedError("this task has no heads in the authors' checkpoints")


def head_settings(head: dict[str, Any], config_cls: type, derived: tuple[str, ...], what: str,
                  where: str = "model.head") -> dict[str, Any]:
    """``model.head`` of a run (or the settings named ``where``), checked against the fields of the
    task model's config ``config_cls`` (those in ``derived`` come from the backbone and the data, not
    from the run): unknown names and values that do not fit a field's declared type are refused in
    one line naming ``<where>.<field>``; ``null`` for a field that cannot be ``None`` means its
    default (the key is dropped: ``model.head.class_weight=null`` removes a recipe's weights), as
    everywhere in the run config (:mod:`piip.engine.config`)."""
    if not isinstance(head, dict):
        raise ValueError(f"{where} must be a mapping of {what} settings, got {head!r}")
    allowed = sorted(f.name for f in dataclasses.fields(config_cls) if f.name not in derived)
    unknown = sorted(set(head) - set(allowed))
    if unknown:
        raise ValueError(f"unknown {what} setting(s) {where}.{unknown}; {what} settings are {allowed}")
    hints = typing.get_type_hints(config_cls)
    settings = {}
    for name, value in head.items():
        if value is None and not accepts_none(hints[name]):
            continue  # null: the field's default
        settings[name] = check_value(hints[name], value, f"{where}.{name}")
    return settings


@contextlib.contextmanager
def evaluation_progress(enabled: bool, total: int, label: str) -> Iterator[Callable[[], None]]:
    """A rich progress bar over ``total`` items while the block runs; yields the function that
    advances it (by one, or by its argument; it does nothing when ``enabled`` is false)."""
    if not enabled:
        yield lambda steps=1: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  transient=True) as bar:
        task = bar.add_task("", total=total)
        yield lambda steps=1: bar.update(task, advance=steps)


def optional_validation(build: Callable[[], Dataset], explicit: bool) -> Dataset | None:
    """The validation dataset ``build`` returns; when the data has no validation split and the run
    did not name one (``explicit``), ``None`` with a warning: the run trains without evaluation."""
    try:
        return build()
    except (FileNotFoundError, ValueError) as err:
        if explicit:
            raise
        warnings.warn(f"no validation split ({err}); training without evaluation", RuntimeWarning, stacklevel=3)
        return None


def whole_model_checkpoint(model_cfg: Any, kind: str) -> nn.Module | None:
    """The run's ``model.checkpoint`` loaded whole, in training mode, when it holds a model of
    ``kind`` (fine-tuning a whole detector or segmenter); ``None`` when the run builds its model (the
    checkpoint then holds a backbone). The weight sources are checked either way."""
    check_weight_sources(model_cfg.pretrained, model_cfg.branch_weights, model_cfg.checkpoint)
    if model_cfg.checkpoint is not None and read_checkpoint(model_cfg.checkpoint, tensors=False)["kind"] == kind:
        return load_checkpoint(model_cfg.checkpoint).train()
    return None
