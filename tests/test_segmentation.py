"""Semantic segmentation: UperNet + FCN auxiliary head on piip backbones, ADE20K-layout and folder
data, mIoU as MMSegmentation defines it, whole and sliding-window inference, the engine, the command
line, prediction and the authors' MMSegmentation heads."""
from __future__ import annotations

import dataclasses
import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from PIL import Image
from torch import nn

import piip
from piip.data.semseg import (DataError, SegmentationDataConfig, SegmentationTrainTransform,
                              build_segmentation_dataset, fit_size)
from piip.tasks.segmentation import (PIIPSegmenter, area_counts, build_segmenter,
                                     metrics_from_areas, segment, slide_windows)

from conftest import free_port, jsonl_by_image, needs_fmnist, tiny_config, train_config_file


def tiny_segmenter(num_classes: int = 4, **settings) -> PIIPSegmenter:
    return build_segmenter(piip.PIIP(tiny_config(task="det")), num_classes,
                           **{"channels": 32, "aux_channels": 16, "test_scale": None, **settings})


# -- the model ---------------------------------------------------------------------------------------

def test_upernet_and_fcn_heads_have_mmsegs_shapes_and_settings():
    torch.manual_seed(0)
    model = build_segmenter(piip.PIIP(tiny_config(task="det")), 5)
    head, aux = model.decode_head, model.auxiliary_head
    cfg = model.config
    assert (cfg.channels, cfg.aux_channels, cfg.aux_weight, cfg.dropout, cfg.ignore_index) == (512, 256, 0.4, 0.1, 255)
    assert (cfg.inference, cfg.crop_size, cfg.stride, cfg.test_scale) == ("slide", 512, 341, (2048, 512))
    assert [m[0].output_size for m in head.psp_modules] == [1, 2, 3, 6]
    assert all(m[1].conv.kernel_size == (1, 1) and m[1].conv.bias is None for m in head.psp_modules)
    width = model.backbone.out_channels  # the merged width of every pyramid level (64 here)
    assert head.bottleneck.conv.weight.shape == (512, width + 4 * 512, 3, 3)
    assert [c.conv.weight.shape for c in head.lateral_convs] == [(512, width, 1, 1)] * 3
    assert [c.conv.weight.shape for c in head.fpn_convs] == [(512, 512, 3, 3)] * 3
    assert head.fpn_bottleneck.conv.weight.shape == (512, 4 * 512, 3, 3)
    assert head.conv_seg.weight.shape == (5, 512, 1, 1) and aux.conv_seg.weight.shape == (5, 256, 1, 1)
    assert aux.convs[0].conv.weight.shape == (256, width, 3, 3)
    assert isinstance(head.dropout, nn.Dropout2d) and head.dropout.p == 0.1 and aux.dropout.p == 0.1
    assert all(isinstance(m, nn.BatchNorm2d) for m in (head.bottleneck.bn, aux.convs[0].bn))
    assert float(head.conv_seg.weight.detach().std()) == pytest.approx(0.01, rel=0.1)  # normal(0, 0.01)
    # the authors' InternViT width
    wide = build_segmenter(piip.PIIP(tiny_config(task="det")), 150, channels=1536, aux_channels=1536)
    assert wide.decode_head.fpn_bottleneck.conv.weight.shape == (1536, 4 * 1536, 3, 3)

    # the auxiliary head reads the stride-16 map; logits come back at the image size
    seen = {}
    aux.register_forward_pre_hook(lambda m, args: seen.update(aux=args[0].shape))
    images = torch.rand(2, 3, 128, 128)
    labels = torch.randint(0, 5, (2, 128, 128))
    losses = model(images, labels)
    assert set(losses) == {"loss_decode", "loss_aux"} and seen["aux"][-2:] == (8, 8)
    model.eval()
    with torch.no_grad():
        assert model(images).shape == (2, 5, 128, 128)
    with pytest.raises(ValueError, match="dense backbone"):
        build_segmenter(piip.PIIP(tiny_config(task="cls", cls_pool="avg")), 5)


def test_segmentation_form_of_a_variant_is_the_authors_mmseg_backbone():
    """task="seg": global attention and the position embedding at each branch's own grid (their
    MMSegmentation classes size it for img_size and never resize it); the rest is the dense network."""
    det = piip.get_config("piip_tsb", task="det")
    seg = piip.get_config("piip_tsb", task="seg")
    assert all(b.window_block_indexes for b in det.branches) and seg.task == "det"
    assert all(b.window_block_indexes == () and b.pos_embed_at_resolution for b in seg.branches)
    assert [dataclasses.replace(b, window_block_indexes=(), pos_embed_at_resolution=True) for b in det.branches] \
        == list(seg.branches)
    model = piip.create_model("piip_fmnist_tsb", task="seg", resolutions="96/64/32")  # patch 4, B at 32
    assert [tuple(b.pos_embed.shape) for b in model.branches] == [(1, 8 * 8, 128), (1, 16 * 16, 64), (1, 24 * 24, 32)]


def test_losses_are_mmsegs_cross_entropy_averaged_over_all_pixels():
    """Decode loss: CE of the logits bilinearly resized (align_corners=False) to the labels, summed
    over the labelled pixels and divided by *all* pixels (avg_non_ignore=False); aux: 0.4 x the same."""
    torch.manual_seed(0)
    model = tiny_segmenter(num_classes=3).eval()  # eval: no dropout, BatchNorm uses running stats
    images = torch.rand(1, 3, 128, 128)
    labels = torch.randint(0, 3, (1, 128, 128))
    labels[0, :40] = 255
    features = model._features(images)
    logits = model.decode_head(features)
    up = F.interpolate(logits, size=(128, 128), mode="bilinear", align_corners=False)
    logp = up.log_softmax(1)[0]
    keep = labels[0] != 255
    nll = -logp.gather(0, labels.clamp(max=2))[0][keep].sum() / labels.numel()
    aux_logits = F.interpolate(model.auxiliary_head(features[2]), size=(128, 128), mode="bilinear",
                               align_corners=False)
    aux_nll = -aux_logits.log_softmax(1)[0].gather(0, labels.clamp(max=2))[0][keep].sum() / labels.numel()
    losses = model(images, labels)
    torch.testing.assert_close(losses["loss_decode"], nll)
    torch.testing.assert_close(losses["loss_aux"], 0.4 * aux_nll)
    # class_weight (MMSegmentation's): each pixel's loss times its class's weight, still over all pixels
    weighted = tiny_segmenter(num_classes=3, class_weight=(0.1, 1.0, 2.0)).eval()
    weighted.load_state_dict(model.state_dict())
    w = torch.tensor([0.1, 1.0, 2.0])[labels.clamp(max=2)][0]
    nll_w = -(w * logp.gather(0, labels.clamp(max=2))[0])[keep].sum() / labels.numel()
    torch.testing.assert_close(weighted(images, labels)["loss_decode"], nll_w)
    with pytest.raises(ValueError, match="class_weight needs 3 non-negative weights"):
        tiny_segmenter(num_classes=3, class_weight=(1.0, 1.0))


# -- metrics -----------------------------------------------------------------------------------------

def reference_metrics(preds, labels, num_classes, ignore=255):
    """mmseg's mean_iou written from its definition with a confusion matrix."""
    confusion = np.zeros((num_classes, num_classes), np.int64)  # [label, pred]
    for pred, label in zip(preds, labels):
        for p, t in zip(pred.ravel(), label.ravel()):
            if t != ignore:
                confusion[t, p] += 1
    inter = np.diag(confusion).astype(float)
    union = confusion.sum(0) + confusion.sum(1) - np.diag(confusion)
    iou = [inter[c] / union[c] * 100 if union[c] else None for c in range(num_classes)]
    acc = [inter[c] / confusion[c].sum() * 100 if confusion[c].sum() else None for c in range(num_classes)]
    miou = np.mean([v for v in iou if v is not None])
    macc = np.mean([v for v in acc if v is not None])
    return miou, macc, inter.sum() / confusion.sum() * 100, iou, acc


def test_miou_macc_aacc_equal_an_independent_computation():
    # a hand-made case: class 3 absent from both (left out of the means), class 2 only predicted
    # (IoU 0, Acc undefined), ignore pixels predicted as anything are not counted
    pred = np.array([[0, 0, 1, 1], [0, 2, 1, 1], [0, 0, 1, 1]])
    label = np.array([[0, 0, 1, 1], [0, 0, 1, 255], [255, 1, 1, 1]])
    areas = area_counts(torch.from_numpy(pred), torch.from_numpy(label), 4)
    # by hand over the 10 labelled pixels: (pred, label) = (0, 0) x3, (1, 1) x5, (2, 0), (0, 1)
    assert areas.tolist() == [[3, 5, 0, 0], [5, 6, 1, 0], [4, 5, 1, 0], [4, 6, 0, 0]]  # inter, union, pred, label
    m = metrics_from_areas(areas, 1)
    assert m.per_class_iou[:3] == pytest.approx([60.0, 500 / 6, 0.0]) and m.per_class_iou[3] is None
    assert m.per_class_acc[:2] == pytest.approx([75.0, 500 / 6]) and m.per_class_acc[2:] == [None, None]
    assert m.mIoU == pytest.approx((60 + 500 / 6 + 0) / 3) and m.mAcc == pytest.approx((75 + 500 / 6) / 2)
    assert m.aAcc == pytest.approx(80.0)

    # random maps over a dataset: one accumulation, not a mean of per-image scores
    rng = np.random.default_rng(0)
    preds = [rng.integers(0, 6, (13, 17)) for _ in range(5)]
    labels = [np.where(rng.random((13, 17)) < 0.1, 255, rng.integers(0, 5, (13, 17))) for _ in range(5)]
    total = sum(area_counts(torch.from_numpy(p), torch.from_numpy(t), 7) for p, t in zip(preds, labels))
    m = metrics_from_areas(total, 5)
    miou, macc, aacc, iou, acc = reference_metrics(preds, labels, 7)
    assert (m.mIoU, m.mAcc, m.aAcc) == pytest.approx((miou, macc, aacc))
    assert m.per_class_iou[6] is None and m.per_class_acc[5] is None  # 6 absent; 5 predicted only
    for ours, ref in zip(m.per_class_iou + m.per_class_acc, iou + acc):
        assert ours == (pytest.approx(ref) if ref is not None else None)


# -- inference -------------------------------------------------------------------------------------

class PointwiseModel(nn.Module):
    """A 1x1 convolution: translation-equivariant by construction, so every window sees the logits
    the whole image gives at its pixels."""

    def __init__(self, num_classes=3, crop=32, stride=21, test_scale=None, inference="slide"):
        super().__init__()
        self.conv = nn.Conv2d(3, num_classes, 1)
        self.config = SimpleNamespace(num_classes=num_classes, crop_size=crop, stride=stride, test_scale=test_scale,
                                      inference=inference)  # what inference reads of a SegmenterConfig
        self.sizes = []

    def forward(self, x):
        self.sizes.append(tuple(x.shape[-2:]))
        return self.conv(x)


@pytest.mark.parametrize("size", [(100, 77), (32, 32), (53, 200), (20, 45), (64, 64)])
def test_sliding_windows_cover_every_pixel_and_equal_whole_image_inference(size):
    torch.manual_seed(0)
    model = PointwiseModel().eval()
    image = torch.rand(3, *size)
    H, W = size
    windows = slide_windows(H, W, 32, 21)
    cover = torch.zeros(H, W)
    for y1, y2, x1, x2 in windows:
        assert 0 <= y1 < y2 <= H and 0 <= x1 < x2 <= W
        assert (y2 - y1, x2 - x1) == (min(32, H), min(32, W))  # full crops (the image, when smaller)
        cover[y1:y2, x1:x2] += 1
    assert cover.min() >= 1
    # mmseg's grid: ceil((H - crop) / stride) + 1 rows, the last one shifted back inside
    rows = max(H - 32 + 20, 0) // 21 + 1
    cols = max(W - 32 + 20, 0) // 21 + 1
    assert len(windows) == rows * cols
    slide = segment(model, image, mode="slide")
    assert len(model.sizes) == len(windows)
    whole = segment(model, image, mode="whole")
    torch.testing.assert_close(slide, whole, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(slide, model.conv(image[None])[0].softmax(0), rtol=1e-5, atol=1e-6)
    # a mirror-symmetric model: the flip test changes nothing
    torch.testing.assert_close(segment(model, image, mode="slide", flip=True), whole, rtol=1e-5, atol=1e-6)


def test_test_scale_resizes_like_mmsegs_keep_ratio_resize_and_returns_the_input_size():
    assert fit_size(100, 300, (2048, 512)) == (512, 1536)     # short side limits: x5.12
    assert fit_size(500, 4000, (2048, 512)) == (256, 2048)    # long side limits
    assert fit_size(512, 683, (2048, 512)) == (512, 683)
    model = PointwiseModel(test_scale=(2048, 512), inference="whole").eval()
    probs = segment(model, torch.rand(3, 100, 300))
    assert model.sizes == [(512, 1536)] and probs.shape == (3, 100, 300)
    torch.testing.assert_close(probs.sum(0), torch.ones(100, 300))


# -- data --------------------------------------------------------------------------------------------

def write_ade(root, n_train=6, n_val=3, classes=4, size=(96, 128)):
    """An ADE20K-layout root: coloured rectangles whose class is their colour; the PNGs store
    class + 1 and 0 for "other" pixels (a noisy border), as ADEChallengeData2016 does."""
    rng = np.random.default_rng(0)
    colours = np.array([(30, 30, 30), (220, 40, 40), (40, 220, 40), (40, 40, 220), (220, 220, 40)])[:classes]
    for split, folder, n in (("train", "training", n_train), ("val", "validation", n_val)):
        os.makedirs(root / "images" / folder, exist_ok=True)
        os.makedirs(root / "annotations" / folder, exist_ok=True)
        for i in range(n):
            h, w = size if i % 2 == 0 else size[::-1]
            label = np.zeros((h, w), np.int64)
            for _ in range(3):
                y, x = int(rng.integers(0, h - 30)), int(rng.integers(0, w - 30))
                label[y:y + int(rng.integers(20, 60)), x:x + int(rng.integers(20, 60))] = int(rng.integers(1, classes))
            image = colours[label] + rng.integers(0, 20, (h, w, 3))
            stored = label + 1
            stored[:, :3] = 0  # "other"
            Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(root / "images" / folder / f"ADE_{i:04d}.jpg",
                                                                      quality=95)
            Image.fromarray(stored.astype(np.uint8)).save(root / "annotations" / folder / f"ADE_{i:04d}.png")
    (root / "classes.txt").write_text("\n".join(["background", "red", "green", "blue", "yellow"][:classes]) + "\n")


def test_ade20k_reader_reduces_the_zero_label_and_reads_class_names(tmp_path):
    write_ade(tmp_path / "ade")
    ds = build_segmentation_dataset(SegmentationDataConfig(root=str(tmp_path / "ade")), "val")
    assert len(ds) == 3 and ds.classes == ("background", "red", "green", "blue")
    image, label = ds[0]
    stored = np.asarray(Image.open(tmp_path / "ade" / "annotations" / "validation" / "ADE_0000.png")).astype(np.int64)
    expected = np.where(stored == 0, 255, stored - 1)
    assert image.shape == (3, 96, 128) and image.dtype == torch.float32 and 0 <= image.min() <= image.max() <= 1
    assert label.dtype == torch.int64 and (label.numpy() == expected).all() and (label[:, :3] == 255).all()
    # objectInfo150.txt (ADE20K's own file) names the classes
    (tmp_path / "ade" / "objectInfo150.txt").write_text(
        "Idx\tRatio\tTrain\tVal\tName\n1\t0.1\t1\t1\twall\n2\t0.1\t1\t1\tbuilding;edifice\n"
        "3\t0.1\t1\t1\tsky\n4\t0.1\t1\t1\tfloor;flooring\n")
    ds = build_segmentation_dataset(SegmentationDataConfig(root=str(tmp_path / "ade")), "val")
    assert ds.classes == ("wall", "building", "sky", "floor")


def test_reader_errors_name_the_files_and_values(tmp_path):
    write_ade(tmp_path / "ade")
    val_images, val_masks = tmp_path / "ade" / "images" / "validation", tmp_path / "ade" / "annotations" / "validation"
    cfg = SegmentationDataConfig(root=str(tmp_path / "ade"))
    # unpaired files: how many and the first names
    os.rename(val_masks / "ADE_0001.png", tmp_path / "moved.png")
    Image.new("L", (8, 8)).save(val_masks / "extra.png")
    with pytest.raises(ValueError, match=r"1 images have no mask .*ADE_0001.*1 masks have no image .*extra"):
        build_segmentation_dataset(cfg, "val")
    os.rename(tmp_path / "moved.png", val_masks / "ADE_0001.png")
    os.remove(val_masks / "extra.png")
    # a mask of another size than its image
    Image.new("L", (10, 12)).save(val_masks / "ADE_0002.png")
    with pytest.raises(DataError, match=r"ADE_0002.png' is 10x12 but its image .*ADE_0002.jpg' is 128x96"):
        build_segmentation_dataset(cfg, "val")[2]
    # label values beyond the classes (ADE20K stores class + 1: 9 -> 8, 7 -> 6 with 4 classes)
    bad = np.ones((96, 128), np.uint8)
    bad[0, 0], bad[5, 5] = 9, 7
    Image.fromarray(bad).save(val_masks / "ADE_0002.png")
    with pytest.raises(DataError, match=r"ADE_0002.png' has label values \[6, 8\] beyond the 4 classes"):
        build_segmentation_dataset(cfg, "val")[2]
    # grey labels saved as RGB read as labels; a colour-coded mask is refused
    Image.fromarray(np.stack([np.full((96, 128), 3, np.uint8)] * 3, axis=-1)).save(val_masks / "ADE_0002.png")
    assert build_segmentation_dataset(cfg, "val")[2][1].unique().tolist() == [2]
    colour = np.zeros((96, 128, 3), np.uint8)
    colour[..., 0] = 1
    Image.fromarray(colour).save(val_masks / "ADE_0002.png")
    with pytest.raises(DataError, match=r"ADE_0002.png' is a colour image"):
        build_segmentation_dataset(cfg, "val")[2]
    # the folder layout needs class names; a missing folder is named
    with pytest.raises(ValueError, match="class names"):
        build_segmentation_dataset(SegmentationDataConfig(dataset="folder", val_images=str(val_images),
                                                          val_masks=str(val_masks)), "val")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        build_segmentation_dataset(SegmentationDataConfig(dataset="folder", classes=["a"], val_images="nowhere",
                                                          val_masks=str(val_masks)), "val")
    with pytest.raises(ValueError, match="data.dataset"):
        SegmentationDataConfig(dataset="voc")


def test_folder_layout_keeps_labels_and_its_ignore_index(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "msk").mkdir()
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / "img" / "a.png")
    mask = np.zeros((20, 30), np.uint8)
    mask[5:, :] = 2
    mask[:2] = 100
    Image.fromarray(mask).save(tmp_path / "msk" / "a.png")
    (tmp_path / "names.txt").write_text("sky\nroad\ncar\n")
    cfg = SegmentationDataConfig(dataset="folder", train_images=str(tmp_path / "img"), train_masks=str(tmp_path / "msk"),
                                 val_images=str(tmp_path / "img"), val_masks=str(tmp_path / "msk"),
                                 classes=str(tmp_path / "names.txt"), ignore_index=100)
    ds = build_segmentation_dataset(cfg, "val")
    _, label = ds[0]
    assert ds.classes == ("sky", "road", "car") and ds.ignore_index == 100
    assert (label.numpy() == mask).all()


def test_training_pipeline_resizes_crops_flips_and_pads_with_ignore():
    import random

    cfg = SegmentationDataConfig(crop_size=64, scale=[80, 40], ratio_range=[1.0, 1.0], flip_prob=0.0,
                                 photometric=False)
    image = torch.rand(3, 30, 60)
    label = torch.zeros(30, 60, dtype=torch.long)
    label[:, 30:] = 1
    random.seed(0)
    out_image, out_label = SegmentationTrainTransform(cfg)(image, label)
    # (30, 60) fits (80, 40) as (40, 80); crop 64 -> (40, 64), padded to 64 x 64 with ignore / the mean colour
    assert out_image.shape == (3, 64, 64) and out_label.shape == (64, 64)
    assert (out_label[40:] == 255).all() and (out_label[:40] != 255).all()
    torch.testing.assert_close(out_image[:, 40:], torch.tensor(cfg.mean)[:, None, None].expand(3, 24, 64))
    # cat_max_ratio: a crop where one class covers >= 75% is retried
    band = torch.zeros(40, 100, dtype=torch.long)
    band[:, 40:60] = 1
    cfg = SegmentationDataConfig(crop_size=40, scale=[100, 40], ratio_range=[1.0, 1.0], flip_prob=0.0,
                                 photometric=False)
    mixed = 0
    for seed in range(20):
        random.seed(seed)
        _, crop = SegmentationTrainTransform(cfg)(torch.rand(3, 40, 100), band)
        mixed += bool(0.25 < (crop == 1).float().mean() < 0.75)
    assert mixed >= 19  # ten tries each: one try alone passes for 39 of the 61 positions
    # flipping moves image and labels together; photometric distortion keeps the range
    cfg = SegmentationDataConfig(crop_size=64, scale=[80, 40], ratio_range=[1.0, 1.0], flip_prob=1.0)
    random.seed(1)
    flipped_image, flipped = SegmentationTrainTransform(cfg)(image, label)
    assert (flipped[:40, :32] == 1).all() or (flipped[:40, -32:] == 0).all()
    assert 0 <= flipped_image.min() <= flipped_image.max() <= 1


# -- the engine, the command line, predict ---------------------------------------------------------

def seg_config(path, data_root, out_dir, **optim):
    config = {"task": "seg",
              "model": {"piip": tiny_config(task="det").to_dict(),
                        "head": {"channels": 32, "aux_channels": 16, "inference": "slide", "crop_size": 96,
                                 "stride": 64}},
              "data": {"dataset": "ade20k", "root": str(data_root), "crop_size": 96, "scale": [128, 96]},
              "optim": {"lr": 1e-3, "weight_decay": 0.05, "new_module_lr_mult": 1.0, "epochs": 2,
                        "warmup_steps": 1, "warmup_lr": 1e-5, "schedule": "poly", "power": 1.0, "min_lr": 0.0,
                        "batch_size": 2, **optim},
              "run": {"out_dir": str(out_dir), "num_workers": 0, "log_every": 1, "progress": False,
                      "device": "cpu"}}
    path.write_text(json.dumps(config))
    return path


def test_cli_train_eval_predict_segmentation_on_an_ade20k_folder(tmp_path, capsys):
    from piip.cli import main

    write_ade(tmp_path / "ade")
    cfg = seg_config(tmp_path / "seg.json", tmp_path / "ade", tmp_path / "run")
    assert main(["train", "seg", str(cfg), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["step"] == 6 and summary["eval"]["num_images"] == 3
    assert 0 <= summary["eval"]["mIoU"] <= 100 and (tmp_path / "run" / "eval" / "metrics.json").is_file()
    path = str(tmp_path / "run" / "model.safetensors")
    model = piip.load(path)
    assert isinstance(model, PIIPSegmenter) and model.config.class_names == ("background", "red", "green", "blue")
    assert model.config.test_scale == (128, 96) and model.config.inference == "slide"
    assert main(["eval", "seg", "--checkpoint", path, "--data", str(tmp_path / "ade"), "--out", str(tmp_path / "ev"),
                 "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["mIoU"] == pytest.approx(summary["eval"]["mIoU"]) and record["num_images"] == 3
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["mIoU"] == pytest.approx(record["mIoU"])
    assert main(["eval", "seg", "--checkpoint", path, "--data", str(tmp_path / "ade"), "--mode", "whole", "--flip"]) == 0
    out = capsys.readouterr().out
    assert "mIoU" in out and "per-class IoU" in out and "green" in out
    # the same data in the folder layout (labels as stored, 255 unlabelled): the same scores
    (tmp_path / "masks").mkdir()
    for png in (tmp_path / "ade" / "annotations" / "validation").glob("*.png"):
        stored = np.asarray(Image.open(png)).astype(np.int64)
        Image.fromarray(np.where(stored == 0, 255, stored - 1).astype(np.uint8)).save(tmp_path / "masks" / png.name)
    assert main(["eval", "seg", "--checkpoint", path, "--dataset", "folder",
                 "--images", str(tmp_path / "ade" / "images" / "validation"), "--masks", str(tmp_path / "masks"),
                 "--classes", str(tmp_path / "ade" / "classes.txt"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["mIoU"] == pytest.approx(record["mIoU"])
    # a class list of another length is refused
    (tmp_path / "five.txt").write_text("a\nb\nc\nd\ne\n")
    assert main(["eval", "seg", "--checkpoint", path, "--dataset", "folder",
                 "--images", str(tmp_path / "ade" / "images" / "validation"), "--masks", str(tmp_path / "masks"),
                 "--classes", str(tmp_path / "five.txt")]) == 2
    assert "class mismatch" in capsys.readouterr().err
    # predict: an overlay with a legend and the label PNG per image, one JSON
    assert main(["predict", str(tmp_path / "ade" / "images" / "validation"), "--checkpoint", path,
                 "--out", str(tmp_path / "pred")]) == 0
    assert "background" in capsys.readouterr().out
    with Image.open(tmp_path / "pred" / "ADE_0000_seg.png") as im:
        assert im.size[0] == 128 and im.size[1] > 96  # the image and the legend under it
    with Image.open(tmp_path / "pred" / "ADE_0001_labels.png") as im:
        labels = np.asarray(im)
    assert labels.shape == (128, 96) and labels.max() < 4
    preds = jsonl_by_image(tmp_path / "pred" / "predictions.jsonl")
    assert len(preds) == 3
    shares = next(iter(preds.values()))["classes"]
    assert set(shares) <= {"background", "red", "green", "blue"} and sum(shares.values()) == pytest.approx(1, abs=1e-3)


def test_iteration_based_schedule_stops_mid_epoch(tmp_path):
    from piip.engine import load_config, train

    write_ade(tmp_path / "ade", n_train=8)
    cfg = load_config(seg_config(tmp_path / "seg.json", tmp_path / "ade", tmp_path / "run", steps=3, epochs=10,
                                 warmup_steps=2))
    summary = train(cfg)
    assert summary["step"] == 3 and summary["epoch"] == 1 and summary["eval"]["num_images"] == 3
    from piip.engine.optim import total_steps

    assert total_steps(cfg.optim, 4) == 3
    cfg.optim.steps = None
    assert total_steps(cfg.optim, 4) == 40


@needs_fmnist
def test_short_training_on_semantic_scenes_loss_decreases(tmp_path):
    from piip.data.scenes import generate_semantic_scenes
    from piip.engine import load_config, train

    root = generate_semantic_scenes(tmp_path / "scenes", train_images=16, val_images=4, canvas=(96, 128),
                                    max_size=90, min_size=16)
    ds = build_segmentation_dataset(SegmentationDataConfig(root=root), "val")
    _, label = ds[0]
    assert ds.classes[:3] == ("background", "T-shirt/top", "Trouser") and len(ds.classes) == 11
    assert label.min() >= 0 and label.max() <= 10 and (label == 0).any()
    cfg = load_config(seg_config(tmp_path / "seg.json", root, tmp_path / "run", epochs=6, lr=2e-3))
    cfg.data.photometric = False
    summary = train(cfg)
    losses = list(summary["step_losses"].values())
    assert len(losses) == 48
    assert np.mean(losses[-6:]) < 0.7 * np.mean(losses[:6]), losses


# -- DDP ---------------------------------------------------------------------------------------------



def test_two_process_ddp_training_and_gathered_evaluation(tmp_path):
    """2 processes train one epoch; the evaluation sums both shards' areas: the same metrics as one
    process scoring the saved model on every validation image."""
    from piip.engine.checkpoint import load_training_checkpoint
    from piip.tasks.segmentation import evaluate_checkpoint

    write_ade(tmp_path / "ade", n_train=4, n_val=3)
    path = seg_config(tmp_path / "ddp.json", tmp_path / "ade", tmp_path / "ddp", epochs=1, batch_size=4)
    mp.spawn(train_config_file, args=(2, free_port(), str(path)), nprocs=2, join=True)
    assert load_training_checkpoint(tmp_path / "ddp")["world_size"] == 2
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["step"] == 1 and summary["eval"]["num_images"] == 3
    single = evaluate_checkpoint(tmp_path / "ddp" / "model.safetensors", SegmentationDataConfig(root=str(tmp_path / "ade")))
    assert single.num_images == 3 and summary["eval"]["mIoU"] == pytest.approx(single.mIoU)
    assert summary["eval"]["aAcc"] == pytest.approx(single.aAcc)


# -- the authors' MMSegmentation files ---------------------------------------------------------------

def mmseg_heads(width: int, classes: int, channels: int = 16, aux: int = 8, seed: int = 0) -> dict:
    """Random tensors under MMSegmentation 0.27's UperNet + FCN names and shapes (BatchNorm with
    running statistics, as a trained file has them)."""
    g = torch.Generator().manual_seed(seed)
    convs = {f"decode_head.psp_modules.{i}.1": (channels, width, 1, 1) for i in range(4)}
    convs["decode_head.bottleneck"] = (channels, width + 4 * channels, 3, 3)
    convs.update({f"decode_head.lateral_convs.{i}": (channels, width, 1, 1) for i in range(3)})
    convs.update({f"decode_head.fpn_convs.{i}": (channels, channels, 3, 3) for i in range(3)})
    convs["decode_head.fpn_bottleneck"] = (channels, 4 * channels, 3, 3)
    convs["auxiliary_head.convs.0"] = (aux, width, 3, 3)
    out = {}
    for name, shape in convs.items():
        out[f"{name}.conv.weight"] = torch.randn(shape, generator=g) / shape[1] ** 0.5
        out[f"{name}.bn.weight"] = 1 + 0.1 * torch.randn(shape[0], generator=g)
        out[f"{name}.bn.bias"] = 0.1 * torch.randn(shape[0], generator=g)
        out[f"{name}.bn.running_mean"] = 0.1 * torch.randn(shape[0], generator=g)
        out[f"{name}.bn.running_var"] = 0.5 + torch.rand(shape[0], generator=g)
        out[f"{name}.bn.num_batches_tracked"] = torch.tensor(1000)
    for head, width_in in (("decode_head", channels), ("auxiliary_head", aux)):
        out[f"{head}.conv_seg.weight"] = torch.randn(classes, width_in, 1, 1, generator=g) * 0.1
        out[f"{head}.conv_seg.bias"] = torch.randn(classes, generator=g) * 0.1
    return out


def mmseg_uperhead_reference(t: dict, inputs: list) -> tuple[torch.Tensor, torch.Tensor]:
    """MMSegmentation 0.27's UPerHead and FCNHead in eval mode, written from their definitions:
    ConvModule = conv (no bias) -> BN (eps 1e-5) -> ReLU; PPM bins 1/2/3/6 resized back bilinearly
    (align_corners=False) and concatenated after the map itself; laterals, top-down sums, fpn convs,
    every level resized to the finest, fpn_bottleneck, conv_seg. The FCN head reads the stride-16 map."""
    def module(x, name, padding):
        x = F.conv2d(x, t[f"{name}.conv.weight"], padding=padding)
        x = F.batch_norm(x, t[f"{name}.bn.running_mean"], t[f"{name}.bn.running_var"], t[f"{name}.bn.weight"],
                         t[f"{name}.bn.bias"], training=False, eps=1e-5)
        return F.relu(x)

    def up(x, like):
        return F.interpolate(x, size=like.shape[2:], mode="bilinear", align_corners=False)

    top = inputs[3]
    psp = [top] + [up(module(F.adaptive_avg_pool2d(top, s), f"decode_head.psp_modules.{i}.1", 0), top)
                   for i, s in enumerate((1, 2, 3, 6))]
    laterals = [module(inputs[i], f"decode_head.lateral_convs.{i}", 0) for i in range(3)]
    laterals.append(module(torch.cat(psp, 1), "decode_head.bottleneck", 1))
    for i in (3, 2, 1):
        laterals[i - 1] = laterals[i - 1] + up(laterals[i], laterals[i - 1])
    outs = [module(laterals[i], f"decode_head.fpn_convs.{i}", 1) for i in range(3)] + [laterals[3]]
    outs = [outs[0]] + [up(o, outs[0]) for o in outs[1:]]
    fused = module(torch.cat(outs, 1), "decode_head.fpn_bottleneck", 1)
    decode = F.conv2d(fused, t["decode_head.conv_seg.weight"], t["decode_head.conv_seg.bias"])
    aux = F.conv2d(module(inputs[2], "auxiliary_head.convs.0", 1), t["auxiliary_head.conv_seg.weight"],
                   t["auxiliary_head.conv_seg.bias"])
    return decode, aux


def _seg_kwargs(fx_kwargs: dict, sizes=(56, 112)) -> dict:
    """The golden 2-branch InternViT config as the authors' segmentation configs write it: each
    branch sized by ``img_size`` = ``real_size``."""
    kwargs = json.loads(json.dumps(fx_kwargs))
    for i, size in enumerate(sizes, start=1):
        kwargs[f"branch{i}"].update(real_size=size, img_size=size)
    return kwargs


def test_converted_mmseg_heads_compute_what_mmseg_computes():
    from piip.compat.original import CheckpointError
    from piip.tasks.segmentation.authors_heads import convert_mmseg_heads, upernet_layout

    theirs = mmseg_heads(64, 7)
    extra = {}
    for key, value in theirs.items():
        prefix, rest = key.split(".", 1)
        extra.setdefault(prefix, {})[rest] = value
    layout = upernet_layout(extra, 64)
    assert layout == dict(num_classes=7, channels=16, aux_channels=8)
    model = build_segmenter(piip.PIIP(tiny_config(task="det")), **layout).eval()
    model.load_state_dict({**{k: v for k, v in model.state_dict().items() if k.startswith("backbone.")},
                           **convert_mmseg_heads(extra)})
    torch.manual_seed(0)
    feats = [torch.randn(2, 64, 40 // 2 ** i, 56 // 2 ** i) for i in range(4)]
    ref_decode, ref_aux = mmseg_uperhead_reference(theirs, feats)
    with torch.no_grad():
        torch.testing.assert_close(model.decode_head(feats), ref_decode)
        torch.testing.assert_close(model.auxiliary_head(feats[2]), ref_aux)
    # heads of another shape are refused by the key that shows it
    two_convs = dict(extra, auxiliary_head={**extra["auxiliary_head"], "convs.1.conv.weight": torch.zeros(8, 8, 3, 3)})
    with pytest.raises(CheckpointError, match="one-conv FCNHead"):
        upernet_layout(two_convs, 64)
    with pytest.raises(CheckpointError, match="reads 128 channels; a 16-wide backbone .* gives 80"):
        upernet_layout(extra, 16)


def test_piip_convert_turns_an_mmseg_upernet_file_into_a_segmenter(tmp_path):
    """An UperNet file in the authors' MMSegmentation layout (the golden 2-branch InternViT backbone as
    their segmentation class stores it, position embeddings at img_size, plus decode and auxiliary
    heads) becomes a complete segmenter: the backbone computes what the detection copy computes at
    that size, the heads what MMSegmentation computes, and ADE20K's 150 names come with it."""
    from safetensors.torch import load_file

    from piip.cli import main
    from piip.compat.original import build, convert_state_dict
    from conftest import FIXTURES

    fx = json.loads((FIXTURES / "det2_internvit.json").read_text())
    tensors = load_file(str(FIXTURES / "det2_internvit.safetensors"))
    det_state = {k[len("state_dict/"):]: v.float() for k, v in tensors.items() if k.startswith("state_dict/")}
    seg_state = dict(det_state)
    for branch, grid in (("branch1", 3), ("branch2", 7)):  # their seg class: (1, 1 + (img_size // 16)^2, D)
        pos = det_state[f"{branch}.pos_embed"]
        patches = pos[:, 1:].reshape(1, 14, 14, -1).permute(0, 3, 1, 2)
        patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False)
        seg_state[f"{branch}.pos_embed"] = torch.cat([pos[:, :1], patches.flatten(2).transpose(1, 2)], dim=1)
    heads = mmseg_heads(64, 150)
    torch.save({"meta": {"iter": 80000}, "state_dict": {**{f"backbone.{k}": v for k, v in seg_state.items()},
                                                         **heads}}, tmp_path / "upernet.pth")
    kwargs = _seg_kwargs(fx["kwargs"])
    (tmp_path / "kwargs.json").write_text(json.dumps(kwargs))
    assert main(["convert", str(tmp_path / "upernet.pth"), "--config", str(tmp_path / "kwargs.json"),
                 "-o", str(tmp_path / "seg.safetensors"), "--json"]) == 0
    seg = piip.load(str(tmp_path / "seg.safetensors"))
    assert isinstance(seg, PIIPSegmenter) and seg.config.num_classes == 150
    assert seg.config.class_names[:3] == ("wall", "building", "sky") and seg.config.channels == 16
    assert [tuple(b.pos_embed.shape) for b in seg.backbone.branches] == [(1, 10, 64), (1, 50, 32)]
    # the backbone: the detection copy of the same network at this size resizes its 14x14 grid
    # at every forward to exactly these embeddings
    det_kwargs = json.loads(json.dumps(kwargs))
    for i in (1, 2):
        del det_kwargs[f"branch{i}"]["img_size"]
    det = build(det_kwargs, "det")
    det.load_state_dict(convert_state_dict(det_state, det))
    image = torch.rand(1, 3, 112, 112)
    with torch.no_grad():
        features = list(seg.backbone(seg.normalize(image)).values())
        for ours, ref in zip(features, det.eval()(seg.normalize(image)).values()):
            torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
        ref_decode, _ = mmseg_uperhead_reference(heads, features)
        torch.testing.assert_close(seg(image), F.interpolate(ref_decode, size=(112, 112), mode="bilinear",
                                                             align_corners=False), rtol=1e-5, atol=1e-5)


def test_segmentation_configs_the_converter_refuses():
    from piip.compat.original import to_piip_config
    from conftest import FIXTURES

    fx = json.loads((FIXTURES / "det2_internvit.json").read_text())
    kwargs = _seg_kwargs(fx["kwargs"])
    config = to_piip_config(kwargs, "seg")
    assert config.task == "det" and all(b.pos_embed_at_resolution and b.window_block_indexes == () for b in config.branches)
    assert [b.resolution for b in config.branches] == [56, 112]
    kwargs["branch1"]["img_size"] = 64  # a position embedding for another size than the branch sees
    with pytest.raises(NotImplementedError, match=r"branch1: img_size=64 .* 56-pixel images"):
        to_piip_config(kwargs, "seg")
    three = {"branch1": kwargs["branch1"], "branch2": kwargs["branch2"], "branch3": kwargs["branch2"]}
    with pytest.raises(NotImplementedError, match="branch 2's size"):
        to_piip_config(three, "seg")
    baseline = {"type": "InternViT6B", "img_size": 64, "embed_dim": 32, "depth": 2, "num_heads": 2, "patch_size": 16,
                "with_fpn": True, "out_indices": [1], "use_flash_attn": True}
    config = to_piip_config(baseline, "seg")
    assert config.input_size == 64 and config.branches[0].pos_embed_at_resolution
    with pytest.raises(ValueError, match="only takes 64-pixel inputs"):
        to_piip_config(baseline, "seg", input_size=512)
