"""A segmenter's predictions for people: the label map and each class's share of the pixels, drawn
as an overlay with a legend (``piip.predict``, ``piip predict``)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..drawing import legend_strip, overlay_segmentation
from .evaluation import segment

__all__ = ["predict", "save_prediction", "describe_prediction"]


def predict(model: nn.Module, images: Sequence[torch.Tensor], *, score_threshold: float, topk: int,
            class_names: Sequence[str] | None, device: torch.device) -> list[dict[str, Any]]:
    """Per image ``labels`` (``(H, W)`` int64 class map, the model's inference mode) and ``classes``
    (the classes present with their share of the pixels)."""
    names = class_names or model.config.class_names
    out = []
    for image in images:
        labels = segment(model, image.to(device)).argmax(0).cpu()
        counts = torch.bincount(labels.flatten(), minlength=model.config.num_classes)
        out.append({"labels": labels, "classes": {
            (names[i] if names else str(i)): round(float(c) / labels.numel(), 4)
            for i, c in enumerate(counts.tolist()) if c}})
    return out


def save_prediction(model: nn.Module, image: torch.Tensor, prediction: dict[str, Any], out_dir: Path, stem: str,
                    class_names: Sequence[str] | None, *, draw: bool = True) -> tuple[dict[str, Any], list[str]]:
    """``<stem>_labels.png`` (the label map: the prediction itself; 8-bit, 16-bit beyond 256 classes)
    and, with ``draw``, ``<stem>_seg.png`` (overlay + legend)."""
    out_dir = Path(out_dir)
    labels_png = out_dir / f"{stem}_labels.png"
    labels = prediction["labels"].numpy()
    Image.fromarray(labels.astype(np.uint8 if model.config.num_classes <= 256 else np.uint16)).save(labels_png)
    pictures = []
    if draw:
        target = out_dir / f"{stem}_seg.png"
        overlay = overlay_segmentation(image, prediction["labels"])
        names = list(model.config.class_names or class_names or [str(i) for i in range(model.config.num_classes)])
        Image.fromarray(torch.cat([overlay, legend_strip(names, overlay.shape[-1])], dim=1)
                        .permute(1, 2, 0).numpy()).save(target)
        pictures.append(str(target))
    return {"classes": prediction["classes"], "labels_png": str(labels_png)}, pictures


def describe_prediction(record: dict[str, Any]) -> str:
    return ", ".join(f"{c} {100 * share:.1f}%" for c, share in
                     sorted(record["classes"].items(), key=lambda item: -item[1]))
