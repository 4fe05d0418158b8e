"""One entry point for both counting conventions."""
from __future__ import annotations

from typing import Literal, Union

from ..config.model import PIIPConfig
from .actual_flops import ActualComplexity, actual_complexity
from .paper_flops import PaperComplexity, paper_complexity

__all__ = ["complexity"]


def complexity(config: PIIPConfig, convention: Literal["paper", "actual"] = "paper"
               ) -> Union[PaperComplexity, ActualComplexity]:
    """Parameters and MACs of ``config``.

    ``"paper"``: backbone-only MACs exactly as the published numbers were counted (the authors'
    classification proxy model, module-hook MACs plus hand formulas for attention), computed from
    the config alone. ``"actual"``: the model as built here, traced with ``FlopCounterMode``.
    """
    if convention == "paper":
        return paper_complexity(config)
    if convention == "actual":
        return actual_complexity(config)
    raise ValueError(f"convention must be 'paper' or 'actual', got {convention!r}")
