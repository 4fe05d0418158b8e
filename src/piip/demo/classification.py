"""``piip demo``: the paper's claim in miniature, trained and measured on this machine.

Trains a tiny parameter-inverted PIIP-TSB (``piip_fmnist_tsb``: T@28, S@20, B@12) and the
single-branch ViT-B baseline at the finest resolution (``vit_fmnist_b``) on Fashion-MNIST with one
recipe (the shipped ``fashion_mnist`` config), evaluates both on the official 10k test split, and
reports accuracy against MACs (table, ``results.json``, ``results.md`` and ``accuracy_vs_macs.png``).

``pretrain_branches=True`` adds the paper's workflow: the T and S ViTs are trained as well (B is the
baseline run), and PIIP is built from the three saved models with ``branch_weights=`` and
fine-tuned (interactions at 10x the learning rate), next to PIIP trained from scratch.

Every run lives in its own folder under ``out_dir``; an interrupted demo resumes each run from its
last checkpoint, and a finished run with the same config is reused instead of retrained.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ..analysis import complexity
from ..engine import TrainConfig, build_model_config, load_config
from .runs import train_or_reuse

__all__ = ["DemoResult", "demo_runs", "run_demo", "plot_accuracy_vs_macs"]

RECIPE = "fashion_mnist"
#: Epochs of every demo run: one keeps PIIP + ViT-B under ~10 minutes on two CPU cores.
DEMO_EPOCHS = 1


@dataclass(frozen=True)
class DemoRun:
    """One training run of the demo: a registered model and how it starts."""

    key: str
    model: str
    label: str
    branch_weights_from: tuple[str, ...] = ()  # demo run keys, branch 1 first
    overrides: tuple[str, ...] = ()


@dataclass
class DemoResult:
    key: str
    label: str
    model: str
    resolutions: str
    init: str
    params: int
    macs: int
    epochs: int
    train_time_s: float
    images_per_s: float
    top1: float
    top5: float
    out_dir: str


def demo_runs(pretrain_branches: bool = False, finetune_epochs: int | None = None) -> list[DemoRun]:
    """The runs of the demo, in training order (a run's branch sources come before it)."""
    runs = [DemoRun("vit_b", "vit_fmnist_b", "ViT-B (baseline)"),
            DemoRun("piip_scratch", "piip_fmnist_tsb", "PIIP-TSB (from scratch)",
                    overrides=("optim.new_module_lr_mult=1",))]
    if pretrain_branches:
        # the paper's fine-tuning rule: interactions at 10x the lr of the pretrained branches
        # (here the recipe's from-scratch lr for the new modules, a tenth of it for the branches)
        finetune = ("optim.new_module_lr_mult=10", "optim.lr=2e-4", "optim.warmup_epochs=0.2")
        if finetune_epochs is not None:
            finetune += (f"optim.epochs={finetune_epochs}",)
        runs += [DemoRun("vit_s", "vit_fmnist_s", "ViT-S"),
                 DemoRun("vit_t", "vit_fmnist_t", "ViT-T"),
                 DemoRun("piip_pretrained", "piip_fmnist_tsb", "PIIP-TSB (pretrained branches)",
                         branch_weights_from=("vit_b", "vit_s", "vit_t"), overrides=finetune)]
    return runs


def _config(run: DemoRun, out_dir: Path, overrides: list[str]) -> TrainConfig:
    cfg = load_config(RECIPE, [f"model.name={run.model}", *overrides, *run.overrides,
                               f"run.out_dir={out_dir / run.key}"])
    if run.branch_weights_from:
        cfg.model.branch_weights = {f"branch{i + 1}": str(out_dir / key / "model.safetensors")
                                    for i, key in enumerate(run.branch_weights_from)}
    return cfg


def run_demo(out_dir: str | Path = "outputs/demo", *, epochs: int = DEMO_EPOCHS, pretrain_branches: bool = False,
             overrides: list[str] | None = None, finetune_epochs: int | None = None,
             fresh: bool = False, console: Console | None = None) -> list[DemoResult]:
    """Train and evaluate the demo runs; returns one :class:`DemoResult` per run.

    ``epochs`` of every run (the shipped recipe trains 5); ``overrides`` (``section.field=value``)
    apply to every run, e.g. ``["data.root=/path/to/fashion-mnist"]``. ``fresh`` retrains runs that
    already finished.
    """
    console = console or Console()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for run in demo_runs(pretrain_branches, finetune_epochs):
        cfg = _config(run, out, [f"optim.epochs={epochs}", *(overrides or [])])
        n = cfg.optim.epochs
        summary = train_or_reuse(cfg, f"{run.label}: {run.model}, {n} epoch{'s' if n != 1 else ''}", console, fresh)
        config = build_model_config(cfg.model, "cls")  # as trained, overrides included
        counts = complexity(config, "actual")
        seconds = summary["train_time_s"]
        results.append(DemoResult(
            key=run.key, label=run.label, model=run.model, resolutions="/".join(map(str, config.resolutions)),
            init="branch weights" if run.branch_weights_from else "scratch", params=counts.params,
            macs=counts.macs, epochs=cfg.optim.epochs, train_time_s=seconds,
            images_per_s=summary["images_seen"] / seconds, top1=summary["eval"]["top1"],
            top5=summary["eval"]["top5"], out_dir=cfg.run.out_dir))
    _report(results, out, console)
    return results


def _markdown(results: list[DemoResult]) -> str:
    lines = ["| model | resolutions | init | params | MACs / image | epochs | train time | images/s | top-1 (%) |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r.label} | {r.resolutions} | {r.init} | {r.params / 1e6:.2f} M | {r.macs / 1e6:.1f} M | "
                     f"{r.epochs} | {r.train_time_s / 60:.1f} min | {r.images_per_s:.0f} | {r.top1:.2f} |")
    return "\n".join(lines) + "\n"


def _report(results: list[DemoResult], out: Path, console: Console) -> None:
    table = Table(title="Fashion-MNIST, official 10k test split (trained on this machine)")
    for column in ("model", "resolutions", "init", "params (M)", "MACs (M)", "epochs", "train (min)",
                   "images/s", "top-1 (%)"):
        table.add_column(column, justify="left" if column in ("model", "init") else "right")
    for r in results:
        table.add_row(r.label, r.resolutions, r.init, f"{r.params / 1e6:.2f}", f"{r.macs / 1e6:.1f}",
                      str(r.epochs), f"{r.train_time_s / 60:.1f}", f"{r.images_per_s:.0f}", f"{r.top1:.2f}")
    console.print(table)
    by_key = {r.key: r for r in results}
    piip, base = by_key["piip_scratch"], by_key["vit_b"]
    console.print(f"PIIP-TSB uses {piip.macs / base.macs:.2f}x the MACs of ViT-B and scores "
                  f"{piip.top1 - base.top1:+.2f} points top-1 against it.")
    (out / "results.json").write_text(json.dumps([asdict(r) for r in results], indent=2))
    (out / "results.md").write_text(_markdown(results))
    plot = plot_accuracy_vs_macs(results, out / "accuracy_vs_macs.png")
    console.print(f"results: {out / 'results.json'}, {out / 'results.md'}; plot: {plot}")


def plot_accuracy_vs_macs(results: list[DemoResult], path: str | Path) -> Path:
    """Scatter of top-1 against MACs per image: single-branch ViTs joined by a line, PIIP marked."""
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError("the plot needs matplotlib: pip install 'piip[plot]'") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    vits = sorted((r for r in results if r.model.startswith("vit_")), key=lambda r: r.macs)
    piips = [r for r in results if r.model.startswith("piip_")]
    ax.plot([r.macs / 1e6 for r in vits], [r.top1 for r in vits], "o-", color="tab:gray",
            label="single-branch ViT @28")
    for r, marker in zip(piips, ("*", "P")):
        ax.plot(r.macs / 1e6, r.top1, marker, markersize=14, linestyle="none", label=r.label)
    for r in results:
        ax.annotate(f"{r.label.split(' (')[0]} {r.top1:.1f}%", (r.macs / 1e6, r.top1),
                    textcoords="offset points", xytext=(8, 6), fontsize=8)
    ax.set_xlabel("MACs per image (M)")
    ax.set_ylabel("top-1 on the 10k test split (%)")
    ax.set_title("Fashion-MNIST: accuracy against compute")
    ax.margins(x=0.2, y=0.25)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
