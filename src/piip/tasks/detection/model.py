"""Detectors on any dense piip backbone: what every kind shares, and the default kind's settings.

``build_detector(backbone, num_classes, kind=...)`` injects a dense :class:`~piip.models.piip.PIIP`
(a PIIP variant or a single-branch ViTDet baseline: ``task="det"``, maps at strides 4/8/16/32) into
a detector of a registered kind (:data:`DETECTOR_KINDS`: ``"mask_rcnn"``, ``"cascade_mask_rcnn"``,
``"dino"``). The default, Mask R-CNN / Faster R-CNN, is torchvision's detector set up as the
authors' MMDetection 2.x Mask R-CNN wherever it moves accuracy (reference §8.1):

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
:class:`Detector` contract, the backbone + FPN, the R-CNN module, the kind registry); each kind
assembles its heads in a module of its own (:mod:`.mask_rcnn`, :mod:`.cascade`, :mod:`.dino`).

The backbone may run under bf16 autocast while the neck and heads stay in float32
(``backbone_dtype``); ``set_grad_checkpointing`` turns on activation checkpointing in the backbone.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

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
from ...weights.sharing import HubMixin
from .rcnn_parts import BOX_LOSSES, MMDetRegionProposalNetwork, MMDetTransform

__all__ = ["DetectorConfig", "Detector", "detect_in_size_groups", "input_transform", "PIIPDetector", "DetectorBackbone", "build_detector",
           "build_detector_from_config", "DetectorKind", "DETECTOR_KINDS", "detector_kind",
           "register_detector_kind"]

@dataclass(frozen=True)
class DetectorConfig(Serializable):
    """Everything that rebuilds a detector (stored in its checkpoint).

    Attributes:
        backbone: the dense piip backbone.
        num_classes: object classes (without background).
        kind: the detector around it (:data:`DETECTOR_KINDS`: ``"mask_rcnn"``, also Faster R-CNN
            with ``masks=False``; ``"cascade_mask_rcnn"``; ``"dino"``); checkpoints written before
            kinds existed are Mask R-CNN. Fields left ``None`` take the kind's default
            (:class:`DetectorKind`), and the stored config holds the resolved value.
        class_names: their names, label ``i`` (1-based in torchvision's outputs) being
            ``class_names[i - 1]``; empty when unknown.
        category_ids: the dataset's category id of every class (COCO ids are not contiguous), so
            predictions can be written in the dataset's ids; empty when unknown.
        masks: instance masks (Mask R-CNN) or boxes only (Faster R-CNN); ``None``: the kind's
            default (masks where the kind has a mask head; DINO has none).
        fpn_channels: the neck's width.
        box_head_dim: width of the box head's FC layers (Mask R-CNN's two, each Cascade stage's one; 1024).
        mask_head_dim: width of the mask head's four convs and deconvolution (256).
        anchor_sizes: one anchor size per pyramid level (5 levels), aspect ratios 0.5/1/2.
        min_size, max_size: keep-ratio resize bounds (short side, long side); ``None`` derives
            them from the backbone (``S * 800 // 1333`` and ``S``).
        size_divisible: padding multiple; ``None``: 14 patches (224 at patch 16).
        image_mean, image_std: normalisation of 0-1 images.
        rpn_post_nms_top_n_train: proposals kept after the RPN's NMS in training.
        rpn_batch_size_per_image, box_batch_size_per_image: anchors / proposals sampled per image
            for the losses (256 at 50% positives, 512 at 25%).
        box_loss: the RPN's and the R-CNN box head's regression loss, ``"l1"`` (the authors' Mask
            R-CNN) or ``"smooth_l1"`` (torchvision; ViT-Adapter's Cascade RPN; the Cascade stages
            regress with a GIoU loss whatever it is); ``None``: the kind's.
        score_thresh, nms_thresh, mask_thresh: test-time settings of the R-CNN kinds.
        detections_per_img: detections kept per image (``None``: the kind's, 100 for the R-CNNs,
            300 for DINO).
        num_queries: DINO's matching queries (900), chosen from the encoder's proposals.
        dn_queries: DINO's contrastive denoising queries per batch (100; 0 turns denoising off),
            split into as many groups as fit the image with the most objects.
        dn_label_noise, dn_box_noise: DINO's denoising noise (0.5: a quarter of the labels flipped;
            1.0: corners moved up to half the box size, negatives one to two halves).
        encoder_layers, decoder_layers, transformer_ffn_dim: DINO's deformable transformer (6, 6,
            2048; ``fpn_channels`` wide).
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
    masks: bool | None = None
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
    box_loss: str | None = None
    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    detections_per_img: int | None = None
    mask_thresh: float = 0.5
    backbone_dtype: str = "fp32"
    resize_in_training: bool = True
    num_queries: int = 900
    dn_queries: int = 100
    dn_label_noise: float = 0.5
    dn_box_noise: float = 1.0
    encoder_layers: int = 6
    decoder_layers: int = 6
    transformer_ffn_dim: int = 2048

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
        kind = detector_kind(self.kind, "DetectorConfig.kind")
        if self.backbone.fpn_levels not in kind.levels:
            raise ValueError(f"a {self.kind} detector needs the backbone's pyramid levels "
                             f"{' or '.join(map(str, kind.levels))} (fpn_levels), got {self.backbone.fpn_levels}")
        for name, value in kind.defaults.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        if self.masks and not kind.has_masks:
            raise ValueError(f"a {self.kind} detector has no mask head: DetectorConfig.masks must be false")
        for name in ("num_queries", "encoder_layers", "decoder_layers", "transformer_ffn_dim", "detections_per_img"):
            if getattr(self, name) < 1:
                raise ValueError(f"DetectorConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.dn_queries < 0 or self.dn_label_noise < 0 or self.dn_box_noise < 0:
            raise ValueError("DetectorConfig.dn_queries, dn_label_noise and dn_box_noise must be >= 0, got "
                             f"{self.dn_queries}, {self.dn_label_noise}, {self.dn_box_noise}")
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


def input_transform(config: DetectorConfig) -> MMDetTransform:
    """Every kind's input transform: keep-ratio resize, normalisation and padding as ``config`` sets
    them (:class:`~.rcnn_parts.MMDetTransform`)."""
    min_size, max_size, divisible = config.resize
    return MMDetTransform(min_size, max_size, list(config.image_mean), list(config.image_std),
                          size_divisible=divisible, _skip_resize=not config.resize_in_training)


def detect_in_size_groups(images: list[torch.Tensor], padded_size: Callable[[int, int], tuple[int, int]],
                          detect: Callable[[list[torch.Tensor]], list[dict]]) -> list[dict]:
    """``detect(images)`` run on groups of images of one padded size, results in input order.

    In evaluation every image gets the detections it gets alone, whatever it is batched with: the
    branches resize their position embeddings to the padded grid, so a batch padded to its largest
    member would show an image at another size (MMDetection tests one image at a time)."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, image in enumerate(images):
        groups.setdefault(padded_size(*image.shape[-2:]), []).append(i)
    if len(groups) == 1:
        return detect(images)
    detections: list = [None] * len(images)
    for indices in groups.values():
        for i, detection in zip(indices, detect([images[i] for i in indices])):
            detections[i] = detection
    return detections


class Detector(nn.Module, HubMixin):
    """What every detector kind is: a module with its :class:`DetectorConfig` (``config``) that, in
    train mode, maps ``(images, targets)`` to a dict of losses and, in eval mode, ``images`` (a list
    of ``(3, H, W)`` float images in 0-1) to one dict per image: ``boxes`` ``(N, 4)`` x1 y1 x2 y2 in
    input-image pixels, ``labels`` 1-based, ``scores``, and for kinds with masks ``masks``
    ``(N, 1, H, W)`` probabilities. Targets are torchvision's (``boxes`` in input-image pixels,
    ``labels`` 1-based, optional ``masks`` and ``has_mask``). Every kind is shared with ``save_pretrained`` /
    ``push_to_hub`` and loaded with ``piip.from_pretrained`` (:class:`~piip.weights.sharing.HubMixin`)."""

    config: DetectorConfig

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        raise NotImplementedError


class PIIPDetector(GeneralizedRCNN, Detector):
    """torchvision's generalized R-CNN around a piip backbone, with its :class:`DetectorConfig`.

    ``model(images)`` in eval mode returns torchvision's detections (``boxes`` in input-image
    pixels, ``labels`` 1-based, ``scores``, ``masks`` as probabilities ``(N, 1, H, W)``); in train
    mode ``model(images, targets)`` returns the loss dict.

    In evaluation the images run in groups of one padded size (:func:`detect_in_size_groups`).
    Training pads each batch to its largest image, as the authors' aspect-ratio grouped batches are.
    """

    def __init__(self, config: DetectorConfig, backbone: DetectorBackbone, rpn: MMDetRegionProposalNetwork,
                 roi_heads: nn.Module, transform: MMDetTransform):
        super().__init__(backbone, rpn, roi_heads, transform)
        self.config = config

    def forward(self, images, targets=None):
        if self.training:
            return super().forward(images, targets)
        return detect_in_size_groups(images, self.transform.padded_size, super().forward)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.backbone.body.set_grad_checkpointing(enable)


class DetectorKind(NamedTuple):
    """A registered detector kind.

    Attributes:
        assemble: ``assemble(config, body) -> Detector``.
        has_masks: whether the kind can predict instance masks.
        defaults: the values of the :class:`DetectorConfig` fields left ``None``.
        levels: the backbone ``fpn_levels`` the kind accepts.
    """

    assemble: Callable[[DetectorConfig, PIIP], Detector]
    has_masks: bool
    defaults: dict[str, Any]
    levels: tuple[tuple[int, ...], ...] = ((0, 1, 2, 3),)


#: detector kind -> :class:`DetectorKind`; each kind is one module of this package, registered in
#: its ``__init__`` (``"mask_rcnn"``: :mod:`.mask_rcnn`)
DETECTOR_KINDS: dict[str, DetectorKind] = {}

_DEFAULTED = ("masks", "box_loss", "detections_per_img")


def detector_kind(name: str, where: str = "kind") -> DetectorKind:
    """The registered kind ``name``; any other is refused in one line naming ``where``."""
    if name not in DETECTOR_KINDS:
        raise ValueError(f"{where} must be one of {sorted(DETECTOR_KINDS)}, got {name!r}")
    return DETECTOR_KINDS[name]


def register_detector_kind(kind: str, assemble: Callable[[DetectorConfig, PIIP], Detector], *, has_masks: bool,
                           defaults: dict[str, Any], levels: tuple[tuple[int, ...], ...] = ((0, 1, 2, 3),)) -> None:
    """Let :func:`build_detector` (``kind=...``), runs (``model.head.kind``) and checkpoints build a
    detector of ``kind``; ``defaults`` gives every field that a config may leave ``None``."""
    if kind in DETECTOR_KINDS and DETECTOR_KINDS[kind].assemble is not assemble:
        raise ValueError(f"detector kind {kind!r} registered twice")
    if sorted(defaults) != sorted(_DEFAULTED):
        raise ValueError(f"detector kind {kind!r} must give defaults for exactly {_DEFAULTED}, got {sorted(defaults)}")
    DETECTOR_KINDS[kind] = DetectorKind(assemble, has_masks, dict(defaults), tuple(tuple(lv) for lv in levels))


def build_detector(backbone: PIIP, num_classes: int, **settings: Any) -> Detector:
    """A detector of ``kind`` (default ``"mask_rcnn"``: Mask R-CNN, or Faster R-CNN with
    ``masks=False``; ``"cascade_mask_rcnn"``; ``"dino"``) around a dense piip ``backbone``.

    Args:
        backbone: ``piip.create_model(name, task="det", ...)`` (any registered variant, PIIP or a
            single-branch ViTDet baseline), with its weights.
        num_classes: object classes, without background.
        settings: any other :class:`DetectorConfig` field (``masks``, ``class_names``,
            ``anchor_sizes``, ``min_size``, ``backbone_dtype``, ...).
    """
    config = DetectorConfig(backbone=backbone.config, num_classes=num_classes, **settings)
    return use_onednn_linears(DETECTOR_KINDS[config.kind].assemble(config, backbone))


def build_detector_from_config(config: DetectorConfig) -> Detector:
    """A freshly initialised detector from its config (a checkpoint's weights are loaded after)."""
    return use_onednn_linears(DETECTOR_KINDS[config.kind].assemble(config, PIIP(config.backbone)))
