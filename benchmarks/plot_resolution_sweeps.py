"""Plot the Appendix B resolution sweeps: piip's paper-convention MACs against the published ones.

    python benchmarks/plot_resolution_sweeps.py [--out benchmarks/results/macs_vs_resolution.png]
"""
from __future__ import annotations

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from piip.analysis import complexity  # noqa: E402
from piip.analysis.paper_tables import APPENDIX_B_SWEEPS  # noqa: E402
from piip.models.registry import get_config  # noqa: E402

BASELINES = ("vitdet_base", "vitdet_large")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/macs_vs_resolution.png")
    args = parser.parse_args()

    fig, ax = plt.subplots(figsize=(8, 5))
    for (name, rows), color in zip(APPENDIX_B_SWEEPS.items(), ("tab:blue", "tab:orange", "tab:green")):
        finest = [int(res.split("/")[0]) for res, _ in rows]
        ours = [complexity(get_config(name, resolutions=res)).macs / 1e9 for res, _ in rows]
        ax.plot(finest, ours, "o", color=color, markerfacecolor="none", markersize=8,
                label=f"{name} (piip, paper convention)")
        ax.plot(finest, [g for _, g in rows], "x", color=color, markersize=9, label=f"{name} (published)")
    for name, style in zip(BASELINES, ("--", ":")):
        ax.axhline(complexity(get_config(name)).macs / 1e9, color="gray", linestyle=style, label=f"{name} @1024")
    ax.set_xlabel("finest-branch resolution (px)")
    ax.set_ylabel("GMACs (backbone, batch 1)")
    ax.set_title("PIIP resolution sweeps (Appendix B): MACs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
