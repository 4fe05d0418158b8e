"""Parameter and FLOP counting, and benchmarks.

Two conventions (see :func:`complexity`): ``paper`` counts a config the way the PIIP paper and README
did (pure arithmetic, no model built; :mod:`piip.analysis.paper_flops`); ``actual`` counts the model
as built with ``FlopCounterMode`` (:mod:`piip.analysis.actual_flops`).
"""
from .actual_flops import ActualComplexity, actual_complexity
from .complexity import complexity
from .paper_flops import PaperComplexity, PartComplexity, paper_complexity

__all__ = ["ActualComplexity", "PaperComplexity", "PartComplexity", "actual_complexity", "complexity",
           "paper_complexity"]
