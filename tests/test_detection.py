"""Detection: the torchvision detector on piip backbones, COCO-format data, COCO metrics, the engine,
the command line and prediction."""
from __future__ import annotations

import json
import os
import socket
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
from piip.tasks.detection.model import L1RegionProposalNetwork, L1RoIHeads

from conftest import needs_fmnist, tiny_branch, tiny_config

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
    assert isinstance(rpn, L1RegionProposalNetwork)
    assert rpn.anchor_generator.sizes == ((32,), (64,), (128,), (256,), (512,))
    assert rpn.anchor_generator.aspect_ratios == ((0.5, 1.0, 2.0),) * 5
    assert rpn._pre_nms_top_n == {"training": 2000, "testing": 1000}
    assert rpn._post_nms_top_n == {"training": 1000, "testing": 1000}
    assert rpn.nms_thresh == 0.7 and rpn.fg_bg_sampler.batch_size_per_image == 256
    assert (rpn.proposal_matcher.high_threshold, rpn.proposal_matcher.low_threshold) == (0.7, 0.3)
    heads = det.roi_heads
    assert isinstance(heads, L1RoIHeads)
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
    preds = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    assert len(preds) == 4 and all(set(p) >= {"boxes", "classes", "scores"} for p in preds.values())
    with Image.open(tmp_path / "pred" / "0000_pred.png") as im:
        assert im.size == (128, 160)
    # a checkpoint whose classes do not match the data is refused
    three = piip.save(tiny_detector(num_classes=3), tmp_path / "three.safetensors")
    assert main(["eval", "det", "--checkpoint", str(three), "--data", str(tmp_path / "data"), "--split", "val"]) == 2
    assert "class mismatch" in capsys.readouterr().out


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

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, config_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from piip.engine import load_config, train
    from piip.engine.distributed import cleanup

    try:
        train(load_config(config_path))
    finally:
        cleanup()


def test_two_process_ddp_detector_step_equals_one_process(tmp_path):
    """Identical images and every anchor/proposal sampled (deterministic losses): one optimiser step
    with 2 processes x 1 image equals 1 process x 2 images."""
    from piip.engine import load_config, train
    from piip.engine.checkpoint import load_training_checkpoint

    write_shapes(tmp_path / "data", n_train=2, n_val=1, same=True)
    head = {**SMALL, "rpn_batch_size_per_image": 10 ** 6, "box_batch_size_per_image": 10 ** 6}
    paths = {}
    for name in ("ddp", "single"):
        path = det_config(tmp_path / f"{name}.json", tmp_path / "data", tmp_path / name, epochs=1, batch_size=2)
        config = json.loads(path.read_text())
        config["model"]["head"] = head
        config["data"]["flip_prob"] = 0.0
        config["run"]["eval_every"] = 0
        path.write_text(json.dumps(config))
        paths[name] = path
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(paths["ddp"])), nprocs=2, join=True)
    train(load_config(paths["single"]))
    a, b = load_training_checkpoint(tmp_path / "ddp"), load_training_checkpoint(tmp_path / "single")
    assert a["world_size"] == 2 and a["step"] == b["step"] == 1
    for key, value in b["model"].items():
        torch.testing.assert_close(a["model"][key], value, rtol=1e-4, atol=1e-5, msg=key)
