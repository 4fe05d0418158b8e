"""Object detection and instance segmentation on piip backbones: Mask R-CNN / Faster R-CNN, Cascade
Mask R-CNN and DINO, COCO-format data and COCO metrics."""
from .model import (DETECTOR_KINDS, Detector, DetectorBackbone, DetectorConfig, DetectorKind, PIIPDetector,
                    build_detector, build_detector_from_config, register_detector_kind)
from .mask_rcnn import assemble_mask_rcnn
from .cascade import assemble_cascade_mask_rcnn
from .dino import DINODetector, DINOOutputs, assemble_dino
from .rcnn_parts import AlignedMultiScaleRoIAlign, paste_masks
from .evaluation import coco_metrics, detections_to_coco, evaluate_checkpoint, evaluate_detector
from .task import DetectionTask

# a detector kind: one module and one registration here
register_detector_kind("mask_rcnn", assemble_mask_rcnn, has_masks=True,
                       defaults=dict(masks=True, box_loss="l1", detections_per_img=100))
register_detector_kind("cascade_mask_rcnn", assemble_cascade_mask_rcnn, has_masks=True,
                       defaults=dict(masks=True, box_loss="smooth_l1", detections_per_img=100))
register_detector_kind("dino", assemble_dino, has_masks=False,
                       defaults=dict(masks=False, box_loss="l1", detections_per_img=300),
                       levels=((0, 1, 2, 3), (1, 2, 3)))

__all__ = ["DetectionTask", "evaluate_detector", "evaluate_checkpoint", "coco_metrics", "detections_to_coco",
           "DetectorConfig", "Detector", "DetectorKind", "PIIPDetector", "DINODetector", "DINOOutputs",
           "DetectorBackbone", "AlignedMultiScaleRoIAlign", "build_detector", "build_detector_from_config",
           "paste_masks", "DETECTOR_KINDS", "register_detector_kind", "assemble_mask_rcnn",
           "assemble_cascade_mask_rcnn", "assemble_dino"]
