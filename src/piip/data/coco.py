"""COCO-format detection and instance-segmentation data.

A dataset is an annotation JSON (``images``, ``annotations``, ``categories``, the COCO format) and an
image folder: either a root laid out as COCO 2017 (``annotations/instances_<split>.json`` and
``<split>/``) or an explicit annotation file and image folder.

What a sample is: ``(image, target)`` with the image a float32 ``(3, H, W)`` tensor in [0, 1] and
the target torchvision's detection dict: ``boxes`` (``(N, 4)`` float32, x1 y1 x2 y2 pixels),
``labels`` (``(N,)`` int64, 1..K: the categories sorted by id and numbered from 1, 0 being
torchvision's background), ``masks`` (``(N, H, W)`` uint8; polygons, compressed and uncompressed
RLE are all decoded) with ``has_mask`` (``(N,)`` bool: an object without a ``segmentation`` has an
empty mask, and the detector learns no mask from it), ``image_id`` (the file's id), ``iscrowd``
and ``area``.

Box-only data (no annotation has a ``segmentation``) is what most detection sets are: the reader
counts the annotations with masks (``mask_annotations``), and the detection task trains a box-only
detector on data without any.

Training skips crowd objects (left to the COCO evaluator, which ignores detections on them), images
without objects and degenerate boxes (dropped with one counted warning); evaluation keeps every
image. Unreadable images never stop an epoch: training uses the next readable one, evaluation drops
the image (and the evaluator leaves it out), and both count them.
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from .multiscale import MultiScaleCrop
from .unreadable import DECODE_ERRORS, SkipsUnreadable

__all__ = ["COCO_CATEGORIES", "DetectionDataConfig", "CocoDetection", "coco_paths", "build_coco_dataset", "RandomHorizontalFlip", "LargeScaleJitter",
           "collate_detection"]

#: COCO 2017's 80 object categories: (id, name), in id order (the order of the models' labels)
COCO_CATEGORIES: tuple[tuple[int, str], ...] = tuple(enumerate((
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", None, "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", None, "backpack", "umbrella", None, None, "handbag", "tie",
    "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove",
    "skateboard", "surfboard", "tennis racket", "bottle", None, "wine glass", "cup", "fork", "knife", "spoon",
    "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake",
    "chair", "couch", "potted plant", "bed", None, "dining table", None, None, "toilet", None, "tv", "laptop",
    "mouse", "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", None,
    "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush"), start=1))
COCO_CATEGORIES = tuple((i, n) for i, n in COCO_CATEGORIES if n is not None)


@dataclass
class DetectionDataConfig:
    """How to read a COCO-format dataset (JSON-serialisable; the ``data`` section of a detection run).

    Attributes:
        dataset: the format, ``"coco"``.
        root: a COCO-2017-style root: ``annotations/instances_<split>.json`` and ``<split>/``.
        train_split, val_split: the split names under ``root`` (COCO 2017's by default).
        train_ann, train_images, val_ann, val_images: an explicit annotation file and image folder
            per split (instead of, or overriding, the ``root`` layout).
        flip_prob: horizontal-flip probability in training (the authors': 0.5).
        large_scale_jitter: ``[low, high]`` to train with large-scale jitter (``[0.1, 2.0]``: ViTDet's):
            each training image is rescaled so that its longer side is a random ``low..high`` times
            the model's input size, then cropped or padded to that square size, and the detector
            stops resizing training images itself; ``None`` (default): the authors' single-scale
            resize by the detector.
        multi_scale: train with the authors' multi-scale augmentation (their ``_ms`` configs and
            the paper's "3x + MS" schedule; :class:`~piip.data.multiscale.MultiScaleCrop`): after
            the flip, a keep-ratio resize to one of 11 scales, or resize-crop-resize, then a random
            crop of at most S x S, S the model's input size and every scale ``S / 1024`` times
            MMDetection's (480..800, 1333); the detector stops resizing training images itself and,
            unless ``model.head`` sets ``min_size``/``max_size``, tests at the authors'
            ``(int(800 r), int(1333 r))``.
        limit: use only the first ``limit`` images of each split (quick runs).
    """

    dataset: str = "coco"
    root: str | None = None
    train_split: str = "train2017"
    val_split: str = "val2017"
    train_ann: str | None = None
    train_images: str | None = None
    val_ann: str | None = None
    val_images: str | None = None
    flip_prob: float = 0.5
    large_scale_jitter: list[float] | None = None
    multi_scale: bool = False
    limit: int | None = None

    def __post_init__(self) -> None:
        if self.dataset != "coco":
            raise ValueError(f"data.dataset must be 'coco' for detection, got {self.dataset!r}")
        if not 0 <= self.flip_prob <= 1:
            raise ValueError(f"data.flip_prob must be in [0, 1], got {self.flip_prob}")
        if self.limit is not None and int(self.limit) < 1:
            raise ValueError(f"data.limit must be positive or None, got {self.limit}")
        jitter = self.large_scale_jitter
        if jitter is not None and not (len(jitter) == 2 and 0 < float(jitter[0]) <= float(jitter[1])):
            raise ValueError(f"data.large_scale_jitter must be [low, high] with 0 < low <= high, got {jitter!r}")
        if not isinstance(self.multi_scale, bool):
            raise ValueError(f"data.multi_scale must be true or false, got {self.multi_scale!r}")
        if self.multi_scale and jitter is not None:
            raise ValueError("data.multi_scale and data.large_scale_jitter are two training augmentations: choose one")

    @property
    def sizes_training_images(self) -> bool:
        """Whether the data pipeline, not the detector, sizes the training images."""
        return self.multi_scale or self.large_scale_jitter is not None


def coco_paths(cfg: DetectionDataConfig, split: str) -> tuple[str, str]:
    """``(annotation file, image folder)`` of ``split`` (``"train"`` or ``"val"``)."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    ann, images = getattr(cfg, f"{split}_ann"), getattr(cfg, f"{split}_images")
    name = getattr(cfg, f"{split}_split")
    if ann is None or images is None:
        if cfg.root is None:
            raise ValueError(f"no {split} data: set data.root (a folder with annotations/instances_{name}.json "
                             f"and {name}/) or data.{split}_ann and data.{split}_images")
        ann = ann or os.path.join(cfg.root, "annotations", f"instances_{name}.json")
        images = images or os.path.join(cfg.root, name)
    return os.fspath(ann), os.fspath(images)


def _fail(path: str, message: str) -> None:
    raise ValueError(f"{path}: {message}")


def _check_json(data: Any, path: str) -> None:
    """The fields the reader relies on, each checked with the field's name in the error."""
    if not isinstance(data, dict):
        _fail(path, f"expected a JSON object with images/annotations/categories, got {type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if key not in data:
            _fail(path, f"missing the {key!r} field (a COCO annotation file has images, annotations, categories)")
        if not isinstance(data[key], list):
            _fail(path, f"{key!r} must be a list, got {type(data[key]).__name__}")
    for i, cat in enumerate(data["categories"]):
        if not isinstance(cat, dict) or not isinstance(cat.get("id"), int) or "name" not in cat:
            _fail(path, f"categories[{i}] needs an int 'id' and a 'name', got {cat!r}")
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict) or not isinstance(img.get("id"), int) or not isinstance(img.get("file_name"), str):
            _fail(path, f"images[{i}] needs an int 'id' and a 'file_name', got {img!r}")
        for key in ("width", "height"):
            if not isinstance(img.get(key), int) or img[key] < 1:
                _fail(path, f"images[{i}] ({img.get('file_name')}) needs a positive int {key!r}, got {img.get(key)!r}")
    image_ids = {img["id"] for img in data["images"]}
    cat_ids = {cat["id"] for cat in data["categories"]}
    for i, ann in enumerate(data["annotations"]):
        where = f"annotations[{i}] (id {ann.get('id') if isinstance(ann, dict) else '?'})"
        if not isinstance(ann, dict):
            _fail(path, f"{where} must be an object")
        if ann.get("image_id") not in image_ids:
            _fail(path, f"{where}: image_id {ann.get('image_id')!r} is not in 'images'")
        if ann.get("category_id") not in cat_ids:
            _fail(path, f"{where}: category_id {ann.get('category_id')!r} is not in 'categories'")
        box = ann.get("bbox")
        if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
            _fail(path, f"{where}: 'bbox' must be [x, y, width, height], got {box!r}")
        seg = ann.get("segmentation")
        if seg is not None and not (isinstance(seg, list) and all(isinstance(p, list) for p in seg)) and not (
                isinstance(seg, dict) and "counts" in seg and "size" in seg):
            _fail(path, f"{where}: 'segmentation' must be a list of polygons or an RLE "
                        f"{{'counts', 'size'}}, got {type(seg).__name__}")


def load_coco_json(path: str | os.PathLike) -> dict:
    """Read and check a COCO annotation file (clear errors for a missing or malformed file)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"annotation file {path!r} does not exist")
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    _check_json(data, path)
    return data


def has_segmentation(annotation: dict) -> bool:
    """Whether an annotation has an instance mask: an RLE, or at least one polygon of three points."""
    segmentation = annotation.get("segmentation")
    if isinstance(segmentation, dict):
        return True
    return isinstance(segmentation, list) and any(len(p) >= 6 for p in segmentation)


def decode_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    """A ``(H, W)`` uint8 mask from polygons, compressed RLE or uncompressed RLE."""
    from faster_coco_eval.core import mask as mask_util

    if isinstance(segmentation, list):  # polygons
        polygons = [p for p in segmentation if len(p) >= 6]
        if not polygons:
            return np.zeros((height, width), dtype=np.uint8)
        rle = mask_util.merge(mask_util.frPyObjects(polygons, height, width))
    elif isinstance(segmentation["counts"], list):  # uncompressed RLE
        rle = mask_util.frPyObjects(segmentation, height, width)
    else:  # compressed RLE
        rle = dict(segmentation)
        if isinstance(rle["counts"], str):
            rle["counts"] = rle["counts"].encode("ascii")
    return np.ascontiguousarray(mask_util.decode(rle), dtype=np.uint8)


class CocoDetection(SkipsUnreadable, Dataset):
    """One split of a COCO-format dataset (see the module docstring for what a sample is).

    Args:
        ann_file, image_dir: the annotation JSON and the image folder.
        train: training mode (skip crowd objects, images without objects and degenerate boxes).
        masks: decode instance masks (Mask R-CNN; objects without one get an empty mask and
            ``has_mask`` false); ``False`` for box-only detectors.
        transform: ``(image, target) -> (image, target)`` applied to each sample.
        limit: the first ``limit`` images only.

    Attributes: ``classes`` (names, label ``i`` = ``classes[i - 1]``), ``category_ids`` (the file's
    id of every label), ``coco`` (the checked JSON, for the evaluator), ``ids`` (image ids in
    order), ``num_annotations`` and ``mask_annotations`` (those with a segmentation) of these
    images, ``mask_complete_ids`` (images whose every annotation has a mask), ``skipped`` /
    ``bad_files`` (unreadable images), ``dropped_boxes``.
    """

    def __init__(self, ann_file: str | os.PathLike, image_dir: str | os.PathLike, *, train: bool,
                 masks: bool = True, transform: Callable | None = None, limit: int | None = None):
        self.ann_file, self.image_dir = os.fspath(ann_file), os.fspath(image_dir)
        self.coco = load_coco_json(self.ann_file)
        if not os.path.isdir(self.image_dir):
            raise FileNotFoundError(f"image folder {self.image_dir!r} does not exist")
        self.train, self.masks, self.transform = train, masks, transform
        categories = sorted(self.coco["categories"], key=lambda c: c["id"])
        self.category_ids = tuple(c["id"] for c in categories)
        self.classes = tuple(str(c["name"]) for c in categories)
        self._label = {cid: i + 1 for i, cid in enumerate(self.category_ids)}
        by_image: dict[int, list[dict]] = {img["id"]: [] for img in self.coco["images"]}
        for ann in self.coco["annotations"]:
            by_image[ann["image_id"]].append(ann)
        images = sorted(self.coco["images"], key=lambda im: im["id"])
        missing = [im["file_name"] for im in images if not os.path.isfile(os.path.join(self.image_dir, im["file_name"]))]
        if missing:
            raise FileNotFoundError(f"{len(missing)} of {len(images)} images listed in {self.ann_file} are missing "
                                    f"from {self.image_dir}: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        self.dropped_boxes = 0
        self.records = []
        for im in images:
            anns = [self._clean(a, im) for a in by_image[im["id"]]]
            anns = [a for a in anns if a is not None]
            if train:
                anns = [a for a in anns if not a.get("iscrowd", 0)]
                if not anns:
                    continue
            self.records.append((im, anns))
        if self.dropped_boxes:
            warnings.warn(f"{self.ann_file}: dropped {self.dropped_boxes} degenerate boxes (zero width or "
                          "height inside the image)", RuntimeWarning, stacklevel=2)
        if limit is not None:
            self.records = self.records[:limit]
        if not self.records:
            raise ValueError(f"{self.ann_file}: no images to {'train on (none has a non-crowd object)' if train else 'evaluate'}")
        self.ids = [im["id"] for im, _ in self.records]
        self.num_annotations = sum(len(anns) for _, anns in self.records)
        self.mask_annotations = sum(has_segmentation(a) for _, anns in self.records for a in anns)
        self.mask_complete_ids = [im["id"] for im, anns in self.records if all(map(has_segmentation, anns))]
        self.bad_files: list[str] = []

    def _clean(self, ann: dict, image: dict) -> dict | None:
        """The annotation with its box clipped to the image; ``None`` (counted) when degenerate."""
        x, y, w, h = ann["bbox"]
        x1, y1 = max(0.0, x), max(0.0, y)
        x2, y2 = min(float(image["width"]), x + w), min(float(image["height"]), y + h)
        if x2 <= x1 or y2 <= y1:
            self.dropped_boxes += 1
            return None
        return {**ann, "bbox_xyxy": (x1, y1, x2, y2)}

    def __len__(self) -> int:
        return len(self.records)

    def aspect_groups(self) -> list[int]:
        """1 for landscape (width >= height), 0 for portrait: read from the JSON, no image loaded."""
        return [int(im["width"] >= im["height"]) for im, _ in self.records]

    def _read(self, index: int) -> torch.Tensor:
        from PIL import Image

        image, _ = self.records[index]
        path = os.path.join(self.image_dir, image["file_name"])
        with Image.open(path) as img:
            array = np.asarray(img.convert("RGB"))
        if array.shape[:2] != (image["height"], image["width"]):
            raise ValueError(f"{path} is {array.shape[1]}x{array.shape[0]} but the annotations say "
                             f"{image['width']}x{image['height']}")
        return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255)

    def target(self, index: int) -> dict[str, torch.Tensor]:
        image, anns = self.records[index]
        boxes = torch.tensor([a["bbox_xyxy"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        target = {
            "boxes": boxes,
            "labels": torch.tensor([self._label[a["category_id"]] for a in anns], dtype=torch.int64),
            "image_id": int(image["id"]),
            "iscrowd": torch.tensor([int(a.get("iscrowd", 0)) for a in anns], dtype=torch.int64),
            "area": torch.tensor([float(a.get("area", 0.0)) for a in anns], dtype=torch.float32),
        }
        if self.masks:
            h, w = image["height"], image["width"]
            present = [has_segmentation(a) for a in anns]
            masks = [decode_mask(a["segmentation"], h, w) if p else np.zeros((h, w), dtype=np.uint8)
                     for a, p in zip(anns, present)]
            target["masks"] = torch.from_numpy(np.stack(masks)) if masks else torch.zeros((0, h, w), dtype=torch.uint8)
            target["has_mask"] = torch.tensor(present, dtype=torch.bool)
        return target

    def __getitem__(self, index: int):
        n = len(self.records)
        for attempt in range(n if self.train else 1):
            i = (index + attempt) % n
            try:
                image = self._read(i)
            except DECODE_ERRORS as err:
                self.note_unreadable(os.path.join(self.image_dir, self.records[i][0]["file_name"]), err)
                continue
            target = self.target(i)
            if self.transform is not None:
                image, target = self.transform(image, target)
            return image, target
        if self.train:
            raise RuntimeError(f"no readable image in {self.image_dir!r}: all {n} files failed to decode")
        return None  # evaluation: this image is left out (the collate drops it, the evaluator too)

    def __repr__(self) -> str:
        return (f"CocoDetection({self.ann_file!r}, images={len(self)}, classes={len(self.classes)}, "
                f"train={self.train}, skipped={self.skipped})")


class RandomHorizontalFlip:
    """Flip image, boxes and masks left-right with probability ``p`` (torch's global RNG, which the
    engine seeds per process and per DataLoader worker)."""

    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, image: torch.Tensor, target: dict) -> tuple[torch.Tensor, dict]:
        if self.p <= 0 or torch.rand(()) >= self.p:
            return image, target
        width = image.shape[-1]
        target = dict(target)
        boxes = target["boxes"].clone()
        boxes[:, [0, 2]] = width - target["boxes"][:, [2, 0]]
        target["boxes"] = boxes
        if "masks" in target:
            target["masks"] = target["masks"].flip(-1)
        return image.flip(-1), target


class LargeScaleJitter:
    """Rescale by a random factor so the longer side is ``low..high`` x ``size``, then crop (or pad
    with zeros) to ``size x size``; boxes follow, masks too, and objects cropped away are dropped
    with their labels, masks and ``has_mask`` flags (torchvision's ``transforms.v2``
    ``ScaleJitter``, ``RandomCrop``, ``SanitizeBoundingBoxes``)."""

    #: per-object fields besides boxes and masks that follow the kept objects
    PER_OBJECT = ("labels", "has_mask")

    def __init__(self, size: int, scale_range: tuple[float, float] = (0.1, 2.0)):
        from torchvision.transforms import v2

        def per_object(inputs):
            fields = inputs[-1]
            return tuple(fields[k] for k in self.PER_OBJECT if k in fields)

        self.transform = v2.Compose([v2.ScaleJitter((size, size), scale_range=tuple(scale_range)),
                                     v2.RandomCrop((size, size), pad_if_needed=True),
                                     v2.SanitizeBoundingBoxes(labels_getter=per_object)])

    def __call__(self, image: torch.Tensor, target: dict) -> tuple[torch.Tensor, dict]:
        from torchvision import tv_tensors

        fields = {"boxes": tv_tensors.BoundingBoxes(target["boxes"], format="XYXY", canvas_size=image.shape[-2:]),
                  **{k: target[k] for k in self.PER_OBJECT if k in target}}
        if "masks" in target:
            fields["masks"] = tv_tensors.Mask(target["masks"])
        image, fields = self.transform(tv_tensors.Image(image), fields)
        out = {k: v.as_subclass(torch.Tensor) for k, v in fields.items()}
        out["image_id"] = target["image_id"]
        return image.as_subclass(torch.Tensor), out


class _Compose:
    def __init__(self, *transforms: Callable):
        self.transforms = transforms

    def __call__(self, image, target):
        for transform in self.transforms:
            image, target = transform(image, target)
        return image, target


def build_coco_dataset(cfg: DetectionDataConfig, split: str, *, masks: bool = True,
                       input_size: int | None = None) -> CocoDetection:
    """The ``split`` (``"train"``/``"val"``) of ``cfg``; training adds the flip and then, with
    ``cfg.large_scale_jitter`` or ``cfg.multi_scale``, the augmentation that sizes the images for
    ``input_size`` (the model's)."""
    ann, images = coco_paths(cfg, split)
    train = split == "train"
    steps: list[Callable] = []
    if train and cfg.flip_prob > 0:
        steps.append(RandomHorizontalFlip(cfg.flip_prob))
    if train and cfg.sizes_training_images:
        if input_size is None:
            raise ValueError("large-scale jitter and multi-scale training need the model's input size")
        if cfg.multi_scale:
            steps.append(MultiScaleCrop(input_size))
        else:
            steps.append(LargeScaleJitter(input_size, tuple(cfg.large_scale_jitter)))
    return CocoDetection(ann, images, train=train, masks=masks, limit=cfg.limit,
                         transform=_Compose(*steps) if steps else None)


def collate_detection(batch: list) -> tuple[list[torch.Tensor], list[dict]]:
    """Lists of images and targets (torchvision's detectors take lists); unreadable evaluation
    images (``None``) are left out."""
    batch = [item for item in batch if item is not None]
    return [image for image, _ in batch], [target for _, target in batch]
