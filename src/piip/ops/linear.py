"""Dense layers whose float32 CPU matmuls run on oneDNN.

Why. PyTorch sends a float32 ``F.linear`` on the CPU to MKL's sgemm. On the AMD EPYC machine this
project is measured on, MKL reaches about 100 GMAC/s on 2 cores while oneDNN, PyTorch's other CPU
backend (the one its convolutions use), reaches 200-230 GMAC/s on the same shapes; forward and
backward alike (ViT-B's MLP, 784 x 768 x 3072: 101 vs 218 GMAC/s; fwd+bwd at 4096 x 768 x 3072:
294 vs 155 ms). Nearly all of a ViT's and of PIIP's MACs are such matmuls.

How. A ``(..., K)`` token tensor *is* a channels-last ``(1, K, M, 1)`` map (``M`` = the product of
the leading dimensions), so a 1x1 convolution over that view is the linear layer, computed by
oneDNN, with autograd, without copying anything in or out. It is the same sums in another order:
results differ from ``F.linear`` by float32 rounding (relative ~5e-7).

When. Only where it pays: CPU, float32 operands, no CPU autocast (which casts ``F.linear`` to its
low-precision dtype itself), and at least :data:`MIN_MACS` multiply-accumulates: below that the
convolution's fixed cost loses to MKL (measured crossover 4-9 M MACs). Everything else, CUDA and
the ``meta`` device of the FLOP counter included, is plain ``F.linear``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MIN_MACS", "Linear", "linear", "use_onednn_linears"]

#: Smallest ``M * K * N`` routed to oneDNN.
MIN_MACS = 1 << 23


def _onednn_pays(x: Tensor, weight: Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32
            and torch.backends.mkldnn.is_available() and not torch.is_autocast_enabled("cpu")
            and x.numel() * weight.shape[0] >= MIN_MACS)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)``; float32 on the CPU through oneDNN where that is faster."""
    if not _onednn_pays(x, weight):
        return F.linear(x, weight, bias)
    in_features, out_features = x.shape[-1], weight.shape[0]
    as_map = x.reshape(1, -1, 1, in_features).permute(0, 3, 1, 2)  # (1, K, M, 1), channels-last
    y = F.conv2d(as_map, weight[:, :, None, None], bias)  # (1, N, M, 1), channels-last
    return y.permute(0, 2, 3, 1).reshape(*x.shape[:-1], out_features)


class Linear(nn.Linear):
    """``nn.Linear`` computed by :func:`linear`: same parameters, state-dict keys and results."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)


def use_onednn_linears(module: nn.Module) -> nn.Module:
    """Make every plain ``nn.Linear`` inside ``module`` (timm's and torchvision's included) a
    :class:`Linear`, in place; returns ``module``.

    The instances keep their parameters and only change class (as ``torch.nn.utils.parametrize``
    does), so references held elsewhere, e.g. by an optimiser, stay valid.
    """
    for m in module.modules():
        if type(m) is nn.Linear:
            m.__class__ = Linear
    return module
