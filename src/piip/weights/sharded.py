"""Sharded checkpoint folders: the one reader of the ``torch.distributed.checkpoint`` (DCP) folders
that ``piip train`` writes under ``run.strategy=zero1`` or ``fsdp``.

Layout of such a folder (``<out_dir>/checkpoints/step-00000123/``):

* DCP's files: ``.metadata`` and one ``__<rank>_0.distcp`` per process, holding tensors only:
  ``model.<name>`` (the model's ``state_dict()`` under its own names, each tensor written once,
  sharded or not), ``optimizer.state.<name>.<key>`` and, with an EMA, ``ema.<name>``;
* ``piip.json``: the header a ``.safetensors`` piip checkpoint carries (format, model kind, config,
  ...; built by the same code, :func:`piip.weights.checkpoint.checkpoint_header`), so the folder
  rebuilds its model by itself: ``piip.load(folder)`` returns the whole model, consolidated here
  without a process group;
* ``state.pt``: the rest of the training state (the engine's, :mod:`piip.engine.checkpoint`).

Nothing is unpickled beyond what a DCP ``.metadata`` file holds (its own dataclasses, sizes, dtypes
and paths, resolved by an allowlist), a folder declaring pickled objects is refused, and DCP reads
every tensor with ``weights_only``: no code from the folder runs.
"""
from __future__ import annotations

import contextlib
import json
import os
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, StorageMeta

from .errors import CheckpointError

__all__ = ["HEADER_FILE", "MODEL_PREFIX", "SafeFileSystemReader", "read_header",
           "read_sharded_model", "no_process_group_note"]

#: the piip header of a sharded checkpoint folder (JSON: the safetensors header's strings)
HEADER_FILE = "piip.json"
#: the prefix of the model's tensors among a folder's DCP keys
MODEL_PREFIX = "model."
_METADATA_FILE = ".metadata"


def _allowed_global(module: str, name: str) -> Any:
    """The global a DCP ``.metadata`` pickle may name (``None`` for any other)."""
    if module == "torch.distributed.checkpoint.metadata" or (
            module == "torch.distributed.checkpoint.filesystem" and name == "_StorageInfo"):
        import importlib

        found = getattr(importlib.import_module(module), name, None)
        return found if isinstance(found, type) else None
    if module == "torch":
        found = getattr(torch, name, None)
        return found if name == "Size" or isinstance(found, (torch.dtype, torch.layout, torch.memory_format)) else None
    if (module, name) == ("torch.serialization", "_get_layout"):
        return torch.serialization._get_layout
    if module == "pathlib" and name in ("Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"):
        import pathlib

        return getattr(pathlib, name)
    if (module, name) == ("collections", "OrderedDict"):
        import collections

        return collections.OrderedDict
    return None


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        found = _allowed_global(module, name)
        if found is None:
            raise CheckpointError(f"refusing to read the DCP metadata: it refers to {module}.{name}, which such a "
                                  "file never holds (nothing from the file was run)")
        return found



@contextlib.contextmanager
def no_process_group_note():
    """Silence DCP's warning that ``torch.distributed`` is disabled: a save or load by one process
    (``no_dist=True``) is meant, not a mistake."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield

class SafeFileSystemReader(FileSystemReader):
    """DCP's storage reader of a folder, whose ``.metadata`` is unpickled through an allowlist (a
    :class:`CheckpointError` for a missing, damaged or foreign file)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        path = Path(os.fspath(self.path)) / _METADATA_FILE
        if not path.is_file():
            raise CheckpointError(f"{os.fspath(self.path)!r} is an incomplete sharded checkpoint: it has no DCP "
                                  f"{_METADATA_FILE} file")
        try:
            with open(path, "rb") as f:
                metadata = _MetadataUnpickler(f).load()
        except CheckpointError as err:
            raise CheckpointError(f"{os.fspath(path)!r}: {err}") from None
        except Exception as err:
            raise CheckpointError(f"cannot read {os.fspath(path)!r}: it is corrupt or truncated "
                                  f"({type(err).__name__}: {str(err)[:200]})") from err
        pickled = sorted(k for k, v in getattr(metadata, "state_dict_metadata", {}).items()
                         if isinstance(v, BytesStorageMetadata))
        if pickled:  # DCP would unpickle them with no restriction
            raise CheckpointError(f"refusing to read {os.fspath(self.path)!r}: it holds pickled objects "
                                  f"({pickled[:5]}), which a piip checkpoint never does (tensors only)")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def read_header(path: str | os.PathLike) -> dict[str, str]:
    """The piip header (``piip.json``) of a sharded checkpoint folder, as the safetensors header's
    strings; a :class:`CheckpointError` for a folder that is not one."""
    path = Path(path)
    header_file = path / HEADER_FILE
    if not header_file.is_file():
        raise CheckpointError(f"{os.fspath(path)!r} is a folder but not a piip checkpoint: it holds no {HEADER_FILE} "
                              "(a sharded step folder of <out_dir>/checkpoints, written under run.strategy=zero1 "
                              "or fsdp, has one)")
    try:
        header = json.loads(header_file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read {os.fspath(header_file)!r}: it is not JSON ({err})") from None
    if not isinstance(header, dict) or not all(isinstance(v, str) for v in header.values()):
        raise CheckpointError(f"{os.fspath(header_file)!r} is not a piip header (a JSON object of strings)")
    return header


def _missing_files(path: Path, metadata: Any) -> list[str]:
    files = {getattr(info, "relative_path", None) for info in (metadata.storage_data or {}).values()}
    return sorted(f for f in files if f and not (path / f).is_file())


def read_sharded_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The whole model state dict of a sharded checkpoint folder (every shard consolidated, in the
    dtypes written), read without a process group. A :class:`CheckpointError` names what is wrong:
    no DCP metadata (an incomplete folder), a missing shard file, a folder without model tensors."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    path = Path(path)
    reader = SafeFileSystemReader(path)
    metadata = reader.read_metadata()
    missing = _missing_files(path, metadata)
    if missing:
        raise CheckpointError(f"{os.fspath(path)!r} is missing shard file(s) {missing}: the checkpoint was not "
                              "copied whole")
    state = {key[len(MODEL_PREFIX):]: torch.empty(tuple(meta.size), dtype=meta.properties.dtype, device=device)
             for key, meta in metadata.state_dict_metadata.items()
             if key.startswith(MODEL_PREFIX) and isinstance(meta, TensorStorageMetadata)}
    if not state:
        raise CheckpointError(f"{os.fspath(path)!r} holds no model tensors ('{MODEL_PREFIX}*' keys)")
    try:
        with no_process_group_note():  # no process group takes part: the point here
            dcp.load({"model": state}, storage_reader=reader, no_dist=True)
    except CheckpointError:
        raise
    except Exception as err:
        raise CheckpointError(f"cannot read the sharded checkpoint {os.fspath(path)!r}: "
                              f"{type(err).__name__}: {str(err)[:300]}") from err
    return state
