"""A detector's predictions for people: boxes, classes, scores and masks above a score threshold,
drawn on the image (``piip.predict``, ``piip predict``)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image
from torch import nn

from ..drawing import draw_detections

__all__ = ["predict", "save_prediction", "describe_prediction"]


def predict(model: nn.Module, images: Sequence[torch.Tensor], *, score_threshold: float, topk: int,
            class_names: Sequence[str] | None, device: torch.device) -> list[dict[str, Any]]:
    """Per image ``boxes`` (x1 y1 x2 y2 pixels), ``labels`` (1-based), ``classes``, ``scores`` and,
    for Mask R-CNN, ``masks`` (``(N, H, W)`` bool), above ``score_threshold``."""
    names = class_names or model.config.class_names
    out = []
    # one call for the batch: the detector runs images of one padded size together and gives each
    # the detections it gets alone (detect_in_size_groups)
    for det in model([image.to(device) for image in images]):
        keep = det["scores"] >= score_threshold
        labels = det["labels"][keep].cpu()
        record = {"boxes": det["boxes"][keep].cpu(), "labels": labels, "scores": det["scores"][keep].cpu(),
                  "classes": [names[i - 1] if names else str(int(i)) for i in labels.tolist()]}
        if "masks" in det:
            record["masks"] = (det["masks"][keep][:, 0] >= model.config.mask_thresh).cpu()
        out.append(record)
    return out


def save_prediction(model: nn.Module, image: torch.Tensor, prediction: dict[str, Any], out_dir: Path, stem: str,
                    class_names: Sequence[str] | None, *, draw: bool = True) -> tuple[dict[str, Any], list[str]]:
    """The record in plain numbers; with ``draw`` ``<stem>_pred.png``, the image with its detections."""
    pictures = []
    if draw:
        target = Path(out_dir) / f"{stem}_pred.png"
        Image.fromarray(draw_detections(image, prediction).permute(1, 2, 0).numpy()).save(target)
        pictures.append(str(target))
    record = {"boxes": [[round(v, 1) for v in b] for b in prediction["boxes"].tolist()],
              "classes": prediction["classes"], "labels": prediction["labels"].tolist(),
              "scores": [round(s, 4) for s in prediction["scores"].tolist()]}
    if "masks" in prediction:
        record["mask_pixels"] = prediction["masks"].flatten(1).sum(1).tolist()
    return record, pictures


def describe_prediction(record: dict[str, Any]) -> str:
    return ", ".join(f"{c} {s:.2f}" for c, s in zip(record["classes"], record["scores"])) or "nothing"
