"""What loading pretrained weights did to each branch, and the error for weights that do not fit.

Loading never stays silent about a key: every branch key is either loaded (possibly adapted) or kept
at its initialisation with the reason, and every source key the branch has no use for is listed as
ignored, so that a report shows at a glance whether a file really was the intended one.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

__all__ = ["BranchLoadReport", "BranchWeightsError", "LoadReport"]

_BLOCK_RE = re.compile(r"blocks\.\d+\.")


class BranchWeightsError(ValueError):
    """Pretrained weights do not fit a branch (missing, unexpected or mismatched keys), or a
    branch has no source of weights."""


def summarise_keys(keys) -> str:
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
                lines.append(f"  kept initialised: {summarise_keys(keys)} ({why})")
        if self.ignored:
            lines.append(f"  ignored from the source: {summarise_keys(self.ignored)}")
        for note in self.notes:
            lines.append(f"  note: {note}")
        return "\n".join(lines)


@dataclass
class LoadReport:
    """Per-branch reports of :func:`~piip.weights.branch_init.load_branch_weights`.

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
