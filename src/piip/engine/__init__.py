"""Training engine (task-agnostic): typed configs, parameter groups and schedules, atomic
checkpoints, distributed helpers, sampling and the train loop (``piip train TASK CONFIG``)."""
from .build import build_backbone, build_model_config
from .config import (AugConfig, ModelConfig, OptimConfig, RunConfig, TrainConfig, apply_overrides, list_configs,
                     load_config)
from .optim import build_optimizer, build_param_groups, build_scheduler, param_rules
from .trainer import build_task, train

__all__ = ["TrainConfig", "ModelConfig", "OptimConfig", "AugConfig", "RunConfig", "load_config", "list_configs",
           "apply_overrides", "build_optimizer", "build_param_groups", "build_scheduler", "param_rules",
           "build_backbone", "build_model_config", "build_task", "train"]
