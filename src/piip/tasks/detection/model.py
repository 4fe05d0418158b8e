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
compute MMDetection's rules.

The backbone may run under bf16 autocast while the neck and heads stay in float32
(``backbone_dtype``); ``set_grad_checkpointing`` turns on activation checkpointing in the backbone.
"""
from __future__ import annotations

import dataclasses
import json
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from ...models.config import PIIPConfig
from ...models.piip import PIIP
from ...precision import autocast, autocast_dtype
from ...ops import use_onednn_linears
from .rcnn_parts import (BOX_LOSSES, AlignedMultiScaleRoIAlign, MMDetRegionProposalNetwork, MMDetRoIHeads,
                         MMDetTransform, PyramidAnchorGenerator)

__all__ = ["DetectorConfig", "PIIPDetector", "DetectorBackbone", "build_detector", "build_detector_from_config"]

@dataclass(frozen=True)
class DetectorConfig:
    """Everything that rebuilds a detector (stored in its checkpoint).

    Attributes:
        backbone: the dense piip backbone.
        num_classes: object classes (without background).
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

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DetectorConfig":
        data = dict(data)
        return cls(backbone=PIIPConfig.from_dict(data.pop("backbone")), **data)


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


def build_detector(backbone: PIIP, num_classes: int, **settings: Any) -> PIIPDetector:
    """Mask R-CNN (``masks=True``, default) or Faster R-CNN around a dense piip ``backbone``.

    Args:
        backbone: ``piip.create_model(name, task="det", ...)`` (any registered variant, PIIP or a
            single-branch ViTDet baseline), with its weights.
        num_classes: object classes, without background.
        settings: any other :class:`DetectorConfig` field (``masks``, ``class_names``,
            ``anchor_sizes``, ``min_size``, ``backbone_dtype``, ...).
    """
    config = DetectorConfig(backbone=backbone.config, num_classes=num_classes, **settings)
    return _assemble(config, backbone)


def build_detector_from_config(config: DetectorConfig) -> PIIPDetector:
    """A freshly initialised detector from its config (a checkpoint's weights are loaded after)."""
    return _assemble(config, PIIP(config.backbone))


def _init_like_mmdet(fpn: nn.Module, box_head: TwoMLPHead, box_predictor: FastRCNNPredictor) -> None:
    """MMDetection's initialisation where torchvision's differs: Xavier-uniform FPN convs and box-head
    FC layers, normal(0, 0.01) classifier and normal(0, 0.001) box regressor, zero biases. (The RPN
    head's normal(0, 0.01) and the mask head's Kaiming init are already the same in both.)"""
    for m in [*fpn.modules(), box_head.fc6, box_head.fc7]:
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    for layer, std in ((box_predictor.cls_score, 0.01), (box_predictor.bbox_pred, 0.001)):
        nn.init.normal_(layer.weight, std=std)
        nn.init.zeros_(layer.bias)


def _assemble(config: DetectorConfig, body: PIIP) -> PIIPDetector:
    backbone = DetectorBackbone(body, config.fpn_channels, autocast_dtype(config.backbone_dtype))
    channels = config.fpn_channels
    anchors = PyramidAnchorGenerator(tuple((s,) for s in config.anchor_sizes),
                                     ((0.5, 1.0, 2.0),) * len(config.anchor_sizes), strides=(4, 8, 16, 32, 64))
    rpn = MMDetRegionProposalNetwork(anchors, RPNHead(channels, anchors.num_anchors_per_location()[0]),
                                     fg_iou_thresh=0.7, bg_iou_thresh=0.3, min_pos_iou=0.3,
                                     batch_size_per_image=config.rpn_batch_size_per_image, positive_fraction=0.5,
                                     pre_nms_top_n=dict(training=2000, testing=1000),
                                     post_nms_top_n=dict(training=config.rpn_post_nms_top_n_train, testing=1000),
                                     nms_thresh=0.7, box_loss=config.box_loss)
    levels = ["0", "1", "2", "3"]
    box_pool = AlignedMultiScaleRoIAlign(levels, 7, sampling_ratio=0)
    mask_parts: dict[str, Any] = {}
    if config.masks:
        width = config.mask_head_dim
        mask_parts = dict(mask_roi_pool=AlignedMultiScaleRoIAlign(levels, 14, sampling_ratio=0),
                          mask_head=MaskRCNNHeads(channels, (width,) * 4, 1),
                          mask_predictor=MaskRCNNPredictor(width, width, config.num_classes + 1))
    box_head = TwoMLPHead(channels * 7 * 7, config.box_head_dim)
    box_predictor = FastRCNNPredictor(config.box_head_dim, config.num_classes + 1)
    _init_like_mmdet(backbone.fpn, box_head, box_predictor)
    roi_heads = MMDetRoIHeads(box_pool, box_head, box_predictor,
                              fg_iou_thresh=0.5, bg_iou_thresh=0.5, min_pos_iou=0.5,
                              batch_size_per_image=config.box_batch_size_per_image, positive_fraction=0.25,
                              bbox_reg_weights=None, score_thresh=config.score_thresh, nms_thresh=config.nms_thresh,
                              detections_per_img=config.detections_per_img, box_loss=config.box_loss, **mask_parts)
    min_size, max_size, divisible = config.resize
    transform = MMDetTransform(min_size, max_size, list(config.image_mean), list(config.image_std),
                               size_divisible=divisible, _skip_resize=not config.resize_in_training)
    return use_onednn_linears(PIIPDetector(config, backbone, rpn, roi_heads, transform))

