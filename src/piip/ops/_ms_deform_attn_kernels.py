"""Triton kernels of multi-scale deformable attention (imported on first use: this module needs triton).

The kernel functions are plain functions here, decorated by :func:`kernels` on first use and once per
setting of ``TRITON_INTERPRET``: ``triton.jit`` decides at decoration whether a kernel is compiled or
run by Triton's CPU interpreter, so decorating at import would fix that choice for the whole process.
Decorating per setting lets a test switch the interpreter on for CPU tensors while CUDA tensors in the
same process still get compiled kernels. For the same reason a kernel here calls no jitted helper
(it would have to exist in both flavours): the tap arithmetic is written out in both kernels.

One launch handles one level. Each program takes a block of queries of one head, on a 1-D grid
(no 65535 limit on batch x heads) ordered so that the blocks of one head, which read the same value
map, run together. Every tensor is contiguous in the
op's layout, and each program reads its queries' points of the level, so it needs no level table:
the launcher passes the level's ``H, W`` and start token as scalars.

The sampling arithmetic is grid_sample's own (``g = 2*loc - 1``, then ``ix = ((g + 1)*W - 1) / 2``
as in ATen's CUDA kernel), not the shorter ``loc*W - 0.5``: the two round differently in the last
bit, and where ``ix`` lands on an integer (a pixel centre) that bit picks the bilinear cell, whose
one-sided slope is the location gradient. With grid_sample's rounding the kernel picks grid_sample's
cell, so its gradients equal the reference's on pixel centres and borders too.
"""
import functools

import triton
import triton.language as tl

__all__ = ["kernels"]

# The kernels call triton.language's builtins only, none of its own @triton.jit library functions
# (tl.zeros, tl.sum): those were made compiled or interpreted once, when triton was first imported,
# and an interpreted kernel cannot call a compiled function. A sum is therefore tl.reduce with
# tl.sum's own combine function (tl.sum is exactly that reduction), which the interpreter also
# recognises and sums with numpy. A triton without it fails this import, and
# triton_unavailable_reason reports that instead of a kernel failing later.
_SUM = tl.standard._sum_combine

# Scalars that change with the image size: not specialised (Triton would otherwise compile a
# variant per divisibility-by-16 pattern of each, a stream of recompiles under multi-scale training).
_SIZE_ARGS = ["S", "Lq", "H", "W", "level_start", "level"]


def _msda_forward(value_ptr, loc_ptr, attn_ptr, out_ptr,
                  S, M, D, Lq, L, P, H, W, level_start, level,
                  ACCUMULATE: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[n, q, m*D + d] (+)= sum_p attn[n, q, m, level, p] * bilinear(value[n, level's tokens, m, d])."""
    num_q_blocks = (Lq + BLOCK_Q - 1) // BLOCK_Q
    head = tl.program_id(0) // num_q_blocks  # n * M + m
    q_block = tl.program_id(0) % num_q_blocks
    n = (head // M).to(tl.int64)
    m = head % M
    offs_q = q_block * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_d = tl.arange(0, BLOCK_D)
    q_mask = offs_q < Lq
    qd_mask = q_mask[:, None] & (offs_d < D)[None, :]
    row_stride = M * D  # from one token of value (N, S, M, D) to the next
    value_head = value_ptr + (n * S + level_start) * row_stride + m * D + offs_d[None, :]
    query_head = (n * Lq + offs_q) * M + m  # index into (N, Lq, M), int64
    point0 = (query_head * L + level) * P  # index into (N, Lq, M, L, P) of this level's first point

    acc = tl.full([BLOCK_Q, BLOCK_D], 0.0, tl.float32)
    for p in range(P):
        point = point0 + p
        x = tl.load(loc_ptr + point * 2, mask=q_mask, other=0.0).to(tl.float32)
        y = tl.load(loc_ptr + point * 2 + 1, mask=q_mask, other=0.0).to(tl.float32)
        a = tl.load(attn_ptr + point, mask=q_mask, other=0.0).to(tl.float32)
        # --- the four taps, as in _msda_backward ---
        gx = x * 2.0 - 1.0
        gy = y * 2.0 - 1.0
        ix = ((gx + 1.0) * W - 1.0) * 0.5
        iy = ((gy + 1.0) * H - 1.0) * 0.5
        x0 = tl.floor(ix)
        y0 = tl.floor(iy)
        wx1 = ix - x0
        wx0 = (x0 + 1.0) - ix
        wy1 = iy - y0
        wy0 = (y0 + 1.0) - iy
        # bounds in floating point, before any float->int conversion: far-off points stay harmless
        in_x0 = (x0 >= 0.0) & (x0 <= W - 1.0)
        in_x1 = (x0 >= -1.0) & (x0 <= W - 2.0)
        in_y0 = (y0 >= 0.0) & (y0 <= H - 1.0)
        in_y1 = (y0 >= -1.0) & (y0 <= H - 2.0)
        xa = tl.where(in_x0, x0, 0.0).to(tl.int32)  # column of the western taps (0 where outside)
        xb = tl.where(in_x1, x0 + 1.0, 0.0).to(tl.int32)
        ya = tl.where(in_y0, y0, 0.0).to(tl.int32)
        yb = tl.where(in_y1, y0 + 1.0, 0.0).to(tl.int32)
        off00 = ((ya * W + xa).to(tl.int64) * row_stride)[:, None]
        off01 = ((ya * W + xb).to(tl.int64) * row_stride)[:, None]
        off10 = ((yb * W + xa).to(tl.int64) * row_stride)[:, None]
        off11 = ((yb * W + xb).to(tl.int64) * row_stride)[:, None]
        m00 = qd_mask & (in_y0 & in_x0)[:, None]
        m01 = qd_mask & (in_y0 & in_x1)[:, None]
        m10 = qd_mask & (in_y1 & in_x0)[:, None]
        m11 = qd_mask & (in_y1 & in_x1)[:, None]
        # --- end of the taps ---
        v00 = tl.load(value_head + off00, mask=m00, other=0.0).to(tl.float32)
        v01 = tl.load(value_head + off01, mask=m01, other=0.0).to(tl.float32)
        v10 = tl.load(value_head + off10, mask=m10, other=0.0).to(tl.float32)
        v11 = tl.load(value_head + off11, mask=m11, other=0.0).to(tl.float32)
        sample = ((wy0 * wx0)[:, None] * v00 + (wy0 * wx1)[:, None] * v01
                  + (wy1 * wx0)[:, None] * v10 + (wy1 * wx1)[:, None] * v11)
        acc += a[:, None] * sample

    out_ptrs = out_ptr + query_head[:, None] * D + offs_d[None, :]
    if ACCUMULATE:  # a later level: add to the earlier levels' sum (a float32 buffer)
        acc += tl.load(out_ptrs, mask=qd_mask, other=0.0).to(tl.float32)
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=qd_mask)


def _msda_backward(grad_out_ptr, value_ptr, loc_ptr, attn_ptr,
                   grad_value_ptr, grad_loc_ptr, grad_attn_ptr,
                   S, M, D, Lq, L, P, H, W, level_start, level,
                   BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr):
    """The three gradients of one level's share of the output.

    grad_value gets ``attn * tap weight * grad_out`` at each tap (float32 atomics: queries share
    taps); the location and weight gradients of a point belong to one program and are stored.
    """
    num_q_blocks = (Lq + BLOCK_Q - 1) // BLOCK_Q
    head = tl.program_id(0) // num_q_blocks  # n * M + m
    q_block = tl.program_id(0) % num_q_blocks
    n = (head // M).to(tl.int64)
    m = head % M
    offs_q = q_block * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_d = tl.arange(0, BLOCK_D)
    q_mask = offs_q < Lq
    qd_mask = q_mask[:, None] & (offs_d < D)[None, :]
    row_stride = M * D
    head_offset = (n * S + level_start) * row_stride + m * D + offs_d[None, :]
    value_head = value_ptr + head_offset
    grad_value_head = grad_value_ptr + head_offset
    query_head = (n * Lq + offs_q) * M + m
    point0 = (query_head * L + level) * P
    grad = tl.load(grad_out_ptr + query_head[:, None] * D + offs_d[None, :], mask=qd_mask,
                   other=0.0).to(tl.float32)

    for p in range(P):
        point = point0 + p
        x = tl.load(loc_ptr + point * 2, mask=q_mask, other=0.0).to(tl.float32)
        y = tl.load(loc_ptr + point * 2 + 1, mask=q_mask, other=0.0).to(tl.float32)
        a = tl.load(attn_ptr + point, mask=q_mask, other=0.0).to(tl.float32)
        # --- the four taps, as in _msda_forward ---
        gx = x * 2.0 - 1.0
        gy = y * 2.0 - 1.0
        ix = ((gx + 1.0) * W - 1.0) * 0.5
        iy = ((gy + 1.0) * H - 1.0) * 0.5
        x0 = tl.floor(ix)
        y0 = tl.floor(iy)
        wx1 = ix - x0
        wx0 = (x0 + 1.0) - ix
        wy1 = iy - y0
        wy0 = (y0 + 1.0) - iy
        # bounds in floating point, before any float->int conversion: far-off points stay harmless
        in_x0 = (x0 >= 0.0) & (x0 <= W - 1.0)
        in_x1 = (x0 >= -1.0) & (x0 <= W - 2.0)
        in_y0 = (y0 >= 0.0) & (y0 <= H - 1.0)
        in_y1 = (y0 >= -1.0) & (y0 <= H - 2.0)
        xa = tl.where(in_x0, x0, 0.0).to(tl.int32)  # column of the western taps (0 where outside)
        xb = tl.where(in_x1, x0 + 1.0, 0.0).to(tl.int32)
        ya = tl.where(in_y0, y0, 0.0).to(tl.int32)
        yb = tl.where(in_y1, y0 + 1.0, 0.0).to(tl.int32)
        off00 = ((ya * W + xa).to(tl.int64) * row_stride)[:, None]
        off01 = ((ya * W + xb).to(tl.int64) * row_stride)[:, None]
        off10 = ((yb * W + xa).to(tl.int64) * row_stride)[:, None]
        off11 = ((yb * W + xb).to(tl.int64) * row_stride)[:, None]
        m00 = qd_mask & (in_y0 & in_x0)[:, None]
        m01 = qd_mask & (in_y0 & in_x1)[:, None]
        m10 = qd_mask & (in_y1 & in_x0)[:, None]
        m11 = qd_mask & (in_y1 & in_x1)[:, None]
        # --- end of the taps ---
        v00 = tl.load(value_head + off00, mask=m00, other=0.0).to(tl.float32)
        v01 = tl.load(value_head + off01, mask=m01, other=0.0).to(tl.float32)
        v10 = tl.load(value_head + off10, mask=m10, other=0.0).to(tl.float32)
        v11 = tl.load(value_head + off11, mask=m11, other=0.0).to(tl.float32)

        sample = ((wy0 * wx0)[:, None] * v00 + (wy0 * wx1)[:, None] * v01
                  + (wy1 * wx0)[:, None] * v10 + (wy1 * wx1)[:, None] * v11)
        # d sample / d ix and d iy: the bilinear weights' slopes (a tap outside the map reads 0)
        d_ix = wy0[:, None] * (v01 - v00) + wy1[:, None] * (v11 - v10)
        d_iy = wx0[:, None] * (v10 - v00) + wx1[:, None] * (v11 - v01)
        grad_attn = tl.reduce(grad * sample, 1, _SUM)
        # d ix / d x = W (ix = x*W - 1/2): the location is a fraction of the width
        grad_x = tl.reduce(grad * d_ix, 1, _SUM) * a * W
        grad_y = tl.reduce(grad * d_iy, 1, _SUM) * a * H
        tl.store(grad_attn_ptr + point, grad_attn.to(grad_attn_ptr.dtype.element_ty), mask=q_mask)
        tl.store(grad_loc_ptr + point * 2, grad_x.to(grad_loc_ptr.dtype.element_ty), mask=q_mask)
        tl.store(grad_loc_ptr + point * 2 + 1, grad_y.to(grad_loc_ptr.dtype.element_ty), mask=q_mask)

        weighted = grad * a[:, None]
        tl.atomic_add(grad_value_head + off00, weighted * (wy0 * wx0)[:, None], mask=m00, sem="relaxed")
        tl.atomic_add(grad_value_head + off01, weighted * (wy0 * wx1)[:, None], mask=m01, sem="relaxed")
        tl.atomic_add(grad_value_head + off10, weighted * (wy1 * wx0)[:, None], mask=m10, sem="relaxed")
        tl.atomic_add(grad_value_head + off11, weighted * (wy1 * wx1)[:, None], mask=m11, sem="relaxed")


@functools.cache
def kernels(interpret: bool):
    """``(forward, backward)`` jitted kernels; ``interpret`` must be Triton's current setting (the key)."""
    jit = triton.jit(do_not_specialize=_SIZE_ARGS)
    return jit(_msda_forward), jit(_msda_backward)
