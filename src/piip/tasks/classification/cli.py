"""``piip eval cls``: the task's options and its report (top-1 / top-5 and per-class accuracy)."""
from __future__ import annotations

import argparse
import json

from ...argtypes import POSITIVE, fraction
from ...data import DataConfig, resolve_data_arg
from ...precision import autocast_dtype
from .evaluation import evaluate_checkpoint

__all__ = ["add_eval_arguments", "run_eval_command"]

HELP = "classification: top-1 / top-5 / per-class accuracy"


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True,
                   help="'fashion_mnist' (default folder), a folder of Fashion-MNIST IDX files, or an "
                        "ImageFolder root with train/<class>/ and val/<class>/")
    p.add_argument("--dataset", choices=("fashion_mnist", "imagefolder"), help="default: inferred from --data")
    p.add_argument("--split", choices=("val", "train"), default="val")
    p.add_argument("--image-size", type=POSITIVE, help="default: the model's input size")
    p.add_argument("--crop-pct", type=fraction(low_open=True),
                   help="eval centre-crop fraction (default: 0.875 ImageFolder, 1.0 Fashion-MNIST)")
    p.add_argument("--batch-size", type=POSITIVE, default=64)


def run_eval_command(args: argparse.Namespace, console) -> None:
    from rich.table import Table

    dataset, root = resolve_data_arg(args.data, args.dataset)
    data = DataConfig(dataset=dataset, root=root, image_size=args.image_size, limit=args.limit,
                      crop_pct=args.crop_pct)
    metrics = evaluate_checkpoint(args.checkpoint, data, split=args.split, batch_size=args.batch_size,
                                  workers=args.workers, device=args.device, amp_dtype=autocast_dtype(args.dtype),
                                  progress=not args.json and console.is_terminal)
    if args.json:
        print(json.dumps({"checkpoint": args.checkpoint, "dataset": dataset, "root": root,
                          "split": args.split, **metrics.to_dict()}))
        return
    console.print(f"[bold]{args.checkpoint}[/] on {dataset} {args.split} ({metrics.num_samples} images): "
                  f"top-1 [bold]{metrics.top1:.2f}%[/], top-5 {metrics.top5:.2f}%, loss {metrics.loss:.4f}")
    if metrics.skipped:
        console.print(f"[yellow]skipped {metrics.skipped} unreadable images[/]")
    table = Table(title="per-class top-1")
    for column in ("label", "class", "images", "top-1 (%)"):
        table.add_column(column, justify="right" if column != "class" else "left")
    names = metrics.classes or [str(i) for i in range(len(metrics.per_class))]
    for i, (name, count, acc) in enumerate(zip(names, metrics.per_class_count, metrics.per_class)):
        table.add_row(str(i), str(name), str(count), "-" if acc is None else f"{acc:.2f}")
    console.print(table)
