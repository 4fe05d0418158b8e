"""A classifier's predictions for people: the top classes of an image (``piip.predict``,
``piip predict``)."""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...data.classification import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["classifier_input", "predict", "save_prediction", "describe_prediction"]


def classifier_input(model: nn.Module, image: torch.Tensor) -> torch.Tensor:
    """Resize + centre-crop to the model's input size and normalise as piip's eval transforms."""
    size = model.config.input_size
    h, w = image.shape[-2:]
    scale = size / min(h, w)
    image = F.interpolate(image[None], size=(max(size, round(h * scale)), max(size, round(w * scale))),
                          mode="bicubic", align_corners=False, antialias=True)[0].clamp(0, 1)
    top, left = (image.shape[-2] - size) // 2, (image.shape[-1] - size) // 2
    image = image[:, top:top + size, left:left + size]
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    return (image - mean) / std


def predict(model: nn.Module, images: Sequence[torch.Tensor], *, score_threshold: float, topk: int,
            class_names: Sequence[str] | None, device: torch.device) -> list[dict[str, Any]]:
    """Per image ``top``: the ``topk`` classes as ``{"label", "class", "probability"}``."""
    batch = torch.stack([classifier_input(model, im) for im in images]).to(device)
    probs = model(batch).float().softmax(dim=-1).cpu()
    k = min(topk, probs.shape[1])
    out = []
    for p in probs:
        values, labels = p.topk(k)
        out.append({"top": [{"label": int(i), "class": class_names[i] if class_names else str(int(i)),
                             "probability": float(v)} for v, i in zip(values, labels)]})
    return out


def save_prediction(model: nn.Module, image: torch.Tensor, prediction: dict[str, Any], out_dir: Any, stem: str,
                    class_names: Sequence[str] | None, *, draw: bool = True) -> tuple[dict[str, Any], list[str]]:
    """Nothing to draw: the record is the top classes."""
    return prediction, []


def describe_prediction(record: dict[str, Any]) -> str:
    return ", ".join(f"{t['class']} {100 * t['probability']:.1f}%" for t in record["top"])
