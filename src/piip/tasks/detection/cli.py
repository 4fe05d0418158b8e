"""``piip eval det``: the task's options and its report (COCO box and mask AP)."""
from __future__ import annotations

import argparse
import json
import os

from ...argtypes import POSITIVE
from ...data.coco import DetectionDataConfig
from ...precision import autocast_dtype
from .evaluation import evaluate_checkpoint

__all__ = ["add_eval_arguments", "run_eval_command"]

HELP = "detection: COCO box and mask AP"


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", help="a COCO-style root: annotations/instances_<split>.json and <split>/")
    p.add_argument("--split", default="val2017", help="split name under --data (default val2017)")
    p.add_argument("--ann-file", help="the annotation JSON (instead of the --data layout)")
    p.add_argument("--images", help="the image folder (instead of the --data layout)")
    p.add_argument("--out", help="folder for detections.json and metrics.json (default: beside the checkpoint)")
    p.add_argument("--batch-size", type=POSITIVE, default=2)


def run_eval_command(args: argparse.Namespace, console) -> None:
    from rich.table import Table

    data = DetectionDataConfig(root=args.data, val_split=args.split, val_ann=args.ann_file,
                               val_images=args.images, limit=args.limit)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)),
                                   f"eval_{os.path.basename(args.split)}")
    metrics = evaluate_checkpoint(args.checkpoint, data, batch_size=args.batch_size, workers=args.workers,
                                  device=args.device, amp_dtype=autocast_dtype(args.dtype), save_to=out,
                                  progress=not args.json and console.is_terminal)
    if args.json:
        print(json.dumps({"checkpoint": args.checkpoint, "data": args.data, "split": args.split, "out": out,
                          **metrics}))
        return
    table = Table(title=f"{args.checkpoint} on {args.data} {args.split} ({metrics['num_images']} images)")
    for column in ("", "AP", "AP50", "AP75", "APs", "APm", "APl"):
        table.add_column(column, justify="right")
    for kind in ("bbox", "segm"):
        if f"{kind}_AP" in metrics:
            table.add_row(kind, *(f"{metrics[f'{kind}_{m}']:.1f}" for m in ("AP", "AP50", "AP75", "APs", "APm", "APl")))
    console.print(table)
    if metrics["skipped"]:
        console.print(f"[yellow]left out {metrics['skipped']} unreadable images[/]")
    console.print(f"detections (COCO results format) and metrics in {out}")
