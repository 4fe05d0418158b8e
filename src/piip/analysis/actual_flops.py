"""The ``actual`` convention: the model as built, counted by PyTorch's ``FlopCounterMode``.

``FlopCounterMode`` counts FLOPs (2 per multiply-accumulate) at the dispatcher level. On CPU it
has no formula for SDPA's CPU kernel, so one is registered here; the deformable op registers its
own (5 MACs per sampled point and channel, the paper's convention). Results are reported in MACs,
like the paper. The model is run on the ``meta`` device, so nothing is allocated and 6B-scale
variants are counted in seconds.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula, sdpa_flop_count

from ..config.model import PIIPConfig
from ..models.piip import PIIP

__all__ = ["ActualComplexity", "actual_complexity"]


@register_flop_formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu)
def _sdpa_cpu_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


@dataclass(frozen=True)
class ActualComplexity:
    """``macs`` covers the whole forward; ``fpn_macs`` is the simple feature pyramid's share
    (the authors' own detection counter stops before it, reference §4.4)."""

    params: int
    macs: int
    fpn_macs: int
    input_size: tuple[int, int]


def actual_complexity(config: PIIPConfig, input_size: tuple[int, int] | None = None) -> ActualComplexity:
    """Parameters and forward MACs of the model built from ``config``, for one image.

    ``input_size`` defaults to a square image at the finest branch's resolution, as the paper's
    counts use.
    """

    size = input_size or (config.input_size, config.input_size)
    with torch.device("meta"):
        model = PIIP(config).eval()
        images = torch.empty(1, 3, *size)
    params = sum(p.numel() for p in model.parameters())
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(images)
    fpn_flops = sum(counter.get_flop_counts().get(f"{type(model).__name__}.fpn", {}).values())
    return ActualComplexity(params=params, macs=counter.get_total_flops() // 2, fpn_macs=fpn_flops // 2,
                            input_size=tuple(size))
