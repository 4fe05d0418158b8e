"""Branch initialisation from pretrained ViT weights (timm tags or local files).

Every PIIP branch starts from an off-the-shelf ViT (DeiT, DeiT-III, AugReg, MAE, DINOv2,
InternViT-6B, ...). :func:`load_branch_weights` copies such weights into ``model.branches[i]`` and
adapts them the way the authors' ``init_weights`` did (reference notes §2.2, §6):

* **position embedding**: a leading class row is dropped for DeiT-style branches
  (``pos_embed_class_row=False``) and kept for InternViT-style ones; the patch grid is resized
  bicubically (``align_corners=False``, no antialias, float32) from the file's grid to the branch's
  stored grid ``pretrain_img_size // patch_size`` (e.g. MAE-H/14: 16x16 -> 14x14; DINOv2: 37x37 -> 32x32);
* **patch embedding**: a kernel of another size (14 -> 16) is resized bicubically
  (``F.interpolate``, the original's rule; ``patch_resample="pi"`` uses timm's FlexiViT
  pseudo-inverse ``resample_patch_embed`` instead);
* **key names**: timm names are native; DeiT-III's ``gamma_1``/``gamma_2`` become
  ``ls1.gamma``/``ls2.gamma``; Hugging Face InternViT names (``embeddings.*``, ``encoder.layers.N.*``,
  ``ls1``) are mapped to timm's; wrappers (``model``/``state_dict``/``module`` containers, a
  ``module.``/``backbone.``/``vision_model.`` prefix) are removed; original JAX ``.npz`` files
  (AugReg / big_vision) are converted with timm's own loader;
* **reporting**: keys the branch has no use for (classifier ``head``, final ``norm`` of a dense
  branch, ``fc_norm``, ``mask_token``, a DeiT-style branch's ``cls_token`` ...) are ignored and
  reported; keys that stay at their initialisation are reported with the reason (layer-scale gammas
  of checkpoints without layer scale, e.g. DeiT v1, MAE and AugReg, stay at ``init_values``; the
  unused class row of the position embedding when the file has none; a head of another width).
  Any other missing, unexpected block or mismatched key is an error (``strict=False`` reports it
  instead).

The interaction, merge, feature-pyramid and merged-classifier modules are never touched: they keep
their documented initialisation (gates at zero, so a fresh PIIP starts as its pretrained branches).

Branches without a local file use their config's ``pretrained`` timm ``name.tag`` through timm and
the Hugging Face hub (files already in the local hub/torch cache are used without any network
access). Without network access that fails within a few seconds with a message naming the branch,
the tag and the ``branch_weights={"branchK": "/path/to/file"}`` alternative.
"""
from __future__ import annotations

import json
import math
import os
import re
import socket
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from torch import nn

from .io import read_torch_file, unwrap_state_dict

__all__ = [
    "BranchLoadReport",
    "BranchWeightsError",
    "HubUnavailableError",
    "LoadReport",
    "adapt_branch_state_dict",
    "load_branch",
    "load_branch_weights",
    "load_weights_file",
    "paper_weights",
    "pretrained_weights_table",
    "write_weights_table",
]

PathLike = Union[str, os.PathLike]
BranchKey = Union[str, int]

#: Seconds allowed for the hub connectivity check before ``pretrained=True`` gives up.
HUB_CONNECT_TIMEOUT = 3.0

_BLOCK_RE = re.compile(r"blocks\.\d+\.")


class BranchWeightsError(ValueError):
    """Pretrained weights do not fit a branch (missing, unexpected or mismatched keys), or a
    branch has no source of weights."""


class HubUnavailableError(RuntimeError):
    """A branch's timm weights cannot be fetched (offline, hub unreachable, download failed)."""


# -- reports -------------------------------------------------------------------------------------

def _summarise(keys) -> str:
    """``blocks.0.ls1.gamma, blocks.1.ls1.gamma`` -> ``blocks.*.ls1.gamma (x2)``; single keys verbatim."""
    groups: dict[str, list[str]] = {}
    for key in keys:
        groups.setdefault(_BLOCK_RE.sub("blocks.*.", key), []).append(key)
    return ", ".join(f"{short} (x{len(group)})" if len(group) > 1 else group[0]
                     for short, group in groups.items())


@dataclass
class BranchLoadReport:
    """What happened to one branch.

    Attributes:
        branch: ``"branch1"`` ... (``branch1`` = ``model.branches[0]``, the largest model).
        source: the file, or ``timm:<name.tag>`` (with the cached file when one was used).
        loaded: branch keys copied from the source (resampled ones included).
        resampled: branch key -> what was adapted (class row dropped, grid / kernel resized).
        ignored: source keys the branch has no use for (heads, final norms, tokens, ...).
        initialised: branch keys kept at their initialisation -> why.
        notes: key conversions applied (renamed layouts, unwrapped containers, npz conversion).
    """

    branch: str
    source: str
    loaded: list[str] = field(default_factory=list)
    resampled: dict[str, str] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)
    initialised: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"{self.branch} <- {self.source}", f"  loaded: {len(self.loaded)} tensors"]
        for key, what in self.resampled.items():
            lines.append(f"  adapted: {key}: {what}")
        if self.initialised:
            by_reason: dict[str, list[str]] = {}
            for key, why in self.initialised.items():
                by_reason.setdefault(why, []).append(key)
            for why, keys in by_reason.items():
                lines.append(f"  kept initialised: {_summarise(keys)} ({why})")
        if self.ignored:
            lines.append(f"  ignored from the source: {_summarise(self.ignored)}")
        for note in self.notes:
            lines.append(f"  note: {note}")
        return "\n".join(lines)


@dataclass
class LoadReport:
    """Per-branch reports of :func:`load_branch_weights`.

    Attributes:
        branches: ``"branchK"`` -> :class:`BranchLoadReport` for every branch that was loaded.
        skipped: ``"branchK"`` -> why a branch was left at its random initialisation.
        new_modules: PIIP modules outside the branches (interactions, merge, pyramid, classifier);
            they are never loaded here and keep their documented initialisation.
    """

    branches: dict[str, BranchLoadReport] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    new_modules: list[str] = field(default_factory=list)

    def __getitem__(self, name: str) -> BranchLoadReport:
        return self.branches[name]

    def __str__(self) -> str:
        parts = [str(r) for r in self.branches.values()]
        parts += [f"{name}: not loaded ({why})" for name, why in self.skipped.items()]
        if self.new_modules:
            parts.append("kept at PIIP's initialisation (not in any branch file): "
                         + ", ".join(self.new_modules))
        return "\n".join(parts) if parts else "nothing loaded"


# -- reading files -------------------------------------------------------------------------------

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
    prefix_rows = 1 if class_token and not _is_square(length) else 0
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
    return _load_file(Path(path))[0]


def _load_file(path: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
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


# -- key normalisation ---------------------------------------------------------------------------

_ANCHORS = ("patch_embed.proj.weight", "embeddings.patch_embedding.weight")


def _normalise_keys(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
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


# -- adaptation ----------------------------------------------------------------------------------

def _is_square(n: int) -> bool:
    return n >= 0 and math.isqrt(n) ** 2 == n


def _resize_grid(rows: torch.Tensor, old: int, new: int) -> torch.Tensor:
    """``(1, old*old, D)`` -> ``(1, new*new, D)``, bicubic, ``align_corners=False``, no antialias."""
    x = rows.float().reshape(1, old, old, -1).permute(0, 3, 1, 2)
    x = F.interpolate(x, size=(new, new), mode="bicubic", align_corners=False)
    return x.permute(0, 2, 3, 1).reshape(1, new * new, -1)


def _resize_kernel(kernel: torch.Tensor, size: tuple[int, int], method: str) -> torch.Tensor:
    if method == "pi":
        from timm.layers import resample_patch_embed
        return resample_patch_embed(kernel.float(), list(size), interpolation="bicubic", antialias=True)
    return F.interpolate(kernel.float(), size=size, mode="bicubic", align_corners=False)


# Source keys with no counterpart in a branch that are ignored without complaint.
def _is_ignorable(key: str) -> bool:
    return not (key.startswith("blocks.") or key.startswith("patch_embed.") or key == "pos_embed")


@torch.no_grad()
def adapt_branch_state_dict(
    branch: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    name: str = "branch",
    source: str = "state dict",
    strict: bool = True,
    patch_resample: Literal["interpolate", "pi"] = "interpolate",
) -> tuple[dict[str, torch.Tensor], BranchLoadReport]:
    """Adapt a ViT state dict to ``branch`` (a :class:`~piip.layers.branch.ViTBranch`) without
    loading it. Returns the tensors to load (branch names, branch dtypes) and the report.

    Raises :class:`BranchWeightsError` for missing keys that are not expected, unexpected block /
    embedding keys and shape mismatches (``strict=False`` reports them in ``initialised`` /
    ``ignored`` instead).
    """
    if patch_resample not in ("interpolate", "pi"):
        raise ValueError(f"patch_resample must be 'interpolate' or 'pi', got {patch_resample!r}")
    report = BranchLoadReport(branch=name, source=source)
    src, notes, outside = _normalise_keys(dict(state_dict))
    report.notes += notes
    report.ignored += outside
    cfg = branch.config
    target = branch.state_dict()
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    missing: list[str] = []
    mismatched: list[str] = []

    def put(key: str, value: torch.Tensor) -> None:
        out[key] = value.to(dtype=target[key].dtype)
        report.loaded.append(key)

    # position embedding: class row, grid
    if "pos_embed" in src:
        used.add("pos_embed")
        v = src["pos_embed"]
        if v.dim() == 4:  # (1, H, W, D) layout
            if v.shape[1] != v.shape[2]:
                raise BranchWeightsError(f"{name}: non-square position grid {tuple(v.shape)} in {source}")
            v = v.flatten(1, 2)
        v = v.reshape(1, -1, v.shape[-1])
        tgt = target["pos_embed"]
        length, dim = v.shape[1], v.shape[2]
        # leading rows of prefix tokens (class, DeiT distillation) when the rest is a square grid
        tokens = int("cls_token" in src) + int("dist_token" in src)
        src_prefix = next((p for p in dict.fromkeys((0, 1, tokens)) if _is_square(length - p)), None)
        if src_prefix is None or dim != tgt.shape[-1]:
            mismatched.append(f"pos_embed: file {tuple(src['pos_embed'].shape)}, model {tuple(tgt.shape)}")
        else:
            old, new = math.isqrt(length - src_prefix), cfg.pos_embed_grid
            rows = v[:, src_prefix:]
            what = []
            if src_prefix and not branch.pos_embed_prefix:
                what.append("class row dropped" if src_prefix == 1 else f"{src_prefix} prefix rows dropped")
            elif src_prefix > 1:
                what.append(f"{src_prefix - 1} extra prefix row(s) dropped")
            if old != new:
                rows = _resize_grid(rows, old, new)
                what.append(f"grid {old}x{old} -> {new}x{new} (bicubic)")
            if branch.pos_embed_prefix:
                if src_prefix:
                    cls_row = v[:, :1]
                else:
                    cls_row = tgt[:, :1]
                    report.initialised["pos_embed[:, :1]"] = (
                        "the file's position embedding has no class row; the row is unused by patch tokens")
                rows = torch.cat([cls_row.float(), rows.float()], dim=1)
            put("pos_embed", rows)
            if what:
                report.resampled["pos_embed"] = ", ".join(what)

    # patch embedding kernel
    key = "patch_embed.proj.weight"
    if key in src:
        used.add(key)
        v, tgt = src[key], target[key]
        if v.dim() == 4 and v.shape[:2] == tgt.shape[:2] and v.shape[2:] != tgt.shape[2:]:
            rule = "bicubic F.interpolate" if patch_resample == "interpolate" else "timm resample_patch_embed"
            report.resampled[key] = f"kernel {v.shape[2]}x{v.shape[3]} -> {tgt.shape[2]}x{tgt.shape[3]} ({rule})"
            v = _resize_kernel(v, tuple(tgt.shape[2:]), patch_resample)
        if v.shape != tgt.shape:
            mismatched.append(f"{key}: file {tuple(src[key].shape)}, model {tuple(tgt.shape)}")
        else:
            put(key, v)

    # class token
    if "cls_token" in target:
        if "cls_token" in src:
            used.add("cls_token")
            v = src["cls_token"]
            if v.numel() == target["cls_token"].numel():
                put("cls_token", v.reshape(target["cls_token"].shape))
            else:
                mismatched.append(f"cls_token: file {tuple(v.shape)}, model {tuple(target['cls_token'].shape)}")

    has_layer_scale = any(re.match(r"blocks\.\d+\.ls[12]\.gamma$", k) for k in src)
    for key, tgt in target.items():
        if key in out or key in used:
            continue
        if key.startswith("head."):
            v = src.get(key)
            if v is None or v.shape != tgt.shape:
                width = (f"a {src['head.weight'].shape[0]}-class head" if "head.weight" in src
                         else "no classifier head")
                report.initialised[key] = (f"the file has {width}, the branch a "
                                           f"{target['head.weight'].shape[0]}-class one")
                if v is not None:
                    used.add(key)
                continue
        if key.startswith("fc_norm.") and key not in src:
            report.initialised[key] = ("the file has no fc_norm (a class-token model): the average-pool "
                                       "head's norm starts at its initialisation")
            continue
        if key in src:
            used.add(key)
            if src[key].shape == tgt.shape:
                put(key, src[key])
            elif src[key].numel() == tgt.numel() and key.endswith(("ls1.gamma", "ls2.gamma")):
                put(key, src[key].reshape(tgt.shape))
            else:
                mismatched.append(f"{key}: file {tuple(src[key].shape)}, model {tuple(tgt.shape)}")
            continue
        if re.match(r"blocks\.\d+\.ls[12]\.gamma$", key) and not has_layer_scale:
            report.initialised[key] = (f"the file has no layer scale: kept at init_values="
                                       f"{cfg.init_values:g}")
            continue
        missing.append(key)

    unexpected = []
    for key in src:
        if key in used:
            continue
        if _is_ignorable(key):
            report.ignored.append(key)
        else:
            unexpected.append(key)

    if missing or unexpected or mismatched:
        if strict:
            lines = [f"{name}: the weights in {source} do not fit the branch "
                     f"(dim {cfg.embed_dim}, depth {cfg.depth}, heads {cfg.num_heads}, "
                     f"qkv_bias={cfg.qkv_bias}, qk_norm={cfg.qk_norm}, norm={cfg.norm_layer}, "
                     f"patch {cfg.patch_size}):"]
            if missing:
                lines.append(f"  missing from the file: {_summarise(missing)}")
            if unexpected:
                lines.append(f"  unexpected in the file: {_summarise(unexpected)}")
            if mismatched:
                lines.append("  shape mismatch: " + "; ".join(mismatched[:10])
                             + (f" (+{len(mismatched) - 10} more)" if len(mismatched) > 10 else ""))
            lines.append("Is this file for this architecture? strict=False loads what fits and reports the rest.")
            raise BranchWeightsError("\n".join(lines))
        for key in missing:
            report.initialised[key] = "MISSING from the file (strict=False)"
        for entry in mismatched:
            report.initialised[entry.split(":")[0]] = f"shape mismatch, not loaded (strict=False): {entry}"
        report.ignored += unexpected
    return out, report


def _copy_into(branch: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    params = dict(branch.named_parameters())
    params.update(dict(branch.named_buffers()))
    with torch.no_grad():
        for key, value in tensors.items():
            params[key].copy_(value)


def load_branch(
    branch: nn.Module,
    source: PathLike | Mapping[str, torch.Tensor],
    *,
    name: str = "branch",
    strict: bool = True,
    patch_resample: Literal["interpolate", "pi"] = "interpolate",
) -> BranchLoadReport:
    """Load a file (or an in-memory state dict) into one :class:`~piip.layers.branch.ViTBranch`."""
    if isinstance(source, Mapping):
        sd, notes, desc = dict(source), [], "state dict"
    else:
        sd, notes = _load_file(Path(source))
        desc = str(source)
    tensors, report = adapt_branch_state_dict(branch, sd, name=name, source=desc, strict=strict,
                                              patch_resample=patch_resample)
    report.notes[:0] = notes
    _copy_into(branch, tensors)
    return report


# -- the hub ------------------------------------------------------------------------------------

def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def _offline_reason() -> str | None:
    if _truthy(os.environ.get("HF_HUB_OFFLINE")):
        return "HF_HUB_OFFLINE is set"
    try:
        from huggingface_hub import constants
        if constants.HF_HUB_OFFLINE:
            return "huggingface_hub is in offline mode (HF_HUB_OFFLINE)"
    except Exception:
        pass
    return None


def _cached_file(cfg: Any) -> str | None:
    """A local copy of a timm pretrained cfg's weights (explicit file, HF hub cache, torch hub
    cache), or ``None``. Never touches the network."""
    file = getattr(cfg, "file", None)
    if file and os.path.exists(file):
        return str(file)
    hub_id = getattr(cfg, "hf_hub_id", None)
    if hub_id:
        try:
            from huggingface_hub import try_to_load_from_cache
            repo, _, revision = hub_id.partition("@")
            for filename in (getattr(cfg, "hf_hub_filename", None), "model.safetensors", "pytorch_model.bin"):
                if not filename:
                    continue
                hit = try_to_load_from_cache(repo, filename, revision=revision or None)
                if isinstance(hit, str) and os.path.exists(hit):
                    return hit
        except Exception:
            pass
    url = getattr(cfg, "url", None)
    if url:
        candidate = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(url).path))
        if os.path.exists(candidate):
            return candidate
    return None


def _reachable(host: str, port: int, timeout: float) -> bool:
    """TCP connect to ``host:port`` bounded by ``timeout`` (name resolution included)."""
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def _hub_endpoint(cfg: Any) -> tuple[str, int]:
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    if proxy:
        url = urlparse(proxy if "://" in proxy else f"http://{proxy}")
    elif getattr(cfg, "hf_hub_id", None):
        url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    else:
        url = urlparse(getattr(cfg, "url", "") or "https://huggingface.co")
    return url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)


def _where_to_get(tag: str, cfg: Any) -> str:
    ways = []
    hub_id = getattr(cfg, "hf_hub_id", None)
    if hub_id:
        ways.append(f"model.safetensors from https://huggingface.co/{hub_id.partition('@')[0]}")
    if getattr(cfg, "url", None):
        ways.append(f"the original file {cfg.url}")
    ways.append(f"timm.create_model('{tag}', pretrained=True) on a machine with network access, saving "
                "its state_dict()")
    return "get " + "; or ".join(ways)


@dataclass
class _TimmSource:
    tag: str
    branches: list[str]
    cfg: Any = None
    cached: str | None = None
    problem: str | None = None


def _resolve_timm(tag: str, branches: list[str], timeout: float, reachability: dict) -> _TimmSource:
    """Where timm's ``tag`` would come from (local cache or download), without downloading it.
    ``problem`` says why it cannot be had (unknown tag, offline, unreachable hub)."""
    from timm.models import get_pretrained_cfg

    source = _TimmSource(tag, branches, cfg=get_pretrained_cfg(tag))
    if source.cfg is None:
        source.problem = f"timm knows no pretrained weights '{tag}'"
        return source
    source.cached = _cached_file(source.cfg)
    if source.cached:
        return source
    reason = _offline_reason()
    if reason is None:
        host, port = _hub_endpoint(source.cfg)
        if (host, port) not in reachability:
            reachability[host, port] = _reachable(host, port, timeout)
        if not reachability[host, port]:
            reason = f"{host}:{port} is not reachable (checked for {timeout:g}s)"
    if reason:
        source.problem = f"cannot download timm '{tag}': {reason}; {_where_to_get(tag, source.cfg)}"
    return source


def _fetch_timm(source: _TimmSource) -> tuple[dict[str, torch.Tensor], str, list[str]]:
    if source.cached:
        sd, notes = _load_file(Path(source.cached))
        return sd, f"timm:{source.tag} (cached {source.cached})", notes
    import timm
    try:
        model = timm.create_model(source.tag, pretrained=True)
    except Exception as e:
        raise HubUnavailableError(
            f"timm could not load the pretrained weights of {', '.join(source.branches)} "
            f"('{source.tag}'): {e}\n{_where_to_get(source.tag, source.cfg)}, then "
            + _how_to_pass(source.branches)) from e
    return {k: v.detach() for k, v in model.state_dict().items()}, f"timm:{source.tag}", []


def _how_to_pass(branches: list[str]) -> str:
    example = ", ".join(f'"{b}": "/path/to/{b}_weights.safetensors"' for b in branches)
    return (f"pass local files: branch_weights={{{example}}} (.safetensors, .pth/.pt/.bin, the original "
            "JAX .npz, or a directory holding one); branches given a file need no network")


# -- the model-level entry point ----------------------------------------------------------------

def _branch_index(key: BranchKey, count: int) -> int:
    """``"branch1"`` -> 0; ``"branches.0"`` -> 0; ``0`` -> 0."""
    index = None
    if isinstance(key, int) and not isinstance(key, bool):
        index = key
    elif isinstance(key, str):
        text = key.strip()
        m = re.fullmatch(r"branch(\d+)", text)
        if m:
            index = int(m.group(1)) - 1
        m = re.fullmatch(r"branches\.(\d+)", text)
        if m:
            index = int(m.group(1))
    if index is None or not 0 <= index < count:
        valid = ", ".join(f'"branch{i + 1}"' for i in range(count))
        raise BranchWeightsError(
            f"unknown branch {key!r}: this model has {count} branches, named {valid} (branch1 is the "
            f"largest model, model.branches[0]); 0-based ints and 'branches.N' are accepted too")
    return index


def _new_modules(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_children()
            if n != "branches" and m is not None and any(True for _ in m.parameters())]


def _no_timm_weights(cfg: Any) -> str:
    if cfg.embed_dim == 3200 and cfg.qk_norm:
        from ..models.variants import INTERNVIT_6B_WEIGHTS
        return ("InternViT-6B is not in timm; use its weights from Hugging Face "
                f"'{INTERNVIT_6B_WEIGHTS}' (the directory, or its *.safetensors / *.index.json) or the "
                "original intern_vit_6b_224px.pth")
    return "no pretrained weights in its config (pretrained=None, e.g. a from-scratch variant)"


def load_branch_weights(
    model: nn.Module,
    sources: Mapping[BranchKey, PathLike] | None = None,
    *,
    use_hub: bool = True,
    strict: bool = True,
    patch_resample: Literal["interpolate", "pi"] = "interpolate",
    hub_timeout: float = HUB_CONNECT_TIMEOUT,
) -> LoadReport:
    """Initialise the branches of a :class:`~piip.models.piip.PIIP` from pretrained weights.

    Args:
        model: the PIIP network (its ``branches`` are loaded in place).
        sources: local files per branch: ``{"branch1": "/path/deit3_base.safetensors", ...}``;
            ``"branch1"`` is ``model.branches[0]`` (the largest model); 0-based ints and
            ``"branches.0"`` are accepted too. Formats: see :func:`load_weights_file`.
        use_hub: branches without a local file are loaded from their config's ``pretrained`` timm
            ``name.tag`` (local hub/torch cache first, else a download). A branch without such a
            tag is an error. ``False`` loads only ``sources`` and leaves the other branches at
            their random initialisation (listed in ``report.skipped``).
        strict: raise on keys that do not fit (default); ``False`` loads what fits and reports
            the rest.
        patch_resample: kernel resizing when the file's patch size differs: ``"interpolate"``
            (bicubic ``F.interpolate`` of the kernel, the original's rule) or ``"pi"`` (timm's
            FlexiViT pseudo-inverse ``resample_patch_embed``).
        hub_timeout: seconds for the connectivity check before a download.

    Every source is located first (all branches that cannot get weights are reported together,
    within ``hub_timeout`` when offline), then every branch is read, adapted and checked, and only
    then are parameters written: an error leaves the model unchanged. Raises
    :class:`HubUnavailableError` (offline / unreachable hub / failed download),
    :class:`BranchWeightsError` (weights that do not fit, unknown branch names, a branch without
    any source) and ``FileNotFoundError``.
    """
    branches = list(model.branches)
    files: dict[int, PathLike] = {}
    for key, path in (sources or {}).items():
        index = _branch_index(key, len(branches))
        if index in files:
            raise BranchWeightsError(f"branch{index + 1} is given twice in branch_weights")
        files[index] = path

    report = LoadReport(new_modules=_new_modules(model))
    plan: list[tuple[int, str]] = []  # (branch index, key into ``fetched``)
    hub_tags: dict[str, list[str]] = {}
    problems: dict[str, str] = {}  # branch name -> why it has no weights
    for i, branch in enumerate(branches):
        name = f"branch{i + 1}"
        if i in files:
            path = Path(os.path.expanduser(str(files[i])))
            plan.append((i, f"file:{path.resolve() if path.exists() else path}"))
        elif not use_hub:
            report.skipped[name] = "no file given (use_hub=False): random initialisation"
        elif branch.config.pretrained is None:
            problems[name] = _no_timm_weights(branch.config)
        else:
            plan.append((i, f"hub:{branch.config.pretrained}"))
            hub_tags.setdefault(branch.config.pretrained, []).append(name)

    # 1. locate every source; report everything that cannot be had in one error
    reachability: dict = {}
    timm_sources = {tag: _resolve_timm(tag, names, hub_timeout, reachability) for tag, names in hub_tags.items()}
    for source in timm_sources.values():
        if source.problem:
            for name in source.branches:
                problems[name] = source.problem
    if problems:
        lines = ["cannot initialise every branch from pretrained weights:"]
        lines += [f"  {name}: {why}" for name, why in sorted(problems.items(), key=lambda kv: int(kv[0][6:]))]
        advice = _how_to_pass(sorted(problems, key=lambda n: int(n[6:])))
        lines.append(advice[0].upper() + advice[1:])
        hub_problem = any(s.problem and s.cfg is not None for s in timm_sources.values())
        raise (HubUnavailableError if hub_problem else BranchWeightsError)("\n".join(lines))

    on_meta = [f"branch{i + 1}" for i, _ in plan if any(p.is_meta for p in branches[i].parameters())]
    if on_meta:
        raise BranchWeightsError(f"{', '.join(on_meta)} live on the meta device (no storage to load into); "
                                 "build the model on a real device before loading weights")

    # 2. read every source once
    fetched: dict[str, tuple[dict[str, torch.Tensor], str, list[str]]] = {}
    for i, key in plan:
        if key in fetched:
            continue
        if key.startswith("hub:"):
            fetched[key] = _fetch_timm(timm_sources[key[4:]])
        else:
            sd, notes = _load_file(Path(files[i]))
            fetched[key] = (sd, str(files[i]), notes)

    # 3. adapt and check every branch, 4. write
    adapted = []
    for i, key in plan:
        sd, desc, notes = fetched[key]
        tensors, branch_report = adapt_branch_state_dict(
            branches[i], sd, name=f"branch{i + 1}", source=desc, strict=strict, patch_resample=patch_resample)
        branch_report.notes[:0] = notes
        adapted.append((i, tensors, branch_report))
    for i, tensors, branch_report in adapted:
        _copy_into(branches[i], tensors)
        report.branches[branch_report.branch] = branch_report
    return report


# -- the README table ---------------------------------------------------------------------------

_SIZE = {192: "T", 384: "S", 768: "B", 1024: "L", 1280: "H"}


def paper_weights(cfg: Any) -> tuple[str, str]:
    """``(weights the paper used, timm name.tag)`` of a :class:`BranchConfig`, as markdown."""
    tag = cfg.pretrained
    if tag is None:
        if cfg.embed_dim == 3200 and cfg.qk_norm:
            from ..models.variants import INTERNVIT_6B_WEIGHTS
            return ("InternViT-6B, 224 px (`intern_vit_6b_224px`)",
                    f"not in timm: local file from Hugging Face `{INTERNVIT_6B_WEIGHTS}`")
        return "none (trained from scratch)", "—"
    size = _SIZE.get(cfg.embed_dim, f"{cfg.embed_dim}-d")
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


def _architecture(cfg: Any) -> str:
    name = "InternViT-6B" if cfg.embed_dim == 3200 else \
        f"ViT-{_SIZE[cfg.embed_dim]}" if cfg.embed_dim in _SIZE else "ViT"
    text = f"{name} ({cfg.embed_dim}-d, {cfg.depth} blocks)"
    if cfg.pretrain_patch_size != cfg.patch_size:
        text += f", patch {cfg.pretrain_patch_size} → {cfg.patch_size}"
    return text


def pretrained_weights_table() -> str:
    """Markdown table of the pretrained weights of every registered variant's branches."""
    from ..models.registry import get_config, list_models

    lines = [
        "# Pretrained branch weights",
        "",
        "<!-- Generated by piip.weights.write_weights_table() from the variant registry; do not edit. -->",
        "",
        "`piip.create_model(name, pretrained=True)` initialises every branch from the timm `name.tag` "
        "below (Hugging Face hub; files already in the local cache are used offline). Without network "
        "access, pass local files: `branch_weights={\"branch1\": \"/path/to/file.safetensors\", ...}` "
        "(`.safetensors`, `.pth`/`.pt`/`.bin` or the original JAX `.npz`). Branch 1 is the largest model "
        "at the lowest resolution. Layer-scale gammas absent from a file (DeiT v1, MAE, AugReg) stay at "
        "1.0; position embeddings and patch kernels are resized to the branch's grid and patch size.",
        "",
        "| Variant | Task | Branch | Architecture | Weights used in the paper (original file) | timm name.tag |",
        "|---|---|---|---|---|---|",
    ]
    for variant in list_models():
        rows = {task: [(i + 1, _architecture(b), *paper_weights(b))
                       for i, b in enumerate(get_config(variant, task=task).branches)]
                for task in ("det", "cls")}
        groups = [("det, cls", rows["det"])] if rows["det"] == rows["cls"] else \
            [("det", rows["det"]), ("cls", rows["cls"])]
        for tasks, group in groups:
            for index, arch, weights, tag in group:
                lines.append(f"| `{variant}` | {tasks} | {index} | {arch} | {weights} | {tag} |")
    lines.append("")
    return "\n".join(lines)


def write_weights_table(path: PathLike = "docs/pretrained_weights.md") -> Path:
    """Write :func:`pretrained_weights_table` to ``path`` (parents created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(pretrained_weights_table(), encoding="utf-8")
    return path
