"""The authors' MMDetection 2.x DINO neck and head (``ChannelMapper`` + ``DINOHead`` with a
``DinoTransformer``) -> piip's DINO detector (:mod:`.dino`), tensor by tensor.

Every tensor keeps its values and layout; only the names change. ``T`` is ``bbox_head.transformer``,
``{i}`` a neck input (strides 8/16/32), ``{l}`` a transformer layer, ``{k}`` a prediction branch
(``0..decoder_layers - 1`` for the decoder layers, the last one for the encoder's proposals), ``{m}``
one of ``sampling_offsets``, ``attention_weights``, ``value_proj``, ``output_proj``:

================================================  =====================================================
MMDetection key (``<module>.<weight|bias>``)       piip DINO key
================================================  =====================================================
``neck.convs.{i}.conv`` / ``.gn``                  ``backbone.neck.convs.{i}.0`` / ``.1`` (1x1 conv
                                                   without bias, GroupNorm 32)
``neck.extra_convs.0.conv`` / ``.gn``              ``backbone.neck.extra.0`` / ``.1`` (3x3 stride 2 on
                                                   the raw stride-32 map)
``T.level_embeds``                                 ``transformer.level_embeds``
``T.encoder.layers.{l}.attentions.0.{m}``          ``transformer.encoder.layers.{l}.self_attn.{m}``
``T.encoder.layers.{l}.ffns.0.layers.0.0``         ``transformer.encoder.layers.{l}.linear1``
``T.encoder.layers.{l}.ffns.0.layers.1``           ``transformer.encoder.layers.{l}.linear2``
``T.encoder.layers.{l}.norms.{0,1}``               ``transformer.encoder.layers.{l}.norm{1,2}``
``T.enc_output`` / ``T.enc_output_norm``           ``transformer.proposal_proj`` / ``proposal_norm``
``T.query_embed``                                  ``transformer.query_embed``
``T.decoder.layers.{l}.attentions.0.attn``         ``transformer.decoder.layers.{l}.self_attn``
                                                   (``in_proj_weight``, ``in_proj_bias``, ``out_proj``:
                                                   ``nn.MultiheadAttention`` in both)
``T.decoder.layers.{l}.attentions.1.{m}``          ``transformer.decoder.layers.{l}.cross_attn.{m}``
``T.decoder.layers.{l}.ffns.0.layers.*``          ``transformer.decoder.layers.{l}.linear1`` / ``2`` (as
                                                   in the encoder)
``T.decoder.layers.{l}.norms.{0,1,2}``             ``transformer.decoder.layers.{l}.norm{1,2,3}``
``T.decoder.ref_point_head.{0,2}``                 ``transformer.decoder.ref_point_head.{0,2}``
``T.decoder.norm``                                 ``transformer.decoder.norm``
``bbox_head.cls_branches.{k}``                     ``head.cls_branches.{k}``
``bbox_head.reg_branches.{k}.{0,2,4}``             ``head.reg_branches.{k}.{0,2,4}``
``bbox_head.label_embedding``                      ``head.label_embedding``
================================================  =====================================================

Why no tensor is reordered: mmcv's ``MultiScaleDeformableAttention`` views ``sampling_offsets`` as
(heads, levels, points, xy) and ``attention_weights`` as (heads, levels x points) softmaxed per
head, the value as (heads, channels) blocks, all as :class:`~piip.ops.MSDeformAttn` does; the
decoder's self-attention is ``torch.nn.MultiheadAttention`` in both (q, k, v rows of
``in_proj_weight``); the classifier is a sigmoid one, ``num_classes`` columns in MMDetection's label
order with no background column, and the label embedding has one row per class in the same order.

The layout (classes, queries, layer counts, FFN width, neck width) is read from the tensors. What
piip's DINO does not build is refused with a :class:`CheckpointError` naming the key that shows it:
other than 4 feature levels, other than 8 heads x 4 points per level (only their product is visible
in the shapes; every released config uses mmcv's 8 heads and 4 points), a neck other than three
inputs plus one extra level, branch counts other than one per decoder layer plus the encoder's, no
``query_embed`` (a one-stage Deformable DETR), FFNs of different widths, and any key without a place
(e.g. a conv bias, a two-layer class branch, Deformable DETR's ``reference_points``).
"""
from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from ...weights.checkpoint import CheckpointError
from ...weights.renaming import flatten_prefixed, rename_keys

__all__ = ["DINO_HEAD_PREFIXES", "has_dino_heads", "dino_layout", "convert_dino_heads"]

DINO_HEAD_PREFIXES = ("neck", "bbox_head")

_HEADS, _LEVELS, _POINTS = 8, 4, 4
_MSDA = r"(sampling_offsets|attention_weights|value_proj|output_proj)\.(weight|bias)"
#: mmcv's FFN is Sequential(Sequential(Linear, ReLU, Dropout), Linear, Dropout)
_FFN = {"0.0": "linear1", "1": "linear2"}
_T = r"bbox_head\.transformer\."


def _norm(m: re.Match) -> str:
    # mmcv numbers a layer's norms in operation order from 0; piip's layers name them norm1, norm2, ...
    return f"transformer.{m[1]}.layers.{m[2]}.norm{int(m[3]) + 1}.{m[4]}"


def _ffn(m: re.Match) -> str:
    return f"transformer.{m[1]}.layers.{m[2]}.{_FFN[m[3]]}.{m[4]}"


_RENAMES = (
    (re.compile(r"neck\.convs\.(\d+)\.conv\.weight"), r"backbone.neck.convs.\1.0.weight"),
    (re.compile(r"neck\.convs\.(\d+)\.gn\.(weight|bias)"), r"backbone.neck.convs.\1.1.\2"),
    (re.compile(r"neck\.extra_convs\.0\.conv\.weight"), r"backbone.neck.extra.0.weight"),
    (re.compile(r"neck\.extra_convs\.0\.gn\.(weight|bias)"), r"backbone.neck.extra.1.\1"),
    (re.compile(_T + r"(level_embeds|query_embed\.weight)"), r"transformer.\1"),
    (re.compile(_T + r"enc_output\.(weight|bias)"), r"transformer.proposal_proj.\1"),
    (re.compile(_T + r"enc_output_norm\.(weight|bias)"), r"transformer.proposal_norm.\1"),
    (re.compile(_T + r"encoder\.layers\.(\d+)\.attentions\.0\." + _MSDA),
     r"transformer.encoder.layers.\1.self_attn.\2.\3"),
    (re.compile(_T + r"decoder\.layers\.(\d+)\.attentions\.0\.attn\.(in_proj_weight|in_proj_bias|out_proj\.weight"
                r"|out_proj\.bias)"), r"transformer.decoder.layers.\1.self_attn.\2"),
    (re.compile(_T + r"decoder\.layers\.(\d+)\.attentions\.1\." + _MSDA),
     r"transformer.decoder.layers.\1.cross_attn.\2.\3"),
    (re.compile(_T + r"(encoder|decoder)\.layers\.(\d+)\.ffns\.0\.layers\.(0\.0|1)\.(weight|bias)"), _ffn),
    (re.compile(_T + r"(encoder)\.layers\.(\d+)\.norms\.([01])\.(weight|bias)"), _norm),
    (re.compile(_T + r"(decoder)\.layers\.(\d+)\.norms\.([012])\.(weight|bias)"), _norm),
    (re.compile(_T + r"decoder\.(ref_point_head\.[02]|norm)\.(weight|bias)"), r"transformer.decoder.\1.\2"),
    (re.compile(r"bbox_head\.(cls_branches\.\d+|reg_branches\.\d+\.[024]|label_embedding)\.(weight|bias)"),
     r"head.\1.\2"),
)


def _flat(extra: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return flatten_prefixed(extra, DINO_HEAD_PREFIXES)


def has_dino_heads(extra: Mapping[str, Mapping[str, torch.Tensor]]) -> bool:
    """Whether an MMDetection checkpoint's non-backbone tensors hold a neck and a DETR-style
    ``bbox_head`` with a transformer (DINO's)."""
    return "neck" in extra and any(key.startswith("transformer.") for key in extra.get("bbox_head", {}))


def _indices(flat: Mapping[str, torch.Tensor], pattern: str) -> list[int]:
    return sorted({int(m[1]) for key in flat if (m := re.match(pattern, key))})


def _get(flat: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    try:
        return flat[key]
    except KeyError:
        raise CheckpointError(f"the checkpoint's neck and bbox_head are not MMDetection's ChannelMapper + DINOHead "
                              f"(two-stage, box refinement): no {key!r}") from None


def _check_count(indices: list[int], expected: int, what: str, needs: str) -> None:
    if indices != list(range(expected)):
        raise CheckpointError(f"{what}: found indices {indices}; piip's DINO needs {needs}")


def dino_layout(extra: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, int]:
    """``num_classes``, ``num_queries``, ``encoder_layers``, ``decoder_layers``,
    ``transformer_ffn_dim`` and ``fpn_channels`` of the neck and head, checked against piip's DINO
    (see the module docstring for what is refused)."""
    flat = _flat(extra)
    level_embeds = _get(flat, "bbox_head.transformer.level_embeds")
    if level_embeds.shape[0] != _LEVELS:
        raise CheckpointError(f"bbox_head.transformer.level_embeds has {level_embeds.shape[0]} feature levels; "
                              f"piip's DINO reads {_LEVELS} (three backbone maps and one extra level)")
    width = level_embeds.shape[1]
    _check_count(_indices(flat, r"neck\.convs\.(\d+)\."), 3, "neck.convs", "3 inputs (strides 8, 16, 32)")
    _check_count(_indices(flat, r"neck\.extra_convs\.(\d+)\."), 1, "neck.extra_convs",
                 "1 extra level (stride 64)")
    encoder = _indices(flat, _T + r"encoder\.layers\.(\d+)\.")
    decoder = _indices(flat, _T + r"decoder\.layers\.(\d+)\.")
    _check_count(encoder, len(encoder), "bbox_head.transformer.encoder.layers", "layers 0..n-1")
    _check_count(decoder, len(decoder), "bbox_head.transformer.decoder.layers", "layers 0..n-1")
    if not encoder or not decoder:
        raise CheckpointError("bbox_head.transformer has no encoder or no decoder layers")
    branches = f"one per decoder layer plus the encoder's proposals ({len(decoder) + 1}: a two-stage head " \
               "with box refinement)"
    _check_count(_indices(flat, r"bbox_head\.cls_branches\.(\d+)\."), len(decoder) + 1, "bbox_head.cls_branches",
                 branches)
    _check_count(_indices(flat, r"bbox_head\.reg_branches\.(\d+)\."), len(decoder) + 1, "bbox_head.reg_branches",
                 branches)
    samples = _HEADS * _LEVELS * _POINTS
    attentions = [f"bbox_head.transformer.encoder.layers.{l}.attentions.0" for l in encoder] + \
                 [f"bbox_head.transformer.decoder.layers.{l}.attentions.1" for l in decoder]
    for name in attentions:
        for part, size in (("attention_weights", samples), ("sampling_offsets", 2 * samples)):
            key = f"{name}.{part}.weight"
            if (outputs := _get(flat, key).shape[0]) != size:
                raise CheckpointError(f"{key} has {outputs} outputs; piip's DINO samples "
                                      f"{_HEADS} heads x {_LEVELS} levels x {_POINTS} points ({size})")
    ffn_key = "bbox_head.transformer.{}.layers.{}.ffns.0.layers.0.0.weight"
    ffn = _get(flat, ffn_key.format("encoder", 0)).shape[0]
    for coder, layers in (("encoder", encoder), ("decoder", decoder)):
        for l in layers:
            key = ffn_key.format(coder, l)
            if (hidden := _get(flat, key).shape[0]) != ffn:
                raise CheckpointError(f"{key} is {hidden} wide, the encoder's first FFN {ffn}: piip's DINO has "
                                      "one FFN width")
    classes = _get(flat, "bbox_head.cls_branches.0.weight").shape[0]
    embeddings = _get(flat, "bbox_head.label_embedding.weight").shape[0]
    if embeddings != classes:
        raise CheckpointError(f"bbox_head.label_embedding has {embeddings} rows for {classes} classes: piip's DINO "
                              "embeds the denoising labels with one row per class (a sigmoid classifier without "
                              "a background column)")
    return dict(num_classes=classes, num_queries=_get(flat, "bbox_head.transformer.query_embed.weight").shape[0],
                encoder_layers=len(encoder), decoder_layers=len(decoder), transformer_ffn_dim=ffn,
                fpn_channels=width)


def convert_dino_heads(extra: Mapping[str, Mapping[str, torch.Tensor]]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The neck and head tensors under piip's DINO keys, unchanged.

    Returns ``(tensors, names)``: ``names`` maps each produced key to the MMDetection key it came
    from (for error messages). Keys that have no place in piip's DINO raise
    :class:`CheckpointError` listing them.
    """
    return rename_keys(_flat(extra), _RENAMES, "piip's DINO")
