"""The switch of piip.ops.linear's oneDNN route: PIIP_ONEDNN_LINEARS, set_onednn_linears, the
automatic setting (measured once per process) and use_onednn_linears(module, enabled) both ways."""
import importlib

import pytest
import torch
from torch import nn

from piip.ops import Linear, onednn_linears_enabled, set_onednn_linears, use_onednn_linears

# ``piip.ops.linear`` is also the name of the function that ``piip.ops`` exports
linear_module = importlib.import_module("piip.ops.linear")
ENV_VAR = linear_module.ENV_VAR


@pytest.fixture(autouse=True)
def _fresh_setting(monkeypatch):
    """Each test starts from the environment's setting with nothing measured, and leaves it so."""
    monkeypatch.delenv(ENV_VAR, raising=False)
    set_onednn_linears(None)
    linear_module._onednn_measured_faster.cache_clear()
    yield
    set_onednn_linears(None)
    linear_module._onednn_measured_faster.cache_clear()


@pytest.fixture
def probe(monkeypatch):
    """Stands in for the timing: ``probe.times`` are the (F.linear, oneDNN) seconds it reports."""
    class FakeProbe:
        times = (2.0, 1.0)
        calls = 0

        def __call__(self, repeats=linear_module.PROBE_REPEATS):
            self.calls += 1
            return self.times
    fake = FakeProbe()
    monkeypatch.setattr(linear_module, "time_linear_routes", fake)
    return fake


def _classes(model):
    return [type(m) for m in model.modules() if isinstance(m, nn.Linear)]


@pytest.mark.parametrize("value, expected", [
    ("0", False), ("false", False), ("off", False), ("OFF", False), (" False ", False),
    ("1", True), ("true", True), ("on", True), ("On", True), ("TRUE", True),
])
def test_environment_forces_either_route_without_measuring(monkeypatch, probe, value, expected):
    monkeypatch.setenv(ENV_VAR, value)
    assert onednn_linears_enabled() is expected
    assert probe.calls == 0


@pytest.mark.parametrize("value", [None, "auto", "AUTO", ""])
@pytest.mark.parametrize("times, expected", [
    ((2.0, 1.0), True), ((linear_module.MIN_SPEEDUP, 1.0), True),
    ((0.99 * linear_module.MIN_SPEEDUP, 1.0), False), ((1.0, 2.0), False),
])
def test_unset_or_auto_takes_the_route_measured_faster_by_the_margin(monkeypatch, probe, value, times, expected):
    if value is not None:
        monkeypatch.setenv(ENV_VAR, value)
    probe.times = times
    assert onednn_linears_enabled() is expected
    assert probe.calls == 1


@pytest.mark.parametrize("value", ["yes", "2", "enabled", "onednn"])
def test_an_invalid_environment_value_names_the_variable_and_the_accepted_values(monkeypatch, value):
    monkeypatch.setenv(ENV_VAR, value)
    with pytest.raises(ValueError, match=rf"{ENV_VAR}='{value}'.*0/false/off.*1/true/on.*auto"):
        onednn_linears_enabled()


def test_the_setter_overrides_the_environment_and_none_returns_to_it(monkeypatch, probe):
    monkeypatch.setenv(ENV_VAR, "0")
    set_onednn_linears(True)
    assert onednn_linears_enabled() is True
    set_onednn_linears(None)
    assert onednn_linears_enabled() is False
    monkeypatch.setenv(ENV_VAR, "on")
    set_onednn_linears(False)
    assert onednn_linears_enabled() is False
    monkeypatch.setenv(ENV_VAR, "not a value")  # the setter's value wins: the variable is not read
    assert onednn_linears_enabled() is False
    assert probe.calls == 0


@pytest.mark.parametrize("value", ["false", 0, 1])
def test_the_setter_takes_only_booleans_or_none(value):
    with pytest.raises(TypeError, match="True, False or None"):
        set_onednn_linears(value)


def test_the_automatic_decision_is_measured_once(probe):
    for _ in range(3):
        assert onednn_linears_enabled() is True
    use_onednn_linears(nn.Linear(4, 4))
    assert probe.calls == 1


def test_automatic_is_off_without_mkldnn(monkeypatch, probe):
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    assert onednn_linears_enabled() is False
    assert probe.calls == 0


def test_the_probe_times_both_routes_on_the_cpu_without_touching_the_global_random_state():
    torch.manual_seed(0)
    state = torch.get_rng_state()
    with torch.device("meta"):  # as when a large model is built on meta to be inspected
        f_linear_s, onednn_s = linear_module.time_linear_routes(repeats=1)
    assert f_linear_s > 0 and onednn_s > 0
    assert torch.equal(torch.get_rng_state(), state)


def test_disabled_leaves_plain_linears_and_reverts_routed_ones():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 4)))
    params = list(model.parameters())
    assert use_onednn_linears(model, enabled=False) is model
    assert _classes(model) == [nn.Linear, nn.Linear]
    use_onednn_linears(model, enabled=True)
    assert _classes(model) == [Linear, Linear]
    use_onednn_linears(model, enabled=False)
    assert _classes(model) == [nn.Linear, nn.Linear]
    assert list(model.parameters()) == params


def test_enabled_reclasses_only_plain_linears():
    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    attention = nn.MultiheadAttention(8, 2)  # its out_proj is torch's NonDynamicallyQuantizableLinear
    model = nn.ModuleList([nn.Linear(8, 8), Scaled(8, 8), attention])
    use_onednn_linears(model, enabled=True)
    assert type(model[0]) is Linear and type(model[1]) is Scaled
    assert type(attention.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    use_onednn_linears(model, enabled=False)
    assert type(model[0]) is nn.Linear and type(model[1]) is Scaled


@pytest.mark.parametrize("setting", [True, False])
def test_none_follows_the_process_setting(setting):
    set_onednn_linears(setting)
    model = use_onednn_linears(nn.Sequential(nn.Linear(8, 8)))
    assert _classes(model) == [Linear if setting else nn.Linear]


def test_a_module_computes_the_same_either_way():
    # 4 x 300 x 256 x 512 = 157 M MACs per layer: above MIN_MACS, so the oneDNN route is taken
    model = nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256))
    x = torch.randn(4, 300, 256)
    with torch.no_grad():
        plain = model(x)
        routed = use_onednn_linears(model, enabled=True)(x)
        reverted = use_onednn_linears(model, enabled=False)(x)
    torch.testing.assert_close(routed, plain, rtol=1e-5, atol=1e-5)
    assert torch.equal(reverted, plain)
