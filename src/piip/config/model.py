"""Typed, frozen configuration of a PIIP network.

A variant is data: the registry builds a :class:`PIIPConfig`, the model is built from it, and the
paper-convention FLOP counter reads it without building anything.

Branch order follows the paper: ``branches[0]`` is branch 1, the *largest* model at the *lowest*
resolution; the last branch is the smallest model at the highest resolution. Resolution strings are
written finest first, as in the paper ("1120/896/448" = branch 3 / branch 2 / branch 1).
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

from .typed import Serializable, check_value

NormKind = Literal["layernorm", "rmsnorm"]
ActKind = Literal["gelu", "gelu_tanh"]
Family = Literal["deit", "internvit"]

__all__ = [
    "BranchConfig",
    "InteractionConfig",
    "PIIPConfig",
    "even_interaction_indexes",
    "parse_resolutions",
    "segmentation_form",
]


def even_interaction_indexes(depth: int, num_interactions: int) -> tuple[tuple[int, int], ...]:
    """Split ``depth`` blocks into ``num_interactions`` contiguous inclusive ``[start, end]`` groups.

    Remainders go to the later groups (12 blocks in 5 groups -> 2,2,2,3,3), the way the authors'
    uneven schedules (e.g. MAE-H 32 blocks in 12 groups) grow towards the end.
    """
    if num_interactions < 1:
        raise ValueError(f"num_interactions must be >= 1, got {num_interactions}")
    if num_interactions > depth:
        raise ValueError(
            f"num_interactions={num_interactions} exceeds the branch depth {depth}: every "
            "interaction needs at least one block before it")
    base, extra = divmod(depth, num_interactions)
    sizes = [base] * (num_interactions - extra) + [base + 1] * extra
    groups, start = [], 0
    for size in sizes:
        groups.append((start, start + size - 1))
        start += size
    return tuple(groups)


@dataclass(frozen=True)
class BranchConfig:
    """One ViT branch: its architecture, input resolution, attention layout and block groups.

    Attributes:
        embed_dim, depth, num_heads, mlp_ratio, qkv_bias: the ViT architecture.
        resolution: the branch's nominal input size (the paper's per-branch resolution).
        interaction_indexes: inclusive ``[start, end]`` block ranges; interaction ``i`` runs after
            group ``i``. An empty tuple means "all blocks, no interaction" (single-branch models,
            or a multi-branch model with zero interactions).
        patch_size: patch size the branch runs with.
        pretrain_img_size: image size of the pretraining; the absolute position embedding is kept
            at the grid ``pretrain_img_size // patch_size`` and resized to the token grid at forward.
        pos_embed_at_resolution: store the position embedding at the branch's own nominal grid
            (``resolution // patch_size``) instead, as the authors' classification classes do
            (pretrained grids are resized once, when the weights are loaded).
        pretrain_patch_size: patch size of the pretrained weights (kernel resampled when different).
        qk_norm: InternViT-style RMS/LayerNorm of q and k over the full width.
        norm_layer: ``"layernorm"`` or ``"rmsnorm"`` (eps 1e-6 either way).
        act_layer: MLP activation, ``"gelu"`` (exact) or ``"gelu_tanh"`` (the fused-MLP variant).
        init_values: layer-scale init; ``None`` means no layer scale.
        class_token: prepend a class token (classification); it joins self-attention but not the
            cross-branch interactions.
        pos_embed_class_row: the position-embedding parameter carries a leading class row (timm
            ``no_embed_class=False``, InternViT-style checkpoints).
        window_size, window_block_indexes: window attention, ViTDet's explicit knobs. With an int
            ``window_size``, the blocks listed in ``window_block_indexes`` attend inside
            non-overlapping ``window_size x window_size`` windows anchored top-left (no mask) and
            the others attend globally. ``window_size`` may instead give one entry per block
            (``None`` = global), e.g. ``(2, 2, None, 4, 4, None)``, as the authors' classes accept
            per-block ``window_attn``/``window_size`` lists; ``window_block_indexes`` is then
            derived from it. A per-block tuple whose windowed blocks share one size is stored in
            the int form, so one network has one config. :attr:`window_sizes` gives the per-block
            view either way.
        window_padding: where a windowed block zero-pads a grid that the window does not divide:
            ``"before_qkv"`` (the tokens, so padded keys/values equal the qkv bias: the authors'
            flash-attention path, used by every released checkpoint) or ``"after_qkv"`` (the qkv
            output, so padded keys/values are 0: their non-flash ``vit_models`` path).
        drop_path_rate, drop_path_schedule: stochastic depth, ``"constant"`` (DeiT-style branches of
            the original) or ``"linear"`` (InternViT-style).
        attn_drop_rate: dropout on the attention probabilities (training only).
        pretrained: timm ``name.tag`` of the weights the paper initialised this branch from.
        family: which original branch class the paper's counting rules follow (``"deit"`` =
            ``vit_models``; ``"internvit"`` = the InternViT6B class used for AugReg/MAE/DINOv2/6B).
    """

    embed_dim: int
    depth: int
    num_heads: int
    resolution: int
    interaction_indexes: tuple[tuple[int, int], ...] = ()
    patch_size: int = 16
    pretrain_img_size: int = 224
    pretrain_patch_size: int = 16
    pos_embed_at_resolution: bool = False
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    qk_norm: bool = False
    norm_layer: NormKind = "layernorm"
    act_layer: ActKind = "gelu"
    init_values: float | None = 1.0
    class_token: bool = False
    pos_embed_class_row: bool = False
    window_size: int | tuple[int | None, ...] = 14
    window_block_indexes: tuple[int, ...] = ()
    window_padding: Literal["before_qkv", "after_qkv"] = "before_qkv"
    drop_path_rate: float = 0.0
    drop_path_schedule: Literal["constant", "linear"] = "constant"
    attn_drop_rate: float = 0.0
    pretrained: str | None = None
    family: Family = "deit"

    def __post_init__(self) -> None:
        for name in ("embed_dim", "depth", "num_heads", "resolution", "patch_size",
                     "pretrain_img_size", "pretrain_patch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"BranchConfig.{name} must be a positive int, got {value!r}")
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"BranchConfig.embed_dim={self.embed_dim} is not divisible by "
                f"num_heads={self.num_heads}")
        self._normalise_windows()
        bad = [i for i in self.window_block_indexes if not 0 <= i < self.depth]
        if bad:
            raise ValueError(
                f"BranchConfig.window_block_indexes {bad} fall outside the {self.depth} blocks")
        if self.window_block_indexes and self.class_token:
            raise ValueError("window attention with a class token is not supported: "
                             "set class_token=False or window_block_indexes=()")
        if self.norm_layer not in ("layernorm", "rmsnorm"):
            raise ValueError(f"BranchConfig.norm_layer must be 'layernorm' or 'rmsnorm', "
                             f"got {self.norm_layer!r}")
        if self.act_layer not in ("gelu", "gelu_tanh"):
            raise ValueError(f"BranchConfig.act_layer must be 'gelu' or 'gelu_tanh', "
                             f"got {self.act_layer!r}")
        if self.window_padding not in ("before_qkv", "after_qkv"):
            raise ValueError(f"BranchConfig.window_padding must be 'before_qkv' or 'after_qkv', "
                             f"got {self.window_padding!r}")
        if self.window_padding == "after_qkv" and self.qk_norm:
            raise ValueError("window_padding='after_qkv' is not supported with qk_norm")
        if self.drop_path_schedule not in ("constant", "linear"):
            raise ValueError(f"BranchConfig.drop_path_schedule must be 'constant' or 'linear', "
                             f"got {self.drop_path_schedule!r}")
        expected = 0
        for group in self.interaction_indexes:
            start, end = group
            if start != expected or end < start:
                raise ValueError(
                    f"BranchConfig.interaction_indexes must be contiguous inclusive [start, end] "
                    f"ranges starting at 0; got {list(map(list, self.interaction_indexes))}")
            expected = end + 1
        if self.interaction_indexes and expected != self.depth:
            raise ValueError(
                f"BranchConfig.interaction_indexes cover blocks 0..{expected - 1} but the branch "
                f"has {self.depth} blocks")

    def _normalise_windows(self) -> None:
        """Validate the window knobs and bring a per-block ``window_size`` to its canonical form."""
        def set_(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        set_("window_block_indexes", tuple(self.window_block_indexes))
        if not isinstance(self.window_size, (list, tuple)):
            if isinstance(self.window_size, bool) or not isinstance(self.window_size, int) \
                    or self.window_size < 1:
                raise ValueError(f"BranchConfig.window_size must be a positive int or one entry per "
                                 f"block (int or None), got {self.window_size!r}")
            return
        sizes = tuple(self.window_size)
        if len(sizes) != self.depth:
            raise ValueError(f"BranchConfig.window_size lists {len(sizes)} entries for {self.depth} "
                             "blocks: give one per block (None = global attention)")
        bad = [s for s in sizes if s is not None and (isinstance(s, bool) or not isinstance(s, int) or s < 1)]
        if bad:
            raise ValueError(f"BranchConfig.window_size entries must be positive ints or None, got {bad}")
        windowed = tuple(i for i, s in enumerate(sizes) if s is not None)
        if self.window_block_indexes and tuple(sorted(self.window_block_indexes)) != windowed:
            raise ValueError(
                f"BranchConfig.window_block_indexes {list(self.window_block_indexes)} disagree with the "
                f"per-block window_size (windowed blocks {list(windowed)}): give only window_size")
        distinct = {s for s in sizes if s is not None}
        set_("window_block_indexes", windowed)
        set_("window_size", distinct.pop() if len(distinct) == 1 else sizes if distinct else 14)

    @property
    def window_sizes(self) -> tuple[int | None, ...]:
        """Per-block window size, ``None`` for global attention."""
        if isinstance(self.window_size, tuple):
            return self.window_size
        windowed = set(self.window_block_indexes)
        return tuple(self.window_size if i in windowed else None for i in range(self.depth))

    @property
    def pos_embed_grid(self) -> int:
        """Side of the stored position-embedding grid."""
        size = self.resolution if self.pos_embed_at_resolution else self.pretrain_img_size
        return size // self.patch_size

    @property
    def windowed(self) -> frozenset[int]:
        return frozenset(self.window_block_indexes)

    def drop_path_rates(self) -> list[float]:
        if self.drop_path_schedule == "constant":
            return [self.drop_path_rate] * self.depth
        if self.depth == 1:
            return [0.0]
        return [self.drop_path_rate * i / (self.depth - 1) for i in range(self.depth)]


@dataclass(frozen=True)
class InteractionConfig:
    """Cross-branch interaction settings shared by every unit (reference §2.4, §3.1).

    ``attn_type`` is ``"deform"`` (multi-scale deformable attention, single level) or ``"regular"``
    (plain multi-head cross-attention over all partner tokens).
    """

    attn_type: Literal["deform", "regular"] = "deform"
    num_heads: int = 16
    num_points: int = 4
    value_ratio: float = 0.5
    with_ffn: bool = True
    ffn_ratio: float = 0.25
    with_proj: bool = True
    with_norm: bool = True
    drop_path_rate: float = 0.4

    def __post_init__(self) -> None:
        if self.attn_type not in ("deform", "regular"):
            raise ValueError(f"InteractionConfig.attn_type must be 'deform' or 'regular', "
                             f"got {self.attn_type!r}")
        if self.num_heads < 1 or self.num_points < 1:
            raise ValueError("InteractionConfig.num_heads and num_points must be >= 1")
        if not 0 < self.value_ratio <= 4 or not 0 < self.ffn_ratio <= 16:
            raise ValueError("InteractionConfig.value_ratio and ffn_ratio must be positive")


@dataclass(frozen=True)
class PIIPConfig(Serializable):
    """A whole PIIP network: branches, interactions and the output head.

    Attributes:
        branches: branch 1 (largest model, lowest resolution) first.
        interaction: settings of every interaction unit.
        task: ``"det"`` (merged map + simple feature pyramid, for detection and segmentation) or
            ``"cls"`` (classification).
        cls_head: ``"per_branch"`` (each branch's pretrained norm + head, logits averaged: the paper's
            default) or ``"merged"`` (GroupNorm/Linear merge, LayerNorm, mean, Linear: PIIP-B).
        cls_pool: token fed to a per-branch head: ``"class_token"``, ``"first_patch"`` (what the
            authors' released classification checkpoints use) or ``"avg"``.
        num_classes: classifier width.
        fpn_norm: normalisation inside the simple feature pyramid's first stage (``"groupnorm"``
            for PIIP, ``"layernorm"`` for the ViTDet baselines).
        fpn_levels: the simple feature pyramid's levels that are built and returned (``0..3`` =
            strides 4, 8, 16, 32; DINO-style detectors use ``(1, 2, 3)``, without the stride-4
            stage).
        name: registry name this config came from (informational).
    """

    branches: tuple[BranchConfig, ...]
    interaction: InteractionConfig = field(default_factory=InteractionConfig)
    task: Literal["det", "cls"] = "det"
    cls_head: Literal["per_branch", "merged"] = "per_branch"
    cls_pool: Literal["class_token", "first_patch", "avg"] = "class_token"
    num_classes: int = 1000
    fpn_norm: Literal["groupnorm", "layernorm"] = "groupnorm"
    fpn_levels: tuple[int, ...] = (0, 1, 2, 3)
    name: str = ""

    def __post_init__(self) -> None:
        if not self.branches:
            raise ValueError("PIIPConfig.branches must hold at least one branch")
        if self.task not in ("det", "cls"):
            raise ValueError(f"PIIPConfig.task must be 'det' or 'cls', got {self.task!r}")
        if self.cls_head not in ("per_branch", "merged"):
            raise ValueError(f"PIIPConfig.cls_head must be 'per_branch' or 'merged', "
                             f"got {self.cls_head!r}")
        if self.cls_pool not in ("class_token", "first_patch", "avg"):
            raise ValueError(f"PIIPConfig.cls_pool must be 'class_token', 'first_patch' or 'avg', "
                             f"got {self.cls_pool!r}")
        object.__setattr__(self, "fpn_levels", tuple(self.fpn_levels))
        if not self.fpn_levels or list(self.fpn_levels) != sorted(set(self.fpn_levels)) \
                or not set(self.fpn_levels) <= {0, 1, 2, 3}:
            raise ValueError(f"PIIPConfig.fpn_levels must be increasing pyramid levels from 0..3 "
                             f"(strides 4/8/16/32), got {self.fpn_levels!r}")
        counts = [len(b.interaction_indexes) for b in self.branches]
        if len(set(counts)) != 1:
            raise ValueError(
                "every branch needs the same number of interaction_indexes groups (one per "
                f"interaction); got {counts} for branches 1..{len(counts)}")
        patch = {b.patch_size for b in self.branches}
        if len(patch) != 1:
            raise ValueError(f"all branches must share one patch size, got {sorted(patch)}")
        if self.task == "cls" and self.cls_pool == "class_token" and self.cls_head == "per_branch":
            missing = [i + 1 for i, b in enumerate(self.branches) if not b.class_token]
            if missing:
                raise ValueError(f"cls_pool='class_token' needs class_token=True on branches {missing}")
        if self.task == "det" or self.cls_head == "merged":
            width = self.branches[0].embed_dim
            if width % 32:
                raise ValueError(
                    f"branch 1 width {width} is not divisible by 32: the merge's GroupNorm(32) "
                    "needs a multiple of 32")
            if self.cls_head == "merged" and self.task == "cls":
                bad = [b.embed_dim for b in self.branches if b.embed_dim % 32]
                if bad:
                    raise ValueError(f"merged head GroupNorm(32) needs widths divisible by 32, got {bad}")
        if self.interaction.attn_type == "deform" and len(self.branches) > 1:
            for b in self.branches:
                value_dim = int(b.embed_dim * self.interaction.value_ratio)
                if value_dim % self.interaction.num_heads:
                    raise ValueError(
                        f"deformable attention on a {b.embed_dim}-wide branch has value width "
                        f"{value_dim}, not divisible by interaction num_heads="
                        f"{self.interaction.num_heads}")

    # -- derived -------------------------------------------------------------------------------
    @property
    def num_branches(self) -> int:
        return len(self.branches)

    @property
    def num_interactions(self) -> int:
        return len(self.branches[0].interaction_indexes)

    @property
    def resolutions(self) -> tuple[int, ...]:
        """Branch resolutions, finest first (the paper's "1120/896/448" order)."""
        return tuple(b.resolution for b in reversed(self.branches))

    @property
    def input_size(self) -> int:
        """Nominal input size: the finest branch's resolution (the largest; the last branch's,
        except in parameter-direct designs)."""
        return max(b.resolution for b in self.branches)

    @property
    def patch_size(self) -> int:
        return self.branches[0].patch_size

    @property
    def out_channels(self) -> int:
        return self.branches[0].embed_dim

    # -- transformations -----------------------------------------------------------------------
    def with_resolutions(self, resolutions: Sequence[int] | str) -> "PIIPConfig":
        """Same network at other branch resolutions (finest first)."""
        values = parse_resolutions(resolutions, self.num_branches)
        branches = tuple(dataclasses.replace(b, resolution=r)
                         for b, r in zip(self.branches, reversed(values)))
        return dataclasses.replace(self, branches=branches)

    def with_interactions(self, num_interactions: int) -> "PIIPConfig":
        """Same network with ``num_interactions`` evenly spaced interactions.

        ``0`` keeps the branches and the merge but removes every interaction (Table 10, row 0):
        each branch then runs all its blocks in one go (empty ``interaction_indexes``).
        """
        if num_interactions < 0:
            raise ValueError(f"interactions must be >= 0, got {num_interactions}")
        if self.num_branches == 1:
            raise ValueError("a single-branch model has no interactions to change")
        branches = tuple(
            dataclasses.replace(
                b, interaction_indexes=even_interaction_indexes(b.depth, num_interactions)
                if num_interactions else ())
            for b in self.branches)
        return dataclasses.replace(self, branches=branches)

    def with_overrides(self, **overrides: Any) -> "PIIPConfig":
        """This network with ``overrides`` applied: piip's one override mechanism, behind
        :func:`~piip.models.get_config` / :func:`~piip.create_model` keywords and a run config's
        ``model.*`` fields. ``None`` leaves a setting as it is.

        Keys: ``resolutions`` (``"1120/896/448"`` or a sequence, finest first), ``interactions``
        (evenly spaced), ``interaction_attn`` (``"deform"`` / ``"regular"``), ``branch_drop_path``
        (one stochastic-depth rate per branch, branch 1 first), ``interaction_drop_path``; any
        :class:`PIIPConfig` field (``num_classes``, ``cls_head``, ``interaction={"num_points": 8}``:
        a mapping updates a nested config); any :class:`BranchConfig` field, applied to every branch
        (``drop_path_rate=0.1``, ``qk_norm=True``). Values are checked against the field types
        (:class:`ValueError`); an unknown name is a :class:`TypeError`, as an unknown keyword is.
        """
        config = self
        overrides = {k: v for k, v in overrides.items() if v is not None}
        if "task" in overrides:
            raise ValueError("the task form is chosen when a variant is built (get_config(name, task=...)), "
                             "not by an override")
        if "resolutions" in overrides:
            config = config.with_resolutions(overrides.pop("resolutions"))
        if "interactions" in overrides:
            config = config.with_interactions(int(overrides.pop("interactions")))
        interaction = {}
        if "interaction_attn" in overrides:
            if overrides["interaction_attn"] not in ("deform", "regular"):
                raise ValueError(f"interaction_attn must be 'deform' or 'regular', got {overrides['interaction_attn']!r}")
            interaction["attn_type"] = overrides.pop("interaction_attn")
        if "interaction_drop_path" in overrides:
            interaction["drop_path_rate"] = overrides.pop("interaction_drop_path")
        if interaction:
            overrides["interaction"] = {**interaction, **overrides.get("interaction", {})}
        rates = overrides.pop("branch_drop_path", None)
        top = {f.name for f in dataclasses.fields(PIIPConfig)} - {"branches", "task"}
        per_branch = {f.name for f in dataclasses.fields(BranchConfig)}
        unknown = sorted(set(overrides) - top - per_branch)
        if unknown:
            raise TypeError(f"unknown override(s) {unknown}; overrides are resolutions, interactions, "
                             f"interaction_attn, branch_drop_path, interaction_drop_path, the PIIPConfig fields "
                             f"{sorted(top)} and the BranchConfig fields {sorted(per_branch)}")
        changes = {k: _checked(config, k, v) for k, v in overrides.items() if k in top}
        branch_changes = {k: v for k, v in overrides.items() if k not in top}
        branches = [dataclasses.replace(b, **{k: _checked(b, k, v) for k, v in branch_changes.items()})
                    for b in config.branches]
        if rates is not None:
            rates = check_value(list[float], rates, "branch_drop_path")
            if len(rates) != config.num_branches:
                raise ValueError(f"branch_drop_path needs {config.num_branches} values (branch 1 first), got {rates}")
            branches = [dataclasses.replace(b, drop_path_rate=r) for b, r in zip(branches, rates)]
        return dataclasses.replace(config, branches=tuple(branches), **changes)


def _checked(config: Any, name: str, value: Any) -> Any:
    """``value`` for field ``name`` of the frozen config ``config``, checked against the field's
    type; a mapping for a nested config updates that config's fields."""
    current = getattr(config, name)
    if dataclasses.is_dataclass(current) and isinstance(value, dict):
        return dataclasses.replace(current, **{k: _checked(current, k, v) for k, v in value.items()})
    if name not in {f.name for f in dataclasses.fields(config)}:
        raise ValueError(f"{type(config).__name__} has no field {name!r}")
    return check_value(typing.get_type_hints(type(config))[name], value, name)


def segmentation_form(config: PIIPConfig) -> PIIPConfig:
    """The dense backbone as the authors' segmentation classes build it: global attention and the
    position embeddings stored at each branch's own grid (their MMSegmentation ViTs size them for
    ``img_size`` and never resize them). Still ``task="det"``: the same merged map and pyramid."""
    return dataclasses.replace(config, branches=tuple(
        dataclasses.replace(b, window_block_indexes=(), pos_embed_at_resolution=True) for b in config.branches))


def parse_resolutions(value: Sequence[int] | str, num_branches: int | None = None) -> tuple[int, ...]:
    """Parse ``"1120/896/448"`` (or a sequence) into a finest-first tuple of positive ints."""
    if isinstance(value, str):
        parts = [p.strip() for p in value.replace(",", "/").split("/")]
        try:
            values = tuple(int(p) for p in parts)
        except ValueError:
            raise ValueError(
                f"resolutions {value!r} is not of the form 'A/B/C' with integer sizes, "
                "finest branch first (e.g. '1120/896/448')") from None
    else:
        values = tuple(int(v) for v in value)
    if any(v < 1 for v in values):
        raise ValueError(f"resolutions must be positive, got {values}")
    if num_branches is not None and len(values) != num_branches:
        raise ValueError(
            f"resolutions {'/'.join(map(str, values))} give {len(values)} sizes but the model has "
            f"{num_branches} branches (one size per branch, finest first)")
    return values
