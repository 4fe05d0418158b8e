"""The Triton kernels of ``piip::ms_deform_attn`` against the pure-PyTorch reference.

Without a GPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set per test: the
kernels are decorated once per setting, so CUDA tests in the same process still get compiled ones).
The interpreter runs the kernels' own arithmetic in numpy float32, without fused multiply-adds, so
the pixel-centre and border cases below check the kernel's cell choice against the CPU's
grid_sample bit for bit. The ``gpu`` tests compile them on CUDA at PIIP-TSB's shapes.
"""
from __future__ import annotations

import ast
import importlib
import importlib.util
from pathlib import Path

import pytest
import torch

from piip.ops import MSDeformAttn, ms_deform_attn, ms_deform_attn_reference, ms_deform_attn_triton
from piip.ops.ms_deform_attn_triton import ms_deform_attn_triton_backward, triton_unavailable_reason

msda = importlib.import_module("piip.ops.ms_deform_attn")
triton_module = importlib.import_module("piip.ops.ms_deform_attn_triton")

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="triton is not installed (the CUDA kernels' only dependency)")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

MULTI_LEVEL = ((5, 7), (3, 4))  # non-square, W not a power of two: the rounding of ix matters
SINGLE_LEVEL = ((5, 7),)  # PIIP's case: the kernel stores the output directly, no float32 buffer

#: bf16/fp16 keep 8/11 significant bits: the kernel's only error beyond float32 is the one rounding
#: of each result to the output dtype, at most this fraction of it.
UNIT_ROUNDOFF = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
FLOAT32_RTOL = 1e-5


@pytest.fixture
def interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("PIIP_MSDA_KERNEL", raising=False)


def assert_close_to_scale(actual, expected, rtol):
    """Elementwise within ``rtol`` of the value, or of the tensor's largest entry for entries near 0
    (sums with cancellation, such as a location gradient, have no meaningful elementwise error)."""
    expected = expected.to(actual.device)
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual.to(expected.dtype), expected, rtol=rtol, atol=rtol * scale)


def special_coordinates(size: int) -> list[float]:
    """Normalised coordinates on the awkward spots of a ``size``-pixel axis."""
    return [0.0, 1.0,  # the map's borders: half a pixel outside the first/last centre
            -0.5 / size, (size - 0.5) / size,  # exactly one pixel outside the first/last centre
            (size + 0.5) / size, -1.5, 2.5,  # all four taps outside
            *((i + 0.5) / size for i in range(size))]  # pixel centres: the kinks of the bilinear map


def kernel_inputs(shapes, n_batch=2, n_query=10, n_heads=2, n_points=3, dim=6, seed=0):
    """float32 inputs; two thirds of each level's points sit on special coordinates, the rest are
    random in [-0.3, 1.3]."""
    gen = torch.Generator().manual_seed(seed)
    num_tokens = sum(h * w for h, w in shapes)
    value = torch.randn(n_batch, num_tokens, n_heads, dim, generator=gen)
    locations = -0.3 + 1.6 * torch.rand(n_batch, n_query, n_heads, len(shapes), n_points, 2, generator=gen)
    weights = torch.rand(n_batch, n_query, n_heads, len(shapes), n_points, generator=gen)
    for level, (height, width) in enumerate(shapes):
        xs, ys = special_coordinates(width), special_coordinates(height)
        points = locations[:, :, :, level].reshape(-1, 2)  # a copy
        for k in range(2 * len(points) // 3):
            points[k] = torch.tensor([xs[k % len(xs)], ys[(3 * k) % len(ys)]])
        locations[:, :, :, level] = points.view_as(locations[:, :, :, level])
    return value, locations, weights


def reference_gradients(grad, value, shapes, locations, weights):
    """Autograd through grid_sample (the reference), in float32 from the same (rounded) inputs."""
    inputs = [t.detach().float().requires_grad_() for t in (value, locations, weights)]
    out = ms_deform_attn_reference(inputs[0], shapes, inputs[1], inputs[2])
    return out.detach(), torch.autograd.grad(out, inputs, grad.float())


CASES = pytest.mark.parametrize("shapes, dim", [(SINGLE_LEVEL, 6), (MULTI_LEVEL, 6), (MULTI_LEVEL, 8)],
                                ids=["single-level-D6", "multi-level-D6", "multi-level-D8"])


@CASES
def test_forward_and_gradients_equal_the_reference(interpreter, shapes, dim):
    value, locations, weights = kernel_inputs(shapes, dim=dim)
    for level, (height, width) in enumerate(shapes):  # the special points are there
        x = locations[:, :, :, level, :, 0]
        assert (x < -1).any() and (x > 2).any() and (x == 0).any() and (x == 1).any()
        assert (x == torch.tensor((width - 0.5) / width)).any()
    grad = torch.randn(2, 10, 2 * dim, generator=torch.Generator().manual_seed(1))
    expected, expected_grads = reference_gradients(grad, value, shapes, locations, weights)

    out = ms_deform_attn_triton(value, shapes, locations, weights)
    assert out.dtype == torch.float32
    assert_close_to_scale(out, expected, FLOAT32_RTOL)
    grads = ms_deform_attn_triton_backward(grad, value, shapes, locations, weights)
    for name, got, want in zip(("value", "locations", "weights"), grads, expected_grads):
        assert got.dtype == torch.float32, name
        assert_close_to_scale(got, want, FLOAT32_RTOL)


def test_several_query_blocks_per_head(interpreter, monkeypatch):
    """Blocks of 16 queries: 40 queries make two full blocks and a partial one per head."""
    monkeypatch.setattr(triton_module, "_launch_config", lambda num_queries, dim: (16, 8))
    value, locations, weights = kernel_inputs(SINGLE_LEVEL, n_batch=1, n_query=40, seed=9)
    grad = torch.randn(1, 40, 12, generator=torch.Generator().manual_seed(10))
    expected, expected_grads = reference_gradients(grad, value, SINGLE_LEVEL, locations, weights)
    assert_close_to_scale(ms_deform_attn_triton(value, SINGLE_LEVEL, locations, weights), expected, FLOAT32_RTOL)
    grads = ms_deform_attn_triton_backward(grad, value, SINGLE_LEVEL, locations, weights)
    for got, want in zip(grads, expected_grads):
        assert_close_to_scale(got, want, FLOAT32_RTOL)


def test_gradients_equal_the_pure_backward_op(interpreter):
    """The op's own backward (what the CUDA kernel replaces), not only autograd of the reference."""
    value, locations, weights = kernel_inputs(MULTI_LEVEL, seed=3)
    grad = torch.randn(2, 10, 12, generator=torch.Generator().manual_seed(4))
    flat_shapes = [size for hw in MULTI_LEVEL for size in hw]
    expected = msda._ms_deform_attn_backward_op(grad, value, flat_shapes, locations, weights)
    got = ms_deform_attn_triton_backward(grad, value, MULTI_LEVEL, locations, weights)
    for g, e in zip(got, expected):
        assert_close_to_scale(g, e, FLOAT32_RTOL)


@pytest.mark.parametrize("value_dtype, location_dtype", [(torch.bfloat16, torch.float32),
                                                          (torch.float16, torch.float16)],
                         ids=["bf16-value", "fp16-all"])
def test_low_precision_inputs_are_computed_in_float32(interpreter, value_dtype, location_dtype):
    """bf16 value with float32 locations and weights is MSDeformAttn's case under autocast."""
    value, locations, weights = kernel_inputs(MULTI_LEVEL, seed=5)
    value, grad = value.to(value_dtype), torch.randn(2, 10, 12).to(value_dtype)
    locations, weights = locations.to(location_dtype), weights.to(location_dtype)
    expected, expected_grads = reference_gradients(grad, value, MULTI_LEVEL, locations, weights)

    out = ms_deform_attn_triton(value, MULTI_LEVEL, locations, weights)
    assert out.dtype == value_dtype
    assert_close_to_scale(out, expected, UNIT_ROUNDOFF[value_dtype] + FLOAT32_RTOL)
    grads = ms_deform_attn_triton_backward(grad, value, MULTI_LEVEL, locations, weights)
    for got, want, t in zip(grads, expected_grads, (value, locations, weights)):
        assert got.dtype == t.dtype
        assert_close_to_scale(got, want, UNIT_ROUNDOFF.get(t.dtype, 0.0) + FLOAT32_RTOL)


def test_empty_query_set(interpreter):
    value, locations, weights = kernel_inputs(MULTI_LEVEL, n_query=0)
    assert ms_deform_attn_triton(value, MULTI_LEVEL, locations, weights).shape == (2, 0, 12)
    grad_value, grad_locations, grad_weights = ms_deform_attn_triton_backward(
        torch.zeros(2, 0, 12), value, MULTI_LEVEL, locations, weights)
    assert not grad_value.any() and grad_locations.shape == locations.shape


def test_float64_is_refused_with_a_pointer_to_the_reference():
    value, locations, weights = kernel_inputs(SINGLE_LEVEL)
    with pytest.raises(TypeError, match="float64 goes to the PyTorch reference"):
        ms_deform_attn_triton(value.double(), SINGLE_LEVEL, locations, weights)


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    value, locations, weights = kernel_inputs(SINGLE_LEVEL)
    with pytest.raises(ValueError, match="run CUDA tensors .* got tensors on cpu"):
        ms_deform_attn_triton(value, SINGLE_LEVEL, locations, weights)


# ----------------------------------------------------------------------------------------------
# Dispatch: which implementation the op's CUDA kernels run


def test_cuda_kernels_are_registered():
    for op in ("piip::ms_deform_attn", "piip::ms_deform_attn_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"), op


@pytest.fixture
def triton_calls(monkeypatch):
    """Counts the calls of the launchers that the op's CUDA kernels make."""
    calls = []
    for name in ("ms_deform_attn_triton", "ms_deform_attn_triton_backward"):
        launcher = getattr(msda, name)
        monkeypatch.setattr(msda, name, lambda *args, _f=launcher, _n=name: calls.append(_n) or _f(*args))
    return calls


def test_registered_cuda_kernels_run_triton(interpreter, triton_calls):
    """The functions registered for CUDA (run here on CPU tensors, by the interpreter)."""
    value, locations, weights = kernel_inputs(MULTI_LEVEL, seed=7)
    flat_shapes = [size for hw in MULTI_LEVEL for size in hw]
    grad = torch.randn(2, 10, 12)
    forward_cuda = msda._ms_deform_attn_op._backend_fns["cuda"]
    backward_cuda = msda._ms_deform_attn_backward_op._backend_fns["cuda"]

    out = forward_cuda(value, flat_shapes, locations, weights)
    grads = backward_cuda(grad, value, flat_shapes, locations, weights)
    assert triton_calls == ["ms_deform_attn_triton", "ms_deform_attn_triton_backward"]
    assert_close_to_scale(out, ms_deform_attn_reference(value, MULTI_LEVEL, locations, weights), FLOAT32_RTOL)
    for got, want in zip(grads, msda._ms_deform_attn_backward_op(grad, value, flat_shapes, locations, weights)):
        assert_close_to_scale(got, want, FLOAT32_RTOL)


@pytest.mark.parametrize("case", ["opt-out", "float64", "no-triton"])
def test_registered_cuda_kernels_fall_back_to_pytorch(monkeypatch, triton_calls, case):
    value, locations, weights = kernel_inputs(SINGLE_LEVEL, n_query=3)
    monkeypatch.delenv("PIIP_MSDA_KERNEL", raising=False)
    if case == "opt-out":
        monkeypatch.setenv("PIIP_MSDA_KERNEL", "torch")
    elif case == "float64":
        value, locations, weights = value.double(), locations.double(), weights.double()
    else:
        monkeypatch.setattr(msda, "triton_unavailable_reason", lambda: "triton is not installed")
    out = msda._ms_deform_attn_op._backend_fns["cuda"](value, [5, 7], locations, weights)
    grads = msda._ms_deform_attn_backward_op._backend_fns["cuda"](
        torch.ones_like(out), value, [5, 7], locations, weights)
    assert triton_calls == []
    assert torch.equal(out, msda._ms_deform_attn_op(value, [5, 7], locations, weights))  # the CPU path
    assert grads[0].dtype == value.dtype


def test_kernel_setting_triton_makes_a_missing_triton_an_error(monkeypatch):
    value, locations, weights = kernel_inputs(SINGLE_LEVEL, n_query=3)
    monkeypatch.setattr(msda, "triton_unavailable_reason", lambda: "triton is not installed")
    monkeypatch.setenv("PIIP_MSDA_KERNEL", "triton")
    with pytest.raises(RuntimeError, match="PIIP_MSDA_KERNEL=triton, but .* triton is not installed"):
        msda._ms_deform_attn_op._backend_fns["cuda"](value, [5, 7], locations, weights)
    monkeypatch.setenv("PIIP_MSDA_KERNEL", "cuda")
    with pytest.raises(ValueError, match="expected 'torch', 'triton' or 'auto'"):
        msda._ms_deform_attn_op._backend_fns["cuda"](value, [5, 7], locations, weights)


def test_unavailable_reason_names_a_missing_triton(monkeypatch):
    assert triton_unavailable_reason() is None  # this module is skipped without triton
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else object())
    assert triton_unavailable_reason.__wrapped__() == "triton is not installed"


def test_only_the_kernels_module_imports_triton_and_nothing_imports_it_eagerly():
    """``import piip`` must not need triton: no module imports it at the top but the kernels module,
    and that one is imported inside a function only."""
    ops = Path(triton_module.__file__).parent
    for path in sorted(ops.parent.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in tree.body:  # module level only
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                if path.name != "_ms_deform_attn_kernels.py":
                    assert name.split(".")[0] != "triton", f"{path} imports {name} at the top"
                    assert not name.endswith("_ms_deform_attn_kernels"), f"{path} imports {name} at the top"


# ----------------------------------------------------------------------------------------------
# On a GPU: the compiled kernels


def away_from_pixel_centres(locations, shapes):
    """Moves points within a thousandth of a pixel of a pixel centre (a kink of the bilinear map,
    where the location gradient is one-sided) a little further. There the cell, and with it the
    gradient, depends on the last bit of ``ix``, which compiled code (fused multiply-adds) may round
    otherwise than ATen's grid_sample does; the interpreter tests check those points exactly."""
    for level, (height, width) in enumerate(shapes):
        pixels = torch.tensor([width, height], dtype=locations.dtype, device=locations.device)
        loc = locations[:, :, :, level]
        frac = (loc * pixels - 0.5).frac().abs()
        loc.copy_(torch.where((frac < 1e-3) | (frac > 1 - 1e-3), loc + 2e-3 / pixels, loc))
    return locations


def tsb_inputs(query_hw, value_hw, dim, device, seed=0):
    """One interaction of PIIP-TSB (16 heads, 4 points, one level), with locations as MSDeformAttn
    makes them: token centres plus a few pixels."""
    gen = torch.Generator().manual_seed(seed)
    (hq, wq), (hv, wv) = query_hw, value_hw
    value = torch.randn(1, hv * wv, 16, dim, generator=gen)
    ys, xs = torch.meshgrid((torch.arange(hq) + 0.5) / hq, (torch.arange(wq) + 0.5) / wq, indexing="ij")
    ref = torch.stack([xs, ys], -1).reshape(1, hq * wq, 1, 1, 1, 2)
    pixels = torch.tensor([wv, hv], dtype=torch.float32)
    locations = away_from_pixel_centres(ref + 3 * torch.randn(1, hq * wq, 16, 1, 4, 2, generator=gen) / pixels,
                                        [value_hw])
    weights = torch.rand(1, hq * wq, 16, 1, 4, generator=gen).softmax(-1)
    return [t.to(device) for t in (value, locations, weights)]


TSB_DIRECTIONS = pytest.mark.parametrize("query_hw, value_hw, dim", [((70, 70), (56, 56), 6),
                                                                    ((56, 56), (70, 70), 12)],
                                         ids=["T-from-S", "S-from-T"])


@pytest.fixture
def compiled(monkeypatch):
    """Compiled kernels (not the interpreter) and the default dispatch."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("PIIP_MSDA_KERNEL", raising=False)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@TSB_DIRECTIONS
def test_gpu_kernel_matches_reference_at_piip_tsb_shapes(compiled, query_hw, value_hw, dim, dtype):
    value, locations, weights = tsb_inputs(query_hw, value_hw, dim, "cuda")
    value = value.to(dtype)
    shapes = [value_hw]
    grad = torch.randn(1, locations.shape[1], 16 * dim, device="cuda").to(dtype)
    expected, expected_grads = reference_gradients(grad, value, shapes, locations, weights)
    out = ms_deform_attn_triton(value, shapes, locations, weights)
    grads = ms_deform_attn_triton_backward(grad, value, shapes, locations, weights)
    assert out.dtype == dtype
    assert_close_to_scale(out, expected, UNIT_ROUNDOFF.get(dtype, 0.0) + FLOAT32_RTOL)
    for got, want, t in zip(grads, expected_grads, (value, locations, weights)):
        assert got.dtype == t.dtype
        assert_close_to_scale(got, want, UNIT_ROUNDOFF.get(t.dtype, 0.0) + FLOAT32_RTOL)


@pytest.mark.gpu
@needs_cuda
def test_gpu_kernel_matches_reference_with_several_levels(compiled):
    """DINO's encoder: 4 levels, 8 heads of 32 channels (levels summed in a float32 buffer)."""
    shapes = ((40, 48), (20, 24), (10, 12), (5, 6))
    gen = torch.Generator().manual_seed(0)
    value = torch.randn(2, sum(h * w for h, w in shapes), 8, 32, generator=gen).cuda()
    locations = away_from_pixel_centres(torch.rand(2, 300, 8, 4, 4, 2, generator=gen) * 1.2 - 0.1, shapes).cuda()
    weights = torch.rand(2, 300, 8, 4, 4, generator=gen).cuda()
    grad = torch.randn(2, 300, 256, device="cuda")
    expected, expected_grads = reference_gradients(grad, value, shapes, locations, weights)
    assert_close_to_scale(ms_deform_attn_triton(value, shapes, locations, weights), expected, FLOAT32_RTOL)
    grads = ms_deform_attn_triton_backward(grad, value, shapes, locations, weights)
    for got, want in zip(grads, expected_grads):
        assert_close_to_scale(got, want, FLOAT32_RTOL)


@pytest.mark.gpu
@needs_cuda
def test_gpu_op_runs_triton_unless_opted_out(compiled, triton_calls, monkeypatch):
    value, locations, weights = tsb_inputs((70, 70), (56, 56), 6, "cuda")
    value.requires_grad_()
    shapes = [(56, 56)]
    out = ms_deform_attn(value, shapes, locations, weights)
    out.sum().backward()
    assert triton_calls == ["ms_deform_attn_triton", "ms_deform_attn_triton_backward"]
    assert torch.equal(out, ms_deform_attn_triton(value.detach(), shapes, locations, weights))
    monkeypatch.setenv("PIIP_MSDA_KERNEL", "torch")
    out = ms_deform_attn(value, shapes, locations, weights)
    out.sum().backward()
    assert len(triton_calls) == 2  # the opted-out forward and backward called no launcher
    assert torch.equal(out, ms_deform_attn_reference(value, shapes, locations, weights))


@pytest.mark.gpu
@needs_cuda
def test_gpu_torch_compile_of_the_module_matches_eager(compiled, triton_calls):
    torch.manual_seed(0)
    attn = MSDeformAttn(d_model=192, n_heads=16, n_points=4).cuda()
    with torch.no_grad():
        attn.sampling_offsets.weight.normal_(std=0.1)
        attn.attention_weights.weight.normal_(std=0.1)
    ys, xs = torch.meshgrid((torch.arange(70) + 0.5) / 70, (torch.arange(70) + 0.5) / 70, indexing="ij")
    ref = torch.stack([xs, ys], -1).reshape(1, 4900, 2).cuda()
    query = torch.randn(1, 4900, 192, device="cuda", requires_grad=True)
    value_input = torch.randn(1, 3136, 192, device="cuda", requires_grad=True)
    inputs = (query, ref, value_input, ((56, 56),))
    torch._dynamo.reset()
    try:
        compiled_attn = torch.compile(attn, fullgraph=True)
        outputs = [compiled_attn(*inputs), attn(*inputs)]
        grads = [torch.autograd.grad(out.square().sum(), (query, value_input)) for out in outputs]
    finally:
        torch._dynamo.reset()
    assert triton_calls.count("ms_deform_attn_triton") == 2  # the compiled graph runs the kernel too
    assert_close_to_scale(outputs[0], outputs[1], 1e-4)
    for compiled_grad, eager_grad in zip(*grads):
        assert_close_to_scale(compiled_grad, eager_grad, 1e-4)
