"""Deprecated: the network's config moved to :mod:`piip.config.model` (this alias stays for one
release)."""
from ..config.model import (BranchConfig, InteractionConfig, PIIPConfig, even_interaction_indexes,
                            parse_resolutions, segmentation_form)

__all__ = ["BranchConfig", "InteractionConfig", "PIIPConfig", "even_interaction_indexes", "parse_resolutions",
           "segmentation_form"]
