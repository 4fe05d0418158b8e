"""Branch weights from a timm ``name.tag``: the local hub/torch cache, else the Hugging Face hub; and
piip's one probe of the hub (:func:`hub_unreachable_reason`).

Branches without a local file use their config's ``pretrained`` timm ``name.tag`` through timm and
the Hugging Face hub. Files already in the local hub/torch cache are used without any network
access. Otherwise the hub is probed first (offline mode, then a TCP connect bounded by a timeout),
because a download attempt without network can hang for minutes: without network access loading
fails within a few seconds with a message naming the branch, the tag and the
``branch_weights={"branchK": "/path/to/file"}`` alternative. Sharing a model
(:mod:`~piip.weights.sharing`: ``from_pretrained`` of a hub repo, ``push_to_hub``) asks the same probe.
"""
from __future__ import annotations

import os
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

from .formats import load_weights_file_with_notes

__all__ = ["HUB_CONNECT_TIMEOUT", "HubUnavailableError", "hub_unreachable_reason"]

#: Seconds allowed for the hub connectivity check before ``pretrained=True`` gives up.
HUB_CONNECT_TIMEOUT = 3.0


class HubUnavailableError(RuntimeError):
    """The Hugging Face hub cannot serve or take what piip asks of it: a branch's timm weights, a shared
    model's files, an upload (offline, hub unreachable, download or upload refused)."""


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def _offline_reason() -> str | None:
    if _truthy(os.environ.get("HF_HUB_OFFLINE")):
        return "HF_HUB_OFFLINE is set"
    try:
        from huggingface_hub import constants
        if constants.HF_HUB_OFFLINE:
            return "huggingface_hub is in offline mode (HF_HUB_OFFLINE)"
    except Exception:
        pass
    return None


def _cached_file(cfg: Any) -> str | None:
    """A local copy of a timm pretrained cfg's weights (explicit file, HF hub cache, torch hub
    cache), or ``None``. Never touches the network."""
    file = getattr(cfg, "file", None)
    if file and os.path.exists(file):
        return str(file)
    hub_id = getattr(cfg, "hf_hub_id", None)
    if hub_id:
        try:
            from huggingface_hub import try_to_load_from_cache
            repo, _, revision = hub_id.partition("@")
            for filename in (getattr(cfg, "hf_hub_filename", None), "model.safetensors", "pytorch_model.bin"):
                if not filename:
                    continue
                hit = try_to_load_from_cache(repo, filename, revision=revision or None)
                if isinstance(hit, str) and os.path.exists(hit):
                    return hit
        except Exception:
            pass
    url = getattr(cfg, "url", None)
    if url:
        candidate = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(url).path))
        if os.path.exists(candidate):
            return candidate
    return None


def _reachable(host: str, port: int, timeout: float) -> bool:
    """TCP connect to ``host:port`` bounded by ``timeout`` (name resolution included)."""
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def _endpoint(url: str | None = None) -> tuple[str, int]:
    """Host and port a request to ``url`` (default: the Hugging Face hub, ``HF_ENDPOINT``) connects to
    first: the HTTPS proxy when one is set."""
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    if proxy:
        parsed = urlparse(proxy if "://" in proxy else f"http://{proxy}")
    else:
        parsed = urlparse(url or os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    return parsed.hostname or "huggingface.co", parsed.port or (80 if parsed.scheme == "http" else 443)


def hub_unreachable_reason(timeout: float = HUB_CONNECT_TIMEOUT, *, url: str | None = None,
                           reachability: dict | None = None) -> str | None:
    """Why the Hugging Face hub (or ``url``'s server) cannot be reached now, or ``None`` when it can.

    Offline mode (``HF_HUB_OFFLINE``) answers at once; otherwise one TCP connect to the endpoint (or
    the HTTPS proxy), bounded by ``timeout`` seconds, name resolution included. ``reachability``
    caches the answers by ``(host, port)`` across calls."""
    reason = _offline_reason()
    if reason is not None:
        return reason
    host, port = _endpoint(url)
    cache = reachability if reachability is not None else {}
    if (host, port) not in cache:
        cache[host, port] = _reachable(host, port, timeout)
    if not cache[host, port]:
        return f"{host}:{port} is not reachable (checked for {timeout:g}s)"
    return None


def _where_to_get(tag: str, cfg: Any) -> str:
    ways = []
    hub_id = getattr(cfg, "hf_hub_id", None)
    if hub_id:
        ways.append(f"model.safetensors from https://huggingface.co/{hub_id.partition('@')[0]}")
    if getattr(cfg, "url", None):
        ways.append(f"the original file {cfg.url}")
    ways.append(f"timm.create_model('{tag}', pretrained=True) on a machine with network access, saving "
                "its state_dict()")
    return "get " + "; or ".join(ways)


def how_to_pass_local_files(branches: list[str]) -> str:
    """The ``branch_weights=`` alternative for ``branches``, spelt out for an error message."""
    example = ", ".join(f'"{b}": "/path/to/{b}_weights.safetensors"' for b in branches)
    return (f"pass local files: branch_weights={{{example}}} (.safetensors, .pth/.pt/.bin, the original "
            "JAX .npz, or a directory holding one); branches given a file need no network")


@dataclass
class TimmSource:
    """A timm tag some branches load from: its pretrained cfg, the local copy when there is one,
    and why it cannot be had when it cannot."""

    tag: str
    branches: list[str]
    cfg: Any = None
    cached: str | None = None
    problem: str | None = None


def resolve_timm_source(tag: str, branches: list[str], timeout: float, reachability: dict) -> TimmSource:
    """Where timm's ``tag`` would come from (local cache or download), without downloading it.
    ``problem`` says why it cannot be had (unknown tag, offline, unreachable hub)."""
    from timm.models import get_pretrained_cfg

    source = TimmSource(tag, branches, cfg=get_pretrained_cfg(tag))
    if source.cfg is None:
        source.problem = f"timm knows no pretrained weights '{tag}'"
        return source
    source.cached = _cached_file(source.cfg)
    if source.cached:
        return source
    url = None if getattr(source.cfg, "hf_hub_id", None) else getattr(source.cfg, "url", None)
    reason = hub_unreachable_reason(timeout, url=url, reachability=reachability)
    if reason:
        source.problem = f"cannot download timm '{tag}': {reason}; {_where_to_get(tag, source.cfg)}"
    return source


def fetch_timm_weights(source: TimmSource) -> tuple[dict[str, torch.Tensor], str, list[str]]:
    """The tensors of ``source`` (its local copy, else timm's download), the source's description
    for the report and the notes of the file's conversions."""
    if source.cached:
        sd, notes = load_weights_file_with_notes(Path(source.cached))
        return sd, f"timm:{source.tag} (cached {source.cached})", notes
    import timm
    try:
        model = timm.create_model(source.tag, pretrained=True)
    except Exception as e:
        raise HubUnavailableError(
            f"timm could not load the pretrained weights of {', '.join(source.branches)} "
            f"('{source.tag}'): {e}\n{_where_to_get(source.tag, source.cfg)}, then "
            + how_to_pass_local_files(source.branches)) from e
    return {k: v.detach() for k, v in model.state_dict().items()}, f"timm:{source.tag}", []
