"""Semantic segmentation on the shared engine: ADE20K-layout or folder data, UperNet around the
run's piip backbone, MMSegmentation's losses, mIoU for checkpoint selection."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ...data.semseg import SegmentationDataConfig, build_segmentation_dataset, collate_segmentation
from ...engine.build import build_backbone
from ...weights.checkpoint import save_checkpoint
from ..base import BaseTask, head_settings, optional_validation, whole_model_checkpoint
from . import authors_heads, cli, inference
from .evaluation import evaluate_checkpoint, evaluate_segmenter
from .model import PIIPSegmenter, SegmenterConfig, build_segmenter, build_segmenter_from_config

__all__ = ["SegmentationTask"]

_DERIVED = ("backbone", "num_classes", "class_names")


class SegmentationTask(BaseTask, name="seg", data_config=SegmentationDataConfig, metric="mIoU",
                       model_kind="segmenter", model_config=SegmenterConfig,
                       model_from_config=build_segmenter_from_config, evaluate_checkpoint=evaluate_checkpoint,
                       cli=cli, inference=inference,
                       authors_heads=(authors_heads.has_upernet_heads, authors_heads.with_authors_heads)):
    """Semantic segmentation (UperNet + FCN auxiliary head)."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.head = head_settings(cfg.model.head, SegmenterConfig, _DERIVED, "segmenter")

    def build_datasets(self, cfg) -> tuple[Dataset, Dataset | None]:
        train = build_segmentation_dataset(cfg.data, "train")
        val = optional_validation(lambda: build_segmentation_dataset(cfg.data, "val"),
                                  explicit=cfg.data.val_images is not None or cfg.data.val_masks is not None)
        return train, val

    collate = staticmethod(collate_segmentation)

    def build_model(self, cfg, train_dataset) -> nn.Module:
        model = whole_model_checkpoint(cfg.model, self.model_kind)
        if model is not None:
            if model.config.num_classes != len(train_dataset.classes):
                raise ValueError(f"class mismatch: the checkpoint's segmenter has {model.config.num_classes} classes, "
                                 f"the data {len(train_dataset.classes)}")
            return model
        backbone = build_backbone(cfg.model, "seg")
        # test at the training scale (as MMSegmentation) and ignore what the data leaves unlabelled
        settings = {"test_scale": tuple(cfg.data.scale), "ignore_index": cfg.data.ignore_index, **self.head}
        return build_segmenter(backbone, len(train_dataset.classes), class_names=train_dataset.classes, **settings)

    def loss(self, model: nn.Module, batch, device: torch.device) -> tuple[torch.Tensor, int]:
        images, labels = batch
        images = torch.stack(images).to(device, non_blocking=True)
        labels = torch.stack(labels).to(device, non_blocking=True)
        return sum(model(images, labels).values()), images.shape[0]

    def evaluate(self, model: nn.Module, loader: DataLoader, device: torch.device, amp_dtype: torch.dtype | None,
                 gather: Callable[[list], list] | None = None, save_to: str | None = None) -> dict[str, float]:
        m = evaluate_segmenter(model, loader, device, amp_dtype, gather=gather, save_to=save_to)
        return {"mIoU": m.mIoU, "mAcc": m.mAcc, "aAcc": m.aAcc, "num_images": m.num_images}

    def export(self, model: PIIPSegmenter, path: str) -> str:
        return save_checkpoint(model, path)

    @staticmethod
    def owns(model: nn.Module) -> bool:
        return isinstance(model, PIIPSegmenter)
