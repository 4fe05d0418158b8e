"""Deprecated: the MMSegmentation head converter is :mod:`piip.tasks.segmentation.authors_heads` (the
task converts its own heads); this alias stays for one release."""
import warnings

from ...tasks.segmentation.authors_heads import SEG_HEAD_PREFIXES, convert_mmseg_heads, has_upernet_heads, upernet_layout

__all__ = ["SEG_HEAD_PREFIXES", "has_upernet_heads", "upernet_layout", "convert_mmseg_heads"]

warnings.warn("piip.compat.original.mmseg_heads is deprecated: import from piip.tasks.segmentation.authors_heads",
              DeprecationWarning, stacklevel=2)
