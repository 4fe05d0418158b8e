"""Tiny variants for 28-pixel images: PIIP-TSB and its branches at Fashion-MNIST scale.

The paper's experiment in miniature, small enough to train from scratch on two CPU cores (``piip
demo``). Three ViTs play ViT-T/S/B: 32, 64 and 128 wide (the paper's 1:2:4 width ratio), 4 blocks
each, patch 4, stored position grid 7x7 (a "pretraining" resolution of 28 pixels, the dataset's own).
As in PIIP-TSB (T@1120, S@896, B@448 = 1 : 0.8 : 0.4), the biggest model sees the smallest image:
``piip_fmnist_tsb`` runs T@28, S@20, B@12 with two interactions.

With ``task="det"`` (dense maps for detection and segmentation) the branches use the paper's window
layouts: window 14 in every block of PIIP's branches, ViTDet's window 14 with every third block
global in the single ViTs.

``vit_fmnist_t`` / ``_s`` / ``_b`` are the branches as single-branch ViTs at 28 pixels: the
baselines (``vit_fmnist_b`` at the finest resolution is the paper's "ViT-B at high resolution"
comparison) and the "pretrained" models whose weights initialise PIIP's branches
(``branch_weights={"branch1": <vit_fmnist_b model.safetensors>, ...}``; the position grid is resized
to each branch's resolution on load, as for ImageNet-pretrained branches).
"""
from __future__ import annotations

from ..config.model import BranchConfig, InteractionConfig, PIIPConfig, even_interaction_indexes
from .registry import register_variant

__all__ = ["TINY_BRANCHES", "tiny_branch"]

#: T/S/B analogues: (embed_dim, num_heads); every one 4 blocks deep with 32-wide heads.
TINY_BRANCHES: dict[str, tuple[int, int]] = {"t": (32, 1), "s": (64, 2), "b": (128, 4)}
_DEPTH = 4
_PATCH = 4
_NATIVE = 28


def tiny_branch(size: str, resolution: int = _NATIVE, interactions: int = 0, **layout) -> BranchConfig:
    """A T/S/B tiny ViT branch at ``resolution`` with ``interactions`` even block groups (``layout``:
    window settings)."""
    dim, heads = TINY_BRANCHES[size]
    return BranchConfig(
        embed_dim=dim, depth=_DEPTH, num_heads=heads, resolution=resolution, patch_size=_PATCH,
        pretrain_img_size=_NATIVE, pretrain_patch_size=_PATCH,
        init_values=None,  # no layer scale: DeiT v1 style, and ~15% faster training at this size
        interaction_indexes=even_interaction_indexes(_DEPTH, interactions) if interactions else (), **layout)


#: Dense (detection) layouts, as the paper's: at a 256-pixel input the finest tiny branch has a 64x64
#: token grid, the grid of a 1024-pixel image at patch 16, so the windows are the paper's 14 tokens.
#: PIIP branches window every block (PIIP-TSB); the single ViT makes every third block global (ViTDet).
_PIIP_WINDOWS = dict(window_size=14, window_block_indexes=tuple(range(_DEPTH)))
_VITDET_WINDOWS = dict(window_size=14, window_block_indexes=tuple(i for i in range(_DEPTH) if i % 3 != 2))


def _tiny(name: str, task: str, branches: list[BranchConfig], **fields) -> PIIPConfig:
    cls = dict(num_classes=10, cls_head="per_branch", cls_pool="avg") if task == "cls" else {}
    return PIIPConfig(branches=tuple(branches), task=task, name=name, **cls, **fields)


def _register_vit(size: str) -> None:
    dim, _ = TINY_BRANCHES[size]

    @register_variant(f"vit_fmnist_{size}",
                      description=f"tiny ViT-{size.upper()} ({dim} wide, 4 blocks, patch 4) @28: a "
                                  "baseline / branch pretraining model for Fashion-MNIST")
    def variant(task: str) -> PIIPConfig:
        layout = _VITDET_WINDOWS if task == "det" else {}
        return _tiny(f"vit_fmnist_{size}", task, [tiny_branch(size, **layout)])


for _size in TINY_BRANCHES:
    _register_vit(_size)


@register_variant("piip_fmnist_tsb",
                  description="tiny PIIP-TSB for 28-pixel images: T@28, S@20, B@12 (32/64/128 wide), "
                              "2 interactions; the Fashion-MNIST demonstration")
def piip_fmnist_tsb(task: str) -> PIIPConfig:
    layout = _PIIP_WINDOWS if task == "det" else {}
    branches = [tiny_branch("b", 12, 2, **layout), tiny_branch("s", 20, 2, **layout),
                tiny_branch("t", 28, 2, **layout)]
    interaction = InteractionConfig(num_heads=4, drop_path_rate=0.0)
    return _tiny("piip_fmnist_tsb", task, branches, interaction=interaction)
