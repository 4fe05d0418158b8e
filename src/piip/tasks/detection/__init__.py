"""Object detection and instance segmentation: torchvision Mask R-CNN / Faster R-CNN on piip
backbones, COCO-format data and COCO metrics."""
from .model import DetectorBackbone, DetectorConfig, PIIPDetector, build_detector, build_detector_from_config
from .rcnn_parts import AlignedMultiScaleRoIAlign, paste_masks

from ...weights.checkpoint import register_model_kind
from .evaluation import coco_metrics, detections_to_coco, evaluate_checkpoint, evaluate_detector
from .task import DetectionTask

register_model_kind("detector", DetectorConfig, build_detector_from_config)

__all__ = ["DetectionTask", "evaluate_detector", "evaluate_checkpoint", "coco_metrics", "detections_to_coco",
           "DetectorConfig", "PIIPDetector", "DetectorBackbone", "AlignedMultiScaleRoIAlign", "build_detector",
           "build_detector_from_config", "paste_masks"]
