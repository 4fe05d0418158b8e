"""Custom operators: multi-scale deformable attention in pure PyTorch, and dense layers routed to
oneDNN on the CPU where that is measured faster (see :mod:`piip.ops.linear` for the switch)."""
from .linear import Linear, linear, onednn_linears_enabled, set_onednn_linears, use_onednn_linears
from .ms_deform_attn import MSDeformAttn, ms_deform_attn

__all__ = ["Linear", "MSDeformAttn", "linear", "ms_deform_attn", "onednn_linears_enabled", "set_onednn_linears",
           "use_onednn_linears"]
