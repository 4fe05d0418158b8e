"""Adapting a pretrained ViT state dict to a branch, the way the authors' ``init_weights`` did
(reference notes §2.2, §6).

A branch keeps the architecture of its pretrained ViT but not always its geometry, so some tensors
are adapted on the way in:

* **position embedding**: a leading class row is dropped for DeiT-style branches
  (``pos_embed_class_row=False``) and kept for InternViT-style ones; the patch grid is resized
  bicubically (``align_corners=False``, no antialias, float32) from the file's grid to the branch's
  stored grid ``pretrain_img_size // patch_size`` (e.g. MAE-H/14: 16x16 -> 14x14; DINOv2: 37x37 -> 32x32);
* **patch embedding**: a kernel of another size (14 -> 16) is resized bicubically
  (``F.interpolate``, the original's rule; ``patch_resample="pi"`` uses timm's FlexiViT
  pseudo-inverse ``resample_patch_embed`` instead).

Everything else is reported rather than guessed: keys the branch has no use for (classifier
``head``, final ``norm`` of a dense branch, ``fc_norm``, ``mask_token``, a DeiT-style branch's
``cls_token`` ...) are ignored and reported; keys that stay at their initialisation are reported with
the reason (layer-scale gammas of checkpoints without layer scale, e.g. DeiT v1, MAE and AugReg, stay
at ``init_values``; the unused class row of the position embedding when the file has none; a head of
another width). Any other missing, unexpected block or mismatched key is an error (``strict=False``
reports it instead), since it means the file is for another architecture.
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from .renaming import normalise_keys
from .reports import BranchLoadReport, BranchWeightsError, summarise_keys

__all__ = ["adapt_branch_state_dict"]

_LAYER_SCALE_RE = r"blocks\.\d+\.ls[12]\.gamma$"


def is_square(n: int) -> bool:
    """Whether ``n`` positions can form a square grid."""
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


@dataclass
class _Adaptation:
    """What :func:`adapt_branch_state_dict` has made of a source so far.

    Attributes:
        target: the branch's own state dict (the names, shapes and dtypes to produce).
        report: the branch's report, filled as keys are settled.
        out: branch key -> tensor to load.
        used: source keys accounted for (loaded, adapted or deliberately left out).
        mismatched: ``"key: file (shape), model (shape)"`` for every tensor that does not fit.
    """

    target: dict[str, torch.Tensor]
    report: BranchLoadReport
    out: dict[str, torch.Tensor] = field(default_factory=dict)
    used: set[str] = field(default_factory=set)
    mismatched: list[str] = field(default_factory=list)

    def put(self, key: str, value: torch.Tensor) -> None:
        self.out[key] = value.to(dtype=self.target[key].dtype)
        self.report.loaded.append(key)


def _adapt_pos_embed(job: _Adaptation, src: Mapping[str, torch.Tensor], branch: nn.Module, name: str,
                     source: str) -> None:
    """The source's position embedding on the branch's grid, with a class row exactly when the
    branch has one."""
    job.used.add("pos_embed")
    v = src["pos_embed"]
    if v.dim() == 4:  # (1, H, W, D) layout
        if v.shape[1] != v.shape[2]:
            raise BranchWeightsError(f"{name}: non-square position grid {tuple(v.shape)} in {source}")
        v = v.flatten(1, 2)
    v = v.reshape(1, -1, v.shape[-1])
    tgt = job.target["pos_embed"]
    length, dim = v.shape[1], v.shape[2]
    # leading rows of prefix tokens (class, DeiT distillation) when the rest is a square grid
    tokens = int("cls_token" in src) + int("dist_token" in src)
    src_prefix = next((p for p in dict.fromkeys((0, 1, tokens)) if is_square(length - p)), None)
    if src_prefix is None or dim != tgt.shape[-1]:
        job.mismatched.append(f"pos_embed: file {tuple(src['pos_embed'].shape)}, model {tuple(tgt.shape)}")
        return
    old, new = math.isqrt(length - src_prefix), branch.config.pos_embed_grid
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
            job.report.initialised["pos_embed[:, :1]"] = (
                "the file's position embedding has no class row; the row is unused by patch tokens")
        rows = torch.cat([cls_row.float(), rows.float()], dim=1)
    job.put("pos_embed", rows)
    if what:
        job.report.resampled["pos_embed"] = ", ".join(what)


def _adapt_patch_kernel(job: _Adaptation, src: Mapping[str, torch.Tensor], patch_resample: str) -> None:
    """The source's patch-embedding kernel, resized when its patch size is not the branch's."""
    key = "patch_embed.proj.weight"
    job.used.add(key)
    v, tgt = src[key], job.target[key]
    if v.dim() == 4 and v.shape[:2] == tgt.shape[:2] and v.shape[2:] != tgt.shape[2:]:
        rule = "bicubic F.interpolate" if patch_resample == "interpolate" else "timm resample_patch_embed"
        job.report.resampled[key] = f"kernel {v.shape[2]}x{v.shape[3]} -> {tgt.shape[2]}x{tgt.shape[3]} ({rule})"
        v = _resize_kernel(v, tuple(tgt.shape[2:]), patch_resample)
    if v.shape != tgt.shape:
        job.mismatched.append(f"{key}: file {tuple(src[key].shape)}, model {tuple(tgt.shape)}")
    else:
        job.put(key, v)


def _adapt_cls_token(job: _Adaptation, src: Mapping[str, torch.Tensor]) -> None:
    """The source's class token in the branch's shape (layouts differ only in singleton dims)."""
    job.used.add("cls_token")
    v = src["cls_token"]
    if v.numel() == job.target["cls_token"].numel():
        job.put("cls_token", v.reshape(job.target["cls_token"].shape))
    else:
        job.mismatched.append(f"cls_token: file {tuple(v.shape)}, model {tuple(job.target['cls_token'].shape)}")


def _match_remaining_keys(job: _Adaptation, src: Mapping[str, torch.Tensor], cfg: Any) -> list[str]:
    """Load every other branch key the source has under the same name, report the ones that
    rightly stay at their initialisation, and return the ones missing from the source."""
    missing: list[str] = []
    has_layer_scale = any(re.match(_LAYER_SCALE_RE, k) for k in src)
    for key, tgt in job.target.items():
        if key in job.out or key in job.used:
            continue
        if key.startswith("head."):
            v = src.get(key)
            if v is None or v.shape != tgt.shape:
                width = (f"a {src['head.weight'].shape[0]}-class head" if "head.weight" in src
                         else "no classifier head")
                job.report.initialised[key] = (f"the file has {width}, the branch a "
                                               f"{job.target['head.weight'].shape[0]}-class one")
                if v is not None:
                    job.used.add(key)
                continue
        if key.startswith("fc_norm.") and key not in src:
            job.report.initialised[key] = ("the file has no fc_norm (a class-token model): the average-pool "
                                           "head's norm starts at its initialisation")
            continue
        if key in src:
            job.used.add(key)
            if src[key].shape == tgt.shape:
                job.put(key, src[key])
            elif src[key].numel() == tgt.numel() and key.endswith(("ls1.gamma", "ls2.gamma")):
                job.put(key, src[key].reshape(tgt.shape))
            else:
                job.mismatched.append(f"{key}: file {tuple(src[key].shape)}, model {tuple(tgt.shape)}")
            continue
        if re.match(_LAYER_SCALE_RE, key) and not has_layer_scale:
            job.report.initialised[key] = (f"the file has no layer scale: kept at init_values="
                                           f"{cfg.init_values:g}")
            continue
        missing.append(key)
    return missing


def _unexpected_source_keys(job: _Adaptation, src: Mapping[str, torch.Tensor]) -> list[str]:
    """Source keys nothing used: the ignorable ones go to the report, the others are returned."""
    unexpected = []
    for key in src:
        if key in job.used:
            continue
        if _is_ignorable(key):
            job.report.ignored.append(key)
        else:
            unexpected.append(key)
    return unexpected


def _misfit_error(name: str, source: str, cfg: Any, missing: list[str], unexpected: list[str],
                  mismatched: list[str]) -> BranchWeightsError:
    lines = [f"{name}: the weights in {source} do not fit the branch "
             f"(dim {cfg.embed_dim}, depth {cfg.depth}, heads {cfg.num_heads}, "
             f"qkv_bias={cfg.qkv_bias}, qk_norm={cfg.qk_norm}, norm={cfg.norm_layer}, "
             f"patch {cfg.patch_size}):"]
    if missing:
        lines.append(f"  missing from the file: {summarise_keys(missing)}")
    if unexpected:
        lines.append(f"  unexpected in the file: {summarise_keys(unexpected)}")
    if mismatched:
        lines.append("  shape mismatch: " + "; ".join(mismatched[:10])
                     + (f" (+{len(mismatched) - 10} more)" if len(mismatched) > 10 else ""))
    lines.append("Is this file for this architecture? strict=False loads what fits and reports the rest.")
    return BranchWeightsError("\n".join(lines))


def _report_misfits(report: BranchLoadReport, missing: list[str], unexpected: list[str],
                    mismatched: list[str]) -> None:
    for key in missing:
        report.initialised[key] = "MISSING from the file (strict=False)"
    for entry in mismatched:
        report.initialised[entry.split(":")[0]] = f"shape mismatch, not loaded (strict=False): {entry}"
    report.ignored += unexpected


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
    src, notes, outside = normalise_keys(dict(state_dict))
    report.notes += notes
    report.ignored += outside
    job = _Adaptation(target=branch.state_dict(), report=report)
    if "pos_embed" in src:
        _adapt_pos_embed(job, src, branch, name, source)
    if "patch_embed.proj.weight" in src:
        _adapt_patch_kernel(job, src, patch_resample)
    if "cls_token" in job.target and "cls_token" in src:
        _adapt_cls_token(job, src)
    missing = _match_remaining_keys(job, src, branch.config)
    unexpected = _unexpected_source_keys(job, src)
    if missing or unexpected or job.mismatched:
        if strict:
            raise _misfit_error(name, source, branch.config, missing, unexpected, job.mismatched)
        _report_misfits(report, missing, unexpected, job.mismatched)
    return job.out, report
