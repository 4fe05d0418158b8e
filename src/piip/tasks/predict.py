"""Inference for people: ``predict(model, images)`` and the files ``piip predict`` writes.

Works for every kind of piip checkpoint: a detector gives boxes, class names, scores and masks; a
segmenter a label map; a classifier its top-5 classes. ``predict_files`` draws each image
(torchvision's drawing utilities: boxes with "class score" labels, masks and label maps as
translucent overlays with a legend), writes segmenters' label PNGs and one JSON of all predictions.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

__all__ = ["predict", "predict_files", "draw_detections", "overlay_segmentation", "legend_strip", "IMAGE_SUFFIXES"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def _load_image(item: Any) -> torch.Tensor:
    """A float (3, H, W) tensor in [0, 1] from a path, a PIL image or a tensor."""
    if isinstance(item, torch.Tensor):
        image = item.float()
        return image / 255 if item.dtype == torch.uint8 else image
    from PIL import Image
    import numpy as np

    if isinstance(item, (str, os.PathLike)):
        with Image.open(item) as img:
            item = img.convert("RGB")
    array = np.asarray(item.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255)


def _classifier_input(model: nn.Module, image: torch.Tensor) -> torch.Tensor:
    """Resize + centre-crop to the model's input size and normalise as piip's eval transforms."""
    import torch.nn.functional as F

    from ..data.classification import IMAGENET_MEAN, IMAGENET_STD

    size = model.config.input_size
    h, w = image.shape[-2:]
    scale = size / min(h, w)
    image = F.interpolate(image[None], size=(max(size, round(h * scale)), max(size, round(w * scale))),
                          mode="bicubic", align_corners=False, antialias=True)[0].clamp(0, 1)
    top, left = (image.shape[-2] - size) // 2, (image.shape[-1] - size) // 2
    image = image[:, top:top + size, left:left + size]
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    return (image - mean) / std


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
    from .detection.model import PIIPDetector
    from .segmentation.evaluation import segment
    from .segmentation.model import PIIPSegmenter

    device = torch.device(device)
    was_training = model.training
    model.eval().to(device)
    tensors = [_load_image(im) for im in images]
    out: list[dict[str, Any]] = []
    try:
        if isinstance(model, PIIPDetector):
            names = class_names or model.config.class_names
            for image in tensors:
                det = model([image.to(device)])[0]
                keep = det["scores"] >= score_threshold
                labels = det["labels"][keep].cpu()
                record = {"boxes": det["boxes"][keep].cpu(), "labels": labels, "scores": det["scores"][keep].cpu(),
                          "classes": [names[i - 1] if names else str(int(i)) for i in labels.tolist()]}
                if "masks" in det:
                    record["masks"] = (det["masks"][keep][:, 0] >= model.config.mask_thresh).cpu()
                out.append(record)
        elif isinstance(model, PIIPSegmenter):
            names = class_names or model.config.class_names
            for image in tensors:
                labels = segment(model, image.to(device)).argmax(0).cpu()
                counts = torch.bincount(labels.flatten(), minlength=model.config.num_classes)
                out.append({"labels": labels, "classes": {
                    (names[i] if names else str(i)): round(float(c) / labels.numel(), 4)
                    for i, c in enumerate(counts.tolist()) if c}})
        elif getattr(getattr(model, "config", None), "task", None) == "cls":
            batch = torch.stack([_classifier_input(model, im) for im in tensors]).to(device)
            probs = model(batch).float().softmax(dim=-1).cpu()
            k = min(topk, probs.shape[1])
            for p in probs:
                values, labels = p.topk(k)
                out.append({"top": [{"label": int(i), "class": class_names[i] if class_names else str(int(i)),
                                     "probability": float(v)} for v, i in zip(values, labels)]})
        else:
            raise ValueError(f"predict needs a detector or a classification model, got {type(model).__name__} "
                             f"(a dense backbone alone has no predictions to show)")
    finally:
        model.train(was_training)
    return out


def draw_detections(image: torch.Tensor, prediction: dict[str, Any]) -> torch.Tensor:
    """The image (float [0, 1] or uint8) with masks overlaid and boxes labelled "class score"."""
    from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

    canvas = (image * 255).round().to(torch.uint8) if image.dtype != torch.uint8 else image
    colors = [_COLORS[int(label) % len(_COLORS)] for label in prediction["labels"].tolist()]
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
    (class ``i``: ``_COLORS[i % 16]``); ``ignore_index`` pixels left as they are. uint8 (3, H, W)."""
    canvas = (image * 255).round().to(torch.uint8) if image.dtype != torch.uint8 else image.clone()
    palette = torch.tensor([_rgb(c) for c in _COLORS], dtype=torch.float32)
    keep = labels != ignore_index
    colours = palette[labels.clamp(min=0) % len(_COLORS)].permute(2, 0, 1)
    blended = (1 - alpha) * canvas.float() + alpha * colours
    return torch.where(keep[None], blended.round(), canvas.float()).to(torch.uint8)


def legend_strip(classes: Sequence[str], width: int, height: int = 24) -> torch.Tensor:
    """A white strip naming every class in its palette colour: uint8 (3, rows x ``height``, ``width``)."""
    from PIL import Image, ImageDraw

    entries = [(name, _rgb(_COLORS[i % len(_COLORS)])) for i, name in enumerate(classes)]
    per_row = max(1, width // 130)
    rows = -(-len(entries) // per_row)
    strip = Image.new("RGB", (width, rows * height), "white")
    draw = ImageDraw.Draw(strip)
    for k, (name, colour) in enumerate(entries):
        x, y = (k % per_row) * 130 + 4, (k // per_row) * height + 4
        draw.rectangle([x, y, x + 14, y + 14], fill=colour)
        draw.text((x + 20, y + 2), name, fill=(0, 0, 0))
    import numpy as np

    return torch.from_numpy(np.asarray(strip).copy()).permute(2, 0, 1)


#: a qualitative palette (distinct, readable on photos)
_COLORS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45",
           "#fabed4", "#469990", "#dcbeff", "#9a6324", "#800000", "#aaffc3", "#808000", "#000075"]


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
    """Run a checkpoint over image files/folders; write drawn images (detectors) and ``predictions.json``
    to ``out_dir``. Returns ``{"predictions": {file: ...}, "json": path, "images": [drawn files]}``."""
    from PIL import Image

    from ..weights.checkpoint import load_checkpoint, read_checkpoint

    files = _expand(inputs)
    meta = read_checkpoint(checkpoint)["metadata"]
    names = json.loads(meta["class_names"]) if "class_names" in meta else None
    model = load_checkpoint(checkpoint, device=device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records, drawn = {}, []
    for path in files:
        image = _load_image(path)
        (pred,) = predict(model, [image], score_threshold=score_threshold, class_names=names, device=device)
        if "top" not in pred and "boxes" not in pred:  # a segmenter: overlay + legend, and the label map
            target = out / f"{path.stem}_seg.png"
            overlay = overlay_segmentation(image, pred["labels"])
            names = list(getattr(model.config, "class_names", ()) or names or
                         [str(i) for i in range(model.config.num_classes)])
            Image.fromarray(torch.cat([overlay, legend_strip(names, overlay.shape[-1])], dim=1)
                            .permute(1, 2, 0).numpy()).save(target)
            Image.fromarray(pred["labels"].to(torch.uint8).numpy()).save(out / f"{path.stem}_labels.png")
            drawn.append(str(target))
            pred = {"classes": pred["classes"], "labels_png": str(out / f"{path.stem}_labels.png")}
        elif "boxes" in pred:
            target = out / f"{path.stem}_pred.png"
            Image.fromarray(draw_detections(image, pred).permute(1, 2, 0).numpy()).save(target)
            drawn.append(str(target))
            pred = {"boxes": [[round(v, 1) for v in b] for b in pred["boxes"].tolist()],
                    "classes": pred["classes"], "labels": pred["labels"].tolist(),
                    "scores": [round(s, 4) for s in pred["scores"].tolist()],
                    **({"mask_pixels": pred["masks"].flatten(1).sum(1).tolist()} if "masks" in pred else {})}
        records[str(path)] = pred
    from ..weights.io import atomic_write

    json_path = out / "predictions.json"
    atomic_write(json_path, "w", lambda f: json.dump(records, f, indent=1))
    return {"predictions": records, "json": str(json_path), "images": drawn}
