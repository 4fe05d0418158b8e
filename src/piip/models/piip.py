"""The PIIP network: one class for every branch count and task.

Data flow of one forward (paper Fig. 2):

1. pyramid: the input is the image at the finest branch's resolution; every coarser branch gets a
   bilinear downscale by ``resolution_i / resolution_finest`` (``scale_factor`` semantics: the size
   floors and source coordinates use the factor, exactly as the original);
2. every branch patchifies its image and adds its resized position embedding;
3. for each interaction ``i``: every branch runs its block group ``i``, then the interaction units
   run from the finest pair upward;
4. head: ``task="det"`` merges the branches on the finest grid and builds a simple feature pyramid
   (``OrderedDict`` of strides 4/8/16/32, torchvision's backbone contract); ``task="cls"`` averages
   the branches' pretrained heads or uses the merged classifier.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..layers.branch import ViTBranch
from ..layers.heads import BranchMerge, MergedClassifier, SimpleFeaturePyramid
from ..layers.interaction import Interaction
from ..ops import MSDeformAttn
from ..config.model import PIIPConfig

__all__ = ["PIIP"]


def _init_new_module(module: nn.Module) -> None:
    """Initialisation of PIIP's newly added modules (reference §2.6)."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        kh, kw = module.kernel_size
        fan_out = kh * kw * module.out_channels // module.groups
        nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class PIIP(nn.Module):
    """Parameter-Inverted Image Pyramid network built from a :class:`PIIPConfig`.

    ``forward(images)`` takes ``(B, 3, H, W)`` images at the finest branch's resolution and returns
    an ``OrderedDict[str, Tensor]`` of pyramid maps (``task="det"``; ``out_channels`` wide, keyed by
    level, strides ``self.strides``: 4/8/16/32 unless ``fpn_levels`` says otherwise) or logits
    ``(B, num_classes)`` (``task="cls"``).
    """

    def __init__(self, config: PIIPConfig):
        super().__init__()
        self.config = config
        per_branch_heads = config.task == "cls" and config.cls_head == "per_branch"
        self.branches = nn.ModuleList(
            ViTBranch(b, num_classes=config.num_classes if per_branch_heads else 0, pool=config.cls_pool)
            for b in config.branches)
        dims = [b.embed_dim for b in config.branches]
        self.interactions = nn.ModuleList(
            Interaction(dims, config.interaction) for _ in range(config.num_interactions)
        ) if len(dims) > 1 else nn.ModuleList()
        self.merge = self.fpn = self.classifier = None
        if config.task == "det":
            self.merge = BranchMerge(dims) if len(dims) > 1 else None
            self.fpn = SimpleFeaturePyramid(dims[0], norm=config.fpn_norm, levels=config.fpn_levels,
                                            input_stride=config.patch_size)
        elif config.cls_head == "merged":
            self.classifier = MergedClassifier(dims, config.num_classes)
        for module in (self.interactions, self.merge, self.fpn, self.classifier):
            if module is not None:
                module.apply(_init_new_module)
        for module in self.interactions.modules():
            if isinstance(module, MSDeformAttn):
                module.reset_parameters()
        self.out_channels = dims[0]
        self.strides = self.fpn.strides if self.fpn is not None else ()

    # -- input ---------------------------------------------------------------------------------
    def _check_input(self, images: torch.Tensor) -> None:
        if not isinstance(images, torch.Tensor) or images.dim() != 4:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"images must be a (B, C, H, W) tensor, got {shape}")
        channels = self.branches[0].patch_embed.proj.in_channels
        if images.shape[1] != channels:
            raise ValueError(f"images must have {channels} channels (B, {channels}, H, W), "
                             f"got {images.shape[1]} in shape {tuple(images.shape)}")
        H, W = images.shape[-2:]
        patch, finest = self.config.patch_size, self.config.input_size
        coarsest = min(b.resolution for b in self.config.branches)
        need = math.ceil(patch * finest / coarsest)
        if min(H, W) < need:
            raise ValueError(
                f"images of {H}x{W} are too small: the coarsest branch sees them scaled by "
                f"{coarsest}/{finest} and needs at least one {patch}-pixel patch, so each side "
                f"must be >= {need} pixels")

    def pyramid(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The per-branch images, branch 1 (coarsest) first."""
        finest = self.config.input_size
        out = []
        for branch in self.config.branches:
            scale = branch.resolution / finest
            out.append(images if scale == 1 else F.interpolate(
                images, scale_factor=scale, mode="bilinear", align_corners=False))
        return out

    # -- features ------------------------------------------------------------------------------
    def forward_tokens(self, images: torch.Tensor) -> tuple[list[torch.Tensor], list[tuple[int, int]]]:
        """Every branch's full token sequence (prefix tokens included) after the last interaction,
        before any final norm, and the branches' token grids."""
        tokens, grids, _ = self._run(images)
        return tokens, grids

    def _run(self, images: torch.Tensor, collect: Sequence[int] = ()
             ) -> tuple[list[torch.Tensor], list[tuple[int, int]], list[list[torch.Tensor]]]:
        """``forward_tokens`` plus, for each interaction index in ``collect``, the branches' token
        sequences right after that interaction."""
        self._check_input(images)
        tokens, grids = [], []
        for branch, image in zip(self.branches, self.pyramid(images)):
            x, hw = branch.embed(image)
            tokens.append(x)
            grids.append(hw)
        if not self.interactions:
            return [b.forward_blocks(x, hw, 0, b.config.depth - 1)
                    for b, x, hw in zip(self.branches, tokens, grids)], grids, []
        prefixes = [b.num_prefix_tokens for b in self.branches]
        collected = []
        for i, interaction in enumerate(self.interactions):
            tokens = [b.forward_blocks(x, hw, *b.config.interaction_indexes[i])
                      for b, x, hw in zip(self.branches, tokens, grids)]
            patches = interaction([x[:, p:] for x, p in zip(tokens, prefixes)], grids)
            tokens = [torch.cat([x[:, :p], y], dim=1) if p else y for x, y, p in zip(tokens, patches, prefixes)]
            if i in collect:
                collected.append(tokens)
        return tokens, grids, collected

    def _to_maps(self, tokens: list[torch.Tensor], grids: list[tuple[int, int]]) -> list[torch.Tensor]:
        # Views, not copies: (B, H*W, D) tokens are a channels-last (B, D, H, W) map, the layout in
        # which the merge and pyramid convolutions also run fastest.
        return [x[:, b.num_prefix_tokens:].unflatten(1, hw).permute(0, 3, 1, 2)
                for b, x, hw in zip(self.branches, tokens, grids)]

    def forward_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Every branch's patch tokens as ``(B, D_i, H_i, W_i)`` maps, branch 1 first (channels-last
        views of the tokens)."""
        return self._to_maps(*self.forward_tokens(images))

    def forward_intermediates(self, images: torch.Tensor, indices: int | Sequence[int] | None = None
                              ) -> list[list[torch.Tensor]]:
        """Per-branch ``(B, D_i, H_i, W_i)`` maps after selected interactions (timm's API shape).

        ``indices``: interaction indexes (negative counts from the end), or an int ``n`` for the
        last ``n``; ``None`` for all. Returns one list of branch maps (branch 1 first) per index.
        """
        count = self.config.num_interactions
        if count == 0:
            raise ValueError("this model has no interactions to take intermediates from")
        if indices is None:
            wanted = list(range(count))
        elif isinstance(indices, int):
            wanted = list(range(count - indices, count))
        else:
            wanted = [i % count if -count <= i < count else i for i in indices]
        bad = [i for i in wanted if not 0 <= i < count]
        if bad:
            raise ValueError(f"interaction indices {bad} out of range for {count} interactions")
        _, grids, collected = self._run(images, collect=set(wanted))
        by_index = dict(zip(sorted(set(wanted)), collected))
        return [self._to_maps(by_index[i], grids) for i in wanted]

    def forward(self, images: torch.Tensor):
        if self.config.task == "det":
            maps = self.forward_features(images)
            merged = self.merge(maps) if self.merge is not None else maps[0]
            return self.fpn(merged)
        if self.classifier is not None:
            return self.classifier(self.forward_features(images))
        tokens, _ = self.forward_tokens(images)
        logits = [b.forward_head(x) for b, x in zip(self.branches, tokens)]
        return torch.stack(logits).mean(dim=0)

    # -- training helpers (timm's model API) ---------------------------------------------------
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing of every branch block and every interaction."""
        for module in (*self.branches, *self.interactions):
            module.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        """Parameters exempt from weight decay: position embeddings, class tokens, the interaction
        gates and the merge weights (norms and biases are exempt by shape in the optimiser)."""
        names = set()
        for name, _ in self.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("pos_embed", "cls_token", "ca_gamma", "cffn_gamma") or name.endswith("merge.weights"):
                names.add(name)
        return names

    def group_matcher(self, coarse: bool = False) -> dict[str, object]:
        """Regexes grouping parameters by depth, for layer-wise lr decay (timm's convention)."""
        return {
            "stem": r"^branches\.\d+\.(cls_token|pos_embed|patch_embed)",
            "blocks": r"^branches\.\d+\.blocks\.(\d+)" if coarse else [
                (r"^branches\.\d+\.blocks\.(\d+)", None)],
        }

    def extra_repr(self) -> str:
        c = self.config
        return (f"name={c.name!r}, task={c.task}, resolutions={'/'.join(map(str, c.resolutions))}, "
                f"interactions={c.num_interactions}, attn={c.interaction.attn_type}")
