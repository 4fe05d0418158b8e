"""Parameter groups, AdamW and the warm-up + cosine / step / poly schedules.

Rules (per parameter, by name, for a bare PIIP or any model that holds one under a prefix such as
``backbone.``):

* **lr multiplier** ``new_module_lr_mult`` for parameters outside the pretrained branches (names
  not containing ``branches.``: interactions, merge, fpn, merged classifier, detection/segmentation
  necks and heads) -- the original's ``from_scratch_lr_ratio`` (reference §8.3);
* **no weight decay** for 0/1-d tensors (norms, layer-scale gammas, interaction gates), ``.bias``
  and, with ``decay_exempt_by_name``, the names ``model.no_weight_decay()`` lists (position
  embeddings, class tokens, gates, merge weights);
* optional **per-branch layer-wise lr decay** (reference §8.1): ``Ltot = num_layers + 2``; id 0 for
  the embeddings (pos_embed, cls_token, patch_embed), branch ``k`` block ``i`` gets
  ``(i+1) * skip[k]`` (``skip[0] = 1``), everything else ``Ltot - 1``; scale ``rate^(Ltot-id-1)``.
  By default ``num_layers`` is the deepest branch's depth and ``skip[k] = num_layers / depth_k``,
  which aligns the last block of every branch to id ``num_layers``.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from ..models.piip import PIIP
from .distributed import bare_model

__all__ = ["ParamRule", "param_rules", "build_param_groups", "optimizer_spec", "build_optimizer", "cosine_lambda",
           "step_lambda", "poly_lambda", "build_scheduler", "total_steps", "layer_ids"]

_BRANCH_RE = re.compile(r"(?:^|\.)branches\.(\d+)\.(.*)$")
_EMBED_RE = re.compile(r"^(cls_token|pos_embed|patch_embed)(\.|$)")
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.")


@dataclass(frozen=True)
class ParamRule:
    lr_scale: float
    weight_decay: float
    layer_id: float | None = None
    new_module: bool = False


def _find_piip(model: nn.Module):
    model = getattr(model, "module", model)  # DDP
    model = getattr(model, "_orig_mod", model)  # torch.compile
    for prefix, module in model.named_modules():
        if isinstance(module, PIIP):
            return prefix, module
    return "", None


def layer_ids(model: nn.Module, num_layers: float | None = None,
              skip: Sequence[float] | None = None) -> tuple[dict[str, float], float]:
    """The original's per-branch layer id of every parameter name, and ``Ltot``."""
    prefix, piip = _find_piip(model)
    depths = [b.depth for b in piip.config.branches] if piip is not None else [1]
    if num_layers is None:
        num_layers = max(depths)
    if skip is None:
        strides = [num_layers / d for d in depths]
    else:
        strides = [1.0, *[float(s) for s in skip]]
        if len(strides) < len(depths):
            raise ValueError(f"layer_decay_skip needs {len(depths) - 1} values (branches 2..), got {list(skip)}")
    total = num_layers + 2
    ids = {}
    for name, _ in bare_model(model).named_parameters():
        m = _BRANCH_RE.search(name)
        if m is None:
            ids[name] = total - 1
            continue
        k, rest = int(m.group(1)), m.group(2)
        if _EMBED_RE.match(rest):
            ids[name] = 0
        elif (b := _BLOCK_RE.match(rest)) is not None:
            ids[name] = (int(b.group(1)) + 1) * strides[k]
        else:  # the branch's final norm / pretrained head
            ids[name] = total - 1
    return ids, total


def param_rules(model: nn.Module, *, weight_decay: float, new_module_lr_mult: float = 1.0,
                layer_decay: float | None = None, layer_decay_num_layers: float | None = None,
                layer_decay_skip: Sequence[float] | None = None,
                decay_exempt_by_name: bool = True) -> dict[str, ParamRule]:
    """The lr scale and weight decay of every trainable parameter, by name."""
    bare = bare_model(model)
    prefix, piip = _find_piip(bare)
    exempt: set[str] = set()
    if decay_exempt_by_name:
        for owner_prefix, owner in [(prefix, piip), ("", bare)]:
            if owner is not None and hasattr(owner, "no_weight_decay"):
                exempt |= {f"{owner_prefix}.{n}" if owner_prefix else n for n in owner.no_weight_decay()}
    ids, total = (layer_ids(bare, layer_decay_num_layers, layer_decay_skip)
                  if layer_decay is not None else ({}, None))
    rules = {}
    for name, param in bare.named_parameters():
        if not param.requires_grad:
            continue
        new = _BRANCH_RE.search(name) is None
        scale = new_module_lr_mult if new else 1.0
        layer_id = ids.get(name)
        if layer_decay is not None:
            scale *= layer_decay ** (total - layer_id - 1)
        no_wd = param.ndim <= 1 or name.endswith(".bias") or name in exempt
        rules[name] = ParamRule(scale, 0.0 if no_wd else weight_decay, layer_id, new)
    return rules


def build_param_groups(model: nn.Module, **kwargs) -> list[dict]:
    """Optimizer param groups: one per distinct (lr_scale, weight_decay), with ``lr_scale``."""
    rules = param_rules(model, **kwargs)
    params = dict(bare_model(model).named_parameters())
    groups: dict[tuple[float, float], dict] = {}
    for name, rule in rules.items():
        key = (rule.lr_scale, rule.weight_decay)
        group = groups.setdefault(key, {"params": [], "lr_scale": rule.lr_scale,
                                        "weight_decay": rule.weight_decay, "num_tensors": 0})
        group["params"].append(params[name])
        group["num_tensors"] += 1
    return [groups[k] for k in sorted(groups)]


def optimizer_spec(model: nn.Module, optim_cfg) -> tuple[type[torch.optim.Optimizer], list[dict], dict]:
    """What :func:`build_optimizer` builds, unbuilt: the optimiser class (AdamW), the
    :func:`build_param_groups` (each group's ``lr`` is ``optim.lr * lr_scale``) and the defaults.
    A wrapper that shards the optimiser state (ZeRO) builds it from these."""
    groups = build_param_groups(
        model, weight_decay=optim_cfg.weight_decay, new_module_lr_mult=optim_cfg.new_module_lr_mult,
        layer_decay=optim_cfg.layer_decay, layer_decay_num_layers=optim_cfg.layer_decay_num_layers,
        layer_decay_skip=optim_cfg.layer_decay_skip, decay_exempt_by_name=optim_cfg.decay_exempt_by_name)
    for g in groups:
        g["lr"] = optim_cfg.lr * g["lr_scale"]
    if optim_cfg.optimizer.lower() != "adamw":
        raise ValueError(f"optimizer {optim_cfg.optimizer!r} is not supported (adamw)")
    return torch.optim.AdamW, groups, dict(lr=optim_cfg.lr, betas=tuple(optim_cfg.betas), eps=optim_cfg.eps,
                                           weight_decay=optim_cfg.weight_decay)


def build_optimizer(model: nn.Module, optim_cfg) -> torch.optim.Optimizer:
    """AdamW over :func:`build_param_groups`; each group's ``lr`` is ``optim.lr * lr_scale``."""
    optimizer_class, groups, defaults = optimizer_spec(model, optim_cfg)
    return optimizer_class(groups, **defaults)


def cosine_lambda(total_steps: int, warmup_steps: int, base_lr: float, warmup_lr: float, min_lr: float):
    """Factor of ``base_lr`` at optimiser step ``s`` (0-based): linear warm-up from ``warmup_lr``,
    then cosine from ``base_lr`` to ``min_lr`` at ``total_steps``."""
    floor = min_lr / base_lr if base_lr else 0.0
    decay = max(1, total_steps - warmup_steps)

    def after(step: int) -> float:
        progress = min(1.0, (step - warmup_steps) / decay)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return _with_warmup(after, warmup_steps, base_lr, warmup_lr)


def step_lambda(warmup_steps: int, base_lr: float, warmup_lr: float, milestones: Sequence[int],
                gamma: float):
    """Linear warm-up from ``warmup_lr``, then ``gamma ** (milestones passed)`` (MMDetection's
    step schedule: its linear warm-up ramps the factor from ``warmup_lr / base_lr`` to 1)."""
    points = sorted(int(m) for m in milestones)
    return _with_warmup(lambda step: gamma ** sum(step >= m for m in points), warmup_steps, base_lr, warmup_lr)


def poly_lambda(total_steps: int, warmup_steps: int, base_lr: float, warmup_lr: float, min_lr: float,
                power: float):
    """Linear warm-up, then ``(1 - step / total) ** power`` from ``base_lr`` down to ``min_lr``
    (MMSegmentation's poly schedule, whose progress counts from step 0)."""
    floor = min_lr / base_lr if base_lr else 0.0

    def after(step: int) -> float:
        return floor + (1.0 - floor) * (1.0 - min(step, total_steps) / total_steps) ** power

    return _with_warmup(after, warmup_steps, base_lr, warmup_lr)


def _with_warmup(after, warmup_steps: int, base_lr: float, warmup_lr: float):
    w0 = warmup_lr / base_lr if base_lr else 0.0

    def fn(step: int) -> float:
        if step < warmup_steps:
            return w0 + (1.0 - w0) * step / warmup_steps
        return after(step)

    return fn


def total_steps(optim_cfg, steps_per_epoch: int) -> int:
    """The run's optimiser steps: ``optim.steps`` when set, else ``epochs x steps_per_epoch``."""
    return max(1, optim_cfg.steps if optim_cfg.steps is not None else optim_cfg.epochs * steps_per_epoch)


def build_scheduler(optimizer: torch.optim.Optimizer, optim_cfg, steps_per_epoch: int
                    ) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-optimiser-step LambdaLR (resumable via its ``state_dict``); min/warm-up lrs scale with
    each group's multiplier. ``optim_cfg.schedule``: ``"cosine"``, ``"step"`` (``milestones`` in
    epochs) or ``"poly"``."""
    total = total_steps(optim_cfg, steps_per_epoch)
    warmup = (optim_cfg.warmup_steps if optim_cfg.warmup_steps is not None
              else int(round(optim_cfg.warmup_epochs * steps_per_epoch)))
    warmup = min(warmup, total)
    o = optim_cfg
    if o.schedule == "cosine":
        fn = cosine_lambda(total, warmup, o.lr, o.warmup_lr, o.min_lr)
    elif o.schedule == "step":
        fn = step_lambda(warmup, o.lr, o.warmup_lr, [round(m * steps_per_epoch) for m in o.milestones], o.gamma)
    elif o.schedule == "poly":
        fn = poly_lambda(total, warmup, o.lr, o.warmup_lr, o.min_lr, o.power)
    else:
        raise ValueError(f"optim.schedule must be 'cosine', 'step' or 'poly', got {o.schedule!r}")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
