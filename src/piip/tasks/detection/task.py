"""Detection on the shared engine: COCO-format data, a torchvision detector around the run's piip
backbone, the detector's own losses, COCO AP for checkpoint selection."""
from __future__ import annotations

import warnings
from typing import Callable, ClassVar

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ...data.coco import CocoDetection, DetectionDataConfig, build_coco_dataset, collate_detection
from ...engine.build import build_backbone, build_model_config
from ...weights.checkpoint import save_checkpoint
from ..base import BaseTask, head_settings, optional_validation, whole_model_checkpoint
from . import authors_heads, cli, inference
from .evaluation import check_classes, evaluate_checkpoint, evaluate_detector
from .model import Detector, DetectorConfig, build_detector, build_detector_from_config, detector_kind

__all__ = ["DetectionTask"]

#: DetectorConfig fields that come from the data or the backbone, not from ``model.head``
_DERIVED = ("backbone", "num_classes", "class_names", "category_ids")


class DetectionTask(BaseTask, name="det", data_config=DetectionDataConfig, metric="bbox_AP", model_kind="detector",
                    model_config=DetectorConfig, model_from_config=build_detector_from_config,
                    evaluate_checkpoint=evaluate_checkpoint, cli=cli, inference=inference,
                    authors_heads=(authors_heads.has_authors_heads, authors_heads.with_authors_heads)):
    """Object detection / instance segmentation: ``model.head.kind`` ``mask_rcnn`` (default; Faster
    R-CNN with ``masks: false``), ``cascade_mask_rcnn`` or ``dino`` (boxes only)."""

    #: a batch without positive proposals leaves the mask head unused: DDP must allow that
    find_unused_parameters: ClassVar[bool] = True

    def __init__(self, cfg):
        super().__init__(cfg)
        self.head = head_settings(cfg.model.head, DetectorConfig, _DERIVED, "detector")
        if cfg.data.sizes_training_images:  # the data pipeline sizes the training images
            self.head.setdefault("resize_in_training", False)
        if cfg.data.multi_scale:  # and the authors test at their multi-scale recipe's size
            ratio = self._input_size(cfg) / 1024
            self.head.setdefault("min_size", int(800 * ratio))
            self.head.setdefault("max_size", int(1333 * ratio))

    @staticmethod
    def _input_size(cfg) -> int:
        return build_model_config(cfg.model, "det").input_size

    def build_datasets(self, cfg) -> tuple[Dataset, Dataset | None]:
        size = self._input_size(cfg) if cfg.data.sizes_training_images else None
        train = build_coco_dataset(cfg.data, "train", masks=self._wants_masks(), input_size=size)
        if train.masks and not train.mask_annotations:
            self._train_box_only(train)
        val = optional_validation(lambda: build_coco_dataset(cfg.data, "val", masks=False),
                                  explicit=cfg.data.val_ann is not None or cfg.data.val_images is not None)
        return train, val

    def _wants_masks(self) -> bool:
        """Whether the detector to train learns masks: ``model.head.masks``, else its kind's default."""
        kind = detector_kind(self.head.get("kind", DetectorConfig.kind), "model.head.kind")
        masks = self.head.get("masks")
        return kind.defaults["masks"] if masks is None else masks

    def _train_box_only(self, train: CocoDetection) -> None:
        """Training data without a single mask: a box-only detector, decided before the first step
        (an explicit ``model.head.masks=true`` is refused). A whole Mask R-CNN being fine-tuned
        keeps its mask head, which then learns nothing."""
        if self.head.get("masks") is True:
            raise ValueError(f"{train.ann_file}: no annotation has a 'segmentation' (instance mask), but the run "
                             "sets model.head.masks=true; set model.head.masks=false to train a box-only detector")
        warnings.warn(f"{train.ann_file} has boxes but no instance masks: the detector learns boxes only "
                      "(model.head.masks=false)", UserWarning, stacklevel=2)
        self.head["masks"] = False
        train.masks = False

    collate = staticmethod(collate_detection)

    @staticmethod
    def batch_groups(dataset: CocoDetection) -> list[int]:
        return dataset.aspect_groups()

    def build_model(self, cfg, train_dataset: CocoDetection) -> nn.Module:
        model = whole_model_checkpoint(cfg.model, self.model_kind)
        if model is not None:
            check_classes(model.config, train_dataset)
            return model
        backbone = build_backbone(cfg.model, "det")
        return build_detector(backbone, len(train_dataset.classes), class_names=train_dataset.classes,
                              category_ids=train_dataset.category_ids, **self.head)

    def loss(self, model: nn.Module, batch, device: torch.device) -> tuple[torch.Tensor, int]:
        images, targets = batch
        images = [im.to(device, non_blocking=True) for im in images]
        targets = [{k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in t.items()}
                   for t in targets]
        losses = model(images, targets)
        return sum(losses.values()), len(images)

    def evaluate(self, model: nn.Module, loader: DataLoader, device: torch.device, amp_dtype: torch.dtype | None,
                 gather: Callable[[list], list] | None = None, save_to: str | None = None) -> dict[str, float]:
        return evaluate_detector(model, loader, device, amp_dtype, gather=gather, save_to=save_to)

    def export(self, model: Detector, path: str) -> str:
        return save_checkpoint(model, path)

    @staticmethod
    def owns(model: nn.Module) -> bool:
        return isinstance(model, Detector)
