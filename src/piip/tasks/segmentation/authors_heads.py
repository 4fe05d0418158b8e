"""The authors' MMSegmentation 0.27 UperNet heads -> the heads of a
:class:`~piip.tasks.segmentation.PIIPSegmenter`, tensor by tensor.

piip's UperNet and FCN heads are written under MMSegmentation's module names
(:mod:`piip.tasks.segmentation.model`), so every tensor keeps its key and layout:

==============================================  ==================================================
MMSegmentation key                              in piip (same key), and what it is
==============================================  ==================================================
``decode_head.psp_modules.{i}.1.{conv,bn}``     the pyramid pooling branch of bin size 1/2/3/6
``decode_head.bottleneck.{conv,bn}``            3x3 fusion of the coarsest map and the pooled maps
``decode_head.lateral_convs.{i}.{conv,bn}``     1x1 laterals of the stride 4/8/16 maps
``decode_head.fpn_convs.{i}.{conv,bn}``         3x3 convs after the top-down sums
``decode_head.fpn_bottleneck.{conv,bn}``        3x3 fusion of the four levels
``decode_head.conv_seg``                        the 1x1 classifier (``num_classes`` outputs)
``auxiliary_head.convs.0.{conv,bn}``            the FCN head's 3x3 conv on the stride-16 map
``auxiliary_head.conv_seg``                     its classifier
==============================================  ==================================================

``bn`` carries ``weight``, ``bias``, ``running_mean``, ``running_var`` and ``num_batches_tracked``
(SyncBN in their configs: the same tensors). The layout (classes, widths, pool scales) is read from
the tensors; heads of another shape (an FCN head with more convolutions or ``concat_input``, other
pool scales, another decode head) are refused naming the key that shows it.
"""
from __future__ import annotations

import re
from collections.abc import Mapping

from typing import Any

import torch

from ...data.semseg import ADE20K_CLASSES
from ...models.piip import PIIP
from ...weights.checkpoint import CheckpointError, check_state_dict
from ...weights.renaming import flatten_prefixed
from .model import build_segmenter

__all__ = ["SEG_HEAD_PREFIXES", "has_upernet_heads", "upernet_layout", "convert_mmseg_heads", "with_authors_heads"]

SEG_HEAD_PREFIXES = ("decode_head", "auxiliary_head")

_CONV_MODULE = r"\.(?:conv\.weight|bn\.(?:weight|bias|running_mean|running_var|num_batches_tracked))"
_KEYS = re.compile(
    r"decode_head\.(?:psp_modules\.\d+\.1|bottleneck|lateral_convs\.\d+|fpn_convs\.\d+|fpn_bottleneck)" + _CONV_MODULE
    + r"|decode_head\.conv_seg\.(?:weight|bias)"
    + r"|auxiliary_head\.convs\.0" + _CONV_MODULE + r"|auxiliary_head\.conv_seg\.(?:weight|bias)")


def _flat(extra: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return flatten_prefixed(extra, SEG_HEAD_PREFIXES)


def has_upernet_heads(extra: Mapping[str, Mapping[str, torch.Tensor]]) -> bool:
    """Whether an MMSegmentation checkpoint's non-backbone tensors hold a decode head."""
    return "decode_head" in extra


def upernet_layout(extra: Mapping[str, Mapping[str, torch.Tensor]], backbone_width: int) -> dict[str, int]:
    """``num_classes``, ``channels`` and ``aux_channels`` (0: no auxiliary head) of the heads,
    checked against UperNet (pool scales 1/2/3/6, three laterals) on a ``backbone_width`` backbone."""
    flat = _flat(extra)
    try:
        conv_seg = flat["decode_head.conv_seg.weight"]
        bottleneck = flat["decode_head.bottleneck.conv.weight"]
    except KeyError as err:
        raise CheckpointError(f"the checkpoint's decode head is not MMSegmentation's UPerHead: no {err}") from None
    channels = conv_seg.shape[1]
    pools = sorted({int(m.group(1)) for k in flat if (m := re.match(r"decode_head\.psp_modules\.(\d+)\.", k))})
    laterals = sorted({int(m.group(1)) for k in flat if (m := re.match(r"decode_head\.lateral_convs\.(\d+)\.", k))})
    if pools != [0, 1, 2, 3] or laterals != [0, 1, 2]:
        raise CheckpointError(f"the decode head has {len(pools)} pooling branches and {len(laterals)} laterals; "
                              "piip's UperNet has pool scales (1, 2, 3, 6) over four pyramid levels")
    if bottleneck.shape[1] != backbone_width + 4 * channels:
        raise CheckpointError(f"decode_head.bottleneck reads {bottleneck.shape[1]} channels; a {backbone_width}-wide "
                              f"backbone with {channels}-channel pooling gives {backbone_width + 4 * channels}")
    aux_channels = 0
    if "auxiliary_head" in extra:
        extra_convs = sorted(k for k in flat if k.startswith("auxiliary_head.") and not
                             k.startswith(("auxiliary_head.convs.0.", "auxiliary_head.conv_seg.")))
        if extra_convs:
            raise CheckpointError(f"the auxiliary head is not a one-conv FCNHead without concat_input: {extra_convs[:3]}")
        aux_channels = flat["auxiliary_head.conv_seg.weight"].shape[1]
    return dict(num_classes=conv_seg.shape[0], channels=channels, aux_channels=aux_channels)


def convert_mmseg_heads(extra: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The head tensors under the segmenter's keys (their own); keys that have no place in piip's
    UperNet + FCN heads raise :class:`CheckpointError` listing them."""
    flat = _flat(extra)
    unmapped = [key for key in flat if not _KEYS.fullmatch(key)]
    if unmapped:
        raise CheckpointError(f"{len(unmapped)} head tensor(s) have no place in piip's UperNet + FCN heads: "
                              f"{unmapped[:10]}")
    return flat


def with_authors_heads(backbone: PIIP, converted: dict[str, torch.Tensor], extra: dict, settings: Mapping[str, Any]):
    """A complete segmenter from a converted backbone and MMSegmentation's UperNet + FCN heads."""
    layout = upernet_layout(extra, backbone.out_channels)
    names = {"class_names": ADE20K_CLASSES} if layout["num_classes"] == len(ADE20K_CLASSES) else {}
    segmenter = build_segmenter(backbone, **{**layout, **names, **settings})
    state = {f"backbone.{k}": v for k, v in converted.items()} | convert_mmseg_heads(extra)
    check_state_dict(state, segmenter, what="converted segmenter checkpoint")
    segmenter.load_state_dict(state, strict=True)
    rest = {prefix: tensors for prefix, tensors in extra.items() if prefix not in SEG_HEAD_PREFIXES}
    return segmenter.eval(), rest, len(state)
