"""Mask R-CNN / Faster R-CNN on any dense piip backbone, composed from torchvision's parts.

``build_detector(backbone, num_classes)`` injects a dense :class:`~piip.models.piip.PIIP` (a PIIP
variant or a single-branch ViTDet baseline: ``task="det"``, maps at strides 4/8/16/32) into
torchvision's detector, set up as the authors' MMDetection 2.x Mask R-CNN wherever it moves
accuracy (reference §8.1):

* neck: ``torchvision.ops.FeaturePyramidNetwork`` 256 wide + ``LastLevelMaxPool`` (MMDetection's
  ``FPN(num_outs=5)``: stride 64 by max-pooling the stride-32 output);
* RPN: anchors 32-512 (one size per level) x ratios 0.5/1/2 at strides 4-64 (not rounded to whole
  pixels, as MMDetection 2.x), 2000 proposals per level before NMS
  and 1000 kept after it in training, 1000/1000 in testing, NMS 0.7, IoU 0.7/0.3 with low-quality
  matches from IoU 0.3, 256 samples at 50% positives;
* RoI heads: RoIAlign **aligned** with sampling ratio 0 (7x7 boxes, 14x14 masks, the FPN paper's
  level rule with MMDetection's finest scale 56), two 1024-wide FC layers, four 3x3 conv mask
  layers and a 2x deconvolution, no normalisation; 512 samples at 25% positives;
* losses: L1 box regression in the RPN and the box head (MMDetection 2.x), cross-entropy
  classification, per-pixel BCE against binary ``aligned=True`` mask targets;
* test: score 0.05, NMS 0.5, 100 detections, masks pasted over the float box with ``grid_sample``
  and binarised at ``>= 0.5`` (by the evaluator);
* images: keep-ratio resize to ``(S, S * 800 // 1333)`` (long side <= S, short side <= the other,
  mmcv's rounding) with S the finest branch's resolution, padding to a multiple of 224 (window 14 x
  patch 16), normalisation with mean = std = 0.5 (the authors' 127.5 on 0-255 images).

Where torchvision's parts compute otherwise, :mod:`.rcnn_parts` holds the few subclasses that
compute MMDetection's rules. This module holds what every detector kind shares (the config, the
backbone + FPN, the detector module, the kind registry); each kind assembles its heads in a module of
its own (:mod:`.mask_rcnn`).

The backbone may run under bf16 autocast while the neck and heads stay in float32
(``backbone_dtype``); ``set_grad_checkpointing`` turns on activation checkpointing in the backbone.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from ...config.model import PIIPConfig
from ...config.typed import Serializable
from ...models.piip import PIIP
from ...precision import autocast, autocast_dtype
from ...ops import use_onednn_linears
from .rcnn_parts import BOX_LOSSES, MMDetRegionProposalNetwork, MMDetRoIHeads, MMDetTransform

__all__ = ["DetectorConfig", "PIIPDetector", "DetectorBackbone", "build_detector", "build_detector_from_config",
           "DETECTOR_KINDS", "register_detector_kind"]

@dataclass(frozen=True)
class DetectorConfig(Serializable):
    """Everything that rebuilds a detector (stored in its checkpoint).

    Attributes:
        backbone: the dense piip backbone.
        num_classes: object classes (without background).
        kind: the detector around it (:data:`DETECTOR_KINDS`: ``"mask_rcnn"``, also Faster R-CNN
            with ``masks=False``); checkpoints written before kinds existed are Mask R-CNN.
        class_names: their names, label ``i`` (1-based in torchvision's outputs) being
            ``class_names[i - 1]``; empty when unknown.
        category_ids: the dataset's category id of every class (COCO ids are not contiguous), so
            predictions can be written in the dataset's ids; empty when unknown.
        masks: Mask R-CNN (``True``) or Faster R-CNN.
        fpn_channels: the neck's width.
        box_head_dim: width of the box head's two FC layers (1024 in Mask R-CNN).
        mask_head_dim: width of the mask head's four convs and deconvolution (256).
        anchor_sizes: one anchor size per pyramid level (5 levels), aspect ratios 0.5/1/2.
        min_size, max_size: keep-ratio resize bounds (short side, long side); ``None`` derives
            them from the backbone (``S * 800 // 1333`` and ``S``).
        size_divisible: padding multiple; ``None``: 14 patches (224 at patch 16).
        image_mean, image_std: normalisation of 0-1 images.
        rpn_post_nms_top_n_train: proposals kept after the RPN's NMS in training.
        rpn_batch_size_per_image, box_batch_size_per_image: anchors / proposals sampled per image
            for the losses (256 at 50% positives, 512 at 25%).
        box_loss: ``"l1"`` (MMDetection 2.x) or ``"smooth_l1"`` (torchvision).
        score_thresh, nms_thresh, detections_per_img, mask_thresh: test-time settings.
        backbone_dtype: autocast dtype of the backbone (``"fp32"``, ``"bf16"``, ``"fp16"``); the
            neck and the heads always run in float32.
        resize_in_training: the input transform resizes training images (``False`` when the data
            pipeline already sized them: large-scale jitter); evaluation always resizes.
    """

    backbone: PIIPConfig
    num_classes: int
    kind: str = "mask_rcnn"
    class_names: tuple[str, ...] = ()
    category_ids: tuple[int, ...] = ()
    masks: bool = True
    fpn_channels: int = 256
    box_head_dim: int = 1024
    mask_head_dim: int = 256
    anchor_sizes: tuple[int, ...] = (32, 64, 128, 256, 512)
    min_size: int | None = None
    max_size: int | None = None
    size_divisible: int | None = None
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    rpn_post_nms_top_n_train: int = 1000
    rpn_batch_size_per_image: int = 256
    box_batch_size_per_image: int = 512
    box_loss: str = "l1"
    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    detections_per_img: int = 100
    mask_thresh: float = 0.5
    backbone_dtype: str = "fp32"
    resize_in_training: bool = True

    def __post_init__(self) -> None:
        for name in ("class_names", "category_ids", "anchor_sizes", "image_mean", "image_std"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.backbone.task != "det":
            raise ValueError(f"a detector needs a dense backbone (PIIPConfig.task='det'), got "
                             f"task={self.backbone.task!r}")
        if self.num_classes < 1:
            raise ValueError(f"DetectorConfig.num_classes must be >= 1, got {self.num_classes}")
        for name in ("class_names", "category_ids"):
            values = getattr(self, name)
            if values and len(values) != self.num_classes:
                raise ValueError(f"DetectorConfig.{name} has {len(values)} entries for {self.num_classes} classes")
        if len(self.anchor_sizes) != 5:
            raise ValueError(f"DetectorConfig.anchor_sizes needs one size per pyramid level (5), got "
                             f"{self.anchor_sizes}")
        if self.backbone.fpn_levels != (0, 1, 2, 3):
            raise ValueError("the detector's FPN needs the backbone's four pyramid levels (fpn_levels=(0, 1, 2, 3))")
        if self.kind not in DETECTOR_KINDS:
            raise ValueError(f"DetectorConfig.kind must be one of {sorted(DETECTOR_KINDS)}, got {self.kind!r}")
        if self.box_loss not in BOX_LOSSES:
            raise ValueError(f"DetectorConfig.box_loss must be one of {BOX_LOSSES}, got {self.box_loss!r}")
        autocast_dtype(self.backbone_dtype, "DetectorConfig.backbone_dtype")

    # -- derived -----------------------------------------------------------------------------------
    @property
    def resize(self) -> tuple[int, int, int]:
        """``(min_size, max_size, size_divisible)`` of the input transform."""
        finest = self.backbone.input_size
        return (self.min_size or finest * 800 // 1333, self.max_size or finest,
                self.size_divisible or 14 * self.backbone.patch_size)


class DetectorBackbone(nn.Module):
    """The dense piip backbone (``body``) followed by the FPN neck: torchvision's backbone contract
    (``OrderedDict`` "0".."3" and "pool", ``out_channels``)."""

    def __init__(self, body: PIIP, fpn_channels: int = 256, dtype: torch.dtype | None = None):
        super().__init__()
        if not isinstance(body, PIIP) or body.config.task != "det":
            raise ValueError("the detector's backbone must be a dense piip model (create_model(..., task='det'))")
        self.body = body
        self.fpn = FeaturePyramidNetwork([body.out_channels] * len(body.strides), fpn_channels,
                                         extra_blocks=LastLevelMaxPool())
        self.out_channels = fpn_channels
        self.dtype = dtype

    def forward(self, images: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        with autocast(images.device.type, self.dtype):
            features = self.body(images)
        with torch.autocast(images.device.type, enabled=False):
            return self.fpn(OrderedDict((k, v.float()) for k, v in features.items()))


class PIIPDetector(GeneralizedRCNN):
    """torchvision's generalized R-CNN around a piip backbone, with its :class:`DetectorConfig`.

    ``model(images)`` in eval mode returns torchvision's detections (``boxes`` in input-image
    pixels, ``labels`` 1-based, ``scores``, ``masks`` as probabilities ``(N, 1, H, W)``); in train
    mode ``model(images, targets)`` returns the loss dict.

    In evaluation every image gets the detections it gets alone, whatever it is batched with: the
    images are run in groups of one padded size (their keep-ratio size rounded up to the padding
    multiple), because the branches resize their position embeddings to the padded grid and a
    batch padded to its largest member would show an image at another size (MMDetection tests one
    image at a time). Training pads each batch to its largest image, as the authors' aspect-ratio
    grouped batches are.
    """

    def __init__(self, config: DetectorConfig, backbone: DetectorBackbone, rpn: MMDetRegionProposalNetwork,
                 roi_heads: MMDetRoIHeads, transform: MMDetTransform):
        super().__init__(backbone, rpn, roi_heads, transform)
        self.config = config

    def forward(self, images, targets=None):
        if self.training:
            return super().forward(images, targets)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, image in enumerate(images):
            groups.setdefault(self.transform.padded_size(*image.shape[-2:]), []).append(i)
        if len(groups) == 1:
            return super().forward(images)
        detections: list = [None] * len(images)
        for indices in groups.values():
            for i, detection in zip(indices, super().forward([images[i] for i in indices])):
                detections[i] = detection
        return detections

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.backbone.body.set_grad_checkpointing(enable)


#: detector kind -> ``assemble(config, body) -> PIIPDetector``; each kind is one module of this
#: package, registered in its ``__init__`` (``"mask_rcnn"``: :mod:`.mask_rcnn`)
DETECTOR_KINDS: dict[str, Callable[[DetectorConfig, PIIP], "PIIPDetector"]] = {}


def register_detector_kind(kind: str, assemble: Callable[[DetectorConfig, PIIP], "PIIPDetector"]) -> None:
    """Let :func:`build_detector` (``kind=...``) and checkpoints build a detector of ``kind``."""
    if DETECTOR_KINDS.get(kind, assemble) is not assemble:
        raise ValueError(f"detector kind {kind!r} registered twice")
    DETECTOR_KINDS[kind] = assemble


def build_detector(backbone: PIIP, num_classes: int, **settings: Any) -> PIIPDetector:
    """A detector of ``kind`` (default ``"mask_rcnn"``: Mask R-CNN with ``masks=True``, else Faster
    R-CNN) around a dense piip ``backbone``.

    Args:
        backbone: ``piip.create_model(name, task="det", ...)`` (any registered variant, PIIP or a
            single-branch ViTDet baseline), with its weights.
        num_classes: object classes, without background.
        settings: any other :class:`DetectorConfig` field (``masks``, ``class_names``,
            ``anchor_sizes``, ``min_size``, ``backbone_dtype``, ...).
    """
    config = DetectorConfig(backbone=backbone.config, num_classes=num_classes, **settings)
    return use_onednn_linears(DETECTOR_KINDS[config.kind](config, backbone))


def build_detector_from_config(config: DetectorConfig) -> PIIPDetector:
    """A freshly initialised detector from its config (a checkpoint's weights are loaded after)."""
    return use_onednn_linears(DETECTOR_KINDS[config.kind](config, PIIP(config.backbone)))
