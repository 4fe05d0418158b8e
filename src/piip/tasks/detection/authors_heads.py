"""The authors' MMDetection 2.x detectors as piip detectors: their Mask R-CNN necks and heads ->
torchvision's modules in a :class:`~piip.tasks.detection.PIIPDetector`, tensor by tensor (below);
their DINO neck and head -> piip's DINO (:mod:`.authors_dino_heads`). :func:`has_authors_heads`
recognises either and :func:`with_authors_heads` builds the detector it describes.

============================================  =====================================================
MMDetection key (``<module>.<weight|bias>``)   piip detector key, and what changes
============================================  =====================================================
``neck.lateral_convs.{i}.conv``               ``backbone.fpn.inner_blocks.{i}.0`` (1x1)
``neck.fpn_convs.{i}.conv``                   ``backbone.fpn.layer_blocks.{i}.0`` (3x3); the fifth
                                              level is max_pool(kernel 1, stride 2) in both
``rpn_head.rpn_conv``                         ``rpn.head.conv.0.0``
``rpn_head.rpn_cls``                          ``rpn.head.cls_logits``: sigmoid objectness, one channel
                                              per anchor in both (a softmax RPN, 2 per anchor, is refused)
``rpn_head.rpn_reg``                          ``rpn.head.bbox_pred``: channel ``4a + k`` in both; anchors
                                              ordered (y, x, ratio 0.5/1/2) in both, not rounded
``roi_head.bbox_head.shared_fcs.0`` / ``.1``  ``roi_heads.box_head.fc6`` / ``fc7``
``roi_head.bbox_head.fc_cls``                 ``roi_heads.box_predictor.cls_score``: MMDetection puts
                                              the background *last* (K + 1 logits), torchvision
                                              *first*: rows reordered ``[K, 0, ..., K-1]``
``roi_head.bbox_head.fc_reg``                 ``roi_heads.box_predictor.bbox_pred``: MMDetection regresses
                                              the K object classes (4K outputs), torchvision K + 1 with
                                              the background first: four zero rows prepended (the
                                              background's boxes are never used); target stds
                                              0.1/0.1/0.2/0.2 = torchvision's weights 10/10/5/5
``roi_head.mask_head.convs.{i}.conv``         ``roi_heads.mask_head.{i}.0``
``roi_head.mask_head.upsample``               ``roi_heads.mask_predictor.conv5_mask``
``roi_head.mask_head.conv_logits``            ``roi_heads.mask_predictor.mask_fcn_logits``: K maps in
                                              MMDetection, K + 1 in torchvision (a zero background
                                              map prepended)
============================================  =====================================================

A class-agnostic box regressor (``reg_class_agnostic=True``) or other head types are refused with the
key that shows it.
"""
from __future__ import annotations

import re
from collections.abc import Mapping

from typing import Any

import torch

from ...data.coco import COCO_CATEGORIES
from ...models.piip import PIIP
from ...weights.checkpoint import CheckpointError, check_state_dict
from ...weights.renaming import flatten_prefixed, rename_keys
from .authors_dino_heads import DINO_HEAD_PREFIXES, convert_dino_heads, dino_layout, has_dino_heads
from .model import build_detector

__all__ = ["HEAD_PREFIXES", "has_mask_rcnn_heads", "mask_rcnn_layout", "convert_mmdet_heads", "has_authors_heads",
           "with_authors_heads"]

HEAD_PREFIXES = ("neck", "rpn_head", "roi_head")

_RENAMES = (
    (re.compile(r"neck\.lateral_convs\.(\d+)\.conv\.(weight|bias)"), r"backbone.fpn.inner_blocks.\1.0.\2"),
    (re.compile(r"neck\.fpn_convs\.(\d+)\.conv\.(weight|bias)"), r"backbone.fpn.layer_blocks.\1.0.\2"),
    (re.compile(r"rpn_head\.rpn_conv\.(weight|bias)"), r"rpn.head.conv.0.0.\1"),
    (re.compile(r"rpn_head\.rpn_cls\.(weight|bias)"), r"rpn.head.cls_logits.\1"),
    (re.compile(r"rpn_head\.rpn_reg\.(weight|bias)"), r"rpn.head.bbox_pred.\1"),
    (re.compile(r"roi_head\.bbox_head\.shared_fcs\.0\.(weight|bias)"), r"roi_heads.box_head.fc6.\1"),
    (re.compile(r"roi_head\.bbox_head\.shared_fcs\.1\.(weight|bias)"), r"roi_heads.box_head.fc7.\1"),
    (re.compile(r"roi_head\.bbox_head\.fc_cls\.(weight|bias)"), r"roi_heads.box_predictor.cls_score.\1"),
    (re.compile(r"roi_head\.bbox_head\.fc_reg\.(weight|bias)"), r"roi_heads.box_predictor.bbox_pred.\1"),
    (re.compile(r"roi_head\.mask_head\.convs\.(\d+)\.conv\.(weight|bias)"), r"roi_heads.mask_head.\1.0.\2"),
    (re.compile(r"roi_head\.mask_head\.upsample\.(weight|bias)"), r"roi_heads.mask_predictor.conv5_mask.\1"),
    (re.compile(r"roi_head\.mask_head\.conv_logits\.(weight|bias)"), r"roi_heads.mask_predictor.mask_fcn_logits.\1"),
)


def _flat(extra: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return flatten_prefixed(extra, HEAD_PREFIXES)


def has_mask_rcnn_heads(extra: Mapping[str, Mapping[str, torch.Tensor]]) -> bool:
    """Whether an MMDetection checkpoint's non-backbone tensors hold a two-stage detector's neck and heads."""
    return all(prefix in extra for prefix in HEAD_PREFIXES)


def mask_rcnn_layout(extra: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, int | bool]:
    """``num_classes``, ``masks``, ``fpn_channels``, ``box_head_dim``, ``mask_head_dim`` of the heads."""
    flat = _flat(extra)
    try:
        fc_cls = flat["roi_head.bbox_head.fc_cls.weight"]
        fc_reg = flat["roi_head.bbox_head.fc_reg.weight"]
        fpn = flat["neck.fpn_convs.0.conv.weight"]
    except KeyError as err:
        raise CheckpointError(f"the checkpoint's heads are not MMDetection's Mask/Faster R-CNN ones: no {err}") from None
    classes = fc_cls.shape[0] - 1
    if fc_reg.shape[0] != 4 * classes:
        raise CheckpointError(f"roi_head.bbox_head.fc_reg has {fc_reg.shape[0]} outputs for {classes} classes: "
                              "a class-agnostic box regressor is not supported (torchvision regresses per class)")
    rpn_cls = flat["rpn_head.rpn_cls.weight"].shape[0]
    if rpn_cls != flat["rpn_head.rpn_reg.weight"].shape[0] // 4:
        raise CheckpointError(f"rpn_head.rpn_cls has {rpn_cls} outputs: a softmax RPN (2 per anchor) is not "
                              "supported (torchvision's RPN scores each anchor with one sigmoid logit)")
    masks = "roi_head.mask_head.conv_logits.weight" in flat
    layout: dict[str, int | bool] = dict(num_classes=classes, masks=masks, fpn_channels=fpn.shape[0],
                                         box_head_dim=flat["roi_head.bbox_head.shared_fcs.0.weight"].shape[0])
    if masks:
        layout["mask_head_dim"] = flat["roi_head.mask_head.convs.0.conv.weight"].shape[0]
    return layout


def convert_mmdet_heads(extra: Mapping[str, Mapping[str, torch.Tensor]]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The neck and head tensors under the detector's keys, in torchvision's layouts.

    Returns ``(tensors, names)``: ``names`` maps each produced key to the MMDetection key it came
    from (for error messages). Keys that have no place in a torchvision Mask R-CNN raise
    :class:`CheckpointError` listing them.
    """
    renamed, names = rename_keys(_flat(extra), _RENAMES, "a torchvision Mask R-CNN")
    return {new: _torchvision_layout(new, tensor) for new, tensor in renamed.items()}, names


def _torchvision_layout(key: str, tensor: torch.Tensor) -> torch.Tensor:
    """An MMDetection head tensor in torchvision's layout: the background class first in the
    classifier (MMDetection's is last), a background box block and mask map prepended."""
    if key.startswith("roi_heads.box_predictor.cls_score."):
        return torch.cat([tensor[-1:], tensor[:-1]])          # background last -> first
    if key.startswith("roi_heads.box_predictor.bbox_pred."):
        return torch.cat([tensor.new_zeros((4, *tensor.shape[1:])), tensor])
    if key.startswith("roi_heads.mask_predictor.mask_fcn_logits."):
        return torch.cat([tensor.new_zeros((1, *tensor.shape[1:])), tensor])
    return tensor


def has_authors_heads(extra: Mapping[str, Mapping[str, torch.Tensor]]) -> bool:
    """Whether an MMDetection checkpoint's non-backbone tensors hold a Mask/Faster R-CNN's or a DINO's
    neck and heads."""
    return has_mask_rcnn_heads(extra) or has_dino_heads(extra)


def with_authors_heads(backbone: PIIP, converted: dict[str, torch.Tensor], extra: dict, settings: Mapping[str, Any]):
    """A complete detector from a converted backbone and MMDetection's neck and heads: a Mask/Faster
    R-CNN, or a DINO (``kind="dino"``)."""
    if has_mask_rcnn_heads(extra):
        layout: dict[str, Any] = mask_rcnn_layout(extra)
        heads, sources = convert_mmdet_heads(extra)
        prefixes = HEAD_PREFIXES
    else:
        layout = dict(kind="dino", **dino_layout(extra))
        heads, sources = convert_dino_heads(extra)
        prefixes = DINO_HEAD_PREFIXES
    names: dict[str, Any] = {}
    if layout["num_classes"] == len(COCO_CATEGORIES):
        names = dict(class_names=tuple(n for _, n in COCO_CATEGORIES), category_ids=tuple(i for i, _ in COCO_CATEGORIES))
    detector = build_detector(backbone, **{**layout, **names, **settings})
    state = {f"backbone.body.{k}": v for k, v in converted.items()} | heads
    check_state_dict(state, detector, what="converted detector checkpoint", names=sources)
    detector.load_state_dict(state, strict=True)
    rest = {prefix: tensors for prefix, tensors in extra.items() if prefix not in prefixes}
    return detector.eval(), rest, len(state)
