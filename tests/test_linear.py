"""piip.ops.linear: the oneDNN route of dense layers gives F.linear's results and gradients, is taken
only where it pays, and leaves parameters, state-dict keys and FLOP counts as they were."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

import piip.analysis.actual_flops  # noqa: F401  (registers the CPU SDPA formula)
from piip import create_model
from piip.ops import Linear, linear, set_onednn_linears, use_onednn_linears
from piip.ops.linear import MIN_MACS


class _RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.fixture(autouse=True)
def _route_forced_on():
    """These tests check the route itself, wherever the automatic setting would leave it off."""
    set_onednn_linears(True)
    yield
    set_onednn_linears(None)


def _ops(fn, *args):
    with _RecordOps() as rec:
        out = fn(*args)
    return out, rec.ops


def _reference(x, weight, bias):
    """The definition, in float64: x @ W^T + b."""
    y = x.double() @ weight.double().t()
    return y if bias is None else y + bias.double()


@pytest.mark.parametrize("shape", [(1, 784, 256), (3, 17, 19, 256), (1100, 256)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_onednn_route_matches_the_definition(shape, with_bias):
    torch.manual_seed(0)
    x = torch.randn(shape)
    weight, bias = torch.randn(96, 256) / 16, torch.randn(96) if with_bias else None
    assert x.numel() * 96 >= MIN_MACS
    out, ops = _ops(linear, x, weight, bias)
    assert "convolution" in ops and "addmm" not in ops and "mm" not in ops
    assert out.shape == (*shape[:-1], 96) and out.dtype == torch.float32 and out.is_contiguous()
    ref = _reference(x, weight, bias)
    assert float((out.double() - ref).norm() / ref.norm()) < 1e-6


def test_onednn_route_accepts_strided_input():
    x = torch.randn(1, 256, 1024).transpose(1, 2)  # (1, 1024, 256), not contiguous
    weight = torch.randn(64, 256)
    out, ops = _ops(linear, x, weight, None)
    assert "convolution" in ops
    ref = _reference(x, weight, None)
    assert float((out.double() - ref).norm() / ref.norm()) < 1e-6


def test_onednn_route_gradients_match_f_linear():
    torch.manual_seed(1)
    x = torch.randn(2, 600, 128, requires_grad=True)
    weight = torch.randn(160, 128, requires_grad=True)
    bias = torch.randn(160, requires_grad=True)
    grad = torch.randn(2, 600, 160)
    linear(x, weight, bias).backward(grad)
    ours = [t.grad.clone() for t in (x, weight, bias)]
    for t in (x, weight, bias):
        t.grad = None
    F.linear(x.double(), weight.double(), bias.double()).backward(grad.double())
    for got, t in zip(ours, (x, weight, bias)):
        assert float((got.double() - t.grad).norm() / t.grad.norm()) < 1e-6


@pytest.mark.parametrize("case", ["small", "float64", "autocast"])
def test_plain_f_linear_where_onednn_does_not_pay(case):
    x, weight = torch.randn(1, 64, 32), torch.randn(48, 32)  # 98k MACs: below MIN_MACS
    if case != "small":
        x, weight = torch.randn(1, 1024, 256), torch.randn(256, 256)
    if case == "float64":
        x, weight = x.double(), weight.double()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "autocast"):
        out, ops = _ops(linear, x, weight, None)
    assert "convolution" not in ops
    assert out.dtype == (torch.bfloat16 if case == "autocast" else x.dtype)


def test_use_onednn_linears_keeps_parameters_and_keys():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 4)))
    params = list(model.parameters())
    keys = list(model.state_dict())
    assert use_onednn_linears(model) is model
    assert [type(m) for m in model.modules() if isinstance(m, nn.Linear)] == [Linear, Linear]
    assert list(model.parameters()) == params and list(model.state_dict()) == keys
    x = torch.randn(3, 8)
    ref = torch.relu(x @ params[0].t() + params[1]) @ params[2].t() + params[3]
    torch.testing.assert_close(model(x), ref)


def test_every_linear_of_a_piip_model_is_routed_and_counted_alike():
    model = create_model("piip_tsb", resolutions="224/192/96", task="det")
    plain = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    assert plain == []
    assert sum(isinstance(m, Linear) for m in model.modules()) > 100
    # a 1x1 convolution counts M*K*N MACs, as the linear layer it replaces: the FLOP counter sees
    # the same total on the CPU (oneDNN route) as on the meta device (F.linear)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad(), FlopCounterMode(display=False) as cpu:
        model.eval()(x)
    with torch.device("meta"):
        meta_model = create_model("piip_tsb", resolutions="224/192/96", task="det").eval()
        meta_x = torch.empty(1, 3, 224, 224)
    with torch.no_grad(), FlopCounterMode(display=False) as meta:
        meta_model(meta_x)
    assert cpu.get_total_flops() == meta.get_total_flops()


def test_detector_heads_are_routed_too():
    from piip.tasks.detection import build_detector

    detector = build_detector(create_model("piip_fmnist_tsb", task="det"), 3)
    assert [n for n, m in detector.named_modules() if type(m) is nn.Linear] == []
    assert isinstance(detector.roi_heads.box_head.fc6, Linear)
