"""``create_model``: a registered variant name (plus overrides) or a config to a built :class:`PIIP`,
with its weights. Every model piip builds for training or evaluation goes through here."""
from __future__ import annotations

import os
from typing import Mapping, Sequence

from timm.models._features import FeatureGetterNet

from ..config.model import PIIPConfig
from ..ops import use_onednn_linears
from ..weights import load_branch_weights
from ..weights.checkpoint import load_checkpoint
from .piip import PIIP, check_output_fmt
from .registry import get_config

__all__ = ["create_model", "check_weight_sources"]


def check_weight_sources(pretrained: bool, branch_weights, checkpoint) -> None:
    """The one precedence rule: a whole checkpoint, or branch initialisation, never both."""
    if checkpoint is not None and (pretrained or branch_weights):
        raise ValueError("pass either checkpoint= (a whole trained model) or pretrained/branch_weights "
                         "(branch initialisation), not both")


def create_model(
    name: str | PIIPConfig,
    pretrained: bool = False,
    *,
    branch_weights: Mapping[str | int, str | os.PathLike] | None = None,
    checkpoint: str | os.PathLike | None = None,
    features_only: bool = False,
    out_indices: int | Sequence[int] | None = None,
    output_fmt: str = "NCHW",
    norm: bool = False,
    **overrides,
) -> PIIP | FeatureGetterNet:
    """Build the registered variant ``name`` (or the network a :class:`PIIPConfig` describes).

    Args:
        name: a registered variant or alias (``piip.list_models()``), or a config (then no
            ``overrides``).
        pretrained: initialise every branch from the timm weights its config names (the paper's
            weights; hub or local cache). Branches listed in ``branch_weights`` use those files.
        branch_weights: local files per branch, ``{"branch1": "/path/file.safetensors", ...}``
            (branch 1 is the largest model); without ``pretrained`` only these are loaded.
        checkpoint: a whole-model piip checkpoint (``piip convert`` / ``save_checkpoint``) loaded
            strictly into the built model; the overrides must describe the same network.
        overrides: ``task="det"|"seg"|"cls"``, ``resolutions=(1344, 896, 448)`` or ``"1344/896/448"``
            (finest first), ``interactions=N``, ``interaction_attn="deform"|"regular"``,
            ``num_classes=N``, and any :class:`~piip.config.model.BranchConfig` field applied to
            every branch.

    Build on the ``meta`` device (``with torch.device("meta"):``) to inspect a 6B-scale variant
    without allocating it.
    """
    check_weight_sources(pretrained, branch_weights, checkpoint)
    if features_only:
        check_output_fmt(output_fmt)
    elif out_indices is not None or output_fmt != "NCHW" or norm:
        raise ValueError("out_indices, output_fmt and norm configure features_only=True; pass it too")
    if isinstance(name, PIIPConfig):
        if overrides:
            raise ValueError(f"create_model(config) takes no overrides (got {sorted(overrides)}); "
                             "change the config instead (dataclasses.replace / with_resolutions)")
        config = name
    else:
        config = get_config(name, **overrides)
    model = use_onednn_linears(PIIP(config))  # the process setting: piip.ops.onednn_linears_enabled
    if pretrained or branch_weights:
        model.pretrained_report = load_branch_weights(model, branch_weights, use_hub=pretrained)
    elif checkpoint is not None:
        load_checkpoint(checkpoint, model)
    if not features_only:
        return model
    if norm:
        model.final_norms()  # the error now rather than at the first forward
    return FeatureGetterNet(model, out_indices=model.default_feature_indices() if out_indices is None else out_indices,
                            output_fmt=output_fmt, norm=norm)
