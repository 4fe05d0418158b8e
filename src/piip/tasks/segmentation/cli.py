"""``piip eval seg``: the task's options and its report (mIoU / mAcc / aAcc and per-class IoU)."""
from __future__ import annotations

import argparse
import json
import os

from ...data.semseg import SegmentationDataConfig
from ...precision import autocast_dtype
from .evaluation import evaluate_checkpoint

__all__ = ["add_eval_arguments", "run_eval_command"]

HELP = "semantic segmentation: mIoU / mAcc / aAcc and per-class IoU"


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", help="an ADE20K-layout root: images/<split>/ and annotations/<split>/")
    p.add_argument("--dataset", choices=("ade20k", "folder"), default="ade20k",
                   help="ade20k: label 0 = 'other' -> ignore, the rest shifted down; folder: labels as stored")
    p.add_argument("--split", default="val",
                   help="'val' (ADE20K's validation/), 'train' (training/) or a folder name under --data")
    p.add_argument("--images", help="the image folder (instead of the --data layout)")
    p.add_argument("--masks", help="the mask folder, files named as the images (instead of the --data layout)")
    p.add_argument("--classes", help="a text file with one class name per line (folder layout)")
    p.add_argument("--ignore-index", type=int, default=255, help="label of pixels without a class")
    p.add_argument("--mode", choices=("whole", "slide"), help="inference (default: the checkpoint's)")
    p.add_argument("--flip", action="store_true", help="average with the mirrored image's prediction")
    p.add_argument("--out", help="folder for metrics.json (default: beside the checkpoint)")


def run_eval_command(args: argparse.Namespace, console) -> None:
    from rich.table import Table

    split = "train" if args.split == "train" else "val"
    folder_name = {} if args.split in ("train", "val") else {"val_split": args.split}  # another folder under --data
    data = SegmentationDataConfig(dataset=args.dataset, root=args.data, classes=args.classes,
                                  ignore_index=args.ignore_index, limit=args.limit, **folder_name,
                                  **{f"{split}_images": args.images, f"{split}_masks": args.masks})
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), f"eval_seg_{split}")
    metrics = evaluate_checkpoint(args.checkpoint, data, split=split, device=args.device,
                                  amp_dtype=autocast_dtype(args.dtype), mode=args.mode, flip=args.flip,
                                  workers=args.workers, save_to=out, progress=not args.json and console.is_terminal)
    if args.json:
        print(json.dumps({"checkpoint": args.checkpoint, "data": args.data, "split": args.split, "out": out,
                          **metrics.to_dict()}))
        return
    console.print(f"[bold]{args.checkpoint}[/] on {args.images or args.data} ({metrics.num_images} images): "
                  f"mIoU [bold]{metrics.mIoU:.2f}[/], mAcc {metrics.mAcc:.2f}, aAcc {metrics.aAcc:.2f}")
    table = Table(title="per-class IoU / Acc (%)")
    for column in ("label", "class", "IoU", "Acc"):
        table.add_column(column, justify="left" if column == "class" else "right")
    names = metrics.classes or [str(i) for i in range(len(metrics.per_class_iou))]
    for i, (name, iou, acc) in enumerate(zip(names, metrics.per_class_iou, metrics.per_class_acc)):
        table.add_row(str(i), str(name), "-" if iou is None else f"{iou:.2f}", "-" if acc is None else f"{acc:.2f}")
    console.print(table)
    console.print(f"metrics in {out}")
