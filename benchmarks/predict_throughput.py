"""Throughput of ``piip predict`` on a folder: images/s at several batch sizes, measured in one run.

A folder of ``--images`` crops of scikit-image's bundled photographs (varied sizes, as a real
folder) is predicted by a randomly initialised checkpoint of the given variant and task
(``--task cls``: the PIIP classifier at its input size; ``--task det``: a Mask R-CNN with ``--min-size``)
with ``draw=False``, once per batch size, into a fresh folder each time; the first batch size is the
baseline of the printed ratios. A warm-up run on a few images comes first. Rates are of the
prediction loop (decoding, the model, writing the lines) and, beside them, of the whole call
(checkpoint hashed and loaded too).

Usage: ``python benchmarks/predict_throughput.py [--variant piip_tsb] [--task cls] [--images 64]
[--batch-sizes 1 4 8] [--json]``
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def photo_crops(folder: Path, count: int, seed: int = 0) -> Path:
    """``count`` crops (160-480 px a side) of scikit-image's bundled colour photographs."""
    from skimage import data

    photos = [np.asarray(getattr(data, name)()) for name in ("astronaut", "chelsea", "coffee", "rocket", "motorcycle_left")
              if hasattr(data, name)]
    photos = [p[..., :3] for p in photos if p.ndim == 3]
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        photo = photos[i % len(photos)]
        h, w = (int(rng.integers(160, min(480, s) + 1)) for s in photo.shape[:2])
        y, x = int(rng.integers(0, photo.shape[0] - h + 1)), int(rng.integers(0, photo.shape[1] - w + 1))
        Image.fromarray(photo[y:y + h, x:x + w]).save(folder / f"crop{i:05d}.jpg", quality=90)
    return folder


def checkpoint_for(variant: str, task: str, min_size: int, path: Path) -> Path:
    import piip

    if task == "cls":
        model = piip.create_model(variant, task="cls")
    else:
        from piip.tasks.detection.model import build_detector
        backbone = piip.create_model(variant, task="det")
        model = build_detector(backbone, num_classes=80, min_size=min_size, max_size=int(min_size * 5 / 3))
    return Path(piip.save(model, path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variant", default="piip_tsb")
    parser.add_argument("--task", choices=("cls", "det"), default="cls")
    parser.add_argument("--min-size", type=int, default=448, help="a detector's test short side")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from piip.tasks.predict import predict_files

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        folder = photo_crops(work / "images", args.images)
        checkpoint = checkpoint_for(args.variant, args.task, args.min_size, work / "model.safetensors")
        predict_files(checkpoint, sorted(folder.iterdir())[:2], work / "warmup", draw=False)
        rates, whole = {}, {}
        for batch_size in args.batch_sizes:
            started = time.perf_counter()
            result = predict_files(checkpoint, [folder], work / f"out{batch_size}", batch_size=batch_size, draw=False)
            rates[batch_size] = result["images_per_second"]  # the prediction loop: decoding, model, writing
            whole[batch_size] = result["predicted"] / (time.perf_counter() - started)  # loading the checkpoint too
    base = rates[args.batch_sizes[0]]
    record = {"variant": args.variant, "task": args.task, "images": args.images, "threads": torch.get_num_threads(),
              "cpu": platform.processor() or platform.machine(),
              "images_per_second": {str(b): round(r, 3) for b, r in rates.items()},
              "images_per_second_with_loading": {str(b): round(r, 3) for b, r in whole.items()},
              "ratio_to_first": {str(b): round(r / base, 3) for b, r in rates.items()}}
    if args.json:
        print(json.dumps(record))
        return
    print(f"{args.variant} ({args.task}), {args.images} images, {torch.get_num_threads()} threads")
    for b, r in rates.items():
        print(f"  batch {b:>3}: {r:8.2f} images/s  ({r / base:.2f}x batch {args.batch_sizes[0]}); "
              f"{whole[b]:.2f} images/s counting the checkpoint's loading")


if __name__ == "__main__":
    main()
