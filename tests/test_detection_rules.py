"""Detection scored as the authors' MMDetection 2.x scores it: batch-independent evaluation,
MMDetection's mask paste, mask targets, mask scoring and RPN assignment rule, box-only and mixed
data. Every reference is written here from MMDetection's definitions, not taken from piip."""
from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.models.detection._utils import Matcher
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.roi_heads import project_masks_on_boxes
from torchvision.models.detection.roi_heads import paste_masks_in_image

from piip.data.coco import CocoDetection, collate_detection
from piip.tasks.detection import coco_metrics, evaluate_detector, paste_masks
from piip.tasks.detection.rcnn_parts import MaxIoUMatcher, mask_targets

from test_detection import tiny_detector


# -- RPN / RoI assignment: MMDetection's MaxIoUAssigner -----------------------------------------------

def mmdet_assign(iou: np.ndarray, pos: float, neg: float, min_pos: float) -> np.ndarray:
    """``MaxIoUAssigner.assign_wrt_overlaps`` (match_low_quality, gt_max_assign_all) written from its
    definition, in torchvision's convention: gt index, -1 background, -2 ignored."""
    assigned = np.full(iou.shape[1], -2)
    best, best_gt = iou.max(0), iou.argmax(0)
    assigned[(best >= 0) & (best < neg)] = -1
    assigned[best >= pos] = best_gt[best >= pos]
    for i, gt_best in enumerate(iou.max(1)):  # in order: later ground truths override earlier ones
        if gt_best >= min_pos:
            assigned[iou[i] == gt_best] = i
    return assigned


def test_rpn_low_quality_matches_need_iou_0_3_as_mmdetection():
    rng = np.random.default_rng(0)
    for _ in range(50):  # coarse values: many ties, every branch of the rule
        iou = rng.integers(0, 10, size=(int(rng.integers(1, 5)), 40)) / 10
        got = MaxIoUMatcher(0.7, 0.3, min_pos_iou=0.3)(torch.tensor(iou, dtype=torch.float32)).numpy()
        np.testing.assert_array_equal(got, mmdet_assign(iou, 0.7, 0.3, 0.3))
    # a small object whose best anchor overlaps it at IoU 0.2: MMDetection gives it no positive,
    # torchvision's low-quality rule makes that anchor positive
    iou = torch.tensor([[0.2, 0.1, 0.0, 0.05]])
    assert (MaxIoUMatcher(0.7, 0.3, 0.3)(iou.clone()) >= 0).sum() == 0
    assert (Matcher(0.7, 0.3, allow_low_quality_matches=True)(iou.clone()) >= 0).sum() == 1
    # the detector's RPN and RoI heads use it (RoI heads: 0.5 / 0.5 / min 0.5)
    det = tiny_detector()
    rpn, heads = det.rpn.proposal_matcher, det.roi_heads.proposal_matcher
    assert isinstance(rpn, MaxIoUMatcher) and (rpn.high_threshold, rpn.low_threshold, rpn.min_pos_iou) == (0.7, 0.3, 0.3)
    assert isinstance(heads, MaxIoUMatcher) and (heads.high_threshold, heads.low_threshold, heads.min_pos_iou) == (0.5, 0.5, 0.5)


# -- mask paste: MMDetection's _do_paste_mask -----------------------------------------------------------

def mmdet_paste(mask: torch.Tensor, box, height: int, width: int) -> torch.Tensor:
    """MMDetection 2.x's paste over the whole image (its GPU path): every pixel centre mapped into
    the float box's [-1, 1] grid and sampled bilinearly with zeros outside."""
    x0, y0, x1, y1 = (float(v) for v in box)
    xs = (torch.arange(width, dtype=torch.float32) + 0.5 - x0) / (x1 - x0) * 2 - 1
    ys = (torch.arange(height, dtype=torch.float32) + 0.5 - y0) / (y1 - y0) * 2 - 1
    grid = torch.stack([xs[None, :].expand(height, width), ys[:, None].expand(height, width)], dim=-1)
    return F.grid_sample(mask[None, None].float(), grid[None], align_corners=False)[0, 0]


def test_mask_paste_is_mmdetections():
    torch.manual_seed(0)
    masks = torch.rand(5, 28, 28) ** 0.5
    boxes = torch.tensor([[10.3, 5.7, 40.2, 33.9], [0.0, 0.0, 63.0, 47.0], [50.6, 30.2, 52.1, 31.4],
                          [20.5, 12.25, 58.75, 46.5], [33.0, 1.5, 47.9, 9.2]])
    h, w = 48, 64
    for chunk in (1 << 24, 900):  # one chunk, and chunks of a few masks each
        pasted = paste_masks(masks, boxes, h, w, chunk_elements=chunk)
        assert pasted.shape == (5, h, w)
        for m, box, got in zip(masks, boxes, pasted):
            ref = mmdet_paste(m, box, h, w)
            assert torch.equal(got >= 0.5, ref >= 0.5)
            x0, y0 = int(box[0]), int(box[1])
            x1, y1 = math.ceil(box[2]), math.ceil(box[3])
            torch.testing.assert_close(got[y0:y1, x0:x1], ref[y0:y1, x0:x1])
    # torchvision's Detectron-style paste gives other masks
    theirs = paste_masks_in_image(masks[:, None], boxes, (h, w))[:, 0]
    assert not torch.equal(theirs >= 0.5, pasted >= 0.5)
    # the detector pastes this way
    det = tiny_detector().eval()
    out = det.transform.postprocess([{"boxes": boxes * 2, "masks": masks[:, None]}], [(96, 128)], [(h, w)])[0]
    assert torch.equal(out["masks"][:, 0] >= 0.5, pasted >= 0.5)


# -- mask targets: BitmapMasks.crop_and_resize(aligned RoIAlign) >= 0.5 -------------------------------------

def roi_align_aligned_reference(image: np.ndarray, box, size: int) -> np.ndarray:
    """RoIAlign with ``aligned=True`` and adaptive sampling, from its definition: the box shifted by
    half a pixel, ``ceil(box side / size)`` bilinear samples per bin and axis, averaged; samples
    more than one pixel outside the image are 0, others are clamped to the border."""
    height, width = image.shape
    x0, y0, x1, y1 = (float(v) - 0.5 for v in box)
    bin_w, bin_h = (x1 - x0) / size, (y1 - y0) / size
    nx, ny = math.ceil((x1 - x0) / size), math.ceil((y1 - y0) / size)

    def sample(y, x):
        if y < -1 or y > height or x < -1 or x > width:
            return 0.0
        y, x = min(max(y, 0.0), height - 1), min(max(x, 0.0), width - 1)
        ya, xa = int(y), int(x)
        yb, xb = min(ya + 1, height - 1), min(xa + 1, width - 1)
        ly, lx = y - ya, x - xa
        return ((1 - ly) * (1 - lx) * image[ya, xa] + (1 - ly) * lx * image[ya, xb]
                + ly * (1 - lx) * image[yb, xa] + ly * lx * image[yb, xb])

    out = np.zeros((size, size))
    for i in range(size):
        for j in range(size):
            ys = [y0 + i * bin_h + (k + 0.5) * bin_h / ny for k in range(ny)]
            xs = [x0 + j * bin_w + (k + 0.5) * bin_w / nx for k in range(nx)]
            out[i, j] = np.mean([sample(y, x) for y in ys for x in xs])
    return out


def test_mask_targets_are_aligned_binary_crops():
    rng = np.random.default_rng(1)
    gt = np.zeros((2, 40, 50), dtype=np.uint8)
    gt[0, 5:30, 8:20] = 1
    gt[0, 12:18, 20:41] = 1
    gt[1] = rng.random((40, 50)) > 0.5
    proposals = torch.tensor([[6.3, 4.1, 42.7, 31.2], [0.0, 0.0, 49.0, 39.0], [10.5, 10.5, 17.25, 22.0]])
    matched = torch.tensor([0, 1, 0])
    got = mask_targets(torch.from_numpy(gt), proposals, matched, 7)
    for k in range(3):
        ref = roi_align_aligned_reference(gt[int(matched[k])].astype(np.float64), proposals[k].tolist(), 7) >= 0.5
        np.testing.assert_array_equal(got[k].numpy(), ref.astype(np.float32))
    # torchvision's targets are soft crops of the unshifted box
    theirs = project_masks_on_boxes(torch.from_numpy(gt), proposals, matched, 7)
    assert ((theirs > 0) & (theirs < 1)).any() and not torch.equal(theirs, got)


# -- mask scoring: the mask's area puts a detection in APs / APm / APl -----------------------------------------

def test_mask_ap_by_size_uses_the_mask_area_as_mmdetection():
    from faster_coco_eval.core import mask as mask_util
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    def rle(mask):
        encoded = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
        return {"size": list(encoded["size"]), "counts": encoded["counts"].decode("ascii")}

    thin = np.zeros((100, 100), dtype=np.uint8)  # a 60x60 box around a 480-pixel L: small by mask, medium by box
    thin[20:80, 20:24] = 1
    thin[76:80, 20:80] = 1
    other = np.zeros((100, 100), dtype=np.uint8)
    other[10:70, 30:34] = 1
    other[10:14, 30:90] = 1
    gt = {"images": [{"id": 1, "width": 100, "height": 100, "file_name": "a.png"}],
          "categories": [{"id": 1, "name": "thing"}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [20, 20, 60, 60], "area": 480,
                           "iscrowd": 0, "segmentation": rle(thin)}]}
    results = [{"image_id": 1, "category_id": 1, "bbox": [30, 10, 60, 60], "score": 0.9, "segmentation": rle(other)},
               {"image_id": 1, "category_id": 1, "bbox": [20, 20, 60, 60], "score": 0.8, "segmentation": rle(thin)}]

    def pycocotools_segm(dets):
        coco = COCO()
        coco.dataset = copy.deepcopy(gt)
        coco.createIndex()
        evaluator = COCOeval(coco, coco.loadRes(copy.deepcopy(dets)), "segm")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
        return [max(0.0, float(v)) * 100 for v in evaluator.stats[:6]]

    without_box = pycocotools_segm([{k: v for k, v in r.items() if k != "bbox"} for r in results])
    with_box = pycocotools_segm(results)
    assert with_box[3] != without_box[3]  # APs: the false positive counts only by its mask's area
    ours = coco_metrics(gt, results, ("segm",))
    assert [ours[f"segm_{n}"] for n in ("AP", "AP50", "AP75", "APs", "APm", "APl")] == pytest.approx(without_box)


# -- evaluation does not depend on batch partners --------------------------------------------------------------

SIZES = [(100, 140), (140, 100), (120, 200), (200, 110), (96, 96), (104, 140)]  # landscape, portrait, square


def write_mixed_orientation_set(root, sizes=SIZES):
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    images, anns = [], []
    for i, (h, w) in enumerate(sizes):
        Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(root / "images" / f"{i}.png")
        images.append({"id": i + 1, "file_name": f"{i}.png", "width": w, "height": h})
        for k in range(2):
            x, y = int(rng.integers(0, w - 40)), int(rng.integers(0, h - 40))
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": 1 + k, "bbox": [x, y, 30, 36],
                         "area": 1080, "iscrowd": 0, "segmentation": [[x, y, x + 30, y, x + 30, y + 36, x, y + 36]]})
    path = root / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": anns,
                                "categories": [{"id": c, "name": f"c{c}"} for c in (1, 2, 3)]}))
    return path


def test_detections_do_not_depend_on_the_batch(tmp_path):
    torch.manual_seed(0)
    det = tiny_detector().eval()
    t = det.transform
    padded = [t.padded_size(h, w) for h, w in SIZES]
    assert len(set(padded)) == 5 and padded[0] == padded[5]  # four groups of one image, one of two
    images = [torch.rand(3, h, w) for h, w in SIZES]
    with torch.no_grad():
        alone = [det([im])[0] for im in images]
        together = det(images)
        padded_to_largest = GeneralizedRCNN.forward(det, images)  # what a batch padded to its largest image gives
    for a, b in zip(alone, together):
        assert len(a["boxes"]) > 0
        torch.testing.assert_close(b["boxes"], a["boxes"], atol=1e-4, rtol=0)
        torch.testing.assert_close(b["scores"], a["scores"], atol=1e-5, rtol=0)
        assert torch.equal(b["labels"], a["labels"])
        torch.testing.assert_close(b["masks"], a["masks"], atol=1e-4, rtol=0)
    assert any(a["boxes"].shape != p["boxes"].shape or not torch.allclose(a["boxes"], p["boxes"], atol=1e-2)
               for a, p in zip(alone, padded_to_largest))
    # the COCO metrics of batch 1 and batch 4
    data = CocoDetection(write_mixed_orientation_set(tmp_path), tmp_path / "images", train=False, masks=False)
    metrics = [evaluate_detector(det, DataLoader(data, batch_size=b, collate_fn=collate_detection)) for b in (1, 4)]
    assert metrics[0] == metrics[1] and metrics[0]["num_images"] == len(SIZES)


def test_the_detector_resizes_as_mmdetection():
    # mmcv rescale_size: scale = min(long / max(h, w), short / min(h, w)); sides int(x * scale + 0.5)
    det = tiny_detector(min_size=800, max_size=1333, size_divisible=32).eval()
    image, _ = det.transform.resize(torch.rand(3, 480, 640))
    assert image.shape[-2:] == (800, 1067)  # 640 * 5/3 = 1066.67: torchvision floors to 1066
    assert det.transform.padded_size(480, 640) == (800, 1088)
    det.train()
    masks = torch.zeros(1, 6, 9, dtype=torch.uint8)
    masks[0, 2, :] = 1
    det.transform.min_size = (34,)
    _, target = det.transform.resize(torch.rand(3, 6, 9), {"boxes": torch.tensor([[0.0, 0, 9, 6]]), "masks": masks})
    # OpenCV INTER_NEAREST maps output row 17 of 6 -> 34 to source row 2 (torch's float32 nearest: 3)
    assert target["masks"].shape == (1, 34, 51) and target["masks"][0, 17].all()


# -- box-only and mixed data --------------------------------------------------------------------------------------

def strip_masks(root, split: str, keep_every: int = 0) -> None:
    """Remove the segmentation of every annotation (or of all but every ``keep_every``-th)."""
    path = root / "annotations" / f"instances_{split}.json"
    data = json.loads(path.read_text())
    for i, ann in enumerate(data["annotations"]):
        if not keep_every or i % keep_every:
            ann.pop("segmentation", None)
    path.write_text(json.dumps(data))


def test_box_only_and_mixed_annotations_in_the_reader(tmp_path):
    from test_detection import write_shapes

    write_shapes(tmp_path)
    strip_masks(tmp_path, "train")
    strip_masks(tmp_path, "val", keep_every=3)  # annotations 0, 3, 6, ... keep their masks
    train = CocoDetection(tmp_path / "annotations" / "instances_train.json", tmp_path / "train", train=True)
    assert train.mask_annotations == 0 and train.num_annotations == 16
    _, target = train[0]
    assert not target["has_mask"].any() and target["masks"].sum() == 0  # no box stands in for a mask
    val = CocoDetection(tmp_path / "annotations" / "instances_val.json", tmp_path / "val", train=False)
    assert val.mask_annotations == 3 and val.num_annotations == 8
    assert val.mask_complete_ids == []  # every image has an annotation without a mask
    _, target = val[0]
    assert target["has_mask"].tolist() == [True, False] and target["masks"][0].sum() > 0


def test_masks_learn_only_from_objects_that_have_one():
    torch.manual_seed(0)
    det = tiny_detector()
    images = [torch.rand(3, 120, 150)]
    masks = torch.zeros(2, 120, 150, dtype=torch.uint8)
    masks[0, 20:80, 10:60] = 1
    target = dict(boxes=torch.tensor([[10.0, 20, 60, 80], [70, 10, 120, 60]]), labels=torch.tensor([1, 3]), masks=masks)
    losses = {}
    for name, has_mask in (("both", [True, True]), ("first", [True, False]), ("none", [False, False])):
        torch.manual_seed(1)  # the same samples every time
        losses[name] = det(images, [dict(target, has_mask=torch.tensor(has_mask))])["loss_mask"]
    torch.manual_seed(1)
    box_only = det(images, [{k: target[k] for k in ("boxes", "labels")}])  # no masks at all: no mask loss
    assert losses["none"] == 0 and box_only["loss_mask"] == 0
    assert losses["first"] > 0 and losses["first"] != losses["both"]


def test_box_only_coco_set_trains_evaluates_and_predicts_from_the_scenes_recipe(tmp_path, capsys):
    """The shipped ``scenes_det`` recipe on a box-only COCO set: only data.root (and the output
    folder, one epoch for time) changed; a box-only detector is trained, scored on boxes alone,
    and predicts. An explicit masks=true stops before training with one line."""
    from piip.cli import main
    from test_detection import write_shapes

    write_shapes(tmp_path / "data")
    for split in ("train", "val"):
        strip_masks(tmp_path / "data", split)
    base = ["train", "det", "scenes_det", f"data.root={tmp_path / 'data'}", "data.train_split=train",
            "data.val_split=val", f"run.out_dir={tmp_path / 'run'}", "optim.epochs=1", "--json"]
    with pytest.warns(UserWarning, match="has boxes but no instance masks: the detector learns boxes only"):
        assert main(base) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "bbox_AP" in summary["eval"] and not any(k.startswith("segm") for k in summary["eval"])
    model_path = tmp_path / "run" / "model.safetensors"
    assert main(["eval", "det", "--checkpoint", str(model_path), "--data", str(tmp_path / "data"), "--split", "val",
                 "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["bbox_AP"] == pytest.approx(summary["eval"]["bbox_AP"]) and "segm_AP" not in record
    assert main(["predict", str(tmp_path / "data" / "val"), "--checkpoint", str(model_path),
                 "--out", str(tmp_path / "pred"), "--score-threshold", "0.0"]) == 0
    assert len(list((tmp_path / "pred").glob("*_pred.png"))) == 4
    capsys.readouterr()
    assert main([*base[:-1], "model.head.masks=true", f"run.out_dir={tmp_path / 'refused'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("piip: error: ") and len(err.splitlines()) == 1
    assert "model.head.masks=false" in err and "instances_train.json" in err
    assert not (tmp_path / "refused" / "checkpoints").exists()


def test_masks_are_scored_on_the_images_whose_annotations_all_have_one(tmp_path):
    from test_detection import write_shapes

    write_shapes(tmp_path)
    path = tmp_path / "annotations" / "instances_val.json"
    data = json.loads(path.read_text())
    for ann in data["annotations"]:
        if ann["image_id"] in (1, 2):
            ann.pop("segmentation")
    path.write_text(json.dumps(data))
    val = CocoDetection(path, tmp_path / "val", train=False, masks=False)
    assert val.mask_complete_ids == [3, 4]
    torch.manual_seed(0)
    det = tiny_detector(num_classes=2).eval()
    metrics = evaluate_detector(det, DataLoader(val, batch_size=2, collate_fn=collate_detection))
    assert metrics["num_images"] == 4 and metrics["segm_num_images"] == 2
    assert "segm_AP" in metrics and "bbox_AP" in metrics
