"""Compatibility with the authors' code (OpenGVLab/PIIP): their configs, their state dicts, their files.

Three layers, each usable alone:

* **configs** — :func:`to_piip_config` / :func:`build` translate the keyword dictionary of one of
  their backbone classes (``PIIPTwoBranch`` / ``PIIPThreeBranch`` / ``PIIPFourBranch`` of the
  MMDetection copy for ``task="det"``, the classification ``PIIPThreeBranch`` & co. for
  ``task="cls"``) into a :class:`~piip.models.config.PIIPConfig` whose network computes what
  theirs computes. Everything is derived from the kwargs: widths, depths, heads, block groups,
  per-layer windows, norms, qk-norm, MLP activation, layer scale, position-embedding grids, and the
  branch class their code would pick (``'deit'`` in the ``pretrained`` path -> ``vit_models``,
  anything else -> ``InternViT6B``; ``model_type`` in the classification code).
* **state dicts** — :func:`convert_state_dict` renames their keys to ours (``gamma_1`` ->
  ``ls1.gamma``, ``interaction_units_23`` -> ``units.1``, ``branch2to1_injector`` ->
  ``inject_b_to_a``, ``ffn.dwconv.dwconv`` -> ``ffn.dwconv``, ``merge_branch{i}`` ->
  ``merge.projections.{i-1}``, the scalars ``w1..wn`` -> one ``merge.weights`` vector, ``fpn1/2``
  -> ``fpn.fpn1/2``, ...). The result loads with ``strict=True`` or the error says why (first key
  whose shape differs with both shapes; missing keys; keys it could not map — never dropped).
* **files** — :func:`load_original_checkpoint` reads the layouts their training wrote: MMDetection
  (``state_dict`` with ``backbone.`` next to ``neck.``/``rpn_head.``/``roi_head.``/``bbox_head.``),
  DeepSpeed (``module``), classification (``model`` plus the EMA copy ``model_ema``), plain state
  dicts and the golden-fixture safetensors files. Pickles are read with ``weights_only=True`` and,
  when they hold other objects (configs, ``argparse.Namespace``, numpy values), with a restricted
  unpickler that replaces every non-tensor class by an inert placeholder: no code from the file runs.
  :func:`convert_checkpoint` does the whole trip to piip's own safetensors format.

Quirks reproduced (reference §9): the 4-branch *detection* class builds branch 4 with branch 3's
kwargs (``vit_models(**branch3)``), so its released checkpoints hold a ViT-S-wide branch 4; the
classification heads read the first *patch* token; class tokens get no position embedding;
``vit_models`` windows pad the tokens before ``qkv`` on the flash path and the ``qkv`` output on the
non-flash path.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import types
import warnings
from collections.abc import Mapping
from typing import Any

import torch

from ..models.config import BranchConfig, InteractionConfig, PIIPConfig
from ..models.piip import PIIP
from ..weights.checkpoint import CheckpointError, check_state_dict, save_checkpoint

__all__ = [
    "build",
    "to_piip_config",
    "branch_kwargs",
    "original_class_name",
    "convert_state_dict",
    "map_key",
    "load_original_checkpoint",
    "convert_checkpoint",
    "CheckpointError",
]

# -------------------------------------------------------------------------------------------------
# configs
# -------------------------------------------------------------------------------------------------

# Constructor defaults of the authors' classes, used only for keys a config leaves out (all shipped
# configs set the architecture explicitly). Interaction defaults: reference §2.4 ("the code defaults
# differ: heads 6, ratio 1.0, cffn False, 'normal', idpr 0.3").
_INTERACTION_DEFAULTS = dict(n_points=4, deform_num_heads=6, deform_ratio=1.0, with_cffn=False,
                             cffn_ratio=0.25, interact_attn_type="normal",
                             interaction_drop_path_rate=0.3, interaction_proj=True)
# vit_models (deit.py): qkv_bias False and init_scale 1e-4 are the code defaults (reference §2.2).
_VIT_MODELS_DEFAULTS = dict(patch_size=16, pretrain_img_size=224, pretrain_patch_size=16,
                            mlp_ratio=4.0, qkv_bias=False, init_scale=1e-4, drop_path_rate=0.0,
                            use_flash_attn=True, window_attn=False, window_size=14)
# InternViT6B (internvit_6b.py): the class is InternViT-6B's, so its own defaults are 6B-like.
_INTERNVIT_DEFAULTS = dict(patch_size=16, pretrain_img_size=224, pretrain_patch_size=14,
                           mlp_ratio=4.0, qkv_bias=False, qk_normalization=True, init_values=0.1,
                           norm_layer_type="RMSNorm", mlp_type="regular", drop_path_rate=0.0,
                           window_attn=False, window_size=14)
_REQUIRED_ARCH = ("embed_dim", "depth", "num_heads")
_CLASS_NAMES = {2: "PIIPTwoBranch", 3: "PIIPThreeBranch", 4: "PIIPFourBranch"}
_UNSUPPORTED_BRANCHES = {"beit": "BEiT", "perceiver": "UnifiedBertEncoder", "convnext": "ConvNextHFWrapper"}


def _unwrap_kwargs(config: Mapping[str, Any]) -> Mapping[str, Any]:
    """Accept the kwargs themselves or a fixture-style JSON object with a ``"kwargs"`` field."""
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a dict of the authors' backbone kwargs, got {type(config).__name__}")
    if "kwargs" in config and isinstance(config["kwargs"], Mapping) and "branch1" not in config:
        return config["kwargs"]
    return config


def _check_task(task: str) -> str:
    if task not in ("det", "cls"):
        raise ValueError(f"task must be 'det' (MMDetection backbone) or 'cls' (classification model), "
                         f"got {task!r}")
    return task


def branch_kwargs(config: Mapping[str, Any], task: str) -> list[dict[str, Any]]:
    """The kwargs each branch is *built* from, branch 1 first.

    For the 4-branch detection class this reproduces its bug: branch 4 is ``vit_models(**branch3)``
    (branch 3's architecture and weights), while the wrapper still reads branch 4's own
    ``real_size`` (its input resolution) and ``interaction_indexes``.
    """
    config = _unwrap_kwargs(config)
    _check_task(task)
    found = []
    i = 1
    while f"branch{i}" in config:
        value = config[f"branch{i}"]
        if not isinstance(value, Mapping):
            raise TypeError(f"config['branch{i}'] must be a dict of branch kwargs, got {type(value).__name__}")
        found.append(dict(value))
        i += 1
    extra = sorted(k for k in config if re.fullmatch(r"branch\d+", k) and k not in
                   {f"branch{j}" for j in range(1, i)})
    if extra:
        raise ValueError(f"branch keys must be consecutive from branch1; found {extra} after branch{i - 1}")
    if len(found) not in _CLASS_NAMES:
        raise ValueError(f"the authors' PIIP classes have 2, 3 or 4 branches; the config has {len(found)} "
                         "(keys branch1, branch2, ...)")
    if task == "det" and len(found) == 4:
        own = found[3]
        built = dict(found[2])
        for key in ("real_size", "interaction_indexes"):
            if key in own:
                built[key] = own[key]
        built["_built_from"] = "branch3"
        found[3] = built
    return found


def original_class_name(kwargs: Mapping[str, Any], task: str, index: int | None = None) -> str:
    """Which branch class the authors' code builds from a branch's kwargs.

    Detection: ``'deit'`` in ``pretrained`` -> ``vit_models``; ``'beit'``/``'perceiver'``/
    ``'convnext'`` -> classes piip does not implement; anything else -> ``InternViT6B``. The 4-branch
    detection class builds branch 4 as ``vit_models`` unconditionally. Classification: the branch's
    (or the top level's) ``model_type`` — ``"deit"`` (the default) or ``"augreg"`` (InternViT6B).
    """
    if kwargs.get("_built_from") == "branch3":
        return "vit_models"
    if task == "cls":
        model_type = str(kwargs.get("model_type") or "deit").lower()
        if model_type == "deit":
            return "vit_models"
        if model_type in ("augreg", "internvit", "intern_vit_6b", "internvit6b"):
            return "InternViT6B"
        raise NotImplementedError(f"classification model_type={model_type!r} is not supported "
                                  "(piip reproduces 'deit' and 'augreg' branches)")
    pretrained = str(kwargs.get("pretrained") or "")
    if "deit" in pretrained:
        return "vit_models"
    for marker, name in _UNSUPPORTED_BRANCHES.items():
        if marker in pretrained:
            where = f"branch{index}" if index else "a branch"
            raise NotImplementedError(
                f"{where} has pretrained={pretrained!r}, for which the authors' code builds {name}; "
                "piip implements ViT branches only (vit_models and InternViT6B)")
    return "InternViT6B"


def _per_layer(value: Any, depth: int, name: str, where: str) -> list[Any]:
    if isinstance(value, (list, tuple)):
        if len(value) != depth:
            raise ValueError(f"{where}: {name} lists {len(value)} entries for {depth} blocks")
        return list(value)
    return [value] * depth


def _groups(value: Any, where: str) -> tuple[tuple[int, int], ...]:
    try:
        return tuple((int(a), int(b)) for a, b in value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: interaction_indexes must be a list of [start, end] pairs, "
                         f"got {value!r}") from None


def _branch_config(index: int, kwargs: dict[str, Any], task: str, interactions: bool) -> BranchConfig:
    where = f"branch{index}"
    cls_name = original_class_name(kwargs, task, index)
    internvit = cls_name == "InternViT6B"
    arch = {**(_INTERNVIT_DEFAULTS if internvit else _VIT_MODELS_DEFAULTS), **kwargs}
    missing = [k for k in _REQUIRED_ARCH if k not in kwargs]
    if missing:
        raise ValueError(f"{where} kwargs lack {missing}: give the branch's architecture explicitly")
    size_key = "img_size" if task == "cls" else "real_size"
    if size_key not in kwargs:
        raise ValueError(f"{where} kwargs lack {size_key!r} (the branch's input resolution)")
    depth, patch = int(arch["depth"]), int(arch["patch_size"])
    resolution = int(kwargs[size_key])

    windows = _per_layer(arch.get("window_attn", False), depth, "window_attn", where)
    sizes = _per_layer(arch.get("window_size", 14), depth, "window_size", where)
    windowed = tuple(i for i in range(depth) if windows[i])
    window_sizes = sorted({int(sizes[i]) for i in windowed})
    if len(window_sizes) > 1:
        raise NotImplementedError(
            f"{where} uses several window sizes {window_sizes} across its blocks; piip branches use one "
            "window size per branch")
    window_padding = "before_qkv"
    if windowed and not internvit and not arch.get("use_flash_attn", True):
        # vit_models' non-flash WindowedAttention pads the qkv output (InternViT6B pads x in both paths)
        window_padding = "after_qkv"

    if internvit:
        norm = str(arch.get("norm_layer_type", "RMSNorm")).lower()
        norm_layer = {"rmsnorm": "rmsnorm", "rms": "rmsnorm", "layernorm": "layernorm", "ln": "layernorm"}.get(norm)
        if norm_layer is None:
            raise NotImplementedError(f"{where}: norm_layer_type={arch['norm_layer_type']!r} is not supported")
        init_values = arch.get("init_values")
        init_values = float(init_values) if init_values else None
        qk_norm = bool(arch.get("qk_normalization", False))
    else:
        norm_layer = "layernorm"
        # vit_models always has gamma_1/gamma_2 (initialised to init_scale); the value is overwritten
        # by any checkpoint, only the parameter's existence matters here.
        init_values = float(arch.get("init_scale") or 1.0)
        qk_norm = False
    mlp_type = str(arch.get("mlp_type", arch.get("Mlp_block", "regular")) or "regular").lower()
    act_layer = "gelu_tanh" if mlp_type in ("fused_mlp", "fusedmlp") else "gelu"

    class_token = task == "cls" and bool(kwargs.get("use_cls_token", False))
    if task == "cls":
        # the classification branches size the position embedding for img_size and add it as is
        pretrain_img_size = resolution
    else:
        pretrain_img_size = int(arch["pretrain_img_size"])
    groups = _groups(kwargs.get("interaction_indexes", ()), where) if interactions else ()
    return BranchConfig(
        embed_dim=int(arch["embed_dim"]),
        depth=depth,
        num_heads=int(arch["num_heads"]),
        resolution=resolution,
        interaction_indexes=groups,
        patch_size=patch,
        pretrain_img_size=pretrain_img_size,
        pretrain_patch_size=int(arch.get("pretrain_patch_size", patch)),
        mlp_ratio=float(arch["mlp_ratio"]),
        qkv_bias=bool(arch["qkv_bias"]),
        qk_norm=qk_norm,
        norm_layer=norm_layer,
        act_layer=act_layer,
        init_values=init_values,
        class_token=class_token,
        pos_embed_class_row=internvit,
        window_size=window_sizes[0] if window_sizes else int(sizes[0]) if sizes else 14,
        window_block_indexes=windowed,
        window_padding=window_padding,
        drop_path_rate=float(arch.get("drop_path_rate") or 0.0),
        drop_path_schedule="linear" if internvit else "constant",
        pretrained=None,
        family="internvit" if internvit else "deit",
    )


def _interaction_config(config: Mapping[str, Any]) -> InteractionConfig:
    kw = {**_INTERACTION_DEFAULTS, **config}
    attn = str(kw["interact_attn_type"])
    if attn not in ("deform", "normal"):
        raise NotImplementedError(f"interact_attn_type={attn!r} is not supported ('deform' or 'normal')")
    norm = config.get("norm_layer", "layernorm")
    with_norm = not (norm is None or (isinstance(norm, str) and norm.lower() == "none"))
    return InteractionConfig(
        attn_type="deform" if attn == "deform" else "regular",
        num_heads=int(kw["deform_num_heads"]),
        num_points=int(kw["n_points"]),
        value_ratio=float(kw["deform_ratio"]),
        with_ffn=bool(kw["with_cffn"]),
        ffn_ratio=float(kw["cffn_ratio"]),
        with_proj=bool(kw["interaction_proj"]),
        with_norm=with_norm,
        drop_path_rate=float(kw["interaction_drop_path_rate"]),
    )


def to_piip_config(config: Mapping[str, Any], task: str) -> PIIPConfig:
    """The :class:`PIIPConfig` of the network the authors' class builds from ``config``.

    Args:
        config: the keyword dictionary of their backbone class (``branch1``, ``branch2``, ...,
            interaction settings), e.g. the ``"kwargs"`` field of a fixture JSON (a dict holding
            such a ``"kwargs"`` field is accepted too).
        task: ``"det"`` (MMDetection ``PIIP{Two,Three,Four}Branch``: merged map + simple FPN) or
            ``"cls"`` (classification ``PIIP*Branch``).
    """
    config = _unwrap_kwargs(config)
    _check_task(task)
    branches_kw = branch_kwargs(config, task)
    n = len(branches_kw)
    counts = {len(b.get("interaction_indexes", ())) for b in branches_kw}
    interactions = counts != {0}
    branches = tuple(_branch_config(i + 1, kw, task, interactions) for i, kw in enumerate(branches_kw))

    sizes = [b.resolution for b in branches]
    if sizes[-1] != max(sizes):
        raise NotImplementedError(
            f"branch resolutions {sizes}: the last branch must have the highest resolution (its input "
            "is the image itself and the others are downscaled from it)")
    name = f"original:{_CLASS_NAMES[n]}:{task}"
    if task == "det":
        if not config.get("with_simple_fpn", True):
            raise NotImplementedError("with_simple_fpn=False (the regular-FPN / ConvNeXt variant with "
                                      "intermediate merges) is not supported")
        return PIIPConfig(branches=branches, interaction=_interaction_config(config), task="det",
                          fpn_norm="groupnorm", name=name)

    separate = bool(config.get("separate_head", False))
    if separate:
        classes = {int(b.get("num_classes", 1000)) for b in branches_kw}
        if len(classes) != 1:
            raise NotImplementedError(f"separate heads with different num_classes {sorted(classes)} "
                                      "cannot be averaged")
        return PIIPConfig(branches=branches, interaction=_interaction_config(config), task="cls",
                          cls_head="per_branch", cls_pool="first_patch", num_classes=classes.pop(),
                          name=name)
    if not config.get("use_cls_head", True):
        raise NotImplementedError("use_cls_head=False (a classification model without a head) is not supported")
    return PIIPConfig(branches=branches, interaction=_interaction_config(config), task="cls",
                      cls_head="merged", cls_pool="avg", num_classes=int(config.get("num_classes", 1000)),
                      name=name)


def build(config: Mapping[str, Any], task: str) -> PIIP:
    """Build our :class:`PIIP` computing what the authors' backbone built from ``config`` computes.

    ``model(x)`` then returns, for ``task="det"``, the four simple-FPN maps (strides 4, 8, 16, 32;
    an ``OrderedDict`` ``"0".."3"``, i.e. their list in order; a DINO-style backbone
    (``is_dino=True``) returns the last three) and, for ``task="cls"``, the logits. Load their
    weights with :func:`convert_state_dict`.
    """
    config = _unwrap_kwargs(config)
    model = PIIP(to_piip_config(config, task))
    model.original_spec = {
        "class": _CLASS_NAMES[model.config.num_branches],
        "task": task,
        "is_dino": bool(config.get("is_dino", False)) if task == "det" else False,
        "branch_classes": [original_class_name(kw, task, i + 1)
                           for i, kw in enumerate(branch_kwargs(config, task))],
    }
    return model


# -------------------------------------------------------------------------------------------------
# state dicts
# -------------------------------------------------------------------------------------------------

_BRANCH = re.compile(r"branch(\d+)\.(.+)")
_UNIT = re.compile(r"interactions\.(\d+)\.interaction_units_(\d)(\d)\.(.+)")
_MERGE = re.compile(r"merge_branch(\d+)\.(.+)")
_WEIGHT = re.compile(r"w(\d+)")
_GAMMA = re.compile(r"(blocks\.\d+\.)gamma_([12])(.*)")
_UNIT_PARTS = (
    ("branch1to2_proj.", "proj_a_to_b."),
    ("branch2to1_proj.", "proj_b_to_a."),
    ("branch2to1_injector.", "inject_b_to_a."),
    ("branch1to2_injector.", "inject_a_to_b."),
)


def map_key(key: str, *, head: str = "det") -> str | None:
    """Our name for one of their backbone keys (``None`` when it has no counterpart).

    ``head`` selects what ``merge_branch*``/``w*`` become: ``"det"`` (conv merge, ``merge.*``) or
    ``"merged"`` (the classification GroupNorm/Linear merge, ``classifier.*``). The scalar weights
    ``w{i}`` map to ``merge.weights[i-1]`` / ``classifier.weights[i-1]`` and are written
    ``<target>#<index>``.
    """
    m = _BRANCH.fullmatch(key)
    if m:
        index, rest = int(m.group(1)), m.group(2)
        if index < 1:
            return None
        g = _GAMMA.fullmatch(rest)
        if g:
            rest = f"{g.group(1)}ls{g.group(2)}.gamma{g.group(3)}"
        return f"branches.{index - 1}.{rest}"
    m = _UNIT.fullmatch(key)
    if m:
        k, a, b, rest = int(m.group(1)), int(m.group(2)), int(m.group(3)), m.group(4)
        if a < 1 or b != a + 1:
            return None
        for theirs, ours in _UNIT_PARTS:
            if rest.startswith(theirs):
                rest = ours + rest[len(theirs):]
                break
        else:
            return None
        rest = rest.replace(".ffn.dwconv.dwconv.", ".ffn.dwconv.")
        return f"interactions.{k}.units.{a - 1}.{rest}"
    m = _WEIGHT.fullmatch(key)
    if m and int(m.group(1)) >= 1:
        target = "merge.weights" if head == "det" else "classifier.weights"
        return f"{target}#{int(m.group(1)) - 1}"
    m = _MERGE.fullmatch(key)
    if m:
        index, rest = int(m.group(1)) - 1, m.group(2)
        if index < 0:
            return None
        if head == "det":
            return f"merge.projections.{index}.{rest}"
        # classification merge: branch 1 is a GroupNorm, the others GroupNorm -> Linear -> GroupNorm
        if rest in ("weight", "bias"):
            return f"classifier.merge_norms.{index}.{rest}"
        part, _, leaf = rest.partition(".")
        target = {"0": "merge_norms", "1": "merge_linears", "2": "merge_out_norms"}.get(part)
        return f"classifier.{target}.{index}.{leaf}" if target and leaf else None
    for theirs, ours in (("fpn1.", "fpn.fpn1."), ("fpn2.", "fpn.fpn2."),
                         ("cls_norm.", "classifier.norm."), ("cls_head.", "classifier.head.")):
        if key.startswith(theirs):
            return ours + key[len(theirs):]
    return None


def _head_kind(model: PIIP) -> str:
    return "merged" if model.config.task == "cls" and model.config.cls_head == "merged" else "det"


def convert_state_dict(state_dict: Mapping[str, torch.Tensor], model: PIIP) -> dict[str, torch.Tensor]:
    """Map the authors' backbone ``state_dict`` to ``model``'s keys, checked against its shapes.

    ``state_dict`` is the backbone's own state dict (their key names; an MMDetection-style
    ``backbone.`` prefix is stripped). The result holds exactly ``model``'s keys, so
    ``model.load_state_dict(result, strict=True)`` succeeds. Tensors keep their dtype
    (``load_state_dict`` casts them).

    Raises :class:`CheckpointError` naming the first key whose shape differs (their name, ours, both
    shapes), and listing the model keys the checkpoint does not provide and the checkpoint keys that
    have no place in the model (never silently dropped).
    """
    expected = model.state_dict()
    head = _head_kind(model)
    out: dict[str, torch.Tensor] = {}
    names: dict[str, str] = {}
    scalars: dict[str, dict[int, tuple[str, torch.Tensor]]] = {}
    unmapped: list[str] = []
    for key, tensor in state_dict.items():
        if not isinstance(tensor, torch.Tensor):
            unmapped.append(f"{key} (not a tensor: {type(tensor).__name__})")
            continue
        source = key[len("backbone."):] if key.startswith("backbone.") else key
        target = map_key(source, head=head)
        if target is None:
            unmapped.append(key)
            continue
        if "#" in target:
            target, index = target.split("#")
            scalars.setdefault(target, {})[int(index)] = (key, tensor)
            continue
        if target in out:
            raise CheckpointError(f"keys {names[target]!r} and {key!r} both map to {target!r}")
        out[target] = tensor
        names[target] = key
    for target, parts in scalars.items():
        bad = [(k, tuple(t.shape)) for k, t in parts.values() if t.numel() != 1]
        if bad:
            k, shape = bad[0]
            raise CheckpointError(f"{k!r} must be a scalar merge weight, got shape {list(shape)}")
        width = expected[target].shape[0] if target in expected else max(parts) + 1
        missing = [i for i in range(width) if i not in parts]
        if missing:
            raise CheckpointError(
                f"the checkpoint lacks the merge weight(s) {['w%d' % (i + 1) for i in missing]} "
                f"({target!r} needs w1..w{width})")
        first = parts[0][1]
        out[target] = torch.stack([parts[i][1].reshape(()).to(first.dtype) for i in range(len(parts))])
        names[target] = ", ".join(parts[i][0] for i in range(len(parts)))

    spec = getattr(model, "original_spec", {}) or {}
    if spec.get("is_dino"):
        # DINO backbones return fpn2..fpn4 only; a checkpoint may lack the unused fpn1 weights
        filled = [k for k in expected if k.startswith("fpn.fpn1.") and k not in out]
        if filled:
            warnings.warn(f"is_dino: the checkpoint has no {filled}; they keep their initial values "
                          "(fpn1 is not used by DINO-style outputs)", stacklevel=2)
            for k in filled:
                out[k] = expected[k].detach().clone()
                names[k] = "(initial value)"

    check_state_dict(out, expected, what="converted checkpoint", names=names, unmapped=unmapped)
    return out


# -------------------------------------------------------------------------------------------------
# files
# -------------------------------------------------------------------------------------------------

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
                                   {"_piip_global": full, "__module__": "piip.compat.original.opaque"})
            return stubs[full]

    def load(file, **kwargs):
        return RestrictedUnpickler(file, **kwargs).load()

    return types.SimpleNamespace(__name__="piip_restricted_pickle", Unpickler=RestrictedUnpickler,
                                 load=load, UnpicklingError=pickle.UnpicklingError)


def _torch_load(path: str) -> Any:
    size = os.path.getsize(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights only load failed" not in str(err).lower():
            raise CheckpointError(f"cannot read {path!r} ({size} bytes): it is corrupt or truncated "
                                  f"({type(err).__name__}: {str(err)[:200]})") from err
    except Exception as err:  # zip / EOF / unpickling errors of a damaged file
        raise CheckpointError(f"cannot read {path!r} ({size} bytes): it is corrupt or truncated "
                              f"({type(err).__name__}: {str(err)[:200]})") from err
    # the file holds non-tensor objects (configs, argparse.Namespace, numpy values): read it with the
    # restricted unpickler, which never imports or calls anything outside weights_only's allowlist
    try:
        return torch.load(path, map_location="cpu", weights_only=False,
                          pickle_module=_restricted_pickle_module())
    except Exception as err:
        raise CheckpointError(f"cannot read {path!r} ({size} bytes): it is corrupt or truncated "
                              f"({type(err).__name__}: {str(err)[:200]})") from err


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


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _unwrap(obj: Any, use_ema: bool) -> tuple[Mapping[str, Any], dict[str, Any]]:
    meta: dict[str, Any] = {"containers": []}
    for _ in range(4):
        if not isinstance(obj, Mapping):
            raise CheckpointError(f"expected a dict-like checkpoint, found {type(obj).__name__}")
        meta.setdefault("top_level_keys", sorted(map(str, obj.keys())))
        if _is_state_dict(obj):
            break
        if use_ema and "model_ema" in obj:
            meta["containers"].append("model_ema")
            obj = obj["model_ema"]
        elif "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
            meta["containers"].append("state_dict")
            obj = obj["state_dict"]
        elif "module" in obj and isinstance(obj["module"], Mapping):
            meta["containers"].append("module")
            obj = obj["module"]
        elif "model" in obj and isinstance(obj["model"], Mapping):
            if "model_ema" in obj:
                meta["has_ema"] = True
            meta["containers"].append("model")
            obj = obj["model"]
        else:
            break
    if use_ema and "model_ema" not in meta["containers"]:
        raise CheckpointError("use_ema=True but the checkpoint has no 'model_ema' entry "
                              f"(top-level keys: {meta.get('top_level_keys')})")
    if not isinstance(obj, Mapping) or not any(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(
            "no state dict found: expected tensors directly or under 'state_dict' (MMDetection), "
            f"'module' (DeepSpeed) or 'model'/'model_ema' (classification); top-level keys: "
            f"{meta.get('top_level_keys')}")
    layout = {"state_dict": "mmdet", "module": "deepspeed", "model": "classification",
              "model_ema": "classification-ema"}
    meta["layout"] = "+".join(layout[c] for c in meta["containers"]) or "state_dict"
    return obj, meta


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
            obj = _torch_load(path)
    state, found = _unwrap(obj, use_ema)
    if meta.get("layout") == "fixture":
        found["layout"] = "fixture"
    meta.update({k: v for k, v in found.items() if k != "containers"})
    tensors = {str(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    non_tensor = sorted(str(k) for k, v in state.items() if not isinstance(v, torch.Tensor))
    if non_tensor:
        meta["non_tensor_keys"] = non_tensor
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


# -------------------------------------------------------------------------------------------------
# end to end
# -------------------------------------------------------------------------------------------------

def _infer_task(state: Mapping[str, torch.Tensor]) -> str:
    keys = list(state)
    if any(k.startswith(("fpn1.", "fpn2.")) or re.match(r"merge_branch\d+\.\d+\.weight$", k) and
           state[k].dim() == 4 for k in keys):
        return "det"
    if any(re.match(r"branch\d+\.head\.", k) or k.startswith(("cls_head.", "cls_norm.")) for k in keys):
        return "cls"
    raise ValueError("cannot tell from the checkpoint whether it is a detection or a classification "
                     "backbone; pass task='det' or task='cls'")


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
    else:
        return None, None, str(config)
    task = None
    if isinstance(data.get("official"), Mapping):
        task = data["official"].get("task")
    kwargs = _unwrap_kwargs(data)
    if task is None:
        first = kwargs.get("branch1", {})
        if isinstance(first, Mapping):
            task = "cls" if "img_size" in first and "real_size" not in first else \
                "det" if "real_size" in first else None
        if "separate_head" in kwargs or "use_cls_head" in kwargs:
            task = "cls"
    return kwargs, task, label


def convert_checkpoint(src_path: str | os.PathLike, config: str | os.PathLike | Mapping[str, Any],
                       out_path: str | os.PathLike, *, task: str | None = None,
                       use_ema: bool = False) -> dict[str, Any]:
    """Convert one of the authors' checkpoint files to piip's safetensors format.

    Args:
        src_path: their file (see :func:`load_original_checkpoint` for the layouts read).
        config: the authors' backbone kwargs (a dict, or a JSON file holding them or a fixture JSON
            with a ``"kwargs"`` field), or the name of a registered piip variant whose config
            matches the checkpoint.
        out_path: the ``.safetensors`` file to write (:func:`piip.weights.save_checkpoint`); neck
            and head tensors of detection checkpoints are kept under their own prefixes. Our model
            config is also written next to it as ``<out>.json``.
        task: ``"det"`` or ``"cls"``; inferred from the config or the checkpoint when omitted.
        use_ema: convert a classification checkpoint's EMA weights.

    Returns a summary dict (paths, task, layout, tensor/parameter counts, kept extra prefixes).
    """
    backbone, extra, meta = load_original_checkpoint(src_path, use_ema=use_ema)
    kwargs, task_hint, label = _resolve_config(config)
    task = task or task_hint or _infer_task(backbone)
    _check_task(task)
    if kwargs is not None:
        model = build(kwargs, task)
    else:
        from ..models.registry import get_config
        model = PIIP(get_config(label, task=task))
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
        "original_class": getattr(model, "original_spec", {}).get("class"),
        "num_branches": model.config.num_branches,
        "num_tensors": len(converted),
        "num_params": sum(p.numel() for p in model.parameters()),
        "extra": {prefix: len(tensors) for prefix, tensors in extra.items()},
        "ema": use_ema,
        "has_ema": bool(meta.get("has_ema", False)),
        "ignored_tensors": len(meta.get("ignored_tensors", [])),
    }
