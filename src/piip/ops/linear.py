"""Dense layers whose float32 CPU matmuls can run on oneDNN, and the switch that decides whether
they do.

Why. PyTorch sends a float32 ``F.linear`` on the CPU to MKL's sgemm, and its convolutions to its
other CPU backend, oneDNN. Which of the two computes a ViT's matmul shapes faster depends on the
CPU: on the host this route was written on, oneDNN ran them about twice as fast as MKL, forward
and backward; on the one measured below it is no faster, and slower on a whole model. Nearly all
of a ViT's and of PIIP's MACs are such matmuls, so the route is worth taking where, and only where,
it is faster.

How. A ``(..., K)`` token tensor *is* a channels-last ``(1, K, M, 1)`` map (``M`` = the product of
the leading dimensions), so a 1x1 convolution over that view is the linear layer, computed by
oneDNN, with autograd, without copying anything in or out. It is the same sums in another order:
results differ from ``F.linear`` by float32 rounding (relative ~5e-7).

When, per call. :func:`linear` (the ``forward`` of :class:`Linear`) takes the route only where it
can pay: CPU, float32 operands, no CPU autocast (which casts ``F.linear`` to its low-precision
dtype itself), and at least :data:`MIN_MACS` multiply-accumulates: below that the convolution's
fixed cost loses to MKL (measured crossover 4-9 M MACs). Everything else, CUDA and the ``meta``
device of the FLOP counter included, is plain ``F.linear``.

Switch, per model. :func:`use_onednn_linears` makes a model's plain ``nn.Linear`` layers
:class:`Linear` (``enabled=True``) or turns them back (``False``). With ``enabled=None``, as the
model builders call it, it follows the process setting, :func:`onednn_linears_enabled`, which is
the first of:

1. :func:`set_onednn_linears` ``(True | False)``; ``None`` removes it;
2. the environment variable ``PIIP_ONEDNN_LINEARS``: ``0``/``false``/``off`` = ``F.linear``,
   ``1``/``true``/``on`` = oneDNN, ``auto`` or unset (or empty) = 3; any other value is a
   ``ValueError``;
3. automatic: what is measured faster on this CPU. The first time the setting is needed,
   :func:`time_linear_routes` runs a ViT-B MLP (:data:`PROBE_TOKENS`) through both routes,
   alternately, :data:`PROBE_REPEATS` timed forwards each after an untimed one, at
   ``torch.get_num_threads()`` threads; oneDNN is chosen only if ``F.linear``'s median time is at
   least :data:`MIN_SPEEDUP` times oneDNN's, and never where PyTorch has no oneDNN (mkldnn). The
   decision is logged (logger ``piip.ops.linear``, INFO) and kept for the life of the process,
   whatever the thread count or the load becomes later.

Measured (``benchmarks/onednn_linears.py``) on a 2-core AMD EPYC VM (Zen 3: AVX2, no AVX-512), 2
threads, PyTorch 2.14 with MKL 2024.2 and oneDNN 3.12, shared with other jobs:

* the probe, idle: ``F.linear`` 33 ms, oneDNN 34 ms per MLP, speed-up 0.97 (0.92-1.03 over 8 runs): the
  automatic setting is ``F.linear``. One probe takes 0.29-0.35 s (0.4 s with a little load). With
  other processes on the two cores, the medians triple and the speed-up spreads to 0.98-1.15.
* the two layers rank differently: oneDNN is 1.15x as fast on ``784 x 768 x 3072`` but 0.92x on
  ``784 x 3072 x 768``, and 0.28x on ``196 x 3072 x 768`` (ViT-B's second MLP layer at 224 px): a
  probe of the first layer alone measured 0.93-1.19 (median 1.12, 8 runs, 5 of them under load),
  a win where the model loses.
* PIIP-TSB det, batch 1, forward, latency oneDNN / ``F.linear`` over interleaved pairs: 1.14
  (1.05-1.25, 5 pairs; 1.35 vs 1.18 s) at 448/352/224, 0.97 (0.89-1.08, 3 pairs; 5.99 vs 6.15 s)
  at 1120/896/448: a loss and a tie.

The route was written on an earlier host of the same VM, where oneDNN ran these shapes at 200-230
GMAC/s against MKL's ~100 (PIIP-TSB 1120/896/448: 3.87 -> 2.75 s); two AVX2 cores at these clocks
top out near 80-110 GMAC/s, so that host presumably had AVX-512, which oneDNN's kernels use and
MKL's, on AMD CPUs, may not. There the probe's speed-up would be about 2: oneDNN.
"""
from __future__ import annotations

import functools
import logging
import os
import statistics
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ENV_VAR", "MIN_MACS", "Linear", "linear", "onednn_linears_enabled", "set_onednn_linears",
           "time_linear_routes", "use_onednn_linears"]

log = logging.getLogger(__name__)

#: Smallest ``M * K * N`` routed to oneDNN.
MIN_MACS = 1 << 23

#: The environment variable of the process setting (see "Switch" in the module docstring).
ENV_VAR = "PIIP_ONEDNN_LINEARS"
_ENV_VALUES = {"0": False, "false": False, "off": False, "1": True, "true": True, "on": True, "auto": None, "": None}

#: The probe: a ViT-B MLP, ``(M x 768) @ (768 x 3072)`` then ``(M x 3072) @ (3072 x 768)``, over
#: ``M = 576`` tokens (ViT-B at 384 px), 2.7 G MACs. Both layers, because the routes can rank
#: differently on the two shapes (see "Measured").
PROBE_TOKENS, PROBE_WIDTH, PROBE_HIDDEN = 576, 768, 3072
#: Timed MLP forwards per route (after one untimed one each, which builds oneDNN's primitives).
PROBE_REPEATS = 3
#: The automatic setting takes oneDNN only when the probe finds it at least this much faster than
#: ``F.linear``: a smaller lead is within the probe's noise on a loaded machine, and can hide a loss
#: on a model's other shapes (see "Measured"), so a tie keeps PyTorch's default.
MIN_SPEEDUP = 1.20

_process_setting: bool | None = None


def _onednn_pays(x: Tensor, weight: Tensor) -> bool:
    # Compiled, the compiler picks the matmul's route (and dynamo cannot trace mkldnn.is_available:
    # each linear would become a graph of its own, recompiled per shape until dynamo gives up).
    return (not torch.compiler.is_compiling() and x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32
            and torch.backends.mkldnn.is_available() and not torch.is_autocast_enabled("cpu")
            and x.numel() * weight.shape[0] >= MIN_MACS)


def _onednn_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    in_features, out_features = x.shape[-1], weight.shape[0]
    as_map = x.reshape(1, -1, 1, in_features).permute(0, 3, 1, 2)  # (1, K, M, 1), channels-last
    y = F.conv2d(as_map, weight[:, :, None, None], bias)  # (1, N, M, 1), channels-last
    return y.permute(0, 2, 3, 1).reshape(*x.shape[:-1], out_features)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)``; float32 on the CPU through oneDNN where that is faster."""
    if not _onednn_pays(x, weight):
        return F.linear(x, weight, bias)
    return _onednn_linear(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` computed by :func:`linear`: same parameters, state-dict keys and results."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)


def time_linear_routes(repeats: int = PROBE_REPEATS) -> tuple[float, float]:
    """Median seconds of the probe's float32 MLP forward (see :data:`PROBE_TOKENS`) on the CPU
    through ``F.linear`` (MKL) and through oneDNN, at ``torch.get_num_threads()`` threads.

    The routes alternate, each going first every other time, so a neighbour's load and the order
    weigh on both alike. The operands are made on the CPU whatever the default device (a model may
    be being built on ``meta``) and from a private generator, so the global random state, hence a
    seeded model's initial weights, does not depend on whether the probe ran.
    """
    generator = torch.Generator().manual_seed(0)
    x, fc1_weight, fc1_bias, fc2_weight, fc2_bias = (
        torch.randn(*shape, generator=generator, dtype=torch.float32, device="cpu")
        for shape in ((PROBE_TOKENS, PROBE_WIDTH), (PROBE_HIDDEN, PROBE_WIDTH), (PROBE_HIDDEN,),
                      (PROBE_WIDTH, PROBE_HIDDEN), (PROBE_WIDTH,)))
    routes = (F.linear, _onednn_linear)
    seconds: tuple[list[float], list[float]] = ([], [])
    with torch.no_grad(), torch.autocast("cpu", enabled=False):
        for call in range(1 + repeats):
            for index in ((0, 1) if call % 2 else (1, 0)):
                route = routes[index]
                start = time.perf_counter()
                route(route(x, fc1_weight, fc1_bias), fc2_weight, fc2_bias)
                if call > 0:  # call 0 builds oneDNN's primitives and faults the outputs' pages in
                    seconds[index].append(time.perf_counter() - start)
    return statistics.median(seconds[0]), statistics.median(seconds[1])


@functools.cache
def _onednn_measured_faster() -> bool:
    """The automatic setting, measured once per process (a third of a second on 2 idle cores)."""
    if not torch.backends.mkldnn.is_available():
        return False
    f_linear_s, onednn_s = time_linear_routes()
    faster = f_linear_s >= MIN_SPEEDUP * onednn_s
    log.info("dense layers: a %d-token ViT-B MLP takes %.1f ms through F.linear, %.1f ms through oneDNN "
             "at %d threads: using %s", PROBE_TOKENS, f_linear_s * 1e3, onednn_s * 1e3, torch.get_num_threads(),
             "oneDNN" if faster else "F.linear")
    return faster


def _env_setting() -> bool | None:
    value = os.environ.get(ENV_VAR, "")
    try:
        return _ENV_VALUES[value.strip().lower()]
    except KeyError:
        raise ValueError(f"{ENV_VAR}={value!r}: expected 0/false/off (F.linear), 1/true/on (oneDNN) "
                         "or auto/unset (whichever is measured faster on this CPU)") from None


def set_onednn_linears(value: bool | None) -> None:
    """Set the process setting: ``True`` or ``False`` override :data:`ENV_VAR`, ``None`` goes back
    to it. Affects the models built afterwards; a built one switches with :func:`use_onednn_linears`."""
    if value is not None and not isinstance(value, bool):
        raise TypeError(f"set_onednn_linears takes True, False or None, got {value!r}")
    global _process_setting
    _process_setting = value


def onednn_linears_enabled() -> bool:
    """The process setting: :func:`set_onednn_linears`'s value, else :data:`ENV_VAR`'s, else the
    automatic one (which runs the probe the first time it is needed)."""
    if _process_setting is not None:
        return _process_setting
    forced = _env_setting()
    return _onednn_measured_faster() if forced is None else forced


def use_onednn_linears(module: nn.Module, enabled: bool | None = None) -> nn.Module:
    """Route the dense layers inside ``module`` through oneDNN or not, in place; returns ``module``.

    ``enabled=True`` makes every plain ``nn.Linear`` (timm's and torchvision's included, not
    subclasses, whose ``forward`` may differ) a :class:`Linear`; ``False`` makes every
    :class:`Linear` a plain ``nn.Linear`` again, so the switch can be turned back; ``None`` (the
    builders' call) follows :func:`onednn_linears_enabled`.

    The instances keep their parameters and only change class (as ``torch.nn.utils.parametrize``
    does), so references held elsewhere, e.g. by an optimiser, stay valid.
    """
    if enabled is None:
        enabled = onednn_linears_enabled()
    old, new = (nn.Linear, Linear) if enabled else (Linear, nn.Linear)
    for m in module.modules():
        if type(m) is old:
            m.__class__ = new
    return module
