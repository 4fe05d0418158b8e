"""Classification: the task on the shared engine (data glue, model, loss) and its evaluation
(top-1 / top-5 / per-class accuracy and cross-entropy)."""
from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from typing import Any, Callable, ClassVar, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, default_collate

from ..data import DataConfig
from ..precision import autocast
from .base import register_task

__all__ = ["ClassificationTask", "ClassificationMetrics", "evaluate", "evaluate_checkpoint", "accuracy_counts"]


@dataclass
class ClassificationMetrics:
    """Accuracies in percent (0-100).

    Attributes:
        top1, top5: accuracy of the best / five best logits (``top5`` is ``top-k`` with
            ``k = min(5, num_classes)``).
        per_class: top-1 accuracy of every class (index = label); ``None`` for a class with no
            sample in the evaluated set.
        per_class_count: samples of every class.
        num_samples: images evaluated.
        loss: mean cross-entropy (nats).
        classes: class names when known.
    """

    top1: float
    top5: float
    per_class: list[float | None]
    per_class_count: list[int]
    num_samples: int
    loss: float
    classes: list[str] | None = None
    skipped: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def accuracy_counts(logits: torch.Tensor, targets: torch.Tensor, k: int = 5) -> tuple[int, int]:
    """``(top-1 correct, top-k correct)`` counts of a batch."""
    k = min(k, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    hits = top.eq(targets[:, None])
    return int(hits[:, 0].sum()), int(hits.any(dim=1).sum())


def evaluate(model: nn.Module, loader: Iterable, num_classes: int, device: str | torch.device = "cpu",
             amp_dtype: torch.dtype | None = None, progress: bool = False,
             classes: Sequence[str] | None = None,
             gather: Callable[[list], list] | None = None) -> ClassificationMetrics:
    """Evaluate ``model`` (``images -> (B, num_classes)`` logits) on ``loader``'s ``(images, labels)``.

    Runs under ``torch.inference_mode()`` with the model in eval mode (its previous mode is
    restored). ``amp_dtype`` (e.g. ``torch.bfloat16``) enables autocast on ``device``'s type; the
    metrics are computed in float32. ``progress`` shows a rich progress bar. ``gather`` combines
    the counts of every process's shard (the engine passes its all-gather under DDP).
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    correct1 = correct5 = seen = 0
    loss_sum = 0.0
    class_correct = torch.zeros(num_classes, dtype=torch.long)
    class_count = torch.zeros(num_classes, dtype=torch.long)
    bar = None
    if progress:
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        bar = Progress(TextColumn("[bold]eval"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                       TimeRemainingColumn(), TextColumn("{task.description}"), transient=True)
    try:
        total = len(loader) if hasattr(loader, "__len__") else None
    except TypeError:
        total = None
    try:
        if bar is not None:
            bar.start()
            task = bar.add_task("", total=total)
        with torch.inference_mode():
            for images, targets in loader:
                images = images.to(device, non_blocking=True)
                targets = torch.as_tensor(targets).to(device, non_blocking=True)
                with autocast(device.type, amp_dtype):
                    logits = model(images)
                logits = logits.float()
                if logits.dim() != 2 or logits.shape[1] != num_classes:
                    raise ValueError(f"the model returned logits of shape {tuple(logits.shape)}, expected "
                                     f"(batch, {num_classes}); is it a task='cls' model with "
                                     f"num_classes={num_classes}?")
                if targets.numel() and (targets.min() < 0 or targets.max() >= num_classes):
                    raise ValueError(f"labels outside [0, {num_classes}) in the data: "
                                     f"min {int(targets.min())}, max {int(targets.max())}")
                loss_sum += float(F.cross_entropy(logits, targets, reduction="sum"))
                c1, c5 = accuracy_counts(logits, targets)
                correct1 += c1
                correct5 += c5
                seen += targets.numel()
                hit = logits.argmax(dim=1).eq(targets).long().cpu()
                t = targets.cpu()
                class_count += torch.bincount(t, minlength=num_classes)
                class_correct += torch.bincount(t, weights=hit, minlength=num_classes).long()
                if bar is not None:
                    bar.update(task, advance=1, description=f"top-1 {100.0 * correct1 / max(seen, 1):.2f}%")
    finally:
        if bar is not None:
            bar.stop()
        model.train(was_training)
    if gather is not None:
        shards = gather([(correct1, correct5, seen, loss_sum, class_correct, class_count)])
        correct1, correct5, seen = (sum(x[i] for x in shards) for i in range(3))
        loss_sum = sum(x[3] for x in shards)
        class_correct, class_count = sum(x[4] for x in shards), sum(x[5] for x in shards)
    if seen == 0:
        raise ValueError("the loader yielded no samples to evaluate")
    per_class = [100.0 * int(c) / int(n) if n else None for c, n in zip(class_correct, class_count)]
    dataset = getattr(loader, "dataset", None)
    return ClassificationMetrics(
        top1=100.0 * correct1 / seen, top5=100.0 * correct5 / seen, per_class=per_class,
        per_class_count=[int(n) for n in class_count], num_samples=seen, loss=loss_sum / seen,
        classes=list(classes) if classes is not None else (list(dataset.classes) if hasattr(dataset, "classes") else None),
        skipped=int(getattr(dataset, "skipped", 0) or 0))


def evaluate_checkpoint(checkpoint: str, data, *, split: str = "val", batch_size: int = 64,
                        workers: int = 0, device: str | torch.device = "cpu",
                        amp_dtype: torch.dtype | None = None, progress: bool = False
                        ) -> ClassificationMetrics:
    """Load a piip classification checkpoint (``piip.save`` / ``piip convert``) and evaluate it on
    ``split`` of ``data`` (a :class:`~piip.data.DataConfig`; ``image_size=None`` takes the model's
    input size, i.e. its finest branch's resolution)."""
    from dataclasses import replace

    from torch.utils.data import DataLoader

    from ..data import build_dataset, check_num_classes
    from ..weights.checkpoint import load_checkpoint

    model = load_checkpoint(checkpoint, device=device)
    if model.config.task != "cls":
        raise ValueError(f"checkpoint {checkpoint!r} holds a {model.config.task!r} model; "
                         "`eval cls` needs a classification (task='cls') checkpoint")
    if data.image_size is None:
        data = replace(data, image_size=model.config.input_size)
    dataset = build_dataset(data, split)
    check_num_classes(dataset, model)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                        pin_memory=torch.device(device).type == "cuda")
    return evaluate(model, loader, model.config.num_classes, device=device, amp_dtype=amp_dtype,
                    progress=progress, classes=dataset.classes)


@register_task
class ClassificationTask:
    """Classification: timm Mixup/CutMix, soft-target / label-smoothing cross-entropy, top-1/5."""

    name: ClassVar[str] = "cls"
    data_config: ClassVar[type] = DataConfig
    metric: ClassVar[str] = "top1"
    higher_is_better: ClassVar[bool] = True

    def __init__(self, cfg):
        self.cfg = cfg
        self.mixup = None
        self.num_classes = None
        self.class_names = None

    def build_datasets(self, cfg) -> tuple[Dataset, Dataset | None]:
        from ..data import build_dataset
        from ..engine.build import build_model_config

        data = cfg.data
        if data.image_size is None:  # the model's input size (its finest branch's resolution)
            data = dataclasses.replace(data, image_size=build_model_config(cfg.model, "cls").input_size)
        train = build_dataset(data, "train")
        try:
            val = build_dataset(data, "val")
        except (ValueError, FileNotFoundError, KeyError):
            val = None
        return train, val

    collate = staticmethod(default_collate)

    def build_model(self, cfg, train_dataset: Dataset) -> nn.Module:
        from ..engine.build import build_backbone

        classes = getattr(train_dataset, "classes", None)
        self.class_names = list(classes) if classes is not None else None
        model = build_backbone(cfg.model, "cls", len(classes) if classes is not None else None)
        self.num_classes = model.config.num_classes
        aug = cfg.aug
        if aug.mixup > 0 or aug.cutmix > 0:
            from timm.data import Mixup

            self.mixup = Mixup(mixup_alpha=aug.mixup, cutmix_alpha=aug.cutmix, prob=aug.mixup_prob,
                               switch_prob=aug.mixup_switch_prob, label_smoothing=aug.label_smoothing,
                               num_classes=self.num_classes)
        return model

    def loss(self, model: nn.Module, batch, device: torch.device) -> tuple[torch.Tensor, int]:
        images, targets = batch
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if self.mixup is not None:
            images, soft = self.mixup(images, targets)
            logits = model(images)
            loss = torch.sum(-soft * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
        else:
            logits = model(images)
            loss = F.cross_entropy(logits.float(), targets, label_smoothing=self.cfg.aug.label_smoothing)
        return loss, images.shape[0]

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: DataLoader, device: torch.device,
                 amp_dtype: torch.dtype | None, gather: Callable[[list], list] | None = None,
                 save_to: str | None = None) -> dict[str, float]:
        m = evaluate(model, loader, self.num_classes, device, amp_dtype, gather=gather)
        return {"top1": float(m.top1), "top5": float(m.top5), "loss": float(m.loss),
                "num_samples": int(m.num_samples)}

    def export(self, model: nn.Module, path: str) -> str:
        """The classifier, with its class names in the header (``piip predict`` shows them)."""
        import json

        from ..weights.checkpoint import save_checkpoint

        names = {"class_names": json.dumps(self.class_names)} if self.class_names else None
        return save_checkpoint(model, path, metadata=names)
