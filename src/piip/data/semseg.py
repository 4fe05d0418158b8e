"""Semantic-segmentation data: the ADE20K layout and a generic image + mask folder layout.

ADE20K (``ADEChallengeData2016``): ``images/{training,validation}/*.jpg`` and
``annotations/{training,validation}/*.png``; label 0 ("other") becomes the ignore index and the 150
classes shift down to 0..149 (``reduce_zero_label``); class names from ``objectInfo150.txt`` when the
root has it, ``classes.txt`` (one per line) for other datasets in this layout, else ADE20K's own.
Generic: ``data.train_images``/``data.train_masks`` (and ``val_*``) folders whose files pair up by
name, the class names in ``data.classes`` (or a text file, one per line), labels 0..K-1 and
``data.ignore_index`` for unlabelled pixels.

Training follows the authors' (MMSegmentation's ADE20K) pipeline: a random resize with ratio
``0.5..2.0`` of ``scale`` (2048, 512) keeping the aspect ratio, a random ``crop_size`` crop in which
no class covers more than ``cat_max_ratio`` (75%) of the labelled pixels (ten tries), a horizontal
flip, photometric distortion (brightness +-32 of 255, contrast 0.5-1.5, saturation 0.5-1.5, hue +-18
on OpenCV's 0-180 scale; torchvision's saturation blends with the grey image where MMSegmentation
scales the HSV saturation) and padding to the crop size with the mean colour (0 after normalisation) and the
ignore index. A sample is a float32 ``(3, H, W)`` image in [0, 1] and an int64 ``(H, W)`` label map.
Missing pairs, masks whose size differs from their image and label values beyond the classes are
clear errors naming the files and values.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .unreadable import DECODE_ERRORS, SkipsUnreadable

__all__ = ["ADE20K_CLASSES", "DataError", "SegmentationDataConfig", "SegmentationFolder", "SegmentationTrainTransform",
           "segmentation_paths", "fit_size", "build_segmentation_dataset", "collate_segmentation", "IMAGE_SUFFIXES"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
_IMAGENET_MEAN = (0.485, 0.456, 0.406)

#: ADE20K's 150 classes in label order (MMSegmentation's ``ADE20KDataset.CLASSES``; the first
#: name of each row of the dataset's ``objectInfo150.txt``)
ADE20K_CLASSES = (
    'wall', 'building', 'sky', 'floor', 'tree', 'ceiling', 'road', 'bed', 'windowpane', 'grass', 'cabinet',
    'sidewalk', 'person', 'earth', 'door', 'table', 'mountain', 'plant', 'curtain', 'chair', 'car', 'water',
    'painting', 'sofa', 'shelf', 'house', 'sea', 'mirror', 'rug', 'field', 'armchair', 'seat', 'fence',
    'desk', 'rock', 'wardrobe', 'lamp', 'bathtub', 'railing', 'cushion', 'base', 'box', 'column', 'signboard',
    'chest of drawers', 'counter', 'sand', 'sink', 'skyscraper', 'fireplace', 'refrigerator', 'grandstand',
    'path', 'stairs', 'runway', 'case', 'pool table', 'pillow', 'screen door', 'stairway', 'river', 'bridge',
    'bookcase', 'blind', 'coffee table', 'toilet', 'flower', 'book', 'hill', 'bench', 'countertop', 'stove',
    'palm', 'kitchen island', 'computer', 'swivel chair', 'boat', 'bar', 'arcade machine', 'hovel', 'bus',
    'towel', 'light', 'truck', 'tower', 'chandelier', 'awning', 'streetlight', 'booth', 'television receiver',
    'airplane', 'dirt track', 'apparel', 'pole', 'land', 'bannister', 'escalator', 'ottoman', 'bottle',
    'buffet', 'poster', 'stage', 'van', 'ship', 'fountain', 'conveyer belt', 'canopy', 'washer', 'plaything',
    'swimming pool', 'stool', 'barrel', 'basket', 'waterfall', 'tent', 'bag', 'minibike', 'cradle', 'oven',
    'ball', 'food', 'step', 'tank', 'trade name', 'microwave', 'pot', 'animal', 'bicycle', 'lake',
    'dishwasher', 'screen', 'blanket', 'sculpture', 'hood', 'sconce', 'vase', 'traffic light', 'tray',
    'ashcan', 'fan', 'pier', 'crt screen', 'plate', 'monitor', 'bulletin board', 'shower', 'radiator',
    'glass', 'clock', 'flag'
)


class DataError(ValueError):
    """The data itself is wrong (a mask of the wrong size, labels beyond the classes): never skipped."""


@dataclass
class SegmentationDataConfig:
    """How to read and augment a segmentation dataset (the ``data`` section of a ``seg`` run).

    Attributes:
        dataset: ``"ade20k"`` (the ADEChallengeData2016 layout under ``root``) or ``"folder"``.
        root: the ADE20K root (``images/``, ``annotations/``).
        train_split, val_split: ADE20K's split folder names.
        train_images, train_masks, val_images, val_masks: the generic layout's folders.
        classes: class names (generic layout), or the path of a text file with one per line.
        ignore_index: label of pixels without a class (255).
        reduce_zero_label: ``None``: True for ADE20K (label 0 = "other" -> ignore, the rest -1),
            False for the generic layout.
        crop_size, scale, ratio_range, cat_max_ratio, flip_prob, photometric: the training pipeline.
        mean: padding colour of 0-1 images (the normalisation mean: 0 once normalised).
        limit: the first ``limit`` pairs of each split only.
    """

    dataset: str = "ade20k"
    root: str | None = None
    train_split: str = "training"
    val_split: str = "validation"
    train_images: str | None = None
    train_masks: str | None = None
    val_images: str | None = None
    val_masks: str | None = None
    classes: list | str | None = None
    ignore_index: int = 255
    reduce_zero_label: bool | None = None
    crop_size: int = 512
    scale: list[int] = field(default_factory=lambda: [2048, 512])
    ratio_range: list[float] = field(default_factory=lambda: [0.5, 2.0])
    cat_max_ratio: float = 0.75
    flip_prob: float = 0.5
    photometric: bool = True
    mean: list = field(default_factory=lambda: list(_IMAGENET_MEAN))
    limit: int | None = None

    def __post_init__(self) -> None:
        if self.dataset not in ("ade20k", "folder"):
            raise ValueError(f"data.dataset must be 'ade20k' or 'folder' for segmentation, got {self.dataset!r}")
        if self.crop_size < 1 or len(self.scale) != 2 or len(self.ratio_range) != 2:
            raise ValueError("data.crop_size must be positive, data.scale [long, short], data.ratio_range [low, high]")
        if not 0 < self.cat_max_ratio <= 1:
            raise ValueError(f"data.cat_max_ratio must be in (0, 1], got {self.cat_max_ratio}")

    @property
    def zero_label_reduced(self) -> bool:
        return self.dataset == "ade20k" if self.reduce_zero_label is None else bool(self.reduce_zero_label)


def segmentation_paths(cfg: SegmentationDataConfig, split: str) -> tuple[str, str]:
    """``(image folder, mask folder)`` of ``split`` (``"train"`` or ``"val"``)."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    images, masks = getattr(cfg, f"{split}_images"), getattr(cfg, f"{split}_masks")
    if images is None or masks is None:
        if cfg.root is None:
            raise ValueError(f"no {split} data: set data.root (ADE20K layout) or data.{split}_images and "
                             f"data.{split}_masks")
        name = getattr(cfg, f"{split}_split")
        images = images or os.path.join(cfg.root, "images", name)
        masks = masks or os.path.join(cfg.root, "annotations", name)
    return os.fspath(images), os.fspath(masks)


def _class_names(cfg: SegmentationDataConfig) -> tuple[str, ...]:
    if cfg.classes is not None:
        if isinstance(cfg.classes, str):
            path = Path(cfg.classes)
            if not path.is_file():
                raise FileNotFoundError(f"class list {cfg.classes!r} does not exist")
            names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        else:
            names = [str(c) for c in cfg.classes]
        if not names:
            raise ValueError("data.classes is empty")
        return tuple(names)
    if cfg.dataset == "ade20k":
        root = Path(cfg.root or "")
        info = root / "objectInfo150.txt"
        if info.is_file():  # Idx, Ratio, Train, Val, Name (tab separated), the first line a header
            rows = [line.split("\t") for line in info.read_text().splitlines()[1:] if line.strip()]
            return tuple(row[-1].split(";")[0].strip() for row in rows)
        if (root / "classes.txt").is_file():  # an ADE20K-layout dataset with its own classes
            return tuple(line.strip() for line in (root / "classes.txt").read_text().splitlines() if line.strip())
        return ADE20K_CLASSES
    raise ValueError("the folder layout needs its class names: data.classes=[...] or a text file")


class SegmentationFolder(SkipsUnreadable, Dataset):
    """Image/mask pairs matched by file stem (see the module docstring).

    Args:
        images, masks: the two folders.
        classes: class names (label ``i`` = ``classes[i]``).
        reduce_zero_label: ADE20K's label shift.
        transform: ``(image, label) -> (image, label)`` (training augmentation).
    """

    def __init__(self, images: str | os.PathLike, masks: str | os.PathLike, classes: tuple[str, ...], *,
                 ignore_index: int = 255, reduce_zero_label: bool = False, transform: Callable | None = None,
                 limit: int | None = None):
        self.image_dir, self.mask_dir = Path(images), Path(masks)
        for folder in (self.image_dir, self.mask_dir):
            if not folder.is_dir():
                raise FileNotFoundError(f"folder {str(folder)!r} does not exist")
        self.classes, self.ignore_index = tuple(classes), ignore_index
        self.reduce_zero_label, self.transform = reduce_zero_label, transform
        images_by_stem = {p.stem: p for p in sorted(self.image_dir.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}
        masks_by_stem = {p.stem: p for p in sorted(self.mask_dir.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}
        no_mask = sorted(set(images_by_stem) - set(masks_by_stem))
        no_image = sorted(set(masks_by_stem) - set(images_by_stem))
        if no_mask or no_image:
            parts = []
            if no_mask:
                parts.append(f"{len(no_mask)} images have no mask in {str(self.mask_dir)!r} (e.g. {no_mask[:5]})")
            if no_image:
                parts.append(f"{len(no_image)} masks have no image in {str(self.image_dir)!r} (e.g. {no_image[:5]})")
            raise ValueError("unpaired files: " + "; ".join(parts))
        if not images_by_stem:
            raise ValueError(f"no images in {str(self.image_dir)!r} (looked for {', '.join(IMAGE_SUFFIXES)})")
        self.pairs = [(images_by_stem[s], masks_by_stem[s]) for s in sorted(images_by_stem)][:limit]
        self.bad_files: list[str] = []

    def __len__(self) -> int:
        return len(self.pairs)

    def _read(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        from PIL import Image

        image_path, mask_path = self.pairs[index]
        with Image.open(image_path) as img:
            image = np.asarray(img.convert("RGB"))
        with Image.open(mask_path) as m:
            label = np.asarray(m).astype(np.int64)
        if label.ndim == 3:  # grey labels saved as RGB(A) are fine; colour-coded masks are not labels
            if (label[..., :3] != label[..., :1]).any():
                raise DataError(f"mask {str(mask_path)!r} is a colour image: masks must store one class "
                                 "index per pixel (a single-channel or palette PNG)")
            label = label[..., 0]
        if label.shape != image.shape[:2]:
            raise DataError(f"mask {str(mask_path)!r} is {label.shape[1]}x{label.shape[0]} but its image "
                             f"{str(image_path)!r} is {image.shape[1]}x{image.shape[0]}")
        if self.reduce_zero_label:  # 0 ("other") and the ignore value stay ignored, the classes shift down
            label = np.where((label == 0) | (label == self.ignore_index), self.ignore_index, label - 1)
        bad = np.unique(label[(label >= len(self.classes)) & (label != self.ignore_index)])
        if bad.size:
            raise DataError(f"mask {str(mask_path)!r} has label values {bad[:10].tolist()} beyond the "
                             f"{len(self.classes)} classes (0..{len(self.classes) - 1}, ignore {self.ignore_index})")
        return (torch.from_numpy(image.copy()).permute(2, 0, 1).float().div_(255),
                torch.from_numpy(label))

    def __getitem__(self, index: int):
        n = len(self.pairs)
        for attempt in range(n if self.transform is not None else 1):  # training takes the next readable pair
            i = (index + attempt) % n
            try:
                image, label = self._read(i)
            except DataError:
                raise
            except DECODE_ERRORS as err:
                self.note_unreadable(str(self.pairs[i][0]), err)
                continue
            if self.transform is not None:
                image, label = self.transform(image, label)
            return image, label
        if self.transform is not None:
            raise RuntimeError(f"no readable image in {str(self.image_dir)!r}")
        return None


def fit_size(height: int, width: int, scale) -> tuple[int, int]:
    """``(height, width)`` rescaled, aspect ratio kept, to the largest size whose long side is at most
    ``scale[0]`` and short side at most ``scale[1]`` (mmcv's ``rescale_size``, up or down)."""
    factor = min(scale[0] / max(height, width), scale[1] / min(height, width))
    return max(1, int(height * factor + 0.5)), max(1, int(width * factor + 0.5))


class SegmentationTrainTransform:
    """The authors' training pipeline (module docstring), with Python's ``random`` (seeded by the
    engine per process and per worker)."""

    def __init__(self, cfg: SegmentationDataConfig):
        self.cfg = cfg

    def __call__(self, image: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        # random resize: ratio of (long, short) = scale, keeping the aspect ratio
        ratio = random.uniform(*cfg.ratio_range)
        size = fit_size(*image.shape[-2:], (cfg.scale[0] * ratio, cfg.scale[1] * ratio))
        image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
        label = F.interpolate(label[None, None].float(), size=size, mode="nearest")[0, 0].long()
        # random crop where no class covers more than cat_max_ratio of the labelled pixels
        crop = cfg.crop_size
        ch, cw = min(crop, size[0]), min(crop, size[1])
        for _ in range(10):
            y, x = random.randint(0, size[0] - ch), random.randint(0, size[1] - cw)
            window = label[y:y + ch, x:x + cw]
            counts = torch.bincount(window[window != cfg.ignore_index].flatten())
            counts = counts[counts > 0]
            if len(counts) > 1 and counts.max() / counts.sum() < cfg.cat_max_ratio:
                break
        image, label = image[:, y:y + ch, x:x + cw], label[y:y + ch, x:x + cw]
        if random.random() < cfg.flip_prob:
            image, label = image.flip(-1), label.flip(-1)
        if cfg.photometric:
            image = _photometric(image)
        # pad to the crop size: the mean colour (0 once normalised) and the ignore index
        pad_h, pad_w = crop - image.shape[-2], crop - image.shape[-1]
        if pad_h or pad_w:
            mean = torch.tensor(cfg.mean, dtype=image.dtype)[:, None, None]
            image = F.pad(image - mean, (0, pad_w, 0, pad_h)) + mean
            label = F.pad(label, (0, pad_w, 0, pad_h), value=cfg.ignore_index)
        return image.contiguous(), label.contiguous()


def _photometric(image: torch.Tensor) -> torch.Tensor:
    """MMSegmentation's ``PhotoMetricDistortion``: each step with probability 0.5, contrast before or
    after the colour steps."""
    from torchvision.transforms.v2 import functional as TF

    if random.random() < 0.5:
        image = image + random.uniform(-32, 32) / 255
    contrast_first = random.random() < 0.5
    alpha = random.uniform(0.5, 1.5) if random.random() < 0.5 else None
    if contrast_first and alpha is not None:
        image = image * alpha
    image = image.clamp(0, 1)
    if random.random() < 0.5:
        image = TF.adjust_saturation(image, random.uniform(0.5, 1.5))
    if random.random() < 0.5:
        image = TF.adjust_hue(image, random.uniform(-18, 18) / 180)
    if not contrast_first and alpha is not None:
        image = image * alpha
    return image.clamp(0, 1)


def build_segmentation_dataset(cfg: SegmentationDataConfig, split: str) -> SegmentationFolder:
    """The ``split`` (``"train"``/``"val"``) of ``cfg``; training with the augmentation pipeline."""
    images, masks = segmentation_paths(cfg, split)
    return SegmentationFolder(images, masks, _class_names(cfg), ignore_index=cfg.ignore_index,
                              reduce_zero_label=cfg.zero_label_reduced, limit=cfg.limit,
                              transform=SegmentationTrainTransform(cfg) if split == "train" else None)


def collate_segmentation(batch: list) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Lists of images and labels (evaluation images differ in size); unreadable ones left out."""
    batch = [item for item in batch if item is not None]
    return [image for image, _ in batch], [label for _, label in batch]
