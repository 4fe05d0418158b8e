"""Checkpoint files: one safe reader for every ``torch.save`` file piip opens, and one atomic writer.

``torch.load(weights_only=True)`` is tried first. Files that also hold Python objects (mmcv configs,
``argparse.Namespace`` training args, numpy scalars: what the authors' and most research
checkpoints carry next to their tensors) are then read with a restricted unpickler that resolves
only the globals ``weights_only`` allows and turns every other class into an inert
:class:`OpaqueObject`: no code from the file runs. :func:`unwrap_state_dict` finds the tensors
inside the usual containers.
"""
from __future__ import annotations

import contextlib
import os
import pickle
import re
import tempfile
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from .errors import CheckpointError

__all__ = ["OpaqueObject", "read_torch_file", "unwrap_state_dict", "STATE_DICT_CONTAINERS", "atomic_path", "fsync_dir",
           "atomic_write"]

#: Keys under which checkpoints nest their state dict, in the order they are looked for:
#: MMDetection/MMSegmentation (``state_dict``), DeepSpeed (``module``), DeiT-style trainers
#: (``model``, with an optional ``model_ema``), and common others.
STATE_DICT_CONTAINERS = ("state_dict", "module", "model", "model_state", "model_state_dict")


class OpaqueObject(dict):
    """Inert stand-in for a pickled object of a class piip does not load (mmcv configs,
    ``argparse.Namespace``, numpy values, ...). It records what it was given and runs nothing."""

    _piip_global = "?"

    def __init__(self, *args, **kwargs):  # noqa: D107 - records the constructor arguments
        super().__init__()
        self.args = args
        self.kwargs = kwargs

    def __setstate__(self, state):
        self.state = state

    def append(self, item):
        self.setdefault("__items__", []).append(item)

    def extend(self, items):
        self.setdefault("__items__", []).extend(items)

    def __repr__(self) -> str:
        return f"<opaque {self._piip_global}>"


def _restricted_pickle_module() -> types.SimpleNamespace:
    """A pickle module for ``torch.load`` that resolves only the globals ``weights_only`` allows and
    turns every other global into an :class:`OpaqueObject` subclass."""
    try:
        from torch._weights_only_unpickler import _get_allowed_globals
        allowed = dict(_get_allowed_globals())
    except Exception:  # private API moved: fall back to the essentials
        import collections
        allowed = {"collections.OrderedDict": collections.OrderedDict,
                   "torch._utils._rebuild_tensor_v2": torch._utils._rebuild_tensor_v2,
                   "torch._utils._rebuild_parameter": torch._utils._rebuild_parameter}
    stubs: dict[str, type] = {}

    class RestrictedUnpickler(pickle.Unpickler):
        def find_class(self, module, name):
            full = f"{module}.{name}"
            if full in allowed:
                return allowed[full]
            if full not in stubs:
                stubs[full] = type(name if name.isidentifier() else "Opaque", (OpaqueObject,),
                                   {"_piip_global": full, "__module__": "piip.weights.io.opaque"})
            return stubs[full]

    def load(file, **kwargs):
        return RestrictedUnpickler(file, **kwargs).load()

    return types.SimpleNamespace(__name__="piip_restricted_pickle", Unpickler=RestrictedUnpickler,
                                 load=load, UnpicklingError=pickle.UnpicklingError)



def read_torch_file(path: str | os.PathLike, *, allowed_globals: Sequence[Any] = (), opaque: bool = True) -> Any:
    """The object a ``torch.save`` file holds, read without running any code from it.

    ``allowed_globals``: classes and functions the caller's own files hold besides
    ``weights_only``'s tensors and containers (e.g. numpy's RNG state in a training checkpoint),
    allowed by name. Objects of any other class become :class:`OpaqueObject` stand-ins, or, with
    ``opaque=False`` (a reader that needs every object real), a :class:`CheckpointError` naming it.

    Raises :class:`~piip.weights.checkpoint.CheckpointError` (naming the file and its size) for a
    corrupt or truncated file.
    """
    path = os.fspath(path)
    size = os.path.getsize(path)

    def unreadable(err: Exception) -> CheckpointError:
        return CheckpointError(f"cannot read {path!r} ({size} bytes): it is corrupt or truncated, or not a "
                               f"torch.save file ({type(err).__name__}: {str(err)[:200]})")

    try:
        with torch.serialization.safe_globals(list(allowed_globals)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights only load failed" not in str(err).lower():
            raise unreadable(err) from err
        if not opaque:
            found = re.search(r"GLOBAL (\S+)", str(err))
            if found is None:  # not a pickle of objects at all (a JSON file, ...)
                raise unreadable(err) from err
            raise CheckpointError(f"refusing to read {path!r}: it refers to {found.group(1)}, which a file of "
                                  "this kind never holds (nothing from the file was run)") from None
    except Exception as err:  # zip / EOF / unpickling errors of a damaged file
        raise unreadable(err) from err
    # the file holds non-tensor objects: read it with the restricted unpickler, which never imports
    # or calls anything outside weights_only's allowlist
    try:
        return torch.load(path, map_location="cpu", weights_only=False,
                          pickle_module=_restricted_pickle_module())
    except Exception as err:
        raise unreadable(err) from err


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def unwrap_state_dict(obj: Any, *, use_ema: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors of a loaded checkpoint and where they were found.

    Containers (:data:`STATE_DICT_CONTAINERS`, and ``model_ema`` when ``use_ema``) are unwrapped
    up to four levels deep. Returns ``(tensors, meta)`` with ``meta`` = ``containers`` (the keys
    unwrapped, outermost first), ``top_level_keys``, ``has_ema`` (a ``model_ema`` entry exists next
    to the weights) and ``non_tensor_keys`` (entries of the state dict that are not tensors).
    """
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"expected a dict-like checkpoint, found {type(obj).__name__}")
    meta: dict[str, Any] = {"containers": [], "top_level_keys": sorted(map(str, obj.keys())),
                            "has_ema": False}
    for _ in range(4):
        if _is_state_dict(obj):
            break
        meta["has_ema"] = meta["has_ema"] or "model_ema" in obj
        if use_ema and isinstance(obj.get("model_ema"), Mapping):
            key = "model_ema"
        else:
            key = next((k for k in STATE_DICT_CONTAINERS if isinstance(obj.get(k), Mapping)), None)
        if key is None:
            break
        meta["containers"].append(key)
        obj = obj[key]
    if use_ema and "model_ema" not in meta["containers"]:
        raise CheckpointError("use_ema=True but the checkpoint has no 'model_ema' entry "
                              f"(top-level keys: {meta['top_level_keys']})")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(
            "no state dict found: expected tensors directly or under one of "
            f"{['model_ema', *STATE_DICT_CONTAINERS]}; top-level keys: {meta['top_level_keys'][:12]}")
    non_tensor = sorted(str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor))
    if non_tensor:
        meta["non_tensor_keys"] = non_tensor
    return tensors, meta


def fsync_dir(directory: Path) -> None:
    """fsync a folder (its entries: a rename into it is durable); a no-op where folders cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path beside ``path`` to write the file to; on success it is fsync'ed and
    renamed over ``path`` (``os.replace``, atomic on POSIX and Windows) and the folder is fsync'ed.
    A crash at any point leaves either the old file or the new one, never a partial one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write(path: str | os.PathLike, mode: str, write: Callable[[Any], None]) -> Path:
    """Write ``path`` atomically through ``write(file)`` (``mode`` ``"wb"`` or ``"w"``)."""
    with atomic_path(path) as tmp:
        with open(tmp, mode) as f:
            write(f)
    return Path(path)
