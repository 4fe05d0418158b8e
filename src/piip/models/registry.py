"""Registry of named PIIP variants: configs as data, tiny entry points.

Each entry point is a function ``(task) -> PIIPConfig`` decorated with :func:`register_variant`.
:func:`get_config` applies the generic overrides (resolutions, interaction count and type, ...), so
every variant accepts the same knobs.
"""
from __future__ import annotations

import difflib
import fnmatch
from typing import Callable, Sequence

from ..config.model import PIIPConfig, segmentation_form

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


def list_models(pattern: str = "*", include_aliases: bool = False) -> list[str]:
    """Registered variant names matching a shell-style ``pattern``, sorted."""
    names = list(_VARIANTS) + (list(_ALIASES) if include_aliases else [])
    return sorted(n for n in names if fnmatch.fnmatch(n, pattern.lower()))


def describe(name: str) -> str:
    return _DESCRIPTIONS[resolve_name(name)]


def resolve_name(name: str) -> str:
    """Canonical name for ``name`` or an alias; unknown names raise with the closest matches."""
    key = name.lower()
    if key in _VARIANTS:
        return key
    if key in _ALIASES:
        return _ALIASES[key]
    close = difflib.get_close_matches(key, list(_VARIANTS) + list(_ALIASES), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise ValueError(f"unknown PIIP variant {name!r}{hint} (see piip.list_models())")


def get_config(name: str, *, task: str = "det", **overrides) -> PIIPConfig:
    """The config of variant ``name`` in its ``task`` form, with ``overrides`` applied
    (:meth:`PIIPConfig.with_overrides <piip.config.model.PIIPConfig.with_overrides>`: ``resolutions``,
    ``interactions``, ``interaction_attn``, ``num_classes``, any branch field such as
    ``drop_path_rate=0.0`` ...).

    ``task``: ``"det"`` (the dense backbone as the authors' detection code builds it), ``"seg"``
    (the same network as their segmentation code builds it: global attention, position embeddings
    at the branch's resolution; see :func:`~piip.config.model.segmentation_form`) or ``"cls"``.
    """
    if task not in ("det", "seg", "cls"):
        raise ValueError(f"task must be 'det', 'seg' or 'cls', got {task!r}")
    config = _VARIANTS[resolve_name(name)]("cls" if task == "cls" else "det")
    if task == "seg":
        config = segmentation_form(config)
    return config.with_overrides(**overrides)
