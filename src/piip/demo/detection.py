"""``piip demo det``: the paper's detection claim in miniature, trained and measured on this machine.

1. **Data**: Fashion-MNIST scenes (:mod:`piip.data.scenes`): real items from 10 to 168 pixels (COCO's
   small, medium and large) on scikit-image's photographs, COCO format, train items from
   Fashion-MNIST's train split and validation items from its test split.
2. **Pretraining** (the paper's workflow, so the minutes go into detection, not into learning to
   see): the tiny ViT-B, ViT-S and ViT-T are trained on Fashion-MNIST classification by piip itself
   (the ``fashion_mnist`` recipe, one epoch on a subset); both detectors start from them.
3. **Detection**: Mask R-CNN with the ``scenes_det`` recipe, once on the parameter-inverted tiny
   PIIP-TSB (ViT-B @68, ViT-S @136, ViT-T @168, branches from the three ViTs) and once on the tiny
   ViT-B at the finest resolution (168, from the same ViT-B weights), the paper's baseline.
4. **Report**: box and mask AP (COCO's, on the validation scenes), APs/APm/APl, backbone MACs,
   training time; ``results.json``/``results.md``, a PNG of AP against MACs and the two detectors'
   predictions drawn side by side for a few validation scenes.

Every run lives in its own folder under ``out_dir``; an interrupted demo resumes each run from its
last checkpoint, and a finished run with the same config is reused.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ..data.scenes import generate_scenes
from ..tasks.drawing import draw_detections, load_image
from ..tasks.predict import predict
from ..weights.checkpoint import load_checkpoint
from .runs import SCENES_CANVAS, DenseDemoResult, run_dense_demo

__all__ = ["run_detection_demo"]

RECIPE = "scenes_det"


def run_detection_demo(out_dir: str | Path = "outputs/demo_det", *, train_scenes: int = 400, val_scenes: int = 100,
                       pretrain_limit: int = 20000, epochs: int | None = None, overrides: list[str] | None = None,
                       fresh: bool = False, console: Console | None = None) -> list[DenseDemoResult]:
    """Run the detection demo (see the module docstring); returns one result per detector.

    ``overrides`` (``section.field=value``) apply to both detection runs; ``epochs`` overrides the
    recipe's; ``fresh`` retrains finished runs.
    """
    console = console or Console()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    results, pretrain_seconds, scenes = run_dense_demo(
        out, generate=generate_scenes, scenes_title="Fashion-MNIST scenes", recipe=RECIPE, task="det",
        head="Mask R-CNN", train_scenes=train_scenes, val_scenes=val_scenes, pretrain_limit=pretrain_limit,
        epochs=epochs, overrides=overrides, fresh=fresh, console=console)
    _report(results, pretrain_seconds, out, scenes, console)
    return results


_COLUMNS = ("bbox_AP", "bbox_AP50", "bbox_APs", "bbox_APm", "bbox_APl", "segm_AP")


def _markdown(results: list[DenseDemoResult], pretrain_seconds: float) -> str:
    lines = ["| backbone | resolutions | params | backbone MACs / image | train time | images/s | box AP | AP50 "
             "| APs | APm | APl | mask AP |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        m = r.metrics
        lines.append(f"| {r.label} | {r.resolutions} | {r.params / 1e6:.2f} M | {r.backbone_macs / 1e9:.2f} G | "
                     f"{r.train_time_s / 60:.1f} min | {r.images_per_s:.1f} | "
                     + " | ".join(f"{m[c]:.1f}" for c in _COLUMNS) + " |")
    lines.append(f"\nBoth backbones start from ViTs pretrained here on Fashion-MNIST classification "
                 f"({pretrain_seconds / 60:.1f} min for ViT-B, -S and -T together).")
    return "\n".join(lines) + "\n"


def _report(results: list[DenseDemoResult], pretrain_seconds: float, out: Path, scenes: Path,
            console: Console) -> None:
    table = Table(title="Fashion-MNIST scenes, validation split (Mask R-CNN trained on this machine)")
    for column in ("backbone", "resolutions", "params (M)", "MACs (G)", "train (min)", "images/s", "box AP",
                   "AP50", "APs", "APm", "APl", "mask AP"):
        table.add_column(column, justify="left" if column == "backbone" else "right")
    for r in results:
        table.add_row(r.label, r.resolutions, f"{r.params / 1e6:.2f}", f"{r.backbone_macs / 1e9:.2f}",
                      f"{r.train_time_s / 60:.1f}", f"{r.images_per_s:.1f}", *(f"{r.metrics[c]:.1f}" for c in _COLUMNS))
    console.print(table)
    piip, base = results
    console.print(f"PIIP-TSB uses {piip.backbone_macs / base.backbone_macs:.2f}x the backbone MACs of ViT-B and scores "
                  f"{piip.metrics['bbox_AP'] - base.metrics['bbox_AP']:+.1f} box AP and "
                  f"{piip.metrics['segm_AP'] - base.metrics['segm_AP']:+.1f} mask AP against it.")
    (out / "results.json").write_text(json.dumps({"pretrain_time_s": pretrain_seconds,
                                                  "runs": [asdict(r) for r in results]}, indent=2))
    (out / "results.md").write_text(_markdown(results, pretrain_seconds))
    plot = _plot(results, out / "ap_vs_macs.png")
    drawn = _draw_predictions(results, scenes, out / "predictions.png")
    console.print(f"results: {out / 'results.json'}, {out / 'results.md'}; plots: {plot}, {drawn}")


def _plot(results: list[DenseDemoResult], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for r, marker in zip(results, ("*", "o")):
        left.plot(r.backbone_macs / 1e9, r.metrics["bbox_AP"], marker, markersize=14, label=f"{r.label} box")
        left.plot(r.backbone_macs / 1e9, r.metrics["segm_AP"], marker, markersize=9, alpha=0.5, label=f"{r.label} mask")
    left.set_xlabel(f"backbone MACs per {SCENES_CANVAS[0]}x{SCENES_CANVAS[1]} image (G)")
    left.set_ylabel("AP on the validation scenes")
    left.set_title("AP against compute")
    left.margins(x=0.3, y=0.3)
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    width = 0.38
    for i, r in enumerate(results):
        values = [r.metrics[f"bbox_{k}"] for k in ("APs", "APm", "APl")]
        right.bar([x + (i - 0.5) * width for x in range(3)], values, width, label=r.label)
    right.set_xticks(range(3), ["small", "medium", "large"])
    right.set_ylabel("box AP")
    right.set_title("by object size (COCO's areas)")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _draw_predictions(results: list[DenseDemoResult], scenes: Path, path: Path, count: int = 4,
                      top: int = 3) -> Path:
    """The first ``count`` validation scenes with each detector's ``top`` highest-scoring detections
    (the models are young: their scores are low), PIIP's on top, the baseline's below."""
    import torch
    from PIL import Image

    files = sorted((scenes / "val").glob("*.png"))[:count]
    rows = []
    for r in results:
        model = load_checkpoint(Path(r.out_dir) / "model.safetensors")
        row = []
        for file in files:
            image = load_image(file)
            (pred,) = predict(model, [image], score_threshold=0.0)
            pred = {k: v[:top] for k, v in pred.items()}
            side = max(SCENES_CANVAS)
            row.append(torch.nn.functional.pad(draw_detections(image, pred),
                                               (0, side - image.shape[-1], 0, side - image.shape[-2]), value=255))
        rows.append(torch.cat(row, dim=2))
    grid = torch.cat(rows, dim=1).permute(1, 2, 0).numpy()
    Image.fromarray(grid).save(path)
    return path
