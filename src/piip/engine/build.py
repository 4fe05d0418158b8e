"""From a run's :class:`~piip.engine.config.ModelConfig` to a built backbone: the one build path.

Every task builds its network's PIIP through :func:`build_backbone`, which resolves the config
(registered name or explicit ``model.piip`` dict, overrides, per-branch drop path) and hands it to
:func:`piip.create_model` with the weights the run asks for.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from .config import ModelConfig

__all__ = ["build_model_config", "build_backbone"]


def build_model_config(mcfg: ModelConfig, task: str = "cls", num_classes: int | None = None):
    """The :class:`~piip.models.config.PIIPConfig` a :class:`ModelConfig` describes (registered
    name or explicit ``piip`` dict, with the overrides and per-branch drop path applied)."""
    from ..models.config import PIIPConfig
    from ..models.registry import get_config

    if mcfg.piip is not None:  # an explicit network: "seg" only says it is dense
        try:
            config = PIIPConfig.from_dict({**mcfg.piip, "task": "det" if task == "seg" else task})
        except (KeyError, TypeError) as err:  # a hand-written config missing or misnaming a field
            raise ValueError(f"model.piip is not a PIIPConfig ({type(err).__name__}: {err}); write one with "
                             "piip.get_config(name).to_dict()") from None
        if mcfg.resolutions is not None:
            config = config.with_resolutions(mcfg.resolutions)
        if mcfg.interactions is not None:
            config = config.with_interactions(mcfg.interactions)
        if mcfg.interaction_attn is not None:
            config = dataclasses.replace(config, interaction=dataclasses.replace(
                config.interaction, attn_type=mcfg.interaction_attn))
    elif mcfg.name:
        config = get_config(mcfg.name, task=task, resolutions=mcfg.resolutions,
                            interactions=mcfg.interactions, interaction_attn=mcfg.interaction_attn)
    else:
        raise ValueError("model.name (a registered variant) or model.piip (a PIIPConfig dict) is required")
    changes: dict[str, Any] = {}
    classes = mcfg.num_classes if mcfg.num_classes is not None else num_classes
    if classes is not None:
        changes["num_classes"] = int(classes)
    if mcfg.cls_head is not None:
        changes["cls_head"] = mcfg.cls_head
    if mcfg.cls_pool is not None:
        changes["cls_pool"] = mcfg.cls_pool
    rates = mcfg.branch_drop_path
    if rates is None and mcfg.drop_path_rate is not None:
        rates = [mcfg.drop_path_rate] * config.num_branches
    if rates is not None:
        if len(rates) != config.num_branches:
            raise ValueError(f"model.branch_drop_path needs {config.num_branches} values (branch 1 first), got {rates}")
        changes["branches"] = tuple(dataclasses.replace(b, drop_path_rate=float(r))
                                    for b, r in zip(config.branches, rates))
    if mcfg.interaction_drop_path is not None:
        changes["interaction"] = dataclasses.replace(config.interaction,
                                                     drop_path_rate=float(mcfg.interaction_drop_path))
    return dataclasses.replace(config, **changes)


def build_backbone(mcfg: ModelConfig, task: str = "cls", num_classes: int | None = None, *,
                   checkpoint: bool = True) -> nn.Module:
    """The :class:`~piip.models.piip.PIIP` of ``mcfg`` with its weights: timm branch weights
    (``pretrained``), local ``branch_weights`` files, or a whole piip ``checkpoint`` (loaded
    strictly; ``checkpoint=False`` leaves it to the caller, e.g. a detector checkpoint)."""
    from ..models.factory import create_model

    return create_model(build_model_config(mcfg, task, num_classes), pretrained=mcfg.pretrained,
                        branch_weights=mcfg.branch_weights,
                        checkpoint=mcfg.checkpoint if checkpoint else None)
