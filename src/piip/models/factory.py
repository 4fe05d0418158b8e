"""``create_model``: a registered variant name (plus overrides) to a built :class:`PIIP`."""
from __future__ import annotations

from .piip import PIIP
from .registry import get_config

__all__ = ["create_model"]


def create_model(name: str, pretrained: bool = False, **overrides) -> PIIP:
    """Build the registered variant ``name``.

    Overrides: ``task="det"|"cls"``, ``resolutions=(1344, 896, 448)`` or ``"1344/896/448"`` (finest
    first), ``interactions=N``, ``interaction_attn="deform"|"regular"``, ``num_classes=N``, and any
    :class:`~piip.models.config.BranchConfig` field applied to every branch.

    Build on the ``meta`` device (``with torch.device("meta"):``) to inspect a 6B-scale variant
    without allocating it.
    """
    if pretrained:
        raise NotImplementedError(
            "pretrained=True is not available yet: build with pretrained=False and load branch "
            "weights with timm, or wait for piip's weight loading (branch_weights=...)")
    return PIIP(get_config(name, **overrides))
