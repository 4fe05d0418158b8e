"""COCO box and mask AP of a detector, with faster-coco-eval (the COCO evaluation protocol of
pycocotools, in C++).

Detections are written in the COCO results format (``image_id``, ``category_id`` in the dataset's
own ids, ``bbox`` as x, y, width, height, ``score``, and for masks a compressed-RLE
``segmentation`` of the mask binarised at ``>= threshold``), so the same file can be scored by any
COCO tool. Metrics are in percent: ``bbox_AP``, ``bbox_AP50``, ``bbox_AP75``, ``bbox_APs``,
``bbox_APm``, ``bbox_APl`` and the same for ``segm``.

Only the IoU types the ground truth has are scored: ``segm`` needs a detector with masks and
annotations with a ``segmentation``; with masks on only some annotations, ``segm`` is scored over
the images whose every annotation has one (``segm_num_images`` says how many).
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import os
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from ...data.coco import build_coco_dataset, collate_detection
from ...precision import autocast
from ...weights.checkpoint import load_checkpoint
from ..base import evaluation_progress
from .model import Detector

__all__ = ["METRIC_NAMES", "detections_to_coco", "coco_metrics", "evaluate_detector", "evaluate_checkpoint"]

#: COCOeval's ``stats[0:6]``
METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def detections_to_coco(output: dict[str, torch.Tensor], image_id: int, category_ids: Sequence[int],
                       mask_thresh: float = 0.5) -> list[dict[str, Any]]:
    """One image's torchvision detections (labels 1..K) as COCO result records."""
    from faster_coco_eval.core import mask as mask_util

    boxes = output["boxes"].detach().float().cpu()
    if not len(boxes):
        return []
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
    scores = output["scores"].detach().float().cpu().tolist()
    labels = output["labels"].detach().cpu().tolist()
    records = [{"image_id": int(image_id), "category_id": int(category_ids[label - 1]),
                "bbox": [round(v, 3) for v in box], "score": round(score, 5)}
               for box, score, label in zip(xywh, scores, labels)]
    if "masks" in output:
        binary = (output["masks"].detach()[:, 0] >= mask_thresh).cpu().numpy().astype(np.uint8)
        rles = mask_util.encode(np.asfortranarray(binary.transpose(1, 2, 0)))
        for record, rle in zip(records, rles):
            record["segmentation"] = {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}
    return records


def coco_metrics(ground_truth: dict, results: list[dict], iou_types: Sequence[str] = ("bbox", "segm"),
                 image_ids: Iterable[int] | dict[str, Iterable[int]] | None = None) -> dict[str, float]:
    """COCO AP (percent) of ``results`` against the ``ground_truth`` annotation dict, over
    ``image_ids`` (default: every image of the ground truth; a dict gives them per IoU type).

    Masks are scored as MMDetection scores them: without the detections' ``bbox``, so that a
    detection's area (which puts it in APs/APm/APl) is its mask's area, not its box's.
    """
    from faster_coco_eval import COCO, COCOeval_faster

    # the evaluator marks matches with annotation ids, 0 meaning "unmatched": a dataset whose ids
    # start at 0 would lose that annotation's matches, so the ground truth is numbered from 1 here
    annotations = [{**a, "id": i} for i, a in enumerate(ground_truth["annotations"], start=1)]
    gt = COCO({**ground_truth, "annotations": annotations}, use_deepcopy=True)  # it adds fields to what it gets
    metrics: dict[str, float] = {}
    for iou_type in iou_types:
        ids = image_ids.get(iou_type) if isinstance(image_ids, dict) else image_ids
        ids = sorted(int(i) for i in (ids if ids is not None else gt.getImgIds()))
        if iou_type == "segm":
            usable = [{k: v for k, v in r.items() if k != "bbox"} for r in results if "segmentation" in r]
        else:
            usable = list(results)
        if not usable or not ids:
            metrics.update({f"{iou_type}_{name}": 0.0 for name in METRIC_NAMES})
            continue
        evaluator = COCOeval_faster(gt, gt.loadRes(copy.deepcopy(usable)), iouType=iou_type)
        evaluator.params.imgIds = ids
        with contextlib.redirect_stdout(io.StringIO()):
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        metrics.update({f"{iou_type}_{name}": max(0.0, float(v)) * 100.0
                        for name, v in zip(METRIC_NAMES, evaluator.stats[:6])})
    return metrics


@torch.no_grad()
def evaluate_detector(model: nn.Module, loader: Iterable, device: str | torch.device = "cpu",
                      amp_dtype: torch.dtype | None = None, gather: Callable[[list], list] | None = None,
                      save_to: str | os.PathLike | None = None, progress: bool = False) -> dict[str, Any]:
    """Run ``model`` (any :class:`~piip.tasks.detection.Detector` kind) over a loader of a
    :class:`~piip.data.coco.CocoDetection` split and score it with COCO AP.

    ``gather`` combines every process's detections (the engine's all-gather under DDP);
    ``save_to`` is a folder for ``detections.json`` (COCO results format) and ``metrics.json``.
    Returns the metrics plus ``num_images`` and ``skipped`` (unreadable images left out).
    """
    device = torch.device(device)
    dataset = loader.dataset
    config = model.config
    category_ids = config.category_ids or dataset.category_ids
    was_training = model.training
    model.eval()
    results, seen = [], []
    try:
        with evaluation_progress(progress, len(loader), "eval det") as advance:
            for images, targets in loader:
                if not images:
                    continue
                with autocast(device.type, amp_dtype):
                    outputs = model([im.to(device) for im in images])
                for output, target in zip(outputs, targets):
                    results.extend(detections_to_coco(output, target["image_id"], category_ids, config.mask_thresh))
                    seen.append(int(target["image_id"]))
                advance()
    finally:
        model.train(was_training)
    if gather is not None:
        results, seen = gather(results), gather(seen)
    image_ids = {"bbox": seen}
    if config.masks and dataset.mask_annotations:  # masks are scored where the ground truth has them all
        image_ids["segm"] = sorted(set(seen) & set(dataset.mask_complete_ids))
    metrics: dict[str, Any] = coco_metrics(dataset.coco, results, tuple(image_ids), image_ids=image_ids)
    metrics.update(num_images=len(seen), skipped=len(dataset.ids) - len(seen))
    if "segm" in image_ids and len(image_ids["segm"]) < len(seen):
        metrics["segm_num_images"] = len(image_ids["segm"])
    if save_to is not None:
        os.makedirs(save_to, exist_ok=True)
        from ...weights.io import atomic_write

        atomic_write(os.path.join(save_to, "detections.json"), "w", lambda f: json.dump(results, f))
        atomic_write(os.path.join(save_to, "metrics.json"), "w", lambda f: json.dump(metrics, f, indent=2))
    return metrics



def evaluate_checkpoint(checkpoint: str | os.PathLike, data, *, split: str = "val", batch_size: int | None = None,
                        workers: int = 0, device: str | torch.device = "cpu", amp_dtype: torch.dtype | None = None,
                        save_to: str | os.PathLike | None = None, progress: bool = False) -> dict[str, Any]:
    """Load a detector checkpoint and score it on ``split`` of ``data`` (a
    :class:`~piip.data.coco.DetectionDataConfig`; ``batch_size`` defaults to 2)."""
    from torch.utils.data import DataLoader

    model = load_checkpoint(checkpoint, device=device)
    if not isinstance(model, Detector):
        raise ValueError(f"checkpoint {os.fspath(checkpoint)!r} holds a {type(model).__name__}, not a detector; "
                         "`eval det` needs a detection checkpoint (piip train det / piip convert of a Mask R-CNN file)")
    dataset = build_coco_dataset(data, split, masks=False)
    check_classes(model.config, dataset)
    loader = DataLoader(dataset, batch_size=batch_size or 2, shuffle=False, num_workers=workers,
                        collate_fn=collate_detection)
    return evaluate_detector(model, loader, device, amp_dtype, save_to=save_to, progress=progress)


def check_classes(config, dataset) -> None:
    """A detector must be scored on the classes it was trained for."""
    if config.num_classes != len(dataset.classes) or (
            config.category_ids and tuple(config.category_ids) != tuple(dataset.category_ids)):
        raise ValueError(
            f"class mismatch: the detector has {config.num_classes} classes"
            + (f" (category ids {list(config.category_ids)[:8]}...)" if config.category_ids else "")
            + f", the dataset {len(dataset.classes)} (ids {list(dataset.category_ids)[:8]}...): "
            "evaluate on the data it was trained for")
