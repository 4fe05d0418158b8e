"""The model card (``README.md``) of a shared piip model (:func:`piip.weights.sharing.save_pretrained`).

What a user needs, from the model itself: the variant, its branches and resolutions, the task, the
classes, parameters and MACs in both conventions (:func:`~piip.analysis.complexity`, the function
``piip flops`` prints, on the PIIP backbone; the card names the ``piip flops`` command that gives the
same figures when the backbone is a registered variant), the timm weights each branch starts from and
their licence (timm's pretrained configs, read offline), the training recipe and metrics when known
(given, or read from a ``piip train`` run folder: :func:`card_info_from`), and how to load it.
The card writer registers itself with the sharing format, a lower layer.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from ..config.model import PIIPConfig
from ..models.registry import get_config, resolve_name
from ..version import __version__
from ..weights.checkpoint import model_kind
from ..weights.paper import paper_weights
from ..weights.sharing import CONFIG_NAME, is_shared_config, register_card_writer
from .complexity import complexity

__all__ = ["model_card", "card_figures", "branch_licences", "card_info_from"]

_DETECTORS = {"mask_rcnn": "Mask R-CNN", "cascade_mask_rcnn": "Cascade Mask R-CNN", "dino": "DINO"}
_SHOWN_CLASSES = 20


def _backbone(config: Any) -> PIIPConfig:
    return config if isinstance(config, PIIPConfig) else config.backbone


def _what(kind: str, config: Any) -> tuple[str, str, str]:
    """``(title, task in words, pipeline tag)`` of a model of ``kind``."""
    if kind == "piip":
        if config.task == "cls":
            return "image classifier", "image classification", "image-classification"
        return "dense backbone", "dense features for detection and segmentation (a feature pyramid)", \
            "image-feature-extraction"
    if kind == "detector":
        name = _DETECTORS.get(config.kind, config.kind)
        if config.kind == "mask_rcnn" and not config.masks:
            name = "Faster R-CNN"
        if config.masks:
            return f"{name} detector", f"object detection and instance segmentation ({name})", "object-detection"
        return f"{name} detector", f"object detection ({name})", "object-detection"
    if kind == "segmenter":
        return "UperNet segmenter", "semantic segmentation (UperNet + FCN auxiliary head)", "image-segmentation"
    return f"{kind} model", kind, ""


# -- figures ----------------------------------------------------------------------------------------

def _task_forms(kind: str, backbone: PIIPConfig) -> tuple[str, ...]:
    if backbone.task == "cls":
        return ("cls",)
    return ("seg", "det") if kind == "segmenter" else ("det", "seg")


def flops_arguments(kind: str, backbone: PIIPConfig) -> list[str] | None:
    """The ``piip flops`` arguments that count exactly ``backbone`` (``None``: no command can, e.g. a
    backbone that is not a registered variant's)."""
    try:
        name = resolve_name(backbone.name)
    except ValueError:
        return None
    for task in _task_forms(kind, backbone):
        base = get_config(name, task=task)
        args, overrides = ["flops", name] + (["--task", task] if task != "det" else []), {}
        if base.resolutions != backbone.resolutions:
            overrides["resolutions"] = "/".join(map(str, backbone.resolutions))
            args += ["--resolutions", overrides["resolutions"]]
        if backbone.num_branches > 1 and base.num_interactions != backbone.num_interactions:
            overrides["interactions"] = backbone.num_interactions
            args += ["--interactions", str(backbone.num_interactions)]
        if base.interaction.attn_type != backbone.interaction.attn_type:
            overrides["interaction_attn"] = backbone.interaction.attn_type
            args += ["--attn", backbone.interaction.attn_type]
        try:
            if get_config(name, task=task, **overrides) == backbone:
                return args
        except ValueError:
            continue
    return None


def card_figures(backbone: PIIPConfig) -> dict[str, Any]:
    """``{"paper": result or error text, "actual": ...}``: :func:`complexity` in both conventions."""
    figures = {}
    for convention in ("paper", "actual"):
        try:
            figures[convention] = complexity(backbone, convention)
        except Exception as err:  # e.g. the paper convention of a patch-4 model; an input too small to count
            figures[convention] = " ".join(str(err).split()) or type(err).__name__
    return figures


def _count(value: int, unit: str) -> str:
    scale = {"M": 1e6, "G": 1e9}[unit]
    return f"{value:,} ({value / scale:,.2f} {unit})"


# -- licences ---------------------------------------------------------------------------------------

def branch_licences(backbone: PIIPConfig) -> list[tuple[str, str, str]]:
    """``(weights, timm tag, licence)`` per branch (branch 1 first): the licence in timm's pretrained
    config of the branch's ``pretrained`` tag, ``"unknown"`` when timm has none, ``"none"`` for a
    branch without pretrained weights."""
    from timm.models import get_pretrained_cfg

    rows = []
    for branch in backbone.branches:
        what, tag = paper_weights(branch)
        if branch.pretrained is None:
            rows.append((what, tag, "none" if what.startswith("none") else "unknown"))
            continue
        try:
            licence = getattr(get_pretrained_cfg(branch.pretrained), "license", None)
        except Exception:  # an unknown tag
            licence = None
        rows.append((what, tag, licence or "unknown"))
    return rows


def _licence_summary(rows: list[tuple[str, str, str]]) -> tuple[str, str]:
    """``(the card's license id, the licence line)``."""
    by_licence: dict[str, list[str]] = {}
    for _, tag, licence in rows:
        if licence != "none" and tag not in by_licence.setdefault(licence, []):
            by_licence[licence].append(tag)
    by_licence = {k: v for k, v in by_licence.items() if v}
    if not by_licence:
        return "unknown", ("none: no branch starts from pretrained weights in its config (trained from scratch or "
                           "from local files), so no upstream licence applies")
    parts = "; ".join(f"{licence} ({', '.join(tags)})" for licence, tags in by_licence.items())
    known = [k for k in by_licence if k != "unknown"]
    if len(by_licence) == 1 and known:
        return known[0], parts
    return ("other" if len(known) > 1 else "unknown"), (
        parts + ": the most restrictive terms apply to weights derived from them")


# -- the card ---------------------------------------------------------------------------------------

def _md(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _number(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return _md(value)
    return f"{value:,}" if isinstance(value, int) else f"{value:.4g}"


def _classes_line(count: int | None, names: Sequence[str]) -> str | None:
    if count is None:
        return None
    if not names:
        return f"{count} classes (names not recorded)"
    shown = ", ".join(names[:_SHOWN_CLASSES])
    more = f", … ({len(names) - _SHOWN_CLASSES} more; all in {CONFIG_NAME})" if len(names) > _SHOWN_CLASSES else ""
    return f"{count} classes: {shown}{more}"


def _input_line(kind: str, config: Any, backbone: PIIPConfig) -> str:
    size = backbone.input_size
    if kind == "detector":
        low, high, divisible = config.resize
        return (f"0-1 RGB images of any size, resized inside (short side {low}, long side at most {high}, padded to "
                f"multiples of {divisible}), normalised with mean {list(config.image_mean)}, "
                f"std {list(config.image_std)}")
    if kind == "segmenter":
        fit = f"resized to fit {config.test_scale[0]}x{config.test_scale[1]}, " if config.test_scale else ""
        how = (f"{config.crop_size}-pixel windows, stride {config.stride}" if config.inference == "slide"
               else "whole image")
        return (f"0-1 RGB images, {fit}{how}; normalised inside with mean {list(config.image_mean)}, "
                f"std {list(config.image_std)}")
    if backbone.task == "cls":
        return f"{size}x{size} normalised RGB images (batch, 3, {size}, {size})"
    return f"{size}x{size} normalised RGB images (the finest branch's resolution)"


def _output_line(kind: str, config: Any, backbone: PIIPConfig) -> str:
    if kind == "detector":
        masks = ", masks" if config.masks else ""
        return f"per image: boxes (x1 y1 x2 y2), labels (1-based), scores{masks}"
    if kind == "segmenter":
        return f"logits (batch, {config.num_classes}, H, W)"
    if backbone.task == "cls":
        return f"logits (batch, {backbone.num_classes})"
    strides = "/".join(str(4 * 2 ** level) for level in backbone.fpn_levels)
    return f"feature maps at strides {strides}, {backbone.out_channels} channels"


def _branch_table(backbone: PIIPConfig, licences: list[tuple[str, str, str]]) -> list[str]:
    rows = ["| Branch | Width | Depth | Heads | Patch | Resolution | Initial weights (timm tag) | Licence |",
            "|---|---:|---:|---:|---:|---:|---|---|"]
    for i, (branch, (what, tag, licence)) in enumerate(zip(backbone.branches, licences), 1):
        weights = "none" if branch.pretrained is None and what.startswith("none") else f"{_md(what)}: {_md(tag)}"
        rows.append(f"| {i} | {branch.embed_dim} | {branch.depth} | {branch.num_heads} | {branch.patch_size} | "
                    f"{branch.resolution} | {weights} | {licence} |")
    return rows


def _figures_section(kind: str, model: nn.Module, backbone: PIIPConfig) -> list[str]:
    figures = card_figures(backbone)
    size = backbone.input_size
    cells = {c: (_count(r.params, "M"), _count(r.macs, "G")) if not isinstance(r, str) else ("n/a", "n/a")
             for c, r in figures.items()}
    lines = ["| | paper convention | actual convention |", "|---|---:|---:|",
             f"| Parameters | {cells['paper'][0]} | {cells['actual'][0]} |",
             f"| MACs, one {size}x{size} image | {cells['paper'][1]} | {cells['actual'][1]} |", ""]
    notes = ["*paper*: the backbone as the PIIP paper counted it (the authors' classification proxy; "
             "multiply-accumulates)", "*actual*: the backbone as built here, traced with FlopCounterMode"]
    actual = figures["actual"]
    if not isinstance(actual, str) and backbone.task == "det" and actual.fpn_macs:
        notes[1] += f", simple feature pyramid included ({actual.fpn_macs:,} MACs of it)"
    for convention, result in figures.items():
        if isinstance(result, str):
            notes.append(f"no {convention}-convention figure: {_md(result)}")
    lines += ["; ".join(notes) + ".", ""]
    args = flops_arguments(kind, backbone)
    scope = "the PIIP backbone" if kind != "piip" else "the model"
    if args:
        command = " ".join(args)
        commands = [f"`piip {command}{' --convention actual' if c == 'actual' else ''} --json`"
                    for c, r in figures.items() if not isinstance(r, str)]
        lines.append(f"The figures are {scope}'s, exactly what {' and '.join(commands)} print"
                     f"{'s' if len(commands) == 1 else ''}.")
    else:
        lines.append(f"The figures are {scope}'s, counted by `piip.analysis.complexity` (what `piip flops` runs) "
                     "on this model's backbone config, which no registered variant's `piip flops` options give.")
    if kind != "piip":
        whole = sum(p.numel() for p in model.parameters())
        parts = "backbone, neck and heads" if kind == "detector" else "backbone and heads"
        lines += ["", f"The whole {_what(kind, model.config)[0]} ({parts}) has {whole:,} parameters "
                      f"({whole / 1e6:,.2f} M)."]
    return lines


def _training_section(recipe: Any, metrics: Mapping[str, Any] | None) -> list[str]:
    lines = ["## Training", ""]
    if not recipe and not metrics:
        return lines + ["Not recorded. `save_pretrained(..., recipe=..., metrics={...})` or "
                        "`piip share RUN_FOLDER OUT_DIR` (a `piip train` run) fills this in."]
    if isinstance(recipe, Mapping):
        lines += [f"- **{_md(k)}**: {_md(v)}" for k, v in recipe.items()]
    elif recipe:
        lines.append(str(recipe).strip())
    if metrics:
        lines += ["", "### Metrics", "", "| Metric | Value |", "|---|---:|"]
        lines += [f"| {_md(k)} | {_number(v)} |" for k, v in metrics.items()]
    return lines


def model_card(model: nn.Module, *, class_names: Sequence[str] = (), recipe: str | Mapping[str, Any] | None = None,
               metrics: Mapping[str, Any] | None = None, license: str | None = None,
               repo_id: str | None = None) -> str:
    """The Markdown model card of ``model`` (any kind of piip model; the meta device is fine)."""
    config = model.config
    kind = model_kind(config)
    if kind is None:
        raise TypeError(f"a model card needs a piip model, got {type(model).__name__}")
    backbone = _backbone(config)
    title, task, pipeline = _what(kind, config)
    licences = branch_licences(backbone)
    card_license, licence_line = _licence_summary(licences)
    card_license = license or card_license
    variant = backbone.name or "custom"
    count = None if kind == "piip" and backbone.task == "det" else (
        backbone.num_classes if kind == "piip" else config.num_classes)
    source = repo_id or "path/to/this/folder"
    attention = {"deform": "deformable"}.get(backbone.interaction.attn_type, backbone.interaction.attn_type)
    interactions = (f", {backbone.num_interactions} interactions ({attention} cross-attention)"
                    if backbone.num_branches > 1 else " (a single-branch ViT)")

    network = ("a Parameter-Inverted Image Pyramid network (PIIP, NeurIPS 2024)" if backbone.num_branches > 1
               else "a single-branch ViT (a baseline of the PIIP paper)")
    idea = (" Its bigger branches see smaller images, and the branches exchange information through "
            "cross-branch interactions." if backbone.num_branches > 1 else "")
    lines = ["---", "library_name: piip", f"license: {card_license}", f"pipeline_tag: {pipeline}" if pipeline else None,
             "tags:", *(f"- {t}" for t in (pipeline, "piip", "vision") if t), "---", "",
             f"# {variant}: {'PIIP ' if backbone.num_branches > 1 else ''}{title}", "",
             f"{'An' if title[0] in 'aeiouAEIOU' else 'A'} {title} built on {network}, saved with piip {__version__}.{idea}",
             "",
             "## Load it", "", "```python", "import piip",
             f'model = piip.from_pretrained("{source}")  # a hub repo id or a local folder', "model.eval()", "```", ""]
    if kind != "piip" or backbone.task == "cls":
        lines += ["`piip predict --checkpoint model.safetensors IMAGES...` draws its predictions.", ""]
    lines += ["## Model", "", "| | |", "|---|---|",
              f"| Variant | `{variant}`: {backbone.num_branches} branch{'es' if backbone.num_branches > 1 else ''}"
              f"{interactions} |",
              f"| Resolutions | {'/'.join(map(str, backbone.resolutions))} (branch inputs, finest first) |",
              f"| Task | {task} |"]
    classes = _classes_line(count, class_names)
    if classes:
        lines.append(f"| Classes | {_md(classes)} |")
    lines += [f"| Input | {_input_line(kind, config, backbone)} |",
              f"| Output | {_output_line(kind, config, backbone)} |",
              f"| Kind | `{kind}` (piip {__version__}) |", "", "### Branches", "", *_branch_table(backbone, licences), "",
              "The initial weights are the config's `pretrained` timm tags: what each branch loads with "
              "`pretrained=True`.", "", "## Parameters and MACs", "", *_figures_section(kind, model, backbone), "",
              *_training_section(recipe, metrics), "", "## Licence", "",
              f"**Licence of the branch weights:** {licence_line}.", "",
              f"This card's `license` field: {card_license}. piip itself is MIT-licensed.", "", "## Files", "",
              "- `model.safetensors`: the weights, with the model's kind and config in the header (a piip checkpoint: "
              "`piip.load` reads it too)",
              f"- `{CONFIG_NAME}`: the same kind and config as JSON, and the class names; checked against the weights "
              "when loaded",
              "- `README.md`: this card"]
    return "\n".join(line for line in lines if line is not None) + "\n"


# -- what a training run recorded -------------------------------------------------------------------

def _read(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _recipe_of_run(config: Mapping[str, Any], summary: Mapping[str, Any] | None) -> dict[str, str]:
    task, model = config.get("task"), config.get("model") or {}
    data, optim, run = config.get("data") or {}, config.get("optim") or {}, config.get("run") or {}
    recipe = {"Trained with": f"`piip train {task}` (run config in the run folder's {CONFIG_NAME})"}
    dataset = data.get("dataset") or data.get("root")
    if dataset:
        recipe["Data"] = str(dataset) + (f" ({data['image_size']} px)" if data.get("image_size") else "")
    if data.get("mean") and data.get("std"):
        recipe["Input normalisation"] = f"mean {data['mean']}, std {data['std']}"
    length = f"{optim['steps']} steps" if optim.get("steps") else f"{optim.get('epochs')} epochs"
    batch = optim.get("batch_size")
    accum = optim.get("accum_steps") or 1
    recipe["Schedule"] = (f"{length}, batch {batch}" + (f" ({accum} accumulation steps)" if accum > 1 else "")
                          + f", {optim.get('optimizer')} lr {optim.get('lr')}, weight decay {optim.get('weight_decay')}, "
                          f"{optim.get('schedule')} schedule")
    if optim.get("layer_decay"):
        recipe["Schedule"] += f", layer decay {optim['layer_decay']}"
    if model.get("checkpoint"):
        recipe["Initialisation"] = f"from the checkpoint {model['checkpoint']}"
    elif model.get("branch_weights"):
        recipe["Initialisation"] = f"branches from local files {model['branch_weights']}"
    elif model.get("pretrained"):
        recipe["Initialisation"] = "branches from their timm weights (pretrained=True)"
    else:
        recipe["Initialisation"] = "random (trained from scratch)"
    recipe["Precision"] = str(run.get("amp", "fp32")) + (f", EMA {run['ema_decay']}" if run.get("ema_decay") else "")
    recipe["Seed"] = str(run.get("seed"))
    if summary:
        minutes = (summary.get("train_time_s") or 0) / 60
        recipe["Trained"] = (f"{summary.get('step')} optimiser steps, {summary.get('epoch')} epochs, "
                             f"{minutes:.1f} min on {summary.get('world_size', 1)} process(es)")
    return recipe


def _metrics_of_run(task: str | None, summary: Mapping[str, Any] | None) -> dict[str, Any]:
    if not summary:
        return {}
    metrics = {k: v for k, v in (summary.get("eval") or {}).items() if isinstance(v, (int, float))}
    if summary.get("best") is not None:
        from ..engine.task import get_task_class

        try:
            metric = get_task_class(task).metric
        except ValueError:
            metric = "the task's metric"
        metrics[f"best {metric} during training"] = summary["best"]
    return metrics


def card_info_from(source: str | os.PathLike) -> dict[str, Any]:
    """The card's ``recipe`` and ``metrics`` recorded in ``source``: a ``piip train`` run folder (its
    ``config.json`` and ``summary.json``) or a folder written by ``save_pretrained`` (its
    ``config.json``); ``{}`` for anything else (a checkpoint file, a hub repo)."""
    folder = Path(source)
    record = _read(folder / CONFIG_NAME) if folder.is_dir() else None
    if not isinstance(record, dict):
        return {}
    if is_shared_config(record):  # save_pretrained's
        return {k: record[k] for k in ("recipe", "metrics") if record.get(k)}
    if "optim" not in record or "task" not in record:
        return {}
    summary = _read(folder / "summary.json")
    summary = summary if isinstance(summary, dict) else None
    info: dict[str, Any] = {"recipe": _recipe_of_run(record, summary)}
    metrics = _metrics_of_run(record.get("task"), summary)
    if metrics:
        info["metrics"] = metrics
    return info


register_card_writer(model_card)
