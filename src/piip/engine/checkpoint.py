"""Atomic, resumable training checkpoints.

Layout of ``<out_dir>/checkpoints/``: ``step-00000123.pt`` files (the last ``keep`` kept),
``best.pt``, and ``latest``: a one-line text pointer to the newest complete step file.

Every file is written to a temporary file in the same folder, flushed and fsync'ed, then renamed
over its target with ``os.replace`` (atomic on POSIX and Windows); the pointer is updated the same
way only after its target is complete. A kill at any moment leaves ``latest`` pointing at a
complete checkpoint (the previous one if the kill hit the new save).
"""
from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..weights.checkpoint import CheckpointError
from ..weights.io import atomic_write as _atomic_write, read_torch_file

__all__ = ["atomic_torch_save", "atomic_write_text", "save_training_checkpoint", "latest_checkpoint",
           "load_training_checkpoint", "check_training_state", "rng_state", "set_rng_state"]

_STEP_RE = re.compile(r"^step-(\d+)\.pt$")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to ``path`` atomically."""
    return _atomic_write(path, "wb", lambda f: torch.save(obj, f))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return _atomic_write(path, "w", lambda f: f.write(text))


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training_checkpoint(directory: str | os.PathLike, state: dict[str, Any], step: int,
                             keep: int = 2) -> Path:
    """Write ``step-<step>.pt`` atomically, then point ``latest`` at it, then prune to ``keep``."""
    directory = Path(directory)
    path = atomic_torch_save(state, directory / f"step-{step:08d}.pt")
    atomic_write_text(directory / "latest", path.name + "\n")
    if keep > 0:
        steps = sorted((int(m.group(1)), p) for p in directory.iterdir() if (m := _STEP_RE.match(p.name)))
        for _, old in steps[:-keep]:
            if old != path:
                old.unlink(missing_ok=True)
    return path


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The complete checkpoint ``latest`` points at (``None`` when there is none)."""
    directory = Path(directory)
    pointer = directory / "latest"
    if not pointer.is_file():
        return None
    target = directory / pointer.read_text().strip()
    return target if target.is_file() else None


def _state_globals() -> list[Any]:
    """What a training checkpoint holds besides tensors and containers: numpy's RNG state."""
    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    return [multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def load_training_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a training checkpoint (a ``.pt`` file, or a folder holding ``latest``) with the one safe
    reader: tensors, containers and the engine's own state types only; a file holding any other
    object is refused without running code from it."""
    path = Path(path)
    if path.is_dir():
        found = latest_checkpoint(path) or latest_checkpoint(path / "checkpoints")
        if found is None:
            raise FileNotFoundError(f"no 'latest' checkpoint under {path}")
        path = found
    if not path.is_file():
        raise FileNotFoundError(f"resume checkpoint {os.fspath(path)!r} does not exist")
    return read_torch_file(path, allowed_globals=_state_globals(), opaque=False)


def check_training_state(state: Any, path: str | os.PathLike) -> dict[str, Any]:
    """``state`` if it has what a resume needs (a :class:`CheckpointError` naming ``path`` if not)."""
    needed = ("model", "optimizer", "scheduler", "scaler", "rng", "epoch", "micro_in_epoch", "step", "world_size")
    missing = [k for k in needed if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"{os.fspath(path)!r} is not a piip training checkpoint (it lacks {missing}); "
                              "--resume takes a step-*.pt file of <out_dir>/checkpoints, or the run folder")
    return state
