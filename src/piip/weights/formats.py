"""Reading a pretrained ViT file, whatever its format, into a flat ``{name: tensor}`` dict.

The weights the paper used come in several layouts: timm's ``.safetensors``, the authors'
``.pth`` files (``model``/``state_dict``/``module`` containers, unwrapped here), Hugging Face's sharded
checkpoints and the original JAX ``.npz`` files of AugReg / big_vision. The ``.npz`` files are
converted with timm's own loader rather than a converter of ours, so that they get exactly the
tensors ``timm.create_model(..., pretrained=True)`` would. Key names are left as in the file
(:mod:`~piip.weights.renaming` brings them to timm's).
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any, Union

import torch

from .adapt import is_square
from .io import read_torch_file, unwrap_state_dict
from .reports import BranchWeightsError

__all__ = ["load_weights_file"]

PathLike = Union[str, os.PathLike]


def _unwrap(obj: Any) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Tensors of a checkpoint (containers unwrapped) and a note per container."""
    tensors, meta = unwrap_state_dict(obj)
    return tensors, [f"unwrapped the '{key}' container" for key in meta["containers"]]


def _read_any(path: Path) -> dict[str, torch.Tensor]:
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    if suffix == ".json":  # sharded checkpoint index (Hugging Face layout)
        index = json.loads(path.read_text())
        if not isinstance(index, dict) or "weight_map" not in index:
            raise BranchWeightsError(f"{str(path)!r} is not a sharded-checkpoint index (no 'weight_map')")
        shards = sorted(set(index["weight_map"].values()))
        out: dict[str, torch.Tensor] = {}
        for shard in shards:
            out.update(_unwrap(_read_any(path.parent / shard))[0])
        return out
    return read_torch_file(path)


def _npz_to_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A JAX ``.npz`` ViT (AugReg, original ViT, big_vision) as a timm state dict.

    The architecture is read off the array shapes, a matching timm ``VisionTransformer`` is built at
    the file's own grid and timm's ``load_pretrained`` (``_load_weights``) converts the arrays.
    """
    import numpy as np
    from timm.models.vision_transformer import VisionTransformer

    with np.load(path, allow_pickle=False) as w:
        files = set(w.files)
        prefix = next((p for p in ("", "opt/target/", "params/", "params/img/")
                       if f"{p}embedding/kernel" in files), None)
        if prefix is None:
            raise BranchWeightsError(
                f"{str(path)!r} is not a JAX ViT .npz (no 'embedding/kernel' array); supported are the "
                "original ViT / AugReg and big_vision layouts")

        def shape(key: str) -> tuple[int, ...]:
            return tuple(w[prefix + key].shape)

        kernel = shape("embedding/kernel")
        if len(kernel) != 4:
            raise BranchWeightsError(f"unsupported patch-embedding kernel shape {kernel} in {str(path)!r}")
        patch, in_chans, dim = kernel[0], kernel[2], kernel[3]
        class_token = f"{prefix}cls" in files
        big_vision = f"{prefix}pos_embedding" in files
        pos_key = "pos_embedding" if big_vision else "Transformer/posembed_input/pos_embedding"
        length = math.prod(shape(pos_key)) // dim
        stacked = f"{prefix}Transformer/encoderblock/LayerNorm_0/scale" in files
        mha, mlp = ("MultiHeadDotProductAttention_0", "MlpBlock_0") if big_vision or stacked else \
            ("MultiHeadDotProductAttention_1", "MlpBlock_3")
        if stacked:
            depth = shape("Transformer/encoderblock/LayerNorm_0/scale")[0]
            block = "Transformer/encoderblock/"
        else:
            depth = sum(1 for k in files if re.fullmatch(
                re.escape(prefix) + r"Transformer/encoderblock_\d+/LayerNorm_0/scale", k))
            block = "Transformer/encoderblock_0/"
        num_heads = shape(f"{block}{mha}/query/kernel")[-2]
        hidden = shape(f"{block}{mlp}/Dense_0/kernel")[-1]
        num_classes = shape("head/kernel")[-1] if f"{prefix}head/kernel" in files else 0
        final_norm = f"{prefix}Transformer/encoder_norm/scale" in files
        map_head = f"{prefix}MAPHead_0/probe" in files
    prefix_rows = 1 if class_token and not is_square(length) else 0
    grid = math.isqrt(length - prefix_rows)
    if grid * grid != length - prefix_rows:
        raise BranchWeightsError(f"cannot infer a square position grid from {length} positions in {str(path)!r}")
    vit = VisionTransformer(
        img_size=grid * patch, patch_size=patch, in_chans=in_chans, num_classes=num_classes,
        global_pool="map" if map_head else ("token" if class_token else "avg"), embed_dim=dim,
        depth=depth, num_heads=num_heads, mlp_ratio=hidden / dim, qkv_bias=True,
        class_token=class_token, no_embed_class=class_token and not prefix_rows, fc_norm=False,
        final_norm=final_norm,
        weight_init="skip")
    vit.load_pretrained(str(path), prefix=prefix)
    return {k: v.detach() for k, v in vit.state_dict().items()}


def load_weights_file(path: PathLike) -> dict[str, torch.Tensor]:
    """Read a pretrained ViT file into a flat ``{name: tensor}`` dict (names as in the file).

    Supported: ``.safetensors``; ``.pth``/``.pt``/``.bin``/``.ckpt`` (``torch.load`` with
    ``weights_only=True``; ``model``/``state_dict``/``module`` containers unwrapped); a sharded
    checkpoint's ``*.index.json``; a directory holding one of these; a JAX ``.npz`` (converted to
    timm names by timm's loader).
    """
    return load_weights_file_with_notes(Path(path))[0]


def load_weights_file_with_notes(path: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """:func:`load_weights_file`, and a note per conversion (unwrapped container, ``.npz``) for the
    branch's report."""
    path = Path(os.path.expanduser(str(path)))
    if not path.exists():
        raise FileNotFoundError(f"pretrained weights file {str(path)!r} does not exist")
    if path.is_dir():
        candidates = (sorted(path.glob("*.safetensors.index.json")) or sorted(path.glob("*.bin.index.json"))
                      or sorted(path.glob("*.safetensors")) or sorted(path.glob("*.pth"))
                      or sorted(path.glob("*.bin")) or sorted(path.glob("*.npz")))
        if len(candidates) != 1:
            raise BranchWeightsError(
                f"directory {str(path)!r} holds {len(candidates)} candidate weight files "
                f"({[c.name for c in candidates][:6]}); pass the file itself")
        path = candidates[0]
    if path.suffix.lower() == ".npz":
        return _npz_to_state_dict(path), ["converted from a JAX .npz by timm's VisionTransformer.load_pretrained"]
    return _unwrap(_read_any(path))
