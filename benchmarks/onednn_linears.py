"""F.linear (MKL) against oneDNN for piip's dense layers on this CPU, both routes in one process.

1. The probe behind the automatic setting of ``PIIP_ONEDNN_LINEARS``
   (``piip.ops.linear.time_linear_routes``), ``--probes`` times: each run's two medians and
   speed-up, how long it took, and the decision it implies.
2. A whole model's forward (default: PIIP-TSB det at 448/352/224, batch 1, fp32, inference mode):
   one instance, switched between the routes with ``use_onednn_linears``, the routes alternating
   pass by pass (ABBA) so that a neighbour's load and the order slow both alike. Prints each route's median latency
   with its min-max and the median (min-max) of the ratio oneDNN / F.linear over the adjacent pairs.

The process runs with ``piip.analysis.bench.CPU_MALLOC_TUNING`` (it re-executes itself with it), as
the README's benchmarks do, and ``torch.get_num_threads()`` threads.

    PYTHONPATH=src python benchmarks/onednn_linears.py [--model piip_tsb] [--resolutions 448/352/224]
        [--runs 5] [--probes 5]
"""
from __future__ import annotations

import argparse
import importlib
import os
import statistics
import sys
import time

import torch

from piip import create_model
from piip.analysis.bench import CPU_MALLOC_TUNING
from piip.ops import use_onednn_linears

# ``piip.ops.linear`` is also the name of the function that ``piip.ops`` exports
linear_module = importlib.import_module("piip.ops.linear")


def cpu_description() -> str:
    with open("/proc/cpuinfo") as f:
        lines = f.read().splitlines()
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
    vector = [flag for flag in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if flag in flags] or ["no avx2"]
    return f"{model} ({' '.join(vector)}), {torch.get_num_threads()} threads, torch {torch.__version__}"


def spread(values: list[float], scale: float = 1.0, digits: int = 3) -> str:
    return (f"{statistics.median(values) * scale:.{digits}f} "
            f"({min(values) * scale:.{digits}f}-{max(values) * scale:.{digits}f})")


def measure_probe(probes: int) -> None:
    speedups = []
    print(f"probe: a ViT-B MLP ({linear_module.PROBE_WIDTH} -> {linear_module.PROBE_HIDDEN} -> "
          f"{linear_module.PROBE_WIDTH}) over {linear_module.PROBE_TOKENS} tokens, fp32 forward, "
          f"{linear_module.PROBE_REPEATS} timed forwards per route")
    for run in range(probes):
        start = time.perf_counter()
        f_linear_s, onednn_s = linear_module.time_linear_routes()
        took = time.perf_counter() - start
        speedups.append(f_linear_s / onednn_s)
        print(f"  run {run + 1}: F.linear {f_linear_s * 1e3:.1f} ms, oneDNN {onednn_s * 1e3:.1f} ms, "
              f"speed-up {speedups[-1]:.3f}, probe took {took * 1e3:.0f} ms")
    chosen = sum(speedup >= linear_module.MIN_SPEEDUP for speedup in speedups)
    print(f"  speed-up median (min-max): {spread(speedups)}; oneDNN chosen in {chosen} of {probes} runs "
          f"(needs >= {linear_module.MIN_SPEEDUP:.2f})")


def measure_model(name: str, resolutions: str, runs: int) -> None:
    model = create_model(name, resolutions=resolutions, task="det").eval()
    size = int(resolutions.split("/")[0])
    images = torch.randn(1, 3, size, size)
    seconds = {True: [], False: []}
    with torch.inference_mode():
        for enabled in (True, False):  # warm-up: the allocator's pools and oneDNN's primitives
            use_onednn_linears(model, enabled)
            model(images)
        for run in range(runs):
            for enabled in ((True, False) if run % 2 else (False, True)):  # neither always goes first
                use_onednn_linears(model, enabled)
                start = time.perf_counter()
                model(images)
                seconds[enabled].append(time.perf_counter() - start)
    ratios = [on / off for on, off in zip(seconds[True], seconds[False])]
    print(f"model: {name} det {resolutions}, batch 1, fp32 forward, {runs} alternating pairs")
    print(f"  F.linear: {spread(seconds[False], 1, 2)} s")
    print(f"  oneDNN:   {spread(seconds[True], 1, 2)} s")
    print(f"  latency oneDNN / F.linear, per pair: {spread(ratios)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="piip_tsb")
    parser.add_argument("--resolutions", default="448/352/224")
    parser.add_argument("--runs", type=int, default=5, help="alternating pairs of model forwards")
    parser.add_argument("--probes", type=int, default=5, help="runs of the automatic setting's probe")
    args = parser.parse_args()
    if any(os.environ.get(key) != value for key, value in CPU_MALLOC_TUNING.items()):
        # glibc reads these at start-up only
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **CPU_MALLOC_TUNING})
    print(cpu_description())
    measure_probe(args.probes)
    measure_model(args.model, args.resolutions, args.runs)


if __name__ == "__main__":
    main()
