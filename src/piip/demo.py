"""``piip demo``: PIIP against its single-branch baselines on this machine.

Prints parameters and MACs in both conventions and a measured forward latency (one pass, batch 1,
fp32, at the default resolutions; ``piip bench`` measures properly, with warm-up and repeats) for
PIIP-TSB, -SBL and -TSBL and ViT-B / ViT-L, then plots the paper-convention MACs of the Appendix B resolution sweeps
next to the published figures and the baselines.
"""
from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from .analysis import complexity
from .analysis.paper_tables import APPENDIX_B_SWEEPS
from .models.registry import get_config

__all__ = ["run_demo"]

DEMO_MODELS = ("piip_tsb", "piip_sbl", "piip_tsbl", "vitdet_base", "vitdet_large")


def _plot(path: Path, baselines: dict[str, float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for (name, rows), color in zip(APPENDIX_B_SWEEPS.items(), ("tab:blue", "tab:orange", "tab:green")):
        finest = [int(res.split("/")[0]) for res, _ in rows]
        ours = [complexity(get_config(name, resolutions=res)).macs / 1e9 for res, _ in rows]
        ax.plot(finest, ours, "o", color=color, markerfacecolor="none", markersize=8,
                label=f"{name} (piip, paper convention)")
        ax.plot(finest, [g for _, g in rows], "x", color=color, markersize=9, label=f"{name} (published)")
    for (name, macs), style in zip(baselines.items(), ("--", ":")):
        ax.axhline(macs / 1e9, color="gray", linestyle=style, label=f"{name} @1024")
    ax.set_xlabel("finest-branch resolution (px)")
    ax.set_ylabel("GMACs (backbone, batch 1)")
    ax.set_title("PIIP resolution sweeps (Appendix B): MACs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_demo(out_dir: str | Path = "outputs/demo", measure_latency: bool = True,
             console: Console | None = None) -> list[dict]:
    import torch

    from .analysis.bench import time_forward
    from .models.piip import PIIP

    console = console or Console()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("measuring", total=len(DEMO_MODELS))
        for name in DEMO_MODELS:
            progress.update(task, description=f"{name}: counting")
            config = get_config(name)
            paper = complexity(config, "paper")
            actual = complexity(config, "actual")
            row = {"name": name, "resolutions": "/".join(map(str, config.resolutions)),
                   "paper_params": paper.params, "paper_macs": paper.macs,
                   "actual_params": actual.params, "actual_macs": actual.macs, "latency_ms": None}
            if measure_latency:
                progress.update(task, description=f"{name}: timing a forward pass")
                model = PIIP(config).eval()
                images = torch.randn(1, 3, config.input_size, config.input_size)
                row["latency_ms"] = time_forward(model, images, repeat=1, warmup=0)[0][0]
                del model
            rows.append(row)
            progress.advance(task)

    table = Table(title="PIIP vs single-branch baselines (detection backbones, batch 1, fp32)")
    for column in ("model", "resolutions", "params M paper | actual", "GMACs paper | actual",
                   "latency (s)"):
        table.add_column(column, justify="right")
    for r in rows:
        latency = f"{r['latency_ms'] / 1e3:.1f}" if r["latency_ms"] else "-"
        table.add_row(r["name"], r["resolutions"],
                      f"{r['paper_params'] / 1e6:.1f} | {r['actual_params'] / 1e6:.1f}",
                      f"{r['paper_macs'] / 1e9:.1f} | {r['actual_macs'] / 1e9:.1f}", latency)
    console.print(table)

    plot = out / "macs_vs_resolution.png"
    _plot(plot, {r["name"]: r["paper_macs"] for r in rows if r["name"].startswith("vitdet")})
    (out / "summary.json").write_text(json.dumps(rows, indent=2))
    console.print(f"plot: {plot}\nsummary: {out / 'summary.json'}")
    return rows
