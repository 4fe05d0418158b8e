"""ONNX export of piip models: :func:`export_onnx`.

What is exported, per kind of model (one float input ``images``, ``(B, 3, H, W)``):

* a PIIP backbone (``task="det"``): ``images`` normalised as the model was trained (the input of
  ``PIIP.forward``); outputs the feature pyramid's maps, named by its keys (``"0"`` .. ``"3"``);
* a classifier (a PIIP with ``task="cls"``): normalised ``images``; output ``logits``;
* a segmenter (:class:`~piip.tasks.segmentation.model.PIIPSegmenter`): ``images`` in 0-1 (the
  model normalises them itself); output ``logits`` ``(B, num_classes, H, W)`` at the input size;
* a DINO detector: **one** raw image in 0-1, ``(1, 3, H, W)``, any size; the detector's own input
  transform (keep-ratio resize to its test size, normalisation, padding) is inside the graph, as in
  ``detector([image])``; outputs ``boxes`` ``(N, 4)`` x1 y1 x2 y2 in input-image pixels,
  ``labels`` (1-based, int64) and ``scores``, N = ``detections_per_img``.

The default size is the model's natural input: the finest branch's resolution for a PIIP, the
crop (sliding-window inference) or test size for a segmenter, ``(min_size, max_size)`` of the
test resize for a detector (an image the transform does not rescale).

How. ``torch.export`` (non-strict) traces the model, ``torch.onnx.export(..., dynamo=True)``
translates the program to standard ONNX operators. For the trace the model is put in eval mode
and its dense layers on plain ``F.linear`` (:func:`~piip.ops.use_onednn_linears`: the oneDNN route
is a CPU speed trick of eager PyTorch, a 1x1 convolution over a channels-last view, that a portable
graph should not carry), both restored afterwards. While exporting
(``torch.compiler.is_exporting()``) a few model functions take their plain form: deformable
attention its PyTorch body instead of the ``piip::ms_deform_attn`` custom op (``GridSample``; see
:func:`piip.ops.ms_deform_attn`), the position embeddings are resized in the graph at every size
(no cache), window attention always pads, UperNet's adaptive pooling is two bin-matrix products.

``dynamic=True`` makes batch, height and width dynamic (``Dim.AUTO``; the example's batch is 2, as a
batch of 1 would fix that axis). ``torch.export`` records shape formulas simplified under what held
for the example, so the example must be generic: a size at which a windowed branch is a single
attention window is refused (the graph would take the batch size for the number of windows). The
result's ``notes`` say which axes the trace fixed anyway. A DINO detector does not export
dynamically (refused): its input transform and padding masks compute sizes in Python.

What does not export, and why (:class:`OnnxExportError`, one line):

* Mask R-CNN and Cascade Mask R-CNN: ``torch.export`` stops at data-dependent Python control flow
  in torchvision's RPN and RoI heads (``batched_nms`` branches on the number of boxes,
  ``BoxCoder.decode`` on their count, slices of tensors with data-dependent sizes) and in piip's
  level-by-level RoIAlign and chunked mask paste (``int()`` of box corners). The TorchScript
  exporter (``dynamo=False``) traces them, but fixes the number of RoIs per pyramid level and the
  paste region to the example image's: the file fails in onnxruntime (a Reshape of 0 RoIs to 1)
  or is wrong on any other image;
* anything that is not a piip model.

The check (``check=True``) runs the file in onnxruntime (CPU) on the export input and, with
``dynamic``, on a second input of another batch and size (for a detector, on a second image: a
graph that baked a data-dependent value in would pass on its own example), and compares with
PyTorch: relative L2 error of every dense output; for detections the largest box difference in
pixels, whether the labels are equal, the largest score difference.
"""
from __future__ import annotations

import importlib.util
import logging
import math
import os
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..models.piip import PIIP
from ..ops import Linear, use_onednn_linears

__all__ = ["OnnxCheck", "OnnxExport", "OnnxExportError", "MissingOnnxPackages", "export_onnx",
           "REL_L2_TOLERANCE", "BOX_TOLERANCE", "SCORE_TOLERANCE", "MIN_OPSET"]

#: ``GridSample`` (deformable attention: PIIP's interactions, DINO's encoder and decoder) is in ONNX from opset 16
MIN_OPSET = 16
#: largest relative L2 error of a dense output that the check accepts
REL_L2_TOLERANCE = 1e-4
#: largest box difference the check accepts: this many pixels plus 1e-5 of the image's longer side
#: (float32 coordinates of a large image round to ~1e-4 px)
BOX_TOLERANCE = 1e-3
#: largest score difference the check accepts
SCORE_TOLERANCE = 1e-4

_INPUT = "images"
_DETECTION_OUTPUTS = ("boxes", "labels", "scores")
_AXES = {0: "batch", 2: "height", 3: "width"}


class OnnxExportError(ValueError):
    """A model that cannot be exported to ONNX (the message says which kind and why)."""


class MissingOnnxPackages(OnnxExportError, ImportError):
    """The ONNX exporter's packages (onnx, onnxscript; onnxruntime for the check) are not installed."""


@dataclass
class OnnxCheck:
    """One onnxruntime run compared with PyTorch.

    Attributes:
        input_shape: the input it ran on.
        errors: per output, the relative L2 error (dense outputs) or the largest absolute difference
            (``boxes`` in pixels, ``scores``); ``labels`` are compared in ``labels_equal``.
        labels_equal: detections: whether the labels are the same (``None`` for other kinds).
        detections: detections: how many PyTorch found.
        mismatch: why the outputs could not be compared (different shapes), else ``None``.
        passed: every error within its tolerance, labels equal, no mismatch.
    """

    input_shape: tuple[int, ...]
    errors: dict[str, float]
    labels_equal: bool | None = None
    detections: int | None = None
    mismatch: str | None = None
    passed: bool = False

    def describe(self) -> str:
        shape = "x".join(map(str, self.input_shape))
        if self.mismatch:
            return f"{shape}: MISMATCH ({self.mismatch})"
        parts = []
        for name, value in self.errors.items():
            kind = "max abs diff" if name in ("boxes", "scores") else "rel L2"
            parts.append(f"{name} {kind} {value:.1e}")
        if self.labels_equal is not None:
            parts.append(f"labels {'equal' if self.labels_equal else 'DIFFER'} ({self.detections} detections)")
        return f"{shape}: {'ok' if self.passed else 'FAILED'}, " + ", ".join(parts)


@dataclass
class OnnxExport:
    """What :func:`export_onnx` wrote.

    Attributes:
        path: the ``.onnx`` file (weights over 2 GB go to ``path + ".data"`` beside it).
        kind: ``"backbone"``, ``"classifier"``, ``"segmenter"`` or ``"detector (dino)"``.
        file_bytes: size of the file (and its external data).
        export_seconds: tracing, translation and writing.
        input_names, output_names: the graph's.
        input_shape: the example input's shape (the export size).
        opset: the ONNX opset.
        dynamic_axes: per input and output name, ``{axis: name}`` of its dynamic axes (empty: static).
        notes: what the caller should know (dimensions ``dynamic`` could not free, the input range).
        checks: the onnxruntime comparisons (empty without ``check``).
    """

    path: str
    kind: str
    file_bytes: int
    export_seconds: float
    input_names: list[str]
    output_names: list[str]
    input_shape: tuple[int, ...]
    opset: int
    dynamic_axes: dict[str, dict[int, str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    checks: list[OnnxCheck] = field(default_factory=list)

    @property
    def check_passed(self) -> bool | None:
        """Whether every check passed; ``None`` when nothing was checked."""
        return all(c.passed for c in self.checks) if self.checks else None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["check_passed"] = self.check_passed
        return out


# -- what each kind of model exports as -------------------------------------------------------------

class _Outputs(nn.Module):
    """A dense model's output(s) as a tuple: a dict's values (a backbone's pyramid) or the tensor."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.keys: list[str] = []

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(images)
        if isinstance(out, dict):
            self.keys = list(out.keys())
            return tuple(out.values())
        return (out,)


class _Detections(nn.Module):
    """A detector on one image ``(1, 3, H, W)`` in 0-1: ``boxes``, ``labels``, ``scores``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        detections = self.model([images[0]])[0]
        return tuple(detections[name] for name in _DETECTION_OUTPUTS)


@dataclass
class _Plan:
    kind: str
    wrapper: nn.Module
    size: tuple[int, int]
    #: the PIIP inside
    backbone: PIIP
    detector: bool = False
    #: the input a user gives: normalised (``randn`` stands in for it) or 0-1 images
    unit_range: bool = False
    note: str = ""


def _plan(model: nn.Module) -> _Plan:
    """The kind of ``model``, its export wrapper and its natural input size; refuses what does not export."""
    from ..tasks.detection import DINODetector, Detector, PIIPDetector
    from ..tasks.segmentation.model import PIIPSegmenter

    if isinstance(model, PIIP):
        size = model.config.input_size
        if model.config.task == "det":
            return _Plan("backbone", _Outputs(model), (size, size), model,
                         note="input: images normalised as for PIIP.forward; outputs: the feature pyramid's maps")
        return _Plan("classifier", _Outputs(model), (size, size), model,
                     note="input: normalised images; output: logits")
    if isinstance(model, PIIPSegmenter):
        config = model.config
        if config.inference == "slide":
            size = (config.crop_size, config.crop_size)
        else:
            side = min(config.test_scale) if config.test_scale else model.backbone.config.input_size
            size = (side, side)
        return _Plan("segmenter", _Outputs(model), size, model.backbone, unit_range=True,
                     note="input: images in 0-1 (normalised inside); output: logits at the input size")
    if isinstance(model, DINODetector):
        min_size, max_size, _ = model.config.resize
        return _Plan("detector (dino)", _Detections(model), (min_size, max_size), model.backbone.body,
                     detector=True, unit_range=True,
                     note="input: one image (1, 3, H, W) in 0-1, the detector's resize, normalisation and padding "
                          "inside; outputs: boxes (x1 y1 x2 y2, input pixels), labels (1-based), scores")
    if isinstance(model, PIIPDetector):
        raise OnnxExportError(
            f"a {model.config.kind} detector cannot be exported to ONNX: torch.export stops at data-dependent "
            "control flow in torchvision's RPN and RoI heads (batched_nms and BoxCoder.decode branch on the number "
            "of boxes) and in piip's per-level RoIAlign and mask paste, and the TorchScript exporter fixes the "
            "number of RoIs per level and the paste region to the example image's (wrong on any other image); "
            "export its backbone (model.backbone.body) or a DINO detector instead")
    if isinstance(model, Detector):
        raise OnnxExportError(f"a {type(model).__name__} detector (kind {getattr(model.config, 'kind', '?')!r}) "
                              "has no ONNX export: only DINO detectors export")
    raise OnnxExportError(f"export_onnx exports piip models (a PIIP backbone or classifier, a PIIPSegmenter, a "
                          f"DINO detector), got {type(model).__name__}")


# -- helpers --------------------------------------------------------------------------------------

def _require(*packages: str) -> None:
    missing = [name for name in packages if importlib.util.find_spec(name) is None]
    if missing:
        raise MissingOnnxPackages(f"ONNX export needs {', '.join(missing)}: pip install piip[onnx]")


def _size(size: int | tuple[int, int] | None, default: tuple[int, int]) -> tuple[int, int]:
    if size is None:
        return default
    pair = (size, size) if isinstance(size, int) else tuple(size)
    if len(pair) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in pair):
        raise ValueError(f"size must be a positive int or an (H, W) pair of them, got {size!r}")
    return pair


def _example(plan: _Plan, batch: int, size: tuple[int, int], seed: int, device: torch.device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    draw = torch.rand if plan.unit_range else torch.randn
    return draw(batch, 3, *size, generator=generator).to(device)


def _second_size(size: tuple[int, int]) -> tuple[int, int]:
    """The dynamic check's other size: taller by half, wider by a quarter (larger, so that a model
    with a minimum input size still runs; different ratios, so a mixed-up axis shows)."""
    return size[0] + size[0] // 2, size[1] + size[1] // 4


def _single_windows(backbone: PIIP, size: tuple[int, int]) -> list[str]:
    """The windowed branches of ``backbone`` that see images of ``size`` as one attention window.

    A dynamic export must not be traced there: ``torch.export`` records the example's window count
    (B windows of B images) as an equality and the graph then takes the batch for the window count
    at every size (onnxruntime fails on a Reshape). Two windows or more trace a graph for all sizes.
    """
    finest = backbone.config.input_size
    single = []
    for i, branch in enumerate(backbone.config.branches):
        scale = branch.resolution / finest
        h, w = ((math.floor(s * scale) if scale != 1 else s) // branch.patch_size for s in size)
        for window in sorted({ws for ws in branch.window_sizes if ws is not None}):
            if math.ceil(h / window) * math.ceil(w / window) < 2:
                single.append(f"branch {i + 1} ({h}x{w} tokens, window {window})")
    return single


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:400]


def _file_bytes(path: str) -> int:
    return sum(os.path.getsize(p) for p in (path, path + ".data") if os.path.isfile(p))


def _rename_axes(program, symbols: dict[str, str]) -> dict[str, dict[int, str]]:
    """Give the graph's symbolic dimensions readable names (``s14`` -> ``height``, in the outputs'
    expressions too: ``(s14//4)`` -> ``(height//4)``); returns every dynamic axis per input/output."""
    import onnx_ir as ir

    pattern = re.compile(r"\b(" + "|".join(map(re.escape, symbols)) + r")\b") if symbols else None
    axes: dict[str, dict[int, str]] = {}
    for value in (*program.model.graph.inputs, *program.model.graph.outputs):
        if value.shape is None:
            continue
        dims = []
        for i, dim in enumerate(value.shape):
            if isinstance(dim, ir.SymbolicDim) and dim.value is not None:
                name = pattern.sub(lambda m: symbols[m.group(1)], dim.value) if pattern else dim.value
                axes.setdefault(value.name, {})[i] = name
                dims.append(ir.SymbolicDim(name))
            else:
                dims.append(dim)
        value.shape = ir.Shape(dims)
    return axes


def _compare(plan: _Plan, reference: tuple[torch.Tensor, ...], got: list, names: list[str],
             input_shape: tuple[int, ...]) -> OnnxCheck:
    import numpy as np

    expected = [t.detach().cpu().numpy() for t in reference]
    for name, want, have in zip(names, expected, got):
        if tuple(want.shape) != tuple(have.shape):
            return OnnxCheck(tuple(input_shape), {}, mismatch=f"{name} has shape {tuple(have.shape)} in onnxruntime, "
                                                              f"{tuple(want.shape)} in PyTorch")
    if plan.detector:
        outputs = dict(zip(names, zip(expected, got)))
        boxes, labels, scores = (outputs[name] for name in _DETECTION_OUTPUTS)
        box_error = float(np.abs(boxes[0] - boxes[1]).max()) if boxes[0].size else 0.0
        score_error = float(np.abs(scores[0] - scores[1]).max()) if scores[0].size else 0.0
        equal = bool(np.array_equal(labels[0], labels[1]))
        box_tolerance = BOX_TOLERANCE + 1e-5 * max(input_shape[-2:])
        return OnnxCheck(tuple(input_shape), {"boxes": box_error, "scores": score_error}, labels_equal=equal,
                         detections=int(len(labels[0])),
                         passed=equal and box_error <= box_tolerance and score_error <= SCORE_TOLERANCE)
    errors = {}
    for name, want, have in zip(names, expected, got):
        want64, have64 = want.astype(np.float64), np.asarray(have, dtype=np.float64)
        errors[name] = float(np.linalg.norm(have64 - want64) / max(np.linalg.norm(want64), 1e-30))
    return OnnxCheck(tuple(input_shape), errors, passed=all(e <= REL_L2_TOLERANCE for e in errors.values()))


class _ExportSettings:
    """Eval mode and plain ``F.linear`` dense layers for the export; the model's own afterwards."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        self.training = self.model.training
        self.onednn = any(type(m) is Linear for m in self.model.modules())
        self.model.eval()
        use_onednn_linears(self.model, False)
        return self

    def __exit__(self, *exc):
        if self.onednn:
            use_onednn_linears(self.model, True)
        self.model.train(self.training)
        return False


# -- the export -----------------------------------------------------------------------------------

def export_onnx(model: nn.Module, path: str | os.PathLike, *, size: int | tuple[int, int] | None = None,
                dynamic: bool = False, opset: int = 18, check: bool = True) -> OnnxExport:
    """Export a piip model to an ONNX file of standard operators and (``check``) compare it with PyTorch.

    Args:
        model: a PIIP backbone (``task="det"``) or classifier, a ``PIIPSegmenter`` or a DINO detector
            (see the module's docstring for each one's input and outputs; the R-CNN detectors are refused).
        path: the ``.onnx`` file to write.
        size: the input's ``(H, W)`` (an int: square); default the model's natural input size.
        dynamic: dynamic batch, height and width (refused for a DINO detector); the result's
            ``dynamic_axes`` and ``notes`` say which axes the graph has dynamic.
        opset: ONNX opset (>= 16: ``GridSample``).
        check: run the file in onnxruntime and compare it with PyTorch (see :class:`OnnxCheck`).

    Raises :class:`OnnxExportError` (a ``ValueError``) in one line when the model cannot be exported,
    and :class:`MissingOnnxPackages` when onnx / onnxscript (/ onnxruntime) are not installed.
    """
    _require("onnx", "onnxscript", *(("onnxruntime",) if check else ()))
    if not isinstance(opset, int) or opset < MIN_OPSET:
        raise ValueError(f"opset must be an int >= {MIN_OPSET} (GridSample), got {opset!r}")
    if not isinstance(model, nn.Module):
        raise OnnxExportError(f"export_onnx exports a piip model, got {type(model).__name__}")
    plan = _plan(model)
    hw = _size(size, plan.size)
    if dynamic and plan.detector:
        raise OnnxExportError(
            "a DINO detector exports at a fixed input size only (dynamic=False): it takes one image, and "
            "its input transform (keep-ratio resize, padding) and padding masks compute sizes in Python, which "
            "torch.export fixes at the example's (a dynamic graph put boxes ~190 px off at another size); "
            "export one file per input size")
    if dynamic:
        single = _single_windows(plan.backbone, hw)
        if single:
            bigger = next((s for s in range(max(hw), 64 * max(hw), 8)
                           if not _single_windows(plan.backbone, (s, s))), None)
            raise OnnxExportError(
                f"a dynamic export of the {plan.kind} cannot be traced at {hw[0]}x{hw[1]}: that input is a "
                f"single attention window in {' and '.join(single)}, and the trace would then take the batch "
                f"size for the number of windows at every size; pass a larger size"
                + (f" (e.g. {bigger}x{bigger})" if bigger else ""))
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):  # before minutes of tracing, not after
        raise FileNotFoundError(f"cannot write {path!r}: the folder {folder!r} does not exist")
    device = next(iter(model.parameters())).device
    batch = 2 if dynamic else 1  # an example batch of 1 would fix the batch axis at 1
    example = _example(plan, batch, hw, 0, device)
    notes = [plan.note]
    with _ExportSettings(model), torch.no_grad():
        try:
            reference = plan.wrapper(example)
        except Exception as error:
            raise OnnxExportError(f"the {plan.kind} does not run on a {hw[0]}x{hw[1]} input "
                                  f"({_first_line(error)}); pass another size") from error
        names = plan.wrapper.keys if plan.kind == "backbone" else (
            list(_DETECTION_OUTPUTS) if plan.detector else ["logits"])
        start = time.perf_counter()
        program, axes = _export(plan, example, names, dynamic, opset, notes)
        program.save(path)
        seconds = time.perf_counter() - start
    result = OnnxExport(path=path, kind=plan.kind, file_bytes=_file_bytes(path), export_seconds=seconds,
                        input_names=[_INPUT], output_names=names, input_shape=tuple(example.shape), opset=opset,
                        dynamic_axes=axes, notes=[n for n in notes if n])
    if check:
        inputs = [example]
        if dynamic:
            inputs.append(_example(plan, 1, _second_size(hw), 1, device))
        elif plan.detector:
            inputs.append(_example(plan, batch, hw, 1, device))
        result.checks = _check(path, plan, model, inputs, names, reference)
    return result


def _export(plan: _Plan, example: torch.Tensor, names: list[str], dynamic: bool, opset: int,
            notes: list[str]):
    """``torch.export`` then ``torch.onnx.export``: the ONNX program and its dynamic axes."""
    from torch.export import Dim

    wanted = _AXES if dynamic else {}
    shapes = {_INPUT: {axis: Dim.AUTO for axis in wanted}} if wanted else None
    try:
        exported = torch.export.export(plan.wrapper, (example,), dynamic_shapes=shapes, strict=False)
    except Exception as error:
        raise OnnxExportError(f"torch.export cannot trace the {plan.kind} ({_first_line(error)})") from error
    symbols, fixed = {}, []
    placeholder = next(n for n in exported.graph.nodes if n.op == "placeholder" and n.name == _INPUT)
    for axis, name in wanted.items():
        dim = placeholder.meta["val"].shape[axis]
        if isinstance(dim, torch.SymInt):
            symbols[str(dim.node.expr)] = name
        else:
            fixed.append(f"{name} ({int(dim)})")
    if fixed:
        notes.append(f"not dynamic: {', '.join(fixed)}: the model's code fixes it (torch.export specialised it)")
    # onnxscript's optimizer logs what it leaves unfolded (warnings no user can act on)
    optimizer_log = logging.getLogger("onnxscript")
    level = optimizer_log.level
    optimizer_log.setLevel(logging.ERROR)
    try:
        program = torch.onnx.export(exported, (example,), input_names=[_INPUT], output_names=names,
                                    opset_version=opset, dynamo=True, verbose=False)
    except Exception as error:
        raise OnnxExportError(f"torch.onnx cannot translate the {plan.kind} ({_first_line(error)})") from error
    finally:
        optimizer_log.setLevel(level)
    foreign = sorted({node.domain for node in program.model.graph.all_nodes()} - {"", "ai.onnx"})
    if foreign:
        raise OnnxExportError(f"the {plan.kind}'s graph has operators outside the standard ONNX domain "
                              f"({', '.join(foreign)}): no runtime would run it")
    return program, _rename_axes(program, symbols)


def _check(path: str, plan: _Plan, model: nn.Module, inputs: list[torch.Tensor], names: list[str],
           reference: tuple[torch.Tensor, ...]) -> list[OnnxCheck]:
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    checks = []
    for i, images in enumerate(inputs):
        if i:
            with _ExportSettings(model), torch.no_grad():
                reference = plan.wrapper(images)
        try:
            got = session.run(names, {_INPUT: images.detach().cpu().numpy()})
        except Exception as error:  # onnxruntime's own error types
            checks.append(OnnxCheck(tuple(images.shape), {}, mismatch=f"onnxruntime failed: {_first_line(error)}"))
            continue
        checks.append(_compare(plan, reference, got, names, tuple(images.shape)))
    return checks
