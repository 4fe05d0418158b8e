"""Tasks on the shared engine: each one's data glue, model, loss, metrics and export.

``piip.tasks.base`` defines the protocol and the registry; the tasks are ``classification``,
``detection`` and ``segmentation``.
"""
from .base import Task, get_task_class, register_task, task_names
from .classification import (ClassificationMetrics, ClassificationTask, accuracy_counts, evaluate,
                             evaluate_checkpoint)
from .detection import DetectionTask, build_detector
from .segmentation import SegmentationTask, build_segmenter

__all__ = ["Task", "get_task_class", "register_task", "task_names", "ClassificationTask", "DetectionTask",
           "build_detector", "SegmentationTask", "build_segmenter",
           "ClassificationMetrics", "evaluate", "evaluate_checkpoint", "accuracy_counts"]
