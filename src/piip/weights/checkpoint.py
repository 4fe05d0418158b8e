"""piip's own checkpoint format: one safetensors file that rebuilds the model by itself.

Layout of a file written by :func:`save_checkpoint`:

* tensors: the model's ``state_dict()`` under its own names (``branches.0.blocks.3.attn.qkv.weight``,
  ``merge.weights``, ``fpn.fpn1.0.weight``, ...), plus optional *extra* tensors under their own
  top-level prefixes (``neck.``, ``rpn_head.``, ``roi_head.`` ... kept from an MMDetection
  checkpoint for the detection heads);
* metadata (safetensors' string-to-string header): ``format = "piip"``, ``format_version``,
  ``piip_version``, ``model`` (the kind of model: ``"piip"`` for a backbone or classifier,
  ``"detector"``, ...), ``config`` (that model's config as JSON: a
  :class:`~piip.config.model.PIIPConfig`, a detector's config holding its backbone's, ...),
  ``extra_prefixes`` (JSON list) and any caller-supplied provenance strings. Files of format
  version 1 (no ``model`` key) hold a PIIP.

The same header, as ``piip.json``, makes a sharded checkpoint folder of ``piip train``
(``run.strategy=zero1`` or ``fsdp``; :mod:`piip.weights.sharded`) a piip checkpoint too:
:func:`read_checkpoint` and :func:`load_checkpoint` (``piip.load``) take either.

:func:`load_checkpoint` rebuilds the model from the stored config and loads it strictly. Errors say what is wrong: an unreadable (corrupt or truncated) file, a file that is not
a piip checkpoint, a checkpoint of another variant (the first key whose shape differs, with both
shapes), and missing or unexpected keys (listed, never silently dropped).
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any, Callable

import torch
from torch import nn

from ..version import __version__
from .errors import CheckpointError
from .io import atomic_path

__all__ = [
    "CheckpointError",
    "save_checkpoint",
    "checkpoint_header",
    "model_from_config",
    "load_checkpoint",
    "read_checkpoint",
    "check_state_dict",
    "describe_problems",
    "register_model_kind",
    "model_kind",
    "load_state_dict_checked",
    "FORMAT_NAME",
    "FORMAT_VERSION",
]

FORMAT_NAME = "piip"
FORMAT_VERSION = "2"
_RESERVED_META = ("format", "format_version", "piip_version", "model", "config", "extra_prefixes")

#: model kind -> (config class, builder from the config). The format knows no model: ``piip.models``
#: registers the PIIP (``"piip"``) and every task the kind it saves (:func:`piip.engine.task.register_task`)
_MODEL_KINDS: dict[str, tuple[type, Callable[[Any], nn.Module]]] = {}


def register_model_kind(kind: str, config_class: type, builder: Callable[[Any], nn.Module]) -> None:
    """Let checkpoints of a kind of model (``"piip"``, ``"detector"``, ...) be saved and rebuilt."""
    known = _MODEL_KINDS.get(kind)
    if known is not None and known[0] is not config_class:
        raise ValueError(f"model kind {kind!r} is registered with {known[0].__name__} already")
    _MODEL_KINDS[kind] = (config_class, builder)


def model_kind(config: Any) -> str | None:
    """The registered kind (``"piip"``, ``"detector"``, ...) of a model config; ``None`` for any other object."""
    return next((k for k, (cls, _) in _MODEL_KINDS.items() if type(config) is cls), None)


def _shape(t: Any) -> tuple[int, ...]:
    return tuple(t.shape) if hasattr(t, "shape") else ()


def _listing(keys: list[str], limit: int = 20) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def describe_problems(*, mismatched=(), missing=(), unexpected=(), unmapped=(), what: str = "checkpoint",
                      names: Mapping[str, str] | None = None) -> str:
    """One message for everything wrong between a state dict and a model (see :func:`check_state_dict`)."""
    names = names or {}
    parts = []
    if mismatched:
        key, got, want = mismatched[0]
        source = f" (from {names[key]!r})" if names.get(key, key) != key else ""
        parts.append(
            f"the {what} is for a different variant: first mismatching key {key!r}{source} has shape "
            f"{list(got)} in the {what} but {list(want)} in the model"
            + (f" ({len(mismatched)} mismatching keys in all)" if len(mismatched) > 1 else ""))
    if missing:
        parts.append(f"{len(missing)} model key(s) missing from the {what}: {_listing(list(missing))}")
    if unexpected:
        shown = [f"{k} (from {names[k]!r})" if names.get(k, k) != k else k for k in unexpected]
        parts.append(f"{len(shown)} unexpected key(s) in the {what}: {_listing(shown)}")
    if unmapped:
        parts.append(f"{len(unmapped)} key(s) could not be mapped to the model (not dropped silently): "
                     f"{_listing(list(unmapped))}")
    return "; ".join(parts)


def check_state_dict(state_dict: Mapping[str, torch.Tensor], model: nn.Module | Mapping[str, torch.Tensor],
                     *, what: str = "checkpoint", names: Mapping[str, str] | None = None,
                     unmapped: list[str] | tuple[str, ...] = ()) -> None:
    """Raise :class:`CheckpointError` unless ``state_dict`` has exactly ``model``'s keys and shapes.

    The message names the first key (in the model's order) whose shape differs, with both
    shapes, and lists every missing and unexpected key. ``names`` optionally maps a key to the name
    it had in the source file (the converter quotes the authors' key too); ``unmapped`` lists
    source keys that could not be renamed at all (reported in the same error).
    """
    expected = model.state_dict() if isinstance(model, nn.Module) else model
    mismatched = [(k, _shape(state_dict[k]), _shape(v)) for k, v in expected.items()
                  if k in state_dict and _shape(state_dict[k]) != _shape(v)]
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if not (mismatched or missing or unexpected or unmapped):
        return
    message = describe_problems(mismatched=mismatched, missing=missing, unexpected=unexpected,
                                unmapped=unmapped, what=what, names=names)
    raise CheckpointError(message, mismatched=mismatched, missing=missing,
                          unexpected=[*unexpected, *unmapped])


def load_state_dict_checked(model: nn.Module, state_dict: Mapping[str, torch.Tensor], *,
                            what: str = "checkpoint") -> nn.Module:
    """``model.load_state_dict(state_dict, strict=True)`` with :func:`check_state_dict`'s errors."""
    check_state_dict(state_dict, model, what=what)
    model.load_state_dict(state_dict, strict=True)
    return model


def _model_prefixes(model: nn.Module) -> set[str]:
    return {k.split(".", 1)[0] for k in model.state_dict()}


def _flatten_extra(extra: Mapping[str, Any] | None, prefix: str = "") -> dict[str, torch.Tensor]:
    """``{"neck": {"lateral.0.weight": t}}`` or ``{"neck.lateral.0.weight": t}`` -> flat dotted keys."""
    flat: dict[str, torch.Tensor] = {}
    for key, value in (extra or {}).items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(_flatten_extra(value, name))
        elif isinstance(value, torch.Tensor):
            if "." not in name:
                raise ValueError(f"extra tensor {name!r} needs a prefix (e.g. 'neck.{name}')")
            flat[name] = value
        else:
            raise TypeError(f"extra[{name!r}] must be a tensor or a mapping of tensors, got "
                            f"{type(value).__name__}")
    return flat


def _contiguous_unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory: give a tensor its own contiguous copy when it
    shares storage with another one or is a partial/strided view (values unchanged, so loading back
    is bit-exact)."""
    seen: set[int] = set()
    out = {}
    for key, t in tensors.items():
        t = t.detach().cpu()
        storage = t.untyped_storage()
        whole = (t.is_contiguous() and t.storage_offset() == 0
                 and t.numel() * t.element_size() == storage.nbytes())
        if not whole or (t.numel() and storage.data_ptr() in seen):
            t = t.contiguous().clone()
        if t.numel():
            seen.add(t.untyped_storage().data_ptr())
        out[key] = t
    return out


def checkpoint_header(model: nn.Module, metadata: Mapping[str, str] | None = None) -> dict[str, str]:
    """The header of a piip checkpoint of ``model`` (its format, kind and config, and the caller's
    ``metadata`` strings): a ``.safetensors`` file's metadata (:func:`save_checkpoint`), a sharded
    checkpoint folder's ``piip.json`` (:mod:`piip.weights.sharded`). A :class:`TypeError` for a model
    of no registered kind, a :class:`ValueError` for reserved ``metadata`` keys."""
    config = getattr(model, "config", None)
    kind = model_kind(config)
    if kind is None:
        raise TypeError(f"save_checkpoint needs a piip model with its config (a PIIP, a detector, ...), got "
                        f"{type(model).__name__} with config {type(config).__name__}")
    header = {str(k): str(v) for k, v in (metadata or {}).items()}
    reserved = sorted(set(header) & set(_RESERVED_META))
    if reserved:
        raise ValueError(f"metadata keys {reserved} are reserved by the piip format")
    header.update({"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "piip_version": __version__,
                   "model": kind, "config": config.to_json(), "extra_prefixes": "[]"})
    return header


def model_from_config(config: Any) -> nn.Module:
    """The untrained model of a registered kind's ``config`` (the builder its kind registered)."""
    kind = model_kind(config)
    if kind is None:
        raise TypeError(f"{type(config).__name__} is not the config of a registered kind of piip model")
    return _MODEL_KINDS[kind][1](config)


def save_checkpoint(model: nn.Module, path: str | os.PathLike, extra: Mapping[str, Any] | None = None,
                    metadata: Mapping[str, str] | None = None) -> str:
    """Write ``model`` (its config and weights) and optional ``extra`` tensors to a safetensors file,
    atomically.

    Args:
        model: a :class:`PIIP` or another registered kind of piip model (a detector, ...): anything
            whose ``config`` is a registered model config.
        path: output file (conventionally ``*.safetensors``).
        extra: tensors kept next to the model under their own prefixes, either nested
            (``{"neck": {name: tensor}}``) or flat (``{"neck.name": tensor}``). A prefix must not
            collide with a model prefix (``branches``, ``interactions``, ``merge``, ``fpn``, ...).
        metadata: extra provenance strings stored in the header (e.g. the source file).

    Returns the path written.
    """
    from safetensors.torch import save_file

    header = checkpoint_header(model, metadata)
    state = dict(model.state_dict())
    extra_flat = _flatten_extra(extra)
    extra_prefixes = sorted({k.split(".", 1)[0] for k in extra_flat})
    clash = sorted(set(extra_prefixes) & _model_prefixes(model))
    if clash:
        raise ValueError(f"extra prefixes {clash} collide with the model's own keys; rename them")
    tensors = _contiguous_unshared({**state, **extra_flat})
    header["extra_prefixes"] = json.dumps(extra_prefixes)
    path = os.fspath(path)
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=header)
    return path


def read_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu", *,
                    tensors: bool = True) -> dict[str, Any]:
    """Read a piip checkpoint without building the model.

    ``path``: a ``.safetensors`` file, or a sharded checkpoint folder (a ``step-*`` folder that
    ``piip train`` writes under ``run.strategy=zero1`` or ``fsdp``; its shards are consolidated
    into the whole model's tensors, see :mod:`piip.weights.sharded`).

    Returns a dict with ``kind`` (``"piip"``, ``"detector"``, ...), ``config`` (that model's
    config), ``state_dict`` (the model tensors), ``extra`` (``{prefix: {name: tensor}}``) and
    ``metadata`` (the raw header strings). ``tensors=False`` reads the header only (``state_dict``
    and ``extra`` empty): what a caller needs to know before it loads the model.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        from .sharded import read_header, read_sharded_model

        metadata = read_header(path)
        kind, config = _check_header(metadata, path, "a sharded checkpoint folder")
        stored = read_sharded_model(path, device) if tensors else {}
    elif not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    else:
        metadata, stored = _read_safetensors(path, device, tensors)
        kind, config = _check_header(metadata, path, "a safetensors file")
    extra_prefixes = set(json.loads(metadata.get("extra_prefixes", "[]")))
    state, extra = {}, {}
    for key, tensor in stored.items():
        prefix, _, rest = key.partition(".")
        if prefix in extra_prefixes:
            extra.setdefault(prefix, {})[rest] = tensor
        else:
            state[key] = tensor
    return {"kind": kind, "config": config, "state_dict": state, "extra": extra, "metadata": metadata}


def _read_safetensors(path: str, device: str | torch.device, tensors: bool
                      ) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """The header strings and (with ``tensors``) the tensors of a safetensors file."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt", device=str(device)) as f:
            return dict(f.metadata() or {}), ({k: f.get_tensor(k) for k in f.keys()} if tensors else {})
    except Exception as err:  # safetensors raises its own SafetensorError / OSError types
        size = os.path.getsize(path)
        raise CheckpointError(
            f"cannot read {path!r} ({size} bytes) as a safetensors file: it is corrupt or truncated "
            f"({type(err).__name__}: {err})") from err


def _check_header(metadata: Mapping[str, str], path: str, what: str) -> tuple[str, Any]:
    """The model kind and config a piip header names (a :class:`CheckpointError` naming ``path``,
    ``what`` it is, for a header that is not piip's, of an unknown kind or with an invalid config)."""
    if metadata.get("format") != FORMAT_NAME or "config" not in metadata:
        raise CheckpointError(
            f"{path!r} is {what} but not a piip checkpoint (no 'format: piip' and "
            "'config' in its metadata); convert the authors' checkpoints with "
            "piip.compat.original.convert_checkpoint or save with piip.weights.save_checkpoint")
    kind = metadata.get("model", "piip")
    if kind not in _MODEL_KINDS:
        raise CheckpointError(f"{path!r} holds a model of kind {kind!r}, which this piip does not know "
                              f"(known: {sorted(_MODEL_KINDS)}); it was written by piip {metadata.get('piip_version')}")
    try:
        return kind, _MODEL_KINDS[kind][0].from_dict(json.loads(metadata["config"]))
    except Exception as err:
        raise CheckpointError(f"{path!r} holds an invalid piip config: {err}") from err


def load_checkpoint(path: str | os.PathLike, model: nn.Module | None = None, *,
                    device: str | torch.device = "cpu", return_extra: bool = False):
    """Load a piip checkpoint: a backbone or classifier (:class:`PIIP`), a detector, ...

    Args:
        path: a file written by :func:`save_checkpoint` (or ``piip convert``, ``piip train``), or a
            sharded checkpoint folder of ``piip train`` (``run.strategy=zero1`` or ``fsdp``).
        model: load into this model instead of building one from the stored config; the shapes
            must match (the error names the first mismatching key and both shapes).
        device: where the tensors are read to.
        return_extra: also return the extra tensors ``{prefix: {name: tensor}}``.

    Returns the model in eval mode (and the extras when ``return_extra``). A classifier whose header
    names its classes (``class_names``, as ``piip train`` and ``save_pretrained`` write them) gets them
    as ``model.class_names``.
    """
    data = read_checkpoint(path, device=device)
    if model is None:
        model = _MODEL_KINDS[data["kind"]][1](data["config"])
        model.to(device)
    load_state_dict_checked(model, data["state_dict"], what=f"checkpoint {os.fspath(path)!r}")
    names = data["metadata"].get("class_names")
    if names is not None and not hasattr(getattr(model, "config", None), "class_names"):
        model.class_names = tuple(json.loads(names))  # a classifier's: its config has no field for them
    model.eval()
    return (model, data["extra"]) if return_extra else model
