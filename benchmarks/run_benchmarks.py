"""Produce the README's performance table: PIIP against its baseline, measured side by side.

Runs (each model in a fresh subprocess, forward only, batch 1, no grad):
  1. PIIP-TSB 1120/896/448 vs ViT-B 1024 (fp32): latency ratio and achieved MACs/s;
  2. PIIP-TSB bf16 autocast vs fp32: speed-up and output error (at --bf16-resolutions);
  3. PIIP-TSB 1568/1120/672 vs ViT-B 1024 (fp32): peak memory.
Latency cases run with the CPU allocator tuning of piip.analysis.bench (both sides alike); the memory
case runs with glibc's defaults so retained free memory does not count.
Prints a markdown table and writes it with the raw JSON to ``--out`` (default benchmarks/results).

    python benchmarks/run_benchmarks.py [--repeat 3] [--device cpu]
"""
from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

from piip.analysis import complexity
from piip.analysis.bench import benchmark, compare
from piip.models.registry import get_config

BF16_RESOLUTIONS = "448/352/224"  # see --bf16-resolutions

CASES = [
    # (label, model, model overrides, model dtype, baseline, baseline overrides, baseline dtype, target)
    ("latency: PIIP-TSB 1120/896/448 vs ViT-B 1024", "piip_tsb", {"resolutions": "1120/896/448"}, "fp32",
     "vitdet_base", {}, "fp32", "latency ratio <= 0.60; MACs/s ratio >= 0.8"),
    ("bf16 autocast vs fp32: PIIP-TSB", "piip_tsb", {"resolutions": BF16_RESOLUTIONS}, "bf16",
     "piip_tsb", {"resolutions": BF16_RESOLUTIONS}, "fp32", "speed-up >= 1.5x, rel. error < 2e-2"),
    ("memory: PIIP-TSB 1568/1120/672 vs ViT-B 1024", "piip_tsb", {"resolutions": "1568/1120/672"}, "fp32",
     "vitdet_base", {}, "fp32", "peak memory ratio <= 1.0"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--bf16-resolutions", default=BF16_RESOLUTIONS,
                        help="resolutions of the bf16 comparison: CPUs without AVX512-bf16/AMX emulate "
                             "bf16 matmuls (about 100x slower than fp32), so the default is small; "
                             "use 1120/896/448 on a GPU or a bf16-capable CPU")
    args = parser.parse_args()
    common = dict(repeat=args.repeat, warmup=args.warmup, device=args.device)

    paper_ratio = (complexity(get_config("piip_tsb")).macs / complexity(get_config("vitdet_base")).macs)
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    lines = [f"Measured on: {machine}, device {args.device}, median of {args.repeat} (after {args.warmup} warm-up).",
             "", "| comparison | model | baseline | latency ratio | speed-up | MACs ratio (actual) | "
             "MACs/s ratio | peak-memory ratio | output rel. error | target |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    raw = []
    for label, name, overrides, dtype, base_name, base_overrides, base_dtype, target in CASES:
        if dtype == "bf16":
            overrides = base_overrides = {"resolutions": args.bf16_resolutions}
        # retained free heap would count as resident memory: measure memory with default malloc
        tune = not label.startswith("memory")
        print(f"running: {label}", flush=True)
        model = benchmark(name, dtype=dtype, tune_malloc=tune, **common, **overrides)
        base = benchmark(base_name, dtype=base_dtype, tune_malloc=tune, **common, **base_overrides)
        r = compare(model, base)
        describe = lambda b: (f"{b.name} {b.resolutions} {b.dtype}: {b.latency_ms / 1e3:.2f} s, "  # noqa: E731
                              f"{b.macs / 1e9:.0f} GMACs, {b.peak_memory_mb:.0f} MiB"
                              f"{', malloc tuned' if b.malloc_tuned else ''}")
        error = f"{r['output_rel_error']:.2e}" if "output_rel_error" in r else "-"
        lines.append(f"| {label} | {describe(model)} | {describe(base)} | {r['latency']:.3f} | "
                     f"{r['speedup']:.2f}x | {r['macs']:.3f} | {r['macs_per_s']:.3f} | {r['peak_memory']:.3f} | "
                     f"{error} | {target} |")
        raw.append({"comparison": label, "model": model.to_dict(), "baseline": base.to_dict(), "ratios": r})
    lines += ["", f"Paper-convention MACs ratio PIIP-TSB 1120/896/448 / ViT-B 1024: {paper_ratio:.3f}."]
    table = "\n".join(lines)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps(raw, indent=2))


if __name__ == "__main__":
    main()
