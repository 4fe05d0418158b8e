"""Classification: the task on the shared engine and its evaluation (top-1 / top-5 / per-class
accuracy and cross-entropy)."""
from .evaluation import ClassificationMetrics, accuracy_counts, evaluate, evaluate_checkpoint
from .task import ClassificationTask

__all__ = ["ClassificationTask", "ClassificationMetrics", "evaluate", "evaluate_checkpoint", "accuracy_counts"]
