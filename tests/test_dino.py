"""The DINO detector kind: its parts against formulas written here (matching, denoising layout and
noise, encodings, padding masks, deformable attention around boxes), and the whole detector on tiny
backbones (losses, gradients, detections, fitting, checkpoints)."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

import piip
from piip.ops import MSDeformAttn
from piip.tasks.detection import DINODetector, build_detector
from piip.tasks.detection.detr_parts import (box_sine_embedding, denoising_queries, hungarian_match, inverse_sigmoid,
                                             matching_cost, padding_masks, sine_positional_encoding)
from piip.weights import load_checkpoint, save_checkpoint

from conftest import free_port, join_process_group, tiny_branch, tiny_config

@pytest.fixture(autouse=True)
def _one_thread():
    """These tensors are tiny: a second intra-op thread only adds synchronisation, which costs up to
    10x on a loaded 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


#: a small DINO: the transformer keeps its 256 width (GroupNorm(32)) but few queries and layers
SMALL = dict(kind="dino", num_queries=30, dn_queries=10, encoder_layers=1, decoder_layers=6, transformer_ffn_dim=64,
             min_size=128, max_size=160, size_divisible=32)


def tiny_dino(backbone: str = "piip", num_classes: int = 3, **settings) -> DINODetector:
    if backbone == "vit":
        body = piip.PIIP(piip.PIIPConfig(branches=(tiny_branch(64, 128, groups=(), heads=4, pretrain=128,
                                                               window_size=4, window_block_indexes=(0,)),),
                                         task="det", fpn_norm="layernorm"))
    else:
        body = piip.PIIP(tiny_config(task="det", fpn_levels=(1, 2, 3) if backbone == "levels123" else (0, 1, 2, 3)))
    return build_detector(body, num_classes, **{**SMALL, **settings})


def _targets():
    return [dict(boxes=torch.tensor([[10.0, 20, 60, 80], [70, 10, 120, 60]]), labels=torch.tensor([1, 3])),
            dict(boxes=torch.tensor([[5.0, 5, 50, 40]]), labels=torch.tensor([2]))]


LOSS_NAMES = {f"{prefix}{loss}_{part}" for prefix, loss in
              [("interm_", "loss"), ("", "loss"), ("", "dn_loss"), *((f"d{k}.", "loss") for k in range(5)),
               *((f"d{k}.", "dn_loss") for k in range(5))]
              for part in ("cls", "bbox", "iou")}


# -- matching -----------------------------------------------------------------------------------------

def _giou(a, b):
    """GIoU of two pixel xyxy boxes, from its definition."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    return inter / union - (hull - union) / hull


@pytest.mark.parametrize("num_queries, num_gt", [(5, 3), (6, 1), (4, 4), (3, 5)])
def test_matching_cost_and_hungarian_match_against_brute_force(num_queries, num_gt):
    """The cost is focal 2 + L1 5 (normalised cxcywh) + GIoU 2 (pixel xyxy) written out here; the
    matching is the least-total assignment among all, found by trying every one."""
    g = torch.Generator().manual_seed(num_queries * 10 + num_gt)
    h, w, classes = 60.0, 80.0, 4
    logits = torch.randn(num_queries, classes, generator=g, dtype=torch.float64) * 2
    boxes = torch.cat([0.2 + 0.6 * torch.rand(num_queries, 2, generator=g, dtype=torch.float64),
                       0.1 + 0.3 * torch.rand(num_queries, 2, generator=g, dtype=torch.float64)], 1)
    corner = torch.rand(num_gt, 2, generator=g, dtype=torch.float64) * torch.tensor([w / 2, h / 2])
    size = 5 + torch.rand(num_gt, 2, generator=g, dtype=torch.float64) * torch.tensor([w / 3, h / 3])
    gt_boxes = torch.cat([corner, corner + size], 1)
    gt_labels = torch.randint(0, classes, (num_gt,), generator=g)

    cost = matching_cost(logits, boxes, gt_labels, gt_boxes, (int(h), int(w)))
    expected = torch.zeros(num_queries, num_gt, dtype=torch.float64)
    for q in range(num_queries):
        cx, cy, bw, bh = boxes[q].tolist()
        predicted = [(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h]
        for j in range(num_gt):
            p = torch.sigmoid(logits[q, gt_labels[j]]).item()
            focal = 0.25 * (1 - p) ** 2 * -math.log(p + 1e-12) - 0.75 * p ** 2 * -math.log(1 - p + 1e-12)
            x1, y1, x2, y2 = gt_boxes[j].tolist()
            target = [(x1 + x2) / 2 / w, (y1 + y2) / 2 / h, (x2 - x1) / w, (y2 - y1) / h]
            l1 = sum(abs(a - b) for a, b in zip(boxes[q].tolist(), target))
            expected[q, j] = 2 * focal + 5 * l1 - 2 * _giou(predicted, gt_boxes[j].tolist())
    torch.testing.assert_close(cost, expected, rtol=1e-9, atol=1e-9)

    rows, cols = hungarian_match(cost)
    assert len(rows) == len(cols) == min(num_queries, num_gt) and rows.tolist() == sorted(rows.tolist())
    if num_queries >= num_gt:   # every ground truth to a distinct query
        options = [{q: j for j, q in enumerate(perm)} for perm in itertools.permutations(range(num_queries), num_gt)]
    else:                       # every query to a distinct ground truth
        options = [dict(enumerate(perm)) for perm in itertools.permutations(range(num_gt), num_queries)]
    totals = [sum(cost[q, j].item() for q, j in option.items()) for option in options]
    best = options[min(range(len(options)), key=totals.__getitem__)]
    assert dict(zip(rows.tolist(), cols.tolist())) == best
    assert math.isclose(cost[rows, cols].sum().item(), min(totals), rel_tol=1e-12)


# -- denoising ----------------------------------------------------------------------------------------

def test_denoising_layout_and_attention_mask_by_hand():
    """2 groups of n_max = 2 (4 denoising queries asked for), 3 matching queries; no noise: image 0
    has 2 objects, image 1 one, so its second slot of every copy stays empty (zero content, box
    logit 0)."""
    torch.manual_seed(0)
    table = torch.nn.Embedding(5, 8)
    labels = [torch.tensor([1, 4]), torch.tensor([2])]
    boxes = [torch.tensor([[0.5, 0.5, 0.2, 0.4], [0.3, 0.6, 0.1, 0.1]]), torch.tensor([[0.7, 0.2, 0.3, 0.2]])]
    dn = denoising_queries(labels, boxes, table, num_queries=3, num_dn_queries=4, label_noise=0.0, box_noise=0.0)
    assert dn.meta == (8, 2) and dn.content.shape == (2, 8, 8) and dn.box_logits.shape == (2, 8, 4)
    # copy j of object i sits in slot 2j + i: copies 0, 2 positive, 1, 3 negative
    for slot in range(8):
        i = slot % 2
        torch.testing.assert_close(dn.content[0, slot], table.weight[labels[0][i]])
        torch.testing.assert_close(dn.box_logits[0, slot], inverse_sigmoid(boxes[0][i], 1e-3))
        if i == 0:
            torch.testing.assert_close(dn.content[1, slot], table.weight[2])
        else:
            assert not dn.content[1, slot].any() and not dn.box_logits[1, slot].any()
    blocked = ["....XXXX...",   # group 0 (slots 0-3) sees itself and the matching queries
               "....XXXX...",
               "....XXXX...",
               "....XXXX...",
               "XXXX.......",   # group 1 (slots 4-7)
               "XXXX.......",
               "XXXX.......",
               "XXXX.......",
               "XXXXXXXX...",   # matching queries see no denoising query
               "XXXXXXXX...",
               "XXXXXXXX..."]
    expected = torch.tensor([[c == "X" for c in row] for row in blocked])
    assert torch.equal(dn.attn_mask, expected)


def test_denoising_noise_follows_the_documented_draws():
    """With a seeded generator, the noised classes and boxes are those of the documented draws
    (rand(2GN); randint for the chosen; randint sign(2GN, 4); rand(2GN, 4)), computed here."""
    table = torch.nn.Embedding(6, 4)
    labels = [torch.tensor([0, 5, 3]), torch.tensor([1])]
    boxes = [torch.tensor([[0.5, 0.5, 0.2, 0.4], [0.3, 0.6, 0.1, 0.1], [0.6, 0.4, 0.5, 0.5]]),
             torch.tensor([[0.7, 0.2, 0.3, 0.2]])]
    dn = denoising_queries(labels, boxes, table, num_queries=2, num_dn_queries=7, label_noise=0.5, box_noise=1.0,
                           generator=torch.Generator().manual_seed(3))
    groups, n = 2, 4                                          # 7 // 3 = 2 groups; 4 objects in the batch
    g = torch.Generator().manual_seed(3)
    p = torch.rand(2 * groups * n, generator=g)
    chosen = torch.nonzero(p < 0.25).view(-1)
    new = torch.randint(0, 6, chosen.shape, generator=g)
    sign = torch.randint(0, 2, (2 * groups * n, 4), generator=g, dtype=torch.float32) * 2 - 1
    magnitude = torch.rand(2 * groups * n, 4, generator=g)
    all_labels, all_boxes = torch.cat(labels).repeat(2 * groups), torch.cat(boxes).repeat(2 * groups, 1)
    all_labels[chosen] = new
    for row in range(2 * groups * n):
        negative = (row // n) % 2
        cx, cy, w, h = all_boxes[row].tolist()
        corners = [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]
        half = [w / 2, h / 2, w / 2, h / 2]
        moved = [min(1.0, max(0.0, c + s * (m + negative) * d))
                 for c, s, m, d in zip(corners, sign[row].tolist(), magnitude[row].tolist(), half)]
        noised = torch.tensor([(moved[0] + moved[2]) / 2, (moved[1] + moved[3]) / 2,
                               moved[2] - moved[0], moved[3] - moved[1]])
        copy, index = divmod(row, n)
        image, i = (0, index) if index < 3 else (1, index - 3)
        slot = copy * 3 + i                                   # n_max = 3
        torch.testing.assert_close(dn.content[image, slot], table.weight[all_labels[row]])
        torch.testing.assert_close(dn.box_logits[image, slot], inverse_sigmoid(noised, 1e-3), atol=1e-5, rtol=1e-5)
    assert len(chosen) > 0                                    # the seed flips some classes


# -- encodings and masks ------------------------------------------------------------------------------

def test_sine_positional_encoding_and_box_embedding_against_formulas():
    mask = torch.ones(2, 5, 7, dtype=torch.bool)
    mask[0, :5, :7] = False
    mask[1, :3, :4] = False
    pos = sine_positional_encoding(mask)
    assert pos.shape == (2, 256, 5, 7)
    for b, i, j in [(0, 0, 0), (0, 4, 6), (1, 1, 2), (1, 2, 3), (1, 4, 6), (1, 0, 5)]:
        valid = ~mask[b]
        y = valid[: i + 1, j].sum().item() / (valid[:, j].sum().item() + 1e-6) * 2 * math.pi
        x = valid[i, : j + 1].sum().item() / (valid[i, :].sum().item() + 1e-6) * 2 * math.pi
        for block, value in ((0, y), (128, x)):
            for k in range(64):
                angle = value / 20 ** (2 * k / 128)
                assert math.isclose(pos[b, block + 2 * k, i, j].item(), math.sin(angle), abs_tol=1e-5)
                assert math.isclose(pos[b, block + 2 * k + 1, i, j].item(), math.cos(angle), abs_tol=1e-5)

    boxes = torch.tensor([[[0.3, 0.6, 0.2, 0.1], [0.9, 0.05, 0.5, 0.7]]])
    embedding = box_sine_embedding(boxes)
    assert embedding.shape == (1, 2, 512)
    for q in range(2):
        cx, cy, w, h = boxes[0, q].tolist()
        for block, value in enumerate((cy, cx, w, h)):   # (y, x, w, h) order
            for k in range(64):
                angle = value * 2 * math.pi / 10000 ** (2 * k / 128)
                assert math.isclose(embedding[0, q, 128 * block + 2 * k].item(), math.sin(angle), abs_tol=1e-5)
                assert math.isclose(embedding[0, q, 128 * block + 2 * k + 1].item(), math.cos(angle), abs_tol=1e-5)


def test_padding_masks_from_image_sizes():
    """Nearest resizing of the padded-batch mask: level pixel (i, j) is padding when the input pixel
    floor(i * H / h), floor(j * W / w) lies outside the image."""
    sizes, batch_shape = [(64, 96), (40, 70)], (64, 96)
    shapes = [(8, 12), (4, 6), (2, 3), (1, 2)]
    masks = padding_masks(sizes, batch_shape, shapes)
    assert [tuple(m.shape) for m in masks] == [(2, *s) for s in shapes] and all(m.dtype == torch.bool for m in masks)
    assert not masks[0][0].any()
    for mask, (h, w) in zip(masks, shapes):
        for i, j in itertools.product(range(h), range(w)):
            y, x = math.floor(i * 64 / h), math.floor(j * 96 / w)
            assert mask[1, i, j].item() == (y >= 40 or x >= 70)
    assert masks[0][1, :5, :9].logical_not().all() and masks[0][1, 5:].all() and masks[0][1, :, 9:].all()


# -- deformable attention around boxes ----------------------------------------------------------------

def test_deformable_attention_around_boxes_equals_the_formula():
    """4-d (cx, cy, w, h) references: locations = centre + offset / P * (w, h) / 2, sampled with
    grid_sample here, level by level and head by head."""
    torch.manual_seed(0)
    shapes = ((5, 7), (3, 4))
    heads, points, dim = 2, 3, 16
    attn = MSDeformAttn(dim, n_levels=2, n_heads=heads, n_points=points, ratio=1.0).double()
    with torch.no_grad():
        attn.sampling_offsets.weight.normal_(std=0.5)
        attn.attention_weights.weight.normal_(std=0.5)
    n, lq = 2, 4
    query = torch.randn(n, lq, dim, dtype=torch.float64)
    ref = torch.cat([torch.rand(n, lq, 2, 2, dtype=torch.float64),
                     0.1 + 0.5 * torch.rand(n, lq, 2, 2, dtype=torch.float64)], -1)
    value_input = torch.randn(n, 35 + 12, dim, dtype=torch.float64)
    out = attn(query, ref, value_input, shapes)

    value = attn.value_proj(value_input)
    offsets = attn.sampling_offsets(query).view(n, lq, heads, 2, points, 2)
    weights = attn.attention_weights(query).view(n, lq, heads, 2 * points).softmax(-1).view(n, lq, heads, 2, points)
    locations = ref[:, :, None, :, None, :2] + offsets / points * ref[:, :, None, :, None, 2:] * 0.5
    per_head = dim // heads
    expected = torch.zeros(n, lq, heads, per_head, dtype=torch.float64)
    start = 0
    for level, (h, w) in enumerate(shapes):
        level_value = value[:, start:start + h * w].view(n, h, w, heads, per_head)
        start += h * w
        for m in range(heads):
            grid = locations[:, :, m, level] * 2 - 1                           # (n, lq, P, 2)
            sampled = F.grid_sample(level_value[..., m, :].permute(0, 3, 1, 2), grid, mode="bilinear",
                                    padding_mode="zeros", align_corners=False)  # (n, D, lq, P)
            expected[:, :, m] += (sampled * weights[:, None, :, m, level]).sum(-1).transpose(1, 2)
    expected = attn.output_proj(expected.reshape(n, lq, dim))
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)
    # boxes shared by the levels (N, Lq, 4) are the same boxes on every level
    torch.testing.assert_close(attn(query, ref[:, :, 0], value_input, shapes),
                               attn(query, ref[:, :, :1].expand(-1, -1, 2, -1), value_input, shapes))
    with pytest.raises(ValueError, match="reference_points must have shape"):
        attn(query, ref[..., :3], value_input, shapes)


# -- the detector -------------------------------------------------------------------------------------

def test_dino_settings_and_initialisation():
    det = tiny_dino()
    assert isinstance(det, DINODetector) and det.config.masks is False and det.config.detections_per_img == 300
    assert len(det.head.cls_branches) == len(det.head.reg_branches) == 7
    for branch in det.head.cls_branches:
        torch.testing.assert_close(branch.bias, torch.full_like(branch.bias, -math.log(99)))
    assert all(not b[-1].weight.any() and not b[-1].bias.any() for b in det.head.reg_branches)
    layer = det.transformer.encoder.layers[0]
    assert (layer.self_attn.n_heads, layer.self_attn.n_levels, layer.self_attn.n_points) == (8, 4, 4)
    assert not layer.self_attn.attention_weights.weight.any() and not layer.self_attn.value_proj.bias.any()
    bound = math.sqrt(6 / (256 + 64))                 # Xavier-uniform on every matrix of the transformer
    assert layer.linear1.weight.abs().max() <= bound and layer.linear1.weight.abs().max() > 0.9 * bound
    attn = det.transformer.decoder.layers[0].self_attn
    assert attn.in_proj_weight.abs().max() <= math.sqrt(6 / (256 + 768)) and not attn.in_proj_bias.any()
    conv = det.backbone.neck.convs[0][0]
    assert conv.bias is None and conv.weight.abs().max() <= math.sqrt(6 / (conv.in_channels + 256))
    assert det.backbone.neck.extra[0].stride == (2, 2) and det.backbone.neck.extra[0].in_channels == 64
    assert 0.8 < det.transformer.query_embed.weight.std() < 1.2
    with pytest.raises(ValueError, match="multiple of 32"):
        tiny_dino(fpn_channels=48)


def test_dino_state_dict_layout():
    """The names the checkpoint converter maps the authors' keys onto, and nothing else."""
    det = tiny_dino("levels123", encoder_layers=2, decoder_layers=2)
    msda = [f"{m}.{p}" for m in ("sampling_offsets", "attention_weights", "value_proj", "output_proj")
            for p in ("weight", "bias")]
    wb = ("weight", "bias")
    expected = [f"backbone.neck.convs.{i}.0.weight" for i in range(3)]
    expected += [f"backbone.neck.convs.{i}.1.{p}" for i in range(3) for p in wb]
    expected += ["backbone.neck.extra.0.weight", "backbone.neck.extra.1.weight", "backbone.neck.extra.1.bias",
                 "transformer.level_embeds", "transformer.query_embed.weight"]
    expected += [f"transformer.{m}.{p}" for m in ("proposal_proj", "proposal_norm", "decoder.norm",
                                                  "decoder.ref_point_head.0", "decoder.ref_point_head.2") for p in wb]
    for layer in range(2):
        encoder, decoder = f"transformer.encoder.layers.{layer}", f"transformer.decoder.layers.{layer}"
        expected += [f"{encoder}.self_attn.{n}" for n in msda] + [f"{decoder}.cross_attn.{n}" for n in msda]
        expected += [f"{encoder}.{m}.{p}" for m in ("norm1", "linear1", "linear2", "norm2") for p in wb]
        expected += [f"{decoder}.{m}.{p}" for m in ("norm1", "norm2", "norm3", "linear1", "linear2") for p in wb]
        expected += [f"{decoder}.self_attn.{n}" for n in ("in_proj_weight", "in_proj_bias", "out_proj.weight",
                                                          "out_proj.bias")]
    for k in range(3):
        expected += [f"head.cls_branches.{k}.{p}" for p in wb]
        expected += [f"head.reg_branches.{k}.{i}.{p}" for i in (0, 2, 4) for p in wb]
    expected.append("head.label_embedding.weight")
    state = det.state_dict()
    assert sorted(k for k in state if not k.startswith("backbone.body.")) == sorted(expected)
    assert state["transformer.decoder.ref_point_head.0.weight"].shape == (256, 512)
    assert state["head.reg_branches.2.4.weight"].shape == state["transformer.level_embeds"].shape == (4, 256)


@pytest.mark.parametrize("backbone", ["piip", "vit", "levels123"])
def test_dino_forward_backward_all_losses_and_gradients(backbone):
    torch.manual_seed(0)
    det = tiny_dino(backbone)
    losses = det([torch.rand(3, 120, 150), torch.rand(3, 100, 130)], _targets())
    assert set(losses) == LOSS_NAMES and len(losses) == 39
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    # every parameter learns, except the backbone's stride-4 level that DINO does not read
    missing = [name for name, p in det.named_parameters()
               if p.requires_grad and p.grad is None and not name.startswith("backbone.body.fpn.fpn1.")]
    assert not missing
    for branch in det.backbone.body.branches:
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in branch.blocks[-1].parameters())


def test_dino_precision_backbone_autocast_transformer_float32():
    """A bf16 backbone, inside a bf16 autocast run: the neck, transformer, head and losses stay float32."""
    torch.manual_seed(0)
    det = tiny_dino("levels123", decoder_layers=2, backbone_dtype="bf16")
    seen = {}
    det.backbone.body.register_forward_hook(lambda m, i, out: seen.__setitem__("body", out["1"].dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = det([torch.rand(3, 96, 96)], _targets()[:1])
        features = det.backbone(torch.rand(1, 3, 96, 96))
        masks = padding_masks([(96, 96)], (96, 96), [f.shape[-2:] for f in features])
        outputs = det.forward_transformer(features, masks)
    assert seen["body"] == torch.bfloat16
    assert all(v.dtype == torch.float32 for v in losses.values())
    assert all(f.dtype == torch.float32 for f in features)
    assert {outputs.memory.dtype, outputs.logits.dtype, outputs.boxes.dtype, outputs.enc_boxes.dtype} == {torch.float32}
    assert outputs.dn_meta is None and outputs.logits.shape == (2, 1, 30, 3) and outputs.enc_logits.shape == (1, 30, 3)


def test_dino_without_objects_or_denoising():
    torch.manual_seed(0)
    det = tiny_dino("levels123", decoder_layers=2)
    empty = [dict(boxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.long))]
    losses = det([torch.rand(3, 96, 96)], empty)
    assert len(losses) == 15 and all(torch.isfinite(v) for v in losses.values())
    assert losses["dn_loss_bbox"] == 0 and losses["loss_iou"] == 0 and losses["loss_cls"] > 0
    sum(losses.values()).backward()
    assert det.head.label_embedding.weight.grad is not None   # kept in the graph (times 0) for DDP
    no_dn = tiny_dino("levels123", decoder_layers=2, dn_queries=0)
    assert len(no_dn([torch.rand(3, 96, 96)], _targets()[:1])) == 9


def test_dino_eval_detections():
    torch.manual_seed(0)
    det = tiny_dino("levels123", detections_per_img=50).eval()
    images = [torch.rand(3, 120, 150), torch.rand(3, 90, 200), torch.rand(3, 120, 150)]
    with torch.no_grad():
        out = det(images)
        alone = det(images[1:2])
    assert len(out) == 3
    for image, detection in zip(images, out):
        boxes, labels, scores = detection["boxes"], detection["labels"], detection["scores"]
        assert boxes.shape == (50, 4) and labels.shape == scores.shape == (50,)
        assert labels.min() >= 1 and labels.max() <= 3 and (scores[:-1] >= scores[1:]).all()
        assert (scores > 0).all() and (scores < 1).all()
        h, w = image.shape[-2:]
        assert (boxes >= 0).all() and (boxes[:, 0::2] <= w + 1e-3).all() and (boxes[:, 1::2] <= h + 1e-3).all()
        assert (boxes[:, 2:] >= boxes[:, :2]).all()
    torch.testing.assert_close(out[1], alone[0])        # another padded size runs on its own
    few = tiny_dino("levels123").eval()
    with torch.no_grad():
        assert few([images[0]])[0]["boxes"].shape == (90, 4)   # capped by 30 queries x 3 classes < 300


def _scene(seed: int) -> tuple[torch.Tensor, dict]:
    """A 128x128 grey image with 2-3 solid rectangles, coloured by class (red, green, blue)."""
    g = torch.Generator().manual_seed(seed)
    image = torch.full((3, 128, 128), 0.5)
    boxes, labels = [], []
    for k in range(2 + seed % 2):
        x1, y1 = (torch.randint(0, 30, (2,), generator=g) + torch.tensor([60 * (k % 2), 60 * (k // 2)])).tolist()
        x2, y2 = x1 + int(torch.randint(20, 40, (1,), generator=g)), y1 + int(torch.randint(20, 40, (1,), generator=g))
        cls = int(torch.randint(0, 3, (1,), generator=g))
        image[:, y1:y2, x1:x2] = 0.0
        image[cls, y1:y2, x1:x2] = 1.0
        boxes.append([x1, y1, x2, y2])
        labels.append(cls + 1)
    return image, dict(boxes=torch.tensor(boxes, dtype=torch.float32), labels=torch.tensor(labels))


def test_dino_fits_two_images():
    torch.manual_seed(0)
    det = tiny_dino("levels123", min_size=128, max_size=128, decoder_layers=3)
    scenes = [_scene(0), _scene(1)]
    images, targets = [s[0] for s in scenes], [s[1] for s in scenes]
    optimiser = torch.optim.AdamW(det.parameters(), lr=1e-3, weight_decay=1e-4)
    history = []
    for _ in range(15):
        losses = det(images, targets)
        loss = sum(losses.values())
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        history.append(loss.item())
    assert sum(history[-3:]) / 3 < 0.7 * sum(history[:3]) / 3, history


def test_dino_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    det = tiny_dino("levels123", decoder_layers=2)
    with torch.no_grad():   # non-initial heads, so the detections depend on every tensor
        for p in det.head.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    det.eval()
    path = save_checkpoint(det, tmp_path / "dino.safetensors")
    loaded = load_checkpoint(path)
    assert isinstance(loaded, DINODetector) and loaded.config == det.config
    images = [torch.rand(3, 120, 150)]
    with torch.no_grad():
        expected, got = det(images), loaded(images)
    for a, b in zip(expected, got):
        for key in ("boxes", "labels", "scores"):
            assert torch.equal(a[key], b[key]), key


def _normaliser_worker(rank: int, world: int, port: int, counts: list[list[float]], folder: str) -> None:
    import torch.distributed as dist

    from piip.tasks.detection.detr_parts import _mean_over_processes

    join_process_group(rank, world, port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        seen = [_mean_over_processes(case[rank], torch.device("cpu")) for case in counts]
        torch.save(seen, f"{folder}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_loss_normaliser_is_the_count_averaged_over_processes(tmp_path):
    """sync_cls_avg_factor: every process divides by the mean of the processes' counts, at least 1."""
    counts = [[3.0, 0.0], [1.0, 0.0], [0.0, 0.0]]
    mp.spawn(_normaliser_worker, args=(2, free_port(), counts, str(tmp_path)), nprocs=2, join=True)
    assert torch.load(tmp_path / "0.pt") == torch.load(tmp_path / "1.pt") == [1.5, 1.0, 1.0]
