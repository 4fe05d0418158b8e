"""Autocast precisions by name: one table for run configs, model configs and the command line."""
from __future__ import annotations

import contextlib

import torch

__all__ = ["AUTOCAST_DTYPES", "autocast_dtype", "autocast"]

#: ``"fp32"`` means no autocast.
AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_dtype(name: str, what: str = "dtype") -> torch.dtype | None:
    """The autocast dtype called ``name`` (``None`` for fp32); ``what`` names the setting in the error."""
    if name not in AUTOCAST_DTYPES:
        raise ValueError(f"{what} must be one of {sorted(AUTOCAST_DTYPES)}, got {name!r}")
    return AUTOCAST_DTYPES[name]


def autocast(device_type: str, dtype: torch.dtype | None):
    """``torch.autocast`` to ``dtype``, or nothing when ``dtype`` is None."""
    return contextlib.nullcontext() if dtype is None else torch.autocast(device_type, dtype=dtype)
