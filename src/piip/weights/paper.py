"""The pretrained weights the PIIP paper initialised its branches from.

Most branches name a timm ``name.tag`` in their config (``pretrained``); this module says, for a
branch config, which weights of the paper that tag stands for, and holds the one source timm does
not have: InternViT-6B's Hugging Face repository.
"""
from __future__ import annotations

import os
from typing import Any
from urllib.parse import urlparse

__all__ = ["INTERNVIT_6B_WEIGHTS", "paper_weights"]

#: InternViT-6B is not in timm. The paper initialises it from InternVL's ``intern_vit_6b_224px``
#: (Hugging Face ``OpenGVLab/InternViT-6B-224px``); load it from a local file, the preset's
#: ``pretrained`` stays ``None``.
INTERNVIT_6B_WEIGHTS = "OpenGVLab/InternViT-6B-224px"

#: ViT size letter by embedding width (ViT-T/S/B/L/H).
VIT_SIZE_BY_WIDTH = {192: "T", 384: "S", 768: "B", 1024: "L", 1280: "H"}


def paper_weights(cfg: Any) -> tuple[str, str]:
    """``(weights the paper used, timm name.tag)`` of a :class:`BranchConfig`, as markdown."""
    tag = cfg.pretrained
    if tag is None:
        if cfg.embed_dim == 3200 and cfg.qk_norm:
            return ("InternViT-6B, 224 px (`intern_vit_6b_224px`)",
                    f"not in timm: local file from Hugging Face `{INTERNVIT_6B_WEIGHTS}`")
        return "none (trained from scratch)", "—"
    size = VIT_SIZE_BY_WIDTH.get(cfg.embed_dim, f"{cfg.embed_dim}-d")
    img = cfg.pretrain_img_size
    if tag.startswith("deit3_"):
        what = f"DeiT-III ViT-{size}/16, IN-21k → IN-1k, {img} px"
    elif tag.startswith("deit_"):
        what = f"DeiT ViT-{size}/16 (v1), IN-1k"
    elif "augreg" in tag:
        what = f"AugReg ViT-{size}/16, IN-21k → IN-1k, {img} px"
    elif tag.endswith(".mae"):
        what = f"MAE ViT-{size}/{cfg.pretrain_patch_size}, IN-1k self-supervised"
    elif "dinov2" in tag:
        what = f"DINOv2 ViT-{size}/{cfg.pretrain_patch_size}, LVD-142M"
    else:
        what = f"ViT-{size}"
    try:
        from timm.models import get_pretrained_cfg
        url = getattr(get_pretrained_cfg(tag), "url", None)
    except Exception:
        url = None
    if url:
        what += f" (`{os.path.basename(urlparse(url).path)}`)"
    return what, f"`{tag}`"
