"""ONNX export of a PIIP backbone: file size, export time, and onnxruntime's latency against PyTorch's.

1. ``piip.export_onnx`` of the variant (default PIIP-TSB, ``task="det"``: the feature pyramid, at
   1120x1120, random weights: the speed does not depend on them): file size, export time (tracing,
   translation, writing) and the check's relative L2 error on the export input.
2. Latency, batch 1, fp32, on the CPU, at ``torch.get_num_threads()`` threads for both: PyTorch eager
   (``inference_mode``, the dense layers on the route the process setting picks, as the builders
   do) and onnxruntime (CPU provider, all graph optimisations) on the same input, alternating run by
   run (ABBA) after ``--warmup`` untimed runs each, so that a neighbour's load and the order slow both
   alike. Prints each one's median (min-max) of ``--runs``, the ratio onnxruntime / PyTorch of the
   medians, and the largest relative L2 difference between their outputs on that input.

The process runs with ``piip.analysis.bench.CPU_MALLOC_TUNING`` (it re-executes itself with it), as
the README's benchmarks do.

    PYTHONPATH=src python benchmarks/onnx_export.py [--variant piip_tsb] [--task det] [--size 1120]
        [--runs 10] [--warmup 2] [--opset 18] [--out FILE.onnx] [--json]

A quick run on small models: ``--variant piip_fmnist_tsb --size 64 --runs 3``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

from piip import create_model, export_onnx
from piip.analysis.bench import CPU_MALLOC_TUNING
from piip.ops import Linear


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def rel_l2(got: np.ndarray, want: np.ndarray) -> float:
    got, want = got.astype(np.float64), want.astype(np.float64)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def measure(variant: str, task: str, size: tuple[int, int], runs: int, warmup: int, opset: int, out: str) -> dict:
    import onnxruntime

    model = create_model(variant, task=task).eval()
    result = export_onnx(model, out, size=size, opset=opset, check=True)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = onnxruntime.InferenceSession(out, options, providers=["CPUExecutionProvider"])
    images = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(1))
    feed = {"images": images.numpy()}

    def run_torch():
        with torch.inference_mode():
            out = model(images)
        return [t.numpy() for t in (out.values() if isinstance(out, dict) else [out])]

    def run_onnx():
        return session.run(None, feed)

    routes = {"pytorch": run_torch, "onnxruntime": run_onnx}
    outputs = {}
    for name, route in routes.items():
        for _ in range(warmup):
            outputs[name] = route()
    seconds: dict[str, list[float]] = {name: [] for name in routes}
    for i in range(runs):
        for name in (("pytorch", "onnxruntime") if i % 2 == 0 else ("onnxruntime", "pytorch")):
            start = time.perf_counter()
            outputs[name] = routes[name]()
            seconds[name].append(time.perf_counter() - start)
    latency = {name: spread([s * 1e3 for s in values]) for name, values in seconds.items()}
    return {
        "variant": variant, "task": task, "input": [1, 3, *size], "opset": opset, "file": out,
        "file_bytes": result.file_bytes, "export_seconds": result.export_seconds,
        "check": [c.describe() for c in result.checks], "check_passed": result.check_passed,
        "threads": torch.get_num_threads(),
        "dense_layers": "oneDNN" if any(type(m) is Linear for m in model.modules()) else "F.linear",
        "torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "runs": runs, "warmup": warmup,
        "latency_ms": latency,
        "ratio_onnxruntime_over_pytorch": latency["onnxruntime"]["median"] / latency["pytorch"]["median"],
        "max_rel_l2": max(rel_l2(o, t) for o, t in zip(outputs["onnxruntime"], outputs["pytorch"])),
    }


def report(record: dict) -> None:
    def ms(name: str) -> str:
        r = record["latency_ms"][name]
        return f"{r['median']:.1f} ms ({r['min']:.1f}-{r['max']:.1f})"

    print(f"{record['variant']} ({record['task']}), input {'x'.join(map(str, record['input']))}, opset "
          f"{record['opset']}, {record['threads']} threads, torch {record['torch']}, onnxruntime "
          f"{record['onnxruntime']}")
    print(f"  file:    {record['file_bytes'] / 2**20:.1f} MiB ({record['file']})")
    print(f"  export:  {record['export_seconds']:.1f} s")
    print(f"  check:   {'; '.join(record['check'])}")
    print(f"  latency, median (min-max) of {record['runs']} alternating runs after {record['warmup']} warm-up:")
    print(f"    PyTorch eager ({record['dense_layers']} dense layers): {ms('pytorch')}")
    print(f"    onnxruntime (CPU):  {ms('onnxruntime')}")
    print(f"    onnxruntime / PyTorch: {record['ratio_onnxruntime_over_pytorch']:.3f}")
    print(f"  max relative L2 difference of the outputs: {record['max_rel_l2']:.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="piip_tsb")
    parser.add_argument("--task", choices=("det", "cls"), default="det")
    parser.add_argument("--size", type=int, nargs="+", default=[1120], metavar="S",
                        help="input size: S (square) or H W")
    parser.add_argument("--runs", type=int, default=10, help="timed runs of each route")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs of each route first")
    parser.add_argument("--opset", type=int, default=18)
    parser.add_argument("--out", help="the .onnx file (default: a temporary one, removed afterwards)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    if len(args.size) not in (1, 2):
        parser.error("--size takes S or H W")
    if any(os.environ.get(key) != value for key, value in CPU_MALLOC_TUNING.items()):
        # glibc reads these at start-up only
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **CPU_MALLOC_TUNING})
    size = (args.size[0], args.size[-1])
    with tempfile.TemporaryDirectory() as folder:
        out = args.out or os.path.join(folder, f"{args.variant}_{args.task}.onnx")
        record = measure(args.variant, args.task, size, args.runs, args.warmup, args.opset, out)
    if args.json:
        print(json.dumps(record))
    else:
        report(record)


if __name__ == "__main__":
    main()
