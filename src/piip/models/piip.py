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
from typing import Collection, Sequence

import torch
import torch.nn.functional as F
from timm.models._features import feature_take_indices
from torch import nn

from ..layers.branch import ViTBranch
from ..layers.heads import BranchMerge, MergedClassifier, SimpleFeaturePyramid
from ..layers.interaction import Interaction
from ..ops import MSDeformAttn
from ..config.model import PIIPConfig
from ..weights.sharing import HubMixin

__all__ = ["PIIP", "check_output_fmt"]


def check_output_fmt(output_fmt: str) -> None:
    """``forward_intermediates``' map layouts are timm's ViTs': ``"NCHW"`` or ``"NLC"``."""
    if output_fmt not in ("NCHW", "NLC"):
        raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")


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


class PIIP(nn.Module, HubMixin):
    """Parameter-Inverted Image Pyramid network built from a :class:`PIIPConfig`.

    ``forward(images)`` takes ``(B, 3, H, W)`` images at the finest branch's resolution and returns
    an ``OrderedDict[str, Tensor]`` of pyramid maps (``task="det"``; ``out_channels`` wide, keyed by
    level, strides ``self.strides``: 4/8/16/32 unless ``fpn_levels`` says otherwise) or logits
    ``(B, num_classes)`` (``task="cls"``).

    timm's feature-extraction contract: ``feature_info`` (one dict per feature point) and
    :meth:`forward_intermediates`; ``create_model(..., features_only=True)`` wraps the model in
    timm's ``FeatureGetterNet``. ``save_pretrained`` / ``push_to_hub`` share it, with a model card;
    ``piip.from_pretrained`` loads it back (:class:`~piip.weights.sharing.HubMixin`).
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
        #: timm's feature metadata, one dict per feature point (see :meth:`forward_intermediates`)
        self.feature_info, self._points = self._feature_points()

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

    def _run(self, images: torch.Tensor, collect: Collection[tuple[int, int]] = (), last: int | None = None
             ) -> tuple[list[torch.Tensor], list[tuple[int, int]], dict[tuple[int, int], torch.Tensor]]:
        """``forward_tokens`` plus the full token sequences at the feature points ``(branch, step)``
        in ``collect`` (a step is an interaction, or a block in a model without interactions);
        ``last``: stop after that step instead of running them all."""
        self._check_input(images)
        tokens, grids = [], []
        for branch, image in zip(self.branches, self.pyramid(images)):
            x, hw = branch.embed(image)
            tokens.append(x)
            grids.append(hw)
        collected = {}
        if not self.interactions:
            for k, (branch, hw) in enumerate(zip(self.branches, grids)):
                depth = branch.config.depth if last is None else min(last + 1, branch.config.depth)
                for i in range(depth):
                    tokens[k] = branch.forward_blocks(tokens[k], hw, i, i)
                    if (k, i) in collect:
                        collected[k, i] = tokens[k]
            return tokens, grids, collected
        prefixes = [b.num_prefix_tokens for b in self.branches]
        for i, interaction in enumerate(self.interactions[:None if last is None else last + 1]):
            tokens = [b.forward_blocks(x, hw, *b.config.interaction_indexes[i])
                      for b, x, hw in zip(self.branches, tokens, grids)]
            patches = interaction([x[:, p:] for x, p in zip(tokens, prefixes)], grids)
            tokens = [torch.cat([x[:, :p], y], dim=1) if p else y for x, y, p in zip(tokens, patches, prefixes)]
            collected.update({(k, i): x for k, x in enumerate(tokens) if (k, i) in collect})
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

    # -- feature points (timm's feature-extraction contract) -------------------------------------
    def _feature_points(self) -> tuple[list[dict], list[tuple[int, int] | None]]:
        """``feature_info`` and, per entry, its ``(branch, step)`` (``None`` for the merged map)."""
        c = self.config
        reductions = [c.patch_size * c.input_size / b.resolution for b in c.branches]
        reductions = [int(r) if r.is_integer() else r for r in reductions]
        order = sorted(range(len(c.branches)), key=reductions.__getitem__)  # finest first
        info, points = [], []
        for k in order:
            base = dict(num_chs=c.branches[k].embed_dim, reduction=reductions[k])
            if self.interactions:
                # the units run from the finest pair up: branch k > 0 is last updated by unit k - 1
                unit = "units.0.inject_b_to_a" if k == 0 else f"units.{k - 1}.inject_a_to_b"
                steps = range(c.num_interactions)
                info += [dict(base, module=f"interactions.{i}.{unit}", branch=k, interaction=i) for i in steps]
            else:
                steps = range(c.branches[k].depth)
                info += [dict(base, module=f"branches.{k}.blocks.{i}", branch=k, block=i) for i in steps]
            points += [(k, i) for i in steps]
            if self.merge is not None and k == order[0]:
                info.append(dict(num_chs=self.merge.width, reduction=reductions[k], module="merge"))
                points.append(None)
        return info, points

    def _take_indices(self, indices: int | Sequence[int] | None) -> list[int]:
        """timm's ``feature_take_indices`` over ``feature_info``, its range error as a ValueError."""
        try:
            return feature_take_indices(len(self.feature_info), indices)[0]
        except AssertionError as error:
            raise ValueError(f"{error}: {self.config.name or 'this model'} has {len(self.feature_info)} "
                             "feature points (model.feature_info)") from None

    def default_feature_indices(self) -> list[int]:
        """``features_only``'s default ``out_indices``: as timm's ViTs, the last 3 blocks of a
        single-branch model; otherwise every branch's map after its last step and the merged map."""
        if len(self.branches) == 1:
            return self._take_indices(min(3, len(self.feature_info)))
        last = {}
        for index, point in enumerate(self._points):
            last[point[0] if point else None] = index
        return sorted(last.values())

    def final_norms(self) -> list[nn.Module]:
        """Every branch's final token norm (what ``norm=True`` applies); a ValueError without one."""
        norms = [getattr(b, "norm", None) for b in self.branches]
        if any(n is None or isinstance(n, nn.Identity) for n in norms):
            raise ValueError(f"norm=True: the branches of {self.config.name or 'this model'} have no final "
                             "token norm (dense and merged-head models build none; avg-pool heads norm after pooling)")
        return norms

    def prune_intermediate_layers(self, indices: int | Sequence[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """timm's contract: the absolute feature indices of ``indices`` (checked). Nothing is pruned,
        whatever ``prune_norm``/``prune_head`` say: the merged map needs every branch to the end, and
        ``forward`` (pyramid or logits) keeps needing the norms, heads and the feature pyramid."""
        return self._take_indices(indices)

    def forward_intermediates(
        self, images: torch.Tensor, indices: int | Sequence[int] | None = None, return_prefix_tokens: bool = False,
        norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False,
    ) -> list | tuple[torch.Tensor | list[torch.Tensor], list]:
        """The maps at the feature points ``indices`` select, as timm's ViTs' ``forward_intermediates``.

        Feature points (``model.feature_info``, whose entries the returned list follows one to one,
        in index order) are, per branch from the finest grid to the coarsest (``reduction``, the
        stride relative to the input image, never decreases, as timm's ``FeatureInfo`` requires):
        the branch's patch-token map after every interaction (``interaction=i``); in a model
        without interactions, after every block (``block=i``; a single-branch model's are exactly
        timm's ViT's). ``branch=k`` indexes ``model.branches`` (``0`` = the paper's branch 1, the
        largest model at the lowest resolution). A model that merges its branches (``task="det"``)
        has one more point right after the finest branch's: the merged map (``module="merge"``).

        Args:
            indices: ``None`` for all, an int ``n`` for the last ``n``, or a sequence (negative ones
                count from the end).
            return_prefix_tokens: a ``(map, prefix tokens)`` pair for a branch with class tokens.
            norm: apply each branch's final norm to its maps (an error when it has none).
            stop_early: run only as far as the last selected point needs.
            output_fmt: ``"NCHW"`` maps or ``"NLC"`` patch tokens.
            intermediates_only: return only the list.

        Returns:
            the list, or ``(final, list)``: ``final`` is the full token sequence after the last step
            run, through the branch's final norm when it has one (a list, branch 1 first, for
            several branches; one tensor, as timm's, for a single branch).
        """
        check_output_fmt(output_fmt)
        norms = self.final_norms() if norm else None
        points = [self._points[i] for i in sorted(set(self._take_indices(indices)))]
        last = max(p[1] for p in points) if stop_early and None not in points else None
        tokens, grids, collected = self._run(images, collect=set(points) - {None}, last=last)
        out = []
        for point in points:
            if point is None:
                y = self.merge(self._to_maps(tokens, grids))
                out.append(y.contiguous() if output_fmt == "NCHW" else y.flatten(2).transpose(1, 2))
                continue
            k, _ = point
            x, prefix = collected[point], self.branches[k].num_prefix_tokens
            x = norms[k](x) if norm else x
            y = x[:, prefix:]
            if output_fmt == "NCHW":
                y = y.unflatten(1, grids[k]).permute(0, 3, 1, 2).contiguous()
            out.append((y, x[:, :prefix]) if return_prefix_tokens and prefix else y)
        if intermediates_only:
            return out
        final = [b.norm(x) if hasattr(b, "norm") else x for b, x in zip(self.branches, tokens)]
        return (final[0] if len(final) == 1 else final), out

    def _check_pyramid_input(self, images: torch.Tensor) -> None:
        """The feature pyramid's coarsest level max-pools the patch grid; it must not pool it to nothing."""
        H, W = images.shape[-2:]
        patch, coarsest = self.config.patch_size, max(self.strides)
        if min(H, W) // patch < coarsest // patch:
            raise ValueError(
                f"images of {H}x{W} are too small for the feature pyramid: its stride-{coarsest} level pools "
                f"the {patch}-pixel patch grid by {coarsest // patch}, so each side must be >= {coarsest} pixels")

    def forward(self, images: torch.Tensor):
        if self.config.task == "det":
            self._check_input(images)
            self._check_pyramid_input(images)
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
