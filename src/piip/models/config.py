"""Deprecated: the network's config moved to :mod:`piip.config.model` (this alias stays for one
release)."""
import warnings

from ..config.model import (BranchConfig, InteractionConfig, PIIPConfig, even_interaction_indexes,
                            parse_resolutions, segmentation_form)

__all__ = ["BranchConfig", "InteractionConfig", "PIIPConfig", "even_interaction_indexes", "parse_resolutions",
           "segmentation_form"]

warnings.warn("piip.models.config is deprecated: import from piip.config.model",
              DeprecationWarning, stacklevel=2)
