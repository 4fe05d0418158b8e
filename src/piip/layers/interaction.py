"""Cross-branch interactions (paper §3.2, reference §2.3-2.4).

After every block group, each pair of resolution-adjacent branches exchanges information both ways.
One direction is an :class:`Injector`: the query branch attends to the partner's (projected) tokens
with deformable cross-attention, then a ConvFFN refines it; both residuals are gated by per-channel
gammas initialised to zero, so a fresh PIIP starts as its pretrained branches.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import nn

from ..config.model import InteractionConfig
from ..ops import MSDeformAttn

__all__ = ["ConvFFN", "CrossAttention", "Injector", "InteractionUnit", "Interaction", "reference_points"]


def reference_points(hw: tuple[int, int], device: torch.device) -> torch.Tensor:
    """Normalised (x, y) centres of an ``hw`` token grid, shape ``(1, H*W, 1, 2)``, float32."""
    H, W = hw
    ys = (torch.arange(H, device=device, dtype=torch.float32) + 0.5) / H
    xs = (torch.arange(W, device=device, dtype=torch.float32) + 0.5) / W
    ref = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)  # (H, W, 2) as (x, y)
    return ref.reshape(1, H * W, 1, 2)


class ConvFFN(nn.Module):
    """Linear -> depthwise 3x3 conv on the token grid -> GELU -> Linear."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.dwconv = nn.Conv2d(hidden_dim, hidden_dim, 3, padding=1, groups=hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        # The token layout (B, H*W, C) *is* a channels-last map: viewing it as one skips two copies,
        # and the depthwise conv runs ~10x faster on CPU in channels-last than in NCHW.
        x = self.dwconv(self.fc1(x).unflatten(1, hw).permute(0, 3, 1, 2))
        return self.fc2(self.act(x.flatten(2).transpose(1, 2)))


class CrossAttention(nn.Module):
    """Plain multi-head cross-attention over every partner token (Table 10's "regular attention").

    As the original's: query/key/value projections without bias, output projection with bias.
    """

    def __init__(self, dim: int, feat_dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"cross-attention width {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wk = nn.Linear(feat_dim, dim, bias=False)
        self.wv = nn.Linear(feat_dim, dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, query, query_hw, feat, feat_hw) -> torch.Tensor:
        B, Nq, C = query.shape
        heads = lambda t: t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)  # noqa: E731
        out = F.scaled_dot_product_attention(heads(self.wq(query)), heads(self.wk(feat)), heads(self.wv(feat)))
        return self.proj(out.transpose(1, 2).reshape(B, Nq, C))


class DeformableCrossAttention(MSDeformAttn):
    """Single-level deformable cross-attention from a query grid into a partner's token map.

    Reference points are the query tokens' normalised centres; offsets are in value-map pixels.
    """

    def __init__(self, dim: int, feat_dim: int, config: InteractionConfig):
        super().__init__(dim, n_levels=1, n_heads=config.num_heads, n_points=config.num_points,
                         ratio=config.value_ratio, d_value_in=feat_dim)

    def forward(self, query, query_hw, feat, feat_hw) -> torch.Tensor:
        return super().forward(query, reference_points(query_hw, query.device), feat, [tuple(feat_hw)])


class Injector(nn.Module):
    """``q + ca_gamma * attn(norm(q), norm(feat))``, then ``q + cffn_gamma * DropPath(ConvFFN(norm(q)))``.

    Drop path acts on the FFN branch only, as in the original.
    """

    def __init__(self, dim: int, feat_dim: int, config: InteractionConfig):
        super().__init__()
        norm = (lambda d: nn.LayerNorm(d, eps=1e-6)) if config.with_norm else (lambda d: nn.Identity())
        self.query_norm = norm(dim)
        self.feat_norm = norm(feat_dim)
        if config.attn_type == "deform":
            self.attn = DeformableCrossAttention(dim, feat_dim, config)
        else:
            self.attn = CrossAttention(dim, feat_dim, config.num_heads)
        self.ca_gamma = nn.Parameter(torch.zeros(dim))
        if config.with_ffn:
            self.ffn_norm = norm(dim)
            self.ffn = ConvFFN(dim, int(dim * config.ffn_ratio))
            self.cffn_gamma = nn.Parameter(torch.zeros(dim))
            self.drop_path = DropPath(config.drop_path_rate) if config.drop_path_rate > 0 else nn.Identity()
        else:
            self.ffn = None

    def forward(self, query: torch.Tensor, query_hw, feat: torch.Tensor, feat_hw) -> torch.Tensor:
        attn = self.attn(self.query_norm(query), query_hw, self.feat_norm(feat), feat_hw)
        query = query + self.ca_gamma * attn
        if self.ffn is not None:
            query = query + self.cffn_gamma * self.drop_path(self.ffn(self.ffn_norm(query), query_hw))
        return query


class InteractionUnit(nn.Module):
    """Bidirectional exchange between branch ``a`` (bigger model, coarser grid) and branch ``b``.

    Both directions read the partner's *pre-update* tokens, as the original does.
    """

    def __init__(self, dim_a: int, dim_b: int, config: InteractionConfig):
        super().__init__()
        if config.with_proj:
            self.proj_a_to_b = nn.Linear(dim_a, dim_b)
            self.proj_b_to_a = nn.Linear(dim_b, dim_a)
            feat_for_a, feat_for_b = dim_a, dim_b
        else:
            self.proj_a_to_b = self.proj_b_to_a = None
            feat_for_a, feat_for_b = dim_b, dim_a
        self.inject_b_to_a = Injector(dim_a, feat_for_a, config)
        self.inject_a_to_b = Injector(dim_b, feat_for_b, config)

    def forward(self, x_a, hw_a, x_b, hw_b) -> tuple[torch.Tensor, torch.Tensor]:
        feat_for_b = self.proj_a_to_b(x_a) if self.proj_a_to_b is not None else x_a
        feat_for_a = self.proj_b_to_a(x_b) if self.proj_b_to_a is not None else x_b
        new_a = self.inject_b_to_a(x_a, hw_a, feat_for_a, hw_b)
        new_b = self.inject_a_to_b(x_b, hw_b, feat_for_b, hw_a)
        return new_a, new_b


class Interaction(nn.Module):
    """One interaction: a unit per adjacent pair, run from the finest pair upward (3-4, 2-3, 1-2)."""

    def __init__(self, dims: list[int], config: InteractionConfig):
        super().__init__()
        self.units = nn.ModuleList(InteractionUnit(dims[i], dims[i + 1], config) for i in range(len(dims) - 1))
        self.grad_checkpointing = False

    def forward(self, tokens: list[torch.Tensor], grids: list[tuple[int, int]]) -> list[torch.Tensor]:
        tokens = list(tokens)
        for i in reversed(range(len(self.units))):
            unit = self.units[i]
            args = (tokens[i], grids[i], tokens[i + 1], grids[i + 1])
            if self.grad_checkpointing and torch.is_grad_enabled():
                tokens[i], tokens[i + 1] = torch.utils.checkpoint.checkpoint(unit, *args, use_reentrant=False)
            else:
                tokens[i], tokens[i + 1] = unit(*args)
        return tokens
