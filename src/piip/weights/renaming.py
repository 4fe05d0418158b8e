"""Bringing the key names of a pretrained ViT file to timm's, the names a branch uses.

timm names are native. The other layouts the paper's weights come in are renamed: DeiT-III's
``gamma_1``/``gamma_2`` become ``ls1.gamma``/``ls2.gamma``; Hugging Face InternViT names
(``embeddings.*``, ``encoder.layers.N.*``, ``ls1``) are mapped to timm's; a wrapper prefix
(``module.``/``backbone.``/``vision_model.`` ...) is removed. The prefix is found from the patch
embedding's kernel rather than from a list of known wrappers, so that any wrapper works and a file
holding several ViTs is refused instead of silently mixed.
"""
from __future__ import annotations

import re

import torch

from .reports import BranchWeightsError

# Keys every ViT has exactly once (timm's and Hugging Face InternViT's names): what stands before
# them is the wrapper prefix.
_ANCHORS = ("patch_embed.proj.weight", "embeddings.patch_embedding.weight")


def normalise_keys(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """Bring a ViT state dict to timm names. Returns ``(state_dict, notes, keys outside the model)``."""
    notes: list[str] = []
    outside: list[str] = []
    prefixes = sorted({k[: -len(a)] for k in sd for a in _ANCHORS
                       if k.endswith(a) and (len(k) == len(a) or k[-len(a) - 1] == ".")})
    if len(prefixes) > 1:
        raise BranchWeightsError(
            f"the file holds several ViTs (key prefixes {prefixes}); extract the one you want into its "
            "own file")
    if prefixes and prefixes[0]:
        p = prefixes[0]
        outside = [k for k in sd if not k.startswith(p)]
        sd = {k[len(p):]: v for k, v in sd.items() if k.startswith(p)}
        notes.append(f"took the keys under '{p}'")
    if "embeddings.patch_embedding.weight" in sd:  # Hugging Face InternViT (InternVisionModel)
        renamed = {}
        for k, v in sd.items():
            k = {"embeddings.class_embedding": "cls_token",
                 "embeddings.position_embedding": "pos_embed"}.get(k, k)
            k = k.replace("embeddings.patch_embedding.", "patch_embed.proj.")
            k = re.sub(r"^encoder\.layers\.(\d+)\.", r"blocks.\1.", k)
            k = re.sub(r"^(blocks\.\d+\.ls[12])$", r"\1.gamma", k)
            renamed[k] = v
        sd = renamed
        notes.append("renamed Hugging Face InternViT keys to timm names")
    if any(re.match(r"blocks\.\d+\.gamma_[12]$", k) for k in sd):  # DeiT-III / BEiT originals
        sd = {re.sub(r"^(blocks\.\d+)\.gamma_([12])$", r"\1.ls\2.gamma", k): v for k, v in sd.items()}
        notes.append("renamed gamma_1/gamma_2 to ls1.gamma/ls2.gamma")
    return sd, notes, outside
