"""Side-by-side benchmarks: forward latency, peak memory and achieved MACs/s of a backbone, or
(``train=True``) one optimiser step of the whole model around it: a detector for dense backbones
(``detector``: any registered kind, Mask R-CNN by default), the classifier itself (cross-entropy)
for ``task="cls"``; with ``detector`` and no ``train``, one inference of the whole detector.

Each model is measured in a fresh subprocess, so peak memory is that model's alone: on CPU it is the
process's peak resident set during the measured passes (Linux ``VmHWM``, reset just before) minus
the resident set before the model was built, i.e. weights plus activations (``peak_memory_mb``),
and the same peak minus the resident set just before the passes, i.e. what the passes add to the
weights and inputs (``activation_memory_mb``; for a training step this includes the gradients and
the optimiser state); on CUDA both come from ``torch.cuda.max_memory_allocated``.

The CPU allocator decides much of both the speed and the resident set, so the subprocess starts
with one of two glibc settings:

* ``tune_malloc=True`` (speed, the default), :data:`CPU_MALLOC_TUNING`: keep freed memory. By
  default every block over 32 MiB is a fresh ``mmap`` whose pages fault in again on each forward,
  which costs PIIP (many large short-lived maps: the stride-4 pyramid, the merge) ~25% of its
  latency on a 2-core VM and ViT-B ~13%. It is the usual CPU-inference setting (as are
  jemalloc/tcmalloc); export the same variables to get the same speed in your own process.
* ``tune_malloc=False`` (memory), :data:`CPU_MALLOC_EXACT`: every block over 128 KiB is its own
  mapping, returned at ``free``, so the resident set follows the live tensors instead of whatever
  the heap happens to retain, and memory figures repeat from run to run.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import statistics
import time
from dataclasses import asdict, dataclass

import torch

from .. import precision
from ..models.factory import create_model
from ..tasks.detection import build_detector
from ..tasks.detection.model import detector_kind
from .actual_flops import actual_complexity

__all__ = ["BenchResult", "benchmark", "measure", "compare", "time_forward"]

#: glibc malloc settings read at process start: no mmap for large blocks, no trimming.
CPU_MALLOC_TUNING = {
    "MALLOC_MMAP_THRESHOLD_": str(4 << 30),
    "MALLOC_TRIM_THRESHOLD_": str(64 << 30),
    "MALLOC_TOP_PAD_": str(512 << 20),
}

#: glibc malloc settings for memory measurements: large blocks are mapped alone and unmapped at free.
CPU_MALLOC_EXACT = {"MALLOC_MMAP_THRESHOLD_": str(128 << 10)}


@dataclass(frozen=True)
class BenchResult:
    name: str
    resolutions: str
    dtype: str
    batch: int
    input_size: tuple[int, int]
    params: int
    macs: int
    latency_ms: float
    latencies_ms: tuple[float, ...]
    peak_memory_mb: float
    device: str
    activation_memory_mb: float = 0.0
    malloc_tuned: bool = False
    mode: str = "forward"  # or "train": one AdamW step of the whole model (see module doc)
    detector: str | None = None  # the detector kind around a dense backbone, when one was measured
    compiled: bool = False  # the backbone ran under torch.compile (the compilation itself is not timed)
    output: torch.Tensor | None = None  # the stride-16 map (det) or the logits (cls), float32


    @property
    def macs_per_s(self) -> float:
        return self.macs * self.batch / (self.latency_ms / 1e3)

    def to_dict(self) -> dict:
        data = {k: v for k, v in asdict(self).items() if k != "output"}
        return {**data, "macs_per_s": self.macs_per_s}


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def time_forward(model: torch.nn.Module, images: torch.Tensor, *, repeat: int = 3, warmup: int = 1,
                 autocast=None) -> tuple[list[float], object]:
    """Wall-clock milliseconds of ``repeat`` forward passes after ``warmup`` ones (inference mode),
    and the last output."""
    last = []

    def forward() -> None:
        last[:] = [model(images)]
    with torch.inference_mode(), autocast or torch.autocast("cpu", enabled=False):
        latencies = _time_steps(forward, repeat, warmup, images.is_cuda)
    return latencies, last[0]


def _time_steps(step, repeat: int, warmup: int, on_cuda: bool) -> list[float]:
    """Wall-clock milliseconds of ``repeat`` calls of ``step`` after ``warmup`` untimed ones."""
    latencies = []
    for index in range(warmup + repeat):
        if on_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if on_cuda:
            torch.cuda.synchronize()
        if index >= warmup:
            latencies.append((time.perf_counter() - start) * 1e3)
    return latencies


def _detection_batch(size: tuple[int, int], batch: int, device: str) -> tuple[list, list]:
    """``batch`` random images with ten boxes and masks each, 80 classes."""
    images = [torch.rand(3, *size, device=device) for _ in range(batch)]
    targets = []
    for _ in range(batch):
        xy = torch.rand(10, 2, device=device) * torch.tensor([size[1] * 0.7, size[0] * 0.7], device=device)
        wh = 32 + torch.rand(10, 2, device=device) * 200
        boxes = torch.cat([xy, xy + wh], dim=1)
        masks = torch.zeros(10, *size, dtype=torch.uint8, device=device)
        for m, (x1, y1, x2, y2) in zip(masks, boxes.long().tolist()):
            m[y1:y2, x1:x2] = 1
        targets.append({"boxes": boxes, "labels": torch.randint(1, 81, (10,), device=device), "masks": masks})
    return images, targets


def _detector(name: str, overrides: dict, dtype: str, kind: str, device: str):
    """A detector of ``kind`` (80 classes) around variant ``name``, the backbone under ``dtype``
    autocast and the heads in fp32, and the authors' detection image size ``S x S*800//1333``."""
    backbone = create_model(name, **{**overrides, "task": "det"})
    model = build_detector(backbone, 80, kind=kind, backbone_dtype=dtype).to(device)
    finest = backbone.config.input_size
    return model, backbone, (finest * 800 // 1333, finest)


def _training_step(name: str, overrides: dict, dtype: str, batch: int, device: str, kind: str):
    """The model to train, its backbone, the input size and a closure returning the step's loss.

    Dense backbones get a detector of ``kind`` (:func:`_detector`) on random images with ten boxes
    and masks each; a classifier is trained with cross-entropy on random square images at its input
    size.
    """

    if overrides.get("task", "det") == "cls":
        model = create_model(name, **overrides).to(device).train()
        size = (model.config.input_size,) * 2
        images = torch.randn(batch, model.branches[0].patch_embed.proj.in_channels, *size, device=device)
        labels = torch.randint(0, model.config.num_classes, (batch,), device=device)
        autocast = precision.autocast(device.split(":")[0], precision.autocast_dtype(dtype))

        def loss():
            with autocast:
                logits = model(images)
            return torch.nn.functional.cross_entropy(logits.float(), labels)
        return model, model, size, loss

    model, backbone, size = _detector(name, overrides, dtype, kind, device)
    model.train()
    images, targets = _detection_batch(size, batch, device)
    return model, backbone, size, lambda: sum(model(images, targets).values())


def _measure(name: str, overrides: dict, dtype: str, batch: int, repeat: int, warmup: int,
             device: str, threads: int | None, train: bool = False, detector: str | None = None,
             compile: bool = False) -> dict:
    torch.manual_seed(0)  # same weights and images in every process: outputs are comparable

    if threads:
        torch.set_num_threads(threads)
    on_cuda = device.startswith("cuda")
    rss_before = 0 if on_cuda else _rss_kb("VmRSS") / 1024
    if train:
        model, backbone, size, loss_fn = _training_step(name, overrides, dtype, batch, device,
                                                        detector or "mask_rcnn")
        config = backbone.config
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def run() -> None:
            loss = loss_fn()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        out = None
    elif detector is not None:  # one inference of the whole detector, as evaluation runs it
        model, backbone, size = _detector(name, overrides, dtype, detector, device)
        model.eval()
        config = backbone.config
        images = [torch.rand(3, *size, device=device) for _ in range(batch)]

        def run() -> None:
            with torch.inference_mode():
                model(images)
        out = None
    else:
        model = create_model(name, **overrides).eval().to(device)
        config = model.config
        size = (config.input_size, config.input_size)
        images = torch.randn(batch, 3, *size, device=device)
        autocast = precision.autocast(device.split(":")[0], precision.autocast_dtype(dtype))
        backbone = model
    if compile:  # in place, so the detector around it runs the compiled forward; warm-up compiles
        backbone.compile()
        warmup = max(warmup, 1)
    if on_cuda:
        torch.cuda.reset_peak_memory_stats()
        rss_passes = torch.cuda.memory_allocated() / 2**20
    else:
        rss_passes = _rss_kb("VmRSS") / 1024
        _reset_peak_rss()
    if train or detector is not None:
        latencies = _time_steps(run, repeat, warmup, on_cuda)
    else:
        latencies, out = time_forward(model, images, repeat=repeat, warmup=warmup, autocast=autocast)
    peak = torch.cuda.max_memory_allocated() / 2**20 if on_cuda else _rss_kb("VmHWM") / 1024
    complexity = actual_complexity(config, size)
    if out is not None:
        out = (out["2"] if isinstance(out, dict) else out).float().cpu().clone()
    return asdict(BenchResult(
        name=name, resolutions="/".join(map(str, config.resolutions)), dtype=dtype, batch=batch,
        input_size=size, params=complexity.params, macs=complexity.macs,
        latency_ms=statistics.median(latencies), latencies_ms=tuple(latencies),
        peak_memory_mb=peak - rss_before, activation_memory_mb=peak - rss_passes, device=device,
        mode="train" if train else "forward", detector=(detector or "mask_rcnn") if train and config.task == "det"
        else detector, compiled=compile, output=out))


def _check_request(dtype: str, batch: int, repeat: int, warmup: int, detector: str | None,
                   overrides: dict) -> None:
    """Refuse a request before any work: an unknown dtype or detector, counts out of range."""
    precision.autocast_dtype(dtype)
    if batch < 1 or repeat < 1 or warmup < 0:
        raise ValueError("batch and repeat must be >= 1 and warmup >= 0")
    if detector is not None:
        detector_kind(detector, "detector")
        if overrides.get("task", "det") != "det":
            raise ValueError(f"a detector needs a dense backbone (task 'det'), got task {overrides['task']!r}")


def _result(data: dict) -> BenchResult:
    data["input_size"] = tuple(data["input_size"])
    data["latencies_ms"] = tuple(data["latencies_ms"])
    return BenchResult(**data)


def measure(name: str, *, dtype: str = "fp32", batch: int = 1, repeat: int = 3, warmup: int = 1,
            device: str = "cpu", train: bool = False, detector: str | None = None, compile: bool = False,
            **overrides) -> BenchResult:
    """:func:`benchmark` in this process: what a GPU measurement wants (``torch.cuda`` counts the
    peak by itself, and one process saves a CUDA start per model). On CPU the peak memory is this
    process's resident peak, which earlier work in the process inflates: prefer :func:`benchmark`."""
    _check_request(dtype, batch, repeat, warmup, detector, overrides)
    return _result(_measure(name, overrides, dtype, batch, repeat, warmup, device, None, train, detector, compile))


def benchmark(name: str, *, dtype: str = "fp32", batch: int = 1, repeat: int = 3, warmup: int = 1,
              device: str = "cpu", threads: int | None = None, tune_malloc: bool = True, train: bool = False,
              detector: str | None = None, compile: bool = False,
              **overrides) -> BenchResult:
    """Measure variant ``name`` (with ``create_model`` overrides) in a fresh subprocess.

    ``tune_malloc``: on CPU, start the subprocess with :data:`CPU_MALLOC_TUNING` (speed) or, when
    False, :data:`CPU_MALLOC_EXACT` (memory); see the module doc.
    ``train``: time one optimiser step of the whole model instead of a forward pass (a detector
    around a dense backbone, the classifier itself with ``task="cls"``); MACs stay the backbone's
    forward.
    ``detector``: the detector kind (:data:`~piip.tasks.detection.DETECTOR_KINDS`) trained, or
    without ``train`` run whole in evaluation mode (default: Mask R-CNN for a training step, the
    backbone alone for a forward).
    ``compile``: run the backbone under ``torch.compile`` (compiled in the warm-up, which is then
    at least one pass: the compilation is not timed).
    """
    _check_request(dtype, batch, repeat, warmup, detector, overrides)
    on_cpu = not device.startswith("cuda")
    environment = (CPU_MALLOC_TUNING if tune_malloc else CPU_MALLOC_EXACT) if on_cpu else {}
    ctx = mp.get_context("spawn")
    keys = set(CPU_MALLOC_TUNING) | set(CPU_MALLOC_EXACT)
    saved = {key: os.environ.get(key) for key in keys}
    try:
        for key in keys:  # a spawned child starts with the parent's environment
            os.environ.pop(key, None)
        os.environ.update(environment)
        with ctx.Pool(1) as pool:
            data = pool.apply(_measure, (name, overrides, dtype, batch, repeat, warmup, device, threads, train,
                                         detector, compile))
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    data["malloc_tuned"] = environment is CPU_MALLOC_TUNING
    return _result(data)


def compare(model: BenchResult, baseline: BenchResult) -> dict[str, float]:
    """Ratios model / baseline (latency, MACs, peak memory, achieved MACs/s); when both ran the same
    network (e.g. bf16 against fp32), also the relative L2 error of the model's output."""
    ratios = {
        "latency": model.latency_ms / baseline.latency_ms,
        "speedup": baseline.latency_ms / model.latency_ms,
        "macs": model.macs / baseline.macs,
        "peak_memory": model.peak_memory_mb / baseline.peak_memory_mb,
        "activation_memory": model.activation_memory_mb / baseline.activation_memory_mb,
        "macs_per_s": model.macs_per_s / baseline.macs_per_s,
    }
    if (model.output is not None and baseline.output is not None
            and model.output.shape == baseline.output.shape and model.name == baseline.name):
        ratios["output_rel_error"] = float(
            (model.output - baseline.output).norm() / baseline.output.norm().clamp_min(1e-12))
    return ratios
