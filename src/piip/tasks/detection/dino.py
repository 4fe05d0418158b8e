"""The ``"dino"`` detector kind: DINO (two-stage deformable DETR with contrastive denoising, mixed
query selection and look-forward-twice box refinement) around a dense piip backbone, computing
what the authors' MMDetection 2.25 DINO computes (``docs/design/cascade_and_dino.md``, "DINO";
the parts are in :mod:`.detr_parts`).

* backbone and neck (:class:`DINOBackbone`): the stride 8/16/32 maps of the PIIP (``"1"`` to
  ``"3"``, whether it builds level ``"0"`` too or not), each mapped to ``fpn_channels`` (256) by a
  1x1 conv + GroupNorm, and a stride-64 level from a 3x3 stride-2 conv + GroupNorm of the raw
  stride-32 map;
* encoder (:class:`DeformableEncoder`): post-norm layers of 4-level multi-scale deformable
  self-attention (8 heads, 4 points) and a ReLU FFN, on the maps plus sine encodings and learned
  level embeddings;
* two-stage query selection (:class:`DINOTransformer`): one anchor per encoder token, the extra
  (last) class and box branches on the transformed memory, the top ``num_queries`` tokens by their
  best class logit as the decoder's reference boxes; the content queries are learned
  (``query_embed``), not taken from the encoder;
* decoder (:class:`DINODecoder`): post-norm layers of self-attention, deformable cross-attention
  around the reference boxes and an FFN, the positional query an MLP of the boxes' sine embedding,
  the boxes refined after every layer;
* head (:class:`DINOHead`): per-layer class and box branches (look forward twice), the denoising
  label table, the losses (39 terms with 6 decoder layers) and the detections: the top
  ``detections_per_img`` sigmoid scores over queries x classes, no NMS.

The backbone runs under ``backbone_dtype`` autocast; the neck, the transformer, the head and the
losses always run in float32, autocast disabled.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_convert

from ...models.piip import PIIP
from ...ops import MSDeformAttn
from ...precision import autocast, autocast_dtype
from .detr_parts import (ChannelMapper, DenoisingMeta, DenoisingQueries, box_sine_embedding, denoising_losses,
                         denoising_queries, encoder_proposals, encoder_reference_points, inverse_sigmoid,
                         padding_masks, set_prediction_losses, sine_positional_encoding, valid_ratios)
from .model import Detector, DetectorConfig, detect_in_size_groups, input_transform
from .rcnn_parts import MMDetTransform

__all__ = ["assemble_dino", "DINODetector", "DINOOutputs", "DINOBackbone", "DINOTransformer", "DINOHead",
           "DeformableEncoder", "DINODecoder"]

#: the backbone maps DINO reads (strides 8, 16, 32)
BACKBONE_LEVELS = ("1", "2", "3")
NUM_LEVELS, NUM_HEADS, NUM_POINTS = 4, 8, 4
#: ``inverse_sigmoid``'s eps wherever DINO's boxes are refined
REFINE_EPS = 1e-3


class DINOBackbone(nn.Module):
    """The dense piip backbone (``body``) and the :class:`~.detr_parts.ChannelMapper` neck: four
    ``width``-channel maps at strides 8, 16, 32 and 64. The body runs under ``dtype`` autocast
    (``None``: as called), the neck in float32."""

    def __init__(self, body: PIIP, width: int = 256, dtype: torch.dtype | None = None):
        super().__init__()
        if not isinstance(body, PIIP) or body.config.task != "det":
            raise ValueError("the detector's backbone must be a dense piip model (create_model(..., task='det'))")
        if not {1, 2, 3} <= set(body.config.fpn_levels):
            raise ValueError(f"DINO reads the backbone's levels 1, 2, 3 (strides 8-32), got fpn_levels "
                             f"{body.config.fpn_levels}")
        self.body = body
        self.neck = ChannelMapper(body.out_channels, width, len(BACKBONE_LEVELS))
        self.dtype = dtype

    def forward(self, images: Tensor) -> list[Tensor]:
        with autocast(images.device.type, self.dtype):
            maps = self.body(images)
        with torch.autocast(images.device.type, enabled=False):
            return self.neck([maps[level].float() for level in BACKBONE_LEVELS])


# -- the transformer --------------------------------------------------------------------------------

class DeformableEncoderLayer(nn.Module):
    """Post-norm: deformable self-attention (query = features + positional term, value = features),
    residual, ``norm1``; ReLU FFN, residual, ``norm2``."""

    def __init__(self, width: int, ffn_dim: int):
        super().__init__()
        self.self_attn = MSDeformAttn(width, NUM_LEVELS, NUM_HEADS, NUM_POINTS, ratio=1.0)
        self.norm1 = nn.LayerNorm(width)
        self.linear1 = nn.Linear(width, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, width)
        self.norm2 = nn.LayerNorm(width)

    def forward(self, x: Tensor, pos: Tensor, reference_points: Tensor, shapes: Sequence[tuple[int, int]],
                padding_mask: Tensor) -> Tensor:
        x = self.norm1(x + self.self_attn(x + pos, reference_points, x, shapes, padding_mask))
        return self.norm2(x + self.linear2(F.relu(self.linear1(x))))


class DeformableEncoder(nn.Module):
    """``num_layers`` :class:`DeformableEncoderLayer`; no final norm (MMDetection builds one only
    for pre-norm stacks)."""

    def __init__(self, width: int, ffn_dim: int, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(DeformableEncoderLayer(width, ffn_dim) for _ in range(num_layers))

    def forward(self, x: Tensor, pos: Tensor, reference_points: Tensor, shapes: Sequence[tuple[int, int]],
                padding_mask: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x, pos, reference_points, shapes, padding_mask)
        return x


class DINODecoderLayer(nn.Module):
    """Post-norm: self-attention (query and key = queries + positional term, value = queries, the
    denoising mask), residual, ``norm1``; deformable cross-attention to the memory around the
    reference boxes, residual, ``norm2``; ReLU FFN, residual, ``norm3``."""

    def __init__(self, width: int, ffn_dim: int):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(width, NUM_HEADS, batch_first=True)
        self.norm1 = nn.LayerNorm(width)
        self.cross_attn = MSDeformAttn(width, NUM_LEVELS, NUM_HEADS, NUM_POINTS, ratio=1.0)
        self.norm2 = nn.LayerNorm(width)
        self.linear1 = nn.Linear(width, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, width)
        self.norm3 = nn.LayerNorm(width)

    def forward(self, x: Tensor, pos: Tensor, reference_boxes: Tensor, memory: Tensor,
                shapes: Sequence[tuple[int, int]], padding_mask: Tensor, attn_mask: Tensor | None) -> Tensor:
        q = x + pos
        x = self.norm1(x + self.self_attn(q, q, x, attn_mask=attn_mask, need_weights=False)[0])
        x = self.norm2(x + self.cross_attn(x + pos, reference_boxes, memory, shapes, padding_mask))
        return self.norm3(x + self.linear2(F.relu(self.linear1(x))))


class DINODecoder(nn.Module):
    """``num_layers`` :class:`DINODecoderLayer` with box refinement (``DinoTransformerDecoder``).

    Before each layer the reference boxes ``r`` (normalised to the valid area) are scaled by every
    level's valid ratios for the cross-attention, and the positional query is ``ref_point_head`` of
    the sine embedding of the level-0 scaled box. After layer k, ``reg_branches[k]`` of the layer's
    **un-normed** output refines the boxes: ``sigmoid(delta + inverse_sigmoid(r, 1e-3))``, passed on
    detached. The layer outputs are returned after the shared ``norm`` (the head regresses from
    these normed states: a quirk kept from DINO).
    """

    def __init__(self, width: int, ffn_dim: int, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(DINODecoderLayer(width, ffn_dim) for _ in range(num_layers))
        self.ref_point_head = nn.Sequential(nn.Linear(2 * width, width), nn.ReLU(), nn.Linear(width, width))
        self.norm = nn.LayerNorm(width)

    def forward(self, queries: Tensor, reference_boxes: Tensor, memory: Tensor, shapes: Sequence[tuple[int, int]],
                padding_mask: Tensor, ratios: Tensor, reg_branches: nn.ModuleList,
                attn_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Returns the normed states ``(layers, B, Nq, D)`` and the references ``(layers + 1, B,
        Nq, 4)``: the initial boxes, then each layer's refined boxes, **not** detached (layer k's
        input is entry k)."""
        states, references = [], [reference_boxes]
        x = queries
        box_ratios = torch.cat([ratios, ratios], -1)[:, None]  # (B, 1, L, 4)
        for k, layer in enumerate(self.layers):
            scaled = reference_boxes[:, :, None] * box_ratios
            pos = self.ref_point_head(box_sine_embedding(scaled[:, :, 0], x.shape[-1] // 2))
            x = layer(x, pos, scaled, memory, shapes, padding_mask, attn_mask)
            refined = (reg_branches[k](x) + inverse_sigmoid(reference_boxes, REFINE_EPS)).sigmoid()
            reference_boxes = refined.detach()
            states.append(self.norm(x))
            references.append(refined)
        return torch.stack(states), torch.stack(references)


class TransformerOutputs(NamedTuple):
    """What :class:`DINOTransformer` returns (see :class:`DINOOutputs` for the shapes)."""

    memory: Tensor
    enc_logits: Tensor
    enc_boxes: Tensor
    states: Tensor
    references: Tensor


class DINOTransformer(nn.Module):
    """The encoder, the two-stage query selection and the decoder (``DinoTransformer``).

    Parameters: ``level_embeds`` ``(4, D)``, ``encoder``, ``proposal_proj`` / ``proposal_norm`` (the
    authors' ``enc_output`` / ``enc_output_norm``), ``query_embed`` ``(num_queries, D)``, ``decoder``.
    Initialisation as ``DinoTransformer.init_weights``: Xavier-uniform on every parameter of more
    than one dimension, then the deformable attentions' own init, then N(0, 1) level embeddings and
    content queries.
    """

    def __init__(self, width: int, num_queries: int, encoder_layers: int, decoder_layers: int, ffn_dim: int):
        super().__init__()
        self.num_queries = num_queries
        self.level_embeds = nn.Parameter(torch.empty(NUM_LEVELS, width))
        self.encoder = DeformableEncoder(width, ffn_dim, encoder_layers)
        self.proposal_proj = nn.Linear(width, width)
        self.proposal_norm = nn.LayerNorm(width)
        self.query_embed = nn.Embedding(num_queries, width)
        self.decoder = DINODecoder(width, ffn_dim, decoder_layers)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The authors' order: Xavier everywhere, then what the deformable attentions and the
        embeddings set for themselves."""
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for module in self.modules():
            if isinstance(module, MSDeformAttn):
                module.reset_parameters()
        nn.init.normal_(self.level_embeds)
        nn.init.normal_(self.query_embed.weight)

    def forward(self, features: Sequence[Tensor], masks: Sequence[Tensor], cls_branches: nn.ModuleList,
                reg_branches: nn.ModuleList, denoising: DenoisingQueries | None = None) -> TransformerOutputs:
        """``features``: the 4 neck maps ``(B, D, H_l, W_l)``; ``masks``: their padding masks; the
        head's branches (the last ones score the encoder's proposals); ``denoising``: the training
        batch's denoising queries, prepended to the matching queries."""
        shapes = [tuple(f.shape[-2:]) for f in features]
        x = torch.cat([f.flatten(2).transpose(1, 2) for f in features], 1)
        padding = torch.cat([m.flatten(1) for m in masks], 1)
        pos = torch.cat([sine_positional_encoding(m, x.shape[-1] // 2).flatten(2).transpose(1, 2)
                         + self.level_embeds[level].view(1, 1, -1) for level, m in enumerate(masks)], 1)
        ratios = torch.stack([valid_ratios(m) for m in masks], 1)
        memory = self.encoder(x, pos, encoder_reference_points(shapes, ratios), shapes, padding)
        if memory.shape[1] < self.num_queries:
            raise ValueError(f"the images give {memory.shape[1]} encoder tokens, fewer than the "
                             f"{self.num_queries} queries to select from them: use larger images or fewer queries "
                             "(DetectorConfig.num_queries; model.head.num_queries in a run)")

        # two-stage selection: padded and unusable tokens are zeroed, not excluded, so they can
        # still be chosen (a quirk of the authors' code: their constant logit competes, their box
        # logit is +inf, a box of (1, 1, 1, 1))
        anchors, keep = encoder_proposals(padding, shapes)
        transformed = self.proposal_norm(self.proposal_proj(memory.masked_fill(~keep, 0.0)))
        logits = cls_branches[-1](transformed)
        box_logits = reg_branches[-1](transformed) + anchors
        top = logits.max(-1).values.topk(self.num_queries, dim=1).indices
        enc_logits = logits.gather(1, top[..., None].expand(-1, -1, logits.shape[-1]))
        enc_box_logits = box_logits.gather(1, top[..., None].expand(-1, -1, 4))

        # mixed query selection: learned content queries, positions from the (detached) proposals
        queries = self.query_embed.weight[None].expand(len(memory), -1, -1)
        reference_logits = enc_box_logits.detach()
        attn_mask = None
        if denoising is not None:
            queries = torch.cat([denoising.content, queries], 1)
            reference_logits = torch.cat([denoising.box_logits, reference_logits], 1)
            attn_mask = denoising.attn_mask
        states, references = self.decoder(queries, reference_logits.sigmoid(), memory, shapes, padding, ratios,
                                          reg_branches, attn_mask)
        return TransformerOutputs(memory, enc_logits, enc_box_logits.sigmoid(), states, references)


# -- the head ---------------------------------------------------------------------------------------

class DINOHead(nn.Module):
    """The class and box branches (``decoder_layers`` + 1 each: one per decoder layer, the last for
    the encoder's proposals), the denoising label table, the losses and the detections.

    ``cls_branches[k]``: Linear(D, C), bias -log(99) (prior 0.01). ``reg_branches[k]``: Linear,
    ReLU, Linear, ReLU, Linear(D, 4), the last zero-initialised (the two-stage path keeps the w, h
    bias at 0 too). ``label_embedding``: ``(C, D)``, N(0, 1).
    """

    def __init__(self, num_classes: int, width: int, decoder_layers: int):
        super().__init__()
        self.num_classes = num_classes
        self.cls_branches = nn.ModuleList(nn.Linear(width, num_classes) for _ in range(decoder_layers + 1))
        self.reg_branches = nn.ModuleList(
            nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 4))
            for _ in range(decoder_layers + 1))
        self.label_embedding = nn.Embedding(num_classes, width)
        prior = 0.01
        for branch in self.cls_branches:
            nn.init.constant_(branch.bias, -math.log((1 - prior) / prior))
        for branch in self.reg_branches:
            nn.init.zeros_(branch[-1].weight)
            nn.init.zeros_(branch[-1].bias)

    def predict(self, states: Tensor, references: Tensor) -> tuple[Tensor, Tensor]:
        """Look forward twice: layer k's logits ``cls_branches[k](state_k)`` and boxes
        ``sigmoid(reg_branches[k](state_k) + inverse_sigmoid(ref_k, 1e-3))``, ref_k the (not
        detached) reference that was layer k's input, so a layer's box loss also trains the layer
        before it. Returns ``(layers, B, Nq, C)`` and ``(layers, B, Nq, 4)``."""
        logits, boxes = [], []
        for k, state in enumerate(states):
            logits.append(self.cls_branches[k](state))
            boxes.append((self.reg_branches[k](state) + inverse_sigmoid(references[k], REFINE_EPS)).sigmoid())
        return torch.stack(logits), torch.stack(boxes)

    def loss(self, outputs: DINOOutputs, gt_labels: Sequence[Tensor], gt_boxes: Sequence[Tensor],
             image_sizes: Sequence[tuple[int, int]]) -> dict[str, Tensor]:
        """The losses named as the authors' (``interm_loss_*`` of the encoder's proposals, then
        ``loss_*`` of the last decoder layer and ``d{k}.loss_*`` of the others, then the
        denoising ``dn_loss_*`` and ``d{k}.dn_loss_*``), each ``cls`` (focal), ``bbox`` (L1) and
        ``iou`` (GIoU), weighted; their sum is the training loss. ``gt_labels`` are 0-based,
        ``gt_boxes`` pixel ``xyxy`` boxes of the resized images of ``image_sizes``."""
        pad = outputs.dn_meta.pad_size if outputs.dn_meta is not None else 0
        losses: dict[str, Tensor] = {}

        def record(prefix: str, values: tuple[Tensor, Tensor, Tensor]) -> None:
            for name, value in zip(("cls", "bbox", "iou"), values):
                losses[f"{prefix}_{name}"] = value

        record("interm_loss", set_prediction_losses(outputs.enc_logits, outputs.enc_boxes, gt_labels, gt_boxes,
                                                    image_sizes))
        last = len(outputs.logits) - 1
        names = [f"d{k}." for k in range(last)]
        per_layer = [set_prediction_losses(outputs.logits[k, :, pad:], outputs.boxes[k, :, pad:], gt_labels,
                                           gt_boxes, image_sizes) for k in range(last + 1)]
        record("loss", per_layer[last])
        for name, values in zip(names, per_layer):
            record(f"{name}loss", values)
        if outputs.dn_meta is not None:
            per_layer = [denoising_losses(outputs.logits[k, :, :pad], outputs.boxes[k, :, :pad], gt_labels,
                                          gt_boxes, image_sizes, outputs.dn_meta) for k in range(last + 1)]
            record("dn_loss", per_layer[last])
            for name, values in zip(names, per_layer):
                record(f"{name}dn_loss", values)
        return losses

    def detections(self, logits: Tensor, boxes: Tensor, image_sizes: Sequence[tuple[int, int]],
                   max_detections: int) -> list[dict[str, Tensor]]:
        """Per image, the top ``max_detections`` sigmoid scores over queries x classes of one layer's
        ``(B, Q, C)`` logits (no NMS, no threshold), their boxes as pixel ``xyxy`` clamped to the
        resized image of ``image_sizes``, and 1-based labels."""
        detections = []
        for image_logits, image_boxes, (h, w) in zip(logits, boxes, image_sizes):
            scores, index = image_logits.sigmoid().flatten().topk(min(max_detections, image_logits.numel()))
            chosen = box_convert(image_boxes[index // self.num_classes], "cxcywh", "xyxy")
            chosen = chosen * chosen.new_tensor([w, h, w, h])
            chosen = torch.stack([chosen[:, 0].clamp(0, w), chosen[:, 1].clamp(0, h),
                                  chosen[:, 2].clamp(0, w), chosen[:, 3].clamp(0, h)], 1)
            detections.append(dict(boxes=chosen, labels=index % self.num_classes + 1, scores=scores))
        return detections


# -- the detector -----------------------------------------------------------------------------------

@dataclass
class DINOOutputs:
    """What :meth:`DINODetector.forward_transformer` computes.

    Attributes:
        memory: ``(B, sum HW, D)`` the encoder's output.
        enc_logits, enc_boxes: ``(B, Q, C)`` class logits and ``(B, Q, 4)`` boxes (sigmoid
            ``cxcywh``, normalised, not detached) of the top-``Q`` encoder proposals.
        logits, boxes: ``(layers, B, pad + Q, C)`` and ``(layers, B, pad + Q, 4)`` of every decoder
            layer (look-forward-twice boxes), the denoising queries first.
        dn_meta: the denoising layout; ``None`` when no denoising queries were given (evaluation,
            ``dn_queries=0``; then ``pad`` = 0).
    """

    memory: Tensor
    enc_logits: Tensor
    enc_boxes: Tensor
    logits: Tensor
    boxes: Tensor
    dn_meta: DenoisingMeta | None


class DINODetector(Detector):
    """DINO around a dense piip backbone (:mod:`.dino`), with its :class:`DetectorConfig`: the
    :class:`~.model.Detector` contract.

    Images are resized, normalised and padded by :class:`~.rcnn_parts.MMDetTransform`; evaluation
    runs the images in groups of one padded size (:func:`~.model.detect_in_size_groups`).
    """

    def __init__(self, config: DetectorConfig, backbone: DINOBackbone, transformer: DINOTransformer,
                 head: DINOHead, transform: MMDetTransform):
        super().__init__()
        self.config = config
        self.backbone = backbone
        self.transformer = transformer
        self.head = head
        self.transform = transform

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing in the backbone (the transformer is not checkpointed)."""
        self.backbone.body.set_grad_checkpointing(enable)

    def forward_transformer(self, features: Sequence[Tensor], padding_masks: Sequence[Tensor],
                            denoising: DenoisingQueries | None = None) -> DINOOutputs:
        """The transformer and the head's per-layer predictions on the 4 neck maps ``features``
        ``(B, D, H_l, W_l)`` with their ``padding_masks`` ``(B, H_l, W_l)`` (True on padding;
        :func:`~.detr_parts.padding_masks`), in float32."""
        with torch.autocast(features[0].device.type, enabled=False):
            out = self.transformer([f.float() for f in features], padding_masks, self.head.cls_branches,
                                   self.head.reg_branches, denoising)
            states = out.states
            if denoising is not None and denoising.content.shape[1] == 0:
                # no object in the batch leaves the label table out of the graph; the authors add it
                # times 0 so that DDP sees every parameter used
                states = states + self.head.label_embedding.weight[0, 0] * 0.0
            logits, boxes = self.head.predict(states, out.references)
        return DINOOutputs(out.memory, out.enc_logits, out.enc_boxes, logits, boxes,
                           denoising.meta if denoising is not None else None)

    def _features(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
                  ) -> tuple[list[Tensor], list[Tensor], list[tuple[int, int]], list[dict[str, Tensor]] | None]:
        """Resize, normalise and pad (targets rescaled alike), then the backbone and the neck: the
        neck maps, their padding masks, the resized sizes and the targets."""
        image_list, targets = self.transform(images, targets)
        features = self.backbone(image_list.tensors)
        masks = padding_masks(image_list.image_sizes, tuple(image_list.tensors.shape[-2:]),
                              [tuple(f.shape[-2:]) for f in features], device=features[0].device)
        return features, masks, image_list.image_sizes, targets

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None):
        if not self.training:
            return detect_in_size_groups(images, self.transform.padded_size, self._detect)
        if targets is None or not all("boxes" in t and "labels" in t for t in targets):
            raise ValueError("in training every target needs 'boxes' and 'labels'")
        features, masks, sizes, targets = self._features(images, targets)
        with torch.autocast(features[0].device.type, enabled=False):
            gt_labels = [t["labels"].long() - 1 for t in targets]
            gt_boxes = [t["boxes"].float() for t in targets]
            denoising = None
            if self.config.dn_queries > 0:
                # the generator's normalisation: convert to cxcywh, then divide by the image size
                scaled = [box_convert(b, "xyxy", "cxcywh") / b.new_tensor([w, h, w, h])
                          for b, (h, w) in zip(gt_boxes, sizes)]
                denoising = denoising_queries(gt_labels, scaled, self.head.label_embedding, self.config.num_queries,
                                              self.config.dn_queries, self.config.dn_label_noise,
                                              self.config.dn_box_noise)
            outputs = self.forward_transformer(features, masks, denoising)
            return self.head.loss(outputs, gt_labels, gt_boxes, sizes)

    def _detect(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        original_sizes = [tuple(image.shape[-2:]) for image in images]
        features, masks, sizes, _ = self._features(images)
        outputs = self.forward_transformer(features, masks)
        detections = self.head.detections(outputs.logits[-1], outputs.boxes[-1], sizes, self.config.detections_per_img)
        return self.transform.postprocess(detections, sizes, original_sizes)


def assemble_dino(config: DetectorConfig, body: PIIP) -> DINODetector:
    """DINO around ``body`` as the authors' MMDetection 2.x configs set it up (see :mod:`.dino`)."""
    width = config.fpn_channels
    if width % 32:
        raise ValueError(f"DINO's neck normalises with GroupNorm(32): fpn_channels must be a multiple of 32, "
                         f"got {width}")
    backbone = DINOBackbone(body, width, autocast_dtype(config.backbone_dtype))
    transformer = DINOTransformer(width, config.num_queries, config.encoder_layers, config.decoder_layers,
                                  config.transformer_ffn_dim)
    head = DINOHead(config.num_classes, width, config.decoder_layers)
    return DINODetector(config, backbone, transformer, head, input_transform(config))
