"""The configuration vocabulary: typed dataclasses as data (:mod:`.typed`: reading, writing,
checking and overriding every config piip has) and the network's own config (:mod:`.model`:
:class:`PIIPConfig`, :class:`BranchConfig`, :class:`InteractionConfig`)."""
from .model import BranchConfig, InteractionConfig, PIIPConfig, even_interaction_indexes, parse_resolutions
from .typed import Serializable, apply_overrides, build_config, check_value, parse_value

__all__ = ["PIIPConfig", "BranchConfig", "InteractionConfig", "even_interaction_indexes", "parse_resolutions",
           "Serializable", "build_config", "check_value", "parse_value", "apply_overrides"]
