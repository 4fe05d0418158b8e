"""What every demo does with its training runs: reuse a finished run with the same config, resume an
interrupted one, train the rest; and what the dense (detection and segmentation) demos share: their
scenes, the ViT pretraining they start from and the paper's comparison, PIIP-TSB against ViT-B."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from rich.console import Console

from ..analysis.actual_flops import actual_complexity
from ..data.scenes import SCENES_VERSION
from ..engine import TrainConfig, build_model_config, load_config, train

__all__ = ["previous", "train_or_reuse", "pretrain_fmnist_vits", "scenes_or_reuse", "SCENES_CANVAS",
           "DenseDemoResult", "run_dense_demo"]

#: the scenes' canvas (height, width), every other scene portrait; multiples of 56 (14-token windows x patch 4)
SCENES_CANVAS = (168, 224)


def previous(cfg: TrainConfig) -> tuple[bool, dict | None]:
    """``(same config, finished summary)`` of what ``cfg.run.out_dir`` already holds."""
    folder = Path(cfg.run.out_dir)
    try:
        same = json.loads((folder / "config.json").read_text()) == json.loads(cfg.to_json())
    except (OSError, json.JSONDecodeError):
        return False, None
    try:
        summary = json.loads((folder / "summary.json").read_text())
    except (OSError, json.JSONDecodeError):
        summary = None
    finished = same and summary is not None and not summary.get("halted") and summary.get("eval")
    return same, summary if finished else None


def train_or_reuse(cfg: TrainConfig, label: str, console: Console, fresh: bool = False) -> dict:
    """The run's summary: reused when finished with the same config, else trained (resumed when an
    interrupted run of the same config is there; anything else starts afresh)."""
    same, summary = (False, None) if fresh else previous(cfg)
    if summary is not None:
        console.print(f"{label}: reusing the finished run in {cfg.run.out_dir}")
        return summary
    console.rule(f"[bold]{label}[/]")
    return train(cfg, resume="auto" if same else None)


def pretrain_fmnist_vits(out: Path, limit: int, console: Console, fresh: bool = False) -> tuple[dict, float]:
    """The tiny ViT-B, -S and -T trained on ``limit`` Fashion-MNIST images for one epoch (the
    ``fashion_mnist`` recipe): their weights by size (``"b"``, ``"s"``, ``"t"``) and the seconds spent."""
    weights, seconds = {}, 0.0
    for size in ("b", "s", "t"):
        cfg = load_config("fashion_mnist", [f"model.name=vit_fmnist_{size}", "optim.epochs=1", f"data.limit={limit}",
                                            f"run.out_dir={out / 'pretrain' / f'vit_{size}'}"])
        summary = train_or_reuse(cfg, f"pretraining ViT-{size.upper()} on Fashion-MNIST ({limit} images, 1 epoch)",
                                 console, fresh)
        weights[size] = summary["model_path"] or str(Path(cfg.run.out_dir) / "model.safetensors")
        seconds += summary["train_time_s"]
        console.print(f"ViT-{size.upper()}: top-1 {summary['eval']['top1']:.1f}% on the 10k test split")
    return weights, seconds


def scenes_or_reuse(root: Path, generate: Callable, title: str, console: Console, *, train_images: int,
                    val_images: int, canvas: tuple[int, int]) -> Path:
    """The scenes ``generate`` writes to ``root`` (seed 0), generated unless the same ones are already there."""

    stamp = {"train": train_images, "val": val_images, "canvas": list(canvas), "seed": 0, "generator": SCENES_VERSION}
    marker = root / "scenes.json"
    if marker.is_file() and json.loads(marker.read_text()) == stamp:
        console.print(f"reusing the scenes in {root}")
        return root
    console.rule(f"[bold]{title}[/]")
    start = time.perf_counter()
    generate(root, train_images=train_images, val_images=val_images, canvas=canvas, seed=0,
             progress=console.is_terminal)
    marker.write_text(json.dumps(stamp))
    console.print(f"{train_images} + {val_images} scenes in {time.perf_counter() - start:.0f} s")
    return root


@dataclass
class DenseDemoResult:
    """One backbone's run in a dense demo: what it is, what it cost, what it scored."""

    key: str
    label: str
    model: str
    resolutions: str
    params: int
    backbone_macs: int
    epochs: int
    train_time_s: float
    images_per_s: float
    metrics: dict
    out_dir: str


def run_dense_demo(out: Path, *, generate: Callable, scenes_title: str, recipe: str, task: str, head: str,
                   train_scenes: int, val_scenes: int, pretrain_limit: int, epochs: int | None,
                   overrides: list[str] | None, fresh: bool, console: Console
                   ) -> tuple[list[DenseDemoResult], float, Path]:
    """The scenes (``generate``), the tiny ViTs pretrained on Fashion-MNIST, then ``head`` trained with
    ``recipe`` once on the tiny PIIP-TSB (B@68, S@136, T@168, branches from the three ViTs) and once
    on the tiny ViT-B at 168 (from the same ViT-B). Returns the two results (PIIP first), the
    pretraining seconds and the scenes' folder."""
    scenes = scenes_or_reuse(out / "scenes", generate, scenes_title, console, train_images=train_scenes,
                             val_images=val_scenes, canvas=SCENES_CANVAS)
    weights, pretrain_seconds = pretrain_fmnist_vits(out, pretrain_limit, console, fresh)
    runs = [("piip", "piip_fmnist_tsb", "168/136/68", "PIIP-TSB",
             {"branch1": weights["b"], "branch2": weights["s"], "branch3": weights["t"]}),
            ("vit_b", "vit_fmnist_b", "168", "ViT-B (baseline)", {"branch1": weights["b"]})]
    results = []
    for key, model, resolutions, label, branch_weights in runs:
        cfg = load_config(recipe, [f"model.name={model}", f"model.resolutions={resolutions}", f"data.root={scenes}",
                                   *(overrides or []), *([f"optim.epochs={epochs}"] if epochs else []),
                                   f"run.out_dir={out / key}"])
        cfg.model.branch_weights = branch_weights
        summary = train_or_reuse(cfg, f"{label}: {head} on the scenes, {cfg.optim.epochs} epochs", console, fresh)
        counts = actual_complexity(build_model_config(cfg.model, task), SCENES_CANVAS)
        results.append(DenseDemoResult(
            key=key, label=label, model=model, resolutions=resolutions, params=counts.params,
            backbone_macs=counts.macs, epochs=cfg.optim.epochs, train_time_s=summary["train_time_s"],
            images_per_s=summary["images_seen"] / summary["train_time_s"], metrics=summary["eval"],
            out_dir=cfg.run.out_dir))
    return results, pretrain_seconds, scenes
