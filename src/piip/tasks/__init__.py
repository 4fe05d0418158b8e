"""Tasks on the shared engine: each one a folder (data glue, model, loss, metrics, evaluation of a
checkpoint, prediction and drawing, its ``piip eval`` options, its conversion of the authors' heads)
behind the :class:`~piip.engine.task.Task` protocol, registered below: adding a task is one folder
and one line here.
"""
from .base import Task, get_task_class, register_task, task_classes, task_for_model, task_names
from .classification import (ClassificationMetrics, ClassificationTask, accuracy_counts, evaluate,
                             evaluate_checkpoint)
from .detection import DetectionTask, build_detector
from .segmentation import SegmentationTask, build_segmenter

register_task(ClassificationTask)
register_task(DetectionTask)
register_task(SegmentationTask)

__all__ = ["Task", "get_task_class", "register_task", "task_names", "task_classes", "task_for_model",
           "ClassificationTask", "DetectionTask", "build_detector", "SegmentationTask", "build_segmenter",
           "ClassificationMetrics", "evaluate", "evaluate_checkpoint", "accuracy_counts"]
