"""Classification on the shared engine: data glue, model, loss (timm Mixup/CutMix, soft-target or
label-smoothing cross-entropy), top-1 for checkpoint selection; and the task's protocol members."""
from __future__ import annotations

import dataclasses
import json
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, default_collate

from ...config.model import PIIPConfig
from ...data import DataConfig, build_dataset
from ...engine.build import build_backbone, build_model_config
from ...models.factory import create_model
from ...models.piip import PIIP
from ...weights.checkpoint import save_checkpoint
from ..base import BaseTask, optional_validation
from . import cli, inference
from .evaluation import evaluate, evaluate_checkpoint

__all__ = ["ClassificationTask"]


class ClassificationTask(BaseTask, name="cls", data_config=DataConfig, metric="top1", model_kind="piip",
                         model_config=PIIPConfig, model_from_config=create_model, evaluate_checkpoint=evaluate_checkpoint,
                         cli=cli, inference=inference):
    """Classification: timm Mixup/CutMix, soft-target / label-smoothing cross-entropy, top-1/5."""

    def __init__(self, cfg):
        super().__init__(cfg)
        if cfg.model.head:  # the classifier's head is the network's (model.cls_head, model.cls_pool)
            raise ValueError(f"classification has no model.head settings (got model.head.{sorted(cfg.model.head)}); "
                             "the classifier is set by model.cls_head, model.cls_pool and model.num_classes")
        self.mixup = None
        self.num_classes = None
        self.class_names = None

    def build_datasets(self, cfg) -> tuple[Dataset, Dataset | None]:
        data = cfg.data
        if data.image_size is None:  # the model's input size (its finest branch's resolution)
            data = dataclasses.replace(data, image_size=build_model_config(cfg.model, "cls").input_size)
        return build_dataset(data, "train"), optional_validation(lambda: build_dataset(data, "val"), explicit=False)

    collate = staticmethod(default_collate)

    def build_model(self, cfg, train_dataset: Dataset) -> nn.Module:
        classes = getattr(train_dataset, "classes", None)
        self.class_names = list(classes) if classes is not None else None
        model = build_backbone(cfg.model, "cls", len(classes) if classes is not None else None)
        self.num_classes = model.config.num_classes
        aug = cfg.aug
        if aug.mixup > 0 or aug.cutmix > 0:
            from timm.data import Mixup

            self.mixup = Mixup(mixup_alpha=aug.mixup, cutmix_alpha=aug.cutmix, prob=aug.mixup_prob,
                               switch_prob=aug.mixup_switch_prob, label_smoothing=aug.label_smoothing,
                               num_classes=self.num_classes)
        return model

    def loss(self, model: nn.Module, batch, device: torch.device) -> tuple[torch.Tensor, int]:
        images, targets = batch
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if self.mixup is not None:
            images, soft = self.mixup(images, targets)
            logits = model(images)
            loss = torch.sum(-soft * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
        else:
            logits = model(images)
            loss = F.cross_entropy(logits.float(), targets, label_smoothing=self.cfg.aug.label_smoothing)
        return loss, images.shape[0]

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: DataLoader, device: torch.device,
                 amp_dtype: torch.dtype | None, gather: Callable[[list], list] | None = None,
                 save_to: str | None = None) -> dict[str, float]:
        m = evaluate(model, loader, self.num_classes, device, amp_dtype, gather=gather)
        return {"top1": float(m.top1), "top5": float(m.top5), "loss": float(m.loss),
                "num_samples": int(m.num_samples)}

    def checkpoint_metadata(self) -> dict[str, str] | None:
        """The header strings of the classifier's checkpoints: its class names (``piip predict``
        shows them)."""
        return {"class_names": json.dumps(self.class_names)} if self.class_names else None

    def export(self, model: nn.Module, path: str) -> str:
        """The classifier, with its class names in the header."""
        return save_checkpoint(model, path, metadata=self.checkpoint_metadata())

    @staticmethod
    def owns(model: nn.Module) -> bool:
        return isinstance(model, PIIP) and model.config.task == "cls"
