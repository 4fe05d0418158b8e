"""Parameter and FLOP counting, and benchmarks.

Two conventions (see :func:`complexity`): ``paper`` counts a config the way the PIIP paper and README
did (pure arithmetic, no model built; :mod:`piip.analysis.paper_flops`); ``actual`` counts the model
as built with ``FlopCounterMode`` (:mod:`piip.analysis.actual_flops`). :mod:`piip.analysis.model_card`
writes a shared model's card from them (registered with :mod:`piip.weights.sharing`).
:mod:`piip.analysis.memory_plan` plans the per-GPU memory of training with ddp, zero1 and fsdp
(``piip plan``), from activations it measures.
"""
from .actual_flops import ActualComplexity, actual_complexity
from .complexity import complexity
from .paper_flops import PaperComplexity, PartComplexity, paper_complexity
from .model_card import card_info_from, model_card
from .memory_plan import MemoryPlan, plan_memory

__all__ = ["ActualComplexity", "PaperComplexity", "PartComplexity", "actual_complexity", "complexity",
           "paper_complexity", "model_card", "card_info_from", "MemoryPlan", "plan_memory"]
