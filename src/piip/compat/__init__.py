"""Compatibility layers with other PIIP code bases (``original``: the authors' OpenGVLab/PIIP)."""
from . import original

__all__ = ["original"]
