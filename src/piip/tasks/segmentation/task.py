"""Semantic segmentation on the shared engine: ADE20K-layout or folder data, UperNet around the
run's piip backbone, MMSegmentation's losses, mIoU for checkpoint selection."""
from __future__ import annotations

from typing import Callable, ClassVar

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ...data.semseg import SegmentationDataConfig, build_segmentation_dataset, collate_segmentation
from ..base import head_settings, optional_validation, register_task, whole_model_checkpoint
from .evaluation import evaluate_segmenter
from .model import PIIPSegmenter, SegmenterConfig, build_segmenter

__all__ = ["SegmentationTask"]

_DERIVED = ("backbone", "num_classes", "class_names")


@register_task
class SegmentationTask:
    """Semantic segmentation (UperNet + FCN auxiliary head)."""

    name: ClassVar[str] = "seg"
    data_config: ClassVar[type] = SegmentationDataConfig
    metric: ClassVar[str] = "mIoU"
    higher_is_better: ClassVar[bool] = True

    def __init__(self, cfg):
        self.cfg = cfg
        self.head = head_settings(cfg.model.head, SegmenterConfig, _DERIVED, "segmenter")

    def build_datasets(self, cfg) -> tuple[Dataset, Dataset | None]:
        train = build_segmentation_dataset(cfg.data, "train")
        val = optional_validation(lambda: build_segmentation_dataset(cfg.data, "val"),
                                  explicit=cfg.data.val_images is not None or cfg.data.val_masks is not None)
        return train, val

    collate = staticmethod(collate_segmentation)

    def build_model(self, cfg, train_dataset) -> nn.Module:
        from ...engine.build import build_backbone

        model = whole_model_checkpoint(cfg.model, "segmenter")
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
        from ...weights.checkpoint import save_checkpoint

        return save_checkpoint(model, path)
