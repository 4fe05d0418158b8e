"""Classification metrics: top-1 / top-5 / per-class accuracy and cross-entropy, of a model on a
loader (the engine's validation) or of a checkpoint on a dataset (``piip eval cls``)."""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from ...data import build_dataset, check_num_classes
from ...precision import autocast
from ...weights.checkpoint import load_checkpoint
from ...weights.io import atomic_write
from ..base import evaluation_progress

__all__ = ["ClassificationMetrics", "evaluate", "evaluate_checkpoint", "accuracy_counts"]


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
    try:
        total = len(loader) if hasattr(loader, "__len__") else None
    except TypeError:
        total = None
    try:
        with evaluation_progress(progress, total, "eval cls") as advance, torch.inference_mode():
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
                advance()
    finally:
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


def evaluate_checkpoint(checkpoint: str, data, *, split: str = "val", batch_size: int | None = None,
                        workers: int = 0, device: str | torch.device = "cpu",
                        amp_dtype: torch.dtype | None = None, save_to: str | None = None,
                        progress: bool = False) -> ClassificationMetrics:
    """Load a piip classification checkpoint (``piip.save`` / ``piip convert``) and evaluate it on
    ``split`` of ``data`` (a :class:`~piip.data.DataConfig`; ``image_size=None`` takes the model's
    input size, i.e. its finest branch's resolution). ``batch_size`` defaults to 64; ``save_to``: a
    folder for ``metrics.json``."""
    model = load_checkpoint(checkpoint, device=device)
    if getattr(getattr(model, "config", None), "task", None) != "cls":
        raise ValueError(f"checkpoint {checkpoint!r} holds a {type(model).__name__} of task "
                         f"{getattr(model.config, 'task', None)!r}; "
                         "`eval cls` needs a classification (task='cls') checkpoint")
    if data.image_size is None:
        data = dataclasses.replace(data, image_size=model.config.input_size)
    dataset = build_dataset(data, split)
    check_num_classes(dataset, model)
    loader = DataLoader(dataset, batch_size=batch_size or 64, shuffle=False, num_workers=workers,
                        pin_memory=torch.device(device).type == "cuda")
    metrics = evaluate(model, loader, model.config.num_classes, device=device, amp_dtype=amp_dtype,
                       progress=progress, classes=dataset.classes)
    if save_to is not None:
        os.makedirs(save_to, exist_ok=True)
        atomic_write(os.path.join(save_to, "metrics.json"), "w", lambda f: json.dump(metrics.to_dict(), f, indent=2))
    return metrics
