"""piip: Parameter-Inverted Image Pyramid Networks (NeurIPS 2024) in plain PyTorch."""
from .models import (PIIP, BranchConfig, InteractionConfig, PIIPConfig, create_model, get_config,
                     list_models)

__version__ = "0.1.0"

__all__ = ["PIIP", "PIIPConfig", "BranchConfig", "InteractionConfig", "create_model", "get_config",
           "list_models", "__version__"]
