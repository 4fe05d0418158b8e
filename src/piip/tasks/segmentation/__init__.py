"""Semantic segmentation: UperNet + FCN auxiliary head on piip backbones (MMSegmentation's numerics),
ADE20K-layout data, mIoU with whole-image or sliding-window inference."""
from .evaluation import (SegmentationMetrics, area_counts, evaluate_checkpoint, evaluate_segmenter,
                         metrics_from_areas, segment, slide_windows)
from .model import (FCNHead, PIIPSegmenter, SegmenterConfig, UPerHead, build_segmenter,
                    build_segmenter_from_config)
from .task import SegmentationTask

__all__ = ["SegmentationTask", "SegmenterConfig", "PIIPSegmenter", "UPerHead", "FCNHead", "build_segmenter",
           "build_segmenter_from_config", "segment", "slide_windows", "area_counts", "metrics_from_areas",
           "SegmentationMetrics", "evaluate_segmenter", "evaluate_checkpoint"]
