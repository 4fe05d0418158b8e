"""The authors' DINO checkpoints as piip detectors: the neck and head conversion
(:mod:`piip.tasks.detection.authors_dino_heads`), checked against the authors' computation written
here.

The reference below is MMDetection 2.x's ``ChannelMapper`` + ``DINOHead`` + ``DinoTransformer``,
mmcv's attention modules and ``CdnQueryGenerator``, in plain torch on their tensors under their key
names. Nothing of piip computes it: the deformable attention samples with ``F.grid_sample`` as mmcv's
CPU function does, the decoder's self-attention is written out instead of calling
``nn.MultiheadAttention``. Their configs fix 8 heads, 4 levels and 4 points; widths come from the
tensors.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

import piip

from conftest import FIXTURES, tiny_config

HEADS, LEVELS, POINTS = 8, 4, 4


def random_dino_state(cin: int, classes: int = 5, queries: int = 20, encoder_layers: int = 2,
                      decoder_layers: int = 2, ffn: int = 64, width: int = 256, seed: int = 0) -> dict:
    """Random tensors under MMDetection's DINO neck/head names and shapes. Tensors their init sets
    to zero (offset weights, attention weights, the last box layer) are random too, scaled so that
    the samples land a few pixels from the reference and the boxes move visibly."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape, scale=1.0: torch.randn(*shape, generator=g) * scale  # noqa: E731
    t: dict[str, torch.Tensor] = {}

    def linear(name: str, out: int, inp: int, scale: float | None = None) -> None:
        t[f"{name}.weight"] = rand(out, inp, scale=scale if scale is not None else 1 / math.sqrt(inp))
        t[f"{name}.bias"] = rand(out, scale=0.1)

    def norm(name: str, size: int) -> None:
        t[f"{name}.weight"] = 1 + rand(size, scale=0.1)
        t[f"{name}.bias"] = rand(size, scale=0.1)

    def msda(name: str) -> None:
        linear(f"{name}.sampling_offsets", HEADS * LEVELS * POINTS * 2, width, scale=0.02)
        t[f"{name}.sampling_offsets.bias"] = rand(HEADS * LEVELS * POINTS * 2, scale=2.0)
        linear(f"{name}.attention_weights", HEADS * LEVELS * POINTS, width, scale=0.05)
        linear(f"{name}.value_proj", width, width)
        linear(f"{name}.output_proj", width, width)

    def ffn_layers(name: str) -> None:
        linear(f"{name}.ffns.0.layers.0.0", ffn, width)
        linear(f"{name}.ffns.0.layers.1", width, ffn)

    for i in range(3):
        t[f"neck.convs.{i}.conv.weight"] = rand(width, cin, 1, 1, scale=1 / math.sqrt(cin))
        norm(f"neck.convs.{i}.gn", width)
    t["neck.extra_convs.0.conv.weight"] = rand(width, cin, 3, 3, scale=1 / math.sqrt(9 * cin))
    norm("neck.extra_convs.0.gn", width)
    tr = "bbox_head.transformer"
    t[f"{tr}.level_embeds"] = rand(LEVELS, width)
    for l in range(encoder_layers):
        msda(f"{tr}.encoder.layers.{l}.attentions.0")
        ffn_layers(f"{tr}.encoder.layers.{l}")
        for n in range(2):
            norm(f"{tr}.encoder.layers.{l}.norms.{n}", width)
    linear(f"{tr}.enc_output", width, width)
    norm(f"{tr}.enc_output_norm", width)
    t[f"{tr}.query_embed.weight"] = rand(queries, width)
    for l in range(decoder_layers):
        t[f"{tr}.decoder.layers.{l}.attentions.0.attn.in_proj_weight"] = rand(3 * width, width, scale=width ** -0.5)
        t[f"{tr}.decoder.layers.{l}.attentions.0.attn.in_proj_bias"] = rand(3 * width, scale=0.1)
        linear(f"{tr}.decoder.layers.{l}.attentions.0.attn.out_proj", width, width)
        msda(f"{tr}.decoder.layers.{l}.attentions.1")
        ffn_layers(f"{tr}.decoder.layers.{l}")
        for n in range(3):
            norm(f"{tr}.decoder.layers.{l}.norms.{n}", width)
    linear(f"{tr}.decoder.ref_point_head.0", width, 2 * width)
    linear(f"{tr}.decoder.ref_point_head.2", width, width)
    norm(f"{tr}.decoder.norm", width)
    for k in range(decoder_layers + 1):
        linear(f"bbox_head.cls_branches.{k}", classes, width)
        linear(f"bbox_head.reg_branches.{k}.0", width, width)
        linear(f"bbox_head.reg_branches.{k}.2", width, width)
        linear(f"bbox_head.reg_branches.{k}.4", 4, width, scale=0.3 / math.sqrt(width))
    t["bbox_head.label_embedding.weight"] = rand(classes, width)
    return t


# -- the reference computation -----------------------------------------------------------------

def _linear(t: dict, name: str, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, t[f"{name}.weight"], t[f"{name}.bias"])


def _layer_norm(t: dict, name: str, x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], t[f"{name}.weight"], t[f"{name}.bias"], eps=1e-5)


def inverse_sigmoid(x: torch.Tensor, eps: float) -> torch.Tensor:
    """mmdet's: clamp to [0, 1], then log(max(x, eps) / max(1 - x, eps))."""
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def neck(t: dict, maps: list[torch.Tensor]) -> list[torch.Tensor]:
    """ChannelMapper(kernel_size=1, GN 32, no activation, num_outs=4): 1x1 conv + GN per input, and a
    3x3 stride-2 conv + GN on the raw last input."""
    outs = [F.group_norm(F.conv2d(x, t[f"neck.convs.{i}.conv.weight"]), 32, t[f"neck.convs.{i}.gn.weight"],
                         t[f"neck.convs.{i}.gn.bias"]) for i, x in enumerate(maps)]
    extra = F.conv2d(maps[-1], t["neck.extra_convs.0.conv.weight"], stride=2, padding=1)
    outs.append(F.group_norm(extra, 32, t["neck.extra_convs.0.gn.weight"], t["neck.extra_convs.0.gn.bias"]))
    return outs


def level_masks(batch_shape: tuple[int, int], image_sizes: list[tuple[int, int]],
                level_shapes: list[tuple[int, int]]) -> list[torch.Tensor]:
    """DINOHead.forward: 1 on the padded batch, 0 inside each image, nearest-resized to every level."""
    mask = torch.ones(len(image_sizes), *batch_shape)
    for b, (h, w) in enumerate(image_sizes):
        mask[b, :h, :w] = 0
    return [F.interpolate(mask[None], size=hw)[0].bool() for hw in level_shapes]


def _interleave(angles: torch.Tensor) -> torch.Tensor:
    """Channel 2j = sin, 2j+1 = cos of the angle of that channel (equal frequencies per pair)."""
    out = torch.empty_like(angles)
    out[..., 0::2] = angles[..., 0::2].sin()
    out[..., 1::2] = angles[..., 1::2].cos()
    return out


def sine_encoding(mask: torch.Tensor, feats: int = 128, temperature: float = 20.0) -> torch.Tensor:
    """SinePositionalEncoding(normalize=True): (B, 2*feats, H, W), y block then x block."""
    valid = (~mask).float()
    y = valid.cumsum(1)
    x = valid.cumsum(2)
    y = y / (y[:, -1:, :] + 1e-6) * 2 * math.pi
    x = x / (x[:, :, -1:] + 1e-6) * 2 * math.pi
    freq = temperature ** (2 * torch.div(torch.arange(feats), 2, rounding_mode="floor") / feats)
    return torch.cat([_interleave(y[..., None] / freq), _interleave(x[..., None] / freq)], -1).permute(0, 3, 1, 2)


def box_sine_embedding(boxes: torch.Tensor, feats: int = 128) -> torch.Tensor:
    """DinoTransformerDecoder.gen_sineembed_for_position: (..., 4) cx cy w h -> (..., 4*feats) in the
    order y, x, w, h, temperature 10000."""
    freq = 10000 ** (2 * torch.div(torch.arange(feats), 2, rounding_mode="floor") / feats)
    parts = [_interleave(boxes[..., c, None] * 2 * math.pi / freq) for c in range(4)]
    return torch.cat([parts[1], parts[0], parts[2], parts[3]], -1)


def valid_ratios(masks: list[torch.Tensor]) -> torch.Tensor:
    """(B, L, 2) as (w, h): unmasked rows of the first column / H, columns of the first row / W."""
    return torch.stack([torch.stack([(~m[:, 0, :]).sum(1).float() / m.shape[2],
                                     (~m[:, :, 0]).sum(1).float() / m.shape[1]], -1) for m in masks], 1)


def deformable_attention(t: dict, name: str, query: torch.Tensor, value: torch.Tensor, padding: torch.Tensor,
                         reference: torch.Tensor, shapes: list[tuple[int, int]]) -> torch.Tensor:
    """mmcv MultiScaleDeformableAttention without the residual: ``query`` already holds the position
    term; ``reference`` (B, Nq, L, 2) points or (B, Nq, L, 4) boxes."""
    b, nq, width = query.shape
    d = width // HEADS
    v = _linear(t, f"{name}.value_proj", value).masked_fill(padding[..., None], 0.0)
    offsets = _linear(t, f"{name}.sampling_offsets", query).view(b, nq, HEADS, LEVELS, POINTS, 2)
    weights = _linear(t, f"{name}.attention_weights", query).view(b, nq, HEADS, LEVELS * POINTS).softmax(-1)
    weights = weights.view(b, nq, HEADS, LEVELS, POINTS)
    ref = reference[:, :, None, :, None, :]
    if reference.shape[-1] == 2:
        size = torch.tensor([(w, h) for h, w in shapes], dtype=query.dtype)
        locations = ref + offsets / size[None, None, None, :, None, :]
    else:
        locations = ref[..., :2] + offsets / POINTS * ref[..., 2:] * 0.5
    out = query.new_zeros(b, HEADS, d, nq)
    start = 0
    for level, (h, w) in enumerate(shapes):
        maps = v[:, start:start + h * w].view(b, h, w, HEADS, d).permute(0, 3, 4, 1, 2).reshape(b * HEADS, d, h, w)
        grid = 2 * locations[:, :, :, level] - 1                                    # (B, Nq, heads, P, 2)
        grid = grid.permute(0, 2, 1, 3, 4).reshape(b * HEADS, nq, POINTS, 2)
        samples = F.grid_sample(maps, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        a = weights[:, :, :, level].permute(0, 2, 1, 3).reshape(b * HEADS, 1, nq, POINTS)
        out += (samples * a).sum(-1).view(b, HEADS, d, nq)
        start += h * w
    return _linear(t, f"{name}.output_proj", out.permute(0, 3, 1, 2).reshape(b, nq, width))


def self_attention(t: dict, name: str, x: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """nn.MultiheadAttention(8 heads) as mmcv's wrapper calls it: query = key = x + pos, value = x;
    ``mask`` True = blocked. Without the residual."""
    b, n, width = x.shape
    d = width // HEADS
    wq, wk, wv = t[f"{name}.in_proj_weight"].chunk(3)
    bq, bk, bv = t[f"{name}.in_proj_bias"].chunk(3)
    split = lambda y: y.view(b, n, HEADS, d).transpose(1, 2)  # noqa: E731
    q, k, v = split(F.linear(x + pos, wq, bq)), split(F.linear(x + pos, wk, bk)), split(F.linear(x, wv, bv))
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)
    if mask is not None:
        scores = scores.masked_fill(mask, float("-inf"))
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, width)
    return _linear(t, f"{name}.out_proj", out)


def _ffn(t: dict, name: str, x: torch.Tensor) -> torch.Tensor:
    return _linear(t, f"{name}.ffns.0.layers.1", F.relu(_linear(t, f"{name}.ffns.0.layers.0.0", x)))


def _reg(t: dict, k: int, x: torch.Tensor) -> torch.Tensor:
    x = F.relu(_linear(t, f"bbox_head.reg_branches.{k}.0", x))
    x = F.relu(_linear(t, f"bbox_head.reg_branches.{k}.2", x))
    return _linear(t, f"bbox_head.reg_branches.{k}.4", x)


def transformer(t: dict, features: list[torch.Tensor], masks: list[torch.Tensor],
                dn_content: torch.Tensor | None = None, dn_box_logits: torch.Tensor | None = None,
                attn_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """DinoTransformer.forward + DINOHead.forward on neck outputs and level masks.

    Returns ``memory`` (B, S, D), ``enc_logits``/``enc_boxes`` of the top-k proposals (``topk_score``,
    ``topk_anchor``), and ``logits``/``boxes`` (decoder layers, B, pad + Q, ...)."""
    tr = "bbox_head.transformer"
    shapes = [tuple(f.shape[-2:]) for f in features]
    num_dec = 1 + max(int(k.split(".")[4]) for k in t if k.startswith(f"{tr}.decoder.layers."))
    num_enc = 1 + max(int(k.split(".")[4]) for k in t if k.startswith(f"{tr}.encoder.layers."))
    x = torch.cat([f.flatten(2).transpose(1, 2) for f in features], 1)
    padding = torch.cat([m.flatten(1) for m in masks], 1)
    pos = torch.cat([sine_encoding(m).flatten(2).transpose(1, 2) + t[f"{tr}.level_embeds"][l]
                     for l, m in enumerate(masks)], 1)
    ratios = valid_ratios(masks)
    b = x.shape[0]
    # encoder: pixel centres in units of the valid area, then scaled to every level's valid area
    refs = []
    for l, (h, w) in enumerate(shapes):
        ys, xs = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
        refs.append(torch.stack([xs.reshape(1, -1) / (ratios[:, None, l, 0] * w),
                                 ys.reshape(1, -1) / (ratios[:, None, l, 1] * h)], -1))
    reference = torch.cat(refs, 1)[:, :, None] * ratios[:, None]
    for l in range(num_enc):
        name = f"{tr}.encoder.layers.{l}"
        x = _layer_norm(t, f"{name}.norms.0", x + deformable_attention(
            t, f"{name}.attentions.0", x + pos, x, padding, reference, shapes))
        x = _layer_norm(t, f"{name}.norms.1", x + _ffn(t, name, x))
    memory = x
    # two-stage proposals: one anchor per position, 0.05 * 2^level wide, centred in the valid area
    proposals = []
    start = 0
    for l, (h, w) in enumerate(shapes):
        m = padding[:, start:start + h * w].view(b, h, w)
        vh, vw = (~m[:, :, 0]).sum(1).float(), (~m[:, 0, :]).sum(1).float()
        ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                                indexing="ij")
        cx = (xs[None] + 0.5) / vw[:, None, None]
        cy = (ys[None] + 0.5) / vh[:, None, None]
        wh = torch.full_like(cx, 0.05 * 2 ** l)
        proposals.append(torch.stack([cx, cy, wh, wh], -1).view(b, -1, 4))
        start += h * w
    proposals = torch.cat(proposals, 1)
    inside = ((proposals > 0.01) & (proposals < 0.99)).all(-1)
    unusable = padding | ~inside
    anchor_logits = torch.log(proposals / (1 - proposals)).masked_fill(unusable[..., None], float("inf"))
    selected = _layer_norm(t, f"{tr}.enc_output_norm",
                           _linear(t, f"{tr}.enc_output", memory.masked_fill(unusable[..., None], 0.0)))
    enc_logits = _linear(t, f"bbox_head.cls_branches.{num_dec}", selected)
    enc_box_logits = _reg(t, num_dec, selected) + anchor_logits
    queries = t[f"{tr}.query_embed.weight"].shape[0]
    top = enc_logits.max(-1).values.topk(queries, dim=1).indices
    top_logits = enc_logits.gather(1, top[..., None].expand(-1, -1, enc_logits.shape[-1]))
    top_box_logits = enc_box_logits.gather(1, top[..., None].expand(-1, -1, 4))
    # decoder: the learned content queries, references from the top-k boxes (denoising ones first)
    q = t[f"{tr}.query_embed.weight"][None].expand(b, -1, -1)
    box_logits = top_box_logits
    if dn_content is not None:
        q = torch.cat([dn_content, q], 1)
        box_logits = torch.cat([dn_box_logits, box_logits], 1)
    ref = box_logits.sigmoid()
    ratios4 = torch.cat([ratios, ratios], -1)
    states, references = [], [ref]
    for l in range(num_dec):
        name = f"{tr}.decoder.layers.{l}"
        ref_in = ref[:, :, None] * ratios4[:, None]
        qpos = _linear(t, f"{tr}.decoder.ref_point_head.2",
                       F.relu(_linear(t, f"{tr}.decoder.ref_point_head.0", box_sine_embedding(ref_in[:, :, 0]))))
        q = _layer_norm(t, f"{name}.norms.0", q + self_attention(t, f"{name}.attentions.0.attn", q, qpos, attn_mask))
        q = _layer_norm(t, f"{name}.norms.1", q + deformable_attention(
            t, f"{name}.attentions.1", q + qpos, memory, padding, ref_in, shapes))
        q = _layer_norm(t, f"{name}.norms.2", q + _ffn(t, name, q))
        states.append(_layer_norm(t, f"{tr}.decoder.norm", q))
        ref = (_reg(t, l, q) + inverse_sigmoid(ref, 1e-3)).sigmoid()   # refined from the un-normed state
        references.append(ref)
    logits = torch.stack([_linear(t, f"bbox_head.cls_branches.{l}", s) for l, s in enumerate(states)])
    boxes = torch.stack([(_reg(t, l, s) + inverse_sigmoid(references[l], 1e-3)).sigmoid()
                         for l, s in enumerate(states)])
    return dict(memory=memory, enc_logits=top_logits, enc_boxes=top_box_logits.sigmoid(), logits=logits, boxes=boxes)


def denoising_queries(t: dict, boxes: list[torch.Tensor], labels: list[torch.Tensor], queries: int,
                      generator: torch.Generator, dn_number: int = 100, label_noise: float = 0.5,
                      box_noise: float = 1.0) -> dict:
    """CdnQueryGenerator.forward (dynamic groups) on normalised cxcywh ``boxes`` and 0-based ``labels``
    per image, drawing its random numbers in their order from ``generator``.

    Returns ``content`` (B, pad, D), ``box_logits`` (B, pad, 4), ``attn_mask`` (pad + Q square, True
    = blocked), ``pad_size``, ``num_groups``."""
    classes, width = t["bbox_head.label_embedding.weight"].shape
    counts = [len(l) for l in labels]
    single = max(counts)
    groups = max(1, dn_number // single) if single else 1
    n = sum(counts)
    copies = 2 * groups
    all_labels = torch.cat(labels).repeat(copies)
    all_boxes = torch.cat(boxes).repeat(copies, 1)
    image = torch.cat([torch.full((c,), b) for b, c in enumerate(counts)]).repeat(copies)
    noisy_labels = all_labels.clone()
    p = torch.rand(all_labels.shape, generator=generator)
    chosen = torch.nonzero(p < label_noise * 0.5).view(-1)
    noisy_labels[chosen] = torch.randint(0, classes, chosen.shape, generator=generator)
    negative = torch.zeros(copies * n, dtype=torch.bool)
    for g in range(groups):
        negative[(2 * g + 1) * n:(2 * g + 2) * n] = True
    corners = torch.cat([all_boxes[:, :2] - all_boxes[:, 2:] / 2, all_boxes[:, :2] + all_boxes[:, 2:] / 2], 1)
    half = torch.cat([all_boxes[:, 2:] / 2, all_boxes[:, 2:] / 2], 1)
    sign = torch.randint(0, 2, all_boxes.shape, generator=generator).float() * 2 - 1
    magnitude = torch.rand(all_boxes.shape, generator=generator) + negative[:, None].float()
    corners = (corners + sign * magnitude * half * box_noise).clamp(0, 1)
    noisy = torch.cat([(corners[:, :2] + corners[:, 2:]) / 2, corners[:, 2:] - corners[:, :2]], 1)
    pad = 2 * single * groups
    content = torch.zeros(len(labels), pad, width)
    box_logits = torch.zeros(len(labels), pad, 4)
    slot = torch.cat([torch.arange(c) for c in counts]).repeat(copies) + \
        torch.arange(copies).repeat_interleave(n) * single
    content[image, slot] = t["bbox_head.label_embedding.weight"][noisy_labels]
    box_logits[image, slot] = inverse_sigmoid(noisy, 1e-3)
    mask = torch.zeros(pad + queries, pad + queries, dtype=torch.bool)
    mask[pad:, :pad] = True
    for g in range(groups):
        rows = slice(2 * single * g, 2 * single * (g + 1))
        mask[rows, :2 * single * g] = True
        mask[rows, 2 * single * (g + 1):pad] = True
    return dict(content=content, box_logits=box_logits, attn_mask=mask, pad_size=pad, num_groups=groups)


# -- the tests --------------------------------------------------------------------------------------

def _extra(flat: dict) -> dict:
    """MMDetection keys grouped by their first component, as ``load_original_checkpoint`` does."""
    extra: dict = {}
    for key, value in flat.items():
        prefix, rest = key.split(".", 1)
        extra.setdefault(prefix, {})[rest] = value
    return extra


def test_dino_layout_is_read_from_the_tensors_and_other_heads_are_refused_by_key():
    from piip.compat.original import CheckpointError
    from piip.tasks.detection.authors_dino_heads import convert_dino_heads, dino_layout, has_dino_heads
    from piip.tasks.detection.authors_heads import has_authors_heads, has_mask_rcnn_heads

    theirs = random_dino_state(48, classes=7, queries=30, encoder_layers=3, decoder_layers=2, ffn=96)
    extra = _extra(theirs)
    assert has_dino_heads(extra) and has_authors_heads(extra) and not has_mask_rcnn_heads(extra)
    assert dino_layout(extra) == dict(num_classes=7, num_queries=30, encoder_layers=3, decoder_layers=2,
                                      transformer_ffn_dim=96, fpn_channels=256)
    converted, names = convert_dino_heads(extra)
    assert len(converted) == len(theirs) and set(names.values()) == set(theirs)
    for ours, key in names.items():                                       # renamed, never changed
        assert converted[ours] is theirs[key]
    tr = "bbox_head.transformer"
    assert names["transformer.encoder.layers.2.norm2.bias"] == f"{tr}.encoder.layers.2.norms.1.bias"
    assert names["transformer.decoder.layers.1.norm3.weight"] == f"{tr}.decoder.layers.1.norms.2.weight"
    assert names["transformer.decoder.layers.0.linear1.weight"] == f"{tr}.decoder.layers.0.ffns.0.layers.0.0.weight"
    assert names["transformer.decoder.layers.0.self_attn.in_proj_weight"] == \
        f"{tr}.decoder.layers.0.attentions.0.attn.in_proj_weight"
    assert names["transformer.proposal_norm.weight"] == f"{tr}.enc_output_norm.weight"
    assert names["backbone.neck.extra.1.bias"] == "neck.extra_convs.0.gn.bias"

    def changed(**edits) -> dict:
        state = {k: v for k, v in theirs.items() if edits.get(k, v) is not None}
        state.update({k: v for k, v in edits.items() if v is not None})
        return _extra(state)

    attn = f"{tr}.decoder.layers.1.attentions.1"
    refused = {  # what changes -> the key the message must name
        f"{attn}.attention_weights.weight": changed(**{                   # 2 sampling points per level
            f"{attn}.attention_weights.weight": torch.zeros(8 * 4 * 2, 256),
            f"{attn}.sampling_offsets.weight": torch.zeros(8 * 4 * 2 * 2, 256)}),
        f"{tr}.level_embeds": changed(**{f"{tr}.level_embeds": torch.zeros(5, 256)}),
        "bbox_head.cls_branches": changed(**{"bbox_head.cls_branches.2.weight": None,   # one-stage
                                             "bbox_head.cls_branches.2.bias": None}),
        "bbox_head.label_embedding": changed(**{"bbox_head.label_embedding.weight": torch.zeros(8, 256)}),
        "neck.convs": changed(**{"neck.convs.3.conv.weight": torch.zeros(256, 48, 1, 1)}),
        f"{tr}.decoder.layers.1.ffns.0.layers.0.0.weight": changed(**{
            f"{tr}.decoder.layers.1.ffns.0.layers.0.0.weight": torch.zeros(128, 256)}),
        "bbox_head.cls_branches.0.weight": changed(**{                    # use_2fc_cls_branch
            "bbox_head.cls_branches.0.weight": None, "bbox_head.cls_branches.0.0.weight": torch.zeros(384, 256)}),
    }
    for key, heads in refused.items():
        with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
            dino_layout(heads)
    with pytest.raises(CheckpointError, match=r"neck\.convs\.0\.conv\.bias"):   # a conv bias has no place
        convert_dino_heads(changed(**{"neck.convs.0.conv.bias": torch.zeros(256)}))


def _padded_into_top_k(theirs: dict, target: float = 3.4) -> None:
    """Let the encoder branch's constant logit of padded and unusable tokens (memory zeroed there)
    rank inside the top-k of the padded image, as their quirk allows: class 0 of that branch gets the
    direction of the constant's normalised input, so that its logit there is ``target``."""
    tr = "bbox_head.transformer"
    k = max(int(key.split(".")[2]) for key in theirs if key.startswith("bbox_head.cls_branches."))  # the encoder's
    width = theirs[f"{tr}.level_embeds"].shape[1]
    normed = F.layer_norm(theirs[f"{tr}.enc_output.bias"], (width,))
    direction = normed * theirs[f"{tr}.enc_output_norm.weight"]
    constant = _linear(theirs, f"bbox_head.cls_branches.{k}", _layer_norm(theirs, f"{tr}.enc_output_norm",
                                                                          theirs[f"{tr}.enc_output.bias"]))[0]
    theirs[f"bbox_head.cls_branches.{k}.weight"][0] += (target - constant) / (direction @ direction) * direction


def test_converted_dino_computes_what_the_authors_dino_computes():
    """Fixed backbone maps of a padded batch of two images of different sizes: the converted neck, the
    encoder memory, the encoder's top-k proposals (logits and boxes, padded tokens among them) and
    every decoder layer's logits and boxes equal the authors' computation; so do the denoising
    queries for a seeded generator (contents, box logits, attention mask, groups) and the decoder
    outputs with them prepended."""
    from piip.tasks.detection import DINODetector, detr_parts
    from piip.tasks.detection.authors_heads import with_authors_heads

    torch.manual_seed(0)
    theirs = random_dino_state(64)
    _padded_into_top_k(theirs)
    body = piip.PIIP(tiny_config(task="det"))
    det, rest, count = with_authors_heads(body, body.state_dict(), _extra(theirs), {})
    assert isinstance(det, DINODetector) and rest == {} and count == len(body.state_dict()) + len(theirs)
    assert (det.config.kind, det.config.num_classes, det.config.num_queries, det.config.encoder_layers,
            det.config.decoder_layers, det.config.transformer_ffn_dim) == ("dino", 5, 20, 2, 2, 64)
    assert det.config.class_names == ()                                   # 5 classes: not COCO's

    batch, sizes = (256, 320), [(256, 320), (200, 250)]
    g = torch.Generator().manual_seed(1)
    maps = [torch.randn(2, 64, batch[0] // s, batch[1] // s, generator=g) for s in (8, 16, 32)]
    check = lambda ours, ref: torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)  # noqa: E731
    with torch.no_grad():
        features = neck(theirs, maps)
        for ours, ref in zip(det.backbone.neck(maps), features, strict=True):
            check(ours, ref)
        masks = level_masks(batch, sizes, [f.shape[-2:] for f in features])
        for ours, ref in zip(detr_parts.padding_masks(sizes, batch, [f.shape[-2:] for f in features]), masks,
                             strict=True):
            assert torch.equal(ours, ref)
        ref = transformer(theirs, features, masks)
        out = det.forward_transformer(features, masks)
        assert out.dn_meta is None and out.logits.shape == (2, 2, 20, 5)
        padded_chosen = (ref["enc_boxes"][1] == 1).all(-1).sum()
        assert 0 < padded_chosen < 20 and not (ref["enc_boxes"][0] == 1).all(-1).any()
        for name in ("memory", "enc_logits", "enc_boxes", "logits", "boxes"):
            check(getattr(out, name), ref[name])

        # contrastive denoising: 2 and 1 objects, 100 queries -> 50 groups of 4 slots
        boxes = [torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.6, 0.55, 0.5, 0.2]]), torch.tensor([[0.5, 0.5, 0.4, 0.6]])]
        labels = [torch.tensor([1, 4]), torch.tensor([3])]
        dn = detr_parts.denoising_queries(labels, boxes, det.head.label_embedding, 20, det.config.dn_queries,
                                          det.config.dn_label_noise, det.config.dn_box_noise,
                                          generator=torch.Generator().manual_seed(7))
        ref_dn = denoising_queries(theirs, boxes, labels, 20, torch.Generator().manual_seed(7))
        assert (dn.meta.pad_size, dn.meta.num_groups) == (ref_dn["pad_size"], ref_dn["num_groups"]) == (200, 50)
        assert torch.equal(dn.attn_mask, ref_dn["attn_mask"])
        check(dn.content, ref_dn["content"])
        check(dn.box_logits, ref_dn["box_logits"])
        ref = transformer(theirs, features, masks, ref_dn["content"], ref_dn["box_logits"], ref_dn["attn_mask"])
        out = det.forward_transformer(features, masks, denoising=dn)
        assert out.dn_meta == dn.meta and out.logits.shape == (2, 2, 220, 5)
        for name in ("memory", "enc_logits", "enc_boxes", "logits", "boxes"):
            check(getattr(out, name), ref[name])


def _authors_file(fixture: str, heads: dict, *, drop: tuple[str, ...] = ()) -> tuple[dict, dict]:
    """An MMDetection DINO file: a golden fixture's backbone (the authors' keys, ``is_dino=True``) and
    ``heads``; returns the ``torch.save`` object and the backbone kwargs."""
    from safetensors.torch import load_file

    kwargs = {**json.loads((FIXTURES / f"{fixture}.json").read_text())["kwargs"], "is_dino": True}
    tensors = load_file(str(FIXTURES / f"{fixture}.safetensors"))
    backbone = {f"backbone.{k[len('state_dict/'):]}": v.float() for k, v in tensors.items()
                if k.startswith("state_dict/") and not k[len("state_dict/"):].startswith(drop)}
    return {"meta": {"epoch": 36}, "state_dict": {**backbone, **heads}}, kwargs


def test_piip_convert_turns_the_authors_dino_files_into_detectors(tmp_path):
    """Their two released layouts: a 3-branch DINO backbone (``is_dino=True`` still returns the
    stride-4 map, DINO reads the last three) through ``piip convert``, 80 classes -> COCO's names;
    a 2-branch one (no stride-4 map: ``fpn_levels=(1, 2, 3)``, no ``fpn1`` tensors) through
    ``convert_checkpoint`` with test settings. Both load as complete DINO detectors that detect."""
    from piip.cli import main
    from piip.compat.original import convert_checkpoint
    from piip.tasks.detection import DINODetector

    heads = random_dino_state(64, classes=80)
    obj, kwargs = _authors_file("det3_deit", heads)
    torch.save(obj, tmp_path / "dino3.pth")
    (tmp_path / "kwargs.json").write_text(json.dumps(kwargs))
    assert main(["convert", str(tmp_path / "dino3.pth"), "--config", str(tmp_path / "kwargs.json"),
                 "-o", str(tmp_path / "dino3.safetensors")]) == 0
    det = piip.load(str(tmp_path / "dino3.safetensors"))
    assert isinstance(det, DINODetector) and det.config.kind == "dino" and det.config.num_classes == 80
    assert det.config.class_names[:2] == ("person", "bicycle") and det.config.category_ids[-1] == 90
    assert det.config.backbone.fpn_levels == (0, 1, 2, 3) and det.config.detections_per_img == 300
    state = det.state_dict()
    tr = "bbox_head.transformer"
    for ours, key in (("transformer.decoder.layers.1.cross_attn.sampling_offsets.bias",
                       f"{tr}.decoder.layers.1.attentions.1.sampling_offsets.bias"),
                      ("transformer.proposal_proj.weight", f"{tr}.enc_output.weight"),
                      ("head.reg_branches.2.4.weight", "bbox_head.reg_branches.2.4.weight"),
                      ("backbone.neck.convs.2.0.weight", "neck.convs.2.conv.weight")):
        assert torch.equal(state[ours], heads[key]), ours
    assert torch.equal(state["backbone.body.merge.weights"], torch.stack([obj["state_dict"][f"backbone.w{i}"]
                                                                          for i in (1, 2, 3)]))

    obj, kwargs = _authors_file("det2_internvit", random_dino_state(64, queries=30), drop=("fpn1.",))
    torch.save(obj, tmp_path / "dino2.pth")
    summary = convert_checkpoint(tmp_path / "dino2.pth", kwargs, tmp_path / "dino2.safetensors",
                                 heads={"min_size": 96, "max_size": 128, "size_divisible": 64})
    assert summary["task"] == "det" and summary["model"] == "DINODetector" and summary["extra"] == {}
    det = piip.load(str(tmp_path / "dino2.safetensors")).eval()
    assert det.config.backbone.fpn_levels == (1, 2, 3) and det.config.num_queries == 30
    assert det.config.resize == (96, 128, 64)
    with torch.no_grad():
        found = det([torch.rand(3, 100, 120), torch.rand(3, 90, 128)])
    for d, (h, w) in zip(found, [(100, 120), (90, 128)], strict=True):
        assert len(d["boxes"]) == 30 * 5                                    # queries x classes < 300
        assert 1 <= d["labels"].min() and d["labels"].max() <= 5
        assert (d["boxes"][:, 0::2] <= w).all() and (d["boxes"][:, 1::2] <= h).all()
