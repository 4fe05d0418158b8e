"""Per-GPU memory of training a model with each distributed strategy: ``piip plan``.

:func:`plan_memory` answers "does PIIP-H6B (or PIIP-SBL, ...) fit N GPUs of M GB?" for the three
ways a run can spread over the GPUs (the strategy names are data here: :data:`STRATEGIES`):

* ``ddp``: every rank holds the fp32 weights, their fp32 gradients, AdamW's two fp32 moments, and
  DDP's gradient buckets (a second fp32 copy of the gradients: ``DistributedDataParallel``'s default
  ``gradient_as_bucket_view=False``; none on one GPU);
* ``zero1``: as ddp, but ``ZeroRedundancyOptimizer`` keeps each rank's 1/N of the AdamW moments;
* ``fsdp``: FSDP2 ``fully_shard`` of every branch block and every interaction, and of the root
  (everything else), bf16 mixed precision: the fp32 weights, their gradients and the moments are
  sharded (1/N each); on top, the bf16 parameters all-gathered for compute: the root's (FSDP2 keeps
  the root gathered through forward and backward) and the two largest units in flight (the one
  computing and the one prefetched), and in the backward the unsharded bf16 gradients of the root
  and of one unit.

Bytes per parameter (P all parameters, T the trainable ones, N GPUs)::

                 weights   gradients   AdamW moments   DDP buckets   working copies
    ddp          4 P       4 T         8 T             4 T           2 B x autocast-cast params
    zero1        4 P       4 T         8 T / N         4 T           2 B x autocast-cast params
    fsdp         4 P / N   4 T / N     8 T / N         -             2 B x (root + 2 units) + 2 B x (root + 1 unit)

No separate fp32 master weights are counted: in piip the parameters stay fp32 and bf16 autocast casts
them on the fly, so the fp32 parameters *are* the master weights (4 B/param under ddp and zero1). The
casts are real memory, counted as "working copies": autocast caches the bf16 copy of every weight it
casts until the backbone's autocast region ends, and without checkpointing autograd keeps it for the
backward, 2 B per cast parameter (the backbone's linear and convolution weights: the set is read
off the autograd graph of a bf16 forward). Under fsdp the gathered parameters already are bf16.

**The peak** is the largest of three phases, each holding the weights, the moments and the buckets:
the forward (+ the working copies + the saved activations; the gradients are None, as the engine
sets them after each step, unless it accumulates micro-batches), the backward (+ all gradients + all
saved activations at once, an upper bound, + with checkpointing the activations of the one unit
being recomputed) and the AdamW step (+ all gradients + ``foreach``'s temporary, the size of the
largest parameter group). The total adds the **allowance**: :data:`ALLOWANCE_FIXED_GB` (CUDA
context, cuBLAS and NCCL workspaces) plus :data:`ALLOWANCE_FRACTION` of the peak (the caching
allocator's fragmentation, the backward's temporaries). A "GB" is 10^9 bytes (an "80 GB" card holds
85.9 * 10^9).

**Activations are measured, not estimated.** The model the recipe trains (the whole detector,
segmenter or classifier, heads and losses included, built by the task as ``piip train`` builds it)
runs its training forward on CPU on random images and targets, while
``torch.autograd.graph.saved_tensors_hooks`` records every tensor autograd keeps for the backward,
deduplicated by storage, parameters and autocast copies of parameters left out, counted if still
alive when the forward ends: what the backward will read (the backward itself is not needed for
that, so it is not run). Checkpointing (``run.grad_checkpointing``) is measured the same way: the
hooks see the inputs each checkpoint keeps. A detection target has as many objects as the box head
samples positives (128), so the box and mask heads run at their cap whatever the random proposals
(the worst case, identical in every measurement); DINO gets :data:`OBJECTS_PER_IMAGE`.

The network measured is the recipe's with fewer blocks, so that a 6B-wide branch fits and runs in
seconds on CPU: every branch keeps its width, heads, window layout and resolution ratio, but has ``d``
blocks, one per interaction group, and ``d`` interactions: ``d = 1`` at three small input sizes of
the recipe's orientation and ``d = 2`` (the weights shared) at the first. Each saved tensor is
attributed to what was running: a block of branch ``k``, an interaction, the rest of the backbone
(patch embedding, merge, feature pyramid) or the rest of the model (neck, heads, losses). Per image:

* a block keeps ``c N + c_pad (N_pad - N)`` bytes (``N`` its branch's tokens, ``N_pad`` after window
  padding; ``N`` in a global block): least squares over both depths, without intercept, summed over
  the recipe's real blocks at its input size (linear in depth);
* an interaction keeps ``a + b * sum_k N_k`` bytes, times the recipe's interactions; with
  checkpointing, the backward also holds the largest block's or interaction unit's activations once
  (from the fit without checkpointing);
* the rest of the backbone, and the rest of the model, keep ``a + b * H * W`` bytes each.

The largest misfit over the measurements is reported. The whole model is measured in float32: bf16
convolutions take a slow path on an AVX2 CPU (the feature pyramid's deconvolutions alone: 6x the
float32 time and more). A backbone under bf16 autocast is then accounted for by per-category ratios
of bf16 bytes to float32 bytes, measured on the backbone alone, at both depths (the ratio of what
the second depth adds), at its smallest input (global attention there, as a window would be mostly
padding): e.g. 0.56 for an uncheckpointed DeiT block, 1.0 for a checkpointed one (its input is the
fp32 residual stream). The neck and heads run in float32 in every shipped recipe.

Per GPU the activations are the per-image bytes times the batch per GPU (the recipe's global batch
over the GPUs and its accumulation steps, rounded up). The training input is the largest a batch of
the recipe can have: detection ``(S * 800 // 1333, S)`` (single scale) or ``(int(800 S / 1024), S)``
(the multi-scale crop), padded to the detector's size divisor; large-scale jitter ``S x S``;
segmentation the crop; classification the input size.
"""
from __future__ import annotations

import dataclasses
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef

from ..config.model import PIIPConfig
from ..engine.config import CONFIG_DIR, MODEL_OVERRIDES, TrainConfig, list_configs, load_config, resolve_config_path
from ..engine.optim import build_optimizer
from ..engine.task import get_task_class
from ..models.piip import PIIP
from ..models.registry import list_models, resolve_name
from ..precision import autocast, autocast_dtype

__all__ = ["STRATEGIES", "ALLOWANCE_FRACTION", "ALLOWANCE_FIXED_GB", "GB", "StrategyMemory", "Measurement",
           "ActivationModel", "MemoryPlan", "plan_memory", "strategy_memory", "recipes_for", "measure_activations"]

#: the distributed strategies planned, in the table's order
STRATEGIES = ("ddp", "zero1", "fsdp")
#: bytes in a GB (decimal, as GPU memory is sold)
GB = 1e9
#: the allowance: this fraction of the peak ...
ALLOWANCE_FRACTION = 0.10
#: ... plus this many GB (CUDA context, cuBLAS and NCCL workspaces)
ALLOWANCE_FIXED_GB = 1.0
#: FSDP units holding gathered parameters at once: the one computing and the one prefetched
UNITS_IN_FLIGHT = 2
#: the order in which a variant's shipped recipes are preferred (by the recipe's kind of model)
RECIPE_ORDER = ("mask_rcnn", "cascade_mask_rcnn", "dino", "upernet", "cls")
#: classes of the stand-in data a model is built for, by dataset (COCO 80, ADE20K 150, ...)
DATASET_CLASSES = {"coco": 80, "ade20k": 150, "fashion_mnist": 10, "imagefolder": 1000}
#: objects per image in the stand-in detection targets (DINO); an R-CNN gets as many as its box head
#: samples positives (25% of ``box_batch_size_per_image``: 128), so its mask and box heads run at
#: their cap, whatever the random proposals: the worst case, and the same in every measurement
OBJECTS_PER_IMAGE = 10
#: the reduced depths measured
DEPTHS = (1, 2)


# -- arithmetic ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StrategyMemory:
    """One strategy's bytes per GPU: what it holds (the table's rows) and its peak.

    ``working`` is the larger of the forward's and the backward's working copies; ``activations``
    the saved activations plus, with checkpointing, one recomputed unit's. ``total`` is the largest
    of the three phases' peaks (``forward_peak``, ``backward_peak``, ``step_peak``) plus the
    ``allowance``, so it is not the sum of the rows when the gradients and the forward's working
    copies never coexist."""

    strategy: str
    weights: int
    gradients: int
    optimizer: int
    buckets: int
    working: int
    activations: int
    optimizer_step_temp: int
    forward_peak: int
    backward_peak: int
    step_peak: int
    allowance: int
    total: int
    capacity: int

    @property
    def fits(self) -> bool:
        return self.total <= self.capacity

    @property
    def without_allowance(self) -> int:
        """The peak of the three phases."""
        return self.total - self.allowance

    @property
    def peak_phase(self) -> str:
        peaks = {"forward": self.forward_peak, "backward": self.backward_peak, "optimiser step": self.step_peak}
        return max(peaks, key=peaks.get)

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "fits": self.fits, "peak_phase": self.peak_phase}


def strategy_memory(strategy: str, *, params: int, trainable: int | None = None, gpus: int = 8,
                    activations: int = 0, recompute: int = 0, checkpointing: bool = False, cast_params: int = 0,
                    root_params: int = 0, unit_params: int = 0, largest_group: int = 0, buffers: int = 0,
                    accumulating: bool = False, amp: str = "bf16", gpu_memory_gb: float = 80.0) -> StrategyMemory:
    """Bytes per GPU of training with ``strategy`` (see the module doc for the rules).

    Phases (each holds the weights, the AdamW moments and the DDP buckets):

    * forward: + the forward's working copies + the saved activations (no gradients: the engine sets
      them to None after each step, unless it is ``accumulating`` micro-batches);
    * backward: + all gradients + all saved activations at once (an upper bound: the backward frees
      the activations as the gradients appear) + one recomputed unit (``recompute``) + the
      backward's working copies;
    * optimiser step: + all gradients + AdamW's ``foreach`` temporary (its largest group).

    Args:
        params, trainable: all parameters and those that train (default: all).
        activations: saved activation bytes per GPU (measured: :class:`ActivationModel`).
        recompute: bytes of the largest checkpointed unit's activations per GPU (checkpointing).
        checkpointing: activation checkpointing; without it autograd keeps the autocast copies for
            the backward, with it they live only through the forward (and one unit's recast in the
            backward).
        cast_params: parameters autocast casts (their 2-byte copies: ddp and zero1).
        root_params, unit_params: fsdp's root unit and largest block / interaction unit.
        largest_group: parameters of AdamW's largest parameter group (its step temporary).
        buffers: bytes of the model's buffers (replicated by every strategy).
        amp: the backbone's autocast, ``"bf16"`` (2-byte copies, fsdp gathers in bf16) or ``"fp32"``
            (no copies, fsdp gathers 4-byte parameters).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if gpus < 1:
        raise ValueError(f"gpus must be >= 1, got {gpus}")
    trainable = params if trainable is None else trainable
    low = 2 if amp != "fp32" else 4  # bytes of a working (gathered or cast) parameter

    def shard(n: float) -> int:
        return math.ceil(n / gpus)
    if strategy == "fsdp":
        weights, gradients, optimizer, buckets = shard(4 * params), shard(4 * trainable), shard(8 * trainable), 0
        gathered = low * (root_params + UNITS_IN_FLIGHT * unit_params)
        working_fwd, working_bwd = gathered, gathered + low * (root_params + unit_params)  # + unsharded grads
        step_temp = shard(4 * largest_group)
    else:
        weights, gradients = 4 * params, 4 * trainable
        optimizer = 8 * trainable if strategy == "ddp" else shard(8 * trainable)
        buckets = 4 * trainable if gpus > 1 else 0
        copies = low * cast_params if amp != "fp32" else 0
        recast = low * unit_params if amp != "fp32" else 0
        working_fwd, working_bwd = copies, (recast if checkpointing else copies)
        step_temp = 4 * largest_group if strategy == "ddp" else shard(4 * largest_group)
    weights += buffers
    resident = weights + optimizer + buckets
    forward = resident + working_fwd + activations + (gradients if accumulating else 0)
    backward = resident + gradients + activations + recompute + working_bwd
    step = resident + gradients + step_temp
    peak = max(forward, backward, step)
    allowance = int(ALLOWANCE_FIXED_GB * GB + ALLOWANCE_FRACTION * peak)
    return StrategyMemory(strategy, int(weights), int(gradients), int(optimizer), int(buckets),
                          int(max(working_fwd, working_bwd)), int(activations + recompute), int(step_temp),
                          int(forward), int(backward), int(step), allowance, int(peak + allowance),
                          int(gpu_memory_gb * GB))


# -- choosing what to measure -------------------------------------------------------------------------

def _recipe_kind(cfg: TrainConfig) -> str:
    if cfg.task == "det":
        return (cfg.model.head or {}).get("kind", "mask_rcnn")
    return {"seg": "upernet", "cls": "cls"}.get(cfg.task, cfg.task)


def recipes_for(variant: str, task: str) -> list[str]:
    """The shipped recipes that train ``variant`` for ``task``, in :data:`RECIPE_ORDER` (by the kind
    of model: Mask R-CNN, Cascade Mask R-CNN, DINO, UperNet, classifier), then by name."""
    name = resolve_name(variant)
    found = []
    for recipe in list_configs():
        cfg = load_config(recipe)
        if cfg.task != task or not cfg.model.name:
            continue
        try:
            if resolve_name(cfg.model.name) != name:
                continue
        except ValueError:
            continue
        kind = _recipe_kind(cfg)
        found.append((RECIPE_ORDER.index(kind) if kind in RECIPE_ORDER else len(RECIPE_ORDER), recipe))
    return [recipe for _, recipe in sorted(found)]


def _resolve_source(source: str, task: str | None) -> tuple[TrainConfig, str | None, str]:
    """The run config to plan, the recipe's name (``None``: the task's default model around a
    variant) and a sentence saying which."""
    if not isinstance(source, str) or not source.strip():
        raise ValueError(f"source must be a variant or a recipe, got {source!r}")
    if task is not None and task not in ("det", "seg", "cls"):
        raise ValueError(f"task must be 'det', 'seg' or 'cls', got {task!r}")
    is_variant = source.lower() in list_models(include_aliases=True)
    if not is_variant:
        try:
            path = resolve_config_path(source)
        except (FileNotFoundError, ValueError):
            if source.endswith((".json", ".yaml", ".yml")) or "/" in source:
                raise ValueError(f"recipe file {source!r} does not exist") from None
            try:
                resolve_name(source)  # the closest variant names
            except ValueError as err:
                raise ValueError(f"{err}; nor is it a recipe file or a shipped recipe "
                                 f"({', '.join(list_configs())})") from None
            raise
        cfg = load_config(path)
        if task is not None and task != cfg.task:
            raise ValueError(f"the recipe {source!r} trains task {cfg.task!r}, not {task!r}")
        label = path.stem if path.parent == CONFIG_DIR else str(path)
        return cfg, label, f"recipe {label}"
    task = task or "det"
    recipes = recipes_for(source, task)
    if recipes:
        others = f" (also shipped: {', '.join(recipes[1:])})" if len(recipes) > 1 else ""
        return load_config(recipes[0]), recipes[0], (
            f"recipe {recipes[0]} (the first shipped {task} recipe for {resolve_name(source)}, in the order "
            f"{' > '.join(RECIPE_ORDER)}){others}")
    cfg = load_config(None, [f"model.name={resolve_name(source)}"], task=task)
    return cfg, None, f"no shipped {task} recipe trains {resolve_name(source)}: the {task} task's default model"


def _with_precision(cfg: TrainConfig, amp: str | None) -> TrainConfig:
    """A copy of ``cfg`` for planning: architecture only (no weights are read), the backbone in
    ``amp`` when given (det/seg: the heads' ``backbone_dtype``, the neck and heads staying fp32 as
    the recipes run them; cls: ``run.amp``)."""
    if amp is not None and amp not in ("bf16", "fp32"):
        raise ValueError(f"amp must be 'bf16' or 'fp32', got {amp!r}")
    cfg = TrainConfig.from_dict(cfg.to_dict())
    if amp is not None:
        if cfg.task == "cls":
            cfg.run.amp = amp
        else:
            cfg.model.head = {**(cfg.model.head or {}), "backbone_dtype": amp}
            if amp == "fp32":
                cfg.run.amp = "fp32"
    cfg.model.pretrained, cfg.model.branch_weights, cfg.model.checkpoint = False, None, None
    return cfg


def _body_dtype(cfg: TrainConfig) -> str:
    """The autocast dtype the backbone of ``cfg`` trains in (``"fp32"``: none)."""
    inner = (cfg.model.head or {}).get("backbone_dtype", "fp32") if cfg.task != "cls" else "fp32"
    return inner if inner != "fp32" else cfg.run.amp


def _in_fp32(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` without autocast anywhere."""
    cfg = TrainConfig.from_dict(cfg.to_dict())
    cfg.run.amp = "fp32"
    if cfg.task != "cls":
        cfg.model.head = {**(cfg.model.head or {}), "backbone_dtype": "fp32"}
    return cfg


class _StandIn(torch.utils.data.Dataset):
    """What a task's ``build_model`` reads of its training set: the classes."""

    def __init__(self, num_classes: int):
        self.classes = [f"class{i}" for i in range(num_classes)]
        self.category_ids = list(range(1, num_classes + 1))

    def __len__(self) -> int:
        return 0


def _num_classes(cfg: TrainConfig) -> int:
    """The classes of the stand-in data: the recipe's class list or class weights when it gives
    them, else its dataset's (:data:`DATASET_CLASSES`; the data itself is never read)."""
    data = cfg.data
    if isinstance(getattr(data, "classes", None), (list, tuple)):
        return len(data.classes)
    if isinstance((cfg.model.head or {}).get("class_weight"), (list, tuple)):
        return len(cfg.model.head["class_weight"])
    if cfg.task == "cls" and cfg.model.num_classes:
        return cfg.model.num_classes
    return DATASET_CLASSES.get(getattr(data, "dataset", "coco"), 80)


def _build(cfg: TrainConfig, piip: PIIPConfig | None = None, *, measure: bool = False):
    """The task object and its model for ``cfg`` (the network ``piip`` instead of the recipe's, when
    given); ``measure``: the detector takes the images at the size given (no resize in training)."""
    cfg = TrainConfig.from_dict(cfg.to_dict())
    if piip is not None:
        cfg.model.piip, cfg.model.name, cfg.model.overrides = piip.to_dict(), "", None
        for name in MODEL_OVERRIDES:
            setattr(cfg.model, name, None)
    if measure and cfg.task == "det":
        cfg.model.head = {**cfg.model.head, "resize_in_training": False}
    task = get_task_class(cfg.task)(cfg)
    model = task.build_model(cfg, _StandIn(_num_classes(cfg)))
    return task, model, cfg


def _body(model: nn.Module) -> PIIP:
    for module in model.modules():
        if isinstance(module, PIIP):
            return module
    raise ValueError(f"no PIIP backbone in {type(model).__name__}")


def _reduced(config: PIIPConfig, depth: int) -> PIIPConfig:
    """``config`` with ``depth`` blocks per branch, one per interaction group, ``depth``
    interactions; the blocks' window layouts sampled evenly from the real branch's (first, ...,
    last), so a ViTDet-style branch keeps windowed and global blocks."""
    branches = []
    for b in config.branches:
        picks = [0] if depth == 1 else [round(i * (b.depth - 1) / (depth - 1)) for i in range(depth)]
        sizes = tuple(b.window_sizes[i] for i in picks)
        groups = tuple((i, i) for i in range(depth)) if config.num_interactions else ()
        branches.append(dataclasses.replace(b, depth=depth, interaction_indexes=groups, window_size=sizes,
                                            window_block_indexes=()))
    return dataclasses.replace(config, branches=tuple(branches))


# -- geometry ---------------------------------------------------------------------------------------

def _grids(config: PIIPConfig, size: tuple[int, int]) -> list[tuple[int, int]]:
    """Every branch's token grid for a ``size`` input (branch 1 first), as PIIP computes it:
    ``scale_factor`` interpolation floors the size, the patch embedding floors the grid."""
    finest, patch = config.input_size, config.patch_size
    grids = []
    for b in config.branches:
        scale = b.resolution / finest
        h, w = (size if scale == 1 else (math.floor(size[0] * scale), math.floor(size[1] * scale)))
        grids.append((h // patch, w // patch))
    return grids


def _block_tokens(b, grid: tuple[int, int]) -> list[tuple[int, int]]:
    """``(N, N_pad)`` of every block of branch ``b`` on ``grid``: tokens, and tokens after the
    block's window padding (``N`` in a global block)."""
    h, w = grid
    out = []
    for window in b.window_sizes:
        padded = h * w if window is None else math.ceil(h / window) * window * math.ceil(w / window) * window
        out.append((h * w, padded))
    return out


def _ceil_to(value: int, multiple: int) -> int:
    return max(multiple, math.ceil(value / multiple) * multiple)


def training_input_size(cfg: TrainConfig, model: nn.Module) -> tuple[tuple[int, int], str]:
    """The largest (H, W) a training batch of ``cfg`` has, and how it follows from the recipe."""
    body = _body(model)
    S = body.config.input_size
    if cfg.task == "cls":
        size = getattr(cfg.data, "image_size", None) or S
        return (size, size), f"classification input {size} x {size}"
    if cfg.task == "seg":
        crop = cfg.data.crop_size
        return (crop, crop), f"segmentation crop {crop} x {crop}"
    divisor = model.config.resize[2]
    data = cfg.data
    if data.large_scale_jitter is not None:
        return (_ceil_to(S, divisor),) * 2, f"large-scale jitter to {S} x {S}"
    if data.multi_scale:
        short = int(800 * S / 1024)
        how = f"multi-scale crop of at most {short} x {S} (short side int(800 x {S}/1024))"
    else:
        short = S * 800 // 1333
        how = f"single-scale resize to {short} x {S}"
    return (_ceil_to(short, divisor), _ceil_to(S, divisor)), f"{how}, padded to a multiple of {divisor}"


def _measure_sizes(cfg: TrainConfig, model: nn.Module, target: tuple[int, int]) -> list[tuple[int, int]]:
    """Three small input sizes (of the target's orientation) on which the model can train."""
    body = _body(model)
    c = body.config
    coarsest = min(b.resolution for b in c.branches)
    low = max(math.ceil(c.patch_size * c.input_size / coarsest), max(body.strides, default=c.patch_size),
              2 * c.patch_size)
    divisor = model.config.resize[2] if cfg.task == "det" else 32
    base = _ceil_to(low, divisor)
    queries = getattr(model.config, "num_queries", 0) if cfg.task == "det" and model.config.kind == "dino" else 0
    if queries:  # DINO picks its queries among the encoder's tokens (strides 8 to 64)
        while sum(math.ceil(base / s) ** 2 for s in (8, 16, 32, 64)) < queries + 100:
            base += divisor
    if cfg.task == "cls":
        base = max(base, 2 * c.patch_size * 4)
    big = base + _ceil_to(base // 4, divisor)
    if target[0] > target[1]:
        return [(base, base), (big, base), (big, big)]
    return [(base, base), (base, big), (big, big)]


# -- the measurement ----------------------------------------------------------------------------------

def _batch(task_name: str, model: nn.Module, size: tuple[int, int], count: int, num_classes: int):
    """Random training data for ``count`` images of ``size`` in the task's collated form."""
    H, W = size
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, H, W, generator=g) for _ in range(count)]
    if task_name == "cls":
        return torch.stack(images), torch.randint(0, num_classes, (count,), generator=g)
    if task_name == "seg":
        labels = [torch.randint(0, num_classes, (H, W), generator=g) for _ in range(count)]
        return images, labels
    masks = bool(getattr(model.config, "masks", False))
    n = OBJECTS_PER_IMAGE if model.config.kind == "dino" else math.ceil(0.25 * model.config.box_batch_size_per_image)
    targets = []
    for _ in range(count):
        wh = (0.1 + 0.4 * torch.rand(n, 2, generator=g)) * torch.tensor([W, H])
        xy = torch.rand(n, 2, generator=g) * (torch.tensor([W, H]) - wh)
        boxes = torch.cat([xy, xy + wh], dim=1)
        target = {"boxes": boxes, "labels": torch.randint(1, num_classes + 1, (n,), generator=g)}
        if masks:
            m = torch.zeros(n, H, W, dtype=torch.uint8)
            for mask, (x1, y1, x2, y2) in zip(m, boxes.long().tolist()):
                mask[y1:y2, x1:x2] = 1
            target["masks"], target["has_mask"] = m, torch.ones(n, dtype=torch.bool)
        targets.append(target)
    return images, targets


class _SavedTensors:
    """``saved_tensors_hooks`` that record each storage autograd saves, once, with the category of
    what was running (a branch's blocks, an interaction, the rest of the backbone, the rest of the
    model) or ``copies`` for an autocast copy of a parameter. Parameters and buffers are left out."""

    def __init__(self, model: nn.Module, category: str = "rest"):
        self.skip = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
        self.category = category
        self.saved: dict[int, tuple[int, str, StorageWeakRef]] = {}

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key == 0 or key in self.skip:
            return t
        old = self.saved.get(key)
        if old is None or old[2].expired():
            base = t._base if t._base is not None else t
            fn = base.grad_fn
            copy = (fn is not None and type(fn).__name__ == "ToCopyBackward0"
                    and any(type(n).__name__ == "AccumulateGrad" for n, _ in fn.next_functions if n is not None))
            self.saved[key] = (storage.nbytes(), "copies" if copy else self.category, StorageWeakRef(storage))
        return t

    def alive(self) -> dict[str, int]:
        """Bytes by category of the saved storages still alive."""
        out: dict[str, int] = {}
        for nbytes, category, ref in self.saved.values():
            if not ref.expired():
                out[category] = out.get(category, 0) + nbytes
        return out


def _attribute(body: PIIP, recorder: _SavedTensors):
    """Point the recorder at ``branch<k>`` while a branch's blocks run, ``unit<u>`` while an
    interaction's unit ``u`` runs, ``interactions`` in an interaction outside its units (what
    checkpointing keeps of them) and ``body`` for the rest of the backbone (instance attributes over
    ``forward_blocks``, forward hooks); returns the undo."""
    undo, stack = [], []

    def enter(category):
        def hook(module, args):
            stack.append(recorder.category)
            recorder.category = category
        return hook

    def leave(module, args, output):
        recorder.category = stack.pop()
    for k, branch in enumerate(body.branches):
        run = branch.forward_blocks

        def forward_blocks(*args, _run=run, _k=k, **kwargs):
            previous, recorder.category = recorder.category, f"branch{_k}"
            try:
                return _run(*args, **kwargs)
            finally:
                recorder.category = previous
        branch.forward_blocks = forward_blocks
        undo.append(lambda b=branch: b.__dict__.pop("forward_blocks", None))
    units = [(unit, f"unit{u}") for interaction in body.interactions for u, unit in enumerate(interaction.units)]
    for module, category in [(body, "body"), *((i, "interactions") for i in body.interactions), *units]:
        undo.append(module.register_forward_pre_hook(enter(category)).remove)
        undo.append(module.register_forward_hook(leave).remove)
    return lambda: [u() for u in undo]


def _cast_parameters(loss: torch.Tensor, names: dict[int, str]) -> set[str]:
    """Names of the parameters autocast copied in the graph of ``loss`` (``ToCopyBackward0`` nodes
    right above a parameter's ``AccumulateGrad``)."""
    seen, stack, cast = set(), [loss.grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        nexts = [n for n, _ in fn.next_functions if n is not None]
        if type(fn).__name__ == "ToCopyBackward0":
            for n in nexts:
                if type(n).__name__ == "AccumulateGrad" and id(n.variable) in names:
                    cast.add(names[id(n.variable)])
        stack.extend(nexts)
    return cast


_INDEX = re.compile(r"\.(blocks|interactions)\.\d+\.")


def _role(name: str) -> str:
    """A parameter's name relative to its backbone, with block / interaction indices as ``#``."""
    name = _INDEX.sub(lambda m: f".{m.group(1)}.#.", f".{name}")
    for prefix in (".branches.", ".interactions.", ".merge.", ".fpn.", ".classifier."):
        if prefix in name:
            return name[name.index(prefix) + 1:]
    return name[1:]


def _saved_bytes(run, model: nn.Module, body: PIIP, category: str) -> tuple[dict[str, int], Any]:
    """Bytes by category that autograd keeps from ``run()`` (a training forward returning the loss),
    and the loss."""
    recorder = _SavedTensors(model, category)
    undo = _attribute(body, recorder)
    try:
        torch.manual_seed(0)
        with torch.autograd.graph.saved_tensors_hooks(recorder.pack, lambda t: t):
            loss = run()
        return recorder.alive(), loss
    finally:
        undo()


@dataclass(frozen=True)
class Measurement:
    """Saved bytes per image of one training forward of a reduced network: of the whole model
    (``part="model"``) or the backbone alone (``"body"``), in ``dtype``."""

    part: str
    dtype: str
    depth: int
    size: tuple[int, int]
    checkpointing: bool
    bytes: dict  # category -> bytes per image


def _share_weights(target: nn.Module, source: nn.Module) -> None:
    """Give ``target`` (built on the meta device) the parameters, buffers and tensor attributes of
    ``source`` under the same names (``target``'s are a subset: the shallower network), without
    copying."""
    modules = dict(source.named_modules())
    for name, module in target.named_modules():
        twin = modules[name]
        for store in (module._parameters, module._buffers):
            for key, value in store.items():
                if value is not None:
                    store[key] = getattr(twin, key)
        for key, value in vars(module).items():  # tensors kept as plain attributes (anchors, ...)
            values = value if isinstance(value, (list, tuple)) else [value]
            if any(isinstance(v, torch.Tensor) and v.is_meta for v in values):
                setattr(module, key, getattr(twin, key))
    if any(t.is_meta for t in [*target.parameters(), *target.buffers()]):
        raise RuntimeError("the shallower network has tensors the deeper one does not")


def _global_attention(body: PIIP):
    """Every block of ``body`` attends globally until the returned undo is called."""
    saved = [(branch, branch.window_sizes) for branch in body.branches]
    for branch, sizes in saved:
        branch.window_sizes = (None,) * len(sizes)
    return lambda: [setattr(branch, "window_sizes", sizes) for branch, sizes in saved]


def measure_activations(cfg: TrainConfig, model_config: PIIPConfig, sizes: Sequence[tuple[int, int]], *,
                        batch: int = 1, dtype: str = "fp32") -> tuple[list[Measurement], dict[int, PIIPConfig], set[str]]:
    """The measurements behind a plan (see the module doc), in float32, per image.

    ``cfg``'s whole model (the task's loss, as the engine computes it) with ``model_config`` reduced
    to the shallower of :data:`DEPTHS` runs at each of ``sizes``, and reduced to the deeper one at
    the first size (``part="model"``, ``checkpointing=False``). With activation checkpointing only
    the blocks and interactions keep other tensors: the backbone alone runs its branches at the same
    depths and sizes with checkpointing, and its blocks' and interactions' bytes, with the rest of
    the whole model's, make the ``checkpointing=True`` measurements. Then, when ``dtype`` is an
    autocast dtype, the backbone alone at both depths at its smallest input, in float32 and under
    ``dtype`` autocast (``part="body"``: the whole backbone at the shallower depth without
    checkpointing, its branches' maps otherwise; global attention: at the smallest input a window
    would be mostly padding, and the same tensors in the same dtypes are saved either way): what
    turns float32 bytes into ``dtype`` bytes. The two networks share their weights (the shallower is
    the deeper one's first blocks and interaction).

    Returns the measurements, the reduced configs by depth and the parameters (:func:`_role` names)
    that autocast copies (empty in float32)."""
    lo, hi = min(DEPTHS), max(DEPTHS)
    configs = {depth: _reduced(model_config, depth) for depth in (lo, hi)}
    fp32 = _in_fp32(cfg)
    torch.manual_seed(0)
    task, deep, built = _build(fp32, configs[hi], measure=True)
    with torch.device("meta"):
        _, shallow, _ = _build(fp32, configs[lo], measure=True)
    _share_weights(shallow, deep)
    num_classes = _num_classes(built)
    out = []
    for depth, model, runs in ((lo, shallow, sizes), (hi, deep, sizes[:1])):
        model.train()
        body = _body(model)
        for size in runs:
            data = _batch(built.task, model, size, batch, num_classes)
            saved, _ = _saved_bytes(lambda: task.loss(model, data, torch.device("cpu"))[0], model, body, "rest")
            whole = {k: v / batch for k, v in saved.items()}
            out.append(Measurement("model", "fp32", depth, tuple(size), False, whole))
            images = torch.rand(batch, 3, *size, generator=torch.Generator().manual_seed(0))
            body.set_grad_checkpointing(True)
            try:
                saved, _ = _saved_bytes(lambda: sum(m.sum() for m in body.forward_features(images)), body, body,
                                        "body")
            finally:
                body.set_grad_checkpointing(False)
            kept = {k: v / batch for k, v in saved.items() if k.startswith(("branch", "unit", "interactions"))}
            rest = {k: v for k, v in whole.items() if not k.startswith(("branch", "unit", "interactions"))}
            out.append(Measurement("model", "fp32", depth, tuple(size), True, {**rest, **kept}))
    cast: set[str] = set()
    if dtype == "fp32":
        return out, configs, cast
    checkpointing = (False, True)
    amp, size = autocast_dtype(dtype), _tiny_size(model_config)
    images = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(0))
    for depth, model in ((lo, shallow), (hi, deep)):
        body = _body(model)
        names = {id(p): _role(n) for n, p in body.named_parameters()}
        undo = _global_attention(body)
        try:
            for ckpt in checkpointing:
                body.set_grad_checkpointing(ckpt)
                # the whole backbone once (the rest of it does not depend on the depth or on
                # checkpointing); else its branches' maps, sparing the slow low-precision convolutions
                forward = body if depth == lo and not ckpt else body.forward_features
                for name, precision in (("fp32", None), (dtype, amp)):
                    def run():
                        with autocast("cpu", precision):
                            y = forward(images)
                        y = y.values() if isinstance(y, dict) else y if isinstance(y, list) else [y]
                        return sum(v.float().sum() for v in y)
                    saved, loss = _saved_bytes(run, body, body, "body")
                    if precision is not None and not cast:
                        cast = _cast_parameters(loss, names)
                    out.append(Measurement("body", name, depth, size, ckpt, saved))
        finally:
            body.set_grad_checkpointing(False)
            undo()
    return out, configs, cast


def _tiny_size(config: PIIPConfig) -> tuple[int, int]:
    """The smallest input the backbone ``config`` takes (16-pixel steps)."""
    coarsest = min(b.resolution for b in config.branches)
    low = max(math.ceil(config.patch_size * config.input_size / coarsest), 2 * config.patch_size)
    if config.task == "det":
        low = max(low, 4 * 2 ** max(config.fpn_levels))
    return (_ceil_to(low, 16),) * 2


def _ratios(measurements: Sequence[Measurement], dtype: str, checkpointing: bool) -> dict[str, float]:
    """``dtype`` bytes over float32 bytes by category: for the blocks and interactions the ratio of
    what one more depth adds (so a first block's input does not count for all), for the rest of the
    backbone the ratio of the whole backbone's run (the shallower, without checkpointing)."""
    def get(name, depth):
        found = next(m.bytes for m in measurements if m.part == "body" and m.dtype == name and m.depth == depth
                     and m.checkpointing == checkpointing)
        merged = {k: v for k, v in found.items() if not k.startswith("unit")}
        merged["interactions"] = merged.get("interactions", 0) + sum(v for k, v in found.items()
                                                                    if k.startswith("unit"))
        return merged
    lo, hi = min(DEPTHS), max(DEPTHS)
    ratios = {}
    for category in {*get("fp32", hi), *get(dtype, hi), "body"} - {"copies"}:
        if category == "body":  # measured whole at the shallower depth without checkpointing
            whole = [next(m.bytes for m in measurements if m.part == "body" and m.dtype == name and m.depth == lo
                          and not m.checkpointing) for name in ("fp32", dtype)]
            den, num = whole[0].get(category, 0), whole[1].get(category, 0)
        else:
            den = get("fp32", hi).get(category, 0) - get("fp32", lo).get(category, 0)
            num = get(dtype, hi).get(category, 0) - get(dtype, lo).get(category, 0)
        ratios[category] = num / den if den > 0 else 1.0
    return ratios


@dataclass(frozen=True)
class ActivationModel:
    """Activation bytes per image fitted to :class:`Measurement` s (see the module doc), in float32,
    and the ``ratios`` that turn each category into the backbone's autocast dtype."""

    blocks: tuple[tuple[float, float], ...]  # per branch: bytes per token, per window-padding token
    interaction: tuple[float, float]         # (a, b): a + b * sum_k N_k per interaction
    unit_share: float                        # the largest interaction unit's share of an interaction
    body: tuple[float, float]                # (a, b): a + b * H * W, the rest of the backbone
    rest: tuple[float, float]                # (a, b): a + b * H * W, the rest of the model
    ratios: dict                             # category -> autocast bytes / float32 bytes
    max_residual: float                      # largest relative misfit over the measurements

    def predict(self, config: PIIPConfig, size: tuple[int, int]) -> dict[str, float]:
        """Per-image bytes by category for the network ``config`` at input ``size``."""
        grids = _grids(config, size)
        out = {}
        for k, (b, grid) in enumerate(zip(config.branches, grids)):
            per_token, per_padding = self.blocks[k]
            out[f"branch{k}"] = sum(per_token * n + per_padding * (p - n) for n, p in _block_tokens(b, grid))
        tokens = sum(h * w for h, w in grids)
        out["interactions"] = config.num_interactions * (self.interaction[0] + self.interaction[1] * tokens) \
            if config.num_interactions else 0.0
        out["body"] = self.body[0] + self.body[1] * size[0] * size[1]
        out["rest"] = self.rest[0] + self.rest[1] * size[0] * size[1]
        return {k: max(0.0, v) * self.ratios.get(k, 1.0) for k, v in out.items()}

    def largest_unit(self, config: PIIPConfig, size: tuple[int, int]) -> float:
        """Per-image bytes of the largest checkpointed unit (one block, or one interaction unit) at
        input ``size``: what the backward holds again while it recomputes that unit (from a fit
        without checkpointing)."""
        parts = self.predict(config, size)
        blocks = [parts[f"branch{k}"] / b.depth for k, b in enumerate(config.branches)]
        interaction = parts["interactions"] / config.num_interactions if config.num_interactions else 0.0
        return max(*blocks, interaction * self.unit_share)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _lstsq(rows, ys) -> tuple[float, ...]:
    return tuple(float(v) for v in np.linalg.lstsq(np.array(rows, float), np.array(ys, float), rcond=None)[0])


def _fit(measurements: Sequence[Measurement], configs: dict[int, PIIPConfig],
         ratios: dict[str, float]) -> ActivationModel:
    """Least-squares fit of :class:`ActivationModel` to ``measurements`` (whole model, one
    checkpointing mode, float32)."""
    first = configs[measurements[0].depth]
    blocks = []
    for k in range(first.num_branches):
        rows, ys = [], []
        for m in measurements:
            b = configs[m.depth].branches[k]
            tokens = _block_tokens(b, _grids(configs[m.depth], m.size)[k])
            n = sum(t for t, _ in tokens)
            rows.append([n, sum(p for _, p in tokens) - n])
            ys.append(m.bytes.get(f"branch{k}", 0))
        X = np.array(rows, float)
        if np.linalg.matrix_rank(X) < 2:  # no padding seen (or only padding): one coefficient
            blocks.append((_lstsq(X[:, :1], ys)[0], 0.0))
        else:
            blocks.append(_lstsq(X, ys))
    rows, ys, shares = [], [], [0.0]
    for m in measurements:
        n = configs[m.depth].num_interactions
        if n:
            rows.append([1.0, sum(h * w for h, w in _grids(configs[m.depth], m.size))])
            units = [v for k, v in m.bytes.items() if k.startswith("unit")]
            ys.append((m.bytes.get("interactions", 0) + sum(units)) / n)
            shares.append(max(units, default=0) / max(n * ys[-1], 1))
    interaction = _lstsq(rows, ys) if rows else (0.0, 0.0)
    pixels = [[1.0, m.size[0] * m.size[1]] for m in measurements]
    body = _lstsq(pixels, [m.bytes.get("body", 0) for m in measurements])
    rest = _lstsq(pixels, [m.bytes.get("rest", 0) for m in measurements])
    fitted = ActivationModel(tuple(blocks), interaction, max(shares), body, rest, {}, 0.0)
    misfit = 0.0
    for m in measurements:
        measured = sum(v for k, v in m.bytes.items() if k != "copies")
        predicted = sum(fitted.predict(configs[m.depth], m.size).values())
        misfit = max(misfit, abs(predicted - measured) / max(measured, 1))
    return dataclasses.replace(fitted, ratios=dict(ratios), max_residual=misfit)


# -- the plan -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MemoryPlan:
    """Per-GPU memory of training one model with each strategy: :func:`plan_memory`."""

    source: str
    recipe: str | None
    chosen: str                        # which recipe or model, in words
    task: str
    model: str                         # the network, e.g. "piip_h6b 1024/768"
    gpus: int
    gpu_memory_gb: float
    batch_per_gpu: int
    batch_note: str
    amp: str
    grad_checkpointing: bool
    input_size: tuple[int, int]
    input_note: str
    params: int
    trainable: int
    cast_params: int
    root_params: int
    unit_params: int
    largest_group: int
    buffers: int
    activations: int                   # per GPU, the planned checkpointing mode
    activations_other: int             # per GPU, the other mode
    per_image: dict                    # category -> bytes per image (planned mode)
    measured_sizes: tuple[tuple[int, int], ...]
    measured_depths: tuple[int, ...]
    precision_size: tuple[int, int]    # where the autocast ratios were measured
    fit: ActivationModel
    measurements: tuple[Measurement, ...]
    strategies: tuple[StrategyMemory, ...]
    totals_other: dict                 # strategy -> total with the other checkpointing mode
    measure_seconds: float
    config: PIIPConfig                 # the network planned
    notes: tuple[str, ...] = field(default=())

    @property
    def fitting(self) -> list[str]:
        """The strategies whose total fits ``gpu_memory_gb``."""
        return [s.strategy for s in self.strategies if s.fits]

    def strategy(self, name: str) -> StrategyMemory:
        return next(s for s in self.strategies if s.strategy == name)

    def rows(self) -> list[tuple[str, list]]:
        """The table: a label and one value per strategy (bytes, or text for the last row)."""
        working = "bf16 working copies" if self.amp != "fp32" else "gathered units (fsdp)"
        fields = [("weights", "weights"), ("gradients", "gradients"), ("AdamW moments", "optimizer"),
                  ("DDP gradient buckets", "buckets"), (working, "working"), ("activations", "activations"),
                  ("allowance", "allowance"), ("total", "total")]
        rows = [(label, [getattr(s, name) for s in self.strategies]) for label, name in fields]
        return rows + [(f"fits {self.gpu_memory_gb:g} GB?", ["yes" if s.fits else "no" for s in self.strategies])]

    def summary(self) -> list[str]:
        """What the table rests on, one line each."""
        g = lambda n: f"{n / GB:.2f}"  # noqa: E731
        m = lambda n: f"{n / 1e6:,.1f} M"  # noqa: E731
        fits = ", ".join(self.fitting) if self.fitting else \
            f"none (smallest: {min(self.strategies, key=lambda s: s.total).strategy})"
        c = self.config
        lines = [f"fits {self.gpus} x {self.gpu_memory_gb:g} GB: {fits}",
                 f"model: {self.chosen}; {self.task} network {self.model}, backbone in {self.amp}, activation "
                 f"checkpointing {'on' if self.grad_checkpointing else 'off'}"]
        frozen = self.params - self.trainable
        cast = f", {m(self.cast_params)} of them cast to {self.amp} by autocast" if self.amp != "fp32" else ""
        lines.append(f"parameters: {m(self.params)} ({'all trainable' if not frozen else f'{m(frozen)} frozen'})"
                     f"{cast}; fsdp units: largest {m(self.unit_params)}, root {m(self.root_params)}; largest AdamW "
                     f"group {m(self.largest_group)}")
        lines.append(f"input {self.input_size[0]} x {self.input_size[1]} ({self.input_note}); batch {self.batch_note}")
        parts = self.per_image
        blocks = " / ".join(g(parts[f"branch{k}"]) for k in range(c.num_branches))
        depths = " / ".join(str(b.depth) for b in c.branches)
        widths = " / ".join(str(b.embed_dim) for b in c.branches)
        recompute = f", recomputed checkpointed unit {g(parts['recompute'])}" if "recompute" in parts else ""
        lines.append(f"activations per image (GB): blocks {blocks} ({widths} wide, {depths} blocks), interactions "
                     f"{g(parts['interactions'])} ({c.num_interactions}), rest of the backbone {g(parts['body'])}, "
                     f"neck + heads + losses {g(parts['rest'])}{recompute}; x {self.batch_per_gpu} per GPU = "
                     f"{g(self.activations)} GB")
        lo, hi = min(self.measured_depths), max(self.measured_depths)
        sizes = ", ".join(f"{h}x{w}" for h, w in self.measured_sizes)
        lines.append(f"measured: the bytes autograd saves in training forwards on CPU, in fp32, with and without "
                     f"checkpointing, of the network with {lo} block per branch and {lo} interaction at {sizes} and "
                     f"with {hi} blocks and {hi} interactions at {sizes.split(', ')[0]} ({self.measure_seconds:.0f} s); "
                     f"fitted per block (bytes per token and per window-padding token), per interaction and per "
                     f"pixel (largest misfit {100 * self.fit.max_residual:.1f}%), extrapolated linearly in depth to "
                     f"{depths} blocks and {c.num_interactions} interactions at {self.input_size[0]}x{self.input_size[1]}")
        if self.amp != "fp32":
            r = self.fit.ratios
            blocks = " / ".join(f"{r.get(f'branch{k}', 1.0):.2f}" for k in range(c.num_branches))
            lines.append(f"{self.amp}: the fp32 bytes times {self.amp}/fp32 ratios measured on the backbone alone at "
                         f"{self.precision_size[0]}x{self.precision_size[1]} (both depths; {self.amp} convolutions "
                         f"take a slow path on this CPU, so the whole model is measured in fp32): blocks {blocks}, "
                         f"interactions {r.get('interactions', 1.0):.2f}, rest of the backbone "
                         f"{r.get('body', 1.0):.2f}; the neck and heads run in fp32")
        other = " / ".join(f"{t / GB:.1f}" for t in self.totals_other.values())
        lines.append(f"with activation checkpointing {'off' if self.grad_checkpointing else 'on'}: activations "
                     f"{g(self.activations_other)} GB, totals {' / '.join(self.totals_other)} {other} GB")
        phases = ", ".join(f"{s.strategy} in the {s.peak_phase}" for s in self.strategies)
        lines.append(f"total: the peak of the forward (weights, moments, buckets, working copies, activations), the "
                     f"backward (+ all gradients with all activations: an upper bound) and the AdamW step (+ its "
                     f"largest group's temporary), plus the allowance, {ALLOWANCE_FIXED_GB:g} GB + "
                     f"{ALLOWANCE_FRACTION:.0%}; peaks: {phases}; GB = 10^9 bytes")
        return lines + list(self.notes)

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["config"] = self.config.to_dict()
        data["strategies"] = {s.strategy: s.to_dict() for s in self.strategies}
        data["fitting"] = self.fitting
        return data


def _param_counts(model: nn.Module, body: PIIP, cast_roles: set[str]) -> dict[str, int]:
    """Parameter counts of the whole ``model``: all, trainable, those autocast copies (``cast_roles``,
    in its backbone ``body``), FSDP's largest unit and root; and the buffers' bytes."""
    units = [blk for b in body.branches for blk in b.blocks] + list(body.interactions)
    unit_sizes = [sum(p.numel() for p in u.parameters()) for u in units]
    params = sum(p.numel() for p in model.parameters())
    return dict(
        params=params, trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
        cast_params=sum(p.numel() for n, p in body.named_parameters() if _role(n) in cast_roles),
        unit_params=max(unit_sizes, default=0), root_params=params - sum(unit_sizes),
        buffers=sum(b.numel() * b.element_size() for b in model.buffers()))


def plan_memory(source: str, *, task: str | None = None, gpus: int = 8, gpu_memory_gb: float = 80,
                batch_per_gpu: int | None = None, amp: str | None = None,
                grad_checkpointing: bool | None = None) -> MemoryPlan:
    """Per-GPU memory of training ``source`` with each of :data:`STRATEGIES` (see the module doc).

    Args:
        source: a registered variant (``piip_h6b``: its first shipped recipe for ``task`` in
            :data:`RECIPE_ORDER`, or the task's default model around it when none ships), or a
            recipe (a shipped name such as ``dino_piip_h6b_1x_ms``, or a JSON/YAML file).
        task: ``"det"``, ``"seg"`` or ``"cls"``; ``None``: a recipe's own, ``"det"`` for a variant.
        gpus, gpu_memory_gb: the machine.
        batch_per_gpu: images per GPU per micro-step (default: the recipe's global batch over the
            GPUs and its accumulation steps, rounded up; without a recipe 2 for det/seg, as the
            authors trained, and 128 for cls).
        amp: the backbone's precision, ``"bf16"`` (autocast) or ``"fp32"``; ``None``: the recipe's
            (every shipped det/seg recipe runs its backbone in bf16), bf16 without a recipe.
        grad_checkpointing: activation checkpointing (``None``: the recipe's); the other mode's
            activations are reported too.
    """
    if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 1:
        raise ValueError(f"gpus must be an integer >= 1, got {gpus!r}")
    if isinstance(gpu_memory_gb, bool) or not isinstance(gpu_memory_gb, (int, float)) \
            or not math.isfinite(gpu_memory_gb) or gpu_memory_gb <= 0:
        raise ValueError(f"gpu_memory_gb must be a number > 0, got {gpu_memory_gb!r}")
    if batch_per_gpu is not None and (isinstance(batch_per_gpu, bool) or not isinstance(batch_per_gpu, int)
                                      or batch_per_gpu < 1):
        raise ValueError(f"batch_per_gpu must be an integer >= 1, got {batch_per_gpu!r}")
    if grad_checkpointing is not None and not isinstance(grad_checkpointing, bool):
        raise ValueError(f"grad_checkpointing must be true, false or None, got {grad_checkpointing!r}")
    base, recipe, chosen = _resolve_source(source, task)
    cfg = _with_precision(base, amp if amp is not None or recipe is not None else "bf16")
    dtype = _body_dtype(cfg)
    ckpt = cfg.run.grad_checkpointing if grad_checkpointing is None else grad_checkpointing

    # the whole model on the meta device: counts, FSDP units, parameter groups, input size
    with torch.device("meta"):
        _, full, built = _build(cfg)
    body = _body(full)
    model_config = body.config
    size, input_note = training_input_size(built, full)
    groups = build_optimizer(full, built.optim).param_groups
    largest_group = max(sum(p.numel() for p in g["params"] if p.requires_grad) for g in groups)
    batch_per_gpu, batch_note = _batch_per_gpu(built, recipe, gpus, batch_per_gpu)

    start = time.perf_counter()
    sizes = _measure_sizes(built, full, size)
    batch = 2 if built.task == "seg" else 1  # BatchNorm after a 1x1 pooling needs two images
    measurements, configs, cast_roles = measure_activations(built, model_config, sizes, batch=batch, dtype=dtype)
    ratios = {mode: _ratios(measurements, dtype, mode) if dtype != "fp32" else {} for mode in (False, True)}
    seconds = time.perf_counter() - start
    fits = {mode: _fit([m for m in measurements if m.part == "model" and m.checkpointing == mode], configs,
                       ratios[mode]) for mode in (False, True)}
    per_image = {mode: fits[mode].predict(model_config, size) for mode in (False, True)}
    saved = {mode: int(batch_per_gpu * sum(per_image[mode].values())) for mode in (False, True)}
    # the backward recomputes one checkpointed unit at a time and holds its activations meanwhile
    per_image[True]["recompute"] = fits[False].largest_unit(model_config, size)
    recompute = {False: 0, True: int(batch_per_gpu * per_image[True]["recompute"])}
    activations = {mode: saved[mode] + recompute[mode] for mode in (False, True)}
    counts = _param_counts(full, body, cast_roles)
    plans = {mode: tuple(strategy_memory(name, gpus=gpus, activations=saved[mode], recompute=recompute[mode],
                                         checkpointing=mode, largest_group=largest_group, amp=dtype,
                                         accumulating=built.optim.accum_steps > 1, gpu_memory_gb=gpu_memory_gb,
                                         **counts) for name in STRATEGIES)
             for mode in (False, True)}
    strategies = plans[ckpt]
    P, T = counts["params"], counts["trainable"]
    deepspeed = 2 * P + 2 * T + math.ceil(12 * T / gpus)
    notes = [f"for comparison: DeepSpeed ZeRO-1 in bf16 (how the authors trained: bf16 weights and gradients, "
             f"fp32 master weights and AdamW moments sharded, 2 + 2 + 12/N bytes per parameter) holds "
             f"{deepspeed / GB:.1f} GB per GPU before activations; piip's zero1 keeps fp32 weights and gradients"]
    network = f"{model_config.name or 'piip'} {'/'.join(map(str, model_config.resolutions))}"
    return MemoryPlan(
        source=source, recipe=recipe, chosen=chosen, task=built.task, model=network, gpus=gpus,
        gpu_memory_gb=float(gpu_memory_gb), batch_per_gpu=batch_per_gpu, batch_note=batch_note, amp=dtype,
        grad_checkpointing=ckpt, input_size=size, input_note=input_note, largest_group=largest_group,
        activations=activations[ckpt], activations_other=activations[not ckpt], per_image=per_image[ckpt],
        measured_sizes=tuple(sizes), measured_depths=DEPTHS, precision_size=_tiny_size(model_config),
        fit=fits[ckpt], measurements=tuple(measurements), strategies=strategies,
        totals_other={s.strategy: s.total for s in plans[not ckpt]}, measure_seconds=seconds, config=model_config,
        notes=tuple(notes), **counts)


def _batch_per_gpu(cfg: TrainConfig, recipe: str | None, gpus: int, given: int | None) -> tuple[int, str]:
    """Images per GPU per micro-step, and where the number comes from."""
    if given is not None:
        return given, f"{given} per GPU (given)"
    if recipe is None:
        batch = 2 if cfg.task in ("det", "seg") else 128
        return batch, f"{batch} per GPU (no recipe: the authors' {batch} images per GPU)"
    o = cfg.optim
    share = o.batch_size / (gpus * o.accum_steps)
    batch = max(1, math.ceil(share))
    note = (f"{batch} per GPU: the recipe's global batch {o.batch_size} / {gpus} GPUs / {o.accum_steps} "
            f"accumulation step{'s' if o.accum_steps > 1 else ''}")
    return batch, note + (f" (= {share:g}, rounded up)" if share != batch else "")
