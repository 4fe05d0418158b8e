"""Task loops (evaluation) on top of the PIIP models."""
from .classification import ClassificationMetrics, accuracy_counts, evaluate, evaluate_checkpoint

__all__ = ["ClassificationMetrics", "evaluate", "evaluate_checkpoint", "accuracy_counts"]
