"""Key names: a pretrained ViT file's brought to timm's, the names a branch uses
(:func:`normalise_keys`), and the authors' task-head tensors renamed by a table of patterns
(:func:`flatten_prefixed`, :func:`rename_keys`).

timm names are native. The other layouts the paper's weights come in are renamed: DeiT-III's
``gamma_1``/``gamma_2`` become ``ls1.gamma``/``ls2.gamma``; Hugging Face InternViT names
(``embeddings.*``, ``encoder.layers.N.*``, ``ls1``) are mapped to timm's; a wrapper prefix
(``module.``/``backbone.``/``vision_model.`` ...) is removed. The prefix is found from the patch
embedding's kernel rather than from a list of known wrappers, so that any wrapper works and a file
holding several ViTs is refused instead of silently mixed.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence

import torch

from .errors import CheckpointError
from .reports import BranchWeightsError

__all__ = ["normalise_keys", "flatten_prefixed", "rename_keys"]

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


def flatten_prefixed(extra: Mapping[str, Mapping[str, torch.Tensor]], prefixes: Sequence[str]) -> dict[str, torch.Tensor]:
    """A checkpoint's non-backbone tensors grouped by prefix (``{"neck": {"convs.0.weight": ...}}``)
    as one dict of full keys (``"neck.convs.0.weight"``), for the ``prefixes`` given."""
    return {f"{prefix}.{key}": tensor for prefix in prefixes for key, tensor in extra.get(prefix, {}).items()}


def rename_keys(tensors: Mapping[str, torch.Tensor],
                renames: Sequence[tuple[re.Pattern, str | Callable[[re.Match], str]]],
                what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every key renamed by the first pattern of ``renames`` that matches all of it, the new name
    the pattern's template (``\\1`` groups) or a function of the match; values unchanged.

    Returns ``(tensors, names)``: ``names`` maps each new key to the key it came from (for error
    messages). Keys no pattern matches raise :class:`CheckpointError` listing them ("have no place
    in ``what``").
    """
    out: dict[str, torch.Tensor] = {}
    names: dict[str, str] = {}
    unmapped = []
    for key, tensor in tensors.items():
        for pattern, target in renames:
            if (match := pattern.fullmatch(key)):
                new = match.expand(target) if isinstance(target, str) else target(match)
                break
        else:
            unmapped.append(key)
            continue
        out[new] = tensor
        names[new] = key
    if unmapped:
        raise CheckpointError(f"{len(unmapped)} neck/head tensor(s) have no place in {what}: {unmapped[:10]}")
    return out, names
