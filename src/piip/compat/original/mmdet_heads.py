"""Deprecated: the MMDetection head converter is :mod:`piip.tasks.detection.authors_heads` (the task
converts its own heads); this alias stays for one release."""
import warnings

from ...tasks.detection.authors_heads import HEAD_PREFIXES, convert_mmdet_heads, has_mask_rcnn_heads, mask_rcnn_layout

__all__ = ["HEAD_PREFIXES", "has_mask_rcnn_heads", "mask_rcnn_layout", "convert_mmdet_heads"]

warnings.warn("piip.compat.original.mmdet_heads is deprecated: import from piip.tasks.detection.authors_heads",
              DeprecationWarning, stacklevel=2)
