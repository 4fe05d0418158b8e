"""The authors' backbone kwargs -> a :class:`~piip.models.config.PIIPConfig` computing the same thing."""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from ...models.config import BranchConfig, InteractionConfig, PIIPConfig
from ...models.piip import PIIP

__all__ = ["build", "to_piip_config", "branch_kwargs", "original_class_name"]


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

