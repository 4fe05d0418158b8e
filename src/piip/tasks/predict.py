"""Inference for people: ``predict(model, images)`` and the files ``piip predict`` writes.

Works for every kind of piip checkpoint, through the task that owns the model
(:func:`piip.engine.task.task_for_model`): a detector gives boxes, class names, scores and masks; a
segmenter a label map; a classifier its top-5 classes. ``predict_files`` lets the task draw each
image (boxes with "class score" labels, masks and label maps as translucent overlays with a legend)
and writes one JSON of all predictions.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ..engine.task import task_for_model
from ..weights.checkpoint import load_checkpoint, read_checkpoint
from ..weights.io import atomic_write
from .drawing import draw_detections, legend_strip, load_image, overlay_segmentation

__all__ = ["predict", "predict_files", "draw_detections", "overlay_segmentation",
           "legend_strip", "IMAGE_SUFFIXES"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


@torch.no_grad()
def predict(model: nn.Module, images: Sequence[Any], *, score_threshold: float = 0.5, topk: int = 5,
            class_names: Sequence[str] | None = None, device: str | torch.device = "cpu") -> list[dict[str, Any]]:
    """Predictions for ``images`` (paths, PIL images or float (3, H, W) tensors in [0, 1]).

    Detector: per image ``boxes`` (x1 y1 x2 y2 pixels), ``labels`` (1-based), ``classes``,
    ``scores`` and, for Mask R-CNN, ``masks`` (``(N, H, W)`` bool tensor), above
    ``score_threshold``. Segmenter: per image ``labels`` (``(H, W)`` int64 class map, the model's
    inference mode) and ``classes`` (the classes present with their share of the pixels).
    Classifier: per image ``top`` = the ``topk`` classes as ``{"label", "class", "probability"}``
    (names from ``class_names`` when given).
    """
    task = task_for_model(model)
    device = torch.device(device)
    was_training = model.training
    model.eval().to(device)
    try:
        return task.predict(model, [load_image(im) for im in images], score_threshold=score_threshold, topk=topk,
                            class_names=class_names, device=device)
    finally:
        model.train(was_training)


def _expand(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files.extend(sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES))
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"{str(path)!r} is neither an image file nor a folder")
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {[str(i) for i in inputs]}")
    return files


def predict_files(checkpoint: str | os.PathLike, inputs: Sequence[str | os.PathLike], out_dir: str | os.PathLike,
                  *, score_threshold: float = 0.5, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Run a checkpoint over image files/folders; write what its task draws and ``predictions.json``
    to ``out_dir``. Returns ``{"predictions": {file: ...}, "json": path, "images": [drawn files],
    "descriptions": {file: one line}}``."""
    files = _expand(inputs)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"the output folder {str(out)!r} is a file; name a folder for the drawn images and "
                         "predictions.json")
    meta = read_checkpoint(checkpoint, tensors=False)["metadata"]
    names = json.loads(meta["class_names"]) if "class_names" in meta else None
    model = load_checkpoint(checkpoint, device=device)
    task = task_for_model(model)
    out.mkdir(parents=True, exist_ok=True)
    records, drawn, lines = {}, [], {}
    for path in files:
        image = load_image(path)
        (pred,) = predict(model, [image], score_threshold=score_threshold, class_names=names, device=device)
        record, pictures = task.save_prediction(model, image, pred, out, path.stem, names)
        records[str(path)], lines[str(path)] = record, task.describe_prediction(record)
        drawn.extend(pictures)
    json_path = out / "predictions.json"
    atomic_write(json_path, "w", lambda f: json.dump(records, f, indent=1))
    return {"predictions": records, "json": str(json_path), "images": drawn, "descriptions": lines}
