"""Triton kernels of :func:`piip.ops.ms_deform_attn` (forward and backward), for CUDA tensors.

The ``piip::ms_deform_attn`` op runs these on CUDA when Triton is usable (see
:mod:`piip.ops.ms_deform_attn`: ``PIIP_MSDA_KERNEL=torch`` opts out); on the CPU the op stays the
pure-PyTorch reference. The conventions are the op's: value ``(N, S, M, D)`` with levels concatenated
row-major, normalised ``(x, y)`` locations sampled like ``grid_sample(padding_mode="zeros",
align_corners=False)``, float32 arithmetic whatever the inputs' precision, the output in ``value``'s
dtype and each gradient in its input's dtype.

float64 is refused (TypeError) rather than computed: the kernels exist for speed in float32/bf16
training, float64 is for gradcheck, where the PyTorch reference is the thing to check, and GPUs
outside the data-centre parts run float64 at a small fraction of float32 speed. The op sends float64
inputs to the reference instead.

The kernels were written and tested with Triton's CPU interpreter (``TRITON_INTERPRET=1``), without
a GPU to hand; the ``gpu``-marked tests of tests/test_ms_deform_attn_triton.py check them compiled.

This module imports only torch (and the op's input check). triton is imported when a kernel first runs
(``_ms_deform_attn_kernels``), so ``import piip`` works without triton and pays nothing for it.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import itertools
import os
from collections.abc import Sequence

import torch
from torch import Tensor

from ._ms_deform_attn_inputs import check_inputs

__all__ = ["ms_deform_attn_triton", "ms_deform_attn_triton_backward", "triton_unavailable_reason"]

_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_TILE = 1024  # elements of a (queries x channels) tile: 8 float32 registers a thread at 4 warps


@functools.cache
def triton_unavailable_reason() -> str | None:
    """None when the Triton kernels can run CUDA tensors, else a one-line reason why not."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    try:
        importlib.import_module("._ms_deform_attn_kernels", __package__)  # imports triton; no kernel made yet
    except Exception as exc:  # a broken install or an unsupported version: the PyTorch path still works
        return f"the Triton kernels failed to import ({type(exc).__name__}: {exc})"
    return None


def _interpreting() -> bool:
    """Triton's TRITON_INTERPRET setting, as ``triton.jit`` reads it."""
    try:
        from triton import knobs
    except ImportError:  # triton < 3.4 reads the variable itself
        return os.environ.get("TRITON_INTERPRET", "0") == "1"
    return bool(knobs.runtime.interpret)


def _kernels(device: torch.device):
    reason = triton_unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"the Triton kernels of ms_deform_attn cannot run: {reason}")
    if device.type != "cuda" and not _interpreting():
        raise ValueError(f"the Triton kernels run CUDA tensors (or any tensors with TRITON_INTERPRET=1, "
                         f"Triton's CPU interpreter), got tensors on {device}")
    from ._ms_deform_attn_kernels import kernels

    return kernels(_interpreting())


def _next_power_of_2(x: int) -> int:
    return 1 << max(x - 1, 0).bit_length()


def _launch_config(num_queries: int, dim: int) -> tuple[int, int]:
    """``(BLOCK_Q, BLOCK_D)``: the channels padded to a power of two, queries filling the tile."""
    block_d = max(4, _next_power_of_2(dim))
    block_q = max(16, min(128, _TILE // block_d))
    return min(block_q, max(16, _next_power_of_2(num_queries))), block_d


def _device_guard(t: Tensor):
    # Triton launches on the current CUDA device's stream; a tensor on another GPU needs a switch.
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _check(value: Tensor, spatial_shapes: Sequence[tuple[int, int]], sampling_locations: Tensor,
           attention_weights: Tensor) -> tuple[tuple[int, int], ...]:
    shapes = tuple((int(h), int(w)) for h, w in spatial_shapes)
    check_inputs(value, shapes, sampling_locations, attention_weights)
    for name, t in (("value", value), ("sampling_locations", sampling_locations),
                    ("attention_weights", attention_weights)):
        if t.dtype not in _SUPPORTED_DTYPES:
            raise TypeError(
                f"the Triton kernel takes float32, bfloat16 or float16 ({name} is {t.dtype}); it computes "
                "in float32, so float64 goes to the PyTorch reference (ms_deform_attn_reference)")
        if t.device != value.device:
            raise ValueError(f"{name} is on {t.device} but value is on {value.device}")
    return shapes


def _level_starts(shapes: Sequence[tuple[int, int]]) -> list[int]:
    return list(itertools.accumulate((h * w for h, w in shapes), initial=0))[:-1]


def ms_deform_attn_triton(value: Tensor, spatial_shapes: Sequence[tuple[int, int]],
                          sampling_locations: Tensor, attention_weights: Tensor) -> Tensor:
    """The op's forward with the Triton kernel: ``(N, Lq, M*D)`` in ``value``'s dtype.

    Arguments as :func:`piip.ops.ms_deform_attn` (``spatial_shapes`` as python ``(H, W)`` pairs).
    Not differentiable by itself: the op pairs it with :func:`ms_deform_attn_triton_backward`.
    """
    shapes = _check(value, spatial_shapes, sampling_locations, attention_weights)
    n, s, m, d = value.shape
    _, lq, _, num_levels, num_points, _ = sampling_locations.shape
    value, sampling_locations, attention_weights = (
        t.contiguous() for t in (value, sampling_locations, attention_weights))
    # One level writes the output directly; more levels add up in a float32 buffer, one launch each.
    out = value.new_empty((n, lq, m * d), dtype=value.dtype if num_levels == 1 else torch.float32)
    if out.numel() == 0:
        return out.to(value.dtype)
    forward, _ = _kernels(value.device)
    block_q, block_d = _launch_config(lq, d)
    grid = (-(-lq // block_q) * n * m,)
    with _device_guard(value):
        for level, ((h, w), start) in enumerate(zip(shapes, _level_starts(shapes))):
            forward[grid](value, sampling_locations, attention_weights, out,
                          s, m, d, lq, num_levels, num_points, h, w, start, level,
                          ACCUMULATE=level > 0, BLOCK_Q=block_q, BLOCK_D=block_d, num_warps=4)
    return out.to(value.dtype)


def ms_deform_attn_triton_backward(
        grad_output: Tensor, value: Tensor, spatial_shapes: Sequence[tuple[int, int]],
        sampling_locations: Tensor, attention_weights: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(grad_value, grad_sampling_locations, grad_attention_weights)`` of the op, each in its
    input's dtype. ``grad_value`` is summed in float32 (atomics: queries share taps), so it is not
    bitwise reproducible from run to run; the other two are."""
    shapes = _check(value, spatial_shapes, sampling_locations, attention_weights)
    n, s, m, d = value.shape
    _, lq, _, num_levels, num_points, _ = sampling_locations.shape
    if tuple(grad_output.shape) != (n, lq, m * d):
        raise ValueError(f"grad_output must have shape {(n, lq, m * d)}, got {tuple(grad_output.shape)}")
    if grad_output.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"the Triton kernel takes float32, bfloat16 or float16 grad_output, got {grad_output.dtype}")
    grad_output, value, sampling_locations, attention_weights = (
        t.contiguous() for t in (grad_output, value, sampling_locations, attention_weights))
    grad_value = torch.zeros(value.shape, dtype=torch.float32, device=value.device)
    if grad_output.numel() == 0:  # no query, head or channel: every gradient is zero
        return (grad_value.to(value.dtype), torch.zeros_like(sampling_locations),
                torch.zeros_like(attention_weights))
    grad_locations = torch.empty_like(sampling_locations)
    grad_weights = torch.empty_like(attention_weights)
    _, backward = _kernels(value.device)
    block_q, block_d = _launch_config(lq, d)
    grid = (-(-lq // block_q) * n * m,)
    with _device_guard(value):
        for level, ((h, w), start) in enumerate(zip(shapes, _level_starts(shapes))):
            backward[grid](grad_output, value, sampling_locations, attention_weights,
                           grad_value, grad_locations, grad_weights,
                           s, m, d, lq, num_levels, num_points, h, w, start, level,
                           BLOCK_Q=block_q, BLOCK_D=block_d, num_warps=4)
    return grad_value.to(value.dtype), grad_locations, grad_weights
