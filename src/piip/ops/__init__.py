"""Custom operators: multi-scale deformable attention, in pure PyTorch."""
from .ms_deform_attn import MSDeformAttn, ms_deform_attn

__all__ = ["MSDeformAttn", "ms_deform_attn"]
