"""The authors' DETR-style multi-scale training augmentation, as MMDetection 2.25 runs it.

The PIIP authors' ``*_ms`` detection configs (e.g. ``mask_rcnn_internvit_h6b_1024_512_fpn_1x_coco_bs16_ms``,
``dino_4scale_internvit_h6b_1024_768_fpn_1x_coco_bs16_ms``,
``dino_4scale_deit_384_sbl_1792_1120_672_fpn_3x_coco_bs32_ms``) train with, after ``RandomFlip(0.5)``::

    AutoAugment(policies=[                      # one policy per image, uniformly
        [Resize(img_scale=S11, multiscale_mode='value', keep_ratio=True)],
        [Resize(img_scale=S3, multiscale_mode='value', keep_ratio=True),
         RandomCrop(crop_type='absolute_range', crop_size=(int(384*r), int(600*r)), allow_negative_crop=True),
         Resize(img_scale=S11, multiscale_mode='value', override=True, keep_ratio=True)]])
    RandomCrop(crop_type='absolute_range', crop_size=(C, C), allow_negative_crop=True)

with ``S11 = [(int(s*r), int(1333*r)) for s in 480, 512, ..., 800]`` (11 scales, step 32),
``S3 = [(int(s*r), int(1333*r)) for s in 400, 500, 600]``; the InternViT configs use ``r = 1`` and
``C = 1024``, the DeiT DINO one ``r = 1792/1024`` and ``C = 1792``. :class:`MultiScaleCrop` is that
``AutoAugment`` plus the final crop (``MultiScaleCrop(1024)``, ``MultiScaleCrop(1792)``); the flip
stays piip's ``RandomHorizontalFlip``, and normalisation and padding stay the detector's.

What is reproduced exactly (MMDetection 2.x ``Resize``/``RandomCrop``, mmcv 1.x ``rescale_size``):

* keep-ratio resize to a scale ``(a, b)``: ``sf = min(max(a, b) / max(h, w), min(a, b) / min(h, w))``,
  new size ``int(w * sf + 0.5) x int(h * sf + 0.5)``; boxes times ``(new_w / w, new_h / h)`` (float32)
  and clipped to the new image; masks by OpenCV ``INTER_NEAREST`` indexing (what mmcv's
  ``'nearest'`` calls, see :func:`nearest_index`);
* ``absolute_range`` crop ``(lo, hi)``: ``crop_h`` uniform in ``[min(h, lo), min(h, hi)]``, ``crop_w``
  likewise, then the offset uniform in ``[0, h - crop_h]`` x ``[0, w - crop_w]``; boxes shifted,
  clipped to the crop, and objects whose clipped box has no width or height dropped with every
  per-object field; a crop without objects is kept (``allow_negative_crop=True``).

Not bit-exact: the image interpolation. MMDetection resizes ``uint8`` images with OpenCV's
fixed-point ``INTER_LINEAR``; here float images go through ``F.interpolate`` bilinear with
``align_corners=False`` and no antialiasing (the same sampling grid: max difference about 1e-4 to
OpenCV on float images, about 1/255 to its ``uint8`` output). Random numbers come from torch's global
RNG (which the engine seeds per process and worker), not NumPy's, so a seed does not reproduce
MMDetection's draws, only their distribution.

Why not ``torchvision.transforms.v2`` (0.29, checked): ``RandomShortestSize(min_size=[...],
max_size=1333)`` picks the scale the same way but sizes the output with ``int(w * sf)`` (truncation,
not mmcv's ``int(w * sf + 0.5)``) and antialiases by default; ``RandomCrop`` crops one fixed size
(and fails on a smaller image unless padding) with no ``absolute_range`` random size;
``SanitizeBoundingBoxes`` refuses ``min_size < 1`` (MMDetection keeps any box wider and taller than 0)
and filters only labels, masks and boxes, not other per-object fields; ``Resize`` of a mask uses
torch's ``nearest``, which differs from OpenCV's ``INTER_NEAREST`` at exact boundaries (see
:func:`nearest_index`). ``RandomChoice`` would do the policy pick, which is one ``randint`` here.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = ["MultiScaleCrop", "MultiScaleScales", "multiscale_scales", "rescale_size", "nearest_index",
           "resize_keep_ratio", "crop"]

#: short sides of the 11 scales of policy 1 (and of policy 2's second resize): 480, 512, ..., 800
RESIZE_SHORT = tuple(range(480, 801, 32))
#: short sides of policy 2's first resize
CROP_RESIZE_SHORT = (400, 500, 600)
#: the long side limit of every scale
LONG_SIDE = 1333
#: policy 2's random crop size range
CROP_RANGE = (384, 600)

#: target keys never treated as per-object fields, whatever their length
_IMAGE_KEYS = frozenset({"image_id", "orig_size", "size"})


class MultiScaleScales(NamedTuple):
    """The scales for one ratio ``r``: MMDetection ``(short, long)`` scale tuples."""

    resize: tuple[tuple[int, int], ...]       #: ``(int(s*r), int(1333*r))``, s = 480..800 step 32 (11)
    crop_resize: tuple[tuple[int, int], ...]  #: ``(int(s*r), int(1333*r))``, s = 400, 500, 600
    crop_range: tuple[int, int]               #: ``(int(384*r), int(600*r))``


def multiscale_scales(ratio: float = 1.0) -> MultiScaleScales:
    """The authors' scale lists for the ratio ``r`` (each value ``int(value * r)``, as in their configs)."""
    if not ratio > 0:
        raise ValueError(f"ratio must be positive, got {ratio}")
    long = int(LONG_SIDE * ratio)
    scales = MultiScaleScales(resize=tuple((int(s * ratio), long) for s in RESIZE_SHORT),
                              crop_resize=tuple((int(s * ratio), long) for s in CROP_RESIZE_SHORT),
                              crop_range=(int(CROP_RANGE[0] * ratio), int(CROP_RANGE[1] * ratio)))
    if scales.crop_range[0] < 1:
        raise ValueError(f"ratio {ratio} is too small: the crop range {scales.crop_range} starts below 1 pixel")
    return scales


def rescale_size(height: int, width: int, scale: tuple[int, int]) -> tuple[int, int]:
    """``(new_h, new_w)`` of a keep-ratio resize to ``scale`` (mmcv ``rescale_size``; the order of
    the two numbers of ``scale`` does not matter)."""
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def nearest_index(size_in: int, size_out: int) -> torch.Tensor:
    """Source index of each output pixel of OpenCV's ``INTER_NEAREST`` (mmcv's ``'nearest'``, which
    MMDetection's ``BitmapMasks.rescale`` uses): ``floor(x * (1 / (size_out / size_in)))`` in double
    precision, capped at ``size_in - 1``.

    torch's ``F.interpolate(mode="nearest")`` is the same ``floor(x * size_in / size_out)`` but with a
    float32 scale, so it picks the neighbouring pixel wherever ``x * size_in / size_out`` is a whole
    number that the two roundings put on different sides (about 5% of size pairs: 6 -> 34 at x = 17,
    OpenCV 2, torch 3); this index reproduces OpenCV exactly (checked on all sizes 1..299 against
    opencv-python 4.14)."""
    index = torch.floor(torch.arange(size_out, dtype=torch.float64) * (1.0 / (size_out / size_in)))
    return index.long().clamp_(max=size_in - 1)


def _check(image: torch.Tensor, target: dict) -> int:
    if image.ndim != 3:
        raise ValueError(f"expected a (C, H, W) image, got shape {tuple(image.shape)}")
    boxes = target["boxes"]
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"target['boxes'] must be (N, 4), got {tuple(boxes.shape)}")
    masks = target.get("masks")
    if masks is not None and (masks.ndim != 3 or masks.shape[0] != boxes.shape[0]
                              or masks.shape[1:] != image.shape[1:]):
        raise ValueError(f"target['masks'] must be (N, H, W) = ({boxes.shape[0]}, {image.shape[1]}, "
                         f"{image.shape[2]}), got {tuple(masks.shape)}")
    return boxes.shape[0]


def resize_keep_ratio(image: torch.Tensor, target: dict | None, scale: tuple[int, int]) -> tuple[torch.Tensor, dict | None]:
    """MMDetection's ``Resize(keep_ratio=True)`` to one ``scale``: image bilinear, boxes scaled and
    clipped (float32, as MMDetection), masks nearest (:func:`nearest_index`); no object is dropped.
    The detector's own input transform resizes with it too (``target`` ``None`` at test time)."""
    height, width = image.shape[-2:]
    new_h, new_w = rescale_size(height, width, scale)
    out_image = F.interpolate(image[None], size=(new_h, new_w), mode="bilinear", align_corners=False,
                              antialias=False)[0]
    if target is None:
        return out_image, None
    _check(image, target)
    out = dict(target)
    factor = torch.tensor([new_w / width, new_h / height] * 2, dtype=torch.float32)
    boxes = target["boxes"].to(torch.float32) * factor
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, new_w)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, new_h)
    out["boxes"] = boxes
    if "masks" in target:
        rows, cols = nearest_index(height, new_h), nearest_index(width, new_w)
        masks = target["masks"]
        # separable: the (slower) column gather on the fewer rows first
        out["masks"] = (masks.index_select(1, rows).index_select(2, cols) if new_h <= height
                        else masks.index_select(2, cols).index_select(1, rows))
    return out_image, out


def crop(image: torch.Tensor, target: dict, top: int, left: int, height: int, width: int) -> tuple[torch.Tensor, dict]:
    """MMDetection's ``RandomCrop`` once its window is drawn: boxes shifted and clipped to the crop,
    objects whose clipped box has zero width or height dropped (every per-object tensor: a tensor
    whose first dimension is the number of boxes), other keys copied; no object left is fine."""
    n = _check(image, target)
    out_image = image[:, top:top + height, left:left + width].clone(memory_format=torch.contiguous_format)
    height, width = out_image.shape[-2:]  # a window past the border ends there (as NumPy slicing)
    boxes = target["boxes"].to(torch.float32) - torch.tensor([left, top, left, top], dtype=torch.float32)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    out = {}
    for key, value in target.items():
        if key == "boxes":
            out[key] = boxes[keep]
        elif key == "masks":
            out[key] = value[keep][:, top:top + height, left:left + width].contiguous()
        elif (key not in _IMAGE_KEYS and isinstance(value, torch.Tensor) and value.ndim >= 1
              and value.shape[0] == n):
            out[key] = value[keep]
        else:
            out[key] = value
    return out_image, out


class MultiScaleCrop:
    """The authors' multi-scale training augmentation (module docstring): one of two policies picked
    at random, then a random crop of at most ``crop_size x crop_size``.

    Args:
        crop_size: the final crop ``C`` (the authors': 1024, or 1792 for DINO with DeiT).
        ratio: the scale ratio ``r``; ``None``: ``crop_size / 1024`` (1 for 1024, 1.75 for 1792, the
            authors' pairs).

    Attributes: ``crop_size``, ``ratio``, ``scales`` (:class:`MultiScaleScales`).

    ``(image, target) -> (image, target)`` with the image float ``(3, H, W)`` and the target piip's
    detection dict (``boxes`` xyxy pixels, ``labels``, optional ``masks`` ``(N, H, W)``, other
    per-object tensors filtered with the boxes, the rest copied); a new dict, the input untouched.
    ``area`` is filtered but keeps the annotation's value (MMDetection carries no area).

    The random draws are the methods :meth:`choose_policy`, :meth:`choose_scale` and
    :meth:`choose_crop` (torch's global RNG), so that a subclass can fix them.
    """

    def __init__(self, crop_size: int, ratio: float | None = None):
        if isinstance(crop_size, bool) or not isinstance(crop_size, int) or crop_size < 1:
            raise ValueError(f"crop_size must be a positive int, got {crop_size!r}")
        self.crop_size = crop_size
        self.ratio = float(crop_size / 1024 if ratio is None else ratio)
        self.scales = multiscale_scales(self.ratio)

    # -- the random draws ----------------------------------------------------------------------
    def choose_policy(self) -> int:
        """0: resize only; 1: resize, crop, resize (uniformly, as ``AutoAugment``)."""
        return int(torch.randint(2, ()))

    def choose_scale(self, scales: tuple[tuple[int, int], ...]) -> tuple[int, int]:
        """One of ``scales``, uniformly (``multiscale_mode='value'``)."""
        return scales[int(torch.randint(len(scales), ()))]

    def choose_crop(self, height: int, width: int, size_range: tuple[int, int]) -> tuple[int, int, int, int]:
        """``(top, left, crop_h, crop_w)`` of an ``absolute_range`` crop of an ``height x width`` image."""
        low, high = size_range
        crop_h = int(torch.randint(min(height, low), min(height, high) + 1, ()))
        crop_w = int(torch.randint(min(width, low), min(width, high) + 1, ()))
        top = int(torch.randint(0, max(height - crop_h, 0) + 1, ()))
        left = int(torch.randint(0, max(width - crop_w, 0) + 1, ()))
        return top, left, crop_h, crop_w

    # -- the pipeline --------------------------------------------------------------------------
    def _random_crop(self, image: torch.Tensor, target: dict, size_range: tuple[int, int]):
        top, left, crop_h, crop_w = self.choose_crop(image.shape[-2], image.shape[-1], size_range)
        return crop(image, target, top, left, crop_h, crop_w)

    def __call__(self, image: torch.Tensor, target: dict) -> tuple[torch.Tensor, dict]:
        if self.choose_policy() == 0:
            image, target = resize_keep_ratio(image, target, self.choose_scale(self.scales.resize))
        else:
            image, target = resize_keep_ratio(image, target, self.choose_scale(self.scales.crop_resize))
            image, target = self._random_crop(image, target, self.scales.crop_range)
            image, target = resize_keep_ratio(image, target, self.choose_scale(self.scales.resize))
        return self._random_crop(image, target, (self.crop_size, self.crop_size))

    def __repr__(self) -> str:
        return f"MultiScaleCrop(crop_size={self.crop_size}, ratio={self.ratio})"
