"""Classification data: Fashion-MNIST (the small real dataset) and ImageFolder trees.

Two datasets, one item contract: ``dataset[i] -> (image float32 (3, H, W), label int)`` and a
``.classes`` list of class names (index = label).

* ``"fashion_mnist"``: the original IDX files (``*-idx3-ubyte[.gz]``, ``*-idx1-ubyte[.gz]``) as
  installed by the Debian package ``dataset-fashion-mnist`` under
  ``/usr/share/datasets/fashion-mnist`` (the environment variable ``PIIP_FASHION_MNIST`` or
  ``DataConfig.root`` point elsewhere). The split is decoded once into an in-memory ``uint8``
  tensor (60k x 28 x 28 is 47 MB); ``"val"`` is the official 10k test split. Grayscale images are
  repeated to 3 channels.
* ``"imagefolder"``: ``root/train/<class>/*`` and ``root/val/<class>/*`` (torchvision's
  ``ImageFolder`` machinery); the class list comes from ``train/`` so labels agree across splits.
  Unreadable images are skipped (the next readable one is returned), counted in ``.skipped`` and
  warned about, so a corrupt file never stops an epoch.

Transforms (:func:`build_transforms`):

* ``augment="timm"``: timm's ``create_transform``, the paper's Appendix A recipe: random resized
  crop (bicubic), horizontal flip, RandAugment ``rand-m9-mstd0.5-inc1``, colour jitter 0.3, random
  erasing off; eval: resize to ``image_size / crop_pct`` then centre crop.
* ``augment="light"``: for 28x28 Fashion-MNIST: 2-pixel pad + random 28x28 crop, horizontal flip,
  bilinear upscale to ``image_size`` (all on tensors, a few microseconds per item); eval: upscale
  only. RandAugment/random-resized-crop on 28-pixel garments costs PIL time on every item (the 2 CPU
  cores here are the bottleneck of a 15-minute run) and slows convergence of a tiny model in a short
  schedule, so it is not the Fashion-MNIST default.
* ``augment="auto"`` (default): ``"light"`` for Fashion-MNIST, ``"timm"`` for ImageFolder.
* ``augment="none"``: the eval transform for training too.
"""
from __future__ import annotations

import gzip
import logging
import os
import random
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..config.typed import Serializable
from .unreadable import DECODE_ERRORS, SkipsUnreadable

__all__ = ["DataConfig", "build_transforms", "build_dataset", "check_num_classes", "FashionMNIST",
           "RobustImageFolder", "FASHION_MNIST_CLASSES", "FASHION_MNIST_DIR", "default_fashion_mnist_root",
           "looks_like_fashion_mnist", "resolve_data_arg"]

log = logging.getLogger(__name__)

#: Where the Debian package ``dataset-fashion-mnist`` installs the IDX files.
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_SIZE = 28
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot"]
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_FMNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                 "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_AUGMENTS = ("auto", "timm", "light", "none")
_SPLITS = ("train", "val")


@dataclass
class DataConfig(Serializable):
    """How to build a classification dataset and its transforms (JSON-serialisable).

    Attributes:
        dataset: ``"fashion_mnist"`` or ``"imagefolder"``.
        root: dataset folder. Fashion-MNIST: the folder with the IDX files (default:
            ``$PIIP_FASHION_MNIST`` or ``/usr/share/datasets/fashion-mnist``); ImageFolder: the
            folder holding ``train/`` and ``val/`` (required).
        image_size: side of the square images fed to the model (its finest branch's resolution).
            ``None`` (default) means "the model's input size", resolved by the trainer and by
            ``evaluate_checkpoint`` before the dataset is built (a bare Fashion-MNIST dataset
            keeps its native 28 pixels).
        augment: training augmentation, ``"auto"`` | ``"timm"`` | ``"light"`` | ``"none"`` (see the
            module docstring); ``"auto"`` is ``"light"`` for Fashion-MNIST, ``"timm"`` otherwise.
        auto_augment: timm auto-augment policy (``"timm"`` augment only; ``None`` disables).
        color_jitter: colour-jitter strength (``"timm"`` augment only).
        interpolation: resize interpolation of the ``"timm"`` transforms (train and eval).
        crop_pct: eval centre-crop fraction (resize to ``image_size / crop_pct``, crop
            ``image_size``); ``None``: timm's 0.875 for ImageFolder, 1.0 (no crop) for Fashion-MNIST.
        mean, std: normalisation (ImageNet's by default; the released checkpoints expect them).
        limit: use only the first ``limit`` samples of each split (deterministic; quick runs).
    """

    dataset: str = "fashion_mnist"
    root: str | None = None
    image_size: int | None = None
    augment: str = "auto"
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"
    color_jitter: float = 0.3
    interpolation: str = "bicubic"
    crop_pct: float | None = None
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    limit: int | None = None

    def __post_init__(self) -> None:
        if self.dataset not in ("fashion_mnist", "imagefolder"):
            raise ValueError(f"DataConfig.dataset must be 'fashion_mnist' or 'imagefolder', got {self.dataset!r}")
        if self.augment not in _AUGMENTS:
            raise ValueError(f"DataConfig.augment must be one of {_AUGMENTS}, got {self.augment!r}")
        if self.image_size is not None and int(self.image_size) < 1:
            raise ValueError(f"DataConfig.image_size must be positive, got {self.image_size}")
        if self.limit is not None and int(self.limit) < 1:
            raise ValueError(f"DataConfig.limit must be positive or None, got {self.limit}")
        if self.crop_pct is not None and not 0 < self.crop_pct <= 1:
            raise ValueError(f"DataConfig.crop_pct must be in (0, 1], got {self.crop_pct}")
        self.mean, self.std = tuple(self.mean), tuple(self.std)
        if self.root is not None:
            self.root = os.fspath(self.root)

    @property
    def resolved_augment(self) -> str:
        if self.augment != "auto":
            return self.augment
        return "light" if self.dataset == "fashion_mnist" else "timm"

    @property
    def resolved_image_size(self) -> int:
        if self.image_size is not None:
            return int(self.image_size)
        if self.dataset == "fashion_mnist":
            return FASHION_MNIST_SIZE
        raise ValueError("DataConfig.image_size is None: set it to the model's input size "
                         "(model.config.input_size) before building an ImageFolder dataset")

    @property
    def resolved_crop_pct(self) -> float:
        if self.crop_pct is not None:
            return self.crop_pct
        return 1.0 if self.dataset == "fashion_mnist" else 0.875

    def resolved_root(self) -> str:
        if self.root is not None:
            return self.root
        if self.dataset == "fashion_mnist":
            return default_fashion_mnist_root()
        raise ValueError("DataConfig.root is required for dataset='imagefolder' "
                         "(a folder with train/<class>/ and val/<class>/ sub-folders)")


def default_fashion_mnist_root() -> str:
    """``$PIIP_FASHION_MNIST`` if set, else the Debian package's folder."""
    return os.environ.get("PIIP_FASHION_MNIST") or FASHION_MNIST_DIR


def _find_idx(root: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (root / name).is_file():
            return root / name
    return None


def looks_like_fashion_mnist(root: str | os.PathLike) -> bool:
    """True when ``root`` holds the (MNIST-layout) IDX files of at least one split."""
    root = Path(root)
    return any(_find_idx(root, images) is not None for images, _ in _FMNIST_FILES.values())


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as err:
        raise ValueError(f"cannot read IDX file {str(path)!r}: {err}") from err
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{str(path)!r} is not an unsigned-byte IDX file (bad magic {data[:4]!r})")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    expected = int(np.prod(dims))
    if len(data) - offset != expected:
        raise ValueError(f"{str(path)!r} is truncated or corrupt: header says {dims} "
                         f"({expected} bytes), file has {len(data) - offset}")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)


@lru_cache(maxsize=4)
def _load_fashion_mnist(root: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    path = Path(root)
    if not path.is_dir():
        raise FileNotFoundError(
            f"Fashion-MNIST folder {root!r} does not exist; install the Debian package "
            "(apt-get install dataset-fashion-mnist, files under /usr/share/datasets/fashion-mnist) "
            "or point PIIP_FASHION_MNIST / DataConfig.root at a folder with the IDX files")
    images_stem, labels_stem = _FMNIST_FILES[split]
    images_path, labels_path = _find_idx(path, images_stem), _find_idx(path, labels_stem)
    if images_path is None or labels_path is None:
        raise FileNotFoundError(
            f"Fashion-MNIST {split!r} split not found in {root!r}: expected {images_stem}[.gz] and "
            f"{labels_stem}[.gz] (found: {sorted(p.name for p in path.iterdir())[:10]})")
    images, labels = _read_idx(images_path), _read_idx(labels_path)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"Fashion-MNIST {split!r} files in {root!r} disagree: images {images.shape}, "
                         f"labels {labels.shape}")
    if len(images) == 0:
        raise ValueError(f"Fashion-MNIST {split!r} split in {root!r} is empty")
    if labels.max() >= len(FASHION_MNIST_CLASSES):
        raise ValueError(f"Fashion-MNIST labels in {str(labels_path)!r} go up to {labels.max()}, "
                         f"expected < {len(FASHION_MNIST_CLASSES)}")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


# -- transforms ---------------------------------------------------------------------------------
class LightTrainTransform:
    """Tensor augmentation for small grayscale images: pad + random crop, h-flip, upscale, 3 channels,
    normalise. Input: ``uint8 (H, W)`` tensor; output ``float32 (3, S, S)``."""

    def __init__(self, image_size: int, mean, std, pad: int = 2, hflip: float = 0.5, train: bool = True):
        self.image_size, self.pad, self.hflip, self.train = int(image_size), pad, hflip, train
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        x = image.to(torch.float32).div_(255.0)[None, None]  # 1x1xHxW
        if self.train:
            h, w = x.shape[-2:]
            if self.pad:
                x = F.pad(x, (self.pad,) * 4)
                top, left = random.randint(0, 2 * self.pad), random.randint(0, 2 * self.pad)
                x = x[..., top:top + h, left:left + w]
            if random.random() < self.hflip:
                x = x.flip(-1)
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear",
                              align_corners=False, antialias=False)
        x = x[0].expand(3, -1, -1)
        return (x - self.mean) / self.std

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(image_size={self.image_size}, train={self.train}, "
                f"pad={self.pad}, hflip={self.hflip})")


class _ToPILRGB:
    """``uint8 (H, W)`` grayscale tensor -> 3-channel PIL image (for timm's PIL transforms)."""

    def __call__(self, image):
        from PIL import Image

        if isinstance(image, torch.Tensor):
            image = Image.fromarray(image.numpy(), mode="L")
        return image.convert("RGB")

    def __repr__(self) -> str:
        return "ToPILRGB()"


class _Compose:
    def __init__(self, *steps: Callable):
        self.steps = steps

    def __call__(self, x):
        for step in self.steps:
            x = step(x)
        return x

    def __repr__(self) -> str:
        return f"Compose({', '.join(map(repr, self.steps))})"


def build_transforms(cfg: DataConfig, train: bool) -> Callable:
    """The per-item transform of ``cfg`` (train: augmentation; eval: resize + centre crop).

    ImageFolder transforms take PIL images; Fashion-MNIST transforms take the ``uint8 (28, 28)``
    tensors of :class:`FashionMNIST` and return ``float32 (3, S, S)``.
    """
    from timm.data import create_transform

    size = cfg.resolved_image_size
    augment = cfg.resolved_augment if train else "none"
    if cfg.dataset == "fashion_mnist" and augment in ("light", "none") and cfg.resolved_crop_pct == 1.0:
        return LightTrainTransform(size, cfg.mean, cfg.std, train=augment == "light")
    if augment == "light":
        raise ValueError("augment='light' is for Fashion-MNIST's 28x28 tensors; use 'timm' or 'none' "
                         "for ImageFolder datasets")
    if augment == "timm":
        transform = create_transform(
            size, is_training=True, auto_augment=cfg.auto_augment, color_jitter=cfg.color_jitter,
            interpolation=cfg.interpolation, mean=cfg.mean, std=cfg.std, re_prob=0.0)
        _patch_posterize(transform)
    else:
        transform = create_transform(size, is_training=False, interpolation=cfg.interpolation,
                                     mean=cfg.mean, std=cfg.std, crop_pct=cfg.resolved_crop_pct)
    if cfg.dataset == "fashion_mnist":
        return _Compose(_ToPILRGB(), transform)
    return _Compose(_ToRGB(), transform)


def _safe_posterize(img, bits_to_keep, **__):
    """timm's posterize, keeping Pillow < 11's behaviour for ``bits_to_keep == 0`` (a black image):
    newer Pillow raises ``ValueError`` there, which ``rand-m9-mstd0.5-inc1`` (PosterizeIncreasing at
    magnitude 10) hits a few times per epoch."""
    from PIL import Image, ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def _patch_posterize(transform) -> None:
    """Point the posterize ops of the RandAugment/AutoAugment inside ``transform`` (this instance
    only; timm itself is untouched) at :func:`_safe_posterize`."""
    for step in getattr(transform, "transforms", ()):
        ops = getattr(step, "ops", None)
        policy = getattr(step, "policy", None)
        candidates = list(ops or []) + [op for sub in (policy or []) for op in sub]
        for op in candidates:
            if getattr(op, "name", "").startswith("Posterize"):
                op.aug_fn = _safe_posterize


class _ToRGB:
    def __call__(self, image):
        return image.convert("RGB") if getattr(image, "mode", "RGB") != "RGB" else image

    def __repr__(self) -> str:
        return "ToRGB()"


# -- datasets -----------------------------------------------------------------------------------
class FashionMNIST(Dataset):
    """Fashion-MNIST from its IDX files, decoded once into memory (``.images`` ``uint8 (N, 28, 28)``,
    ``.targets`` ``int64 (N,)``); ``transform`` maps one ``uint8 (28, 28)`` tensor to the model input."""

    classes = FASHION_MNIST_CLASSES

    def __init__(self, root: str | os.PathLike | None = None, split: str = "train",
                 transform: Callable | None = None, limit: int | None = None):
        if split not in _SPLITS:
            raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
        self.root = os.fspath(root) if root is not None else default_fashion_mnist_root()
        self.split = split
        images, targets = _load_fashion_mnist(self.root, split)
        if limit is not None:
            images, targets = images[:limit], targets[:limit]
        self.images, self.targets = images, targets
        self.transform = transform
        self.classes = list(FASHION_MNIST_CLASSES)
        self.skipped = 0

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.targets[index])

    def __repr__(self) -> str:
        return f"FashionMNIST(split={self.split!r}, samples={len(self)}, root={self.root!r})"




class RobustImageFolder(SkipsUnreadable, Dataset):
    """``torchvision.datasets.ImageFolder`` whose unreadable images are skipped, not fatal.

    On a decode error the next readable sample (cyclically) is returned instead, counted and warned
    about (:class:`~piip.data.unreadable.SkipsUnreadable`: ``.skipped``, ``.bad_files``).
    """

    def __init__(self, root: str | os.PathLike, transform: Callable | None = None,
                 class_to_idx: dict[str, int] | None = None, limit: int | None = None):
        from torchvision.datasets.folder import IMG_EXTENSIONS, default_loader, make_dataset

        self.root = os.fspath(root)
        if class_to_idx is None:
            classes = sorted(e.name for e in os.scandir(self.root) if e.is_dir() and not e.name.startswith("."))
            if not classes:
                raise ValueError(f"no class sub-folders in {self.root!r}: expected {self.root}/<class>/<image>")
            class_to_idx = {c: i for i, c in enumerate(classes)}
        else:
            present = sorted(e.name for e in os.scandir(self.root) if e.is_dir() and not e.name.startswith("."))
            extra = sorted(set(present) - set(class_to_idx))
            if extra:
                raise ValueError(f"{self.root!r} has class folders {extra[:10]} that the train split lacks; "
                                 "the splits must share one class list")
        self.class_to_idx = dict(class_to_idx)
        self.classes = sorted(self.class_to_idx, key=self.class_to_idx.get)
        self.samples = make_dataset(self.root, self.class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
        if not self.samples:
            raise ValueError(f"no images in {self.root!r} (looked for {', '.join(IMG_EXTENSIONS)} files "
                             f"under {len(self.classes)} class folders)")
        if limit is not None:
            self.samples = self.samples[:limit]
        self.targets = [t for _, t in self.samples]
        self.loader = default_loader
        self.transform = transform
        self.bad_files: list[str] = []

    def __len__(self) -> int:
        return len(self.samples)

    def _load(self, index: int):
        path, target = self.samples[index]
        image = self.loader(path)
        image.load()  # force decoding here (a truncated file fails now, not inside the transform)
        return image, target

    def __getitem__(self, index: int):
        n = len(self.samples)
        for attempt in range(n):
            i = (index + attempt) % n
            try:
                image, target = self._load(i)
            except DECODE_ERRORS as err:
                self.note_unreadable(self.samples[i][0], err)
                continue
            if self.transform is not None:
                image = self.transform(image)
            return image, target
        raise RuntimeError(f"no readable image in {self.root!r}: all {n} files failed to decode")

    def __repr__(self) -> str:
        return (f"RobustImageFolder(root={self.root!r}, samples={len(self)}, classes={len(self.classes)}, "
                f"skipped={self.skipped})")


def build_dataset(cfg: DataConfig, split: str, transform: Callable | None = None) -> Dataset:
    """The ``split`` (``"train"`` or ``"val"``) of ``cfg``'s dataset with ``build_transforms(cfg, split ==
    "train")`` (or ``transform``) applied; items are ``(float32 (3, H, W), int)``, ``.classes`` names them.

    Raises ``FileNotFoundError`` for a missing root or split folder and ``ValueError`` for an empty one.
    """
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
    root = cfg.resolved_root()
    if transform is None:
        transform = build_transforms(cfg, train=split == "train")
    if cfg.dataset == "fashion_mnist":
        return FashionMNIST(root, split, transform=transform, limit=cfg.limit)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"dataset folder {root!r} does not exist")
    split_dir = os.path.join(root, split)
    if not os.path.isdir(split_dir):
        found = sorted(e.name for e in os.scandir(root) if e.is_dir())
        raise FileNotFoundError(f"split folder {split_dir!r} does not exist (an ImageFolder dataset needs "
                                f"{root}/train/<class>/ and {root}/val/<class>/; found folders {found[:10]})")
    class_to_idx = None
    train_dir = os.path.join(root, "train")
    if split != "train" and os.path.isdir(train_dir):
        class_to_idx = RobustImageFolder(train_dir, limit=1).class_to_idx
    return RobustImageFolder(split_dir, transform=transform, class_to_idx=class_to_idx, limit=cfg.limit)


def check_num_classes(dataset: Dataset, model: Any) -> None:
    """Raise ``ValueError`` unless ``model`` is a classifier whose head has one output per class of
    ``dataset`` (``model`` may also be a :class:`~piip.config.model.PIIPConfig` or an int)."""
    classes = getattr(dataset, "classes", None)
    if classes is None:
        raise ValueError(f"{type(dataset).__name__} has no .classes list to check against the model head")
    if isinstance(model, int):
        width = model
    else:
        config = getattr(model, "config", model)
        task = getattr(config, "task", "cls")
        if task != "cls":
            raise ValueError(f"the model is a {task!r} model; classification needs task='cls' "
                             "(e.g. create_model(name, task='cls', num_classes=N))")
        width = getattr(config, "num_classes", None)
        if width is None:
            raise ValueError(f"cannot tell the head width of {type(model).__name__}")
    if width != len(classes):
        raise ValueError(
            f"class-count mismatch: the dataset has {len(classes)} classes ({', '.join(map(str, classes[:5]))}"
            f"{', ...' if len(classes) > 5 else ''}) but the model head has {width} outputs; build the model "
            f"with num_classes={len(classes)} or evaluate it on its own label set")


def resolve_data_arg(data: str, dataset: str | None = None) -> tuple[str, str | None]:
    """``--data`` of the command line to ``(dataset, root)``.

    ``data`` is ``"fashion_mnist"`` (the default Fashion-MNIST folder) or a folder; without
    ``dataset`` a folder holding IDX files is Fashion-MNIST and anything else an ImageFolder tree.
    """
    if data in ("fashion_mnist", "fashion-mnist", "fmnist"):
        if dataset not in (None, "fashion_mnist"):
            raise ValueError(f"--data {data} names Fashion-MNIST but --dataset is {dataset!r}")
        return "fashion_mnist", None
    if not os.path.isdir(data):
        raise FileNotFoundError(f"dataset folder {data!r} does not exist")
    if dataset is None:
        dataset = "fashion_mnist" if looks_like_fashion_mnist(data) else "imagefolder"
    return dataset, data
