"""Detection: the torchvision detector on piip backbones, COCO-format data, COCO metrics, the engine,
the command line and prediction."""
from __future__ import annotations

import json
from collections import OrderedDict
import os
import warnings

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from PIL import Image

import piip
from piip.data.coco import CocoDetection, collate_detection
from piip.tasks.detection import (AlignedMultiScaleRoIAlign, PIIPDetector, build_detector, coco_metrics,
                                  detections_to_coco)
from piip.tasks.detection.rcnn_parts import MMDetRegionProposalNetwork, MMDetRoIHeads

from conftest import free_port, jsonl_by_image, needs_fmnist, tiny_branch, tiny_config, train_config_file

#: small heads for CPU tests
SMALL = dict(fpn_channels=32, box_head_dim=64, mask_head_dim=32, anchor_sizes=(16, 32, 64, 128, 256),
             min_size=128, max_size=160, size_divisible=32)


def tiny_detector(num_classes: int = 3, single: bool = False, **settings) -> PIIPDetector:
    if single:
        backbone = piip.PIIP(piip.PIIPConfig(branches=(tiny_branch(64, 128, groups=(), heads=4, pretrain=128,
                                                                    window_size=4, window_block_indexes=(0,)),),
                                             task="det", fpn_norm="layernorm"))
    else:
        backbone = piip.PIIP(tiny_config(task="det"))
    return build_detector(backbone, num_classes, **{**SMALL, **settings})


# -- a hand-written COCO file -------------------------------------------------------------------------

def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE, written here from its definition: run lengths of the column-major
    flattened mask, starting with a run of zeros."""
    flat = mask.flatten(order="F")
    counts, current, run = [], 0, 0
    for value in flat:
        if value != current:
            counts.append(run)
            current, run = value, 0
        run += 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": [int(c) for c in counts]}


def write_coco(root, *, broken: bool = False) -> dict:
    """Four 64x80 images: polygons, compressed RLE, uncompressed RLE, a crowd object and an empty
    image; category ids 3 and 7 (not contiguous). Returns the expected masks by annotation id."""
    from pycocotools import mask as coco_mask  # the reference implementation

    os.makedirs(root / "images", exist_ok=True)
    h, w = 64, 80
    masks = {}
    rect = np.zeros((h, w), np.uint8)
    rect[10:30, 20:50] = 1                               # polygon 20..50 x 10..30
    masks[1] = rect
    blob = np.zeros((h, w), np.uint8)
    blob[5:25, 5:15] = 1
    blob[15:25, 15:25] = 1                               # compressed RLE
    masks[2] = blob
    ring = np.zeros((h, w), np.uint8)
    ring[30:60, 40:70] = 1
    ring[40:50, 50:60] = 0                               # uncompressed RLE (with a hole)
    masks[3] = ring
    compressed = coco_mask.encode(np.asfortranarray(blob))
    compressed["counts"] = compressed["counts"].decode("ascii")
    anns = [
        {"id": 1, "image_id": 1, "category_id": 3, "bbox": [20, 10, 30, 20], "area": 600, "iscrowd": 0,
         "segmentation": [[20, 10, 50, 10, 50, 30, 20, 30]]},
        {"id": 2, "image_id": 2, "category_id": 7, "bbox": [5, 5, 20, 20], "area": 300, "iscrowd": 0,
         "segmentation": compressed},
        {"id": 3, "image_id": 2, "category_id": 3, "bbox": [40, 30, 30, 30], "area": 800, "iscrowd": 0,
         "segmentation": uncompressed_rle(ring)},
        {"id": 4, "image_id": 3, "category_id": 7, "bbox": [0, 0, 40, 40], "area": 1600, "iscrowd": 1,
         "segmentation": uncompressed_rle(np.pad(np.ones((40, 40), np.uint8), ((0, h - 40), (0, w - 40))))},
        {"id": 5, "image_id": 1, "category_id": 7, "bbox": [70, 5, 0, 10], "area": 0, "iscrowd": 0,
         "segmentation": []},                                 # degenerate: zero width
    ]
    images = []
    rng = np.random.default_rng(0)
    for i in range(1, 5):                                      # image 4 has no annotation
        name = f"img{i}.png"
        Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(root / "images" / name)
        images.append({"id": i, "file_name": name, "width": w, "height": h})
    if broken:
        (root / "images" / "img2.png").write_bytes(b"not a png")
    data = {"images": images, "annotations": anns,
            "categories": [{"id": 7, "name": "boot"}, {"id": 3, "name": "bag"}]}
    (root / "instances.json").write_text(json.dumps(data))
    return masks


def test_coco_reader_polygons_rle_crowd_empty(tmp_path):
    expected = write_coco(tmp_path)
    with pytest.warns(RuntimeWarning, match="dropped 1 degenerate"):
        train = CocoDetection(tmp_path / "instances.json", tmp_path / "images", train=True)
    assert train.classes == ("bag", "boot") and train.category_ids == (3, 7)   # sorted by id, labels 1..K
    assert train.ids == [1, 2]                          # the crowd-only image 3 and the empty image 4 are skipped
    image, target = train[0]
    assert image.shape == (3, 64, 80) and image.dtype == torch.float32 and 0 <= image.min() and image.max() <= 1
    assert target["labels"].tolist() == [1] and target["boxes"].tolist() == [[20.0, 10.0, 50.0, 30.0]]
    # the polygon's mask (pycocotools' rasteriser includes the right/bottom edge pixels of a polygon)
    assert target["masks"].shape == (1, 64, 80) and target["masks"][0, 10:30, 20:50].all()
    assert abs(int(target["masks"].sum()) - int(expected[1].sum())) <= 30 + 20 + 1
    _, target = train[1]
    assert target["labels"].tolist() == [2, 1]
    assert torch.equal(target["masks"][0], torch.from_numpy(expected[2]))   # compressed RLE
    assert torch.equal(target["masks"][1], torch.from_numpy(expected[3]))   # uncompressed RLE
    with pytest.warns(RuntimeWarning, match="dropped 1 degenerate"):   # counted in evaluation too
        val = CocoDetection(tmp_path / "instances.json", tmp_path / "images", train=False, masks=False)
    assert val.ids == [1, 2, 3, 4] and "masks" not in val[0][1]
    _, crowd = val[2]
    assert crowd["iscrowd"].tolist() == [1] and crowd["labels"].tolist() == [2]
    assert val[3][1]["boxes"].shape == (0, 4)
    assert train.aspect_groups() == [1, 1]


def test_coco_reader_errors(tmp_path):
    write_coco(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CocoDetection(tmp_path / "nope.json", tmp_path / "images", train=True)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        CocoDetection(bad, tmp_path / "images", train=True)
    data = json.loads((tmp_path / "instances.json").read_text())
    for edit, message in [
        (lambda d: d.pop("annotations"), "missing the 'annotations' field"),
        (lambda d: d["annotations"][0].update(bbox=[1, 2, 3]), r"annotations\[0\] \(id 1\): 'bbox' must be"),
        (lambda d: d["annotations"][1].update(category_id=99), "category_id 99 is not in 'categories'"),
        (lambda d: d["images"][0].pop("width"), r"images\[0\] \(img1.png\) needs a positive int 'width'"),
        (lambda d: d["annotations"][0].update(segmentation="x"), "'segmentation' must be a list of polygons"),
    ]:
        broken = json.loads(json.dumps(data))
        edit(broken)
        bad.write_text(json.dumps(broken))
        with pytest.raises(ValueError, match=message):
            CocoDetection(bad, tmp_path / "images", train=True)
    os.remove(tmp_path / "images" / "img3.png")
    os.remove(tmp_path / "images" / "img4.png")
    with pytest.raises(FileNotFoundError, match=r"2 of 4 images .* missing .*\['img3.png', 'img4.png'\]"):
        CocoDetection(tmp_path / "instances.json", tmp_path / "images", train=True)


def test_unreadable_images_are_skipped_and_counted(tmp_path):
    write_coco(tmp_path, broken=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        train = CocoDetection(tmp_path / "instances.json", tmp_path / "images", train=True)
        val = CocoDetection(tmp_path / "instances.json", tmp_path / "images", train=False, masks=False)
    with pytest.warns(RuntimeWarning, match="img2.png"):
        _, target = train[1]                             # the next readable image instead
    assert target["image_id"] == 1 and train.skipped == 1
    with pytest.warns(RuntimeWarning, match="img2.png"):
        assert val[1] is None
    images, targets = collate_detection([val[0], val[1], val[2]])
    assert [t["image_id"] for t in targets] == [1, 3]


# -- the detector ---------------------------------------------------------------------------------------

def _targets(n: int = 2):
    return [dict(boxes=torch.tensor([[10.0, 20, 60, 80], [70, 10, 120, 60]]), labels=torch.tensor([1, 3]),
                 masks=torch.zeros(2, 120, 150, dtype=torch.uint8).index_fill_(1, torch.arange(20, 80), 1))
            for _ in range(n)]


@pytest.mark.parametrize("single", [False, True], ids=["piip", "vit"])
def test_detector_forward_backward(single):
    torch.manual_seed(0)
    det = tiny_detector(single=single)
    images = [torch.rand(3, 120, 150), torch.rand(3, 120, 150)]
    losses = det(images, _targets())
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
    sum(losses.values()).backward()
    body = det.backbone.body
    assert all(p.grad is not None for p in body.parameters() if p.requires_grad)
    det.eval()
    with torch.no_grad():
        out = det(images)
    assert len(out) == 2 and out[0]["boxes"].shape[1] == 4 and out[0]["masks"].shape[1:] == (1, 120, 150)
    assert out[0]["labels"].min() >= 1 and out[0]["labels"].max() <= 3


def test_detector_settings_are_the_authors_mask_rcnn():
    """Section 2 of the issue, read off the built model (piip_tsb, on the meta device)."""
    with torch.device("meta"):
        det = build_detector(piip.create_model("piip_tsb", task="det"), 80)
    fpn = det.backbone.fpn
    assert det.backbone.out_channels == 256 and len(fpn.inner_blocks) == 4
    assert type(fpn.extra_blocks).__name__ == "LastLevelMaxPool"
    assert all(b[0].in_channels == 768 for b in fpn.inner_blocks)
    rpn = det.rpn
    assert isinstance(rpn, MMDetRegionProposalNetwork) and rpn.box_loss == "l1"
    assert rpn.anchor_generator.sizes == ((32,), (64,), (128,), (256,), (512,))
    assert rpn.anchor_generator.aspect_ratios == ((0.5, 1.0, 2.0),) * 5
    assert rpn._pre_nms_top_n == {"training": 2000, "testing": 1000}
    assert rpn._post_nms_top_n == {"training": 1000, "testing": 1000}
    assert rpn.nms_thresh == 0.7 and rpn.fg_bg_sampler.batch_size_per_image == 256
    assert (rpn.proposal_matcher.high_threshold, rpn.proposal_matcher.low_threshold) == (0.7, 0.3)
    heads = det.roi_heads
    assert isinstance(heads, MMDetRoIHeads) and heads.box_loss == "l1"
    for pool, size in ((heads.box_roi_pool, (7, 7)), (heads.mask_roi_pool, (14, 14))):
        assert isinstance(pool, AlignedMultiScaleRoIAlign) and pool.sampling_ratio == 0 and pool.output_size == size
    assert heads.fg_bg_sampler.batch_size_per_image == 512 and heads.fg_bg_sampler.positive_fraction == 0.25
    assert (heads.score_thresh, heads.nms_thresh, heads.detections_per_img) == (0.05, 0.5, 100)
    assert heads.box_head.fc6.out_features == 1024 and heads.box_predictor.cls_score.out_features == 81
    assert heads.box_predictor.bbox_pred.out_features == 81 * 4
    convs = [m for m in heads.mask_head.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 4 and all(c.out_channels == 256 and c.kernel_size == (3, 3) for c in convs)
    assert not any(isinstance(m, (torch.nn.BatchNorm2d, torch.nn.GroupNorm)) for m in heads.modules())
    t = det.transform
    assert (t.min_size, t.max_size, t.size_divisible) == ((672,), 1120, 224)
    assert t.image_mean == [0.5] * 3 and t.image_std == [0.5] * 3
    assert det.config.mask_thresh == 0.5
    faster = build_detector(piip.PIIP(tiny_config(task="det")), 3, masks=False)
    assert not faster.roi_heads.has_mask()


def test_aligned_roi_align_matches_torchvision_roi_align_with_aligned_true():
    """The pooler is torchvision's roi_align(aligned=True) at the level MMDetection assigns
    (floor(log2(sqrt(area) / 56)), clamped to the four levels)."""
    from torchvision.ops import roi_align

    torch.manual_seed(0)
    feats = {str(i): torch.randn(2, 4, 64 // 2 ** i, 64 // 2 ** i) for i in range(4)}
    boxes = [torch.tensor([[1.0, 2, 30, 40], [10, 10, 250, 200]]), torch.tensor([[5.0, 5, 120, 130]])]
    pool = AlignedMultiScaleRoIAlign(["0", "1", "2", "3"], 7, sampling_ratio=0)
    out = pool(feats, boxes, [(256, 256)] * 2)
    for roi, (img, box) in enumerate([(0, boxes[0][0]), (0, boxes[0][1]), (1, boxes[1][0])]):
        side = ((box[2] - box[0]) * (box[3] - box[1])).sqrt()
        level = int(min(3, max(0, np.floor(np.log2(float(side) / 56 + 1e-6)))))
        ref = roi_align(feats[str(level)], [torch.zeros(0, 4)] * img + [box[None]], 7,
                        spatial_scale=1 / (4 * 2 ** level), sampling_ratio=0, aligned=True)
        torch.testing.assert_close(out[roi], ref[0])


def test_l1_box_losses():
    """The RPN's box loss is the L1 distance over the sampled anchors' count (MMDetection 2.x)."""
    torch.manual_seed(0)
    det = tiny_detector()
    rpn = det.rpn
    labels = [torch.tensor([1.0, 0.0, 1.0, -1.0, 0.0])]
    deltas, targets = torch.randn(5, 4), [torch.randn(5, 4)]
    _, box_loss = rpn.compute_loss(torch.randn(5, 1), deltas, labels, targets)
    pos = torch.tensor([0, 2])
    expected = (deltas[pos] - targets[0][pos]).abs().sum() / 4       # 2 positives + 2 negatives sampled
    torch.testing.assert_close(box_loss, expected)


# -- metrics against pycocotools -------------------------------------------------------------------

def test_coco_metrics_equal_pycocotools_run_independently(tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    write_coco(tmp_path)
    gt = json.loads((tmp_path / "instances.json").read_text())
    gt["annotations"] = [a for a in gt["annotations"] if a["bbox"][2] > 0]
    rng = np.random.default_rng(1)
    results = []
    for image_id in (1, 2, 3, 4):
        for _ in range(6):
            x, y = rng.uniform(0, 50), rng.uniform(0, 30)
            w, h = rng.uniform(5, 30), rng.uniform(5, 30)
            mask = torch.zeros(1, 1, 64, 80)
            mask[..., int(y):int(y + h), int(x):int(x + w)] = rng.uniform(0.4, 1.0)
            out = {"boxes": torch.tensor([[x, y, x + w, y + h]]), "scores": torch.tensor([rng.uniform()]),
                   "labels": torch.tensor([int(rng.integers(1, 3))]), "masks": mask[0:1]}
            results.extend(detections_to_coco(out, image_id, (3, 7), mask_thresh=0.5))
    # one exact detection, so the APs are not all zero
    results.append({"image_id": 1, "category_id": 3, "bbox": [20, 10, 30, 20], "score": 0.99,
                    "segmentation": detections_to_coco(
                        {"boxes": torch.tensor([[20.0, 10, 50, 30]]), "scores": torch.tensor([0.99]),
                         "labels": torch.tensor([1]),
                         "masks": F.pad(torch.ones(1, 1, 20, 30), (20, 30, 10, 34))}, 1, (3, 7))[0]["segmentation"]})
    ours = coco_metrics(gt, results)
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    coco_gt = COCO(str(tmp_path / "gt.json"))
    for iou_type in ("bbox", "segm"):
        ev = COCOeval(coco_gt, coco_gt.loadRes(json.loads(json.dumps(results))), iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
        for name, value in zip(("AP", "AP50", "AP75", "APs", "APm", "APl"), ev.stats[:6]):
            assert ours[f"{iou_type}_{name}"] == pytest.approx(max(0.0, value) * 100, abs=1e-9), (iou_type, name)
    assert ours["bbox_AP50"] > 0


def test_coco_metrics_with_annotation_ids_from_zero():
    """COCOeval marks matches with annotation ids and 0 means unmatched: a dataset numbering its
    annotations from 0 must still score a perfect result 100 (it scored 25 before)."""
    gt = {"images": [{"id": 1, "width": 100, "height": 100, "file_name": "a.png"}],
          "categories": [{"id": 1, "name": "x"}],
          "annotations": [{"id": 0, "image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 40], "area": 1600, "iscrowd": 0},
                          {"id": 1, "image_id": 1, "category_id": 1, "bbox": [60, 50, 30, 30], "area": 900, "iscrowd": 0}]}
    results = [{"image_id": 1, "category_id": 1, "bbox": a["bbox"], "score": 0.9 - 0.1 * i}
               for i, a in enumerate(gt["annotations"])]
    assert coco_metrics(gt, results, ("bbox",))["bbox_AP"] == pytest.approx(100.0)
    assert gt["annotations"][0]["id"] == 0  # the caller's data untouched


# -- the engine, the command line, predict ---------------------------------------------------------

def write_shapes(root, n_train: int = 8, n_val: int = 4, same: bool = False):
    """A COCO root of coloured rectangles (red = class 10, green = class 20) on noise."""
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        os.makedirs(root / split, exist_ok=True)
        images, anns = [], []
        for i in range(n):
            r = np.random.default_rng(0) if same else rng
            h, w = (128, 160) if i % 2 or same else (160, 128)
            img = (r.random((h, w, 3)) * 60).astype(np.uint8)
            for _ in range(2):
                x, y = int(r.integers(0, w - 60)), int(r.integers(0, h - 60))
                bw, bh = int(r.integers(24, 60)), int(r.integers(24, 60))
                c = int(r.integers(1, 3))
                img[y:y + bh, x:x + bw] = (220, 40, 40) if c == 1 else (40, 220, 40)
                anns.append(dict(id=len(anns) + 1, image_id=i + 1, category_id=10 * c, bbox=[x, y, bw, bh],
                                 area=bw * bh, iscrowd=0, segmentation=[[x, y, x + bw, y, x + bw, y + bh, x, y + bh]]))
            Image.fromarray(img).save(root / split / f"{i:04d}.png")
            images.append(dict(id=i + 1, file_name=f"{i:04d}.png", width=w, height=h))
        os.makedirs(root / "annotations", exist_ok=True)
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(
            dict(images=images, annotations=anns, categories=[dict(id=10, name="red"), dict(id=20, name="green")])))


def det_config(path, data_root, out_dir, **optim):
    config = {"task": "det",
              "model": {"piip": tiny_config(task="det").to_dict(), "head": SMALL},
              "data": {"root": str(data_root), "train_split": "train", "val_split": "val"},
              "optim": {"lr": 5e-4, "weight_decay": 0.05, "new_module_lr_mult": 1.0, "epochs": 2,
                        "warmup_steps": 1, "warmup_lr": 5e-5, "schedule": "step", "milestones": [8],
                        "batch_size": 4, **optim},
              "run": {"out_dir": str(out_dir), "num_workers": 0, "log_every": 1, "progress": False,
                      "device": "cpu"}}
    path.write_text(json.dumps(config))
    return path


def test_cli_train_eval_predict_detection(tmp_path, capsys):
    from piip.cli import main

    write_shapes(tmp_path / "data")
    cfg = det_config(tmp_path / "det.json", tmp_path / "data", tmp_path / "run")
    assert main(["train", "det", str(cfg), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["step"] == 4 and summary["eval"]["num_images"] == 4
    assert (tmp_path / "run" / "eval" / "detections.json").is_file()
    model = piip.load(str(tmp_path / "run" / "model.safetensors"))
    assert isinstance(model, PIIPDetector) and model.config.class_names == ("red", "green")
    assert model.config.category_ids == (10, 20)
    assert main(["eval", "det", "--checkpoint", str(tmp_path / "run" / "model.safetensors"),
                 "--data", str(tmp_path / "data"), "--split", "val", "--out", str(tmp_path / "ev"), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    for key in ("bbox_AP", "bbox_AP50", "segm_AP"):
        assert record[key] == pytest.approx(summary["eval"][key], abs=1e-9)
    detections = json.loads((tmp_path / "ev" / "detections.json").read_text())
    assert all({"image_id", "category_id", "bbox", "score", "segmentation"} <= set(d) for d in detections)
    assert {d["category_id"] for d in detections} <= {10, 20}
    # predict: a drawn image per input and one JSON
    assert main(["predict", str(tmp_path / "data" / "val"), "--checkpoint", str(tmp_path / "run" / "model.safetensors"),
                 "--out", str(tmp_path / "pred"), "--score-threshold", "0.0"]) == 0
    drawn = sorted(p.name for p in (tmp_path / "pred").glob("*_pred.png"))
    assert drawn == ["0000_pred.png", "0001_pred.png", "0002_pred.png", "0003_pred.png"]
    preds = jsonl_by_image(tmp_path / "pred" / "predictions.jsonl")
    assert len(preds) == 4 and all(set(p) >= {"boxes", "classes", "scores"} for p in preds.values())
    with Image.open(tmp_path / "pred" / "0000_pred.png") as im:
        assert im.size == (128, 160)
    # a checkpoint whose classes do not match the data is refused
    three = piip.save(tiny_detector(num_classes=3), tmp_path / "three.safetensors")
    assert main(["eval", "det", "--checkpoint", str(three), "--data", str(tmp_path / "data"), "--split", "val"]) == 2
    assert "class mismatch" in capsys.readouterr().err


def test_predict_classification_checkpoint_top5(tmp_path):
    from piip.tasks.predict import predict_files

    model = piip.PIIP(tiny_config(task="cls", num_classes=7, cls_pool="avg"))
    path = piip.save(model, tmp_path / "cls.safetensors", metadata={"class_names": json.dumps(list("abcdefg"))})
    Image.fromarray(np.zeros((50, 60, 3), np.uint8)).save(tmp_path / "x.png")
    result = predict_files(path, [tmp_path / "x.png"], tmp_path / "out")
    (pred,) = result["predictions"].values()
    assert len(pred["top"]) == 5 and {t["class"] for t in pred["top"]} <= set("abcdefg")
    assert sum(t["probability"] for t in pred["top"]) <= 1.0 + 1e-6 and not result["images"]


@needs_fmnist
def test_short_training_on_generated_scenes_loss_decreases(tmp_path):
    from piip.data.scenes import generate_scenes
    from piip.engine import load_config, train

    generate_scenes(tmp_path / "scenes", train_images=16, val_images=4, canvas=(128, 160), max_size=120, min_size=16)
    cfg = load_config(det_config(tmp_path / "det.json", tmp_path / "scenes", tmp_path / "run", epochs=6,
                                 batch_size=4, lr=1e-3))
    summary = train(cfg)
    losses = list(summary["step_losses"].values())
    assert len(losses) == 24
    assert np.mean(losses[-4:]) < 0.8 * np.mean(losses[:4]), losses


# -- DDP ---------------------------------------------------------------------------------------------



def ddp_and_single_step(tmp_path, head: dict, **optim) -> tuple[dict, dict]:
    """One optimiser step of a detector with ``head`` settings on two identical images, by 2 processes
    x 1 image and by 1 process x 2 images (no flips, no evaluation): their training checkpoints."""
    from piip.engine import load_config, train
    from piip.engine.checkpoint import load_training_checkpoint

    write_shapes(tmp_path / "data", n_train=2, n_val=1, same=True)
    paths = {}
    for name in ("ddp", "single"):
        path = det_config(tmp_path / f"{name}.json", tmp_path / "data", tmp_path / name, epochs=1, batch_size=2,
                          **optim)
        config = json.loads(path.read_text())
        config["model"]["head"] = head
        config["data"]["flip_prob"] = 0.0
        config["run"]["eval_every"] = 0
        path.write_text(json.dumps(config))
        paths[name] = path
    mp.spawn(train_config_file, args=(2, free_port(), str(paths["ddp"])), nprocs=2, join=True)
    train(load_config(paths["single"]))
    a, b = load_training_checkpoint(tmp_path / "ddp"), load_training_checkpoint(tmp_path / "single")
    assert a["world_size"] == 2 and a["step"] == b["step"] == 1
    return a, b


def test_two_process_ddp_detector_step_equals_one_process(tmp_path):
    """Identical images and every anchor/proposal sampled (deterministic losses): one optimiser step
    with 2 processes x 1 image equals 1 process x 2 images."""
    head = {**SMALL, "rpn_batch_size_per_image": 10 ** 6, "box_batch_size_per_image": 10 ** 6}
    a, b = ddp_and_single_step(tmp_path, head)
    for key, value in b["model"].items():
        torch.testing.assert_close(a["model"][key], value, rtol=1e-4, atol=1e-5, msg=key)


# -- the authors' Mask R-CNN heads -------------------------------------------------------------------

def mmdet_heads(d1: int, classes: int, fpn: int = 32, fc: int = 64, mask: int = 32, seed: int = 0) -> dict:
    """Random tensors under MMDetection 2.x's Mask R-CNN neck/head names and shapes."""
    g = torch.Generator().manual_seed(seed)
    shapes = {}
    for i in range(4):
        shapes[f"neck.lateral_convs.{i}.conv"] = (fpn, d1, 1, 1)
        shapes[f"neck.fpn_convs.{i}.conv"] = (fpn, fpn, 3, 3)
    shapes.update({"rpn_head.rpn_conv": (fpn, fpn, 3, 3), "rpn_head.rpn_cls": (3, fpn, 1, 1),
                   "rpn_head.rpn_reg": (12, fpn, 1, 1), "roi_head.bbox_head.shared_fcs.0": (fc, fpn * 49),
                   "roi_head.bbox_head.shared_fcs.1": (fc, fc), "roi_head.bbox_head.fc_cls": (classes + 1, fc),
                   "roi_head.bbox_head.fc_reg": (4 * classes, fc), "roi_head.mask_head.upsample": (mask, mask, 2, 2),
                   "roi_head.mask_head.conv_logits": (classes, mask, 1, 1)})
    for i in range(4):
        shapes[f"roi_head.mask_head.convs.{i}.conv"] = (mask, fpn if i == 0 else mask, 3, 3)
    out = {}
    for name, shape in shapes.items():
        out[f"{name}.weight"] = torch.randn(shape, generator=g) * 0.1
        bias = shape[1] if name.endswith("upsample") else shape[0]
        out[f"{name}.bias"] = torch.randn(bias, generator=g) * 0.1
    return out


def test_converted_mmdet_heads_compute_what_mmdet_computes():
    """For fixed features and proposals, the converted FPN, RPN, box and mask heads give MMDetection's
    outputs (its computation written here): FPN maps, objectness and deltas per anchor in the same
    anchor order, per-class probabilities (background last there, first here) and box deltas, and
    per-class mask logits."""
    from torchvision.models.detection.image_list import ImageList
    from torchvision.ops import roi_align

    from piip.tasks.detection.authors_heads import convert_mmdet_heads, mask_rcnn_layout

    K = 5
    theirs = mmdet_heads(64, K)
    extra = {}
    for key, value in theirs.items():
        prefix, rest = key.split(".", 1)
        extra.setdefault(prefix, {})[rest] = value
    layout = mask_rcnn_layout(extra)
    assert layout == dict(num_classes=K, masks=True, fpn_channels=32, box_head_dim=64, mask_head_dim=32)
    det = build_detector(piip.PIIP(tiny_config(task="det")), **layout).eval()
    heads, _ = convert_mmdet_heads(extra)
    det.load_state_dict({**{k: v for k, v in det.state_dict().items() if k.startswith("backbone.body.")}, **heads})
    w = lambda name: theirs[f"{name}.weight"]  # noqa: E731
    b = lambda name: theirs[f"{name}.bias"]  # noqa: E731
    torch.manual_seed(0)
    feats = OrderedDict((str(i), torch.randn(1, 64, 32 // 2 ** i, 40 // 2 ** i)) for i in range(4))
    with torch.no_grad():
        # FPN: lateral 1x1, nearest top-down sum, 3x3, and a fifth level by max_pool(kernel 1, stride 2)
        lat = [F.conv2d(feats[str(i)], w(f"neck.lateral_convs.{i}.conv"), b(f"neck.lateral_convs.{i}.conv")) for i in range(4)]
        for i in (3, 2, 1):
            lat[i - 1] = lat[i - 1] + F.interpolate(lat[i], size=lat[i - 1].shape[-2:], mode="nearest")
        ref = [F.conv2d(x, w(f"neck.fpn_convs.{i}.conv"), b(f"neck.fpn_convs.{i}.conv"), padding=1) for i, x in enumerate(lat)]
        ref.append(F.max_pool2d(ref[-1], 1, stride=2))
        ours = det.backbone.fpn(feats)
        for r, o in zip(ref, ours.values()):
            torch.testing.assert_close(o, r)
        # RPN per level; MMDetection's anchors: base size 8 x stride, ratios 0.5/1/2, centred on the
        # cell's corner, not rounded; order (y, x, anchor)
        objectness, deltas = det.rpn.head(list(ours.values()))
        anchors = det.rpn.anchor_generator(ImageList(torch.zeros(1, 3, 128, 160), [(128, 160)]), list(ours.values()))[0]
        ref_anchors = []
        for level, x in enumerate(ref):
            t = F.relu(F.conv2d(x, w("rpn_head.rpn_conv"), b("rpn_head.rpn_conv"), padding=1))
            torch.testing.assert_close(objectness[level], F.conv2d(t, w("rpn_head.rpn_cls"), b("rpn_head.rpn_cls")))
            torch.testing.assert_close(deltas[level], F.conv2d(t, w("rpn_head.rpn_reg"), b("rpn_head.rpn_reg")))
            stride, size = 4 * 2 ** level, 32 * 2 ** level
            h_ratio = torch.tensor([0.5, 1.0, 2.0]).sqrt()
            ws, hs = size / h_ratio, size * h_ratio
            base = torch.stack([-0.5 * ws, -0.5 * hs, 0.5 * ws, 0.5 * hs], dim=1)
            ys, xs = torch.meshgrid(torch.arange(x.shape[-2]) * stride, torch.arange(x.shape[-1]) * stride, indexing="ij")
            shifts = torch.stack([xs, ys, xs, ys], dim=-1).reshape(-1, 1, 4).float()
            ref_anchors.append((shifts + base).reshape(-1, 4))
        torch.testing.assert_close(anchors, torch.cat(ref_anchors))
        # box head on fixed proposals (RoIAlign aligned=True at MMDetection's level, finest scale 56)
        proposals = torch.tensor([[4.0, 6, 40, 50], [10, 8, 120, 110], [0, 0, 150, 125]])
        image_shapes = [(128, 160)]
        rois = []
        for box in proposals:
            side = float(((box[2] - box[0]) * (box[3] - box[1])).sqrt())
            level = int(min(3, max(0, np.floor(np.log2(side / 56 + 1e-6)))))
            rois.append(roi_align(ours[str(level)], [box[None]], 7, 1 / (4 * 2 ** level), 0, aligned=True))
        x = torch.cat(rois).flatten(1)
        x = F.relu(F.linear(F.relu(F.linear(x, w("roi_head.bbox_head.shared_fcs.0"), b("roi_head.bbox_head.shared_fcs.0"))),
                            w("roi_head.bbox_head.shared_fcs.1"), b("roi_head.bbox_head.shared_fcs.1")))
        ref_probs = F.linear(x, w("roi_head.bbox_head.fc_cls"), b("roi_head.bbox_head.fc_cls")).softmax(-1)
        ref_deltas = F.linear(x, w("roi_head.bbox_head.fc_reg"), b("roi_head.bbox_head.fc_reg"))
        box_feats = det.roi_heads.box_head(det.roi_heads.box_roi_pool(ours, [proposals], image_shapes))
        logits, our_deltas = det.roi_heads.box_predictor(box_feats)
        probs = logits.softmax(-1)
        torch.testing.assert_close(probs[:, 1:], ref_probs[:, :K])          # object classes
        torch.testing.assert_close(probs[:, 0], ref_probs[:, K])            # background
        torch.testing.assert_close(our_deltas[:, 4:], ref_deltas)
        # mask head
        m = torch.cat([roi_align(ours[str(int(min(3, max(0, np.floor(np.log2(float(((p[2] - p[0]) * (p[3] - p[1])).sqrt()) / 56 + 1e-6))))))],
                                 [p[None]], 14, 1 / (4 * 2 ** int(min(3, max(0, np.floor(np.log2(float(((p[2] - p[0]) * (p[3] - p[1])).sqrt()) / 56 + 1e-6)))))),
                                 0, aligned=True) for p in proposals])
        for i in range(4):
            m = F.relu(F.conv2d(m, w(f"roi_head.mask_head.convs.{i}.conv"), b(f"roi_head.mask_head.convs.{i}.conv"), padding=1))
        m = F.relu(F.conv_transpose2d(m, w("roi_head.mask_head.upsample"), b("roi_head.mask_head.upsample"), stride=2))
        ref_masks = F.conv2d(m, w("roi_head.mask_head.conv_logits"), b("roi_head.mask_head.conv_logits"))
        our_masks = det.roi_heads.mask_predictor(det.roi_heads.mask_head(
            det.roi_heads.mask_roi_pool(ours, [proposals], image_shapes)))
        torch.testing.assert_close(our_masks[:, 1:], ref_masks)


def test_piip_convert_turns_an_mmdet_mask_rcnn_file_into_a_detector(tmp_path, capsys):
    """A Mask R-CNN file in the authors' layout (the golden backbone plus neck/heads under their names,
    ``state_dict`` + ``meta``) becomes a complete detector checkpoint; a class-agnostic regressor is refused."""
    import copy as _copy

    from safetensors.torch import load_file

    from piip.cli import main
    from piip.compat.original import CheckpointError, convert_checkpoint
    from conftest import FIXTURES

    fx = json.loads((FIXTURES / "det3_deit.json").read_text())
    tensors = load_file(str(FIXTURES / "det3_deit.safetensors"))
    backbone = {f"backbone.{k[len('state_dict/'):]}": v for k, v in tensors.items() if k.startswith("state_dict/")}
    heads = mmdet_heads(64, 80)
    torch.save({"meta": {"epoch": 12}, "state_dict": {**backbone, **heads}}, tmp_path / "mask_rcnn.pth")
    (tmp_path / "kwargs.json").write_text(json.dumps(fx["kwargs"]))
    convert = ["convert", str(tmp_path / "mask_rcnn.pth"), "--config", str(tmp_path / "kwargs.json"), "-o"]
    assert main([*convert, str(tmp_path / "det.safetensors"), "--head", "size_divisible=64",
                 "--head", "image_mean=[0.485,0.456,0.406]"]) == 0
    det = piip.load(str(tmp_path / "det.safetensors"))
    assert isinstance(det, PIIPDetector) and det.config.num_classes == 80 and det.config.masks
    assert det.config.size_divisible == 64 and det.config.image_mean == (0.485, 0.456, 0.406)
    capsys.readouterr()
    for head, message in (("min_sise=800", "unknown det model setting(s) heads.['min_sise']"),
                          ("min_size=big", "heads.min_size"), ("min_size", "not of the form key.sub=value")):
        assert main([*convert, str(tmp_path / "refused.safetensors"), "--head", head]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "refused.safetensors").exists()
    assert det.config.class_names[:3] == ("person", "bicycle", "car") and det.config.category_ids[-1] == 90
    state = det.state_dict()
    torch.testing.assert_close(state["roi_heads.box_predictor.cls_score.weight"][0], heads["roi_head.bbox_head.fc_cls.weight"][80])
    torch.testing.assert_close(state["rpn.head.conv.0.0.weight"], heads["rpn_head.rpn_conv.weight"])
    torch.testing.assert_close(state["backbone.body.merge.weights"], torch.stack([backbone[f"backbone.w{i}"] for i in (1, 2, 3)]).float())
    det.eval()
    with torch.no_grad():
        out = det([torch.rand(3, 150, 180)])
    assert out[0]["masks"].shape[1:] == (1, 150, 180)
    agnostic = _copy.deepcopy(heads)
    agnostic["roi_head.bbox_head.fc_reg.weight"] = agnostic["roi_head.bbox_head.fc_reg.weight"][:4]
    agnostic["roi_head.bbox_head.fc_reg.bias"] = agnostic["roi_head.bbox_head.fc_reg.bias"][:4]
    torch.save({"state_dict": {**backbone, **agnostic}}, tmp_path / "agnostic.pth")
    with pytest.raises(CheckpointError, match="class-agnostic"):
        convert_checkpoint(tmp_path / "agnostic.pth", fx["kwargs"], tmp_path / "x.safetensors")


def test_shipped_1x_recipe_is_the_papers():
    """mask_rcnn_piip_tsb_1x: AdamW lr 1e-4, wd 0.05 (1-d parameters and biases exempt, as the
    original), layer decay 0.85 with every branch's last block at 0.85 and the embeddings at
    0.85^13, new modules (interactions, merge, pyramid, neck, heads) at the full lr, steps at epochs
    8 and 11 of 12, 500 warm-up steps from 0.001 x lr, global batch 16."""
    from piip.engine import load_config, param_rules

    cfg = load_config("mask_rcnn_piip_tsb_1x")
    o = cfg.optim
    assert (o.lr, o.weight_decay, o.layer_decay, o.epochs, o.milestones, o.warmup_steps, o.batch_size) == \
        (1e-4, 0.05, 0.85, 12, [8, 11], 500, 16)
    assert o.warmup_lr == pytest.approx(1e-4 * 0.001) and o.schedule == "step"
    with torch.device("meta"):
        det = build_detector(piip.create_model("piip_tsb", task="det"), 80)
    rules = param_rules(det, weight_decay=o.weight_decay, new_module_lr_mult=o.new_module_lr_mult,
                        layer_decay=o.layer_decay, decay_exempt_by_name=o.decay_exempt_by_name)
    body = "backbone.body."
    for k in range(3):
        assert rules[f"{body}branches.{k}.blocks.11.attn.qkv.weight"].lr_scale == pytest.approx(0.85)
        assert rules[f"{body}branches.{k}.pos_embed"].lr_scale == pytest.approx(0.85 ** 13)
    for name in ("rpn.head.conv.0.0.weight", "roi_heads.box_head.fc6.weight", "backbone.fpn.inner_blocks.0.0.weight",
                 f"{body}interactions.0.units.0.inject_a_to_b.ca_gamma", f"{body}merge.weights"):
        assert rules[name].lr_scale == pytest.approx(1.0), name
    assert rules[f"{body}branches.0.pos_embed"].weight_decay == 0.05       # the original decays it
    assert rules[f"{body}merge.weights"].weight_decay == 0.0                # 1-d
    assert rules["roi_heads.box_head.fc6.bias"].weight_decay == 0.0


def test_large_scale_jitter_sizes_training_images_and_the_detector_keeps_them(tmp_path):
    from piip.data.coco import LargeScaleJitter
    from piip.engine import load_config
    from piip.tasks.detection.task import DetectionTask

    torch.manual_seed(0)
    jitter = LargeScaleJitter(96, (0.5, 1.5))
    image = torch.rand(3, 64, 80)
    target = {"boxes": torch.tensor([[10.0, 10, 30, 40], [60, 50, 79, 63]]), "labels": torch.tensor([1, 2]),
              "masks": torch.zeros(2, 64, 80, dtype=torch.uint8), "image_id": 7}
    target["masks"][0, 10:40, 10:30] = 1
    sizes = set()
    for _ in range(8):
        out_image, out = jitter(image, target)
        assert out_image.shape == (3, 96, 96) and out["image_id"] == 7
        assert len(out["boxes"]) == len(out["labels"]) == len(out["masks"]) and out["masks"].shape[1:] == (96, 96)
        assert (out["boxes"][:, 2:] > out["boxes"][:, :2]).all() and out["boxes"].max() <= 96
        sizes.add(round(float(out["boxes"][0, 2] - out["boxes"][0, 0]), 1) if len(out["labels"]) and out["labels"][0] == 1 else None)
    assert len(sizes) > 2                                                   # random scales
    write_shapes(tmp_path / "data", n_train=2, n_val=1)
    config = json.loads(det_config(tmp_path / "c.json", tmp_path / "data", tmp_path / "run").read_text())
    config["data"]["large_scale_jitter"] = [0.5, 1.5]
    (tmp_path / "c.json").write_text(json.dumps(config))
    task = DetectionTask(load_config(tmp_path / "c.json"))
    train, _ = task.build_datasets(task.cfg)
    assert train[0][0].shape[-2:] == (128, 128)                             # the model's input size
    det = task.build_model(task.cfg, train)
    assert det.config.resize_in_training is False and det.transform._skip_resize
    with pytest.raises(ValueError, match="large_scale_jitter"):
        config["data"]["large_scale_jitter"] = [2.0, 1.0]
        (tmp_path / "c.json").write_text(json.dumps(config))
        load_config(tmp_path / "c.json")


@pytest.mark.parametrize("name,variant,size", [("mask_rcnn_piip_tsb_3x_ms", "piip_tsb", 1120),
                                               ("mask_rcnn_piip_sbl_3x_ms", "piip_sbl", 1120)])
def test_shipped_3x_multi_scale_recipes(name, variant, size):
    """The paper's "3x + MS": the 1x recipe for 36 epochs with steps at 27 and 33, and the authors'
    multi-scale augmentation cropping at the model's input size S with scales S / 1024 times
    MMDetection's, tested at (int(800 r), int(1333 r)) as their _ms configs."""
    from piip.engine import load_config
    from piip.tasks.detection.task import DetectionTask

    cfg = load_config(name)
    one_x = load_config(name.replace("3x_ms", "1x"))
    assert (cfg.optim.epochs, cfg.optim.milestones) == (36, [27, 33]) and cfg.data.multi_scale
    assert cfg.model.name == variant and cfg.optim.lr == one_x.optim.lr and cfg.model.head == one_x.model.head
    task = DetectionTask(cfg)
    ratio = size / 1024
    assert task.head["min_size"] == int(800 * ratio) == 875 and task.head["max_size"] == int(1333 * ratio) == 1457
    assert task.head["resize_in_training"] is False
    with pytest.raises(ValueError, match="choose one"):
        load_config(name, ["data.large_scale_jitter=[0.1,2.0]"])


def test_multi_scale_training_data_follows_the_flip(tmp_path):
    from piip.data.coco import RandomHorizontalFlip
    from piip.data.multiscale import MultiScaleCrop
    from piip.engine import load_config
    from piip.tasks.detection.task import DetectionTask

    write_shapes(tmp_path / "data", n_train=2, n_val=1)
    config = json.loads(det_config(tmp_path / "c.json", tmp_path / "data", tmp_path / "run").read_text())
    config["data"]["multi_scale"] = True
    (tmp_path / "c.json").write_text(json.dumps(config))
    task = DetectionTask(load_config(tmp_path / "c.json"))
    train, _ = task.build_datasets(task.cfg)
    flip, multi_scale = train.transform.transforms
    assert isinstance(flip, RandomHorizontalFlip) and isinstance(multi_scale, MultiScaleCrop)
    assert multi_scale.crop_size == 128 and multi_scale.ratio == 128 / 1024
    image, target = train[0]
    assert max(image.shape[-2:]) <= 128 and len(target["boxes"]) == len(target["masks"]) == len(target["has_mask"])
