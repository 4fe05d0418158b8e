"""The authors' backbone kwargs -> a :class:`~piip.config.model.PIIPConfig` computing the same thing.

Each argument is handled as the audit in :mod:`.arguments` says (``docs/original_arguments.md``):
a key the config leaves out takes the default of the class that reads it, arguments that change the
network are converted, arguments that cannot change a converted checkpoint's outputs are ignored,
and everything else is refused with an error naming the argument and its value.
"""
from __future__ import annotations

import re
import warnings
from collections.abc import Mapping
from typing import Any

from ...config.model import BranchConfig, InteractionConfig, PIIPConfig
from ...models.piip import PIIP
from .arguments import class_arguments, class_defaults

__all__ = ["build", "to_piip_config", "branch_kwargs", "original_class_name", "original_class"]

_PIIP_CLASSES = {2: "PIIPTwoBranch", 3: "PIIPThreeBranch", 4: "PIIPFourBranch"}
_SINGLE_BRANCH = ("vit_models", "InternViT6B")
#: Keys of an MMDetection config dict that are not constructor arguments.
_MMCV_KEYS = ("type", "_delete_")
#: Branch classes of the 3-branch detection class that piip does not implement.
_OTHER_BRANCHES = {"beit": "BEiT", "perceiver": "UnifiedBertEncoder (UniPerceiver)",
                   "convnext": "ConvNextHFWrapper (ConvNeXt)"}
#: Arguments whose value is a Python class in the authors' configs (never expressible as data).
_CLASS_OBJECTS = ("norm_layer", "block_layers", "act_layer", "Attention_block", "Patch_layer")
#: The single-branch baselines carry no input size; the authors' Mask R-CNN baselines use 1024.
BASELINE_INPUT_SIZE = 1024


def _unwrap_kwargs(config: Mapping[str, Any]) -> Mapping[str, Any]:
    """Accept the kwargs themselves or a fixture-style JSON object with a ``"kwargs"`` field."""
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a dict of the authors' backbone kwargs, got {type(config).__name__}")
    if "kwargs" in config and isinstance(config["kwargs"], Mapping) and "branch1" not in config:
        return config["kwargs"]
    return config


def _check_task(task: str) -> str:
    if task not in ("det", "seg", "cls"):
        raise ValueError(f"task must be 'det' (MMDetection backbone), 'seg' (MMSegmentation backbone) or 'cls' "
                         f"(classification model), got {task!r}")
    return task


def _branch_dicts(config: Mapping[str, Any]) -> list[dict[str, Any]]:
    found, i = [], 1
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
    return found


def original_class(config: Mapping[str, Any], task: str) -> str:
    """The authors' class a backbone config builds: ``PIIPTwoBranch``/``PIIPThreeBranch``/
    ``PIIPFourBranch`` (by the config's ``type`` or its branch count) or, for detection and
    segmentation, the single-branch baselines ``vit_models``/``InternViT6B``."""
    config = _unwrap_kwargs(config)
    _check_task(task)
    kind = config.get("type")
    count = len(_branch_dicts(config))
    if kind in _SINGLE_BRANCH and not count:
        if task == "cls":
            raise NotImplementedError(f"type={kind!r} with task='cls': piip converts the authors' "
                                      "classification PIIP classes, not single classification ViTs")
        return kind
    if kind == "ConvNextHFWrapper":
        raise NotImplementedError("type='ConvNextHFWrapper' (the ConvNeXt baseline): piip implements ViT "
                                  "branches only (vit_models and InternViT6B)")
    if count not in _PIIP_CLASSES:
        raise ValueError(f"the authors' PIIP classes have 2, 3 or 4 branches; the config has {count} "
                         "(keys branch1, branch2, ...)" + (f" and type={kind!r}" if kind else ""))
    expected = _PIIP_CLASSES[count]
    if kind is not None and kind != expected:
        raise ValueError(f"type={kind!r} does not match the config's {count} branches ({expected})")
    if task == "seg" and count == 4:
        raise ValueError("the authors' segmentation code has no 4-branch class (PIIPFourBranch is detection only)")
    if task == "seg" and count == 3:
        raise NotImplementedError("the authors' segmentation PIIPThreeBranch takes the image at branch 2's size "
                                  "and upscales it for branch 3, where piip feeds every branch from the full-size "
                                  "image; no 3-branch segmentation config or checkpoint was released")
    return expected


def branch_kwargs(config: Mapping[str, Any], task: str) -> list[dict[str, Any]]:
    """The kwargs each branch is *built* from, branch 1 first.

    For the 4-branch detection class this reproduces its bug: branch 4 is ``vit_models(**branch3)``
    (branch 3's architecture and weights), while the wrapper still reads branch 4's own
    ``real_size`` (its input resolution) and ``interaction_indexes``. A single-branch baseline's
    kwargs are the config itself.
    """
    config = _unwrap_kwargs(config)
    cls = original_class(config, task)
    if cls in _SINGLE_BRANCH:
        return [{k: v for k, v in config.items() if k not in _MMCV_KEYS}]
    found = _branch_dicts(config)
    if task == "det" and cls == "PIIPFourBranch":
        own = found[3]
        built = dict(found[2])
        for key in ("real_size", "interaction_indexes"):
            built.pop(key, None)
            if key in own:
                built[key] = own[key]
        built["_built_from"] = "branch3"
        found[3] = built
    return found


def original_class_name(kwargs: Mapping[str, Any], task: str, index: int | None = None,
                        num_branches: int = 3) -> str:
    """Which branch class the authors' code builds from one branch's kwargs.

    Detection and segmentation, 2 branches: ``'deit'`` in ``pretrained`` -> ``vit_models``, anything else ->
    ``InternViT6B``; 3 branches: the same, with ``'beit'``/``'perceiver'``/``'convnext'`` selecting
    classes piip does not implement (``NotImplementedError``); 4 branches: always ``vit_models``.
    Classification: the branch's ``model_type``, ``"deit"`` (default) or ``"augreg"``.
    """
    where = f"branch{index}" if index else "a branch"
    if kwargs.get("_built_from") == "branch3":
        return "vit_models"
    if task == "cls":
        model_type = kwargs.get("model_type", "deit")
        if model_type == "deit":
            return "vit_models"
        if model_type == "augreg":
            return "InternViT6B"
        raise NotImplementedError(f"{where}: model_type={model_type!r}; the authors' classification classes "
                                  "accept exactly 'deit' (vit_models) and 'augreg' (InternViT6B)")
    if num_branches == 4:
        return "vit_models"
    if "pretrained" not in kwargs:
        raise ValueError(f"{where} kwargs lack 'pretrained': the authors' dense classes choose the branch "
                         "class by that path ('deit' in it -> vit_models, otherwise InternViT6B)")
    pretrained = str(kwargs.get("pretrained") or "")
    if "deit" in pretrained:
        return "vit_models"
    if num_branches == 3:
        for marker, name in _OTHER_BRANCHES.items():
            if marker in pretrained:
                raise NotImplementedError(
                    f"{where} has pretrained={pretrained!r}, for which the authors' code builds {name}; "
                    "piip implements ViT branches only (vit_models and InternViT6B)")
    return "InternViT6B"


# -- pieces -----------------------------------------------------------------------------------------

def _refuse(where: str, name: str, value: Any, why: str) -> None:
    raise NotImplementedError(f"{where}: {name}={value!r} is not supported: {why}")


def _check_known(where: str, kwargs: Mapping[str, Any], task: str, cls: str, extra: tuple[str, ...] = ()) -> None:
    known = set(class_arguments(task, cls)) | set(extra)
    unknown = sorted(k for k in kwargs if k not in known and k != "_built_from")
    if not unknown:
        return
    if task != "cls" and cls == "InternViT6B":
        warnings.warn(f"{where}: the authors' {task} InternViT6B ignores the unknown argument(s) {unknown} "
                      "(it swallows **kwargs); piip ignores them too", stacklevel=4)
        return
    raise ValueError(f"{where}: the authors' {cls} ({task}) has no argument(s) {unknown}: their class would "
                     "raise a TypeError")


def _per_block(value: Any, depth: int, name: str, where: str) -> list[Any]:
    if isinstance(value, (list, tuple)):
        if len(value) != depth:
            raise ValueError(f"{where}: {name} lists {len(value)} entries for {depth} blocks")
        return list(value)
    return [value] * depth


def _window_sizes(where: str, arch: Mapping[str, Any], cls: str, depth: int) -> tuple[int | None, ...]:
    """Per-block window sizes (None = global) as the authors' class decides them."""
    attn = _per_block(arch["window_attn"] if arch["window_attn"] is not None else False, depth, "window_attn", where)
    sizes = _per_block(arch["window_size"] if arch["window_size"] is not None else -1, depth, "window_size", where)
    out: list[int | None] = []
    for i, (on, size) in enumerate(zip(attn, sizes)):
        if cls == "vit_models":
            # their test: `window_attn[i] is True` and `window_size[i] > 0`
            out.append(int(size) if on is True and size is not None and size > 0 else None)
        elif on:
            if not isinstance(size, int) or isinstance(size, bool) or size < 1:
                raise ValueError(f"{where}: block {i} is windowed with window_size={size!r}; a window size "
                                 "must be a positive int")
            out.append(size)
        else:
            out.append(None)
    return tuple(out)


def _groups(where: str, value: Any, depth: int) -> tuple[tuple[int, int], ...]:
    """Their ``interaction_indexes``: each entry's first and last block, as their slicing reads it."""
    try:
        groups = tuple((int(g[0]), int(g[-1])) for g in value)
    except (TypeError, ValueError, IndexError, KeyError):
        raise ValueError(f"{where}: interaction_indexes must be a list of [start, end] block ranges, "
                         f"got {value!r}") from None
    if not groups:
        _refuse(where, "interaction_indexes", value,
                "with no groups the authors' code runs no block at all (blocks run only inside the groups)")
    expected = 0
    for start, end in groups:
        if start != expected or end < start:
            _refuse(where, "interaction_indexes", value,
                    "the groups must be contiguous [start, end] ranges from block 0 (their code never "
                    "runs the blocks outside the groups)")
        expected = end + 1
    if expected != depth:
        _refuse(where, "interaction_indexes", value,
                f"the groups end at block {expected - 1} of {depth}; their code would skip the remaining blocks")
    return groups


def _branch_config(where: str, given: Mapping[str, Any], task: str, cls: str, *, resolution: int,
                   groups: tuple[tuple[int, int], ...], in_piip: bool) -> BranchConfig:
    """One branch of the authors' ``cls`` (``vit_models`` / ``InternViT6B``) as a :class:`BranchConfig`."""
    arch = {**class_defaults(task, cls), **given}
    vit = cls == "vit_models"
    for name in _CLASS_OBJECTS:
        if name in given:
            _refuse(where, name, given[name], "a Python class in their config; piip builds that class's default")
    if arch.get("in_chans", 3) != 3:
        _refuse(where, "in_chans", arch["in_chans"], "piip's branches take 3-channel images")
    depth = int(arch["depth"])
    flash = bool(arch.get("use_flash_attn"))
    if vit and arch.get("qk_scale") is not None and not flash:
        _refuse(where, "qk_scale", arch["qk_scale"], "the non-flash attention would scale q.k by it; piip "
                "uses head_dim ** -0.5 (their flash path ignores qk_scale)")
    if arch.get("output_dtype", "float32") not in ("float16", "bfloat16", "float32"):
        _refuse(where, "output_dtype", arch["output_dtype"], "their class accepts float16, bfloat16 or float32")
    if in_piip and arch.get("with_fpn"):
        _refuse(where, "with_fpn", True, "inside a PIIP backbone it only adds unused up1..up4 parameters")

    if vit:
        mlp = given.get("Mlp_block", "Mlp")
        if mlp not in ("Mlp", "fused_mlp"):
            _refuse(where, "Mlp_block", mlp, "piip builds timm's Mlp or the fused MLP ('fused_mlp')")
        act = "gelu_tanh" if mlp == "fused_mlp" else "gelu"
        norm, qk_norm = "layernorm", False
        if not arch["init_scale"]:
            _refuse(where, "init_scale", arch["init_scale"], "piip's layer scale needs a non-zero init "
                    "(vit_models always has gamma_1/gamma_2)")
        init_values: float | None = float(arch["init_scale"])
        if task != "cls" and arch["use_cls_token"]:
            _refuse(where, "use_cls_token", True, f"the {task} vit_models only adds an unused cls_token parameter")
        pos_class_row = False
    else:
        if arch["mlp_type"] not in ("regular", "fused_mlp"):
            _refuse(where, "mlp_type", arch["mlp_type"], "their class accepts 'regular' or 'fused_mlp'")
        act = "gelu_tanh" if arch["mlp_type"] == "fused_mlp" else "gelu"
        norm = "rmsnorm" if arch["norm_layer_type"] == "RMSNorm" else "layernorm"
        qk_norm = bool(arch["qk_normalization"])
        init_values = float(arch["init_values"]) if arch["init_values"] else None
        pos_class_row = True
    class_token = task == "cls" and bool(arch["use_cls_token"])
    if class_token and any(_per_block(arch["window_attn"] or False, depth, "window_attn", where)):
        raise ValueError(f"{where}: window attention with a class token: the authors' {cls} asserts "
                         "`not any(window_attn)` when use_cls_token=True")
    windows = _window_sizes(where, arch, cls, depth)
    patch = int(arch["patch_size"])
    if task == "seg":  # the position embedding is added unresized: its grid is the branch's
        grid_size = int(arch["pretrain_img_size"] if vit else arch["img_size"])
        if grid_size != resolution:
            _refuse(where, "pretrain_img_size" if vit else "img_size", grid_size,
                    f"the branch sees {resolution}-pixel images and their segmentation {cls} adds its "
                    f"{grid_size // patch}x{grid_size // patch} position embedding without resizing it")
    # the classification and segmentation copies: pos_embed at the branch's grid (classification:
    # constant drop path in both classes)
    schedule = "constant" if vit or task == "cls" else "linear"
    return BranchConfig(
        embed_dim=int(arch["embed_dim"]),
        depth=depth,
        num_heads=int(arch["num_heads"]),
        resolution=resolution,
        interaction_indexes=groups,
        patch_size=patch,
        pretrain_img_size=int(arch["pretrain_img_size"]),
        pos_embed_at_resolution=task in ("cls", "seg"),
        pretrain_patch_size=int(arch["pretrain_patch_size"]) if "pretrain_patch_size" in arch else patch,
        mlp_ratio=float(arch["mlp_ratio"]),
        qkv_bias=bool(arch["qkv_bias"]),
        qk_norm=qk_norm,
        norm_layer=norm,
        act_layer=act,
        init_values=init_values,
        class_token=class_token,
        pos_embed_class_row=pos_class_row,
        window_size=windows,
        # vit_models' non-flash windowed attention pads the qkv output; every other path pads the tokens
        window_padding="after_qkv" if vit and not flash and any(w is not None for w in windows) else "before_qkv",
        drop_path_rate=float(arch.get("drop_path_rate") or 0.0),
        drop_path_schedule=schedule,
        attn_drop_rate=float(arch.get("attn_drop_rate") or 0.0),
        pretrained=None,
        family="deit" if vit else "internvit",
    )


def _interaction_config(where: str, kw: Mapping[str, Any], given: Mapping[str, Any]) -> InteractionConfig:
    """``kw``: the class's arguments with its defaults filled in; ``given``: what the config set."""
    attn = kw["interact_attn_type"]
    if attn not in ("deform", "normal"):
        _refuse(where, "interact_attn_type", attn, "their Injector accepts 'deform' or 'normal'")
    norm = given.get("norm_layer")
    if "norm_layer" in given and norm != "none":
        _refuse(where, "norm_layer", norm, "piip's injectors use LayerNorm(eps 1e-6) (the default) or no "
                "norm ('none')")
    return InteractionConfig(
        attn_type="deform" if attn == "deform" else "regular",
        num_heads=int(kw["deform_num_heads"]),
        num_points=int(kw["n_points"]),
        value_ratio=float(kw["deform_ratio"]),
        with_ffn=bool(kw["with_cffn"]),
        ffn_ratio=float(kw["cffn_ratio"]),
        with_proj=bool(kw["interaction_proj"]),
        with_norm=norm != "none",
        drop_path_rate=float(kw["interaction_drop_path_rate"]),
    )


def _baseline_config(config: Mapping[str, Any], cls: str, task: str, input_size: int | None) -> PIIPConfig:
    """A single-branch detection or segmentation baseline (``vit_models`` / ``InternViT6B`` with
    ``with_fpn=True``)."""
    where = f"{cls} baseline"
    given = {k: v for k, v in config.items() if k not in _MMCV_KEYS}
    _check_known(where, given, task, cls)
    arch = {**class_defaults(task, cls), **given}
    depth = int(arch["depth"])
    if not arch["with_fpn"]:
        _refuse(where, "with_fpn", arch["with_fpn"], "without it their class returns the raw block outputs of "
                "out_indices; piip builds the baseline with its simple pyramid (with_fpn=True)")
    if not arch["use_simple_fpn"]:
        _refuse(where, "use_simple_fpn", False, "their class then returns several block outputs; piip builds "
                "the single-output simple pyramid")
    collected = [i for i in range(depth) if i in list(arch["out_indices"])]
    if not collected or collected[-1] != depth - 1:
        _refuse(where, "out_indices", arch["out_indices"], f"the pyramid must read the last block ({depth - 1})")
    if arch.get("with_final_norm"):
        _refuse(where, "with_final_norm", True, "piip's pyramid has no LayerNorm after its levels")
    if task == "seg":  # the input size is the one the position embedding was made for
        size = int(arch["pretrain_img_size"] if cls == "vit_models" else arch["img_size"])
        if input_size is not None and int(input_size) != size:
            raise ValueError(f"{where}: input_size={input_size}, but their segmentation {cls} only takes "
                             f"{size}-pixel inputs (its position embedding is added unresized)")
    else:
        size = int(input_size or BASELINE_INPUT_SIZE)
    branch = _branch_config(where, given, task, cls, resolution=size, groups=(), in_piip=False)
    return PIIPConfig(branches=(branch,), task="det", fpn_norm="layernorm", name=f"original:{cls}:{task}")


# -- the whole backbone ------------------------------------------------------------------------------

def to_piip_config(config: Mapping[str, Any], task: str, *, input_size: int | None = None) -> PIIPConfig:
    """The :class:`PIIPConfig` of the network the authors' class builds from ``config``.

    Args:
        config: the keyword dictionary of their backbone class: ``branch1``, ``branch2``, ... and the
            interaction settings for ``PIIP{Two,Three,Four}Branch``, or a single-branch detection
            baseline with ``type='vit_models'`` / ``'InternViT6B'``; an MMDetection ``type`` and
            ``_delete_`` may stay in it, and a fixture JSON object with a ``"kwargs"`` field works too.
        task: ``"det"`` (the MMDetection classes: merged map + simple pyramid), ``"seg"`` (their
            MMSegmentation copies: the same network with the position embeddings at the branches'
            grids; the result is a dense ``task="det"`` config) or ``"cls"`` (the classification
            classes).
        input_size: the input size of a single-branch detection baseline (its config carries none;
            default 1024, the size of the authors' Mask R-CNN baselines). PIIP configs and
            segmentation baselines (``img_size``) carry their sizes.

    Every argument is converted, ignored or refused as ``docs/original_arguments.md`` lists;
    refusals raise ``NotImplementedError`` naming the argument and its value.
    """
    config = _unwrap_kwargs(config)
    cls = original_class(config, task)
    if cls in _SINGLE_BRANCH:
        return _baseline_config(config, cls, task, input_size)
    top = {k: v for k, v in config.items() if k not in _MMCV_KEYS and not re.fullmatch(r"branch\d+", k)}
    where = f"{cls} ({task})"
    _check_known(where, top, task, cls)
    kw = {**class_defaults(task, cls), **top}
    dense = task in ("det", "seg")
    if task == "det" and kw.get("cal_flops"):
        _refuse(where, "cal_flops", True, "their forward then returns nothing after the branch merge")
    interaction = _interaction_config(where, kw, top)
    built = branch_kwargs(config, task)
    n = len(built)
    classes = [original_class_name(kwargs, task, i, n) for i, kwargs in enumerate(built, start=1)]
    if cls == "PIIPThreeBranch" and task == "det" and not kw["with_simple_fpn"]:
        _refuse(where, "with_simple_fpn", False, "the regular-FPN variant with intermediate merges (the "
                "ConvNeXt configs) is not implemented")
    consumed = ("interaction_indexes", "real_size") if dense else ("interaction_indexes", "model_type")
    branches = []
    for i, (kwargs, branch_cls) in enumerate(zip(built, classes), start=1):
        bwhere = f"branch{i}"
        kwargs = dict(kwargs)
        w_cls_key = f"branch{i}_w_cls_token"
        if dense and cls != "PIIPFourBranch" and kwargs.pop(w_cls_key, False) and branch_cls == "vit_models":
            _refuse(bwhere, w_cls_key, True, "their code would slice a class row from a vit_models pos_embed, "
                    "which has none")
        if task == "cls" and "use_final_norm_and_head" in kwargs:
            raise ValueError(f"{bwhere}: use_final_norm_and_head is passed by the authors' PIIP class itself "
                             "(= separate_head); giving it in the branch dict fails there")
        missing = [k for k in ("interaction_indexes", "real_size") if dense and k not in kwargs] + \
            (["interaction_indexes"] if task == "cls" and "interaction_indexes" not in kwargs else [])
        if missing:
            raise ValueError(f"{bwhere} kwargs lack {missing}: the authors' {cls} requires them")
        given = {k: v for k, v in kwargs.items() if k not in consumed}
        _check_known(bwhere, given, task, branch_cls)
        depth = int({**class_defaults(task, branch_cls), **given}["depth"])
        groups = _groups(bwhere, kwargs["interaction_indexes"], depth)
        resolution = int(kwargs["real_size"]) if dense else \
            int(given.get("img_size", class_defaults(task, branch_cls)["img_size"]))
        branches.append(_branch_config(bwhere, given, task, branch_cls, resolution=resolution, groups=groups,
                                       in_piip=True))

    patch = branches[0].patch_size
    if (cls != "PIIPThreeBranch" or task == "cls") and any(b.patch_size != 16 for b in branches):
        _refuse(where, "patch_size", sorted({b.patch_size for b in branches}),
                "this class computes the deformable attention's grids for patch 16")
    if any(b.patch_size != patch for b in branches):
        raise NotImplementedError(f"{where}: branches with different patch sizes "
                                  f"{[b.patch_size for b in branches]} are not supported")
    counts = [len(b.interaction_indexes) for b in branches]
    if len(set(counts)) != 1:
        raise ValueError(f"{where}: every branch needs the same number of interaction_indexes groups; got "
                         f"{counts} (their class asserts this)")
    sizes = [b.resolution for b in branches]
    if sizes[-1] != max(sizes):
        _refuse(where, "real_size" if dense else "img_size", sizes,
                "the last branch must have the highest resolution (its input is the image itself, the "
                "others are downscaled from it; theirs would not upscale)")
    name = f"original:{cls}:{task}"
    if dense:
        dino_without_fpn1 = kw.get("is_dino", False) and cls != "PIIPThreeBranch"
        return PIIPConfig(branches=tuple(branches), interaction=interaction, task="det", fpn_norm="groupnorm",
                          fpn_levels=(1, 2, 3) if dino_without_fpn1 else (0, 1, 2, 3), name=name)
    if kw["separate_head"]:
        classes = {int(kw_.get("num_classes", class_defaults(task, original_class_name(kw_, task))["num_classes"]))
                   for kw_ in built}
        if len(classes) != 1:
            raise NotImplementedError(f"{where}: separate heads with different num_classes {sorted(classes)} "
                                      "cannot be averaged")
        missing = [i + 1 for i, b in enumerate(branches) if not b.class_token]
        if missing:
            raise ValueError(f"{where}: separate heads need use_cls_token=True on every branch (their forward "
                             f"asserts it); branches {missing} have none")
        return PIIPConfig(branches=tuple(branches), interaction=interaction, task="cls", cls_head="per_branch",
                          cls_pool="first_patch", num_classes=classes.pop(), name=name)
    if not kw["use_cls_head"]:
        _refuse(where, "use_cls_head", False, "the model would return the merged map (a FLOP-counting mode)")
    return PIIPConfig(branches=tuple(branches), interaction=interaction, task="cls", cls_head="merged",
                      cls_pool="avg", num_classes=int(kw["num_classes"]), name=name)


def build(config: Mapping[str, Any], task: str, *, input_size: int | None = None) -> PIIP:
    """Build our :class:`PIIP` computing what the authors' backbone built from ``config`` computes.

    ``model(x)`` then returns, for ``task="det"`` and ``"seg"``, the simple-pyramid maps (an ``OrderedDict``
    ``"0".."3"`` = strides 4, 8, 16, 32, i.e. their list in order; a DINO-style 2/4-branch backbone
    (``is_dino=True``) has no stride-4 level and returns ``"1".."3"``, the 3-branch one still returns
    all four and DINO reads the last three) and, for ``task="cls"``, the logits. Load their weights
    with :func:`~piip.compat.original.convert_state_dict`. ``model.original_spec`` records the
    authors' class, its branch classes and whether it is DINO-style.
    """
    config = _unwrap_kwargs(config)
    model = PIIP(to_piip_config(config, task, input_size=input_size))
    cls = original_class(config, task)
    built = branch_kwargs(config, task)
    model.original_spec = {
        "class": cls,
        "task": task,
        "is_dino": bool(config.get("is_dino", False)) if task == "det" else False,
        "branch_classes": [cls] if cls in _SINGLE_BRANCH else
        [original_class_name(kw, task, i + 1, len(built)) for i, kw in enumerate(built)],
    }
    return model
