"""Custom operators: multi-scale deformable attention in pure PyTorch (with a Triton kernel on CUDA),
and dense layers routed to oneDNN on the CPU where that is measured faster (see :mod:`piip.ops.linear`
for the switch)."""
from .linear import Linear, linear, onednn_linears_enabled, set_onednn_linears, use_onednn_linears
from .ms_deform_attn import MSDeformAttn, ms_deform_attn, ms_deform_attn_reference
from .ms_deform_attn_triton import ms_deform_attn_triton

__all__ = ["Linear", "MSDeformAttn", "linear", "ms_deform_attn", "ms_deform_attn_reference", "ms_deform_attn_triton",
           "onednn_linears_enabled", "set_onednn_linears", "use_onednn_linears"]
