"""How far torchvision's detection rules are from MMDetection 2.x's on real data: the figures behind
``piip.tasks.detection.rcnn_parts`` (issue 16's closing note).

* RPN: on the real tree-crown crops (``piip data trees --full``, the ``scenes_det`` anchors), how many
  anchors torchvision's low-quality rule makes positive below MMDetection's ``min_pos_iou=0.3``;
* mask targets: torchvision's soft ``aligned=False`` crops against MMDetection's binary aligned ones;
* mask paste: pixels that torchvision's Detectron-style paste flips against MMDetection's
  ``grid_sample`` paste, on Fashion-MNIST-shaped instance masks (``piip data scenes``).

Usage: ``python benchmarks/mmdet_rules.py [WORK_DIR]`` (needs ``deepforest`` installed with
``--no-deps`` and Debian's ``dataset-fashion-mnist``, as ``make test`` sets up).
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
from torchvision.models.detection._utils import Matcher
from torchvision.models.detection.roi_heads import paste_masks_in_image, project_masks_on_boxes
from torchvision.ops import box_iou


def main(work: Path) -> None:
    from piip.data.coco import CocoDetection
    from piip.data.scenes import generate_scenes
    from piip.data.trees import write_tree_crowns
    from piip.engine import load_config
    from piip.tasks.detection.rcnn_parts import MaxIoUMatcher, mask_targets, paste_masks
    from piip.tasks.detection.task import DetectionTask

    trees = work / "trees"
    write_tree_crowns(trees, sources=("yell541", "yell528"))
    cfg = load_config("scenes_det", [f"data.root={trees}"])
    task = DetectionTask(cfg)
    train, _ = task.build_datasets(cfg)
    train.transform = None
    det = task.build_model(cfg, train).eval()
    theirs, ours = Matcher(0.7, 0.3, allow_low_quality_matches=True), MaxIoUMatcher(0.7, 0.3, 0.3)
    extra = positives = crowns = 0
    with torch.no_grad():
        for i in range(len(train)):
            image, target = train[i]
            images, targets = det.transform([image], [target])
            anchors = det.rpn.anchor_generator(images, list(det.backbone(images.tensors).values()))[0]
            iou = box_iou(targets[0]["boxes"], anchors)
            a, b = theirs(iou.clone()), ours(iou.clone())
            extra += int(((a >= 0) & (b < 0)).sum())
            positives += int((b >= 0).sum())
            crowns += len(iou)
    print(f"RPN, {len(train)} tree crops with {crowns} crowns: {positives} positive anchors by MMDetection's rule; "
          f"torchvision's low-quality rule adds {extra} below IoU 0.3")

    scenes = work / "scenes"
    generate_scenes(scenes, train_images=8, val_images=0)
    data = CocoDetection(scenes / "annotations" / "instances_train.json", scenes / "train", train=True)
    torch.manual_seed(0)
    soft, cells, flipped, pixels = [], [], 0, 0
    for i in range(len(data)):
        _, t = data[i]
        boxes = t["boxes"] + torch.randn_like(t["boxes"]) * 2  # proposals around the objects
        matched = torch.arange(len(boxes))
        binary = mask_targets(t["masks"], boxes, matched, 28)
        tv = project_masks_on_boxes(t["masks"], boxes, matched, 28)
        soft.append((binary - tv).abs().mean())
        cells.append((binary != (tv >= 0.5).float()).float().mean())
        probs = binary * 0.9 + 0.05  # a confident prediction of the target
        h, w = t["masks"].shape[-2:]
        mmdet = paste_masks(probs, boxes, h, w) >= 0.5
        detectron = paste_masks_in_image(probs[:, None], boxes, (h, w))[:, 0] > 0.5
        flipped += int((mmdet != detectron).sum())
        pixels += int(mmdet.sum())
    print(f"mask targets, {len(data)} scenes: torchvision's differ from MMDetection's by "
          f"{float(torch.stack(soft).mean()):.3f} mean abs, {100 * float(torch.stack(cells).mean()):.1f}% of cells "
          "after thresholding")
    print(f"mask paste: torchvision's flips {flipped} of {pixels} mask pixels ({100 * flipped / pixels:.1f}%)")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as folder:
            main(Path(folder))
