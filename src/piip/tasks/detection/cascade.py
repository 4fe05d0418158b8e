"""The ``"cascade_mask_rcnn"`` detector kind: ViT-Adapter's Cascade Mask R-CNN, composed from
torchvision's parts with MMDetection 2.x's rules (``docs/design/cascade_and_dino.md``, section
"Cascade Mask R-CNN (ViT-Adapter)", is the sourced spec).

Every setting and its source (VA: ``czczup/ViT-Adapter`` ``detection/configs/cascade_rcnn/
cascade_mask_rcnn_deit_adapter_{small,base}_fpn_3x_coco.py`` over ``_base_/models/
cascade_mask_rcnn_r50_fpn.py``; MMDet: the MMDetection 2.x class named):

* neck, RPN, anchors, RoIAlign, input transform: the ``"mask_rcnn"`` kind's (VA's base model is
  MMDetection's R50 Cascade: ``FPN`` 256 wide with 5 levels, ``RPNHead``, anchors 32-512 x ratios
  0.5/1/2 at strides 4-64, ``MaxIoUAssigner`` 0.7/0.3/min_pos 0.3, 256 anchors at 50% positives,
  2000 proposals per level before the per-level NMS at 0.7, 1000 kept in testing; ``RoIAlign``
  ``aligned=True``, sampling ratio 0, 7x7 boxes and 14x14 masks on P2-P5). The RPN's box loss is
  ``config.box_loss``: the kind's default ``"smooth_l1"`` is VA's ``SmoothL1Loss(beta=1/9)``,
  torchvision's. Proposals kept after the RPN's NMS in training: ``config.rpn_post_nms_top_n_train``
  (VA's ``rpn_proposal.max_per_img`` is 2000; the config's default is the Mask R-CNN's 1000).
* three stages (VA ``CascadeRoIHead(num_stages=3, stage_loss_weights=[1, 0.5, 0.25])``,
  ``train_cfg.rcnn``): :data:`STAGE_IOUS` 0.5/0.6/0.7 as positive, negative and minimum positive
  IoU with ``match_low_quality=False`` (MMDet ``MaxIoUAssigner``: :class:`.rcnn_parts.MaxIoUMatcher`);
  ``RandomSampler`` of ``config.box_batch_size_per_image`` (512) at 25% positives with the ground
  truth boxes added as proposals (torchvision appends them, MMDetection prepends: random sampling
  does not care); :data:`STAGE_STDS` of ``DeltaXYWHBBoxCoder`` (means 0), torchvision's
  ``BoxCoder`` weights being their inverses, with MMDetection's dw/dh clamp at +-log(1000/16)
  (:class:`MMDetBoxCoder`); :data:`STAGE_LOSS_WEIGHTS` 1/0.5/0.25 on every loss of the stage.
* box head per stage (VA: ``ConvFCBBoxHead(num_shared_convs=4, num_shared_fcs=1,
  conv_out_channels=256, fc_out_channels=1024, norm_cfg=SyncBN)``): 4 x (3x3 conv
  ``config.fpn_channels`` wide without bias, BatchNorm, ReLU), a ``config.box_head_dim`` FC layer
  with ReLU (torchvision's ``FastRCNNConvFCHead``), a classifier over K + 1 classes and a
  **class-specific** regressor (VA ``reg_class_agnostic=False``; the issue asked for a
  class-agnostic one, the authors' config wins). The regressor has torchvision's ``4 * (K + 1)``
  outputs (``FastRCNNPredictor``); the background block is never used. Init (MMDet
  ``ConvFCBBoxHead`` / ``BBoxHead`` ``init_cfg``, mmcv ``ConvModule``): convs Kaiming-normal
  (fan_out, ReLU), BatchNorm 1/0, FC Xavier-uniform, classifier N(0, 0.01), regressor N(0, 0.001),
  zero biases. The BatchNorm is ``nn.BatchNorm2d``, over the RoIs of the process's batch; the engine
  converts it to ``SyncBatchNorm`` (VA's) when it trains on several GPUs.
* box losses per stage (MMDet ``BBoxHead.loss``, ``reg_decoded_bbox=True``): cross-entropy over the
  sampled RoIs, and ``GIoULoss(loss_weight=10)`` between each positive's box decoded with its ground
  truth class's deltas and its absolute ground truth box; both divided by the number of sampled RoIs.
* mask head per stage (MMDet ``CascadeRoIHead.init_mask_head``: three ``FCNMaskHead`` s): torchvision's
  ``MaskRCNNHeads`` + ``MaskRCNNPredictor`` as the ``"mask_rcnn"`` kind's (4 x (3x3 conv
  ``config.mask_head_dim`` with bias, ReLU), a 2x deconvolution, class-specific 28x28 logits), trained
  on the stage's sampled positives against binary ``aligned=True`` targets (:class:`.rcnn_parts.MMDetRoIHeads`).
* training refinement (MMDet ``CascadeRoIHead.forward_train``, ``BBoxHead.refine_bboxes``,
  ``regress_by_class``): :func:`refine_training_rois`.
* test (MMDet ``CascadeRoIHead.simple_test``, ``BBoxHead.get_bboxes``, ``multiclass_nms``,
  ``merge_aug_masks``): the mean of the three stages' raw logits, each on its own input RoIs, the
  last stage's class-specific boxes, softmax, score > ``config.score_thresh`` (0.05), NMS at
  ``config.nms_thresh`` (0.5) per class, the top ``config.detections_per_img`` (100); the three
  mask heads' sigmoids averaged on the detected boxes. torchvision's post-processing also drops
  boxes under 0.01 pixel wide or high, which MMDetection keeps (they can match no object).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor
from torchvision.ops import clip_boxes_to_image, generalized_box_iou_loss

from ...models.piip import PIIP
from ...precision import autocast_dtype
from .mask_rcnn import init_like_mmdet, mask_head_parts, mmdet_rpn
from .model import DetectorBackbone, DetectorConfig, PIIPDetector, input_transform
from .rcnn_parts import AlignedMultiScaleRoIAlign, MMDetRoIHeads

__all__ = ["assemble_cascade_mask_rcnn", "CascadeRoIHeads", "MMDetBoxCoder", "refine_training_rois",
           "STAGE_IOUS", "STAGE_STDS", "STAGE_LOSS_WEIGHTS", "GIOU_LOSS_WEIGHT"]

#: each stage's IoU threshold (positive = negative = minimum positive IoU)
STAGE_IOUS = (0.5, 0.6, 0.7)
#: each stage's ``DeltaXYWHBBoxCoder`` target stds (means 0)
STAGE_STDS = ((0.1, 0.1, 0.2, 0.2), (0.05, 0.05, 0.1, 0.1), (0.033, 0.033, 0.067, 0.067))
#: the factor on every loss of a stage
STAGE_LOSS_WEIGHTS = (1.0, 0.5, 0.25)
#: ``GIoULoss(loss_weight=10.0)``
GIOU_LOSS_WEIGHT = 10.0


class MMDetBoxCoder(BoxCoder):
    """torchvision's box coder with MMDetection's clamp of the decoded dw, dh to +-log(1000/16)
    (``DeltaXYWHBBoxCoder``); torchvision clamps them from above only. The weights are the inverse
    target stds."""

    def decode_single(self, rel_codes: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        # the codes are the deltas times the weights: clamp each dw, dh code at -clip * its weight
        _, _, ww, wh = self.weights
        low = rel_codes.new_tensor([-math.inf, -math.inf, -self.bbox_xform_clip * ww, -self.bbox_xform_clip * wh])
        codes = torch.maximum(rel_codes.unflatten(-1, (-1, 4)), low).flatten(-2)
        return super().decode_single(codes, boxes)


def regress_by_class(coder: BoxCoder, rois: list[torch.Tensor], deltas: torch.Tensor, labels: torch.Tensor,
                     image_shapes: list[tuple[int, int]]) -> list[torch.Tensor]:
    """Every RoI (per image, concatenated in ``deltas``' rows) moved by the deltas of its class in
    ``labels`` and clipped to its image (MMDetection's ``regress_by_class`` with ``max_shape``)."""
    chosen = deltas.unflatten(-1, (-1, 4))[torch.arange(len(deltas), device=deltas.device), labels]
    boxes = coder.decode_single(chosen, torch.cat(rois))
    return [clip_boxes_to_image(b, shape) for b, shape in zip(boxes.split([len(r) for r in rois]), image_shapes)]


@torch.no_grad()
def refine_training_rois(coder: BoxCoder, rois: list[torch.Tensor], labels: list[torch.Tensor],
                         class_logits: torch.Tensor, deltas: torch.Tensor, is_gt: list[torch.Tensor],
                         image_shapes: list[tuple[int, int]]) -> list[torch.Tensor]:
    """The next stage's proposals in training: every sampled RoI of a stage regressed with the deltas
    of its target class when it is a positive and of its highest-scoring object class when it is a
    negative, clipped to its image; the ground truth boxes that were added as proposals
    (``is_gt``) are dropped. Detached, as MMDetection computes them under ``no_grad``."""
    target = torch.cat(labels)
    predicted = class_logits[:, 1:].argmax(dim=1) + 1          # column 0 is the background
    chosen = torch.where(target > 0, target, predicted)
    boxes = regress_by_class(coder, rois, deltas, chosen, image_shapes)
    return [b[~gt] for b, gt in zip(boxes, is_gt)]


class CascadeRoIHeads(nn.Module):
    """The three stages of Cascade Mask R-CNN, each an :class:`~.rcnn_parts.MMDetRoIHeads` that holds
    the stage's assigner, sampler, box coder, box head, mask head and mask loss; the cascade drives
    them (their own ``forward``, a Mask R-CNN head's, and ``box_loss`` are not used). In training
    ``forward`` returns the losses ``loss_{classifier,box_reg,mask}_s{i}``; in evaluation the
    detections, as torchvision's ``RoIHeads``."""

    def __init__(self, stages: list[MMDetRoIHeads], loss_weights: tuple[float, ...] = STAGE_LOSS_WEIGHTS,
                 giou_weight: float = GIOU_LOSS_WEIGHT):
        super().__init__()
        if len(stages) != len(loss_weights):
            raise ValueError(f"{len(stages)} stages for {len(loss_weights)} stage loss weights")
        self.stages = nn.ModuleList(stages)
        self.loss_weights = tuple(loss_weights)
        self.giou_weight = giou_weight

    def has_mask(self) -> bool:
        return self.stages[0].has_mask()

    def forward(self, features: dict[str, torch.Tensor], proposals: list[torch.Tensor],
                image_shapes: list[tuple[int, int]], targets: list[dict[str, torch.Tensor]] | None = None,
                ) -> tuple[list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
        if self.training:
            return [], self.losses(features, proposals, image_shapes, targets)
        return self.detect(features, proposals, image_shapes), {}

    @staticmethod
    def sample(stage: MMDetRoIHeads, proposals: list[torch.Tensor], targets: list[dict[str, torch.Tensor]]):
        """A stage's training RoIs per image: its proposals with the ground truth boxes added,
        assigned at the stage's IoU threshold and sampled. Returns the sampled RoIs, their
        ground-truth indices, labels (0: background) and whether each is an added ground truth box."""
        gt_boxes = [t["boxes"].to(p.dtype) for t, p in zip(targets, proposals)]
        counts = [len(p) for p in proposals]
        candidates = stage.add_gt_proposals(proposals, gt_boxes)
        matched, labels = stage.assign_targets_to_proposals(candidates, gt_boxes, [t["labels"] for t in targets])
        sampled = stage.subsample(labels)
        return ([c[s] for c, s in zip(candidates, sampled)], [m[s] for m, s in zip(matched, sampled)],
                [lab[s] for lab, s in zip(labels, sampled)], [s >= n for s, n in zip(sampled, counts)])

    def giou_loss(self, coder: BoxCoder, rois: list[torch.Tensor], deltas: torch.Tensor, labels: list[torch.Tensor],
                  matched: list[torch.Tensor], targets: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        """``giou_weight`` x the summed GIoU loss of the positives' boxes decoded with their ground
        truth class's deltas against their ground truth boxes, over the number of sampled RoIs."""
        target_labels = torch.cat(labels)
        positive = torch.where(target_labels > 0)[0]
        chosen = deltas.unflatten(-1, (-1, 4))[positive, target_labels[positive]]
        boxes = coder.decode_single(chosen, torch.cat(rois)[positive])
        gt = torch.cat([t["boxes"][m[lab > 0]] for t, m, lab in zip(targets, matched, labels)]).to(boxes)
        return self.giou_weight * generalized_box_iou_loss(boxes, gt, reduction="sum") / len(target_labels)

    def losses(self, features: dict[str, torch.Tensor], proposals: list[torch.Tensor],
               image_shapes: list[tuple[int, int]], targets: list[dict[str, torch.Tensor]] | None,
               ) -> dict[str, torch.Tensor]:
        """The three stages' weighted losses, each stage trained on the previous one's refined RoIs."""
        self.stages[0].check_targets(targets)
        losses: dict[str, torch.Tensor] = {}
        for i, (stage, weight) in enumerate(zip(self.stages, self.loss_weights)):
            rois, matched, labels, is_gt = self.sample(stage, proposals, targets)
            if not sum(len(r) for r in rois):  # nothing to learn from: MMDetection ends the cascade here
                break
            class_logits, deltas = stage.box_predictor(stage.box_head(stage.box_roi_pool(features, rois, image_shapes)))
            stage_losses = {"loss_classifier": F.cross_entropy(class_logits, torch.cat(labels)),
                            "loss_box_reg": self.giou_loss(stage.box_coder, rois, deltas, labels, matched, targets)}
            if stage.has_mask():
                stage_losses["loss_mask"] = stage._mask_loss(features, rois, image_shapes, targets, matched, labels)
            losses.update({f"{name}_s{i}": value * weight for name, value in stage_losses.items()})
            if i + 1 < len(self.stages):
                proposals = refine_training_rois(stage.box_coder, rois, labels, class_logits, deltas, is_gt,
                                                 image_shapes)
        return losses

    def stage_outputs(self, features: dict[str, torch.Tensor], proposals: list[torch.Tensor],
                      image_shapes: list[tuple[int, int]]):
        """Each stage's raw class logits and deltas at test time, every stage on the RoIs the
        previous one regressed with its highest-scoring object class (stage 0 on ``proposals``).
        Returns ``(logits, deltas, rois)`` per stage, the RoIs per image."""
        outputs, rois = [], proposals
        for i, stage in enumerate(self.stages):
            class_logits, deltas = stage.box_predictor(stage.box_head(stage.box_roi_pool(features, rois, image_shapes)))
            outputs.append((class_logits, deltas, rois))
            if i + 1 < len(self.stages):
                labels = class_logits[:, 1:].argmax(dim=1) + 1          # column 0 is the background
                rois = regress_by_class(stage.box_coder, rois, deltas, labels, image_shapes)
        return outputs

    def detect(self, features: dict[str, torch.Tensor], proposals: list[torch.Tensor],
               image_shapes: list[tuple[int, int]]) -> list[dict[str, torch.Tensor]]:
        """Detections per image (boxes in the resized image, 1-based labels, scores; with masks the
        ``(N, 1, 28, 28)`` mask probabilities that the transform pastes)."""
        outputs = self.stage_outputs(features, proposals, image_shapes)
        # MMDetection averages the logits (not the probabilities); the boxes are the last stage's
        mean_logits = torch.stack([logits for logits, _, _ in outputs]).mean(dim=0)
        last = self.stages[-1]
        _, deltas, rois = outputs[-1]
        boxes, scores, labels = last.postprocess_detections(mean_logits, deltas, rois, image_shapes)
        result = [{"boxes": b, "labels": lab, "scores": s} for b, lab, s in zip(boxes, labels, scores)]
        if self.has_mask():
            # the mask RoI poolers have no parameters and are alike: pool once for the three heads
            pooled = last.mask_roi_pool(features, boxes, image_shapes)
            probs = torch.stack([s.mask_predictor(s.mask_head(pooled)).sigmoid() for s in self.stages]).mean(dim=0)
            all_labels = torch.cat(labels)
            chosen = probs[torch.arange(len(all_labels), device=probs.device), all_labels][:, None]
            for r, masks in zip(result, chosen.split([len(b) for b in boxes])):
                r["masks"] = masks
        return result


def assemble_cascade_mask_rcnn(config: DetectorConfig, body: PIIP) -> PIIPDetector:
    """Cascade Mask R-CNN (box-only without ``config.masks``) around ``body`` as ViT-Adapter's
    MMDetection 2.x configs set it up (see the module's docstring)."""
    backbone = DetectorBackbone(body, config.fpn_channels, autocast_dtype(config.backbone_dtype))
    channels = config.fpn_channels
    rpn = mmdet_rpn(config, channels)
    levels = ["0", "1", "2", "3"]
    stages = []
    for iou, stds in zip(STAGE_IOUS, STAGE_STDS):
        mask_parts = mask_head_parts(config, levels)
        box_head = FastRCNNConvFCHead((channels, 7, 7), [channels] * 4, [config.box_head_dim],
                                      norm_layer=nn.BatchNorm2d)
        box_predictor = FastRCNNPredictor(config.box_head_dim, config.num_classes + 1)
        stage = MMDetRoIHeads(AlignedMultiScaleRoIAlign(levels, 7, sampling_ratio=0), box_head, box_predictor,
                              fg_iou_thresh=iou, bg_iou_thresh=iou, min_pos_iou=iou, match_low_quality=False,
                              batch_size_per_image=config.box_batch_size_per_image, positive_fraction=0.25,
                              bbox_reg_weights=tuple(1 / s for s in stds), score_thresh=config.score_thresh,
                              nms_thresh=config.nms_thresh, detections_per_img=config.detections_per_img,
                              **mask_parts)
        stage.box_coder = MMDetBoxCoder(stage.box_coder.weights)
        stages.append(stage)
    fcs = [m for stage in stages for m in stage.box_head.modules() if isinstance(m, nn.Linear)]
    init_like_mmdet([*backbone.fpn.modules(), *fcs], [stage.box_predictor for stage in stages])
    return PIIPDetector(config, backbone, rpn, CascadeRoIHeads(stages), input_transform(config))
