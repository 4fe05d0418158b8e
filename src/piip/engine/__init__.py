"""Training engine: typed configs, parameter groups and schedule, atomic checkpoints,
distributed helpers and the train loop (``piip train cls CONFIG``)."""
from .config import (AugConfig, ModelConfig, OptimConfig, RunConfig, TrainConfig, apply_overrides, list_configs,
                     load_config)
from .optim import build_optimizer, build_param_groups, build_scheduler, param_rules
from .trainer import TASKS, build_model, build_model_config, train

__all__ = ["TrainConfig", "ModelConfig", "OptimConfig", "AugConfig", "RunConfig", "load_config", "list_configs",
           "apply_overrides", "build_optimizer", "build_param_groups", "build_scheduler", "param_rules",
           "build_model", "build_model_config", "train", "TASKS"]
