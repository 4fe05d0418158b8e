from .config import BranchConfig, InteractionConfig, PIIPConfig, parse_resolutions
from .factory import create_model
from .piip import PIIP
from .registry import get_config, list_models, register_variant, resolve_name
