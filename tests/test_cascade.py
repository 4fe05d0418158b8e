"""Cascade Mask R-CNN (ViT-Adapter's, MMDetection 2.x rules): the three stages' training losses and
refinement, the test-time combination, box-only training, checkpoints. Every reference is written
here from MMDetection's definitions (``DeltaXYWHBBoxCoder``, ``GIoULoss``, ``CascadeRoIHead``), not
taken from piip."""
from __future__ import annotations

import math

import pytest
import torch
from torchvision.models.detection._utils import Matcher
from torchvision.ops import batched_nms, box_iou

import piip
from piip.tasks.detection import build_detector
from piip.tasks.detection.cascade import (STAGE_STDS, CascadeRoIHeads, MMDetBoxCoder, refine_training_rois)
from piip.tasks.detection.rcnn_parts import MaxIoUMatcher
from piip.weights import load_checkpoint, save_checkpoint

from test_detection import _targets, tiny_detector

SHAPE = (128, 160)                       # the tiny detectors' resized input (SMALL settings)


def cascade(**settings):
    return tiny_detector(kind="cascade_mask_rcnn", **settings)


def mmdet_decode(rois: torch.Tensor, deltas: torch.Tensor, stds, max_shape=None) -> torch.Tensor:
    """``delta2bbox`` (means 0): deltas times the stds, dw/dh clamped to +-log(1000/16), centre and
    size moved, clipped to ``max_shape`` (h, w) when given. ``deltas`` is ``(N, 4)`` or ``(N, C, 4)``."""
    d = deltas * torch.tensor(stds)
    clip = abs(math.log(16 / 1000))
    dx, dy = d[..., 0], d[..., 1]
    dw, dh = d[..., 2].clamp(-clip, clip), d[..., 3].clamp(-clip, clip)
    if deltas.dim() == 3:
        rois = rois[:, None]
    px, py = (rois[..., 0] + rois[..., 2]) / 2, (rois[..., 1] + rois[..., 3]) / 2
    pw, ph = rois[..., 2] - rois[..., 0], rois[..., 3] - rois[..., 1]
    gx, gy, gw, gh = px + pw * dx, py + ph * dy, pw * dw.exp(), ph * dh.exp()
    boxes = torch.stack([gx - gw / 2, gy - gh / 2, gx + gw / 2, gy + gh / 2], dim=-1)
    if max_shape is not None:
        h, w = max_shape
        boxes = torch.stack([boxes[..., 0].clamp(0, w), boxes[..., 1].clamp(0, h),
                             boxes[..., 2].clamp(0, w), boxes[..., 3].clamp(0, h)], dim=-1)
    return boxes


def giou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Generalised IoU of aligned boxes: IoU minus the enclosing box's share not in the union."""
    inter = ((torch.minimum(a[:, 2], b[:, 2]) - torch.maximum(a[:, 0], b[:, 0])).clamp(min=0)
             * (torch.minimum(a[:, 3], b[:, 3]) - torch.maximum(a[:, 1], b[:, 1])).clamp(min=0))
    union = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1]) + (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) - inter
    enclose = ((torch.maximum(a[:, 2], b[:, 2]) - torch.minimum(a[:, 0], b[:, 0]))
               * (torch.maximum(a[:, 3], b[:, 3]) - torch.minimum(a[:, 1], b[:, 1])))
    return inter / union - (enclose - union) / enclose


@torch.no_grad()
def spread_heads(det) -> None:
    """Larger classifier and regressor weights than the init's, so that stages disagree and the
    refinement moves boxes visibly."""
    for stage in det.roi_heads.stages:
        stage.box_predictor.cls_score.weight.normal_(std=0.5)
        stage.box_predictor.bbox_pred.weight.normal_(std=0.05)


@torch.no_grad()
def features_of(det, n: int = 1):
    det.backbone.eval()
    return det.backbone(torch.rand(n, 3, *SHAPE))


def scene(n: int = 2):
    """``n`` 120x150 images with two bright rectangles each, their boxes, labels and masks."""
    images, targets = [], []
    for k in range(n):
        image = torch.rand(3, 120, 150) * 0.2
        boxes = torch.tensor([[10.0 + 5 * k, 20, 60, 80], [80, 15, 140 - 5 * k, 70]])
        masks = torch.zeros(2, 120, 150, dtype=torch.uint8)
        for j, (x0, y0, x1, y1) in enumerate(boxes.int().tolist()):
            image[j, y0:y1, x0:x1] = 0.9
            masks[j, y0:y1, x0:x1] = 1
        images.append(image)
        targets.append(dict(boxes=boxes, labels=torch.tensor([1, 3]), masks=masks))
    return images, targets


# -- building and training -------------------------------------------------------------------------

@pytest.mark.parametrize("single", [False, True], ids=["piip", "vit"])
def test_three_stages_train_and_detect(single):
    det = cascade(single=single)
    assert det.config.box_loss == "smooth_l1" and det.config.detections_per_img == 100
    images = [torch.rand(3, 120, 150), torch.rand(3, 120, 150)]
    losses = det(images, _targets())
    stage_keys = {f"loss_{name}_s{i}" for name in ("classifier", "box_reg", "mask") for i in range(3)}
    assert set(losses) == stage_keys | {"loss_objectness", "loss_rpn_box_reg"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    for i, stage in enumerate(det.roi_heads.stages):
        for part in ("box_head", "box_predictor", "mask_head", "mask_predictor"):
            params = list(getattr(stage, part).parameters())
            assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params), (i, part)
            assert sum(float(p.grad.abs().sum()) for p in params) > 0, (i, part)
    assert all(p.grad is not None for p in det.backbone.body.parameters() if p.requires_grad)
    det.eval()
    with torch.no_grad():
        out = det(images)
    assert len(out) == 2
    for o in out:
        n = len(o["boxes"])
        assert 0 < n <= 100 and o["boxes"].shape == (n, 4) and o["scores"].shape == o["labels"].shape == (n,)
        assert o["labels"].min() >= 1 and o["labels"].max() <= 3 and (o["scores"] > 0.05).all()
        assert o["masks"].shape == (n, 1, 120, 150) and 0 <= o["masks"].min() and o["masks"].max() <= 1
        assert (o["boxes"][:, 2:] <= torch.tensor([150.0, 120.0]) + 1e-4).all() and (o["boxes"] >= 0).all()


def test_no_detections_and_images_without_objects():
    det = cascade(score_thresh=1.0)                        # no softmax score exceeds 1: nothing detected
    images = [torch.rand(3, 120, 150), torch.rand(3, 120, 150)]
    empty = dict(boxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.long),
                 masks=torch.zeros(0, 120, 150, dtype=torch.uint8))
    for targets in ([_targets(1)[0], empty], [empty, empty]):  # one image, then every image, without objects
        losses = det(images, targets)
        assert len(losses) == 11 and all(torch.isfinite(v) for v in losses.values())
        sum(losses.values()).backward()
    # a batch without a positive: the box and mask losses are zero, the classifiers still learn
    assert all(losses[f"loss_{name}_s{i}"] == 0 for name in ("box_reg", "mask") for i in range(3))
    assert all(losses[f"loss_classifier_s{i}"] > 0 for i in range(3))
    # no proposal and no object at all: MMDetection ends the cascade before the first stage
    assert det.roi_heads(features_of(det), [torch.zeros(0, 4)], [SHAPE], [empty]) == ([], {})
    det.eval()
    with torch.no_grad():
        out = det(images)
        (none,), _ = det.roi_heads(features_of(det), [torch.zeros(0, 4)], [SHAPE])
    for o in out:
        assert o["boxes"].shape == (0, 4) and o["labels"].shape == o["scores"].shape == (0,)
        assert o["masks"].shape == (0, 1, 120, 150)
    assert none["boxes"].shape == (0, 4) and none["masks"].shape == (0, 1, 28, 28)


def test_box_only_cascade():
    det = cascade(masks=False)
    assert not det.roi_heads.has_mask() and all(s.mask_head is None for s in det.roi_heads.stages)
    images, targets = scene()
    losses = det(images, targets)
    assert not any("mask" in k for k in losses) and len(losses) == 8
    sum(losses.values()).backward()
    det.eval()
    with torch.no_grad():
        out = det(images)
    assert "masks" not in out[0] and out[0]["boxes"].shape[1] == 4


def test_a_few_steps_lower_the_loss():
    det = cascade()
    images, targets = scene()
    optimizer = torch.optim.AdamW(det.parameters(), lr=1e-3)
    history = []
    for _ in range(4):
        loss = sum(det(images, targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(loss.item())
    assert all(math.isfinite(v) for v in history)
    assert history[-1] < 0.6 * history[0], history


def test_save_and_load_give_the_same_detections(tmp_path):
    det = cascade()
    images, targets = scene()
    det(images, targets)                                   # BatchNorm running statistics away from their init
    det.eval()
    path = save_checkpoint(det, tmp_path / "cascade.safetensors")
    loaded = load_checkpoint(path)
    assert loaded.config == det.config and isinstance(loaded.roi_heads, CascadeRoIHeads)
    assert any(float(b.abs().sum()) > 0 for n, b in loaded.named_buffers() if n.endswith("running_mean"))
    with torch.no_grad():
        expected, got = det(images), loaded(images)
    for e, g in zip(expected, got):
        assert e.keys() == g.keys() and len(e["boxes"]) > 0
        for key in e:
            torch.testing.assert_close(g[key], e[key], rtol=0, atol=0)


# -- the settings -------------------------------------------------------------------------------------

def test_settings_are_vit_adapters_cascade():
    """The VA config's stages, read off the built model (piip_tsb, 80 classes, on the meta device)."""
    with torch.device("meta"):
        det = build_detector(piip.create_model("piip_tsb", task="det"), 80, kind="cascade_mask_rcnn")
    assert det.rpn.box_loss == "smooth_l1" and det.rpn._post_nms_top_n == {"training": 1000, "testing": 1000}
    heads = det.roi_heads
    assert heads.loss_weights == (1.0, 0.5, 0.25) and heads.giou_weight == 10.0 and len(heads.stages) == 3
    for stage, iou, stds in zip(heads.stages, (0.5, 0.6, 0.7), STAGE_STDS):
        m = stage.proposal_matcher
        assert isinstance(m, MaxIoUMatcher) and (m.high_threshold, m.low_threshold, m.min_pos_iou) == (iou, iou, iou)
        assert not m.match_low_quality
        assert isinstance(stage.box_coder, MMDetBoxCoder)
        assert stage.box_coder.weights == pytest.approx(tuple(1 / s for s in stds))
        assert stage.fg_bg_sampler.batch_size_per_image == 512 and stage.fg_bg_sampler.positive_fraction == 0.25
        assert (stage.score_thresh, stage.nms_thresh, stage.detections_per_img) == (0.05, 0.5, 100)
        convs = [m for m in stage.box_head.modules() if isinstance(m, torch.nn.Conv2d)]
        norms = [m for m in stage.box_head.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        fcs = [m for m in stage.box_head.modules() if isinstance(m, torch.nn.Linear)]
        assert len(convs) == len(norms) == 4 and all(c.bias is None and c.kernel_size == (3, 3) for c in convs)
        assert [(f.in_features, f.out_features) for f in fcs] == [(256 * 49, 1024)]
        assert stage.box_predictor.cls_score.out_features == 81 and stage.box_predictor.bbox_pred.out_features == 81 * 4
        mask_convs = [m for m in stage.mask_head.modules() if isinstance(m, torch.nn.Conv2d)]
        assert len(mask_convs) == 4 and all(c.bias is not None for c in mask_convs)
        assert stage.mask_predictor.mask_fcn_logits.out_channels == 81
        assert stage.box_roi_pool.output_size == (7, 7) and stage.mask_roi_pool.output_size == (14, 14)
    assert heads.stages[0].box_head is not heads.stages[1].box_head
    assert heads.stages[0].mask_head is not heads.stages[1].mask_head


@torch.no_grad()
def test_initialisation_is_mmdetections():
    det = cascade()
    for stage in det.roi_heads.stages:
        conv = next(m for m in stage.box_head.modules() if isinstance(m, torch.nn.Conv2d))
        fc = next(m for m in stage.box_head.modules() if isinstance(m, torch.nn.Linear))
        bn = next(m for m in stage.box_head.modules() if isinstance(m, torch.nn.BatchNorm2d))
        fan_out = conv.out_channels * 9                    # Kaiming normal, fan_out, ReLU (mmcv ConvModule)
        assert float(conv.weight.std()) == pytest.approx(math.sqrt(2 / fan_out), rel=0.1)
        assert (bn.weight == 1).all() and (bn.bias == 0).all()
        bound = math.sqrt(6 / (fc.in_features + fc.out_features))  # Xavier uniform
        assert float(fc.weight.abs().max()) <= bound and float(fc.weight.std()) == pytest.approx(bound / math.sqrt(3), rel=0.1)
        assert (fc.bias == 0).all()
        for layer, std in ((stage.box_predictor.cls_score, 0.01), (stage.box_predictor.bbox_pred, 0.001)):
            assert float(layer.weight.std()) == pytest.approx(std, rel=0.2) and (layer.bias == 0).all()


def test_stage_assignment_has_no_low_quality_matches():
    """A proposal that is the best match of one object below the threshold stays with the object it
    overlaps above the threshold (MMDetection's low-quality rule would hand it over)."""
    iou = torch.tensor([[0.8, 0.1, 0.3], [0.55, 0.2, 0.0]])
    got = MaxIoUMatcher(0.5, 0.5, 0.5, match_low_quality=False)(iou)
    assert got.tolist() == [0, -1, -1]
    assert got.tolist() == Matcher(0.5, 0.5, allow_low_quality_matches=False)(iou).tolist()
    assert MaxIoUMatcher(0.5, 0.5, 0.5)(iou).tolist() == [1, -1, -1]


def test_box_coder_clamps_shrinking_as_mmdetection():
    coder = MMDetBoxCoder((10.0, 10.0, 5.0, 5.0))
    roi = torch.tensor([[0.0, 0.0, 100.0, 50.0]])
    for dw in (-30.0, -2.0, 0.5, 30.0):
        deltas = torch.tensor([[0.1, -0.2, dw, -dw]])
        torch.testing.assert_close(coder.decode_single(deltas * torch.tensor([10.0, 10, 5, 5]), roi),
                                   mmdet_decode(roi, deltas, (1.0, 1.0, 1.0, 1.0)))


# -- the cascade's rules against hand computations ----------------------------------------------------

def test_training_refinement_rule():
    """Positives are regressed with their target class, negatives with their highest-scoring object
    class (the background never), clipped to their image; the added ground truth boxes are dropped."""
    coder = MMDetBoxCoder(tuple(1 / s for s in STAGE_STDS[0]))
    rois = [torch.tensor([[10.0, 10, 50, 40], [0, 0, 30, 30], [100, 60, 150, 120], [12, 10, 50, 42]]),
            torch.tensor([[5.0, 5, 25, 35], [40, 40, 90, 100]])]
    labels = [torch.tensor([2, 0, 0, 1]), torch.tensor([3, 0])]
    is_gt = [torch.tensor([False, False, False, True]), torch.tensor([False, False])]
    logits = torch.tensor([[0.0, 1, 2, 3], [9, 0.5, 0.1, 0.2], [9, 0.1, 0.2, 3], [0, 1, 1, 1],
                           [0, 3, 2, 1], [5, -1, 2, 0]])   # the background column is the largest for rows 1, 2, 5
    deltas = torch.randn(6, 16, requires_grad=True)
    with torch.no_grad():
        deltas[2, 12:] = torch.tensor([3.0, 3.0, 1.0, 1.0])   # row 2 (class 3) moves out of the 160x128 image
    shapes = [SHAPE, (100, 120)]
    got = refine_training_rois(coder, rois, labels, logits, deltas, is_gt, shapes)
    chosen = [2, 1, 3, 1, 3, 2]                            # target labels of the positives, argmax of the rest
    d = deltas.detach().reshape(6, 4, 4)[torch.arange(6), torch.tensor(chosen)]
    expected = [mmdet_decode(rois[0][:3], d[:3], STAGE_STDS[0], SHAPE),
                mmdet_decode(rois[1], d[4:], STAGE_STDS[0], (100, 120))]
    assert [len(g) for g in got] == [3, 2] and not any(g.requires_grad for g in got)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)
    assert float(got[0][2, 2]) == 160.0 and float(got[0][2, 3]) == 128.0    # clipped


def test_training_losses_of_every_stage_by_hand():
    """With fewer candidates than the sampler draws, every stage trains on all its candidates:
    its losses follow by hand. Classification: cross-entropy over the sampled RoIs. Boxes: 10 x the
    summed (1 - GIoU) of the positives' boxes decoded with their target class's deltas against
    their objects, over the number of sampled RoIs (positives and negatives). Stage weights 1, 0.5,
    0.25. The next stage's proposals: the refined RoIs without the added ground truth boxes."""
    det = cascade()
    spread_heads(det)
    features = features_of(det)
    heads = det.roi_heads.train()
    gt = torch.tensor([[10.0, 20, 60, 80], [90, 30, 150, 100]])
    gt_labels = torch.tensor([1, 3])
    target = dict(boxes=gt, labels=gt_labels, masks=torch.zeros(2, *SHAPE, dtype=torch.uint8))
    proposals = torch.tensor([[12.0, 22, 62, 78], [5, 15, 55, 85], [30, 40, 80, 100], [88, 28, 145, 95],
                              [100, 50, 158, 120], [0, 0, 40, 40], [70, 0, 120, 30]])
    losses = heads.losses(features, [proposals], [SHAPE], [target])
    for i, (stage, iou, stds, weight) in enumerate(zip(heads.stages, (0.5, 0.6, 0.7), STAGE_STDS, (1, 0.5, 0.25))):
        candidates = torch.cat([proposals, gt])
        overlaps = box_iou(gt, candidates)
        best, which = overlaps.max(dim=0)
        labels = torch.where(best >= iou, gt_labels[which], 0)
        n = len(candidates)
        logits, deltas = stage.box_predictor(stage.box_head(stage.box_roi_pool(features, [candidates], [SHAPE])))
        deltas = deltas.reshape(n, -1, 4)
        pos = labels > 0
        boxes = mmdet_decode(candidates[pos], deltas[pos, labels[pos]], stds)
        expected_box = 10 * (1 - giou(boxes, gt[which[pos]])).sum() / n
        expected_cls = -logits.log_softmax(-1)[torch.arange(n), labels].mean()
        torch.testing.assert_close(losses[f"loss_classifier_s{i}"], weight * expected_cls)
        torch.testing.assert_close(losses[f"loss_box_reg_s{i}"], weight * expected_box)
        assert losses[f"loss_mask_s{i}"].shape == ()
        refine_labels = torch.where(pos, labels, logits[:, 1:].argmax(-1) + 1)
        refined = mmdet_decode(candidates, deltas[torch.arange(n), refine_labels], stds, SHAPE)
        proposals = refined[:-len(gt)].detach()


def test_test_time_combination_by_hand():
    """Detections: the softmax of the three stages' mean raw logits, each stage on the RoIs the
    previous one moved with its best object class; the last stage's class-specific boxes; score >
    0.05, per-class NMS at 0.5, the best 100; masks: the three heads' sigmoids averaged, the class's map."""
    det = cascade()
    spread_heads(det)
    heads = det.roi_heads.eval()
    features = features_of(det, 2)
    torch.manual_seed(3)
    proposals = []
    for _ in range(2):
        xy = torch.rand(40, 2) * torch.tensor([120.0, 90])
        proposals.append(torch.cat([xy, xy + 8 + torch.rand(40, 2) * 40], dim=1))
    with torch.no_grad():
        got, _ = heads(features, proposals, [SHAPE, SHAPE])
        stages = heads.stages
        for image, (props, result) in enumerate(zip(proposals, got)):
            single = {k: v[image:image + 1] for k, v in features.items()}
            rois, all_logits = props, []
            for i, stage in enumerate(stages):
                logits, deltas = stage.box_predictor(stage.box_head(stage.box_roi_pool(single, [rois], [SHAPE])))
                all_logits.append(logits)
                deltas = deltas.reshape(len(rois), -1, 4)
                if i < 2:
                    best = logits[:, 1:].argmax(-1) + 1
                    rois = mmdet_decode(rois, deltas[torch.arange(len(rois)), best], STAGE_STDS[i], SHAPE)
            probs = (sum(all_logits) / 3).softmax(-1)[:, 1:]
            boxes = mmdet_decode(rois, deltas[:, 1:], STAGE_STDS[2], SHAPE)
            classes = torch.arange(1, 4).expand_as(probs)
            keep = probs > 0.05
            boxes, scores, classes = boxes[keep], probs[keep], classes[keep]
            order = batched_nms(boxes, scores, classes, 0.5)[:100]
            assert len(order) > 3 and len(set(classes[order].tolist())) > 1
            torch.testing.assert_close(result["boxes"], boxes[order])
            torch.testing.assert_close(result["scores"], scores[order])
            assert torch.equal(result["labels"], classes[order])
            pooled = stages[0].mask_roi_pool(single, [boxes[order]], [SHAPE])
            maps = sum(s.mask_predictor(s.mask_head(pooled)).sigmoid() for s in stages) / 3
            torch.testing.assert_close(result["masks"][:, 0], maps[torch.arange(len(order)), classes[order]])
