"""Pictures of predictions, with torchvision's drawing utilities: boxes labelled "class score", masks
and label maps as translucent overlays, a legend strip; and reading an image for a model."""
from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

__all__ = ["load_image", "draw_detections", "overlay_segmentation", "legend_strip", "PALETTE"]


def load_image(item: Any) -> torch.Tensor:
    """A float (3, H, W) tensor in [0, 1] from a path, a PIL image or a tensor."""
    if isinstance(item, torch.Tensor):
        image = item.float()
        return image / 255 if item.dtype == torch.uint8 else image
    if isinstance(item, (str, os.PathLike)):
        with Image.open(item) as img:
            item = img.convert("RGB")
    array = np.asarray(item.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255)


def draw_detections(image: torch.Tensor, prediction: dict[str, Any]) -> torch.Tensor:
    """The image (float [0, 1] or uint8) with masks overlaid and boxes labelled "class score"."""
    from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

    canvas = (image * 255).round().to(torch.uint8) if image.dtype != torch.uint8 else image
    colors = [PALETTE[int(label) % len(PALETTE)] for label in prediction["labels"].tolist()]
    if prediction.get("masks") is not None and len(prediction["masks"]):
        canvas = draw_segmentation_masks(canvas, prediction["masks"], alpha=0.45, colors=colors)
    if len(prediction["boxes"]):
        labels = [f"{c} {s:.2f}" for c, s in zip(prediction["classes"], prediction["scores"].tolist())]
        canvas = draw_bounding_boxes(canvas, prediction["boxes"], labels=labels, colors=colors, width=2)
    return canvas


def _rgb(colour: str) -> tuple[int, int, int]:
    return tuple(int(colour[i:i + 2], 16) for i in (1, 3, 5))


def overlay_segmentation(image: torch.Tensor, labels: torch.Tensor, alpha: float = 0.5,
                         ignore_index: int = 255) -> torch.Tensor:
    """The image (float [0, 1] or uint8) with each class's pixels tinted in its palette colour
    (class ``i``: ``PALETTE[i % 16]``); ``ignore_index`` pixels left as they are. uint8 (3, H, W)."""
    canvas = (image * 255).round().to(torch.uint8) if image.dtype != torch.uint8 else image.clone()
    palette = torch.tensor([_rgb(c) for c in PALETTE], dtype=torch.float32)
    keep = labels != ignore_index
    colours = palette[labels.clamp(min=0) % len(PALETTE)].permute(2, 0, 1)
    blended = (1 - alpha) * canvas.float() + alpha * colours
    return torch.where(keep[None], blended.round(), canvas.float()).to(torch.uint8)


def legend_strip(classes: Sequence[str], width: int, height: int = 24) -> torch.Tensor:
    """A white strip naming every class in its palette colour: uint8 (3, rows x ``height``, ``width``)."""
    entries = [(name, _rgb(PALETTE[i % len(PALETTE)])) for i, name in enumerate(classes)]
    per_row = max(1, width // 130)
    rows = -(-len(entries) // per_row)
    strip = Image.new("RGB", (width, rows * height), "white")
    draw = ImageDraw.Draw(strip)
    for k, (name, colour) in enumerate(entries):
        x, y = (k % per_row) * 130 + 4, (k // per_row) * height + 4
        draw.rectangle([x, y, x + 14, y + 14], fill=colour)
        draw.text((x + 20, y + 2), name, fill=(0, 0, 0))
    return torch.from_numpy(np.asarray(strip).copy()).permute(2, 0, 1)


#: a qualitative palette (distinct, readable on photos)
PALETTE = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45",
           "#fabed4", "#469990", "#dcbeff", "#9a6324", "#800000", "#aaffc3", "#808000", "#000075"]
