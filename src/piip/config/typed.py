"""Typed configuration as data: dataclasses read from and written to JSON/YAML, checked field by
field, and overridden by dotted paths (``optim.lr=1e-4``), in one implementation.

Every config in piip (the network's :class:`~piip.config.model.PIIPConfig`, a detector's or a
segmenter's config, a training run's :class:`~piip.engine.config.TrainConfig`) is a dataclass
serialised through :class:`Serializable`; the command line's ``section.field=value`` overrides and
Python's keyword overrides reach fields through :func:`apply_overrides` / :func:`parse_value`.

**null** means the same everywhere, in a file (``null``) and on the command line (``null``, or
``none`` except in a plain text field, where ``none`` is the text): a field that accepts ``None``
(its type says ``| None``) is set to ``None``; any other field goes back to its default.
Every error is a one-line :class:`ValueError` naming the field.
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any, Union

__all__ = ["Serializable", "build_config", "check_value", "parse_value", "accepts_none", "apply_overrides",
           "read_yaml_value", "yaml_problem", "split_override"]


class Serializable:
    """``to_dict`` / ``to_json`` / ``from_dict`` / ``from_json`` for a config dataclass: the JSON
    form is ``dataclasses.asdict``; reading it back checks every value (:func:`build_config`)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        return build_config(cls, data)

    @classmethod
    def from_json(cls, text: str):
        return cls.from_dict(json.loads(text))


def build_config(cls, data: Any, where: str = ""):
    """The dataclass ``cls`` from a parsed mapping (JSON/YAML), every value checked against its
    field's declared type (nested dataclasses, also as elements of a tuple, are built the same way);
    ``null`` for a field that cannot be ``None`` means its default. ``where`` prefixes the field
    names in the one-line errors (``"model.piip."``)."""
    if not isinstance(data, dict):
        raise ValueError(f"config section {where.rstrip('.') or '<root>'} must be a mapping, got {data!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown config key(s) {[f'{where}{u}' for u in unknown]}; "
                         f"{cls.__name__} fields are {sorted(names)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        tp = hints[key]
        if value is None and not accepts_none(tp):
            continue  # null: the field's default
        if dataclasses.is_dataclass(tp):
            kwargs[key] = build_config(tp, value, f"{where}{key}.")
        else:
            kwargs[key] = check_value(tp, value, f"{where}{key}")
    required = [f.name for f in dataclasses.fields(cls) if f.init and f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING]
    missing = [name for name in required if name not in kwargs]
    if missing:
        raise ValueError(f"config key(s) {[f'{where}{m}' for m in missing]} are required ({cls.__name__})")
    return cls(**kwargs)


def _args(tp) -> tuple:
    origin = typing.get_origin(tp)
    if origin is Union or origin is types.UnionType:
        return typing.get_args(tp)
    return (tp,)


def accepts_none(tp) -> bool:
    """Whether a field of type ``tp`` may be ``None`` (``X | None`` or ``Any``): there ``null`` is
    ``None``; for any other field ``null`` means its default (see the module docstring)."""
    return tp is Any or type(None) in _args(tp)


def _type_name(tp) -> str:
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    return str(tp).replace("typing.", "")


#: the kinds of values :func:`check_value` knows; other declared types are taken as given
_CHECKED = (float, int, bool, str, list, tuple, dict)


def check_value(tp, value, where: str):
    """Validate / lightly convert an already-parsed value (from JSON/YAML) against ``tp``: ints for
    floats, lists for tuples, element by element where ``tp`` names the elements (``tuple[int, ...]``,
    ``list[float]``, ``tuple[float, float, float]``). Raises a one-line :class:`ValueError` naming
    ``where`` and the declared type."""
    options = _args(tp)
    if value is None:
        if accepts_none(tp):
            return None
        raise ValueError(f"{where} may not be null (expected {_type_name(tp)})")
    element_error = None  # what was wrong inside a list that otherwise fits: the more telling message
    for opt in options:
        if opt is Any:
            return value
        if dataclasses.is_dataclass(opt):
            if isinstance(value, opt):
                return value
            if isinstance(value, dict):
                return build_config(opt, value, f"{where}.")
            continue
        base = typing.get_origin(opt) or opt
        if base not in _CHECKED and base is not type(None):
            return value  # a type this check does not know (the config's own validation has it)
        if base is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if base is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if base is bool and isinstance(value, bool):
            return value
        if base is str and isinstance(value, str):
            return value
        if base in (list, tuple) and isinstance(value, (list, tuple)):
            try:
                return base(_check_items(opt, value, where))
            except ValueError as err:
                element_error = element_error or err
                continue
        if base is dict and isinstance(value, dict):
            return value
    if element_error is not None:
        raise ValueError(f"{element_error} ({where} is {_type_name(tp)})") from None
    shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
    raise ValueError(f"{where}={shown} does not match the declared type {_type_name(tp)}")


def _check_items(tp, value, where: str) -> list:
    """The elements of a list/tuple value checked against ``list[X]``, ``tuple[X, ...]`` or
    ``tuple[X, Y, Z]`` (a bare ``list`` / ``tuple`` takes any elements)."""
    args = typing.get_args(tp)
    if not args:
        return list(value)
    if typing.get_origin(tp) is list or (len(args) == 2 and args[1] is Ellipsis):
        item_types = [args[0]] * len(value)
    else:
        if len(value) != len(args):
            raise ValueError(f"{where} needs {len(args)} values, got {len(value)}")
        item_types = list(args)
    return [check_value(t, v, f"{where}[{i}]") for i, (t, v) in enumerate(zip(item_types, value))]


def _is_null(tp, raw) -> bool:
    """Whether an override's value is null: ``None``, ``null``, or ``none`` except for a plain
    text field (``data.augment=none`` is the text "none")."""
    if raw is None:
        return True
    if not isinstance(raw, str):
        return False
    text = raw.strip().lower()
    return text == "null" or (text == "none" and (accepts_none(tp) or str not in _args(tp)))


def _default(obj, name: str, where: str):
    """The dataclass default of field ``name`` of ``obj`` (what ``null`` means for a field that
    cannot be ``None``)."""
    f = next(f for f in dataclasses.fields(obj) if f.name == name)
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    raise ValueError(f"{where} has no default and may not be null")


def yaml_problem(err: Exception) -> str:
    """A YAML parser error in one line: what is wrong and where."""
    mark = getattr(err, "problem_mark", None)
    at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return " ".join(f"{getattr(err, 'problem', None) or err}{at}".split())


def read_yaml_value(text: str, where: str):
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ValueError(f"cannot read {where}={text!r}: not valid YAML ({yaml_problem(err)})") from None


def parse_value(tp, raw: str, where: str = "value"):
    """Coerce a command-line string to the field type ``tp`` (lists, tuples and mappings as YAML
    flow values, ``[0.1,0.05]``, their elements checked against ``tp``)."""
    options = _args(tp)
    text = raw.strip()
    if text.lower() in ("none", "null") and accepts_none(tp):
        return None
    for opt in options:
        base = typing.get_origin(opt) or opt
        try:
            if base is bool:
                if text.lower() in ("true", "1", "yes", "on"):
                    return True
                if text.lower() in ("false", "0", "no", "off"):
                    return False
                continue
            if base is int:
                return int(text)
            if base is float:
                return float(text)
            if base in (list, tuple, dict):
                value = read_yaml_value(text, where)
                if isinstance(value, (list, dict)):
                    return check_value(opt, value, where)
                continue
            if base is str:
                return raw
            if opt is Any:
                return read_yaml_value(text, where)
        except ValueError:
            continue
    raise ValueError(f"cannot read {where}={raw!r} as {_type_name(tp)}")


def apply_overrides(cfg, overrides: list[str] | dict[str, Any]):
    """Apply ``["optim.lr=1e-4", "run.amp=bf16", ...]`` (or ``{"optim.lr": 1e-4}``) to the mutable
    dataclass ``cfg`` in place and return it: dotted paths through nested dataclasses and free-form
    mappings; strings are parsed as the field's type (:func:`parse_value`), other values checked
    (:func:`check_value`). ``null`` sets a field that accepts ``None`` to ``None`` and any other
    field to its default."""
    items = overrides.items() if isinstance(overrides, dict) else [split_override(o) for o in overrides]
    for key, raw in items:
        parts = key.split(".")
        target = cfg
        for part in parts[:-1]:
            if isinstance(target, dict):
                target = target.setdefault(part, {})
            elif dataclasses.is_dataclass(target) and hasattr(target, part):
                if getattr(target, part) is None and "dict" in str(typing.get_type_hints(type(target))[part]):
                    setattr(target, part, {})  # an unset mapping (e.g. model.branch_weights) starts empty
                target = getattr(target, part)
            else:
                raise ValueError(f"unknown config key {key!r} (no section {part!r})")
            if not (isinstance(target, dict) or dataclasses.is_dataclass(target)):
                raise ValueError(f"config key {key!r}: {part!r} is a value, not a section")
        leaf = parts[-1]
        if isinstance(target, dict):  # free-form section (model.head, ...): YAML-typed, checked by its owner
            target[leaf] = read_yaml_value(raw, key) if isinstance(raw, str) and raw else raw
            continue
        names = {f.name: f for f in dataclasses.fields(target)}
        if leaf not in names:
            raise ValueError(f"unknown config key {key!r}; {type(target).__name__} fields are "
                             f"{sorted(names)}")
        tp = typing.get_type_hints(type(target))[leaf]
        if dataclasses.is_dataclass(tp):
            raise ValueError(f"{key!r} is a section; override its fields ({key}.FIELD=VALUE)")
        if _is_null(tp, raw):
            value = None if accepts_none(tp) else _default(target, leaf, key)
        else:
            value = parse_value(tp, raw, key) if isinstance(raw, str) else check_value(tp, raw, key)
        setattr(target, leaf, value)
    return cfg


def split_override(item: str) -> tuple[str, str]:
    if "=" not in item:
        raise ValueError(f"override {item!r} is not of the form key.sub=value")
    key, value = item.split("=", 1)
    if not key.strip():
        raise ValueError(f"override {item!r} has no key (section.field=value)")
    return key.strip(), value
