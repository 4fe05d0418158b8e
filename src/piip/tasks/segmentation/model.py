"""UperNet (with an FCN auxiliary head) on any dense piip backbone, with MMSegmentation's numerics.

Written here because the maintained UperNet heads either require their own backbone classes or
change the numerics; this one follows MMSegmentation 0.x (``UPerHead``, ``FCNHead``,
``BaseDecodeHead``) layer for layer and under its module names, so the authors' segmentation
checkpoints map onto it key for key:

* every ``ConvModule`` is ``conv`` (no bias) -> ``bn`` -> ReLU (``ConvBNReLU``: ``.conv``, ``.bn``);
* **UperNet**: a pyramid pooling module on the coarsest map (adaptive average pools 1, 2, 3, 6 ->
  1x1 ConvModule -> bilinear back, ``align_corners=False``), concatenated with the map and fused by
  a 3x3 ``bottleneck``; 1x1 ``lateral_convs`` on the other maps, top-down bilinear sums, 3x3
  ``fpn_convs``, every level resized to the finest and fused by a 3x3 ``fpn_bottleneck``;
  ``Dropout2d(0.1)`` and a 1x1 ``conv_seg`` (normal(0, 0.01) init);
* **FCN auxiliary head** on the stride-16 map: one 3x3 ConvModule, ``Dropout2d(0.1)``, ``conv_seg``;
  its loss weighs 0.4;
* losses: cross-entropy of the logits resized (bilinear) to the labels, ignore index 255, averaged
  over *all* pixels as MMSegmentation 0.27 does by default (``avg_non_ignore=False``);
* BatchNorm, converted to SyncBatchNorm by the engine when it trains on several GPUs;
* heads and losses in fp32 even under autocast (the authors run only the backbone in bf16).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...config.model import PIIPConfig
from ...config.typed import Serializable
from ...models.piip import PIIP
from ...ops import use_onednn_linears
from ...precision import autocast, autocast_dtype
from ...weights.sharing import HubMixin

__all__ = ["SegmenterConfig", "PIIPSegmenter", "UPerHead", "FCNHead", "ConvBNReLU", "build_segmenter",
           "build_segmenter_from_config"]


class ConvBNReLU(nn.Module):
    """MMSegmentation's ``ConvModule`` with a BatchNorm: conv (no bias) -> BN -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, padding: int = 0):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.activate = nn.ReLU(inplace=True)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")  # mmcv's kaiming_init

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.bn(self.conv(x)))


def resize(x: torch.Tensor, size) -> torch.Tensor:
    """Bilinear, ``align_corners=False`` (every resize of MMSegmentation's heads and inference)."""
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def adaptive_avg_pool(x: torch.Tensor, size: int) -> torch.Tensor:
    """``F.adaptive_avg_pool2d(x, size)``; while exporting, the same bins as two matrix products.

    ONNX has no adaptive pooling: the exporter writes an ``AveragePool`` whose kernel and strides are
    the example's, wrong at other map sizes. Row ``i`` of the bin matrix averages input pixels
    ``floor(i * n / size)`` to ``ceil((i + 1) * n / size)``, PyTorch's bins, for any ``n``.
    """
    if not torch.compiler.is_exporting():
        return F.adaptive_avg_pool2d(x, size)

    def bins(n: int) -> torch.Tensor:
        i = torch.arange(size, device=x.device)[:, None]
        j = torch.arange(n, device=x.device)[None]
        inside = ((j >= i * n // size) & (j < ((i + 1) * n + size - 1) // size)).to(x.dtype)
        return inside / inside.sum(1, keepdim=True)

    return torch.einsum("ih,bchw,jw->bcij", bins(x.shape[-2]), x, bins(x.shape[-1]))


class _AdaptiveAvgPool(nn.AdaptiveAvgPool2d):
    """``nn.AdaptiveAvgPool2d`` (same name and state) that exports for every input size."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return adaptive_avg_pool(x, self.output_size)


class _DecodeHead(nn.Module):
    """What MMSegmentation's ``BaseDecodeHead`` adds: dropout and the 1x1 classifier."""

    def __init__(self, channels: int, num_classes: int, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        nn.init.normal_(self.conv_seg.weight, std=0.01)
        nn.init.zeros_(self.conv_seg.bias)

    def cls_seg(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_seg(self.dropout(x))


class UPerHead(_DecodeHead):
    """UperNet's decode head over four maps (finest first), ``channels`` wide."""

    def __init__(self, in_channels: list[int], channels: int, num_classes: int, pool_scales=(1, 2, 3, 6),
                 dropout: float = 0.1):
        super().__init__(channels, num_classes, dropout)
        self.psp_modules = nn.ModuleList(
            nn.Sequential(_AdaptiveAvgPool(scale), ConvBNReLU(in_channels[-1], channels, 1)) for scale in pool_scales)
        self.bottleneck = ConvBNReLU(in_channels[-1] + len(pool_scales) * channels, channels, 3, padding=1)
        self.lateral_convs = nn.ModuleList(ConvBNReLU(c, channels, 1) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(ConvBNReLU(channels, channels, 3, padding=1) for _ in in_channels[:-1])
        self.fpn_bottleneck = ConvBNReLU(len(in_channels) * channels, channels, 3, padding=1)

    def forward(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        top = inputs[-1]
        pooled = [resize(ppm(top), top.shape[2:]) for ppm in self.psp_modules]
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, inputs[:-1])]
        laterals.append(self.bottleneck(torch.cat([top, *pooled], dim=1)))
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + resize(laterals[i], laterals[i - 1].shape[2:])
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals[:-1])] + [laterals[-1]]
        outs = [outs[0]] + [resize(x, outs[0].shape[2:]) for x in outs[1:]]
        return self.cls_seg(self.fpn_bottleneck(torch.cat(outs, dim=1)))


class FCNHead(_DecodeHead):
    """MMSegmentation's ``FCNHead`` (``num_convs=1``, ``concat_input=False``): the auxiliary head."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, dropout: float = 0.1):
        super().__init__(channels, num_classes, dropout)
        self.convs = nn.Sequential(ConvBNReLU(in_channels, channels, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cls_seg(self.convs(x))


@dataclass(frozen=True)
class SegmenterConfig(Serializable):
    """Everything that rebuilds a segmenter (stored in its checkpoint).

    Attributes:
        backbone: the dense piip backbone (maps at strides 4, 8, 16, 32).
        num_classes: classes predicted per pixel (ADE20K: 150).
        class_names: their names (empty when unknown).
        channels: UperNet's width (MMSegmentation's 512; the authors' InternViT configs 1536).
        aux_channels: the FCN auxiliary head's width (0: no auxiliary head); aux_weight: its loss weight.
        dropout: before both classifiers.
        ignore_index: label of pixels without a class.
        class_weight: per-class weights of the cross-entropy (MMSegmentation's ``class_weight``;
            empty: all 1), e.g. to keep a dominant background class from drowning the rest.
        image_mean, image_std: normalisation of 0-1 images.
        backbone_dtype: autocast dtype of the backbone (``"fp32"``, ``"bf16"``, ``"fp16"``): the
            authors train theirs in bf16; heads and losses always run in float32.
        test_scale: ``(long, short)``: images are resized to fit it (aspect ratio kept, up or
            down) before inference and the logits resized back, as MMSegmentation's ADE20K test
            pipeline (2048, 512); ``None`` keeps the images' size. (The authors' fork sets the
            short side to 512 with no cap on the long one: the same for images up to 4:1.)
        crop_size, stride: sliding-window inference (``inference="slide"``); ``inference="whole"``
            runs the whole image at once.
    """

    backbone: PIIPConfig
    num_classes: int
    class_names: tuple[str, ...] = ()
    channels: int = 512
    aux_channels: int = 256
    aux_weight: float = 0.4
    dropout: float = 0.1
    ignore_index: int = 255
    class_weight: tuple[float, ...] = ()
    image_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    image_std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    backbone_dtype: str = "fp32"
    test_scale: tuple[int, int] | None = (2048, 512)
    inference: str = "slide"
    crop_size: int = 512
    stride: int = 341

    def __post_init__(self) -> None:
        for name in ("class_names", "class_weight", "image_mean", "image_std") + (("test_scale",) if self.test_scale else ()):
            if getattr(self, name) is None or isinstance(getattr(self, name), (str, int, float)):
                raise ValueError(f"SegmenterConfig.{name} must be a list of values, got {getattr(self, name)!r}")
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.channels < 1 or self.aux_channels < 0:
            raise ValueError(f"SegmenterConfig.channels must be >= 1 and aux_channels >= 0 (0: no auxiliary head), "
                             f"got {self.channels}, {self.aux_channels}")
        if not 0 <= self.dropout < 1 or self.aux_weight < 0:
            raise ValueError(f"SegmenterConfig.dropout must be in [0, 1) and aux_weight >= 0, got {self.dropout}, "
                             f"{self.aux_weight}")
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or min(self.image_std) <= 0:
            raise ValueError(f"SegmenterConfig.image_mean / image_std need 3 values each, std > 0, got "
                             f"{list(self.image_mean)}, {list(self.image_std)}")
        if self.test_scale is not None and (len(self.test_scale) != 2 or min(self.test_scale) < 1):
            raise ValueError(f"SegmenterConfig.test_scale must be (long, short) sizes or None, got {self.test_scale}")
        autocast_dtype(self.backbone_dtype, "SegmenterConfig.backbone_dtype")
        if self.backbone.task != "det" or self.backbone.fpn_levels != (0, 1, 2, 3):
            raise ValueError("a segmenter needs a dense backbone with its four pyramid levels "
                             "(create_model(..., task='det'))")
        if self.num_classes < 1:
            raise ValueError(f"SegmenterConfig.num_classes must be >= 1, got {self.num_classes}")
        if self.class_names and len(self.class_names) != self.num_classes:
            raise ValueError(f"SegmenterConfig.class_names has {len(self.class_names)} names for "
                             f"{self.num_classes} classes")
        if self.class_weight and (len(self.class_weight) != self.num_classes or min(self.class_weight) < 0):
            raise ValueError(f"SegmenterConfig.class_weight needs {self.num_classes} non-negative weights, "
                             f"got {list(self.class_weight)}")
        if self.inference not in ("slide", "whole"):
            raise ValueError(f"SegmenterConfig.inference must be 'slide' or 'whole', got {self.inference!r}")
        if not 0 < self.stride <= self.crop_size:
            raise ValueError(f"SegmenterConfig.stride and crop_size need 0 < stride <= crop_size, got "
                             f"{self.stride}, {self.crop_size}")


class PIIPSegmenter(nn.Module, HubMixin):
    """A dense piip backbone with UperNet (``decode_head``) and an FCN auxiliary head.

    ``model(images)`` (0-1 ``(B, 3, H, W)``, normalised inside) returns the decode head's logits
    resized to the images; ``model(images, labels)`` the training losses;
    :func:`~piip.tasks.segmentation.evaluation.segment` runs whole or sliding-window inference.
    ``save_pretrained`` / ``push_to_hub`` share it; ``piip.from_pretrained`` loads it back.
    """

    def __init__(self, config: SegmenterConfig, backbone: PIIP):
        super().__init__()
        if not isinstance(backbone, PIIP) or backbone.config != config.backbone:
            raise ValueError("the segmenter's backbone must be the dense PIIP its config describes")
        self.config = config
        self.backbone = backbone
        width = backbone.out_channels
        self.decode_head = UPerHead([width] * 4, config.channels, config.num_classes, dropout=config.dropout)
        self.auxiliary_head = (FCNHead(width, config.aux_channels, config.num_classes, dropout=config.dropout)
                               if config.aux_channels else None)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        mean = images.new_tensor(self.config.image_mean)[:, None, None]
        std = images.new_tensor(self.config.image_std)[:, None, None]
        return (images - mean) / std

    def _features(self, images: torch.Tensor) -> list[torch.Tensor]:
        with autocast(images.device.type, autocast_dtype(self.config.backbone_dtype)):
            features = self.backbone(self.normalize(images))
        return [f.float() for f in features.values()]

    @staticmethod
    def _fp32(features: list[torch.Tensor]):
        """The heads and losses run in fp32 under autocast too: the authors keep only the backbone in
        bf16 (their ``ToBFloat16Hook``; UperNet casts its inputs and itself to fp32)."""
        return torch.autocast(features[0].device.type, enabled=False)

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None):
        """Logits ``(B, num_classes, H, W)`` of 0-1 images ``(B, 3, H, W)`` (normalised here); with
        ``labels`` (``(B, H, W)``) the training losses instead (torchvision's detector convention)."""
        if labels is not None:
            return self.losses(images, labels)
        features = self._features(images)
        with self._fp32(features):
            return resize(self.decode_head(features), images.shape[2:])

    def losses(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Cross-entropy of the decode head and (x ``aux_weight``) the auxiliary head on the stride-16
        map, logits resized to the labels, averaged over all pixels (MMSegmentation 0.27)."""
        if self.training and images.shape[0] < 2 and not isinstance(self.decode_head.bottleneck.bn, nn.SyncBatchNorm):
            raise ValueError("UperNet's pyramid pooling normalises a 1x1 map with BatchNorm: training needs at least "
                             "2 images per process (or SyncBatchNorm across GPU processes)")
        features = self._features(images)
        with self._fp32(features):
            out = {"loss_decode": self._ce(self.decode_head(features), labels)}
            if self.auxiliary_head is not None:
                out["loss_aux"] = self.config.aux_weight * self._ce(self.auxiliary_head(features[2]), labels)
        return out

    def _ce(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = resize(logits, labels.shape[-2:])
        weight = logits.new_tensor(self.config.class_weight) if self.config.class_weight else None
        loss = F.cross_entropy(logits, labels.long(), weight=weight, ignore_index=self.config.ignore_index,
                               reduction="none")
        return loss.mean()  # MMSegmentation 0.27: weighted per-pixel losses over all pixels

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.backbone.set_grad_checkpointing(enable)


def build_segmenter(backbone: PIIP, num_classes: int, **settings: Any) -> PIIPSegmenter:
    """UperNet + FCN auxiliary head around a dense piip ``backbone`` (``create_model(name, task="det")``,
    PIIP variants and single-branch baselines alike); ``settings``: any :class:`SegmenterConfig` field
    (``channels=1536`` as the authors' InternViT configs, ``aux_channels``, ``class_names``, ...)."""
    return use_onednn_linears(PIIPSegmenter(SegmenterConfig(backbone=backbone.config, num_classes=num_classes, **settings),
                                            backbone))


def build_segmenter_from_config(config: SegmenterConfig) -> PIIPSegmenter:
    """A freshly initialised segmenter from its config (a checkpoint's weights are loaded after)."""
    return use_onednn_linears(PIIPSegmenter(config, PIIP(config.backbone)))
