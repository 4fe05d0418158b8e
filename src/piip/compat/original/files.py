"""The authors' checkpoint files: every layout their training wrote, and conversion to piip's format."""
from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

import torch

from ...models.piip import PIIP
from ...weights.checkpoint import CheckpointError, save_checkpoint
from ...weights.io import read_torch_file, unwrap_state_dict
from .configs import _check_task, _unwrap_kwargs, build
from ...models.registry import get_config
from ...tasks import get_task_class, task_classes
from ...tasks.base import head_settings
from .state_dict import convert_state_dict

__all__ = ["load_original_checkpoint", "convert_checkpoint"]

#: how each container key names the training code that wrote it
_LAYOUTS = {"state_dict": "mmdet", "module": "deepspeed", "model": "classification",
            "model_ema": "classification-ema"}


def _read_safetensors(path: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors.torch import load_file
    try:
        tensors = load_file(path, device="cpu")
    except Exception as err:
        raise CheckpointError(f"cannot read {path!r} ({os.path.getsize(path)} bytes) as safetensors: "
                              f"it is corrupt or truncated ({type(err).__name__}: {err})") from err
    if any(k.startswith("state_dict/") for k in tensors):
        # golden-fixture layout: state_dict/<official key> next to input/output/intermediate tensors
        state = {k[len("state_dict/"):]: v for k, v in tensors.items() if k.startswith("state_dict/")}
        ignored = sorted(k for k in tensors if not k.startswith("state_dict/"))
        return state, {"layout": "fixture", "ignored_tensors": ignored}
    return tensors, {"layout": "safetensors"}


def _deepspeed_file(path: str) -> str:
    """A DeepSpeed checkpoint *directory* -> its model-states file (``latest`` names the tag)."""
    if not os.path.isdir(path):
        return path
    tag_file = os.path.join(path, "latest")
    if os.path.isfile(tag_file):
        with open(tag_file) as f:
            path = os.path.join(path, f.read().strip())
    candidate = os.path.join(path, "mp_rank_00_model_states.pt")
    if os.path.isfile(candidate):
        return candidate
    raise FileNotFoundError(f"{path!r} is a directory without a DeepSpeed 'mp_rank_00_model_states.pt'")



def load_original_checkpoint(path_or_dict: str | os.PathLike | Mapping[str, Any], *, use_ema: bool = False
                             ) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """Read one of the authors' checkpoints.

    Args:
        path_or_dict: a ``.pth``/``.pt`` file (MMDetection, DeepSpeed, classification or a plain
            state dict), a DeepSpeed checkpoint directory, a ``.safetensors`` file (plain, or a golden fixture with ``state_dict/``
            keys), or an already-loaded object.
        use_ema: read a classification checkpoint's ``model_ema`` instead of ``model``.

    Returns ``(backbone_state_dict, extra, meta)``: the backbone tensors under their own names (the
    ``backbone.`` and DDP ``module.`` prefixes stripped), every other tensor grouped by its top-level
    prefix (``{"neck": {...}, "rpn_head": {...}, "roi_head": {...}}`` for MMDetection files), and a
    description of what was found (``layout``, ``top_level_keys``, ``has_ema``, ``non_tensor_keys``).
    """
    meta: dict[str, Any] = {}
    if isinstance(path_or_dict, Mapping):
        obj = path_or_dict
        meta["source"] = "<dict>"
    else:
        path = _deepspeed_file(os.fspath(path_or_dict))
        if not os.path.isfile(path):
            raise FileNotFoundError(f"checkpoint {path!r} does not exist")
        meta["source"] = path
        if path.endswith(".safetensors"):
            obj, extra_meta = _read_safetensors(path)
            meta.update(extra_meta)
        else:
            obj = read_torch_file(path)
    tensors, found = unwrap_state_dict(obj, use_ema=use_ema)
    if meta.get("layout") != "fixture":
        meta["layout"] = "+".join(_LAYOUTS.get(c, c) for c in found["containers"]) or "state_dict"
    meta.update({k: v for k, v in found.items() if k != "containers"})
    if tensors and all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
        meta["stripped_prefix"] = "module."
    backbone: dict[str, torch.Tensor] = {}
    extra: dict[str, dict[str, torch.Tensor]] = {}
    if any(k.startswith("backbone.") for k in tensors):
        for key, value in tensors.items():
            if key.startswith("backbone."):
                backbone[key[len("backbone."):]] = value
            else:
                prefix, _, rest = key.partition(".")
                extra.setdefault(prefix if rest else "_root", {})[rest or prefix] = value
    else:
        backbone = tensors
    meta["num_backbone_tensors"] = len(backbone)
    meta["extra_prefixes"] = {p: len(v) for p, v in extra.items()}
    return backbone, extra, meta


def _infer_task(state: Mapping[str, torch.Tensor]) -> str:
    keys = list(state)
    if any(k.startswith(("fpn1.", "fpn2.")) or re.match(r"merge_branch\d+\.\d+\.weight$", k) and
           state[k].dim() == 4 for k in keys):
        return "det"
    if any(re.match(r"branch\d+\.head\.", k) or k.startswith(("cls_head.", "cls_norm.")) for k in keys):
        return "cls"
    raise ValueError("cannot tell from the checkpoint whether it is a detection, segmentation or classification "
                     "backbone; pass task='det', 'seg' or 'cls'")


def _resolve_config(config: str | os.PathLike | Mapping[str, Any]) -> tuple[Mapping[str, Any] | None, str | None, str]:
    """``(authors' kwargs or None, task hint, description)`` for a kwargs dict/JSON or a variant name."""
    if isinstance(config, Mapping):
        data, label = config, "<dict>"
    elif isinstance(config, (str, os.PathLike)) and os.path.isfile(os.fspath(config)):
        label = os.fspath(config)
        try:
            with open(label) as f:
                data = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{label!r} is not valid JSON: {err}") from err
        if not isinstance(data, Mapping):
            raise ValueError(f"{label!r} holds a JSON {type(data).__name__}, not the authors' backbone kwargs "
                             "(a mapping, e.g. {\"branch1\": {...}, ...}) or a fixture JSON with \"kwargs\"")
    else:
        return None, None, str(config)
    task = None
    if isinstance(data.get("official"), Mapping):
        task = data["official"].get("task")
    kwargs = _unwrap_kwargs(data)
    if task is None:
        first = kwargs.get("branch1", {})
        if isinstance(first, Mapping):  # the segmentation configs give their branches both sizes
            task = ("seg" if "real_size" in first else "cls") if "img_size" in first else \
                "det" if "real_size" in first else None
        if "branch1" not in kwargs and "img_size" in kwargs and kwargs.get("with_fpn"):
            task = "seg"  # a segmentation baseline is sized by img_size; the detection ones by the input
        if "separate_head" in kwargs or "use_cls_head" in kwargs:
            task = "cls"
    return kwargs, task, label


def convert_checkpoint(src_path: str | os.PathLike, config: str | os.PathLike | Mapping[str, Any],
                       out_path: str | os.PathLike, *, task: str | None = None,
                       use_ema: bool = False, heads: Mapping[str, Any] | None = None,
                       detector: Mapping[str, Any] | None = None,
                       segmenter: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Convert one of the authors' checkpoint files to piip's safetensors format.

    Args:
        src_path: their file (see :func:`load_original_checkpoint` for the layouts read).
        config: the authors' backbone kwargs (a dict, or a JSON file holding them or a fixture JSON
            with a ``"kwargs"`` field), or the name of a registered piip variant whose config
            matches the checkpoint.
        out_path: the ``.safetensors`` file to write (:func:`piip.weights.save_checkpoint`). An
            MMDetection Mask/Faster R-CNN file becomes a complete detector (backbone, FPN, RPN and
            RoI heads mapped onto torchvision's modules, see :mod:`piip.tasks.detection.authors_heads`),
            an MMDetection DINO file a complete DINO detector (neck and head renamed onto piip's
            DINO, see :mod:`piip.tasks.detection.authors_dino_heads`), both with COCO's 80 class
            names and ids when they have 80 classes; an MMSegmentation UperNet file a complete
            segmenter (see :mod:`piip.tasks.segmentation.authors_heads`; ADE20K's class names when
            it has 150 classes): each task recognises and converts its own heads; other neck/head
            tensors are kept under their own prefixes next to the backbone. The model config is
            also written next to it as ``<out>.json``.
        task: ``"det"``, ``"seg"`` or ``"cls"``; inferred from the checkpoint's heads, the config
            or the backbone tensors when omitted.
        use_ema: convert a classification checkpoint's EMA weights.
        heads: settings of the task model built around converted heads (``piip convert --head
            KEY=VALUE``), checked against its config's fields: a detector's
            :class:`~piip.tasks.detection.DetectorConfig` fields (e.g. ``{"size_divisible": 64}``
            for the ViT baselines, which the authors padded to 64; a DINO file's test resize and
            normalisation, which the file does not hold), a segmenter's
            :class:`~piip.tasks.segmentation.SegmenterConfig` fields (the defaults are the authors'
            ADE20K test: slide 512 / 341 at (2048, 512)).
        detector, segmenter: the former names of ``heads`` for a detector / a segmenter
            (deprecated; kept for one release).

    Returns a summary dict (paths, task, layout, model kind, tensor/parameter counts, kept extra prefixes).
    """
    backbone, extra, meta = load_original_checkpoint(src_path, use_ema=use_ema)
    kwargs, task_hint, label = _resolve_config(config)
    heads_of = next((t.name for t in task_classes() if t.has_authors_heads(extra)), None)
    task = task or heads_of or task_hint or _infer_task(backbone)
    _check_task(task)
    model = build(kwargs, task) if kwargs is not None else PIIP(get_config(label, task=task))
    try:
        converted = convert_state_dict(backbone, model)
    except CheckpointError as err:
        if kwargs is not None:
            raise
        hint = (" — the registered variant describes the paper's network; the authors' code may have "
                "built another one (their 4-branch detection class makes branch 4 a copy of branch 3; "
                "their classification checkpoints size the position embeddings for img_size and read "
                "the first patch token): pass the authors' kwargs (a JSON file) as the config instead")
        raise CheckpointError(str(err) + hint, mismatched=err.mismatched, missing=err.missing,
                              unexpected=err.unexpected) from None
    model.load_state_dict(converted, strict=True)
    model.eval()
    metadata = {"source": os.path.basename(os.fspath(src_path)), "source_layout": str(meta.get("layout")),
                "converted_by": "piip.compat.original.convert_checkpoint"}
    if kwargs is not None:
        metadata["original_kwargs"] = json.dumps(kwargs, sort_keys=True, default=str)
        metadata["original_class"] = model.original_spec["class"]
    else:
        metadata["variant"] = label
    if use_ema:
        metadata["weights"] = "model_ema"
    num_tensors = len(converted)
    settings = heads if heads is not None else (detector if task == "det" else segmenter)  # deprecated names
    if heads_of == task:  # the task's whole model: backbone and converted heads
        task_class = get_task_class(task)
        settings = head_settings(dict(settings or {}), task_class.model_config, ("backbone",), f"{task} model",
                                 where="heads")
        model, extra, num_tensors = task_class.with_authors_heads(model, converted, extra, settings)
    elif settings:
        raise ValueError(f"heads settings {sorted(settings)} given, but {os.fspath(src_path)} holds no {task} heads "
                         "to build a model around (a backbone-only checkpoint)")
    out = save_checkpoint(model, out_path, extra=extra, metadata=metadata)
    # the config also travels inside the safetensors header; the sidecar is for people and tools
    config_json = os.path.splitext(os.fspath(out))[0] + ".json"
    with open(config_json, "w") as f:
        f.write(model.config.to_json() + "\n")
    return {
        "source": os.fspath(src_path),
        "output": out,
        "config_json": config_json,
        "config": label,
        "task": task,
        "layout": meta.get("layout"),
        "original_class": metadata.get("original_class"),
        "model": type(model).__name__,
        "num_branches": (model.config.backbone if hasattr(model.config, "backbone") else model.config).num_branches,
        "num_tensors": num_tensors,
        "num_params": sum(p.numel() for p in model.parameters()),
        "extra": {prefix: len(tensors) for prefix, tensors in extra.items()},
        "ema": use_ema,
        "has_ema": bool(meta.get("has_ema", False)),
        "ignored_tensors": len(meta.get("ignored_tensors", [])),
    }
