"""The DETR-family parts of the ``"dino"`` detector kind (:mod:`.dino`), each computing what the
authors' MMDetection 2.25 DINO computes (``docs/design/cascade_and_dino.md``, section "DINO"):

* :class:`ChannelMapper`: the neck, one 1x1 conv + GroupNorm per backbone map and a stride-2 3x3
  conv + GroupNorm on the raw last map for the stride-64 level;
* :func:`padding_masks`, :func:`valid_ratios`, :func:`sine_positional_encoding`,
  :func:`box_sine_embedding`, :func:`inverse_sigmoid`: masks, encodings and box arithmetic;
* :func:`encoder_reference_points`, :func:`encoder_proposals`: the encoder's sampling points and
  the two-stage anchors;
* :func:`denoising_queries`: contrastive denoising (``CdnQueryGenerator``);
* :func:`matching_cost`, :func:`hungarian_match`, :func:`set_prediction_losses`,
  :func:`denoising_losses`: Hungarian matching and the focal / L1 / GIoU losses.

Boxes are ``(cx, cy, w, h)`` normalised by the image's resized, unpadded size (MMDetection's
``img_shape``) unless a name says ``xyxy`` (then in pixels of the resized image).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from torchvision.ops import box_convert, generalized_box_iou, generalized_box_iou_loss, sigmoid_focal_loss

__all__ = ["ChannelMapper", "padding_masks", "valid_ratios", "sine_positional_encoding", "box_sine_embedding",
           "inverse_sigmoid", "encoder_reference_points", "encoder_proposals", "DenoisingMeta", "DenoisingQueries",
           "denoising_queries", "matching_cost", "hungarian_match", "set_prediction_losses", "denoising_losses",
           "FOCAL_ALPHA", "FOCAL_GAMMA", "CLS_WEIGHT", "CLS_COST_WEIGHT", "L1_WEIGHT", "GIOU_WEIGHT"]

#: the focal loss and focal matching cost (``FocalLoss``, ``FocalLossCost``)
FOCAL_ALPHA, FOCAL_GAMMA = 0.25, 2.0
#: loss weights, also the matching-cost weights: focal 2 in the cost (1 in the loss), L1 5, GIoU 2
CLS_WEIGHT, CLS_COST_WEIGHT, L1_WEIGHT, GIOU_WEIGHT = 1.0, 2.0, 5.0, 2.0
#: MMDetection's ``weight_reduce_loss`` divides a sum by ``avg_factor + eps`` with float32's epsilon
_AVG_EPS = torch.finfo(torch.float32).eps


# -- the neck ---------------------------------------------------------------------------------------

class ChannelMapper(nn.Module):
    """MMDetection's ``ChannelMapper(kernel_size=1, norm_cfg=GN(32), act_cfg=None, num_outs=4)``.

    ``convs[i]``: a bias-free 1x1 conv to ``out_channels`` then GroupNorm(32), per input map (no
    activation; mmcv drops the conv bias when a norm follows). ``extra``: a bias-free 3x3 stride-2
    conv then GroupNorm(32) on the **raw** last input map (not on its mapped output), the extra
    coarser level. Convs are Xavier-uniform (the mapper's ``init_cfg``, applied after the conv
    module's own init), GroupNorms PyTorch's default.
    """

    def __init__(self, in_channels: int, out_channels: int = 256, num_inputs: int = 3, groups: int = 32):
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.GroupNorm(groups, out_channels))
            for _ in range(num_inputs))
        self.extra = nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1, bias=False),
                                   nn.GroupNorm(groups, out_channels))
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.xavier_uniform_(module.weight)

    def forward(self, maps: Sequence[Tensor]) -> list[Tensor]:
        if len(maps) != len(self.convs):
            raise ValueError(f"the neck maps {len(self.convs)} backbone maps, got {len(maps)}")
        return [conv(m) for conv, m in zip(self.convs, maps)] + [self.extra(maps[-1])]


# -- masks, encodings, box arithmetic ---------------------------------------------------------------

def padding_masks(image_sizes: Sequence[tuple[int, int]], batch_shape: tuple[int, int],
                  feature_shapes: Sequence[tuple[int, int]], device: torch.device | str | None = None) -> list[Tensor]:
    """The per-level padding masks ``(B, H_l, W_l)``, True on padding, as ``DINOHead.forward`` makes them.

    A ``(B, H, W)`` mask of the padded batch (``batch_shape``) is 0 inside each image's resized,
    unpadded size (``image_sizes``, ``(h, w)``) and 1 elsewhere; each level's mask is that mask
    resized to the level's size with ``F.interpolate``'s default (nearest) and cast to bool.
    """
    height, width = batch_shape
    full = torch.ones(len(image_sizes), height, width, device=device)
    for i, (h, w) in enumerate(image_sizes):
        full[i, :h, :w] = 0
    return [F.interpolate(full[None], size=tuple(shape)).to(torch.bool)[0] for shape in feature_shapes]


def valid_ratios(mask: Tensor) -> Tensor:
    """``(B, 2)``: the unmasked fraction ``(w, h)`` of a ``(B, H, W)`` padding mask, counted along its
    first row and first column (``get_valid_ratio``)."""
    _, height, width = mask.shape
    valid_h = (~mask[:, :, 0]).sum(1)
    valid_w = (~mask[:, 0, :]).sum(1)
    return torch.stack([valid_w.float() / width, valid_h.float() / height], -1)


def _sin_cos(coordinate: Tensor, num_feats: int, temperature: float) -> Tensor:
    """``(..., num_feats)``: channel ``i`` of ``coordinate / temperature^(2*floor(i/2)/num_feats)``,
    sine on even and cosine on odd channels (so each pair shares one frequency)."""
    index = torch.arange(num_feats, dtype=torch.float32, device=coordinate.device)
    frequencies = temperature ** (2 * (index // 2) / num_feats)
    angles = coordinate[..., None] / frequencies
    return torch.stack((angles[..., 0::2].sin(), angles[..., 1::2].cos()), dim=-1).flatten(-2)


def sine_positional_encoding(mask: Tensor, num_feats: int = 128, temperature: float = 20.0,
                             eps: float = 1e-6) -> Tensor:
    """``(B, 2*num_feats, H, W)``: MMDetection's ``SinePositionalEncoding(normalize=True)`` of a
    padding mask (DINO: 128 features, temperature 20).

    y and x are the running counts of unmasked pixels down the columns and along the rows (1 at the
    first valid pixel), divided by the last count + ``eps`` and scaled by 2*pi; the y block (sin/cos
    interleaved) comes before the x block.
    """
    not_mask = (~mask).to(torch.int)
    y = not_mask.cumsum(1, dtype=torch.float32)
    x = not_mask.cumsum(2, dtype=torch.float32)
    y = y / (y[:, -1:, :] + eps) * (2 * math.pi)
    x = x / (x[:, :, -1:] + eps) * (2 * math.pi)
    return torch.cat([_sin_cos(y, num_feats, temperature), _sin_cos(x, num_feats, temperature)], dim=-1
                     ).permute(0, 3, 1, 2)


def box_sine_embedding(boxes: Tensor, num_feats: int = 128, temperature: float = 10000.0) -> Tensor:
    """``(..., 4*num_feats)``: the decoder's positional embedding of ``(cx, cy, w, h)`` reference
    boxes (``gen_sineembed_for_position``): each coordinate times 2*pi, sin/cos interleaved as in
    :func:`sine_positional_encoding`, blocks in the order **(cy, cx, w, h)**."""
    cx, cy, w, h = (boxes * (2 * math.pi)).unbind(-1)
    return torch.cat([_sin_cos(c, num_feats, temperature) for c in (cy, cx, w, h)], dim=-1)


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    """MMDetection's ``inverse_sigmoid``: ``log(x / (1 - x))`` of ``x`` clamped to [0, 1], numerator
    and denominator each clamped to at least ``eps``."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


# -- the encoder's points and the two-stage anchors -------------------------------------------------

def encoder_reference_points(shapes: Sequence[tuple[int, int]], ratios: Tensor) -> Tensor:
    """``(B, sum HW, L, 2)``: the encoder's reference points (``get_reference_points``).

    On level l, pixel ``(i, j)`` sits at ``((j + 0.5) / (vr_x W_l), (i + 0.5) / (vr_y H_l))``, a
    position relative to the valid area, which is then multiplied by every level's valid ratio
    ``ratios`` ``(B, L, 2)`` (one point per level it samples).
    """
    points = []
    for level, (h, w) in enumerate(shapes):
        ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32, device=ratios.device) + 0.5,
                                torch.arange(w, dtype=torch.float32, device=ratios.device) + 0.5, indexing="ij")
        y = ys.reshape(-1)[None] / (ratios[:, None, level, 1] * h)
        x = xs.reshape(-1)[None] / (ratios[:, None, level, 0] * w)
        points.append(torch.stack((x, y), -1))
    return torch.cat(points, 1)[:, :, None] * ratios[:, None]


def encoder_proposals(padding_mask: Tensor, shapes: Sequence[tuple[int, int]]) -> tuple[Tensor, Tensor]:
    """The two-stage anchors of every encoder token (``gen_encoder_output_proposals``).

    Returns the anchors as logits ``(B, sum HW, 4)`` and ``keep`` ``(B, sum HW, 1)``, False where
    the token is padding or its anchor is unusable. On level l the anchor is centred at
    ``((x + 0.5) / vW, (y + 0.5) / vH)`` with (vH, vW) the level's valid rows and columns (so
    centres in the padding come out above 1), of size ``0.05 * 2**l`` square. It is usable only if
    all four numbers lie strictly inside (0.01, 0.99). Anchors become logits with ``log(p / (1 -
    p))`` (no eps); unusable or padded ones become +inf.
    """
    batch = padding_mask.shape[0]
    anchors, start = [], 0
    for level, (h, w) in enumerate(shapes):
        mask = padding_mask[:, start:start + h * w].view(batch, h, w)
        start += h * w
        valid_h, valid_w = (~mask[:, :, 0]).sum(1), (~mask[:, 0, :]).sum(1)
        ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32, device=mask.device),
                                torch.arange(w, dtype=torch.float32, device=mask.device), indexing="ij")
        grid = torch.stack([xs, ys], -1)
        scale = torch.stack([valid_w, valid_h], 1).view(batch, 1, 1, 2)
        centres = (grid[None].expand(batch, -1, -1, -1) + 0.5) / scale
        sizes = torch.ones_like(centres) * 0.05 * (2.0 ** level)
        anchors.append(torch.cat((centres, sizes), -1).view(batch, -1, 4))
    anchors = torch.cat(anchors, 1)
    keep = ((anchors > 0.01) & (anchors < 0.99)).all(-1, keepdim=True) & ~padding_mask[..., None]
    # centres beyond 1 give log of a negative number (NaN) here; they are all replaced by +inf
    logits = torch.log(anchors / (1 - anchors)).masked_fill(~keep, float("inf"))
    return logits, keep


# -- contrastive denoising --------------------------------------------------------------------------

class DenoisingMeta(NamedTuple):
    """How the denoising queries are laid out: the first ``pad_size`` decoder queries, in
    ``num_groups`` groups of ``pad_size / num_groups`` (a positive then a negative copy of every
    image's objects, each ``pad_size / num_groups / 2`` slots)."""

    pad_size: int
    num_groups: int


@dataclass
class DenoisingQueries:
    """The denoising queries of a batch (:func:`denoising_queries`).

    Attributes:
        content: ``(B, pad, D)`` content queries (zero in unused slots).
        box_logits: ``(B, pad, 4)`` inverse-sigmoid reference boxes (zero in unused slots).
        attn_mask: ``(pad + Q, pad + Q)`` bool decoder self-attention mask, True = blocked.
        meta: the layout.
    """

    content: Tensor
    box_logits: Tensor
    attn_mask: Tensor
    meta: DenoisingMeta


def denoising_queries(labels: Sequence[Tensor], boxes: Sequence[Tensor], label_embedding: nn.Embedding,
                      num_queries: int, num_dn_queries: int = 100, label_noise: float = 0.5, box_noise: float = 1.0,
                      generator: torch.Generator | None = None) -> DenoisingQueries:
    """Contrastive denoising queries, as the authors' ``CdnQueryGenerator`` (``dynamic`` groups).

    Args:
        labels: per image, the objects' 0-based classes ``(n_b,)``.
        boxes: per image, their boxes ``(n_b, 4)``: ``(cx, cy, w, h)`` in pixels divided by the
            image's ``(w, h, w, h)`` (the generator's order: convert, then normalise).
        label_embedding: the class table (its rows are the classes) that gives the content queries.
        num_queries: the matching queries that follow (the mask's size is ``pad + num_queries``).
        num_dn_queries, label_noise, box_noise: ``group_cfg.num_dn_queries`` and ``noise_scale``.
        generator: the random numbers' generator (``None``: the default one of the labels' device).

    With ``n_max`` the most objects of an image, there are ``G = max(1, num_dn_queries // n_max)``
    groups (1 without objects) of ``2 * n_max`` slots. All the batch's objects (``N``) are tiled
    ``2G`` times; copy ``2g`` is group g's positive, ``2g + 1`` its negative copy. In image b, object
    i of copy j takes slot ``j * n_max + i``.

    Random numbers, drawn in this order and these shapes (so a seeded reference reproduces them):

    1. if ``label_noise > 0``: ``rand(2GN)`` (float32); the entries below ``label_noise / 2``, in
       index order, get ``randint(0, num_classes, (count,))`` (int64) as their new class (which may
       be the old one); positives and negatives alike;
    2. if ``box_noise > 0``: ``randint(0, 2, (2GN, 4))`` as float32 (sign ``2s - 1``), then
       ``rand(2GN, 4)`` (magnitude; +1 on the negative copies). The corners ``(x1, y1, x2, y2)``
       move by sign * magnitude * ``(w/2, h/2, w/2, h/2)`` * ``box_noise``, are clamped to [0, 1]
       and converted back to ``(cx, cy, w, h)``. Negatives can invert, their width then clamps to
       0 in the inverse sigmoid.

    Content queries are ``label_embedding(noised class)``, box logits ``inverse_sigmoid(noised box,
    1e-3)``. The mask blocks every denoising column for the matching queries (rows >= pad) and the
    other groups' columns for a group's rows; a denoising query sees its own group (unused slots
    included) and all matching queries.
    """
    counts = [len(label) for label in labels]
    device = labels[0].device
    n_max = max(counts, default=0)
    groups = max(1, num_dn_queries // n_max) if n_max else 1
    copies = 2 * groups
    all_labels, all_boxes = torch.cat(list(labels)), torch.cat(list(boxes))
    num_objects = len(all_labels)

    noised_labels = all_labels.repeat(copies)
    if label_noise > 0:
        p = torch.rand(copies * num_objects, generator=generator, device=device)
        chosen = torch.nonzero(p < label_noise * 0.5).view(-1)
        new_labels = torch.randint(0, label_embedding.num_embeddings, chosen.shape, generator=generator,
                                   device=device)
        noised_labels = noised_labels.scatter(0, chosen, new_labels)
    tiled_boxes = all_boxes.repeat(copies, 1)
    noised_boxes = tiled_boxes
    if box_noise > 0:
        corners = box_convert(tiled_boxes, "cxcywh", "xyxy")
        half_sizes = tiled_boxes[:, 2:].repeat(1, 2) / 2
        sign = torch.randint(0, 2, tiled_boxes.shape, dtype=torch.float32, generator=generator, device=device)
        sign = sign * 2.0 - 1.0
        magnitude = torch.rand(tiled_boxes.shape, generator=generator, device=device)
        negative = (torch.arange(copies * num_objects, device=device) // max(num_objects, 1)) % 2 == 1
        magnitude = magnitude + negative[:, None].float()
        corners = (corners + magnitude * sign * half_sizes * box_noise).clamp(min=0.0, max=1.0)
        noised_boxes = box_convert(corners, "xyxy", "cxcywh")

    pad = 2 * n_max * groups
    batch = len(counts)
    image_index = torch.cat([torch.full((n,), b, dtype=torch.long) for b, n in enumerate(counts)]).repeat(copies)
    within = torch.cat([torch.arange(n) for n in counts])
    slot = (within[None] + n_max * torch.arange(copies)[:, None]).flatten()
    index = (image_index.to(device), slot.to(device))
    width = label_embedding.embedding_dim
    content = torch.zeros(batch, pad, width, device=device).index_put(index, label_embedding(noised_labels))
    box_logits = torch.zeros(batch, pad, 4, device=device).index_put(index, inverse_sigmoid(noised_boxes, 1e-3))

    size = pad + num_queries
    attn_mask = torch.zeros(size, size, dtype=torch.bool, device=device)
    attn_mask[pad:, :pad] = True
    group_size = 2 * n_max
    for g in range(groups):
        rows = slice(group_size * g, group_size * (g + 1))
        attn_mask[rows, :group_size * g] = True
        attn_mask[rows, group_size * (g + 1):pad] = True
    return DenoisingQueries(content, box_logits, attn_mask, DenoisingMeta(pad, groups))


# -- matching and losses ----------------------------------------------------------------------------

def _scale(image_size: tuple[int, int], like: Tensor) -> Tensor:
    """``(w, h, w, h)`` of an ``(h, w)`` image size."""
    h, w = image_size
    return like.new_tensor([w, h, w, h])


def _normalised_targets(gt_boxes: Tensor, image_size: tuple[int, int]) -> Tensor:
    """The regression targets: the pixel ``xyxy`` boxes normalised, then converted to ``cxcywh``
    (MMDetection's order for the loss targets and the L1 cost)."""
    return box_convert(gt_boxes / _scale(image_size, gt_boxes), "xyxy", "cxcywh")


def matching_cost(logits: Tensor, boxes: Tensor, gt_labels: Tensor, gt_boxes: Tensor,
                  image_size: tuple[int, int], eps: float = 1e-12) -> Tensor:
    """``(Q, n)``: the Hungarian matching cost of one image's predictions (``HungarianAssigner``).

    Args:
        logits: ``(Q, C)`` class logits; boxes: ``(Q, 4)`` normalised ``cxcywh`` predictions.
        gt_labels: ``(n,)`` 0-based classes; gt_boxes: ``(n, 4)`` pixel ``xyxy`` boxes.
        image_size: ``(h, w)`` of the resized image.

    The sum of ``FocalLossCost(weight=2)``: with p the sigmoid of the ground truth's class logit,
    ``alpha (1-p)^gamma (-log(p + eps)) - (1-alpha) p^gamma (-log(1 - p + eps))``;
    ``BBoxL1Cost(weight=5, box_format='xywh')``: the L1 distance to the normalised ``cxcywh``
    ground truth; ``IoUCost('giou', weight=2)``: minus the GIoU of the pixel ``xyxy`` boxes.
    """
    p = logits.sigmoid()
    negative = -(1 - p + eps).log() * (1 - FOCAL_ALPHA) * p.pow(FOCAL_GAMMA)
    positive = -(p + eps).log() * FOCAL_ALPHA * (1 - p).pow(FOCAL_GAMMA)
    cls_cost = (positive[:, gt_labels] - negative[:, gt_labels]) * CLS_COST_WEIGHT
    l1_cost = torch.cdist(boxes, _normalised_targets(gt_boxes, image_size), p=1) * L1_WEIGHT
    pixel_boxes = box_convert(boxes, "cxcywh", "xyxy") * _scale(image_size, boxes)
    giou_cost = -generalized_box_iou(pixel_boxes, gt_boxes) * GIOU_WEIGHT
    return cls_cost + l1_cost + giou_cost


def hungarian_match(cost: Tensor) -> tuple[Tensor, Tensor]:
    """The one-to-one assignment of least total ``cost`` ``(Q, n)`` (scipy's
    ``linear_sum_assignment`` on the CPU): matched query indices (increasing) and their ground-truth
    indices, ``min(Q, n)`` each, on ``cost``'s device."""
    rows, cols = linear_sum_assignment(cost.detach().cpu().numpy())
    return (torch.as_tensor(rows, dtype=torch.long, device=cost.device),
            torch.as_tensor(cols, dtype=torch.long, device=cost.device))


def _mean_over_processes(count: float, device: torch.device) -> float:
    """``sync_cls_avg_factor``: ``count`` averaged over the DDP processes (MMDetection's
    ``reduce_mean``) when torch.distributed is initialised, and at least 1."""
    total = torch.tensor([float(count)], device=device)
    if dist.is_available() and dist.is_initialized():
        total = total / dist.get_world_size()
        dist.all_reduce(total)
    return max(total.item(), 1.0)


def _losses(logits: Tensor, labels: Tensor, predicted: Tensor, targets: Tensor, scales: Tensor,
            count: int) -> tuple[Tensor, Tensor, Tensor]:
    """Focal, L1 and GIoU losses, each divided by ``count`` averaged over the processes.

    ``logits`` ``(M, C)`` against ``labels`` ``(M,)`` (``C`` = background: all-zero targets), every
    row weighted 1; ``predicted`` and ``targets`` ``(P, 4)`` normalised ``cxcywh`` of the positives,
    ``scales`` their images' ``(w, h, w, h)`` for the GIoU on pixel ``xyxy`` boxes.
    """
    normaliser = _mean_over_processes(count, logits.device) + _AVG_EPS
    one_hot = F.one_hot(labels, logits.shape[-1] + 1)[:, :-1].to(logits.dtype)
    loss_cls = CLS_WEIGHT * (sigmoid_focal_loss(logits, one_hot, FOCAL_ALPHA, FOCAL_GAMMA, reduction="sum")
                             / normaliser)
    loss_l1 = L1_WEIGHT * ((predicted - targets).abs().sum() / normaliser)
    loss_giou = GIOU_WEIGHT * (generalized_box_iou_loss(box_convert(predicted, "cxcywh", "xyxy") * scales,
                                                        box_convert(targets, "cxcywh", "xyxy") * scales,
                                                        reduction="sum") / normaliser)
    return loss_cls, loss_l1, loss_giou


def set_prediction_losses(logits: Tensor, boxes: Tensor, gt_labels: Sequence[Tensor], gt_boxes: Sequence[Tensor],
                          image_sizes: Sequence[tuple[int, int]]) -> tuple[Tensor, Tensor, Tensor]:
    """Focal, L1 and GIoU losses of one set of predictions after Hungarian matching
    (``DETRHead.loss_single``).

    Args:
        logits: ``(B, Q, C)``; boxes: ``(B, Q, 4)`` normalised ``cxcywh``.
        gt_labels, gt_boxes: per image, 0-based classes and pixel ``xyxy`` boxes.
        image_sizes: per image, ``(h, w)`` of the resized image.

    Each image is matched on its own (:func:`matching_cost`, :func:`hungarian_match`); unmatched
    queries are background, and every query counts in the focal loss with weight 1. The focal loss
    (alpha 0.25, gamma 2) is summed over all queries and classes, the L1 (weight 5, normalised
    ``cxcywh``) and GIoU (weight 2, pixel ``xyxy``) losses over the matched pairs; all three are
    divided by the number of matches in the batch, averaged over the DDP processes and at least 1.
    """
    num_classes = logits.shape[-1]
    labels = torch.full(logits.shape[:2], num_classes, dtype=torch.long, device=logits.device)
    # the empty first rows keep the concatenations defined for a batch without objects (box losses 0)
    predicted, targets, scales = [boxes.new_zeros(0, 4)], [boxes.new_zeros(0, 4)], [boxes.new_zeros(0, 4)]
    for b, (image_labels, image_boxes, size) in enumerate(zip(gt_labels, gt_boxes, image_sizes)):
        if not len(image_labels):
            continue
        with torch.no_grad():
            rows, cols = hungarian_match(matching_cost(logits[b], boxes[b], image_labels, image_boxes, size))
        labels[b, rows] = image_labels[cols]
        predicted.append(boxes[b, rows])
        targets.append(_normalised_targets(image_boxes, size)[cols])
        scales.append(_scale(size, boxes).expand(len(rows), 4))
    count = sum(len(p) for p in predicted)
    return _losses(logits.reshape(-1, num_classes), labels.flatten(), torch.cat(predicted), torch.cat(targets),
                   torch.cat(scales), count)


def denoising_losses(logits: Tensor, boxes: Tensor, gt_labels: Sequence[Tensor], gt_boxes: Sequence[Tensor],
                     image_sizes: Sequence[tuple[int, int]], meta: DenoisingMeta) -> tuple[Tensor, Tensor, Tensor]:
    """Focal, L1 and GIoU losses of the denoising queries ``(B, pad, ...)`` (``loss_dn_single``).

    In group g the positive copy of object i (slot ``g * 2 n_max + i``) targets the object's
    **un-noised** class and box. Every other slot, negatives and **unused padding slots alike**
    (a quirk of ``_get_dn_target_single``), is background with weight 1 in the focal loss and has
    no box loss. The divisor is the number of positives (``G`` times the batch's objects), averaged
    over the DDP processes and at least 1.
    """
    num_classes = logits.shape[-1]
    per_group = meta.pad_size // meta.num_groups
    labels = torch.full(logits.shape[:2], num_classes, dtype=torch.long, device=logits.device)
    # the empty first rows keep the concatenations defined for a batch without objects (box losses 0)
    predicted, targets, scales = [boxes.new_zeros(0, 4)], [boxes.new_zeros(0, 4)], [boxes.new_zeros(0, 4)]
    for b, (image_labels, image_boxes, size) in enumerate(zip(gt_labels, gt_boxes, image_sizes)):
        n = len(image_labels)
        if not n:
            continue
        slots = (torch.arange(meta.num_groups, device=logits.device)[:, None] * per_group
                 + torch.arange(n, device=logits.device)[None]).flatten()
        labels[b, slots] = image_labels.repeat(meta.num_groups)
        predicted.append(boxes[b, slots])
        targets.append(_normalised_targets(image_boxes, size).repeat(meta.num_groups, 1))
        scales.append(_scale(size, boxes).expand(len(slots), 4))
    count = meta.num_groups * sum(len(label) for label in gt_labels)
    return _losses(logits.reshape(-1, num_classes), labels.flatten(), torch.cat(predicted), torch.cat(targets),
                   torch.cat(scales), count)
