"""Atomic, resumable training checkpoints.

Layout of ``<out_dir>/checkpoints/``: ``step-00000123.pt`` files (the last ``keep`` kept),
``best.pt``, and ``latest``: a one-line text pointer to the newest complete step file.

Every file is written to a temporary file in the same folder, flushed and fsync'ed, then renamed
over its target with ``os.replace`` (atomic on POSIX and Windows); the pointer is updated the same
way only after its target is complete. A kill at any moment leaves ``latest`` pointing at a
complete checkpoint (the previous one if the kill hit the new save).

Sharded runs (``run.strategy=zero1`` or ``fsdp``) write folders instead: ``step-00000123/`` and
``best/`` (:func:`save_sharded_checkpoint`), each holding the DCP files every process wrote (the
model's and the optimiser's tensors, see :mod:`piip.weights.sharded`), ``state.pt`` (everything
else: schedule, scaler, the RNG states of every process, the position in the data, world size,
strategy, config) and ``piip.json`` (the model's piip header: the folder is a piip checkpoint too).
A folder is written whole under a temporary name (``.step-00000123.tmp``) and renamed into place
before ``latest`` names it; replacing a folder of the same name (a resumed run saving a step again)
first points ``latest`` at the complete temporary folder, which :func:`latest_checkpoint` follows
to its final name once renamed. So the guarantee holds for folders too.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import distributed as D
from ..weights.checkpoint import CheckpointError
from ..weights.io import atomic_write as _atomic_write, fsync_dir, read_torch_file
from ..weights.sharded import HEADER_FILE, SafeFileSystemReader, no_process_group_note

__all__ = ["atomic_torch_save", "atomic_write_text", "save_training_checkpoint", "save_sharded_checkpoint",
           "load_sharded_tensors", "latest_checkpoint", "load_training_checkpoint", "check_training_state",
           "rng_state", "set_rng_state", "STATE_FILE", "SHARDED_KEYS"]

_STEP_RE = re.compile(r"^step-(\d+)(\.pt)?$")
_TMP_RE = re.compile(r"^\.(.+)\.tmp$")
#: the training state (all but the tensors) of a sharded checkpoint folder
STATE_FILE = "state.pt"
#: the entries of the training state whose tensors a sharded checkpoint writes through DCP
SHARDED_KEYS = ("model", "optimizer", "ema")


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
    _prune(directory, path, keep)
    return path


def _prune(directory: Path, newest: Path, keep: int) -> None:
    """Keep the ``keep`` newest step checkpoints (files or folders; 0: all), and drop the temporary
    folders of interrupted saves."""
    pointer = directory / "latest"
    named = pointer.read_text().strip() if pointer.is_file() else None
    for stale in directory.iterdir():
        if _TMP_RE.match(stale.name) and stale.is_dir() and stale.name != named:
            shutil.rmtree(stale, ignore_errors=True)
    if keep <= 0:
        return
    steps = sorted((int(m.group(1)), p) for p in directory.iterdir() if (m := _STEP_RE.match(p.name)))
    for _, old in steps[:-keep]:
        if old != newest:
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)


def _split_tensors(tree: Any) -> tuple[Any, Any]:
    """``(tensors, rest)`` of a nested dict: the tensor leaves, and the same dicts with every other
    value (an optimiser's parameter groups, ...)."""
    if isinstance(tree, torch.Tensor):
        return tree, None
    if not isinstance(tree, dict):
        return None, tree
    tensors, rest = {}, {}
    for key, value in tree.items():
        t, r = _split_tensors(value)
        if isinstance(value, torch.Tensor) or (isinstance(value, dict) and t):
            tensors[key] = t
        if not isinstance(value, torch.Tensor):
            rest[key] = r
    return tensors, rest


def _merge(tensors: Any, rest: Any) -> Any:
    """The inverse of :func:`_split_tensors`."""
    if not isinstance(rest, dict):
        return tensors if tensors is not None else rest
    merged = dict(rest)
    for key, value in (tensors or {}).items():
        merged[key] = _merge(value, rest.get(key))
    return merged


def save_sharded_checkpoint(directory: str | os.PathLike, state: dict[str, Any], name: str, *,
                            header: dict[str, str] | None = None, latest: bool = True, keep: int = 2) -> Path:
    """Every process: write the training ``state`` as the folder ``<directory>/<name>``: the tensors
    of its :data:`SHARDED_KEYS` entries through ``torch.distributed.checkpoint`` (each process its own
    shards; a tensor every process holds is written once), the rest as ``state.pt`` and ``header`` as
    ``piip.json`` (both by rank 0). The folder is complete before it takes its name; then, with
    ``latest``, the pointer names it and the step checkpoints are pruned to ``keep``."""
    import torch.distributed.checkpoint as dcp

    directory = Path(directory)
    final, tmp = directory / name, directory / f".{name}.tmp"
    pointer = directory / "latest"
    if D.is_main():
        directory.mkdir(parents=True, exist_ok=True)
        if pointer.is_file() and pointer.read_text().strip() == tmp.name and tmp.is_dir() and not final.exists():
            os.rename(tmp, final)  # a replacement killed before its rename: complete it first
            atomic_write_text(pointer, name + "\n")
        shutil.rmtree(tmp, ignore_errors=True)  # an interrupted save of the same name
    D.barrier()
    tensors, rest = _split_tensors({k: state[k] for k in SHARDED_KEYS if k in state})
    rest.update({k: v for k, v in state.items() if k not in SHARDED_KEYS})
    with no_process_group_note():  # one process saves alone
        dcp.save(tensors, storage_writer=dcp.FileSystemWriter(tmp), no_dist=not D.is_dist())
    if D.is_main():
        atomic_torch_save(rest, tmp / STATE_FILE)
        if header is not None:
            atomic_write_text(tmp / HEADER_FILE, json.dumps(header, indent=1))
        fsync_dir(tmp)
        if final.exists():  # a step saved again: 'latest' names a complete folder throughout
            if latest or (pointer.is_file() and pointer.read_text().strip() == name):
                atomic_write_text(pointer, tmp.name + "\n")
            shutil.rmtree(final)
        os.rename(tmp, final)
        fsync_dir(directory)
        if latest:
            atomic_write_text(pointer, name + "\n")
            _prune(directory, final, keep)
    D.barrier()
    return final


def load_sharded_tensors(state: dict[str, Any], template: dict[str, Any]) -> dict[str, Any]:
    """The whole training state of a sharded checkpoint: ``state`` (its ``state.pt``, as
    :func:`load_training_checkpoint` read it) with the tensors of ``template`` (this process's
    model, optimiser and EMA state, structured as when saved) loaded in place from the folder's DCP
    files. Every process calls it."""
    import torch.distributed.checkpoint as dcp

    folder = state["checkpoint_folder"]
    tensors, _ = _split_tensors({k: template[k] for k in SHARDED_KEYS if template.get(k) is not None})
    try:
        with no_process_group_note():
            dcp.load(tensors, storage_reader=SafeFileSystemReader(folder), no_dist=not D.is_dist())
    except CheckpointError:
        raise
    except Exception as err:  # DCP's CheckpointException gathers every process's failure
        raise CheckpointError(f"cannot load the sharded checkpoint {folder!r}: {str(err)[:500]}") from err
    return {**state, **{k: _merge(v, state.get(k)) for k, v in tensors.items()}}


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The complete checkpoint (a ``.pt`` file or a sharded folder) ``latest`` points at (``None``
    when there is none)."""
    directory = Path(directory)
    pointer = directory / "latest"
    if not pointer.is_file():
        return None
    target = directory / pointer.read_text().strip()
    if not target.exists() and (m := _TMP_RE.match(target.name)):  # renamed into place since
        target = directory / m.group(1)
    return target if target.is_file() or (target / STATE_FILE).is_file() else None


def _state_globals() -> list[Any]:
    """What a training checkpoint holds besides tensors and containers: numpy's RNG state."""
    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    return [multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def load_training_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a training checkpoint (a ``.pt`` file, a sharded step folder, or a folder holding
    ``latest``) with the one safe reader: tensors, containers and the engine's own state types only;
    a file holding any other object is refused without running code from it.

    Of a sharded folder this reads ``state.pt`` only, with ``checkpoint_folder`` (its path) added:
    the tensors are loaded into the built model and optimiser (:func:`load_sharded_tensors`)."""
    path = Path(path)
    if path.is_dir() and not _is_step_folder(path):
        found = latest_checkpoint(path) or latest_checkpoint(path / "checkpoints")
        if found is None:
            raise FileNotFoundError(f"no 'latest' checkpoint under {path}")
        path = found
    if path.is_dir():
        if not (path / STATE_FILE).is_file():
            raise CheckpointError(f"{os.fspath(path)!r} is not a complete sharded training checkpoint: it has no "
                                  f"{STATE_FILE}")
        state = read_torch_file(path / STATE_FILE, allowed_globals=_state_globals(), opaque=False)
        if isinstance(state, dict):
            state["checkpoint_folder"] = os.fspath(path)
        return state
    if not path.is_file():
        raise FileNotFoundError(f"resume checkpoint {os.fspath(path)!r} does not exist")
    return read_torch_file(path, allowed_globals=_state_globals(), opaque=False)


def _is_step_folder(path: Path) -> bool:
    """A sharded checkpoint folder (complete or not), not a run folder holding ``latest``."""
    return any((path / f).is_file() for f in (STATE_FILE, HEADER_FILE, ".metadata"))


def check_training_state(state: Any, path: str | os.PathLike) -> dict[str, Any]:
    """``state`` if it has what a resume needs (a :class:`CheckpointError` naming ``path`` if not)."""
    needed = ("model", "optimizer", "scheduler", "scaler", "rng", "epoch", "micro_in_epoch", "step", "world_size")
    missing = [k for k in needed if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"{os.fspath(path)!r} is not a piip training checkpoint (it lacks {missing}); "
                              "--resume takes a step-*.pt file or step-* folder of <out_dir>/checkpoints, or the "
                              "run folder")
    return state
