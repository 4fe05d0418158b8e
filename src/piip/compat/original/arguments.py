"""Every constructor argument of the authors' backbone classes, and what piip does with it.

This table is the audit behind :func:`piip.compat.original.to_piip_config`: for each class of the
authors' code (OpenGVLab/PIIP @ 7a8eceb) that a backbone config can reach, every argument with the
class's own default and how piip converts it. The converter reads the defaults from here (a key
missing from a config takes *that class's* default; the detection, segmentation and classification
copies of ``InternViT6B`` and ``vit_models`` differ) and refuses keys the class does not have. The rows are
written to ``docs/original_arguments.md`` by :func:`write_argument_table`.

How an argument is supported, in the ``how`` text:

* converted: it changes the network and piip builds the same network;
* ignored: it cannot change what a converted checkpoint computes in piip (weights loading, memory
  checkpointing, standalone-forward options the PIIP wrappers never call, arguments the class
  never reads); the text says why;
* refused: piip raises ``NotImplementedError`` naming the argument and its value (or
  ``ValueError`` where the authors' class itself would fail).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Argument", "REQUIRED", "ARGUMENTS", "class_arguments", "class_defaults", "argument_table",
           "write_argument_table"]

#: Marks an argument the class cannot do without.
REQUIRED = object()


@dataclass(frozen=True)
class Argument:
    """One constructor argument: its default in the authors' class and what piip does with it."""

    name: str
    default: Any
    how: str


def _a(name: str, default: Any, how: str) -> Argument:
    return Argument(name, default, how)


_LN = "LayerNorm(eps=1e-6)"
_IGNORED_CP = "ignored: activation checkpointing saves memory only; use `model.set_grad_checkpointing()`"
_LOAD = ("loads the branch's pretrained weights at construction: convert the trained checkpoint instead "
         "(`piip convert`)")
_IGNORED_LOAD = "ignored: " + _LOAD
_SELECTS_CLASS = "converted inside PIIP: selects the branch class (see the PIIP rows); otherwise " + _LOAD

# -- the interaction arguments every PIIP class shares ------------------------------------------------

_INTERACTION = (
    _a("n_points", 4, "converted: `InteractionConfig.num_points` (unused by 'normal' attention)"),
    _a("deform_num_heads", 6, "converted: `InteractionConfig.num_heads` (deformable or regular cross-attention heads)"),
    _a("with_cffn", False, "converted: `InteractionConfig.with_ffn`"),
    _a("cffn_ratio", 0.25, "converted: `InteractionConfig.ffn_ratio`"),
    _a("deform_ratio", 1.0, "converted: `InteractionConfig.value_ratio` (unused by 'normal' attention)"),
    _a("interaction_proj", True, "converted: `InteractionConfig.with_proj`"),
    _a("interact_attn_type", "normal", "converted: 'deform' -> `attn_type='deform'`, 'normal' -> `'regular'` "
       "(multi-head cross-attention, q/k/v without bias); other values refused (their Injector raises)"),
    _a("interaction_drop_path_rate", 0.3, "converted: `InteractionConfig.drop_path_rate` (ConvFFN branch only)"),
    _a("norm_layer", _LN, "converted: absent = LayerNorm(eps 1e-6) in the injectors (`with_norm=True`); the "
       "string 'none' = no norms (`with_norm=False`); anything else refused"),
)

_DET_PIIP_BRANCH_KEYS = (
    _a("branchN.interaction_indexes", REQUIRED, "converted: `BranchConfig.interaction_indexes` (the first and "
       "last entry of each group, as their slicing reads them); groups that are not contiguous from block 0 "
       "to the last block refused (their code never runs blocks outside the groups)"),
    _a("branchN.real_size", REQUIRED, "converted: `BranchConfig.resolution`; the last branch must have the "
       "largest (the others are downscaled from it)"),
)

_DET_PIIP_COMMON = (
    *_INTERACTION,
    _a("is_dino", False, "converted: True returns the stride 8/16/32 maps (`fpn_levels=(1, 2, 3)`); the 2- and "
       "4-branch classes then build no `fpn1`, the 3-branch class still builds it (kept, unused by DINO)"),
    _a("pretrained", None, "ignored: a whole-backbone checkpoint loaded (strict=False) at construction; "
       "convert it with `piip convert` instead"),
    _a("cal_flops", False, "refused when True: their forward then returns nothing after the merge"),
    *_DET_PIIP_BRANCH_KEYS,
)

_CLASS_BY_PATH_2 = ("converted: selects the branch class: 'deit' in the path -> `vit_models`, anything else "
                    "-> `InternViT6B`")
_CLASS_BY_PATH_3 = ("converted: selects the branch class: 'deit' -> `vit_models`; 'beit', 'perceiver', "
                    "'convnext' -> BEiT / UniPerceiver / ConvNeXt branches, refused (piip implements ViT "
                    "branches only); anything else -> `InternViT6B`")
_W_CLS = ("converted: True on an `InternViT6B` branch is what the class does anyway (skip the class row "
          "of `pos_embed`); True on a `vit_models` branch refused (their code slices a row that does "
          "not exist)")

_PIIP_DET_2 = (
    *_DET_PIIP_COMMON,
    _a("branchN.pretrained", REQUIRED, _CLASS_BY_PATH_2),
    _a("branchN.branchN_w_cls_token", False, _W_CLS),
    _a("(patch size)", 16, "their 2-branch deformable inputs assume patch 16: other patch sizes refused"),
)
_PIIP_DET_3 = (
    *_DET_PIIP_COMMON,
    _a("with_simple_fpn", True, "refused when False (the regular-FPN variant with intermediate merges, used by "
       "the ConvNeXt configs)"),
    _a("out_interaction_indexes", [], "ignored with the simple FPN (their class reads it only when "
       "`with_simple_fpn=False`)"),
    _a("branchN.pretrained", REQUIRED, _CLASS_BY_PATH_3),
    _a("branchN.branchN_w_cls_token", False, _W_CLS),
)
_PIIP_DET_4 = (
    *_DET_PIIP_COMMON,
    _a("branchN.pretrained", REQUIRED, "converted: every branch is `vit_models` (no class selection); "
       "branch 4 is built from **branch 3's** kwargs (`vit_models(**branch3)`), keeping only its own "
       "`real_size` and `interaction_indexes`: the released TSBL files hold a ViT-S-wide branch 4"),
    _a("(patch size)", 16, "their 4-branch deformable inputs assume patch 16: other patch sizes refused"),
)

_PIIP_CLS = (
    *_INTERACTION,
    _a("num_classes", 1000, "converted: width of the merged head (`separate_head=False`); ignored with "
       "separate heads (their class never passes it to the branches: each branch's own `num_classes` counts)"),
    _a("use_cls_head", True, "refused when False (the model then returns the merged map, a FLOP-counting mode)"),
    _a("separate_head", False, "converted: True -> per-branch final norm + head, logits averaged, each head "
       "reading the first *patch* token (`cls_head='per_branch'`, `cls_pool='first_patch'`, their quirk); "
       "False -> GroupNorm/Linear merge, LayerNorm, mean, Linear (`cls_head='merged'`)"),
    _DET_PIIP_BRANCH_KEYS[0],
    _a("branchN.model_type", "deit", "converted: 'deit' -> `vit_models`, 'augreg' -> the classification "
       "`InternViT6B` (exact strings; others refused, as their class does)"),
    _a("branchN.use_final_norm_and_head", "(set by the PIIP class)", "their PIIP class passes "
       "`use_final_norm_and_head=separate_head`; a branch dict that sets it too fails in their code (refused, ValueError)"),
    _a("(patch size)", 16, "their classification embedding asserts patch 16: other patch sizes refused"),
)

# -- branch classes ----------------------------------------------------------------------------------

_WINDOWS_VIT = ("converted: `BranchConfig.window_size` per block: block i is windowed iff `window_attn[i] is "
                "True` and `window_size[i] > 0` (their test); a scalar is applied to every block (their class "
                "needs lists: a piip convenience)")
_WINDOWS_INTERN = ("converted: `BranchConfig.window_size` per block: block i is windowed iff `window_attn[i]` "
                   "is truthy; scalars apply to every block (as their class)")
_MLP_BLOCK = ("converted: absent = timm `Mlp` with exact GELU; the string 'fused_mlp' = flash-attn FusedMLP, "
              "tanh-approximate GELU (`act_layer='gelu_tanh'`); anything else refused")
_MLP_TYPE = ("converted: 'regular' = exact GELU, 'fused_mlp' = tanh-approximate GELU (`act_layer`); other "
             "values refused (their class raises)")
_NORM_TYPE = ("converted: exactly 'RMSNorm' -> RMSNorm (weight only), *any other string* -> LayerNorm "
              "(their test is `== 'RMSNorm'`; apex's FusedRMSNorm, when installed there, is the same math)")
_CLASS_OBJECT = "refused when given (a Python class in their config; piip builds the default: {})"
_QK_SCALE = ("converted when None (head_dim ** -0.5); another value is honoured only by the non-flash attention "
             "classes: ignored with `use_flash_attn=True`, refused otherwise")
_FLASH_VIT = ("converted: decides the window padding of this class: True (their flash path, every released "
              "checkpoint) pads the tokens *before* qkv (padded keys/values = the qkv bias), False pads the "
              "qkv output (`window_padding='after_qkv'`). Their flash kernels run attention in fp16; piip "
              "runs it in the model's dtype")
_FLASH_INTERN = ("ignored: both of this class's paths pad the tokens before qkv (same numbers up to the flash "
                 "kernel's fp16, which piip does not emulate)")
_LS_FP32 = "ignored: only changes the layer-scale product's dtype under autocast"
_OUTPUT_DTYPE = ("ignored inside PIIP (their standalone forward's final cast); values other than "
                 "'float16'/'bfloat16'/'float32' refused (their class raises)")
_STANDALONE = "ignored inside PIIP: read only by the class's standalone forward, which the PIIP wrappers never call"
_WITH_FPN_BRANCH = ("refused when True inside PIIP (it adds unused `up1..up4` parameters); a single-branch "
                    "baseline needs it True and gets the simple pyramid (`fpn_norm='layernorm'`)")
_DROP_PATH_CONST = "converted: `drop_path_rate`, constant schedule (`drop_path_schedule='constant'`)"
_DROP_PATH_LINEAR = "converted: `drop_path_rate`, linear schedule from 0 (`drop_path_schedule='linear'`)"

_VIT_MODELS_DET = (
    _a("pretrain_img_size", 224, "converted: the position-embedding grid is `pretrain_img_size // patch_size` "
       "(resized to the token grid at every forward)"),
    _a("patch_size", 16, "converted: `BranchConfig.patch_size`"),
    _a("pretrain_patch_size", 16, "converted: `BranchConfig.pretrain_patch_size` (used when piip loads the "
       "pretrained branch weights; no effect on a converted checkpoint)"),
    _a("in_chans", 3, "refused unless 3"),
    _a("embed_dim", 768, "converted"),
    _a("depth", 12, "converted"),
    _a("num_heads", 12, "converted"),
    _a("mlp_ratio", 4.0, "converted"),
    _a("qkv_bias", False, "converted"),
    _a("qk_scale", None, _QK_SCALE),
    _a("drop_rate", 0.0, "ignored: stored but never read by this copy"),
    _a("attn_drop_rate", 0.0, "converted: `BranchConfig.attn_drop_rate`"),
    _a("drop_path_rate", 0.0, _DROP_PATH_CONST),
    _a("norm_layer", _LN, _CLASS_OBJECT.format(_LN)),
    _a("block_layers", "Layer_scale_init_Block", _CLASS_OBJECT.format("Layer_scale_init_Block")),
    _a("act_layer", "nn.GELU", _CLASS_OBJECT.format("exact GELU")),
    _a("Attention_block", "Attention", _CLASS_OBJECT.format("Attention")),
    _a("Mlp_block", "Mlp", _MLP_BLOCK),
    _a("use_cls_token", False, "refused when True (it only adds a `cls_token` parameter that no detection "
       "forward uses)"),
    _a("init_scale", 1e-4, "converted: layer scale `gamma_1/gamma_2` always exists (`init_values=init_scale`; "
       "0 refused: piip's layer scale needs a non-zero init)"),
    _a("window_size", None, _WINDOWS_VIT),
    _a("window_attn", None, _WINDOWS_VIT),
    _a("output_dtype", "float32", _OUTPUT_DTYPE),
    _a("pretrained", None, _SELECTS_CLASS),
    _a("out_indices", [7, 11, 15, 23], _STANDALONE + "; a single-branch baseline must read the last block"),
    _a("with_fpn", False, _WITH_FPN_BRANCH),
    _a("use_simple_fpn", True, _STANDALONE + "; a single-branch baseline needs True"),
    _a("use_flash_attn", False, _FLASH_VIT),
    _a("with_cp", False, _IGNORED_CP),
    _a("cal_flops", False, "ignored: never read by this class"),
)

_INTERNVIT_DET = (
    _a("in_chans", 3, "refused unless 3"),
    _a("patch_size", 14, "converted: `BranchConfig.patch_size`"),
    _a("pretrain_patch_size", 14, "converted: `BranchConfig.pretrain_patch_size` (pretrained loading only)"),
    _a("pretrain_img_size", 224, "converted: position-embedding grid `pretrain_img_size // patch_size`, plus "
       "the unused class row (`pos_embed_class_row=True`)"),
    _a("qkv_bias", False, "converted"),
    _a("drop_path_rate", 0.0, _DROP_PATH_LINEAR),
    _a("embed_dim", 3200, "converted"),
    _a("num_heads", 25, "converted"),
    _a("mlp_ratio", 4, "converted"),
    _a("init_values", 0.1, "converted: layer scale `ls1/ls2.gamma` when truthy, none when None or 0"),
    _a("qk_normalization", True, "converted: full-width q/k norms of the block's norm class (`qk_norm=True`)"),
    _a("depth", 48, "converted"),
    _a("use_flash_attn", True, _FLASH_INTERN),
    _a("with_cp", True, _IGNORED_CP),
    _a("layerscale_force_fp32", False, _LS_FP32),
    _a("out_indices", [7, 11, 15, 23], _STANDALONE + "; a single-branch baseline must read the last block"),
    _a("with_fpn", False, _WITH_FPN_BRANCH),
    _a("with_final_norm", False, "ignored without `with_fpn`; refused when True on a baseline (a LayerNorm "
       "after every pyramid level)"),
    _a("window_attn", False, _WINDOWS_INTERN),
    _a("window_size", 14, _WINDOWS_INTERN),
    _a("output_dtype", "float32", _OUTPUT_DTYPE),
    _a("pretrained", None, _SELECTS_CLASS),
    _a("norm_layer_type", "RMSNorm", _NORM_TYPE),
    _a("use_simple_fpn", True, _STANDALONE + "; a single-branch baseline needs True"),
    _a("mlp_type", "regular", _MLP_TYPE),
    _a("cal_flops", False, "ignored: never read by this class"),
    _a("**kwargs", "", "ignored with a warning: this class swallows unknown keyword arguments"),
)

_VIT_MODELS_CLS = (
    _a("img_size", 224, "converted: `BranchConfig.resolution`, and the position-embedding grid "
       "(`img_size // patch_size`, `pos_embed_at_resolution=True`; added without resizing at that size)"),
    _a("patch_size", 16, "converted (must be 16, see the PIIP rows)"),
    _a("in_chans", 3, "refused unless 3"),
    _a("num_classes", 1000, "converted: width of this branch's head (all branches must agree: their logits are averaged)"),
    _a("embed_dim", 768, "converted"),
    _a("depth", 12, "converted"),
    _a("num_heads", 12, "converted"),
    _a("mlp_ratio", 4.0, "converted"),
    _a("qkv_bias", False, "converted"),
    _a("qk_scale", None, _QK_SCALE),
    _a("drop_rate", 0.0, "ignored: dropout before the head in their standalone forward only"),
    _a("attn_drop_rate", 0.0, "converted: `BranchConfig.attn_drop_rate`"),
    _a("drop_path_rate", 0.0, _DROP_PATH_CONST),
    _a("norm_layer", _LN, _CLASS_OBJECT.format(_LN)),
    _a("block_layers", "Layer_scale_init_Block", _CLASS_OBJECT.format("Layer_scale_init_Block")),
    _a("Patch_layer", "PatchEmbed", _CLASS_OBJECT.format("timm PatchEmbed")),
    _a("act_layer", "nn.GELU", _CLASS_OBJECT.format("exact GELU")),
    _a("Attention_block", "Attention", _CLASS_OBJECT.format("Attention")),
    _a("Mlp_block", "Mlp", _MLP_BLOCK),
    _a("use_cls_token", True, "converted: `BranchConfig.class_token` (no position embedding for it, as "
       "theirs); window attention with a class token refused (their class asserts)"),
    _a("use_final_norm_and_head", True, "set by the PIIP class (see the PIIP rows)"),
    _a("init_scale", 1e-4, "converted: `init_values=init_scale` (0 refused)"),
    _a("window_size", None, _WINDOWS_VIT),
    _a("window_attn", None, _WINDOWS_VIT),
    _a("use_flash_attn", False, _FLASH_VIT),
    _a("with_cp", False, _IGNORED_CP),
    _a("pretrained", None, _IGNORED_LOAD),
    _a("pretrain_img_size", 224, "converted: `BranchConfig.pretrain_img_size`, the grid of the pretrained "
       "weights (read only when loading them; the position embedding is stored at `img_size`: "
       "`pos_embed_at_resolution=True`)"),
    _a("pretrain_patch_size", 16, "converted: `BranchConfig.pretrain_patch_size` (pretrained loading only)"),
)

_INTERNVIT_CLS = (
    _a("in_chans", 3, "refused unless 3"),
    _a("patch_size", 16, "converted (must be 16, see the PIIP rows)"),
    _a("pretrain_patch_size", 16, "converted: `BranchConfig.pretrain_patch_size` (pretrained loading only)"),
    _a("img_size", 224, "converted: `BranchConfig.resolution`; position embedding `(1, 1 + (img_size // 16)^2, D)`: "
       "the class row is kept but unused, the patch rows are resized bicubically (fp32) to the token grid "
       "and the class token gets no position, as their PIIP classification forward does"),
    _a("pretrain_img_size", 224, "converted: `BranchConfig.pretrain_img_size`, the grid of the pretrained "
       "weights (read only when loading them; the position embedding is stored at `img_size`: "
       "`pos_embed_at_resolution=True`)"),
    _a("qkv_bias", False, "converted"),
    _a("drop_path_rate", 0.0, _DROP_PATH_CONST + " (the detection copy's is linear)"),
    _a("embed_dim", 3200, "converted"),
    _a("num_heads", 25, "converted"),
    _a("mlp_ratio", 4, "converted"),
    _a("init_values", None, "converted: no layer scale unless truthy (this copy's default is None)"),
    _a("qk_normalization", False, "converted (this copy's default is False)"),
    _a("depth", 48, "converted"),
    _a("use_flash_attn", True, _FLASH_INTERN),
    _a("with_cp", True, _IGNORED_CP),
    _a("layerscale_force_fp32", False, _LS_FP32),
    _a("window_attn", False, _WINDOWS_INTERN + "; with a class token refused (their class asserts)"),
    _a("window_size", 14, _WINDOWS_INTERN),
    _a("pretrained", None, _IGNORED_LOAD),
    _a("norm_layer_type", "ln", _NORM_TYPE + " (this copy's default 'ln' is LayerNorm)"),
    _a("use_final_norm_and_head", True, "set by the PIIP class (see the PIIP rows)"),
    _a("use_cls_token", True, "converted: `BranchConfig.class_token`"),
    _a("num_classes", 1000, "converted: width of this branch's head (all branches must agree)"),
    _a("mlp_type", "regular", _MLP_TYPE),
)

_SINGLE_DET = (
    _a("type", REQUIRED, "converted: 'vit_models' / 'InternViT6B' build a single-branch baseline (window "
       "layout, simple pyramid with LayerNorm); 'ConvNextHFWrapper' refused (ConvNeXt branches)"),
    _a("(input size)", 1024, "a single-branch config carries no size: `to_piip_config(..., input_size=)`, "
       "default 1024 (the authors' Mask R-CNN baselines and their FLOP script)"),
)

# -- the MMSegmentation copies (mmsegmentation/mmseg/models/backbones/): the detection classes, except --

def _edited(rows: tuple[Argument, ...], *, drop: tuple[str, ...] = (), replace: tuple[Argument, ...] = (),
            add: tuple[Argument, ...] = ()) -> tuple[Argument, ...]:
    """A detection class's rows as its segmentation copy has them."""
    new = {a.name: a for a in replace}
    return tuple(new.get(a.name, a) for a in rows if a.name not in drop) + add


_SEG_POS = ("their segmentation classes add the position embedding without resizing it, so the branch's "
            "input must have exactly this grid")
_SEG_PIIP_BRANCH_KEYS = (
    _DET_PIIP_BRANCH_KEYS[0],
    _a("branchN.real_size", REQUIRED, "converted: `BranchConfig.resolution`; the last branch must have the "
       "largest: their 2-branch class takes the image at branch 2's size and downscales it for branch 1"),
)
_PIIP_SEG_2 = (
    *_INTERACTION,
    _a("pretrained", None, "ignored: a whole-backbone checkpoint loaded (strict=False) at construction; "
       "convert it with `piip convert` instead"),
    *_SEG_PIIP_BRANCH_KEYS,
    _a("branchN.pretrained", REQUIRED, _CLASS_BY_PATH_2),
    _a("branchN.branchN_w_cls_token", False, _W_CLS),
    _a("(patch size)", 16, "their 2-branch deformable inputs assume patch 16: other patch sizes refused"),
)
_PIIP_SEG_3 = (
    _a("(input)", REQUIRED, "refused: their segmentation 3-branch class takes the image at *branch 2's* size, "
       "downscales it for branch 1 and upscales it for branch 3, where piip (and their detection class) "
       "feeds every branch from the full-size image; no 3-branch segmentation config or checkpoint was "
       "released"),
)
_VIT_MODELS_SEG = _edited(
    _VIT_MODELS_DET, drop=("cal_flops",),
    replace=(_a("pretrain_img_size", 224, "converted: the position-embedding grid is `pretrain_img_size // "
                "patch_size` (no class row): " + _SEG_POS + "; a branch whose size differs from it is refused "
                "(their forward fails; `pos_embed_at_resolution=True`)"),),
    add=(_a("img_size", 224, "ignored: only sizes the pretrained position embedding their class loads at "
            "construction (a size other than `pretrain_img_size` makes that load fail there)"),))
_INTERNVIT_SEG = _edited(
    _INTERNVIT_DET, drop=("cal_flops",),
    replace=(_a("pretrain_img_size", 224, "converted: `BranchConfig.pretrain_img_size`, the grid of the "
                "pretrained weights (read only when loading them)"),),
    add=(_a("img_size", 224, "converted: position-embedding grid `img_size // patch_size` with the unused class "
            "row (`pos_embed_at_resolution=True`): " + _SEG_POS + "; it must equal the branch's `real_size` "
            "(or the baseline's input size)"),))
_SINGLE_SEG = (
    _a("type", REQUIRED, "converted: 'vit_models' / 'InternViT6B' build a single-branch baseline (simple "
       "pyramid with LayerNorm)"),
    _a("(input size)", "img_size", "the baseline's input size is its `img_size` (their forward adds the "
       "position embedding unresized)"),
)

#: ``(task, class) -> arguments``, the audited table.
ARGUMENTS: dict[tuple[str, str], tuple[Argument, ...]] = {
    ("det", "PIIPTwoBranch"): _PIIP_DET_2,
    ("det", "PIIPThreeBranch"): _PIIP_DET_3,
    ("det", "PIIPFourBranch"): _PIIP_DET_4,
    ("det", "vit_models"): _VIT_MODELS_DET,
    ("det", "InternViT6B"): _INTERNVIT_DET,
    ("det", "single-branch baseline"): _SINGLE_DET,
    ("seg", "PIIPTwoBranch"): _PIIP_SEG_2,
    ("seg", "PIIPThreeBranch"): _PIIP_SEG_3,
    ("seg", "vit_models"): _VIT_MODELS_SEG,
    ("seg", "InternViT6B"): _INTERNVIT_SEG,
    ("seg", "single-branch baseline"): _SINGLE_SEG,
    ("cls", "PIIPTwoBranch"): _PIIP_CLS,
    ("cls", "PIIPThreeBranch"): _PIIP_CLS,
    ("cls", "PIIPFourBranch"): _PIIP_CLS,
    ("cls", "vit_models"): _VIT_MODELS_CLS,
    ("cls", "InternViT6B"): _INTERNVIT_CLS,
}


def class_arguments(task: str, cls: str) -> dict[str, Argument]:
    """The constructor arguments of one class (no ``branchN.`` rows and no ``(...)`` notes)."""
    return {a.name: a for a in ARGUMENTS[(task, cls)] if not a.name.startswith(("branchN.", "(", "**"))}


def class_defaults(task: str, cls: str) -> dict[str, Any]:
    """The defaults of one class's constructor (required arguments left out)."""
    return {name: a.default for name, a in class_arguments(task, cls).items() if a.default is not REQUIRED}


def _cell(value: Any) -> str:
    if value is REQUIRED:
        return "required"
    return f"`{value!r}`" if not isinstance(value, str) or not value.startswith(("(", "Layer")) else value


def argument_table() -> str:
    """The audit as one markdown table: argument, task, class, default, how piip supports it."""
    lines = ["| argument | task | class (authors' file) | default | supported how |", "|---|---|---|---|---|"]
    files = {"det": "mmdetection/mmdet/models/backbones/", "seg": "mmsegmentation/mmseg/models/backbones/",
             "cls": "classification/"}
    names = {"PIIPTwoBranch": "piip_2branch.py", "PIIPThreeBranch": "piip_3branch.py",
             "PIIPFourBranch": "piip_4branch.py", "vit_models": "deit.py",
             "InternViT6B": {"det": "internvit_6b.py", "seg": "internvit_6b.py", "cls": "intern_vit_6b.py"},
             "single-branch baseline": "(the config's `type`)"}
    for (task, cls), args in ARGUMENTS.items():
        file = names[cls][task] if isinstance(names[cls], dict) else names[cls]
        where = f"`{cls}` ({files[task]}{file})" if file.endswith(".py") else f"{cls} {file}"
        for a in args:
            how = a.how.replace("|", "\\|")
            lines.append(f"| `{a.name}` | {task} | {where} | {_cell(a.default)} | {how} |")
    return "\n".join(lines) + "\n"


def write_argument_table(path: str | os.PathLike = "docs/original_arguments.md") -> Path:
    """Write the audit to ``path`` (the file in ``docs/`` is this output)."""
    path = Path(path)
    head = ("# The authors' constructor arguments in piip\n\n"
            "Every constructor argument of the authors' backbone classes (OpenGVLab/PIIP @ 7a8eceb) that a\n"
            "backbone config can reach, with the class's own default and what `piip.compat.original`\n"
            "(`to_piip_config`, `build`, `piip convert`) does with it. *converted*: piip builds the same\n"
            "network; *ignored*: it cannot change what a converted checkpoint computes (the reason is given);\n"
            "*refused*: `NotImplementedError` (or `ValueError` where their class itself fails) naming the\n"
            "argument and its value. A key a config leaves out takes the default of *that* class: the\n"
            "detection (MMDetection), segmentation (MMSegmentation) and classification copies of\n"
            "`vit_models` and `InternViT6B` differ.\n"
            "`branchN.<key>` rows are keys of a branch dict that the PIIP class itself reads.\n\n"
            "Generated by `piip.compat.original.arguments.write_argument_table()`; a test keeps it current.\n\n")
    path.write_text(head + argument_table())
    return path
