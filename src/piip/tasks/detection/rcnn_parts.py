"""torchvision's two-stage detector parts, made to compute what MMDetection 2.x computes.

The authors trained and scored their Mask R-CNNs with MMDetection 2.25. torchvision's parts differ
from it in a handful of rules that move AP; each class or function below changes exactly one of
them and says which (reference §8.1, and MMDetection 2.x's ``MaxIoUAssigner``,
``BitmapMasks.crop_and_resize``, ``FCNMaskHead.get_seg_masks`` and mmcv's ``rescale_size``):

* :class:`PyramidAnchorGenerator`: anchors not rounded to whole pixels, fixed pyramid strides;
* :class:`AlignedMultiScaleRoIAlign`: ``aligned=True`` RoIAlign at MMDetection's level rule;
* :class:`MaxIoUMatcher`: a low-quality match only at IoU >= ``min_pos_iou`` (torchvision allows
  any, even IoU 0), the last ground truth winning ties as in MMDetection's loop;
* :class:`MMDetRegionProposalNetwork`, :class:`MMDetRoIHeads`: L1 box losses; mask targets cropped
  with ``aligned=True`` RoIAlign and binarised at 0.5 (torchvision: ``aligned=False``, soft); objects
  without a mask (``has_mask`` false in the target) give no mask loss;
* :class:`MMDetTransform`: mmcv's keep-ratio rounding (``int(x * scale + 0.5)``; torchvision floors)
  and OpenCV's nearest indexing for masks, and :func:`paste_masks`, MMDetection's ``grid_sample`` paste over the float box (torchvision
  pastes Detectron-style into the integer box grown by one pixel).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchvision.models.detection._utils import Matcher
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.roi_heads import RoIHeads, fastrcnn_loss
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes
from torchvision.ops import MultiScaleRoIAlign, roi_align
from torchvision.ops.poolers import _filter_input, _setup_scales

from ...data.multiscale import rescale_size, resize_keep_ratio

__all__ = ["PyramidAnchorGenerator", "AlignedMultiScaleRoIAlign", "MaxIoUMatcher", "MMDetRegionProposalNetwork",
           "MMDetRoIHeads", "MMDetTransform", "paste_masks", "mask_targets"]

BOX_LOSSES = ("l1", "smooth_l1")


class PyramidAnchorGenerator(AnchorGenerator):
    """MMDetection 2.x's anchors on torchvision's generator: the base anchors are not rounded to
    whole pixels (``0.5 * w`` either side of the cell's corner) and every level has its pyramid
    stride (4, 8, ..., 64). torchvision derives a level's stride as ``image size // map size``,
    which is wrong for the max-pooled level when the stride-32 map has an odd size (e.g. 62 instead
    of 64 for a 1120-pixel side)."""

    def __init__(self, sizes, aspect_ratios, strides):
        super().__init__(sizes, aspect_ratios)
        self.strides = tuple(int(s) for s in strides)

    def generate_anchors(self, scales, aspect_ratios, dtype=torch.float32, device=torch.device("cpu")):
        scales = torch.as_tensor(scales, dtype=dtype, device=device)
        h_ratios = torch.sqrt(torch.as_tensor(aspect_ratios, dtype=dtype, device=device))
        ws = (scales[None, :] / h_ratios[:, None]).reshape(-1)
        hs = (scales[None, :] * h_ratios[:, None]).reshape(-1)
        return torch.stack([-ws, -hs, ws, hs], dim=1) / 2

    def forward(self, image_list, feature_maps: list[torch.Tensor]) -> list[torch.Tensor]:
        if len(feature_maps) != len(self.strides):
            raise ValueError(f"{len(feature_maps)} feature maps for {len(self.strides)} anchor strides")
        device, dtype = feature_maps[0].device, feature_maps[0].dtype
        self.set_cell_anchors(dtype, device)
        strides = [[torch.tensor(s, dtype=torch.int64, device=device)] * 2 for s in self.strides]
        anchors = torch.cat(self.grid_anchors([f.shape[-2:] for f in feature_maps], strides))
        return [anchors for _ in image_list.image_sizes]


class AlignedMultiScaleRoIAlign(MultiScaleRoIAlign):
    """``MultiScaleRoIAlign`` with ``aligned=True`` (MMDetection's RoIAlign; torchvision's multi-scale
    pooler hard-codes ``aligned=False``) and MMDetection's level rule
    ``floor(log2(sqrt(area) / 56))`` (torchvision's canonical 224 at level 4 is the same rule)."""

    def forward(self, x: dict[str, torch.Tensor], boxes: list[torch.Tensor],
                image_shapes: list[tuple[int, int]]) -> torch.Tensor:
        features = _filter_input(x, self.featmap_names)
        if self.scales is None or self.map_levels is None:
            self.scales, self.map_levels = _setup_scales(features, image_shapes, self.canonical_scale,
                                                         self.canonical_level)
        rois = torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], dim=1) for i, b in enumerate(boxes)])
        levels = self.map_levels(boxes) if len(features) > 1 else torch.zeros(len(rois), dtype=torch.long,
                                                                               device=rois.device)
        out = features[0].new_zeros((len(rois), features[0].shape[1], *self.output_size))
        for level, (feature, scale) in enumerate(zip(features, self.scales)):
            index = torch.where(levels == level)[0]
            out[index] = roi_align(feature, rois[index], self.output_size, spatial_scale=scale,
                                   sampling_ratio=self.sampling_ratio, aligned=True).to(out.dtype)
        return out


class MaxIoUMatcher(Matcher):
    """MMDetection's ``MaxIoUAssigner`` (``gt_max_assign_all=True``) in torchvision's matcher
    convention: ``matches[i]`` is a ground-truth index, or ``BELOW_LOW_THRESHOLD`` (background) or
    ``BETWEEN_THRESHOLDS`` (ignored).

    A prediction is matched to its best ground truth at IoU >= ``high_threshold`` and is background
    below ``low_threshold``. Then, with ``match_low_quality`` (MMDetection's default), every ground
    truth whose best IoU is at least ``min_pos_iou`` also takes the predictions that reach that best
    IoU (ties included), ground truths later in the list overriding earlier ones, as MMDetection's
    loop over ground truths does. torchvision's ``allow_low_quality_matches`` has no
    ``min_pos_iou``: a small object that no anchor overlaps would make every IoU-0 anchor a positive
    for it. Without ``match_low_quality`` (Cascade R-CNN's stages) the IoU thresholds alone decide.
    """

    def __init__(self, high_threshold: float, low_threshold: float, min_pos_iou: float,
                 match_low_quality: bool = True):
        super().__init__(high_threshold, low_threshold, allow_low_quality_matches=False)
        self.min_pos_iou = min_pos_iou
        self.match_low_quality = match_low_quality

    def __call__(self, match_quality_matrix: torch.Tensor) -> torch.Tensor:
        matches = super().__call__(match_quality_matrix)
        if not self.match_low_quality:
            return matches
        iou = match_quality_matrix
        best_per_gt = iou.max(dim=1).values
        is_best = (iou == best_per_gt[:, None]) & (best_per_gt >= self.min_pos_iou)[:, None]
        # the last ground truth (highest index) for which a prediction is a best match
        order = torch.arange(1, iou.shape[0] + 1, device=iou.device)[:, None]
        last = (is_best * order).max(dim=0).values
        low_quality = last > 0
        matches[low_quality] = last[low_quality] - 1
        return matches


def _box_loss(kind: str, predicted: torch.Tensor, target: torch.Tensor, normaliser: int) -> torch.Tensor:
    """Summed box loss over ``normaliser`` samples: L1 (MMDetection 2.x) or torchvision's smooth L1."""
    if kind == "l1":
        return F.l1_loss(predicted, target, reduction="sum") / normaliser
    return F.smooth_l1_loss(predicted, target, beta=1 / 9, reduction="sum") / normaliser


def _use_mmdet_assignment(stage, box_loss: str, min_pos_iou: float, match_low_quality: bool = True) -> None:
    """Give an RPN or RoI-heads ``stage`` its ``box_loss`` and MMDetection's assigner in place of
    torchvision's matcher, at the same IoU thresholds."""
    if box_loss not in BOX_LOSSES:
        raise ValueError(f"box_loss must be one of {BOX_LOSSES}, got {box_loss!r}")
    stage.box_loss = box_loss
    stage.proposal_matcher = MaxIoUMatcher(stage.proposal_matcher.high_threshold,
                                           stage.proposal_matcher.low_threshold, min_pos_iou, match_low_quality)


class MMDetRegionProposalNetwork(RegionProposalNetwork):
    """The RPN with MMDetection's assigner (:class:`MaxIoUMatcher`, ``min_pos_iou=0.3``) and box
    loss (``"l1"``: MMDetection 2.x, averaged over the sampled anchors as torchvision's smooth-L1
    loss is; ``"smooth_l1"``: torchvision's)."""

    def __init__(self, *args, box_loss: str = "l1", min_pos_iou: float = 0.3, **kwargs):
        super().__init__(*args, **kwargs)
        _use_mmdet_assignment(self, box_loss, min_pos_iou)

    def compute_loss(self, objectness, pred_bbox_deltas, labels, regression_targets):
        pos, neg = self.fg_bg_sampler(labels)
        pos = torch.where(torch.cat(pos, dim=0))[0]
        neg = torch.where(torch.cat(neg, dim=0))[0]
        sampled = torch.cat([pos, neg], dim=0)
        labels = torch.cat(labels, dim=0)
        regression_targets = torch.cat(regression_targets, dim=0)
        box_loss = _box_loss(self.box_loss, pred_bbox_deltas[pos], regression_targets[pos], sampled.numel())
        objectness_loss = F.binary_cross_entropy_with_logits(objectness.flatten()[sampled], labels[sampled])
        return objectness_loss, box_loss


def mask_targets(gt_masks: torch.Tensor, proposals: torch.Tensor, matched: torch.Tensor, size: int) -> torch.Tensor:
    """MMDetection's mask targets: each proposal's matched ground-truth bitmap cropped with RoIAlign
    (``aligned=True``, adaptive sampling) to ``size x size`` and binarised at 0.5 (float 0/1)."""
    rois = torch.cat([matched[:, None].to(proposals), proposals], dim=1)
    crops = roi_align(gt_masks[:, None].to(proposals), rois, (size, size), 1.0, sampling_ratio=0, aligned=True)
    return (crops[:, 0] >= 0.5).to(proposals)


class MMDetRoIHeads(RoIHeads):
    """The RoI heads with MMDetection 2.x's training rules: the :class:`MaxIoUMatcher` assigner
    (``min_pos_iou=0.5``; ``match_low_quality=False`` for Cascade R-CNN's stages), the ``box_loss``
    (``"l1"`` or torchvision's smooth L1) and binary ``aligned=True`` mask targets
    (:func:`mask_targets`), the BCE averaged over every pixel of the positives whose object has a
    mask (targets without ``masks``, or with ``has_mask`` false for an object, give none).
    Inference is torchvision's."""

    def __init__(self, *args, box_loss: str = "l1", min_pos_iou: float = 0.5, match_low_quality: bool = True,
                 **kwargs):
        super().__init__(*args, **kwargs)
        _use_mmdet_assignment(self, box_loss, min_pos_iou, match_low_quality)

    def check_targets(self, targets):
        # torchvision requires masks in every target of a mask head; here a target without masks
        # (box-only data) just gives no mask loss
        if targets is None or not all("boxes" in t and "labels" in t for t in targets):
            raise ValueError("every training target needs 'boxes' and 'labels'")

    def forward(self, features, proposals, image_shapes, targets=None):
        if not self.training:
            return super().forward(features, proposals, image_shapes, targets)
        proposals, matched_idxs, labels, regression_targets = self.select_training_samples(proposals, targets)
        class_logits, box_regression = self.box_predictor(
            self.box_head(self.box_roi_pool(features, proposals, image_shapes)))
        if self.box_loss == "smooth_l1":
            loss_classifier, loss_box_reg = fastrcnn_loss(class_logits, box_regression, labels, regression_targets)
        else:
            labels_all = torch.cat(labels, dim=0)
            targets_all = torch.cat(regression_targets, dim=0)
            pos = torch.where(labels_all > 0)[0]
            box_regression = box_regression.reshape(len(labels_all), -1, 4)
            loss_classifier = F.cross_entropy(class_logits, labels_all)
            loss_box_reg = _box_loss("l1", box_regression[pos, labels_all[pos]], targets_all[pos], labels_all.numel())
        losses = {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg}
        if self.has_mask():
            losses["loss_mask"] = self._mask_loss(features, proposals, image_shapes, targets, matched_idxs, labels)
        return [], losses

    def _mask_loss(self, features, proposals, image_shapes, targets, matched_idxs, labels) -> torch.Tensor:
        keep = [torch.where(lab > 0)[0] for lab in labels]
        positives = [p[k] for p, k in zip(proposals, keep)]
        logits = self.mask_predictor(self.mask_head(self.mask_roi_pool(features, positives, image_shapes)))
        size = logits.shape[-1]
        chosen, wanted = [], []
        for target, boxes, k, matched in zip(targets, positives, keep, matched_idxs):
            matched = matched[k]
            if "masks" not in target:
                usable = torch.zeros_like(matched, dtype=torch.bool)
            elif "has_mask" in target:
                usable = target["has_mask"][matched].bool()
            else:
                usable = torch.ones_like(matched, dtype=torch.bool)
            chosen.append(usable)
            if usable.any():
                wanted.append(mask_targets(target["masks"], boxes[usable], matched[usable], size))
        usable = torch.cat(chosen)
        if not usable.any():  # no positive with a mask: a zero loss that keeps the head in the graph
            return logits.sum() * 0
        positive_labels = torch.cat([lab[k] for lab, k in zip(labels, keep)])[usable]
        predicted = logits[usable][torch.arange(len(positive_labels), device=logits.device), positive_labels]
        return F.binary_cross_entropy_with_logits(predicted, torch.cat(wanted))


def paste_masks(masks: torch.Tensor, boxes: torch.Tensor, height: int, width: int,
                chunk_elements: int = 1 << 24) -> torch.Tensor:
    """MMDetection's mask paste (``_do_paste_mask``): ``(N, M, M)`` mask probabilities into an
    ``(N, height, width)`` image, each sampled bilinearly (``grid_sample``, zero outside, pixel
    centres at ``+0.5``) over its float box. Only the boxes' region grown by one pixel is sampled
    (MMDetection's ``skip_empty``; outside a box the paste is below half its edge value, so the
    masks binarised at 0.5 are the same as over the whole image), in chunks of at most
    ``chunk_elements`` sampled pixels: memory stays bounded for many detections on a large image.
    """
    out = masks.new_zeros((len(masks), height, width), dtype=torch.float32)
    if not len(masks):
        return out
    boxes = boxes.float()
    # the pixel region that can be non-zero: the boxes' union, one pixel wider (MMDetection's skip_empty)
    lo = (boxes[:, :2].floor() - 1).clamp(min=0).long()
    hi = torch.stack([(boxes[:, 2].ceil() + 1).clamp(max=width), (boxes[:, 3].ceil() + 1).clamp(max=height)], 1).long()
    start = 0
    while start < len(masks):
        # grow the chunk while its masks times their union's area stays within the budget
        x0, y0, x1, y1 = (int(v) for v in (*lo[start], *hi[start]))
        stop = start + 1
        while stop < len(masks):
            ux0, uy0 = min(x0, int(lo[stop, 0])), min(y0, int(lo[stop, 1]))
            ux1, uy1 = max(x1, int(hi[stop, 0])), max(y1, int(hi[stop, 1]))
            if (stop + 1 - start) * max(ux1 - ux0, 0) * max(uy1 - uy0, 0) > chunk_elements:
                break
            x0, y0, x1, y1, stop = ux0, uy0, ux1, uy1, stop + 1
        if x1 > x0 and y1 > y0:
            bx0, by0, bx1, by1 = boxes[start:stop].split(1, dim=1)
            xs = torch.arange(x0, x1, device=boxes.device, dtype=torch.float32) + 0.5
            ys = torch.arange(y0, y1, device=boxes.device, dtype=torch.float32) + 0.5
            gx = torch.nan_to_num((xs - bx0) / (bx1 - bx0) * 2 - 1, nan=0.0, posinf=0.0, neginf=0.0)
            gy = torch.nan_to_num((ys - by0) / (by1 - by0) * 2 - 1, nan=0.0, posinf=0.0, neginf=0.0)
            n = stop - start
            grid = torch.stack([gx[:, None, :].expand(n, len(ys), len(xs)), gy[:, :, None].expand(n, len(ys), len(xs))], 3)
            pasted = F.grid_sample(masks[start:stop, None].float(), grid, align_corners=False)
            out[start:stop, y0:y1, x0:x1] = pasted[:, 0]
        start = stop
    return out


class MMDetTransform(GeneralizedRCNNTransform):
    """torchvision's input transform with MMDetection's keep-ratio resize (mmcv's rounding, boxes
    clipped, masks by OpenCV's nearest indexing: :func:`~piip.data.multiscale.resize_keep_ratio`)
    and MMDetection's mask paste (:func:`paste_masks`)
    for the detections, which come back in input-image pixels with ``masks`` as ``(N, 1, H, W)``
    probabilities (binarise at ``>= 0.5`` as MMDetection)."""

    def resize(self, image, target=None):
        if self.training and self._skip_resize:
            return image, target
        short = self.torch_choice(self.min_size) if self.training else self.min_size[-1]
        return resize_keep_ratio(image, target, (short, self.max_size))

    def padded_size(self, height: int, width: int) -> tuple[int, int]:
        """The size an image of ``height x width`` is resized and padded to in evaluation."""
        h, w = rescale_size(height, width, (self.min_size[-1], self.max_size))
        step = self.size_divisible
        return math.ceil(h / step) * step, math.ceil(w / step) * step

    def postprocess(self, result, image_shapes, original_image_sizes):
        if self.training:
            return result
        for pred, resized, original in zip(result, image_shapes, original_image_sizes):
            pred["boxes"] = resize_boxes(pred["boxes"], resized, original)
            if "masks" in pred:
                pred["masks"] = paste_masks(pred["masks"][:, 0], pred["boxes"], *original)[:, None]
        return result
