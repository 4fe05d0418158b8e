"""Sharing a model the Hugging Face Hub way: ``save_pretrained`` / ``from_pretrained`` / ``push_to_hub``
for every kind of piip model (backbone, classifier, detector, segmenter).

A shared folder (local, or a hub model repo) holds three files:

* ``model.safetensors``: a piip checkpoint written by :func:`~piip.weights.checkpoint.save_checkpoint`
  (weights, and the model's kind and config in the header): the file that loads, read by
  :func:`~piip.weights.checkpoint.load_checkpoint`. A classifier's class names are in its header
  (``class_names``), as ``piip train`` writes them; a detector's and a segmenter's are in their config;
* ``config.json``: the same kind and config for people and the hub's pages (``piip_version``,
  ``model``, ``config``, ``class_names``), derived from the header when saved and checked against it
  when loaded (an edited one is refused, naming the first differing field), and the card's
  ``recipe`` and ``metrics`` when given;
* ``README.md``: the model card. Its writer lives in a higher layer
  (:mod:`piip.analysis.model_card`: the figures are ``piip flops``'s) and registers itself here
  (:func:`register_card_writer`).

Every file is written atomically (:mod:`~piip.weights.io`). A hub repo id (``owner/name[@revision]``)
is fetched with ``huggingface_hub`` only after :func:`~piip.weights.hub.hub_unreachable_reason`'s
probe: without network, loading (unless the files are in the local hub cache) and pushing fail within
seconds with a :class:`~piip.weights.hub.HubUnavailableError` naming the repo.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Callable

from torch import nn

from ..config.model import PIIPConfig
from ..version import __version__
from .checkpoint import CheckpointError, load_checkpoint, model_kind, read_checkpoint, save_checkpoint
from .hub import HUB_CONNECT_TIMEOUT, HubUnavailableError, hub_unreachable_reason
from .io import atomic_write

__all__ = ["HubMixin", "WEIGHTS_NAME", "CONFIG_NAME", "CARD_NAME", "save_pretrained", "from_pretrained",
           "push_to_hub", "upload_pretrained", "require_hub", "repo_to_push", "parse_repo_id", "class_names_of",
           "is_shared_config", "register_card_writer"]

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
CARD_NAME = "README.md"

#: ``writer(model, *, class_names, recipe, metrics, license, repo_id) -> str``: the model card's text
_CARD_WRITER: list[Callable[..., str]] = []


def register_card_writer(writer: Callable[..., str]) -> None:
    """Let :func:`save_pretrained` write a model card (``README.md``) with ``writer``."""
    _CARD_WRITER[:] = [writer]


# -- class names -----------------------------------------------------------------------------------

def _classes(config: Any) -> int | None:
    """How many classes a model of ``config`` predicts (``None``: a dense backbone predicts none)."""
    if isinstance(config, PIIPConfig):
        return config.num_classes if config.task == "cls" else None
    return getattr(config, "num_classes", None)


def class_names_of(model: nn.Module) -> tuple[str, ...]:
    """The class names a model carries: its config's (detectors, segmenters) or, for a classifier,
    the ``class_names`` :func:`~piip.weights.checkpoint.load_checkpoint` found in its checkpoint's header;
    empty when unknown."""
    config = getattr(model, "config", None)
    if hasattr(config, "class_names"):
        return tuple(config.class_names)
    return tuple(getattr(model, "class_names", None) or ())


def _resolve_class_names(model: nn.Module, class_names: Sequence[str] | None) -> tuple[str, ...]:
    config = model.config
    if class_names is None:
        return class_names_of(model)
    names = tuple(str(n) for n in class_names)
    if hasattr(config, "class_names"):
        if names != tuple(config.class_names):
            raise ValueError(f"a {type(model).__name__}'s class names are part of its config "
                             f"({list(config.class_names)[:5]}...); build it with class_names=... instead")
        return names
    expected = _classes(config)
    if expected is None:
        raise ValueError("a dense backbone predicts no classes: class_names are for a classifier, a detector or a "
                         "segmenter")
    if names and len(names) != expected:
        raise ValueError(f"class_names has {len(names)} names for a classifier of {expected} classes")
    return names


# -- config.json ------------------------------------------------------------------------------------

def _config_record(metadata: Mapping[str, str]) -> dict[str, Any]:
    """``config.json``'s content, from a checkpoint header: what the folder's weights file says."""
    config = json.loads(metadata["config"])
    record = {"piip_version": metadata.get("piip_version", __version__), "model": metadata.get("model", "piip"),
              "config": config}
    names = config.get("class_names") if isinstance(config, dict) and "class_names" in config else (
        json.loads(metadata["class_names"]) if "class_names" in metadata else [])
    if names:
        record["class_names"] = list(names)
    return record


def _json_text(value: Any, indent: str = "") -> str:
    """JSON for people: one key a line, lists of plain values (``[[0, 3], [4, 7]]``, class names) on one."""
    if isinstance(value, dict) and value:
        inner = indent + "  "
        items = [f"{inner}{json.dumps(str(k))}: {_json_text(v, inner)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + f"\n{indent}}}"
    if isinstance(value, (list, tuple)) and any(isinstance(v, dict) for v in value):
        inner = indent + "  "
        return "[\n" + ",\n".join(inner + _json_text(v, inner) for v in value) + f"\n{indent}]"
    return json.dumps(value, default=str)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{str(path)!r} is not readable JSON ({type(err).__name__}: {err})") from err


def is_shared_config(record: Any) -> bool:
    """A ``config.json`` written by :func:`save_pretrained` (a training run's is a TrainConfig)."""
    return isinstance(record, dict) and "piip_version" in record and "config" in record


_ABSENT = "(absent)"


def _first_difference(a: Any, b: Any, where: str) -> tuple[str, Any, Any] | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in [*a, *(k for k in b if k not in a)]:
            found = _first_difference(a.get(key, _ABSENT), b.get(key, _ABSENT), f"{where}.{key}")
            if found:
                return found
        return None
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            found = _first_difference(x, y, f"{where}[{i}]")
            if found:
                return found
        return None
    return None if a == b else (where, a, b)


def _check_config_json(folder: Path, metadata: Mapping[str, str]) -> None:
    """Refuse a folder whose ``config.json`` does not say what its weights file's header says."""
    path = folder / CONFIG_NAME
    if not path.is_file():
        return
    found = _read_json(path)
    if not is_shared_config(found):
        return  # a training run's config.json: the run folder's model.safetensors loads by itself
    expected = _config_record(metadata)
    for key in ("model", "config", "class_names"):
        difference = _first_difference(found.get(key, _ABSENT), expected.get(key, _ABSENT), key)
        if difference:
            where, mine, theirs = difference
            raise CheckpointError(
                f"{str(path)!r} does not agree with {str(folder / WEIGHTS_NAME)!r}: {where} is {mine!r} in "
                f"{CONFIG_NAME} but {theirs!r} in the header of {WEIGHTS_NAME} (the file that loads); restore "
                f"{CONFIG_NAME} or write the folder again with save_pretrained")


# -- save / load ------------------------------------------------------------------------------------

def save_pretrained(model: nn.Module, directory: str | os.PathLike, *, class_names: Sequence[str] | None = None,
                    recipe: str | Mapping[str, Any] | None = None, metrics: Mapping[str, Any] | None = None,
                    license: str | None = None, repo_id: str | None = None) -> Path:
    """Write ``model`` to ``directory`` as ``model.safetensors``, ``config.json`` and ``README.md``.

    Args:
        model: any kind of piip model (a :class:`~piip.models.PIIP` backbone or classifier, a detector,
            a segmenter).
        directory: the folder (created; files already there are replaced one by one, atomically).
        class_names: a classifier's class names (stored in its checkpoint header); a detector's and a
            segmenter's are their config's (default: what the model carries, see :func:`class_names_of`).
        recipe: how it was trained, for the card: free text or ``{item: value}``.
        metrics: its evaluation, for the card: ``{name: value}``.
        license: the card's licence id (default: the branch weights' licence, read from timm).
        repo_id: the hub repo the folder is meant for (the card's load snippet names it).

    Returns the folder.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"{str(directory)!r} is a file; save_pretrained writes a folder")
    existing = directory / CONFIG_NAME
    if existing.is_file() and not is_shared_config(_read_json(existing)):
        raise ValueError(f"{str(directory)!r} holds a {CONFIG_NAME} that save_pretrained did not write (a training "
                         "run's?); save into another folder")
    if model_kind(getattr(model, "config", None)) is None:
        raise TypeError(f"save_pretrained needs a piip model (a PIIP, a detector, a segmenter, ...), got "
                        f"{type(model).__name__}")
    names = _resolve_class_names(model, class_names)
    if repo_id is not None:
        repo_id = "@".join(filter(None, parse_repo_id(repo_id)))
    if not _CARD_WRITER:
        raise RuntimeError("no model card writer is registered (import piip registers piip.analysis.model_card)")
    card = _CARD_WRITER[0](model, class_names=names, recipe=recipe, metrics=metrics, license=license,
                           repo_id=repo_id)
    in_header = {"class_names": json.dumps(list(names))} if names and not hasattr(model.config, "class_names") else None
    weights = save_checkpoint(model, directory / WEIGHTS_NAME, metadata=in_header)
    record = _config_record(read_checkpoint(weights, tensors=False)["metadata"])
    record.update({k: v for k, v in (("recipe", recipe), ("metrics", dict(metrics or {}))) if v})  # for people
    atomic_write(directory / CONFIG_NAME, "w", lambda f: f.write(_json_text(record) + "\n"))
    atomic_write(directory / CARD_NAME, "w", lambda f: f.write(card))
    return directory


def _load_folder(folder: Path, device: Any) -> nn.Module:
    weights = folder / WEIGHTS_NAME
    _check_config_json(folder, read_checkpoint(weights, tensors=False)["metadata"])
    return load_checkpoint(weights, device=device)


def from_pretrained(source: str | os.PathLike, *, device: Any = "cpu", revision: str | None = None,
                    token: str | None = None) -> nn.Module:
    """A piip model, in eval mode, from ``source``:

    * a folder holding ``model.safetensors`` (written by :func:`save_pretrained`, or a ``piip train``
      run folder); its ``config.json``, when save_pretrained wrote one, must agree with the weights;
    * a piip ``.safetensors`` checkpoint;
    * else a Hugging Face hub repo id ``owner/name`` or ``owner/name@revision`` (``revision=`` too):
      its files from the local hub cache, or downloaded after a quick probe of the hub (offline:
      :class:`HubUnavailableError` within seconds).

    A classifier gets ``model.class_names`` when its checkpoint names the classes.
    """
    text = os.fspath(source)
    path = Path(text)
    if path.is_dir():
        if not (path / WEIGHTS_NAME).is_file():
            raise FileNotFoundError(f"folder {text!r} holds no {WEIGHTS_NAME} (save_pretrained and piip train write "
                                    "one)")
        return _load_folder(path, device)
    if path.is_file():
        return load_checkpoint(path, device=device)
    try:
        repo, rev = parse_repo_id(text, revision)
    except ValueError as err:
        raise FileNotFoundError(f"no folder or file {text!r}, and {err}") from None
    return _load_folder(_download(repo, rev, token), device)


def parse_repo_id(text: str, revision: str | None = None) -> tuple[str, str | None]:
    """``(repo_id, revision)`` of ``"owner/name"`` or ``"owner/name@revision"`` (the hub's syntax rules);
    a :class:`ValueError` for anything else."""
    repo, at, rev = str(text).partition("@")
    if at and not rev:
        raise ValueError(f"{text!r} is not a hub repo id owner/name[@revision]: the revision after '@' is empty")
    if rev and revision and rev != revision:
        raise ValueError(f"{text!r} names revision {rev!r} but revision={revision!r} was given")
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    problem = None
    if repo.count("/") != 1:
        problem = "it needs exactly one '/'"
    else:
        try:
            validate_repo_id(repo)
        except HFValidationError as err:
            problem = str(err).split(":")[0].rstrip(".")
    if problem:
        raise ValueError(f"{text!r} is not a hub repo id owner/name[@revision] ({problem})")
    return repo, rev or revision


def _described(repo: str, revision: str | None) -> str:
    return f"'{repo}'" + (f" (revision {revision!r})" if revision else "")


def _download(repo: str, revision: str | None, token: str | None) -> Path:
    """The folder holding ``repo``'s model.safetensors (and config.json): the local hub cache when the
    hub cannot be reached, else ``hf_hub_download``'s snapshot."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    reason = hub_unreachable_reason(HUB_CONNECT_TIMEOUT)
    if reason is not None:
        cached = try_to_load_from_cache(repo, WEIGHTS_NAME, revision=revision)
        if isinstance(cached, str) and os.path.isfile(cached):
            return Path(cached).parent
        raise HubUnavailableError(
            f"cannot load {_described(repo, revision)} from the Hugging Face hub: {reason}, and it is not in the "
            "local hub cache; no local folder of that name exists either: pass a folder written by "
            "save_pretrained (or a .safetensors checkpoint)")
    common = dict(revision=revision, token=token, library_name="piip", library_version=__version__)
    try:
        weights = hf_hub_download(repo, WEIGHTS_NAME, **common)
    except Exception as err:  # repository / revision / file not found, access refused, HTTP errors
        raise HubUnavailableError(f"cannot download {WEIGHTS_NAME} of {_described(repo, revision)} from the "
                                  f"Hugging Face hub: {type(err).__name__}: {_first_line(err)}") from err
    try:
        hf_hub_download(repo, CONFIG_NAME, **common)
    except Exception:  # config.json is for people: a repo with the weights alone still loads
        pass
    return Path(weights).parent


def _first_line(err: BaseException) -> str:
    return next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)


# -- the hub ----------------------------------------------------------------------------------------

def require_hub(what: str, repo: str) -> None:
    """Raise :class:`HubUnavailableError` within seconds, naming ``repo``, unless the hub can be reached
    (``what``: ``"push to"``, ...)."""
    reason = hub_unreachable_reason(HUB_CONNECT_TIMEOUT)
    if reason is not None:
        raise HubUnavailableError(
            f"cannot {what} '{repo}' on the Hugging Face hub: {reason}; write the folder with save_pretrained "
            f"(piip share SOURCE DIR) and upload it where the hub is reachable (hf upload {repo} DIR)")


def repo_to_push(repo_id: str) -> str:
    """The repo id a push goes to: ``owner/name``, checked, without ``@revision`` (a push makes one)."""
    repo, revision = parse_repo_id(repo_id)
    if revision:
        raise ValueError(f"push to a repo id without '@revision', got {repo_id!r}")
    return repo


def upload_pretrained(directory: str | os.PathLike, repo_id: str, *, private: bool = False,
                      token: str | None = None, commit_message: str | None = None) -> str:
    """Upload a folder written by :func:`save_pretrained` to the hub model repo ``repo_id`` (created if
    missing); the URL of the commit. Fails within seconds when the hub cannot be reached."""
    folder = Path(directory)
    repo = repo_to_push(repo_id)
    if not (folder / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(f"folder {str(folder)!r} holds no {WEIGHTS_NAME}: write it with save_pretrained first")
    _check_config_json(folder, read_checkpoint(folder / WEIGHTS_NAME, tensors=False)["metadata"])
    require_hub("push to", repo)
    return _upload(folder, repo, private=private, token=token, commit_message=commit_message)


def _upload(folder: Path, repo: str, *, private: bool, token: str | None, commit_message: str | None) -> str:
    from huggingface_hub import HfApi

    api = HfApi(token=token, library_name="piip", library_version=__version__)
    try:
        api.create_repo(repo, private=private, exist_ok=True, repo_type="model")
        info = api.upload_folder(repo_id=repo, folder_path=str(folder), repo_type="model",
                                 commit_message=commit_message or "Upload piip model",
                                 allow_patterns=[WEIGHTS_NAME, CONFIG_NAME, CARD_NAME])
    except Exception as err:  # not logged in, no write access, HTTP errors
        raise HubUnavailableError(f"the Hugging Face hub refused the upload to '{repo}': {type(err).__name__}: "
                                  f"{_first_line(err)} (log in with `hf auth login` or pass a token)") from err
    return str(getattr(info, "commit_url", None) or f"https://huggingface.co/{repo}")


def push_to_hub(model: nn.Module, repo_id: str, *, private: bool = False, token: str | None = None,
                commit_message: str | None = None, **card_info: Any) -> str:
    """:func:`save_pretrained` into a temporary folder, then :func:`upload_pretrained` it to ``repo_id``;
    the URL of the commit. ``card_info``: :func:`save_pretrained`'s card arguments. The hub is probed
    first: without network this fails within seconds, before anything is written."""
    repo = repo_to_push(repo_id)
    require_hub("push to", repo)
    with tempfile.TemporaryDirectory(prefix="piip-push-") as tmp:
        folder = save_pretrained(model, tmp, repo_id=repo, **card_info)
        return _upload(folder, repo, private=private, token=token, commit_message=commit_message)


class HubMixin:
    """``save_pretrained``, ``push_to_hub`` and ``from_pretrained`` on every kind of piip model (the
    PIIP class, the detectors' and the segmenter's): one implementation, this module's functions."""

    def save_pretrained(self, save_directory: str | os.PathLike, **card_info: Any) -> Path:
        """Write ``model.safetensors``, ``config.json`` and ``README.md`` (the model card) to
        ``save_directory``; ``card_info``: :func:`save_pretrained`'s keywords (``recipe``,
        ``metrics``, ``class_names``, ``license``, ``repo_id``)."""
        return save_pretrained(self, save_directory, **card_info)

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> str:
        """Upload the model to the hub repo ``repo_id`` (see :func:`push_to_hub`); the commit URL."""
        return push_to_hub(self, repo_id, **kwargs)

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike, **kwargs: Any) -> nn.Module:
        """:func:`from_pretrained`, checked to give this class."""
        model = from_pretrained(source, **kwargs)
        if not isinstance(model, cls):
            raise TypeError(f"{os.fspath(source)!r} holds a {type(model).__name__}, not a {cls.__name__}: load it "
                            "with piip.from_pretrained")
        return model
