"""``piip demo seg``: the paper's segmentation claim in miniature, trained and measured on this machine.

The detection demo's scenes as per-pixel classes (background and the ten Fashion-MNIST classes) in
the ADE20K layout; the tiny ViT-B/S/T pretrained on Fashion-MNIST classification as there; UperNet
with the ``scenes_seg`` recipe on the tiny parameter-inverted PIIP-TSB (B@68, S@136, T@168) and on
the tiny ViT-B at 168 from the same weights; mIoU / mAcc / aAcc on the validation scenes, backbone
MACs and training time; ``results.json``/``results.md`` and ``predictions.png``, the two models'
predictions under the ground truth for a few validation scenes. Runs are reused or resumed as in the other demos.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ..data.scenes import generate_semantic_scenes
from ..tasks.drawing import legend_strip, load_image, overlay_segmentation
from ..tasks.predict import predict
from ..weights.checkpoint import load_checkpoint
from .runs import SCENES_CANVAS, DenseDemoResult, run_dense_demo

__all__ = ["run_segmentation_demo"]

RECIPE = "scenes_seg"


def run_segmentation_demo(out_dir: str | Path = "outputs/demo_seg", *, train_scenes: int = 400, val_scenes: int = 100,
                          pretrain_limit: int = 20000, epochs: int | None = None, overrides: list[str] | None = None,
                          fresh: bool = False, console: Console | None = None) -> list[DenseDemoResult]:
    """Run the segmentation demo (see the module docstring); returns one result per model."""
    console = console or Console()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    results, pretrain_seconds, scenes = run_dense_demo(
        out, generate=generate_semantic_scenes, scenes_title="Fashion-MNIST scenes, per-pixel classes",
        recipe=RECIPE, task="seg", head="UperNet", train_scenes=train_scenes, val_scenes=val_scenes,
        pretrain_limit=pretrain_limit, epochs=epochs, overrides=overrides, fresh=fresh, console=console)
    _report(results, pretrain_seconds, out, scenes, console)
    return results


def _report(results: list[DenseDemoResult], pretrain_seconds: float, out: Path, scenes: Path,
            console: Console) -> None:
    table = Table(title="Fashion-MNIST scenes, validation split (UperNet trained on this machine)")
    for column in ("backbone", "resolutions", "params (M)", "MACs (G)", "train (min)", "images/s", "mIoU",
                   "mAcc", "aAcc"):
        table.add_column(column, justify="left" if column == "backbone" else "right")
    lines = ["| backbone | resolutions | params | backbone MACs / image | train time | images/s | mIoU | mAcc | aAcc |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        m = r.metrics
        cells = [f"{r.params / 1e6:.2f}", f"{r.backbone_macs / 1e9:.2f}", f"{r.train_time_s / 60:.1f}",
                 f"{r.images_per_s:.1f}", f"{m['mIoU']:.1f}", f"{m['mAcc']:.1f}", f"{m['aAcc']:.1f}"]
        table.add_row(r.label, r.resolutions, *cells)
        lines.append(f"| {r.label} | {r.resolutions} | {cells[0]} M | {cells[1]} G | {cells[2]} min | "
                     + " | ".join(cells[3:]) + " |")
    console.print(table)
    piip, base = results
    console.print(f"PIIP-TSB uses {piip.backbone_macs / base.backbone_macs:.2f}x the backbone MACs of ViT-B and scores "
                  f"{piip.metrics['mIoU'] - base.metrics['mIoU']:+.1f} mIoU against it.")
    lines.append(f"\nBoth backbones start from ViTs pretrained here on Fashion-MNIST classification "
                 f"({pretrain_seconds / 60:.1f} min for ViT-B, -S and -T together).")
    (out / "results.json").write_text(json.dumps({"pretrain_time_s": pretrain_seconds,
                                                  "runs": [asdict(r) for r in results]}, indent=2))
    (out / "results.md").write_text("\n".join(lines) + "\n")
    drawn = _draw(results, scenes, out / "predictions.png")
    console.print(f"results: {out / 'results.json'}, {out / 'results.md'}; overlays: {drawn}")


def _draw(results: list[DenseDemoResult], scenes: Path, path: Path, count: int = 4) -> Path:
    """Rows: ground truth, then each model's prediction, overlaid on the first ``count`` validation
    scenes, with a legend of the classes."""
    import numpy as np
    import torch
    from PIL import Image

    files = sorted((scenes / "images" / "validation").glob("*.jpg"))[:count]
    classes = [line for line in (scenes / "classes.txt").read_text().splitlines() if line]
    side = max(SCENES_CANVAS)
    images = [load_image(file) for file in files]
    truth = [np.asarray(Image.open(scenes / "annotations" / "validation" / f"{file.stem}.png")).astype(np.int64) - 1
             for file in files]  # the PNGs store class + 1 (ADE20K's convention)
    label_rows = [[torch.from_numpy(label) for label in truth]]
    for r in results:
        model = load_checkpoint(Path(r.out_dir) / "model.safetensors")
        label_rows.append([pred["labels"] for pred in predict(model, images)])
    rows = []
    for labels in label_rows:
        row = [overlay_segmentation(image, label) for image, label in zip(images, labels)]
        row = [torch.nn.functional.pad(c, (0, side - c.shape[-1], 0, side - c.shape[-2]), value=255) for c in row]
        rows.append(torch.cat(row, dim=2))
    grid = torch.cat(rows, dim=1)
    legend = legend_strip(classes, grid.shape[-1])
    Image.fromarray(torch.cat([grid, legend], dim=1).permute(1, 2, 0).numpy()).save(path)
    return path
