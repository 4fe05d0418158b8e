"""The ``"mask_rcnn"`` detector kind: torchvision's Mask R-CNN / Faster R-CNN parts with MMDetection's
rules (:mod:`.rcnn_parts`), set up and initialised as the authors' MMDetection 2.x configs
(the settings are listed in :mod:`.model`). The RPN and the initialisation rules are shared with
the other R-CNN kind (:mod:`.cascade`), the input transform with every kind (:func:`.model.input_transform`)."""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead

from ...models.piip import PIIP
from ...precision import autocast_dtype
from .model import DetectorBackbone, DetectorConfig, PIIPDetector, input_transform
from .rcnn_parts import (AlignedMultiScaleRoIAlign, MMDetRegionProposalNetwork, MMDetRoIHeads,
                         PyramidAnchorGenerator)

__all__ = ["assemble_mask_rcnn"]


def init_like_mmdet(xavier: Iterable[nn.Module], box_predictors: Iterable[FastRCNNPredictor]) -> None:
    """MMDetection's initialisation where torchvision's differs: Xavier-uniform convs and FC layers
    among ``xavier`` (the FPN, the box heads' FC layers), normal(0, 0.01) classifiers and
    normal(0, 0.001) box regressors, zero biases. (The RPN head's normal(0, 0.01) and the mask
    head's Kaiming init are already the same in both.)"""
    for m in xavier:
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    for predictor in box_predictors:
        for layer, std in ((predictor.cls_score, 0.01), (predictor.bbox_pred, 0.001)):
            nn.init.normal_(layer.weight, std=std)
            nn.init.zeros_(layer.bias)


def mmdet_rpn(config: DetectorConfig, channels: int) -> MMDetRegionProposalNetwork:
    """The RPN of the authors' (and ViT-Adapter's) MMDetection 2.x R-CNN configs on ``channels``-wide
    FPN levels (see :mod:`.model`)."""
    anchors = PyramidAnchorGenerator(tuple((s,) for s in config.anchor_sizes),
                                     ((0.5, 1.0, 2.0),) * len(config.anchor_sizes), strides=(4, 8, 16, 32, 64))
    return MMDetRegionProposalNetwork(anchors, RPNHead(channels, anchors.num_anchors_per_location()[0]),
                                      fg_iou_thresh=0.7, bg_iou_thresh=0.3, min_pos_iou=0.3,
                                      batch_size_per_image=config.rpn_batch_size_per_image, positive_fraction=0.5,
                                      pre_nms_top_n=dict(training=2000, testing=1000),
                                      post_nms_top_n=dict(training=config.rpn_post_nms_top_n_train, testing=1000),
                                      nms_thresh=0.7, box_loss=config.box_loss)


def mask_head_parts(config: DetectorConfig, levels: list[str]) -> dict[str, Any]:
    """The mask RoI pooler, head and predictor of an R-CNN stage (MMDetection's ``FCNMaskHead``: four
    3x3 convs ``config.mask_head_dim`` wide, a 2x deconvolution, class-specific 28x28 logits on 14x14
    aligned RoIAlign), as ``RoIHeads`` keyword arguments; none without ``config.masks``."""
    if not config.masks:
        return {}
    width = config.mask_head_dim
    return dict(mask_roi_pool=AlignedMultiScaleRoIAlign(levels, 14, sampling_ratio=0),
                mask_head=MaskRCNNHeads(config.fpn_channels, (width,) * 4, 1),
                mask_predictor=MaskRCNNPredictor(width, width, config.num_classes + 1))


def assemble_mask_rcnn(config: DetectorConfig, body: PIIP) -> PIIPDetector:
    """Mask R-CNN (or Faster R-CNN without ``config.masks``) around ``body`` as the authors' MMDetection
    2.x configs set it up (see :mod:`.model`)."""
    backbone = DetectorBackbone(body, config.fpn_channels, autocast_dtype(config.backbone_dtype))
    channels = config.fpn_channels
    rpn = mmdet_rpn(config, channels)
    levels = ["0", "1", "2", "3"]
    box_pool = AlignedMultiScaleRoIAlign(levels, 7, sampling_ratio=0)
    mask_parts = mask_head_parts(config, levels)
    box_head = TwoMLPHead(channels * 7 * 7, config.box_head_dim)
    box_predictor = FastRCNNPredictor(config.box_head_dim, config.num_classes + 1)
    init_like_mmdet([*backbone.fpn.modules(), box_head.fc6, box_head.fc7], [box_predictor])
    roi_heads = MMDetRoIHeads(box_pool, box_head, box_predictor,
                              fg_iou_thresh=0.5, bg_iou_thresh=0.5, min_pos_iou=0.5,
                              batch_size_per_image=config.box_batch_size_per_image, positive_fraction=0.25,
                              bbox_reg_weights=None, score_thresh=config.score_thresh, nms_thresh=config.nms_thresh,
                              detections_per_img=config.detections_per_img, box_loss=config.box_loss, **mask_parts)
    return PIIPDetector(config, backbone, rpn, roi_heads, input_transform(config))
