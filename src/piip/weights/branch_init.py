"""Branch initialisation from pretrained ViT weights (timm tags or local files).

Every PIIP branch starts from an off-the-shelf ViT (DeiT, DeiT-III, AugReg, MAE, DINOv2,
InternViT-6B, ...). :func:`load_branch_weights` copies such weights into ``model.branches[i]``: each
branch's source is a local file (read by :mod:`~piip.weights.formats`) or its config's timm
``name.tag`` (:mod:`~piip.weights.hub`), and is adapted to the branch by
:mod:`~piip.weights.adapt` the way the authors' ``init_weights`` did.

The interaction, merge, feature-pyramid and merged-classifier modules are never touched: they keep
their documented initialisation (gates at zero, so a fresh PIIP starts as its pretrained branches).
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Union

import torch
from torch import nn

from .adapt import adapt_branch_state_dict
from .formats import PathLike, load_weights_file_with_notes
from .hub import (HUB_CONNECT_TIMEOUT, HubUnavailableError, TimmSource, fetch_timm_weights,
                  how_to_pass_local_files, resolve_timm_source)
from .paper import INTERNVIT_6B_WEIGHTS
from .reports import BranchLoadReport, BranchWeightsError, LoadReport

__all__ = ["load_branch", "load_branch_weights"]

BranchKey = Union[str, int]

# A branch's source: "file:<resolved path>" or "hub:<timm name.tag>"; branches sharing one are read once.
_Plan = list[tuple[int, str]]


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
        sd, notes = load_weights_file_with_notes(Path(source))
        desc = str(source)
    tensors, report = adapt_branch_state_dict(branch, sd, name=name, source=desc, strict=strict,
                                              patch_resample=patch_resample)
    report.notes[:0] = notes
    _copy_into(branch, tensors)
    return report


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


def _files_by_branch(sources: Mapping[BranchKey, PathLike] | None, count: int) -> dict[int, PathLike]:
    files: dict[int, PathLike] = {}
    for key, path in (sources or {}).items():
        index = _branch_index(key, count)
        if index in files:
            raise BranchWeightsError(f"branch{index + 1} is given twice in branch_weights")
        files[index] = path
    return files


def _new_modules(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_children()
            if n != "branches" and m is not None and any(True for _ in m.parameters())]


def _no_timm_weights(cfg: Any) -> str:
    if cfg.embed_dim == 3200 and cfg.qk_norm:
        return ("InternViT-6B is not in timm; use its weights from Hugging Face "
                f"'{INTERNVIT_6B_WEIGHTS}' (the directory, or its *.safetensors / *.index.json) or the "
                "original intern_vit_6b_224px.pth")
    return "no pretrained weights in its config (pretrained=None, e.g. a from-scratch variant)"


def _plan_sources(branches: list[nn.Module], files: dict[int, PathLike], use_hub: bool,
                  report: LoadReport) -> tuple[_Plan, dict[str, list[str]], dict[str, str]]:
    """Each branch's source. Returns ``(plan, branch names by timm tag, branch name -> why it has
    no weights)``; branches left at their random initialisation go to ``report.skipped``."""
    plan: _Plan = []
    hub_tags: dict[str, list[str]] = {}
    problems: dict[str, str] = {}
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
    return plan, hub_tags, problems


def _check_every_source_available(problems: dict[str, str], timm_sources: dict[str, TimmSource]) -> None:
    """Raise one error for every branch that cannot get weights (``problems`` and the branches of
    timm tags that cannot be had), so that a user fixes them all at once."""
    problems = dict(problems)
    for source in timm_sources.values():
        if source.problem:
            for name in source.branches:
                problems[name] = source.problem
    if not problems:
        return
    lines = ["cannot initialise every branch from pretrained weights:"]
    lines += [f"  {name}: {why}" for name, why in sorted(problems.items(), key=lambda kv: int(kv[0][6:]))]
    advice = how_to_pass_local_files(sorted(problems, key=lambda n: int(n[6:])))
    lines.append(advice[0].upper() + advice[1:])
    hub_problem = any(s.problem and s.cfg is not None for s in timm_sources.values())
    raise (HubUnavailableError if hub_problem else BranchWeightsError)("\n".join(lines))


def _check_not_on_meta(branches: list[nn.Module], plan: _Plan) -> None:
    on_meta = [f"branch{i + 1}" for i, _ in plan if any(p.is_meta for p in branches[i].parameters())]
    if on_meta:
        raise BranchWeightsError(f"{', '.join(on_meta)} live on the meta device (no storage to load into); "
                                 "build the model on a real device before loading weights")


def _read_sources(plan: _Plan, files: dict[int, PathLike], timm_sources: dict[str, TimmSource]
                  ) -> dict[str, tuple[dict[str, torch.Tensor], str, list[str]]]:
    """Every planned source read once: plan key -> ``(state dict, description, notes)``."""
    fetched: dict[str, tuple[dict[str, torch.Tensor], str, list[str]]] = {}
    for i, key in plan:
        if key in fetched:
            continue
        if key.startswith("hub:"):
            fetched[key] = fetch_timm_weights(timm_sources[key[4:]])
        else:
            sd, notes = load_weights_file_with_notes(Path(files[i]))
            fetched[key] = (sd, str(files[i]), notes)
    return fetched


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
            ``"branches.0"`` are accepted too. Formats: see :func:`~piip.weights.formats.load_weights_file`.
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
    :class:`~piip.weights.hub.HubUnavailableError` (offline / unreachable hub / failed download),
    :class:`~piip.weights.reports.BranchWeightsError` (weights that do not fit, unknown branch names,
    a branch without any source) and ``FileNotFoundError``.
    """
    branches = list(model.branches)
    files = _files_by_branch(sources, len(branches))
    report = LoadReport(new_modules=_new_modules(model))
    plan, hub_tags, problems = _plan_sources(branches, files, use_hub, report)

    # 1. locate every source; report everything that cannot be had in one error
    reachability: dict = {}
    timm_sources = {tag: resolve_timm_source(tag, names, hub_timeout, reachability)
                    for tag, names in hub_tags.items()}
    _check_every_source_available(problems, timm_sources)
    _check_not_on_meta(branches, plan)

    # 2. read every source once
    fetched = _read_sources(plan, files, timm_sources)

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
