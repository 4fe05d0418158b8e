"""Registry of named PIIP variants: configs as data, tiny entry points.

Each entry point is a function ``(task) -> PIIPConfig`` decorated with :func:`register_variant`.
:func:`get_config` applies the generic overrides (resolutions, interaction count and type, ...), so
every variant accepts the same knobs.
"""
from __future__ import annotations

import dataclasses
import difflib
import fnmatch
from typing import Callable, Sequence

from .config import PIIPConfig

__all__ = ["register_variant", "list_models", "get_config", "resolve_name", "describe"]

VariantFn = Callable[[str], PIIPConfig]

_VARIANTS: dict[str, VariantFn] = {}
_ALIASES: dict[str, str] = {}
_DESCRIPTIONS: dict[str, str] = {}


def register_variant(name: str, *, aliases: Sequence[str] = (), description: str = ""):
    """Register ``fn(task) -> PIIPConfig`` under ``name`` (lowercase) and optional aliases."""

    def decorator(fn: VariantFn) -> VariantFn:
        key = name.lower()
        if key in _VARIANTS or key in _ALIASES:
            raise ValueError(f"variant {name!r} registered twice")
        _VARIANTS[key] = fn
        _DESCRIPTIONS[key] = description or (fn.__doc__ or "").strip().splitlines()[0]
        for alias in aliases:
            _ALIASES[alias.lower()] = key
        return fn

    return decorator


def _ensure_loaded() -> None:
    from . import tiny, variants  # noqa: F401  (register their variants on import)


def list_models(pattern: str = "*", include_aliases: bool = False) -> list[str]:
    """Registered variant names matching a shell-style ``pattern``, sorted."""
    _ensure_loaded()
    names = list(_VARIANTS) + (list(_ALIASES) if include_aliases else [])
    return sorted(n for n in names if fnmatch.fnmatch(n, pattern.lower()))


def describe(name: str) -> str:
    return _DESCRIPTIONS[resolve_name(name)]


def resolve_name(name: str) -> str:
    """Canonical name for ``name`` or an alias; unknown names raise with the closest matches."""
    _ensure_loaded()
    key = name.lower()
    if key in _VARIANTS:
        return key
    if key in _ALIASES:
        return _ALIASES[key]
    close = difflib.get_close_matches(key, list(_VARIANTS) + list(_ALIASES), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise ValueError(f"unknown PIIP variant {name!r}{hint} (see piip.list_models())")


def get_config(
    name: str,
    *,
    task: str = "det",
    resolutions: Sequence[int] | str | None = None,
    interactions: int | None = None,
    interaction_attn: str | None = None,
    num_classes: int | None = None,
    **branch_overrides,
) -> PIIPConfig:
    """The config of variant ``name`` with the generic overrides applied.

    ``task``: ``"det"`` (the dense backbone as the authors' detection code builds it), ``"seg"``
    (the same network as their segmentation code builds it: global attention, position embeddings
    at the branch's resolution; see :func:`~piip.models.variants.segmentation_form`) or ``"cls"``.
    ``branch_overrides`` are :class:`~piip.models.config.BranchConfig` fields applied to every
    branch (e.g. ``drop_path_rate=0.0``).
    """
    if task not in ("det", "seg", "cls"):
        raise ValueError(f"task must be 'det', 'seg' or 'cls', got {task!r}")
    config = _VARIANTS[resolve_name(name)]("cls" if task == "cls" else "det")
    if task == "seg":
        from .variants import segmentation_form

        config = segmentation_form(config)
    if resolutions is not None:
        config = config.with_resolutions(resolutions)
    if interactions is not None:
        config = config.with_interactions(interactions)
    if interaction_attn is not None:
        if interaction_attn not in ("deform", "regular"):
            raise ValueError(f"interaction_attn must be 'deform' or 'regular', got {interaction_attn!r}")
        config = dataclasses.replace(
            config, interaction=dataclasses.replace(config.interaction, attn_type=interaction_attn))
    if num_classes is not None:
        config = dataclasses.replace(config, num_classes=num_classes)
    if branch_overrides:
        fields = {f.name for f in dataclasses.fields(config.branches[0])}
        unknown = sorted(set(branch_overrides) - fields)
        if unknown:
            raise TypeError(f"unknown override(s) {unknown}; branch fields are {sorted(fields)}")
        config = dataclasses.replace(config, branches=tuple(
            dataclasses.replace(b, **branch_overrides) for b in config.branches))
    return config
