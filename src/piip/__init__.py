"""piip: Parameter-Inverted Image Pyramid Networks (NeurIPS 2024) in plain PyTorch."""
from .models import (PIIP, BranchConfig, InteractionConfig, PIIPConfig, create_model, get_config,
                     list_models)

from .tasks.predict import predict
from .export import export_onnx
from .weights.checkpoint import load_checkpoint as load, save_checkpoint as save
from .weights.sharing import from_pretrained
from . import analysis  # noqa: F401  registers the model card writer of save_pretrained

__version__ = "0.1.0"

__all__ = ["PIIP", "PIIPConfig", "BranchConfig", "InteractionConfig", "create_model", "get_config",
           "list_models", "load", "save", "from_pretrained", "predict", "export_onnx", "__version__"]
