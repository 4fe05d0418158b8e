"""The PIIP network, the registry of named variants and ``create_model``.

The variants register here, by importing their modules (the paper's in ``variants``, the tiny
demonstration ones in ``tiny``); a PIIP is the ``"piip"`` kind of piip checkpoint.
"""
from ..config.model import BranchConfig, InteractionConfig, PIIPConfig, parse_resolutions
from ..weights.checkpoint import register_model_kind
from . import tiny, variants  # noqa: F401  (the registered variants)
from .factory import create_model
from .piip import PIIP
from .registry import get_config, list_models, register_variant, resolve_name

register_model_kind("piip", PIIPConfig, create_model)
