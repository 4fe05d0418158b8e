"""The error every weights reader raises for a file that cannot be read or does not fit the model
(its own module: the file readers and the checkpoint format both raise it)."""
from __future__ import annotations

__all__ = ["CheckpointError"]


class CheckpointError(ValueError):
    """A checkpoint cannot be read or does not fit the model.

    Attributes (empty when not applicable): ``mismatched`` ``[(key, checkpoint_shape, model_shape)]``,
    ``missing`` (model keys the checkpoint lacks), ``unexpected`` (checkpoint keys the model lacks).
    """

    def __init__(self, message: str, *, mismatched=(), missing=(), unexpected=()):
        super().__init__(message)
        self.mismatched = list(mismatched)
        self.missing = list(missing)
        self.unexpected = list(unexpected)
