"""Object detection and instance segmentation: torchvision Mask R-CNN / Faster R-CNN on piip
backbones, COCO-format data and COCO metrics."""
from .model import (DETECTOR_KINDS, DetectorBackbone, DetectorConfig, PIIPDetector, build_detector,
                    build_detector_from_config, register_detector_kind)
from .mask_rcnn import assemble_mask_rcnn
from .rcnn_parts import AlignedMultiScaleRoIAlign, paste_masks
from .evaluation import coco_metrics, detections_to_coco, evaluate_checkpoint, evaluate_detector
from .task import DetectionTask

register_detector_kind("mask_rcnn", assemble_mask_rcnn)  # a detector kind: one module and one line here

__all__ = ["DetectionTask", "evaluate_detector", "evaluate_checkpoint", "coco_metrics", "detections_to_coco",
           "DetectorConfig", "PIIPDetector", "DetectorBackbone", "AlignedMultiScaleRoIAlign", "build_detector",
           "build_detector_from_config", "paste_masks", "DETECTOR_KINDS", "register_detector_kind"]
