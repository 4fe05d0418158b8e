"""From a run's :class:`~piip.engine.config.ModelConfig` to a built backbone: the one build path.

Every task builds its network's PIIP through :func:`build_backbone`, which resolves the config
(registered name or explicit ``model.piip`` dict, overrides, per-branch drop path) and hands it to
:func:`piip.create_model` with the weights the run asks for.
"""
from __future__ import annotations

from torch import nn

from ..config.model import PIIPConfig
from ..config.typed import build_config
from ..models.factory import create_model
from ..models.registry import get_config
from .config import MODEL_OVERRIDES, ModelConfig

__all__ = ["build_model_config", "build_backbone"]


def build_model_config(mcfg: ModelConfig, task: str = "cls", num_classes: int | None = None) -> PIIPConfig:
    """The :class:`~piip.config.model.PIIPConfig` a :class:`ModelConfig` describes: the registered
    ``name`` (in ``task``'s form) or the explicit ``piip`` dict, with the section's overrides applied
    by the one override mechanism (:meth:`PIIPConfig.with_overrides`); ``num_classes`` (the data's)
    unless the run sets it."""
    if mcfg.piip is not None:  # an explicit network: "seg" only says it is dense
        try:
            config = build_config(PIIPConfig, {**mcfg.piip, "task": "det" if task == "seg" else task}, "model.piip.")
        except (TypeError, ValueError) as err:
            raise ValueError(f"model.piip is not a PIIPConfig ({err}); write one with "
                             "piip.get_config(name).to_dict()") from None
    elif mcfg.name:
        config = get_config(mcfg.name, task=task)
    else:
        raise ValueError("model.name (a registered variant) or model.piip (a PIIPConfig dict) is required")
    named = {name: getattr(mcfg, name) for name in MODEL_OVERRIDES}
    if named["num_classes"] is None:
        named["num_classes"] = num_classes
    try:
        return config.with_overrides(**named, **(mcfg.overrides or {}))
    except (TypeError, ValueError) as err:  # a run's mistake: one line naming the section
        raise ValueError(f"model: {err}") from None


def build_backbone(mcfg: ModelConfig, task: str = "cls", num_classes: int | None = None, *,
                   checkpoint: bool = True) -> nn.Module:
    """The :class:`~piip.models.piip.PIIP` of ``mcfg`` with its weights: timm branch weights
    (``pretrained``), local ``branch_weights`` files, or a whole piip ``checkpoint`` (loaded
    strictly; ``checkpoint=False`` leaves it to the caller, e.g. a detector checkpoint)."""
    return create_model(build_model_config(mcfg, task, num_classes), pretrained=mcfg.pretrained,
                        branch_weights=mcfg.branch_weights,
                        checkpoint=mcfg.checkpoint if checkpoint else None)
