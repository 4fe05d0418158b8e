"""Multi-scale deformable attention (MSDA), as PIIP's branch interactions use it: pure PyTorch, and a
Triton kernel on CUDA.

Conventions follow the Deformable-DETR op that the released PIIP checkpoints were trained with, so
weights load and behave the same:

* ``value`` is ``(N, S, M, D)``: levels concatenated along ``S``, each level row-major (``y*W + x``).
* Sampling locations are normalised ``(x, y)`` in ``[0, 1]``; pixel centres sit at ``(i + 0.5) / W``,
  i.e. the kernel samples at ``h = y*H - 0.5``, ``w = x*W - 0.5``. Neighbours outside the map count
  as zero. That is exactly ``F.grid_sample(v, 2*loc - 1, mode="bilinear", padding_mode="zeros",
  align_corners=False)``, so grid_sample is the sampling primitive here.
* The module's offsets are in value-map *pixels* (``loc = ref + offset / (W, H)``) around a
  reference point, or in fractions of the half size around a reference box (``loc = centre +
  offset / P * (w, h) / 2``, DINO's decoder), and its attention weights are softmaxed jointly over
  levels x points per head.

Why the sampling is laid out "points-major". Every head is folded into grid_sample's batch and all
``Lq*P`` points of a head become a single grid of shape ``(P, Lq)``. grid_sample vectorises along the
grid's last axis, so a long ``Lq`` axis fills the SIMD lanes (a ``(Lq, P)`` grid with P=4 leaves half
of an AVX2 register idle), and the weighted sum over points then reduces a non-inner axis with
contiguous rows. On a 2-core AVX2 CPU at PIIP-TSB shapes (query map 70x70, value map 56x56, 16
heads x 6 channels, 4 points) the forward takes 4.7 ms against 10.9 ms for the usual per-level
``(Lq, P)``-grid formulation, forward+backward 19.5 ms against 31 ms. PIIP always uses one level,
which makes the whole op one grid_sample call; more levels cost one call each.

Why a ``torch.library.custom_op``. An opaque op is what lets ``FlopCounterMode`` charge the op a
formula (grid_sample has none, so it would count 0), lets ``torch.compile`` treat it as one node
without graph breaks, and lets the backward save only the inputs: the backward recomputes the
samples instead of keeping the ``(N*M, D, L*P, Lq)`` intermediate, the same memory trade the CUDA
kernel makes. The backward is explicit (``aten.grid_sampler_2d_backward`` plus the weight
gradient), because autograd cannot record a graph inside a custom op's kernel. It is a
first-order gradient only: double backward is not supported.

The CUDA kernel. On CUDA tensors the op (forward and backward) runs the Triton kernels of
:mod:`piip.ops.ms_deform_attn_triton` when triton is usable: one pass gathers each point's four taps
and sums them into the output, and the backward recomputes the taps and gives the location and
weight gradients directly, and the value gradient by float32 atomic adds (so it is not bitwise
reproducible between runs), instead of grid_sample's per-level calls and the layout copies around
them. They follow grid_sample's zeros/align_corners=False rule and its arithmetic, so their results
equal the PyTorch path's to float32 rounding, gradients on pixel centres and borders included
(checked in Triton's CPU interpreter; the ``gpu``-marked tests check the compiled kernels, which
were written without a GPU to hand).
float64 inputs, a missing triton, and ``PIIP_MSDA_KERNEL=torch`` (the opt-out, e.g. to compare or to
rule the kernel out) run the PyTorch path on CUDA instead; ``PIIP_MSDA_KERNEL=triton`` makes an
unusable Triton an error rather than a fallback. The CPU always runs the PyTorch path, which is the
reference (:func:`ms_deform_attn_reference` is it, outside the custom op and differentiable by
autograd, for benchmarks and tests).

Why float32 inside. bf16 has ~3 significant digits, so a normalised coordinate on a 56-pixel map
loses about 0.2 px; measured, that is ~11% output error. The op therefore computes in float32
whenever its inputs are lower precision (float64 stays float64, for gradcheck) and returns
``value``'s dtype. :class:`MSDeformAttn` goes further and keeps everything that shapes the
locations (offset/weight linears, reference points, softmax) in float32 under autocast too.

FLOP convention. Each sampled point costs 5 multiply-accumulates per channel: 4 for the bilinear
interpolation and 1 for the weighted sum (the PIIP paper's rule). ``FlopCounterMode`` counts
FLOPs = 2 x MACs, so the op reports ``2 * 5 * N*Lq*M*L*P*D``; the backward reports twice the
forward, like a matmul's (one pass for the value gradient, one for the location and weight
gradients; the recomputation is not charged). Note that the paper's analytic counter charges the
query branch's full width ``D_q`` rather than the value width ``M*D = D_q * ratio`` (2x this count at
PIIP's ratio 0.5); a paper-convention counter has to apply that rule itself.
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence
from functools import reduce

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import register_flop_formula

from ._ms_deform_attn_inputs import check_inputs as _check_inputs
from .ms_deform_attn_triton import ms_deform_attn_triton, ms_deform_attn_triton_backward, triton_unavailable_reason

__all__ = ["MSDeformAttn", "ms_deform_attn", "ms_deform_attn_reference"]

SpatialShapes = Tensor | Sequence[tuple[int, int]]

# grid_sample settings that reproduce the CUDA kernel (pixel centres at +0.5, zeros outside).
_BILINEAR, _ZEROS = 0, 0
_GRID_SAMPLE_KWARGS = dict(mode="bilinear", padding_mode="zeros", align_corners=False)
_MACS_PER_SAMPLE_CHANNEL = 5  # 4 bilinear taps + 1 weighted sum
_KERNEL_ENV = "PIIP_MSDA_KERNEL"  # "torch": the CUDA kernels run the PyTorch path, not Triton


def _as_shape_tuple(spatial_shapes: SpatialShapes) -> tuple[tuple[int, int], ...]:
    """Normalise ``spatial_shapes`` to python ``(H, W)`` pairs.

    Python ints keep ``torch.compile`` free of data-dependent shapes; a tensor is accepted for
    compatibility with the original API but costs a device sync (and a graph break under compile).
    """
    if isinstance(spatial_shapes, Tensor):
        if spatial_shapes.dim() != 2 or spatial_shapes.shape[1] != 2:
            raise ValueError(
                "spatial_shapes must have shape (L, 2) as (H, W) rows, "
                f"got {tuple(spatial_shapes.shape)}")
        if spatial_shapes.is_floating_point() or spatial_shapes.is_complex():
            raise ValueError(f"spatial_shapes must be an integer tensor, got {spatial_shapes.dtype}")
        return tuple((h, w) for h, w in spatial_shapes.tolist())
    shapes = tuple(tuple(hw) for hw in spatial_shapes)
    if not shapes or any(len(hw) != 2 for hw in shapes):
        raise ValueError(
            f"spatial_shapes must be a non-empty sequence of (H, W) pairs, got {spatial_shapes!r}")
    return shapes


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float32, or float64 if any input is float64: never sample in half precision."""
    return reduce(torch.promote_types, (t.dtype for t in tensors), torch.float32)


def _pairs(flat_shapes: Sequence[int]) -> list[tuple[int, int]]:
    return list(zip(flat_shapes[0::2], flat_shapes[1::2]))


def _kernel_layout(value: Tensor, shapes: Sequence[tuple[int, int]], sampling_locations: Tensor,
                   attention_weights: Tensor) -> tuple[list[Tensor], Tensor, Tensor]:
    """Rearrange the inputs for grid_sample: heads into the batch, points-major grids.

    Returns per-level value maps ``(N*M, D, H, W)``, grids ``(L, N*M, P, Lq, 2)`` in grid_sample's
    [-1, 1] convention, and weights ``(L, N*M, 1, P, Lq)``. With a batch of one the reshapes are
    strided views. grid_sample reads a strided value map as fast as a contiguous one, so the maps
    stay views (no copy of the value). Grids and weights are made contiguous: products with strided
    operands come out strided, which makes grid_sample's backward copy its (large) gradient input.
    """
    n, _, m, d = value.shape
    _, lq, _, num_levels, num_points, _ = sampling_locations.shape
    heads_first = value.permute(0, 2, 3, 1)  # (N, M, D, S)
    levels = heads_first.split([h * w for h, w in shapes], dim=3)
    maps = [lvl.reshape(n * m, d, h, w) for lvl, (h, w) in zip(levels, shapes)]
    grids = (sampling_locations.permute(3, 0, 2, 4, 1, 5)
             .reshape(num_levels, n * m, num_points, lq, 2).contiguous().mul(2).sub_(1))
    weights = (attention_weights.permute(3, 0, 2, 4, 1)
               .reshape(num_levels, n * m, 1, num_points, lq).contiguous())
    return maps, grids, weights


def _forward(value: Tensor, shapes: Sequence[tuple[int, int]], sampling_locations: Tensor,
             attention_weights: Tensor) -> Tensor:
    n, _, m, d = value.shape
    lq = sampling_locations.shape[1]
    maps, grids, weights = _kernel_layout(value, shapes, sampling_locations, attention_weights)
    per_level = [F.grid_sample(v, g, **_GRID_SAMPLE_KWARGS).mul_(a).sum(2)  # (N*M, D, Lq)
                 for v, g, a in zip(maps, grids, weights)]
    out = per_level[0] if len(per_level) == 1 else torch.stack(per_level).sum(0)
    return out.view(n, m * d, lq).transpose(1, 2).contiguous()


def _backward(grad_output: Tensor, value: Tensor, shapes: Sequence[tuple[int, int]],
              sampling_locations: Tensor, attention_weights: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    n, _, m, d = value.shape
    lq = sampling_locations.shape[1]
    maps, grids, weights = _kernel_layout(value, shapes, sampling_locations, attention_weights)
    grad = grad_output.reshape(n, lq, m, d).permute(0, 2, 3, 1).reshape(n * m, d, 1, lq).contiguous()
    grad_maps, grad_grids, grad_weights = [], [], []
    for v, g, a in zip(maps, grids, weights):
        samples = F.grid_sample(v, g, **_GRID_SAMPLE_KWARGS)  # recomputed, not saved
        grad_weight = samples.mul_(grad).sum(1)  # (N*M, P, Lq)
        grad_samples = torch.mul(grad, a, out=samples)  # reuse the buffer: fresh pages are costly
        grad_map, grad_grid = torch.ops.aten.grid_sampler_2d_backward(
            grad_samples, v, g, _BILINEAR, _ZEROS, False, [True, True])
        # Views with the user-facing axes; the level axis comes from the concatenation below.
        grad_maps.append(grad_map.reshape(n, m, d, -1).permute(0, 3, 1, 2))  # (N, H*W, M, D)
        grad_grids.append(grad_grid.view(n, m, -1, lq, 2).permute(0, 3, 1, 2, 4))  # (N, Lq, M, P, 2)
        grad_weights.append(grad_weight.view(n, m, -1, lq).permute(0, 3, 1, 2))  # (N, Lq, M, P)
    # One copy per gradient undoes _kernel_layout. The copies go into contiguous buffers, as the
    # fake kernel promises: left to itself, cat picks a channels-last layout from permuted inputs.
    grad_value, grad_locations, grad_attention = (
        t.new_empty(t.shape) for t in (value, sampling_locations, attention_weights))
    torch.cat(grad_maps, dim=1, out=grad_value)
    torch.stack(grad_grids, dim=3, out=grad_locations)
    torch.stack(grad_weights, dim=3, out=grad_attention)
    return grad_value, grad_locations.mul_(2), grad_attention  # d(grid)/d(loc) = 2


def _body(value: Tensor, shapes: Sequence[tuple[int, int]], sampling_locations: Tensor,
          attention_weights: Tensor) -> Tensor:
    """The op's computation: :func:`_forward` in float32 (float64 stays), returned in ``value``'s dtype."""
    dtype = _compute_dtype(value, sampling_locations, attention_weights)
    out = _forward(value.to(dtype), shapes, sampling_locations.to(dtype), attention_weights.to(dtype))
    return out.to(value.dtype)


def ms_deform_attn_reference(value: Tensor, spatial_shapes: SpatialShapes, sampling_locations: Tensor,
                             attention_weights: Tensor) -> Tensor:
    """The op's pure-PyTorch computation (grid_sample), differentiable by autograd, on any device.

    What the op runs on the CPU (and on CUDA without Triton), here outside the custom op: a
    benchmark can time it against the Triton kernel on one device, and tests compare with it.
    Arguments and result as :func:`ms_deform_attn`.
    """
    shapes = _as_shape_tuple(spatial_shapes)
    _check_inputs(value, shapes, sampling_locations, attention_weights)
    return _body(value, shapes, sampling_locations, attention_weights)


def _backward_body(grad_output: Tensor, value: Tensor, shapes: Sequence[tuple[int, int]],
                   sampling_locations: Tensor, attention_weights: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The backward op's pure-PyTorch computation: :func:`_backward` in float32 (float64 stays),
    each gradient returned in its input's dtype."""
    dtype = _compute_dtype(grad_output, value, sampling_locations, attention_weights)
    grads = _backward(grad_output.to(dtype), value.to(dtype), shapes, sampling_locations.to(dtype),
                      attention_weights.to(dtype))
    inputs = (value, sampling_locations, attention_weights)
    return tuple(g.to(t.dtype) for g, t in zip(grads, inputs))


def _cuda_implementation(*tensors: Tensor) -> str:
    """``"triton"`` or ``"torch"``: what the op's CUDA kernels run for these inputs.

    Triton when it is usable and no input is float64 (the kernel computes in float32; float64 is
    gradcheck's, and the reference's), unless ``PIIP_MSDA_KERNEL=torch``; ``PIIP_MSDA_KERNEL=triton``
    makes an unusable Triton an error instead of a quiet fallback.
    """
    setting = os.environ.get(_KERNEL_ENV, "").strip().lower()
    if setting not in ("", "auto", "triton", "torch"):
        raise ValueError(f"{_KERNEL_ENV}={setting!r}: expected 'torch', 'triton' or 'auto' (the default)")
    if setting == "torch":
        return "torch"
    if any(t.dtype == torch.float64 for t in tensors):
        reason = "float64 inputs (the kernel computes in float32)"
    else:
        reason = triton_unavailable_reason()
    if reason is None:
        return "triton"
    if setting == "triton":
        raise RuntimeError(f"{_KERNEL_ENV}=triton, but the Triton kernel cannot run: {reason}")
    return "torch"


@torch.library.custom_op("piip::ms_deform_attn", mutates_args=())
def _ms_deform_attn_op(value: Tensor, spatial_shapes: list[int], sampling_locations: Tensor,
                       attention_weights: Tensor) -> Tensor:
    return _body(value, _pairs(spatial_shapes), sampling_locations, attention_weights)


@_ms_deform_attn_op.register_kernel("cuda")
def _ms_deform_attn_cuda(value: Tensor, spatial_shapes: list[int], sampling_locations: Tensor,
                         attention_weights: Tensor) -> Tensor:
    if _cuda_implementation(value, sampling_locations, attention_weights) == "triton":
        return ms_deform_attn_triton(value, _pairs(spatial_shapes), sampling_locations, attention_weights)
    return _body(value, _pairs(spatial_shapes), sampling_locations, attention_weights)


@_ms_deform_attn_op.register_fake
def _(value: Tensor, spatial_shapes: list[int], sampling_locations: Tensor,
      attention_weights: Tensor) -> Tensor:
    n, _, m, d = value.shape
    return value.new_empty((n, sampling_locations.shape[1], m * d))


@torch.library.custom_op("piip::ms_deform_attn_backward", mutates_args=())
def _ms_deform_attn_backward_op(grad_output: Tensor, value: Tensor, spatial_shapes: list[int],
                                sampling_locations: Tensor,
                                attention_weights: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return _backward_body(grad_output, value, _pairs(spatial_shapes), sampling_locations, attention_weights)


@_ms_deform_attn_backward_op.register_kernel("cuda")
def _ms_deform_attn_backward_cuda(grad_output: Tensor, value: Tensor, spatial_shapes: list[int],
                                  sampling_locations: Tensor,
                                  attention_weights: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    if _cuda_implementation(grad_output, value, sampling_locations, attention_weights) == "triton":
        return ms_deform_attn_triton_backward(grad_output, value, _pairs(spatial_shapes), sampling_locations,
                                              attention_weights)
    return _backward_body(grad_output, value, _pairs(spatial_shapes), sampling_locations, attention_weights)


@_ms_deform_attn_backward_op.register_fake
def _(grad_output: Tensor, value: Tensor, spatial_shapes: list[int], sampling_locations: Tensor,
      attention_weights: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return tuple(t.new_empty(t.shape) for t in (value, sampling_locations, attention_weights))


def _setup_context(ctx, inputs: tuple, output: Tensor) -> None:
    value, spatial_shapes, sampling_locations, attention_weights = inputs
    ctx.save_for_backward(value, sampling_locations, attention_weights)
    ctx.spatial_shapes = spatial_shapes


def _autograd_backward(ctx, grad_output: Tensor) -> tuple[Tensor, None, Tensor, Tensor]:
    value, sampling_locations, attention_weights = ctx.saved_tensors
    grad_value, grad_locations, grad_attention = _ms_deform_attn_backward_op(
        grad_output, value, ctx.spatial_shapes, sampling_locations, attention_weights)
    return grad_value, None, grad_locations, grad_attention


_ms_deform_attn_op.register_autograd(_autograd_backward, setup_context=_setup_context)


def _forward_flops(value_shape: Sequence[int], attention_weights_shape: Sequence[int]) -> int:
    """FLOPs (= 2 x MACs) of one forward: 5 MACs per sampled point per value channel."""
    return 2 * _MACS_PER_SAMPLE_CHANNEL * math.prod(attention_weights_shape) * value_shape[-1]


@register_flop_formula(torch.ops.piip.ms_deform_attn)
def _ms_deform_attn_flops(value_shape, spatial_shapes, sampling_locations_shape,
                          attention_weights_shape, *args, out_shape=None, **kwargs) -> int:
    return _forward_flops(value_shape, attention_weights_shape)


@register_flop_formula(torch.ops.piip.ms_deform_attn_backward)
def _ms_deform_attn_backward_flops(grad_output_shape, value_shape, spatial_shapes,
                                   sampling_locations_shape, attention_weights_shape, *args,
                                   out_shape=None, **kwargs) -> int:
    return 2 * _forward_flops(value_shape, attention_weights_shape)


def _softmax_last(x: Tensor) -> Tensor:
    """``x.softmax(-1)`` for a short last axis (PIIP's L*P = 4 weights per head).

    PyTorch's CPU softmax vectorises along the softmax axis, which at length 4 leaves most of each
    SIMD register idle: it takes 1.5 ms on (1, 3136, 16, 4) where these four element-wise ops take
    0.3 ms (~60 ms of a PIIP-TSB 1120 forward). The subtracted maximum is detached: softmax does not
    depend on it, so the gradient is softmax's own.
    """
    e = (x - x.amax(-1, keepdim=True).detach()).exp()
    return e / e.sum(-1, keepdim=True)


def ms_deform_attn(value: Tensor, spatial_shapes: SpatialShapes, sampling_locations: Tensor,
                   attention_weights: Tensor) -> Tensor:
    """Multi-scale deformable attention sampling.

    Args:
        value: ``(N, S, M, D)``, levels concatenated along ``S``, row-major within a level.
        spatial_shapes: ``(H, W)`` of each level, as a sequence of int pairs (preferred; keeps
            ``torch.compile`` graphs static) or an ``(L, 2)`` integer tensor.
        sampling_locations: ``(N, Lq, M, L, P, 2)``, normalised ``(x, y)``; points outside
            ``[0, 1]`` see zeros beyond the map border.
        attention_weights: ``(N, Lq, M, L, P)``, used as given (normalise them beforehand).

    Returns:
        ``(N, Lq, M*D)`` in ``value``'s dtype, computed in float32 (float64 if any input is).
    """
    shapes = _as_shape_tuple(spatial_shapes)
    _check_inputs(value, shapes, sampling_locations, attention_weights)
    if torch.compiler.is_exporting():
        # torch.export (and so torch.onnx.export(dynamo=True)) keeps a custom op as one opaque node,
        # which the ONNX exporter can only write as a node of a custom domain (piip::ms_deform_attn)
        # that no runtime knows. Exported, the op is its own body instead: grid_sample and
        # element-wise arithmetic, which ONNX has as standard operators (GridSample, opset >= 16).
        # Eager mode and torch.compile keep the op (FLOP formula, one node, the lean backward).
        return _body(value, shapes, sampling_locations, attention_weights)
    flat_shapes = [size for hw in shapes for size in hw]
    return _ms_deform_attn_op(value, flat_shapes, sampling_locations, attention_weights)


class MSDeformAttn(nn.Module):
    """Deformable cross-attention with the original parameterisation (PIIP's interaction core, and
    the attention of DINO's encoder and decoder).

    Submodule names and shapes match the released checkpoints: ``sampling_offsets``,
    ``attention_weights``, ``value_proj`` (``d_value_in -> int(d_model*ratio)``) and
    ``output_proj``. PIIP uses one level, 16 heads, 4 points and ratio 0.5.

    Mixed precision: under autocast, ``value_proj``/``output_proj`` run in autocast's dtype, but
    everything that decides *where* to sample (the offset and weight linears, reference points,
    location arithmetic, softmax) and the sampling itself run with autocast disabled in float32,
    because bf16 locations alone give ~11% output error. The two linears run in their parameters'
    dtype (float32 for the usual fp32 master weights); a module whose parameters were cast to bf16
    thus gets bf16 pixel offsets (a fraction of a percent of the offset, not of the coordinate),
    but the location arithmetic stays float32.
    """

    def __init__(self, d_model: int, n_levels: int = 1, n_heads: int = 16, n_points: int = 4,
                 ratio: float = 0.5, d_value_in: int | None = None) -> None:
        super().__init__()
        d_value = int(d_model * ratio)
        if d_value % n_heads != 0:
            raise ValueError(
                f"int(d_model * ratio) = int({d_model} * {ratio}) = {d_value} must be divisible by "
                f"n_heads={n_heads}")
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.d_value = d_value
        self.d_value_in = d_model if d_value_in is None else d_value_in
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(self.d_value_in, d_value)
        self.output_proj = nn.Linear(d_value, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The original init: offsets start on rings around the reference, weights uniform.

        Head ``m`` points along angle ``2*pi*m/M``, scaled onto the unit square, and point ``p``
        sits at ``p + 1`` times that direction (in value-map pixels), the same for every level.
        Zero attention logits give every sample weight ``1/(L*P)``.
        """
        nn.init.zeros_(self.sampling_offsets.weight)
        theta = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        direction = torch.stack([theta.cos(), theta.sin()], dim=-1)
        direction = direction / direction.abs().max(dim=-1, keepdim=True).values
        scale = torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        grid = direction.view(self.n_heads, 1, 1, 2).expand(-1, self.n_levels, self.n_points, -1) * scale
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for proj in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)

    def forward(self, query: Tensor, reference_points: Tensor, value_input: Tensor,
                spatial_shapes: SpatialShapes, input_padding_mask: Tensor | None = None) -> Tensor:
        """Attend from ``query`` to a few learned samples around each reference point.

        Args:
            query: ``(N, Lq, d_model)``.
            reference_points: normalised points ``(x, y)``, shape ``(N, Lq, L, 2)`` or ``(N, Lq, 2)``
                (shared by all levels), or normalised boxes ``(cx, cy, w, h)``, shape
                ``(N, Lq, L, 4)`` or ``(N, Lq, 4)``; a batch of 1 broadcasts over ``N``, as PIIP's
                reference points are the same for every image. Around a point the offsets are in
                value-map pixels (``loc = ref + offset / (W, H)``); around a box they are in
                fractions of its half size, one ``n_points``-th per unit
                (``loc = centre + offset / n_points * (w, h) * 0.5``: Deformable DETR's rule for
                box references, which DINO's decoder uses).
            value_input: ``(N, S, d_value_in)`` with ``S = sum(H*W)`` over levels.
            spatial_shapes: ``(H, W)`` per level; python int pairs keep ``torch.compile`` static.
            input_padding_mask: optional ``(N, S)`` bool, True where ``value_input`` is padding.

        Returns:
            ``(N, Lq, d_model)``.
        """
        shapes = _as_shape_tuple(spatial_shapes)
        self._check_forward_inputs(query, reference_points, value_input, shapes, input_padding_mask)
        n, lq, _ = query.shape
        num_heads, num_levels, num_points = self.n_heads, self.n_levels, self.n_points

        value = self.value_proj(value_input)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = value.view(n, value_input.shape[1], num_heads, self.d_value // num_heads)

        precise = torch.promote_types(self.sampling_offsets.weight.dtype, torch.float32)
        # autocast knows no "meta" device; meta tensors (shape-only FLOP counting) take the cpu rule
        device_type = "cpu" if query.is_meta else query.device.type
        with torch.autocast(device_type=device_type, enabled=False):
            q = query.to(self.sampling_offsets.weight.dtype)
            offsets = (self.sampling_offsets(q).to(precise)
                       .view(n, lq, num_heads, num_levels, num_points, 2))
            logits = (self.attention_weights(q).to(precise)
                      .view(n, lq, num_heads, num_levels * num_points))
            weights = _softmax_last(logits).view(n, lq, num_heads, num_levels, num_points)
            if reference_points.dim() == 3:
                reference_points = reference_points.unsqueeze(2)
            reference_points = reference_points.to(precise)[:, :, None, :, None, :]
            if reference_points.shape[-1] == 2:
                pixels_per_unit = torch.tensor([(w, h) for h, w in shapes], dtype=precise,
                                               device=query.device)
                locations = reference_points + offsets / pixels_per_unit[:, None, :]
            else:  # boxes: the operations in mmcv's order, so the locations round as theirs do
                locations = (reference_points[..., :2]
                             + offsets / num_points * reference_points[..., 2:] * 0.5)
            sampled = ms_deform_attn(value, shapes, locations, weights)
        return self.output_proj(sampled)

    def _check_forward_inputs(self, query: Tensor, reference_points: Tensor, value_input: Tensor,
                              shapes: tuple[tuple[int, int], ...],
                              input_padding_mask: Tensor | None) -> None:
        if query.dim() != 3 or query.shape[-1] != self.d_model:
            raise ValueError(
                f"query must have shape (N, Lq, d_model={self.d_model}), got {tuple(query.shape)}")
        n, lq, _ = query.shape
        if (value_input.dim() != 3 or value_input.shape[0] != n
                or value_input.shape[-1] != self.d_value_in):
            raise ValueError(
                f"value_input must have shape (N={n}, S, d_value_in={self.d_value_in}), "
                f"got {tuple(value_input.shape)}")
        if len(shapes) != self.n_levels:
            raise ValueError(
                f"spatial_shapes has {len(shapes)} levels but the module has n_levels={self.n_levels}")
        num_tokens = sum(h * w for h, w in shapes)
        if value_input.shape[1] != num_tokens:
            raise ValueError(
                f"value_input has S={value_input.shape[1]} tokens but spatial_shapes {list(shapes)} "
                f"cover sum(H*W)={num_tokens}")
        ref = reference_points.shape
        if (reference_points.dim() not in (3, 4) or ref[0] not in (1, n) or ref[1] != lq
                or ref[-1] not in (2, 4) or (reference_points.dim() == 4 and ref[2] not in (1, self.n_levels))):
            raise ValueError(
                f"reference_points must have shape (N or 1, Lq={lq}, L={self.n_levels}, 2 or 4) or "
                f"(N or 1, Lq={lq}, 2 or 4), got {tuple(ref)}")
        if (input_padding_mask is not None
                and tuple(input_padding_mask.shape) != tuple(value_input.shape[:2])):
            raise ValueError(
                f"input_padding_mask must have shape (N, S) = {tuple(value_input.shape[:2])}, "
                f"got {tuple(input_padding_mask.shape)}")

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, n_levels={self.n_levels}, n_heads={self.n_heads}, "
                f"n_points={self.n_points}, d_value={self.d_value}")
