"""Produce the README's performance table: PIIP against its baselines, measured side by side.

Every comparison runs each model in a fresh subprocess (``piip.analysis.bench``), ``--runs`` times,
and reports the median ratio with its spread (min-max) over the runs:

  latency     PIIP-TSB 1120/896/448 vs ViT-B 1024, fp32 forward: latency and achieved MACs/s
  memory      the same pair, forward peak memory (exact allocator accounting)
  train-det   the same pair, one Mask R-CNN training step: time (and train-det-memory: its memory)
  train-tiny  tiny PIIP-TSB vs tiny ViT-B (Fashion-MNIST models), one training step at batch 128
  bf16        PIIP-TSB bf16 autocast vs fp32: speed-up and output error
  memory-1568 PIIP-TSB 1568/1120/672 vs ViT-B 1024, forward peak memory
  authors     the authors' backbone code vs piip on the same weights (their harness, when present:
              ``--authors-harness`` or ``$PIIP_AUTHORS_HARNESS``, default ../shared/peers/authors-piip)

Timed cases run with the CPU allocator tuning of piip.analysis.bench (both sides alike), memory
cases with exact allocator accounting. Prints a markdown table and writes it with the raw JSON to
``--out`` (default benchmarks/results); ``--only`` re-measures the named cases and keeps the other
cases' last results from there.

    python benchmarks/run_benchmarks.py [--runs 3] [--only latency,memory] [--device cpu]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from piip.analysis import complexity
from piip.analysis.bench import benchmark, compare
from piip.models.registry import get_config

BF16_RESOLUTIONS = "448/352/224"  # see --bf16-resolutions
TSB = {"resolutions": "1120/896/448"}
DEFAULT_HARNESS = Path(__file__).resolve().parents[2] / "shared" / "peers" / "authors-piip"


@dataclass(frozen=True)
class Case:
    key: str
    label: str
    model: str
    baseline: str
    ratios: tuple[tuple[str, str], ...]  # (ratio name in compare(), column label)
    target: str
    model_overrides: dict = field(default_factory=dict)
    baseline_overrides: dict = field(default_factory=dict)
    dtype: str = "fp32"
    baseline_dtype: str = "fp32"
    settings: dict = field(default_factory=dict)  # benchmark() keywords shared by both sides
    max_runs: int | None = None  # cases kept from earlier issues: one run is enough


CASES = [
    Case("latency", "latency: PIIP-TSB 1120/896/448 vs ViT-B 1024 (fp32 forward)", "piip_tsb", "vitdet_base",
         (("latency", "latency"), ("macs", "MACs"), ("macs_per_s", "MACs/s")),
         "latency <= 0.72; MACs/s >= 0.97", TSB),
    Case("memory", "memory: PIIP-TSB 1120/896/448 vs ViT-B 1024 (fp32 forward)", "piip_tsb", "vitdet_base",
         (("activation_memory", "memory beyond weights"), ("peak_memory", "peak memory with weights")),
         "memory <= 1.25", TSB, settings={"tune_malloc": False}),
    Case("train-det", "training: Mask R-CNN step, PIIP-TSB 1120/896/448 vs ViT-B 1024 (fp32, batch 1)",
         "piip_tsb", "vitdet_base", (("latency", "step time"),), "reported", TSB,
         settings={"train": True, "repeat": 2}),
    Case("train-det-memory", "training memory: Mask R-CNN step, PIIP-TSB 1120/896/448 vs ViT-B 1024",
         "piip_tsb", "vitdet_base",
         (("peak_memory", "peak memory with weights"), ("activation_memory", "memory beyond weights")),
         "reported", TSB, settings={"train": True, "tune_malloc": False, "repeat": 1, "warmup": 0}, max_runs=1),
    Case("train-tiny", "training: tiny PIIP-TSB vs tiny ViT-B (Fashion-MNIST, fp32, batch 128)",
         "piip_fmnist_tsb", "vit_fmnist_b", (("speedup", "speed-up"), ("macs", "MACs")),
         "speed-up >= 0.8 x 1/MACs", {"task": "cls"}, {"task": "cls"},
         settings={"train": True, "batch": 128, "repeat": 10, "warmup": 3}),
    Case("bf16", "bf16 autocast vs fp32: PIIP-TSB", "piip_tsb", "piip_tsb",
         (("speedup", "speed-up"), ("output_rel_error", "output rel. error")),
         "speed-up >= 1.5x, error < 2e-2", dtype="bf16", max_runs=1),
    Case("memory-1568", "memory: PIIP-TSB 1568/1120/672 vs ViT-B 1024 (fp32 forward)", "piip_tsb", "vitdet_base",
         (("activation_memory", "memory beyond weights"), ("peak_memory", "peak memory with weights")),
         "peak memory <= 1.0", {"resolutions": "1568/1120/672"}, settings={"tune_malloc": False}, max_runs=1),
]


def spread(values: list[float]) -> str:
    """Median, and min-max when there is more than one value."""
    med = statistics.median(values)
    digits = 2 if med >= 10 else 3
    if len(values) == 1:
        return f"{med:.{digits}f}"
    return f"{med:.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def describe(b) -> str:
    seconds = statistics.median(b.latencies_ms) / 1e3
    return (f"{b.name} {b.resolutions} {b.dtype}: {seconds:.2f} s, {b.macs / 1e9:.3g} GMACs, "
            f"{b.peak_memory_mb:.0f} MiB ({b.activation_memory_mb:.0f} beyond weights)")


def run_case(case: Case, runs: int, common: dict, bf16_resolutions: str) -> tuple[list[str], list[dict]]:
    model_overrides, baseline_overrides = case.model_overrides, case.baseline_overrides
    if case.key == "bf16":
        model_overrides = baseline_overrides = {"resolutions": bf16_resolutions}
    settings = {**common, **case.settings}
    raw, measured = [], {name: [] for name, _ in case.ratios}
    runs = min(runs, case.max_runs or runs)
    for run in range(runs):
        print(f"running: {case.label} ({run + 1}/{runs})", flush=True)
        model = benchmark(case.model, dtype=case.dtype, **settings, **model_overrides)
        base = benchmark(case.baseline, dtype=case.baseline_dtype, **settings, **baseline_overrides)
        ratios = compare(model, base)
        for name, _ in case.ratios:
            measured[name].append(ratios[name])
        raw.append({"comparison": case.label, "model": model.to_dict(), "baseline": base.to_dict(),
                    "ratios": ratios})
    cells = "; ".join(f"{label} {spread(measured[name])}" for name, label in case.ratios)
    return [f"| {case.label} | {describe(model)} | {describe(base)} | {cells} | {case.target} |"], raw


def find_harness(explicit: str | None) -> Path | None:
    for candidate in (explicit, os.environ.get("PIIP_AUTHORS_HARNESS"), DEFAULT_HARNESS):
        if candidate and (Path(candidate) / "sidebyside.py").is_file():
            return Path(candidate)
    if explicit:
        raise SystemExit(f"--authors-harness {explicit}: no sidebyside.py there")
    return None


def run_authors(harness: Path, runs: int) -> tuple[list[str], list[dict]]:
    """The authors' harness, ``runs`` times: theirs / ours on PIIP-TSB 1120 and ViT-B 1024."""
    raw, ratios, memory = [], {}, {}
    for run in range(runs):
        print(f"running: the authors' harness ({run + 1}/{runs})", flush=True)
        proc = subprocess.run([sys.executable, str(harness / "sidebyside.py"), "--json"],
                              capture_output=True, text=True, check=True)
        report = json.loads(proc.stdout)
        raw.append(report)
        for res in report["results"]:
            ratios.setdefault(res["name"], []).append(res["ratio_theirs_over_ours"])
            memory[res["name"]] = res
    lines = []
    for name, values in ratios.items():
        res = memory[name]
        mem = {side: res[side].get("memory", {}).get("forward_delta_mb") for side in ("theirs", "ours")}
        lines.append(
            f"| the authors' code vs piip: {name} @ {res['size']} (fp32 forward, same weights) | "
            f"piip: {res['ours']['median_s']:.2f} s, forward +{mem['ours']} MiB | "
            f"authors: {res['theirs']['median_s']:.2f} s, forward +{mem['theirs']} MiB | "
            f"authors / piip {spread(values)}; max rel. L2 of outputs {res['max_rel_l2']:.1e} | "
            f"{'>= 1.5x' if name == 'piip_tsb' else 'reported'} |")
    return lines, raw


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="independent runs of every comparison")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--only", help="comma-separated case keys: " + ", ".join(
        [c.key for c in CASES] + ["authors"]))
    parser.add_argument("--authors-harness", help="folder of the authors' harness (sidebyside.py)")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--bf16-resolutions", default=BF16_RESOLUTIONS,
                        help="resolutions of the bf16 comparison: CPUs without native bf16 matmuls emulate "
                             "them (tens of times slower than fp32), so the default is small; use "
                             "1120/896/448 on a GPU")
    args = parser.parse_args()
    keys = [c.key for c in CASES] + ["authors"]
    only = args.only.split(",") if args.only else keys
    unknown = sorted(set(only) - set(keys))
    if unknown:
        parser.error(f"--only: unknown case(s) {unknown}; choose from {keys}")
    common = dict(repeat=args.repeat, warmup=args.warmup, device=args.device)

    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    out = Path(args.out)
    stored = out / "results.json"
    results = json.loads(stored.read_text()) if stored.is_file() and args.only else {}
    for case in CASES:
        if case.key in only:
            lines, raw = run_case(case, args.runs, common, args.bf16_resolutions)
            results[case.key] = {"machine": machine, "lines": lines, "raw": raw}
    if "authors" in only:
        harness = find_harness(args.authors_harness)
        if harness is None:
            lines, raw = ["| the authors' code vs piip | - | - | harness not found (--authors-harness) | >= 1.5x |"], []
        else:
            lines, raw = run_authors(harness, args.runs)
        results["authors"] = {"machine": machine, "lines": lines, "raw": raw}
    paper_ratio = complexity(get_config("piip_tsb")).macs / complexity(get_config("vitdet_base")).macs
    table = [f"Measured on: {machine}, device {args.device}; every ratio is model / baseline, the median of "
             f"the runs (min-max), each run the median of its passes; `results.json` has every run.", "",
             "| comparison | model (last run) | baseline (last run) | ratios | target |", "|---|---|---|---|---|"]
    table += [line for key in keys if key in results for line in results[key]["lines"]]
    table += ["", f"Paper-convention MACs ratio PIIP-TSB 1120/896/448 / ViT-B 1024: {paper_ratio:.3f}."]
    text = "\n".join(table)
    print(text)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(text + "\n")
    stored.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
