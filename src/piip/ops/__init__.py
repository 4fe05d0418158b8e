"""Custom operators: multi-scale deformable attention in pure PyTorch, and dense layers routed to
oneDNN on the CPU."""
from .linear import Linear, linear, use_onednn_linears
from .ms_deform_attn import MSDeformAttn, ms_deform_attn

__all__ = ["Linear", "MSDeformAttn", "linear", "ms_deform_attn", "use_onednn_linears"]
