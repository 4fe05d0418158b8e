"""Semantic-segmentation inference (whole image or sliding window, optional flip) and metrics.

Metrics follow MMSegmentation's ``mean_iou``: one dataset-level accumulation of per-class
intersection, union, predicted and labelled areas over the pixels that are not ``ignore_index``;
IoU = intersection / union and Acc = intersection / labelled area per class; mIoU and mAcc are the
means over the classes where they are defined (a class absent from both predictions and labels has
union 0 and is left out), aAcc = all intersections / all labelled pixels. Percent.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from ...precision import autocast
from ..base import evaluation_progress

from .model import resize
from ...data.semseg import build_segmentation_dataset, collate_segmentation, fit_size
from ...weights.checkpoint import load_checkpoint
from .model import PIIPSegmenter

__all__ = ["SegmentationMetrics", "segment", "slide_windows", "area_counts", "metrics_from_areas",
           "evaluate_segmenter", "evaluate_checkpoint"]


def slide_windows(height: int, width: int, crop: int, stride: int) -> list[tuple[int, int, int, int]]:
    """MMSegmentation's ``slide_inference`` windows ``(y1, y2, x1, x2)``: a grid of ``crop`` windows
    every ``stride`` pixels, the last row/column shifted back inside the image (smaller images: one
    window, the image itself)."""
    rows = max(height - crop + stride - 1, 0) // stride + 1
    cols = max(width - crop + stride - 1, 0) // stride + 1
    windows = []
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * stride + crop, height), min(c * stride + crop, width)
            windows.append((max(y2 - crop, 0), y2, max(x2 - crop, 0), x2))
    return windows


@torch.no_grad()
def segment(model: nn.Module, image: torch.Tensor, *, mode: str | None = None, flip: bool = False) -> torch.Tensor:
    """Class probabilities ``(num_classes, H, W)`` of one 0-1 image ``(3, H, W)``.

    As MMSegmentation's test: the image is resized to the model's ``test_scale`` (when set), its
    logits computed by ``mode`` -- ``"whole"`` (one pass) or ``"slide"`` (windows of ``crop_size``
    every ``stride`` pixels, logits averaged where they overlap); default: the model's config --
    resized back to ``(H, W)`` and turned into probabilities. ``flip`` averages the probabilities of
    the image and its mirror.
    """

    cfg = model.config
    mode = mode or cfg.inference
    if mode not in ("whole", "slide"):
        raise ValueError(f"mode must be 'whole' or 'slide', got {mode!r}")
    height, width = image.shape[-2:]
    if cfg.test_scale is not None:
        size = fit_size(height, width, cfg.test_scale)
        if size != (height, width):
            image = resize(image[None], size)[0]
    views = [image, image.flip(-1)] if flip else [image]
    probs = 0
    for k, view in enumerate(views):
        x = view[None]
        if mode == "whole":
            logits = model(x)
        else:
            H, W = view.shape[-2:]
            logits = x.new_zeros((1, cfg.num_classes, H, W))
            count = x.new_zeros((1, 1, H, W))
            for y1, y2, x1, x2 in slide_windows(H, W, cfg.crop_size, cfg.stride):
                logits[..., y1:y2, x1:x2] += model(x[..., y1:y2, x1:x2]).float()
                count[..., y1:y2, x1:x2] += 1
            logits = logits / count
        p = resize(logits.float(), (height, width))[0].softmax(dim=0)
        probs = probs + (p.flip(-1) if k else p)
    return probs / len(views)


def area_counts(pred: torch.Tensor, label: torch.Tensor, num_classes: int, ignore_index: int = 255) -> torch.Tensor:
    """``(4, num_classes)`` int64: intersection, union, predicted and labelled area per class, over
    the pixels whose label is not ``ignore_index``."""
    keep = label != ignore_index
    pred, label = pred[keep].long(), label[keep].long()
    intersect = torch.bincount(pred[pred == label], minlength=num_classes)[:num_classes]
    area_pred = torch.bincount(pred, minlength=num_classes)[:num_classes]
    area_label = torch.bincount(label, minlength=num_classes)[:num_classes]
    return torch.stack([intersect, area_pred + area_label - intersect, area_pred, area_label])


@dataclass
class SegmentationMetrics:
    """mIoU, mAcc, aAcc (percent), per-class IoU/Acc (``None`` where undefined), images evaluated."""

    mIoU: float
    mAcc: float
    aAcc: float
    per_class_iou: list
    per_class_acc: list
    num_images: int
    classes: list | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def metrics_from_areas(areas: torch.Tensor, num_images: int, classes: Sequence[str] | None = None) -> SegmentationMetrics:
    areas = areas.double()
    intersect, union, _, area_label = areas
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = (intersect / union).numpy()
        acc = (intersect / area_label).numpy()
    total = float(area_label.sum())
    return SegmentationMetrics(
        mIoU=float(np.nanmean(iou) * 100) if np.isfinite(iou).any() else 0.0,
        mAcc=float(np.nanmean(acc) * 100) if np.isfinite(acc).any() else 0.0,
        aAcc=float(intersect.sum() / total * 100) if total else 0.0,
        per_class_iou=[None if np.isnan(v) else float(v * 100) for v in iou],
        per_class_acc=[None if np.isnan(v) else float(v * 100) for v in acc],
        num_images=num_images, classes=list(classes) if classes is not None else None)



@torch.no_grad()
def evaluate_segmenter(model: nn.Module, loader: Iterable, device: str | torch.device = "cpu",
                       amp_dtype: torch.dtype | None = None, *, mode: str | None = None, flip: bool = False,
                       gather: Callable[[list], list] | None = None, save_to: str | os.PathLike | None = None,
                       progress: bool = False) -> SegmentationMetrics:
    """mIoU / mAcc / aAcc of ``model`` over a loader of ``(image, label)`` batches (lists or tensors
    of 0-1 images and ``(H, W)`` labels; unlabelled pixels carry the dataset's ``ignore_index``, else
    the model's); ``gather`` sums every process's areas under DDP;
    ``save_to``: a folder for ``metrics.json``."""
    device = torch.device(device)
    cfg = model.config
    was_training = model.training
    model.eval()
    ignore_index = getattr(loader.dataset, "ignore_index", cfg.ignore_index)  # the labels' own convention
    areas = torch.zeros(4, cfg.num_classes, dtype=torch.long)
    images_seen = 0
    try:
        with evaluation_progress(progress, len(loader), "eval seg") as advance:
            for images, labels in loader:
                for image, label in zip(images, labels):
                    with autocast(device.type, amp_dtype):
                        probs = segment(model, image.to(device), mode=mode, flip=flip)
                    areas += area_counts(probs.argmax(0).cpu(), label.cpu(), cfg.num_classes, ignore_index)
                    images_seen += 1
                advance()
    finally:
        model.train(was_training)
    if gather is not None:
        shards = gather([(areas, images_seen)])
        areas, images_seen = sum(a for a, _ in shards), sum(n for _, n in shards)
    metrics = metrics_from_areas(areas, images_seen, cfg.class_names or getattr(loader.dataset, "classes", None))
    if save_to is not None:
        from ...weights.io import atomic_write

        os.makedirs(save_to, exist_ok=True)
        atomic_write(os.path.join(save_to, "metrics.json"), "w", lambda f: json.dump(metrics.to_dict(), f, indent=2))
    return metrics


def evaluate_checkpoint(checkpoint: str | os.PathLike, data, *, split: str = "val", batch_size: int | None = None,
                        workers: int = 0, device: str | torch.device = "cpu", amp_dtype: torch.dtype | None = None,
                        save_to: str | os.PathLike | None = None, progress: bool = False,
                        mode: str | None = None, flip: bool = False) -> SegmentationMetrics:
    """Load a segmenter checkpoint and score it on ``split`` of ``data`` (a
    :class:`~piip.data.semseg.SegmentationDataConfig`) with inference ``mode`` (``"whole"`` /
    ``"slide"``; default: the checkpoint's) and optional ``flip``; images are loaded ``batch_size``
    (default 1) at a time and segmented one by one."""
    from torch.utils.data import DataLoader

    model = load_checkpoint(checkpoint, device=device)
    if not isinstance(model, PIIPSegmenter):
        raise ValueError(f"checkpoint {os.fspath(checkpoint)!r} holds a {type(model).__name__}, not a segmenter; "
                         "`eval seg` needs a segmentation checkpoint (piip train seg)")
    dataset = build_segmentation_dataset(data, split)
    if len(dataset.classes) != model.config.num_classes:
        raise ValueError(f"class mismatch: the segmenter predicts {model.config.num_classes} classes, the dataset "
                         f"has {len(dataset.classes)}: evaluate on the data it was trained for")
    loader = DataLoader(dataset, batch_size=batch_size or 1, shuffle=False, num_workers=workers,
                        collate_fn=collate_segmentation)
    return evaluate_segmenter(model, loader, device, amp_dtype, mode=mode, flip=flip, save_to=save_to,
                              progress=progress)
