"""The prepared GPU check: everything piip wants to know from a GPU machine, in one call of under
six minutes on one GPU.

1. ``environment``: torch, CUDA device, Triton, and whether the deformable attention runs its
   Triton kernel (``piip.ops.ms_deform_attn_triton``).
2. ``tests``: the suite's tests marked ``gpu`` (``pytest -m gpu``), their pass/fail counts.
3. ``kernel``: the Triton kernel against the pure-PyTorch op (``ms_deform_attn_reference``) at every
   distinct interaction shape of PIIP-TSB 1120/896/448 (captured from the model itself), float32 and
   bfloat16: output and gradient errors, forward and forward+backward times, the kernel's speed-up.
4. ``models``: PIIP-TSB 1120/896/448 against ViTDet-B 1024 (the paper's detection pair): backbone
   forward and one whole Mask R-CNN training step (AdamW), bf16 autocast, batch 2, with
   ``torch.compile`` off and on: images/s and peak memory (``torch.cuda.max_memory_allocated``).
   The compiled cases come last; a case that would start past ``--budget-s`` is recorded as skipped.

Results: ``gpu_check.json`` and ``gpu_check.md`` (the Markdown tables for the README) in ``--out``.

``--dry`` runs every step's code on this machine's CPU with small shapes (PIIP-TSB 128/96/64,
ViTDet-B 128, fp32, batch 1, one pass, no compile, no pytest): the suite runs it, so the script is
known to work before a GPU is lent. Its numbers mean nothing; the kernel step runs the Triton kernel
under Triton's interpreter (when Triton is installed) on one shape cut to 16 queries.

Usage::

    python benchmarks/gpu_check.py [--out benchmarks/results/gpu] [--budget-s 330] [--dry]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Setting:
    """The sizes of a check: the real ones on a GPU, small ones for the dry run."""

    device: str
    dtype: str  # the models' autocast
    piip_resolutions: str
    vit_resolution: str
    batch: int
    repeat: int
    warmup: int
    compile: bool
    run_tests: bool
    kernel_shapes: int | None  # how many of the captured shapes the kernel step measures (None: all)
    kernel_queries: int | None  # their queries cut to this many (None: as captured)
    timed_runs: float  # seconds of runs per kernel timing (0: one timed call)


GPU = Setting("cuda", "bf16", "1120/896/448", "1024", batch=2, repeat=5, warmup=2, compile=True, run_tests=True,
              kernel_shapes=None, kernel_queries=None, timed_runs=0.2)
# fp32: bf16 is emulated on AVX2-only CPUs (~20x slower); the interpreter runs the kernel on 16 queries
DRY = Setting("cpu", "fp32", "128/96/64", "128", batch=1, repeat=1, warmup=0, compile=False, run_tests=False,
              kernel_shapes=1, kernel_queries=16, timed_runs=0.0)


class Budget:
    """Wall-clock seconds left of the check's allowance."""

    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()


# -- 1. environment -------------------------------------------------------------------------------
def environment(setting: Setting) -> dict:
    from piip.ops.ms_deform_attn_triton import triton_unavailable_reason

    info = {"torch": torch.__version__, "python": platform.python_version(), "device": setting.device,
            "cpu": platform.processor() or platform.machine()}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if setting.device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
        reason = triton_unavailable_reason()
        info["msda_kernel"] = "triton" if reason is None else f"pure PyTorch ({reason})"
    else:
        info["msda_kernel"] = "pure PyTorch (CPU)"
    return info


# -- 2. the tests marked gpu ----------------------------------------------------------------------
def gpu_tests(timeout_s: float) -> dict:
    """``pytest -m gpu`` in a subprocess: its counts, and the tail of its output when it failed."""
    command = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", str(ROOT / "tests")]
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"status": f"timed out after {timeout_s:.0f} s"}
    counts = {key: int(n) for n, key in re.findall(r"(\d+) (passed|failed|skipped|error|deselected)",
                                                   done.stdout.splitlines()[-1] if done.stdout else "")}
    result = {"status": "ok" if done.returncode == 0 else f"exit {done.returncode}", **counts}
    if done.returncode != 0:
        result["output_tail"] = (done.stdout + done.stderr)[-3000:]
    return result


# -- 3. the kernel against the pure op ------------------------------------------------------------
def interaction_shapes(resolutions: str, device: str) -> list[dict]:
    """The distinct calls of the deformable attention op in one PIIP-TSB forward at ``resolutions``:
    batch, queries, heads, channels per head, value maps, points (read from the op's own calls)."""
    import piip
    from torch.utils._python_dispatch import TorchDispatchMode

    seen: dict[tuple, dict] = {}

    class RecordCalls(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.piip.ms_deform_attn.default:
                value, flat_shapes, locations = args[:3]
                n, lq, m, _, points, _ = locations.shape
                maps = tuple(zip(flat_shapes[0::2], flat_shapes[1::2]))
                key = (n, lq, m, value.shape[-1], maps, points)
                seen.setdefault(key, dict(zip(("batch", "queries", "heads", "channels", "value_maps", "points"), key)))
            return func(*args, **(kwargs or {}))

    model = piip.create_model("piip_tsb", task="det", resolutions=resolutions).eval().to(device)
    size = model.config.input_size
    with torch.inference_mode(), RecordCalls():
        model(torch.randn(1, 3, size, size, device=device))
    return list(seen.values())


def _inputs(shape: dict, dtype: torch.dtype, device: str, seed: int = 0):
    """Value, locations (a tenth of them outside the maps, where the op reads zeros) and softmaxed
    weights of one interaction shape."""
    generator = torch.Generator(device=device).manual_seed(seed)
    n, lq, m, d = shape["batch"], shape["queries"], shape["heads"], shape["channels"]
    levels, points = len(shape["value_maps"]), shape["points"]
    tokens = sum(h * w for h, w in shape["value_maps"])
    value = torch.randn(n, tokens, m, d, device=device, generator=generator)
    locations = torch.rand(n, lq, m, levels, points, 2, device=device, generator=generator) * 1.2 - 0.1
    weights = torch.randn(n, lq, m, levels, points, device=device, generator=generator)
    weights = weights.flatten(-2).softmax(-1).view_as(weights)
    return [t.to(dtype) for t in (value, locations, weights)]


def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _milliseconds(fn, device: str, min_run_time: float) -> float:
    """Median milliseconds of ``fn`` over ``min_run_time`` seconds of runs after a warm-up
    (``torch.utils.benchmark`` synchronises CUDA around them); ``min_run_time=0``: one timed call."""
    from torch.utils.benchmark import Timer

    if min_run_time <= 0:
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    fn()  # warm-up: Triton compiles its kernel on the first call
    if device == "cuda":
        torch.cuda.synchronize()
    return Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time).median * 1e3


def kernel_check(shapes: list[dict], device: str, min_run_time: float) -> list[dict]:
    """Per shape and dtype: errors of the kernel's output and gradients against the pure op fed
    the same (float32-upcast) inputs, and both sides' times."""
    from piip.ops import ms_deform_attn_reference
    from piip.ops.ms_deform_attn_triton import ms_deform_attn_triton, ms_deform_attn_triton_backward

    rows = []
    for shape in shapes:
        maps = [tuple(hw) for hw in shape["value_maps"]]
        for dtype in (torch.float32, torch.bfloat16):
            value, locations, weights = _inputs(shape, dtype, device)
            grad_out = torch.randn(shape["batch"], shape["queries"], shape["heads"] * shape["channels"],
                                   device=device).to(dtype)
            exact = [t.detach().float().clone().requires_grad_() for t in (value, locations, weights)]
            reference = ms_deform_attn_reference(exact[0], maps, exact[1], exact[2])
            reference.backward(grad_out.float())
            out = ms_deform_attn_triton(value, maps, locations, weights)
            grads = ms_deform_attn_triton_backward(grad_out, value, maps, locations, weights)
            row = {"shape": _shape_label(shape), "dtype": str(dtype).removeprefix("torch."),
                   "output_rel_l2": _rel_l2(out, reference)}
            for name, grad, ref in zip(("value", "locations", "weights"), grads, exact):
                row[f"grad_{name}_rel_l2"] = _rel_l2(grad, ref.grad)

            def kernel_fwd():
                ms_deform_attn_triton(value, maps, locations, weights)

            def kernel_fwd_bwd():
                ms_deform_attn_triton(value, maps, locations, weights)
                ms_deform_attn_triton_backward(grad_out, value, maps, locations, weights)

            leaves = [t.detach().requires_grad_() for t in (value, locations, weights)]

            def pure_fwd():
                with torch.no_grad():
                    ms_deform_attn_reference(value, maps, locations, weights)

            def pure_fwd_bwd():
                ms_deform_attn_reference(leaves[0], maps, leaves[1], leaves[2]).backward(grad_out)

            row["kernel_fwd_ms"] = _milliseconds(kernel_fwd, device, min_run_time)
            row["pure_fwd_ms"] = _milliseconds(pure_fwd, device, min_run_time)
            row["kernel_fwd_bwd_ms"] = _milliseconds(kernel_fwd_bwd, device, min_run_time)
            row["pure_fwd_bwd_ms"] = _milliseconds(pure_fwd_bwd, device, min_run_time)
            row["fwd_speedup"] = row["pure_fwd_ms"] / row["kernel_fwd_ms"]
            row["fwd_bwd_speedup"] = row["pure_fwd_bwd_ms"] / row["kernel_fwd_bwd_ms"]
            rows.append(row)
    return rows


def _shape_label(shape: dict) -> str:
    maps = "+".join(f"{h}x{w}" for h, w in shape["value_maps"])
    return (f"N{shape['batch']} Lq{shape['queries']} M{shape['heads']} D{shape['channels']} "
            f"maps {maps} P{shape['points']}")


# -- 4. PIIP-TSB against ViTDet-B -----------------------------------------------------------------
def model_cases(setting: Setting) -> list[dict]:
    """The measured cases in their order: uncompiled first, so a short budget keeps the baseline pairs."""
    pair = [("PIIP-TSB " + setting.piip_resolutions, "piip_tsb", setting.piip_resolutions),
            ("ViTDet-B " + setting.vit_resolution, "vitdet_base", setting.vit_resolution)]
    cases = []
    for compiled in ((False, True) if setting.compile else (False,)):
        for train in (False, True):
            for label, name, resolutions in pair:
                cases.append({"model": label, "name": name, "resolutions": resolutions, "train": train,
                              "compile": compiled})
    return cases


def measure_models(setting: Setting, budget: Budget, reserve_s: float) -> list[dict]:
    """Each case of :func:`model_cases` in this process, unless fewer than ``reserve_s`` seconds of
    the budget are left when it would start (then ``skipped``). A failing case records its error
    and the check goes on."""
    from piip.analysis.bench import measure

    rows = []
    for case in model_cases(setting):
        row = {"model": case["model"], "pass": "train step (Mask R-CNN)" if case["train"] else "backbone forward",
               "compile": case["compile"], "batch": setting.batch}
        if budget.left() < reserve_s:
            rows.append({**row, "skipped": f"budget: {budget.left():.0f} s left"})
            continue
        start = time.monotonic()
        try:
            result = measure(case["name"], dtype=setting.dtype, batch=setting.batch, repeat=setting.repeat,
                             warmup=setting.warmup, device=setting.device, train=case["train"],
                             compile=case["compile"], task="det", resolutions=case["resolutions"])
        except Exception as err:  # one failing case must not lose the others' numbers
            rows.append({**row, "error": f"{type(err).__name__}: {str(err)[:300]}"})
            continue
        finally:
            if setting.device == "cuda":
                torch.cuda.empty_cache()
        rows.append({**row, "latency_ms": result.latency_ms, "images_per_s": setting.batch * 1e3 / result.latency_ms,
                     "peak_memory_mib": result.peak_memory_mb, "input_size": list(result.input_size),
                     "case_wall_s": time.monotonic() - start})
    return rows


# -- report -----------------------------------------------------------------------------------------
def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [f"GPU check on {env.get('gpu', env['device'])}, torch {env['torch']}, Triton {env['triton']}, "
             f"deformable attention: {env['msda_kernel']}" + (" (DRY RUN: small shapes on CPU)" if report["dry"] else ""),
             ""]
    tests = report["tests"]
    lines += [f"Tests marked gpu: {', '.join(f'{k} {v}' for k, v in tests.items() if k != 'output_tail')}", ""]
    if report["kernel"]:
        lines += ["| deformable attention shape | dtype | output rel. L2 | grad rel. L2 (value / loc / weight) "
                  "| fwd ms kernel / pure | fwd+bwd ms kernel / pure | speed-up fwd, fwd+bwd |",
                  "|---|---|---|---|---|---|---|"]
        for r in report["kernel"]:
            lines.append(f"| {r['shape']} | {r['dtype']} | {r['output_rel_l2']:.1e} | "
                         f"{r['grad_value_rel_l2']:.1e} / {r['grad_locations_rel_l2']:.1e} / {r['grad_weights_rel_l2']:.1e} | "
                         f"{r['kernel_fwd_ms']:.3f} / {r['pure_fwd_ms']:.3f} | "
                         f"{r['kernel_fwd_bwd_ms']:.3f} / {r['pure_fwd_bwd_ms']:.3f} | "
                         f"{r['fwd_speedup']:.2f}x, {r['fwd_bwd_speedup']:.2f}x |")
        lines.append("")
    lines += ["| model | pass | torch.compile | batch | images/s | peak memory (MiB) |", "|---|---|---|---|---|---|"]
    for r in report["models"]:
        if "latency_ms" in r:
            numbers = f"{r['images_per_s']:.2f} | {r['peak_memory_mib']:,.0f}"
        else:
            numbers = f"{r.get('skipped') or r.get('error')} | -"
        lines.append(f"| {r['model']} | {r['pass']} | {'on' if r['compile'] else 'off'} | {r['batch']} | {numbers} |")
    return "\n".join(lines) + "\n"


def run(dry: bool, out: Path, budget_s: float) -> dict:
    """The whole check; writes ``gpu_check.json`` and ``gpu_check.md`` into ``out`` and returns the report."""
    setting = DRY if dry else GPU
    if setting.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device here; run with --dry to check the script on this CPU")
    budget = Budget(budget_s)
    started = time.monotonic()
    report = {"dry": dry, "environment": environment(setting)}
    report["tests"] = gpu_tests(timeout_s=min(120.0, budget.left() / 3)) if setting.run_tests else {"status": "not run (dry)"}
    shapes = interaction_shapes(setting.piip_resolutions, setting.device)[:setting.kernel_shapes]
    if setting.kernel_queries is not None:
        shapes = [{**shape, "queries": min(shape["queries"], setting.kernel_queries)} for shape in shapes]
    if setting.device == "cuda" or report["environment"]["triton"] is not None:
        if setting.device == "cpu":  # the kernel under Triton's interpreter: the dry run's only way to it
            os.environ["TRITON_INTERPRET"] = "1"
        report["kernel"] = kernel_check(shapes, setting.device, setting.timed_runs)
    else:
        report["kernel"] = []
    report["models"] = measure_models(setting, budget, reserve_s=60.0 if not dry else -math.inf)
    report["wall_s"] = time.monotonic() - started
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    (out / "gpu_check.md").write_text(markdown(report))
    return report


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu")
    parser.add_argument("--budget-s", type=float, default=330.0,
                        help="seconds the check may take; cases that would start later are skipped")
    parser.add_argument("--dry", action="store_true", help="small shapes on this CPU: check the script itself")
    args = parser.parse_args(argv)
    report = run(args.dry, args.out, args.budget_s)
    print(markdown(report))
    print(f"written: {args.out / 'gpu_check.json'}, {args.out / 'gpu_check.md'} ({report['wall_s']:.0f} s)")
    return report


if __name__ == "__main__":
    main()
