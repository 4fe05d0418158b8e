"""Tests for the multi-scale deformable attention op and module.

The op is checked against a scalar transcription of the CUDA kernel's sampling rule written here
with explicit loops (no grid_sample), so a shared layout mistake cannot hide in both sides.
"""
from __future__ import annotations

import importlib
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from piip.ops import MSDeformAttn, ms_deform_attn

# The package re-exports a function under the submodule's name, so fetch the module itself.
msda_module = importlib.import_module("piip.ops.ms_deform_attn")

MULTI_LEVEL_SHAPES = ((5, 7), (3, 4), (2, 3))  # non-square, so (x, y) / (W, H) mix-ups show


def loop_reference(value: torch.Tensor, shapes, locations: torch.Tensor,
                   weights: torch.Tensor) -> torch.Tensor:
    """The kernel's rule sample by sample: h = y*H - 0.5, w = x*W - 0.5, zero outside the map."""
    n_batch, _, n_heads, dim = value.shape
    _, n_query, _, _, n_points, _ = locations.shape
    starts = [0]
    for h, w in shapes:
        starts.append(starts[-1] + h * w)
    out = torch.zeros(n_batch, n_query, n_heads, dim, dtype=value.dtype)
    for n in range(n_batch):
        for q in range(n_query):
            for m in range(n_heads):
                for lvl, (height, width) in enumerate(shapes):
                    for p in range(n_points):
                        x, y = locations[n, q, m, lvl, p].tolist()
                        h_im, w_im = y * height - 0.5, x * width - 0.5
                        y0, x0 = math.floor(h_im), math.floor(w_im)
                        fy, fx = h_im - y0, w_im - x0
                        for yy, wy in ((y0, 1 - fy), (y0 + 1, fy)):
                            for xx, wx in ((x0, 1 - fx), (x0 + 1, fx)):
                                if 0 <= yy < height and 0 <= xx < width:
                                    tap = value[n, starts[lvl] + yy * width + xx, m]
                                    out[n, q, m] += weights[n, q, m, lvl, p] * wy * wx * tap
    return out.reshape(n_batch, n_query, n_heads * dim)


def random_inputs(shapes, n_batch=2, n_query=5, n_heads=2, n_points=3, dim=3, low=-0.2, high=1.2,
                  dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    num_tokens = sum(h * w for h, w in shapes)
    value = torch.randn(n_batch, num_tokens, n_heads, dim, generator=gen, dtype=dtype)
    locations = low + (high - low) * torch.rand(
        n_batch, n_query, n_heads, len(shapes), n_points, 2, generator=gen, dtype=dtype)
    weights = torch.rand(n_batch, n_query, n_heads, len(shapes), n_points, generator=gen, dtype=dtype)
    return value, locations, weights


def reference_grid(height: int, width: int) -> torch.Tensor:
    """Normalised token centres (x, y) of an H x W map, shape (1, H*W, 2), as PIIP builds them."""
    ys, xs = torch.meshgrid((torch.arange(height) + 0.5) / height, (torch.arange(width) + 0.5) / width,
                            indexing="ij")
    return torch.stack([xs, ys], dim=-1).reshape(1, height * width, 2)


# ----------------------------------------------------------------------------------------------
# The op


# PIIP's case (one level, batch 1: the op reads the value through strided views) and the general one.
SINGLE_AND_MULTI_LEVEL = pytest.mark.parametrize(
    "shapes, n_batch", [(((6, 5),), 1), (MULTI_LEVEL_SHAPES, 2)], ids=["single-level", "multi-level"])


@SINGLE_AND_MULTI_LEVEL
def test_matches_loop_reference_including_points_outside(shapes, n_batch):
    value, locations, weights = random_inputs(shapes, n_batch)
    assert (locations < 0).any() and (locations > 1).any()
    out = ms_deform_attn(value, shapes, locations, weights)
    expected = loop_reference(value, shapes, locations, weights)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)


def test_spatial_shapes_tensor_and_tuple_agree():
    value, locations, weights = random_inputs(MULTI_LEVEL_SHAPES)
    from_tuple = ms_deform_attn(value, MULTI_LEVEL_SHAPES, locations, weights)
    from_tensor = ms_deform_attn(value, torch.tensor(MULTI_LEVEL_SHAPES), locations, weights)
    assert torch.equal(from_tuple, from_tensor)


@SINGLE_AND_MULTI_LEVEL
def test_gradcheck(shapes, n_batch):
    value, locations, weights = random_inputs(shapes, n_batch, n_query=3, n_points=2, dim=2,
                                              low=-0.1, high=1.1)
    inputs = tuple(t.requires_grad_() for t in (value, locations, weights))
    assert torch.autograd.gradcheck(lambda v, loc, w: ms_deform_attn(v, shapes, loc, w), inputs)


def test_opcheck_fake_and_autograd_registration():
    value, locations, weights = random_inputs(MULTI_LEVEL_SHAPES, dtype=torch.float32)
    flat_shapes = [size for hw in MULTI_LEVEL_SHAPES for size in hw]
    args = (value.requires_grad_(), flat_shapes, locations.requires_grad_(), weights.requires_grad_())
    torch.library.opcheck(torch.ops.piip.ms_deform_attn.default, args)


def test_low_precision_inputs_are_sampled_in_float32():
    shapes = ((6, 5),)
    value, locations, weights = random_inputs(shapes, dtype=torch.float32)
    value_bf16 = value.bfloat16().requires_grad_()
    out = ms_deform_attn(value_bf16, shapes, locations, weights)
    assert out.dtype == torch.bfloat16
    # The only rounding is of the inputs and the output: the sampling itself ran in float32.
    expected = ms_deform_attn(value_bf16.detach().float(), shapes, locations, weights)
    torch.testing.assert_close(out, expected.bfloat16(), atol=0, rtol=0)
    out.float().sum().backward()
    assert value_bf16.grad.dtype == torch.bfloat16


def test_flop_counter_uses_five_macs_per_sample_and_channel():
    n_batch, n_query, n_heads, n_points, dim = 1, 10, 2, 3, 4
    shapes = ((4, 5), (2, 3))
    value, locations, weights = random_inputs(shapes, n_batch, n_query, n_heads, n_points, dim,
                                              dtype=torch.float32)
    value.requires_grad_()
    forward_flops = 2 * 5 * n_batch * n_query * n_heads * len(shapes) * n_points * dim
    counter = FlopCounterMode(display=False)
    with counter:
        ms_deform_attn(value, shapes, locations, weights).sum().backward()
    counts = counter.get_flop_counts()["Global"]
    assert counts[torch.ops.piip.ms_deform_attn] == forward_flops == 4800
    assert counts[torch.ops.piip.ms_deform_attn_backward] == 2 * forward_flops
    assert counter.get_total_flops() == 3 * forward_flops


@pytest.mark.parametrize("corrupt, match", [
    (lambda v, s, loc, w: (v[:, :-1], s, loc, w), r"value has S=\d+ tokens"),
    (lambda v, s, loc, w: (v[0], s, loc, w), r"value must have shape \(N, S, M, D\)"),
    (lambda v, s, loc, w: (v, s, loc[..., :1], w), r"sampling_locations must have shape"),
    (lambda v, s, loc, w: (v, s, loc[:, :, :1], w[:, :, :1]), r"sampling_locations must have shape"),
    (lambda v, s, loc, w: (v[:, :20], s[:1], loc, w), r"L=2 levels but spatial_shapes has 1"),
    (lambda v, s, loc, w: (v, s, loc, w[..., :1]), r"attention_weights must have shape"),
    (lambda v, s, loc, w: (v, torch.tensor(s, dtype=torch.float32), loc, w),
     r"spatial_shapes must be an integer"),
    (lambda v, s, loc, w: (v, [(4,)], loc, w), r"spatial_shapes must be a non-empty sequence"),
])
def test_op_input_validation(corrupt, match):
    shapes = ((4, 5), (2, 3))
    value, locations, weights = random_inputs(shapes)
    args = corrupt(value, shapes, locations, weights)
    with pytest.raises(ValueError, match=match):
        ms_deform_attn(*args)


# ----------------------------------------------------------------------------------------------
# The module


def test_init_matches_original_parameterisation():
    attn = MSDeformAttn(d_model=64, n_levels=1, n_heads=16, n_points=4)
    bias = attn.sampling_offsets.bias.detach()
    expected_start = [1, 0, 2, 0, 3, 0, 4, 0, 1, math.tan(math.pi / 8), 2, 2 * math.tan(math.pi / 8)]
    torch.testing.assert_close(bias[:12], torch.tensor(expected_start), atol=1e-6, rtol=0)
    grid = bias.view(16, 4, 2)
    assert (grid.abs().amax(-1) == torch.arange(1, 5).float()).all()  # point p: square of radius p+1
    assert not attn.sampling_offsets.weight.any()
    assert not attn.attention_weights.weight.any() and not attn.attention_weights.bias.any()
    assert not attn.value_proj.bias.any() and not attn.output_proj.bias.any()
    assert (attn.value_proj.weight.shape, attn.output_proj.weight.shape) == ((32, 64), (64, 32))

    two_levels = MSDeformAttn(d_model=64, n_levels=2, n_heads=16, n_points=4).sampling_offsets.bias
    torch.testing.assert_close(two_levels.detach().view(16, 2, 4, 2),
                               grid[:, None].expand(-1, 2, -1, -1))


def test_initial_attention_is_uniform(monkeypatch):
    seen = {}

    def spy(value, spatial_shapes, sampling_locations, attention_weights):
        seen["weights"] = attention_weights
        return ms_deform_attn(value, spatial_shapes, sampling_locations, attention_weights)

    monkeypatch.setattr(msda_module, "ms_deform_attn", spy)
    attn = MSDeformAttn(d_model=32, n_levels=2, n_heads=4, n_points=3)
    shapes = ((4, 4), (2, 2))
    attn(torch.randn(2, 9, 32), reference_grid(3, 3), torch.randn(2, 20, 32), shapes)
    torch.testing.assert_close(seen["weights"], torch.full_like(seen["weights"], 1 / 6))


def test_module_matches_manual_formula():
    torch.manual_seed(0)
    shapes = MULTI_LEVEL_SHAPES
    attn = MSDeformAttn(d_model=16, n_levels=3, n_heads=2, n_points=2, d_value_in=12).double()
    with torch.no_grad():  # query-dependent offsets and weights, so every term is exercised
        attn.sampling_offsets.weight.normal_(std=0.5)
        attn.attention_weights.weight.normal_(std=0.5)
    n_batch, n_query = 2, 4
    query = torch.randn(n_batch, n_query, 16, dtype=torch.float64)
    ref = torch.rand(n_batch, n_query, 3, 2, dtype=torch.float64)
    value_input = torch.randn(n_batch, sum(h * w for h, w in shapes), 12, dtype=torch.float64)

    value = attn.value_proj(value_input).view(n_batch, -1, 2, 4)
    offsets = attn.sampling_offsets(query).view(n_batch, n_query, 2, 3, 2, 2)
    logits = attn.attention_weights(query).view(n_batch, n_query, 2, 6)
    weights = logits.softmax(-1).view(n_batch, n_query, 2, 3, 2)
    width_height = torch.tensor([(w, h) for h, w in shapes], dtype=torch.float64)
    locations = ref[:, :, None, :, None, :] + offsets / width_height[None, None, None, :, None, :]
    expected = attn.output_proj(loop_reference(value, shapes, locations, weights))

    torch.testing.assert_close(attn(query, ref, value_input, shapes), expected, atol=1e-12, rtol=0)


def test_reference_points_broadcast_over_batch_and_levels():
    torch.manual_seed(0)
    attn = MSDeformAttn(d_model=32, n_levels=2, n_heads=4)
    shapes = ((4, 4), (2, 2))
    query, value_input = torch.randn(3, 9, 32), torch.randn(3, 20, 32)
    shared = reference_grid(3, 3)  # (1, Lq, 2)
    full = shared[:, :, None].expand(3, 9, 2, 2)
    expected = attn(query, full, value_input, shapes)
    torch.testing.assert_close(attn(query, shared, value_input, shapes), expected)
    torch.testing.assert_close(attn(query, shared[:, :, None], value_input, shapes), expected)
    torch.testing.assert_close(attn(query, full[:1], value_input, shapes), expected)


def test_padding_mask_hides_masked_tokens():
    torch.manual_seed(0)
    attn = MSDeformAttn(d_model=32, n_heads=4)
    shapes = ((5, 5),)
    query, value_input = torch.randn(2, 9, 32), torch.randn(2, 25, 32)
    mask = torch.zeros(2, 25, dtype=torch.bool)
    mask[:, 10:] = True
    changed = value_input.clone()
    changed[:, 10:] += 100.0
    out = attn(query, reference_grid(3, 3), value_input, shapes, input_padding_mask=mask)
    out_changed = attn(query, reference_grid(3, 3), changed, shapes, input_padding_mask=mask)
    torch.testing.assert_close(out_changed, out)


def _piip_like_module(seed: int = 0) -> tuple[MSDeformAttn, tuple[torch.Tensor, ...]]:
    """d_model 192 (16 heads x 6 channels, as PIIP-T), query map 20x20, value map 16x16."""
    torch.manual_seed(seed)
    attn = MSDeformAttn(d_model=192, n_heads=16, n_points=4)
    with torch.no_grad():  # trained-like offsets: a few pixels, varying with the query
        attn.sampling_offsets.weight.normal_(std=0.1)
        attn.attention_weights.weight.normal_(std=0.1)
    query, value_input = torch.randn(1, 400, 192), torch.randn(1, 256, 192)
    return attn, (query, reference_grid(20, 20), value_input, ((16, 16),))


def test_bf16_autocast_error_is_small():
    attn, inputs = _piip_like_module()
    expected = attn(*inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attn(*inputs)
    assert out.dtype == torch.bfloat16
    rel_err = (out.float() - expected).norm() / expected.norm()
    assert rel_err < 2e-2, rel_err


def test_bf16_autocast_keeps_location_path_in_float32(monkeypatch):
    attn, inputs = _piip_like_module()
    dtypes = {}
    for name in ("sampling_offsets", "attention_weights", "value_proj"):
        getattr(attn, name).register_forward_hook(
            lambda mod, args, out, name=name: dtypes.__setitem__(name, out.dtype))

    def spy(value, spatial_shapes, sampling_locations, attention_weights):
        dtypes["sampling_locations"] = sampling_locations.dtype
        dtypes["attention_weights_in"] = attention_weights.dtype
        dtypes["autocast_enabled"] = torch.is_autocast_enabled("cpu")
        return ms_deform_attn(value, spatial_shapes, sampling_locations, attention_weights)

    monkeypatch.setattr(msda_module, "ms_deform_attn", spy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        attn(*inputs)
    assert dtypes == {
        "value_proj": torch.bfloat16,  # autocast still rules the projections
        "sampling_offsets": torch.float32,
        "attention_weights": torch.float32,
        "sampling_locations": torch.float32,
        "attention_weights_in": torch.float32,
        "autocast_enabled": False,
    }


def test_torch_compile_matches_eager():
    torch.manual_seed(0)
    attn = MSDeformAttn(d_model=32, n_heads=4, n_points=4)
    with torch.no_grad():
        attn.sampling_offsets.weight.normal_(std=0.1)
    query = torch.randn(2, 16, 32, requires_grad=True)
    value_input = torch.randn(2, 25, 32, requires_grad=True)
    inputs = (query, reference_grid(4, 4), value_input, ((5, 5),))
    torch._dynamo.reset()
    try:
        compiled = torch.compile(attn, fullgraph=True)  # fullgraph: the op must not break the graph
        outputs = [compiled(*inputs), attn(*inputs)]
        grads = [torch.autograd.grad(out.square().sum(), (query, value_input)) for out in outputs]
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=1e-5)
    for compiled_grad, eager_grad in zip(*grads):
        torch.testing.assert_close(compiled_grad, eager_grad, atol=1e-5, rtol=1e-5)


def test_module_rejects_heads_not_dividing_value_width():
    with pytest.raises(ValueError, match=r"int\(d_model \* ratio\).*n_heads=16"):
        MSDeformAttn(d_model=48, n_heads=16)


@pytest.mark.parametrize("corrupt, match", [
    (lambda q, r, v, s: (q[..., :8], r, v, s), r"query must have shape"),
    (lambda q, r, v, s: (q, r, v[:, :-1], s), r"value_input has S=24"),
    (lambda q, r, v, s: (q, r, v[..., :8], s), r"value_input must have shape"),
    (lambda q, r, v, s: (q, r[:, :-1], v, s), r"reference_points must have shape"),
    (lambda q, r, v, s: (q, r, v, s * 2), r"spatial_shapes has 2 levels"),
])
def test_module_input_validation(corrupt, match):
    attn = MSDeformAttn(d_model=32, n_heads=4)
    inputs = (torch.randn(2, 9, 32), reference_grid(3, 3), torch.randn(2, 25, 32), ((5, 5),))
    with pytest.raises(ValueError, match=match):
        attn(*corrupt(*inputs))


def test_short_axis_softmax_equals_torch_softmax_values_and_gradients():
    from piip.ops.ms_deform_attn import _softmax_last

    torch.manual_seed(0)
    x = (torch.randn(2, 50, 16, 4, dtype=torch.float64) * 30).requires_grad_()
    grad = torch.randn(2, 50, 16, 4, dtype=torch.float64)
    ours = _softmax_last(x)
    (g_ours,) = torch.autograd.grad(ours, x, grad)
    ref = x.softmax(-1)
    (g_ref,) = torch.autograd.grad(ref, x, grad)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-10, atol=1e-13)
    big = torch.full((1, 4), 1e4)  # no overflow: the maximum is subtracted first
    torch.testing.assert_close(_softmax_last(big), torch.full((1, 4), 0.25))
