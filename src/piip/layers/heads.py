"""Output heads: branch merging, the simple feature pyramid, and the merged classifier (paper §3.3)."""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torch import nn

__all__ = ["BranchMerge", "SimpleFeaturePyramid", "MergedClassifier", "upsample_sum"]


def upsample_sum(maps: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """Bilinearly upsample (float32) every map to the finest map's grid and sum with weights."""
    size = max((m.shape[-2:] for m in maps), key=lambda hw: hw[0] * hw[1])
    out = 0
    for i, feat in enumerate(maps):
        feat = feat.float()
        if feat.shape[-2:] != size:
            feat = F.interpolate(feat, size=size, mode="bilinear", align_corners=False)
        out = out + weights[i].float() * feat
    return out


def _conv_gn_relu(in_dim: int, out_dim: int) -> list[nn.Module]:
    return [nn.Conv2d(in_dim, out_dim, 3, padding=1, bias=False), nn.GroupNorm(32, out_dim), nn.ReLU(inplace=True)]


class BranchMerge(nn.Module):
    """Project every branch to branch 1's width (the widest, ``width``) at its own resolution,
    upsample to the finest grid, weighted sum.

    Each projection is (conv3x3 -> GroupNorm(32) -> ReLU) x 2; the learnable scalar weights start at 1.
    """

    def __init__(self, dims: list[int]):
        super().__init__()
        width = self.width = dims[0]
        self.projections = nn.ModuleList(
            nn.Sequential(*_conv_gn_relu(dim, width), *_conv_gn_relu(width, width)) for dim in dims)
        self.weights = nn.Parameter(torch.ones(len(dims)))

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        return upsample_sum([proj(m) for proj, m in zip(self.projections, maps)], self.weights)


class SimpleFeaturePyramid(nn.Module):
    """ViTDet-style pyramid from one map at stride ``input_stride`` (the patch size): strides 4, 8,
    16, 32, all ``dim`` channels.

    A finer level is reached by 2x transposed convolutions (``ConvT`` for one octave, ``ConvT ->
    norm -> GELU -> ConvT`` for two: ViTDet's ``fpn2`` and ``fpn1`` from a stride-16 map), the
    input's own stride is the identity and coarser levels are max-pooled (``fpn4`` = MaxPool(2) at
    stride 32). ``levels`` chooses the stages built and returned (``0..3`` = strides 4/8/16/32).
    Returns an ``OrderedDict`` keyed by level (``"0".."3"``, finest first), the names
    torchvision's detection heads (``MultiScaleRoIAlign``) expect by default.
    """

    def __init__(self, dim: int, norm: str = "groupnorm", levels: tuple[int, ...] = (0, 1, 2, 3),
                 input_stride: int = 16):
        super().__init__()
        if input_stride < 1 or input_stride & (input_stride - 1):
            raise ValueError(f"the simple feature pyramid needs a power-of-two input stride (patch size), "
                             f"got {input_stride}")
        self.levels = tuple(levels)
        self.strides = tuple(4 * 2 ** level for level in self.levels)
        for level, stride in zip(self.levels, self.strides):
            if stride < input_stride:
                ups = input_stride.bit_length() - stride.bit_length()
                layers: list[nn.Module] = [nn.ConvTranspose2d(dim, dim, 2, stride=2)]
                for _ in range(ups - 1):
                    norm_layer = nn.GroupNorm(32, dim) if norm == "groupnorm" else LayerNorm2d(dim, eps=1e-6)
                    layers += [norm_layer, nn.GELU(), nn.ConvTranspose2d(dim, dim, 2, stride=2)]
                stage: nn.Module = nn.Sequential(*layers)
            elif stride == input_stride:
                stage = nn.Identity()
            else:
                stage = nn.MaxPool2d(kernel_size=stride // input_stride, stride=stride // input_stride)
            setattr(self, f"fpn{level + 1}", stage)

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        # Channels-last, the maps come out channels-last too: PyTorch's CPU transposed convolution
        # takes oneDNN's direct path only in that layout (NCHW computes elsewhere and copies the
        # output back): 2.5x faster for the stride-4 level, the largest map of the model.
        x = x.contiguous(memory_format=torch.channels_last)
        return OrderedDict((str(level), getattr(self, f"fpn{level + 1}")(x)) for level in self.levels)


class MergedClassifier(nn.Module):
    """PIIP-B's head (Appendix C): GroupNorm / (GroupNorm, Linear, GroupNorm) merge to the widest
    width, upsample to the finest grid, weighted sum, LayerNorm, mean over tokens, Linear."""

    def __init__(self, dims: list[int], num_classes: int):
        super().__init__()
        width = dims[0]
        self.merge_norms = nn.ModuleList(nn.GroupNorm(32, d) for d in dims)
        self.merge_linears = nn.ModuleList(nn.Identity() if i == 0 else nn.Linear(d, width) for i, d in enumerate(dims))
        self.merge_out_norms = nn.ModuleList(
            nn.Identity() if i == 0 else nn.GroupNorm(32, width) for i in range(len(dims)))
        self.weights = nn.Parameter(torch.ones(len(dims)))
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.head = nn.Linear(width, num_classes)

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        projected = []
        for norm, linear, out_norm, m in zip(self.merge_norms, self.merge_linears, self.merge_out_norms, maps):
            m = linear(norm(m).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
            projected.append(out_norm(m))
        merged = upsample_sum(projected, self.weights).to(maps[-1].dtype)
        tokens = self.norm(merged.flatten(2).transpose(1, 2))
        return self.head(tokens.mean(dim=1))
