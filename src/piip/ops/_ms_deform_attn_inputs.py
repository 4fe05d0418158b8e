"""The input contract of the deformable attention op, checked alike by its PyTorch path
(:mod:`piip.ops.ms_deform_attn`) and its Triton launchers (:mod:`piip.ops.ms_deform_attn_triton`),
which cannot import each other (the op registers the launchers)."""
from __future__ import annotations

from torch import Tensor

__all__ = ["check_inputs"]


def check_inputs(value: Tensor, shapes: tuple[tuple[int, int], ...], sampling_locations: Tensor,
                 attention_weights: Tensor) -> None:
    """One-line :class:`ValueError` for inputs that break the op's shapes or are not floating point."""
    if value.dim() != 4:
        raise ValueError(f"value must have shape (N, S, M, D), got {tuple(value.shape)}")
    n, s, m, _ = value.shape
    num_tokens = sum(h * w for h, w in shapes)
    if s != num_tokens:
        raise ValueError(
            f"value has S={s} tokens but spatial_shapes {list(shapes)} cover sum(H*W)={num_tokens}")
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError(
            "sampling_locations must have shape (N, Lq, M, L, P, 2) with (x, y) in the last dim, "
            f"got {tuple(sampling_locations.shape)}")
    _, lq, _, num_levels, num_points, _ = sampling_locations.shape
    if num_levels != len(shapes):
        raise ValueError(
            f"sampling_locations has L={num_levels} levels but spatial_shapes has {len(shapes)}")
    expected = (n, lq, m, num_levels, num_points)
    if tuple(sampling_locations.shape[:5]) != expected:
        raise ValueError(
            f"sampling_locations must have shape (N, Lq, M, L, P, 2) = {(*expected, 2)} to match value "
            f"(N={n}, M={m}), got {tuple(sampling_locations.shape)}")
    if tuple(attention_weights.shape) != expected:
        raise ValueError(
            f"attention_weights must have shape (N, Lq, M, L, P) = {expected}, "
            f"got {tuple(attention_weights.shape)}")
    for name, t in (("value", value), ("sampling_locations", sampling_locations),
                    ("attention_weights", attention_weights)):
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
