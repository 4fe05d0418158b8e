"""Fashion-MNIST scenes: a small detection and instance-segmentation dataset of real items at every
scale, on real photographs and textures, in COCO format.

Each scene is a crop of one of scikit-image's bundled photographs and textures (brick, grass,
gravel, coffee, a cat, a rocket, ...; no download), 168x224 by default (every other one portrait),
with 1 to ``max_objects`` Fashion-MNIST items, each in a random saturated colour over its own grey
shading,
pasted at random sizes spanning COCO's small, medium and large objects (``min_size`` to
``max_size`` pixels, log-uniform). An item's own pixels (its grey values above a threshold) give its
mask; later items occlude earlier ones, so masks and tight boxes are those of the visible pixels,
and items hidden below ``min_visible`` of their area are left out. The item's class is its label.
Training scenes take their items from Fashion-MNIST's train split, validation scenes from its test
split, and the backgrounds are split too (left / right halves of every photograph), so no pixel of a
validation scene was seen in training. Everything is deterministic given the seed.

This spread of object scales on one canvas is what image pyramids exist for: ``piip demo det``
trains a parameter-inverted PIIP and a single-resolution ViT on it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

import numpy as np

from .classification import FASHION_MNIST_CLASSES, _load_fashion_mnist, default_fashion_mnist_root

__all__ = ["SCENE_BACKGROUNDS", "SCENES_VERSION", "generate_scenes", "generate_semantic_scenes", "scene_split"]

#: changes whenever the same seed would give other scenes (stored with generated datasets)
SCENES_VERSION = 2

#: scikit-image's bundled colour or grey photographs and textures used as backgrounds
SCENE_BACKGROUNDS = ("astronaut", "brick", "camera", "chelsea", "coffee", "grass", "gravel", "rocket",
                     "hubble_deep_field", "immunohistochemistry", "moon", "retina", "coins", "page")


def _backgrounds(split: str) -> list[np.ndarray]:
    """RGB uint8 arrays of the backgrounds: the left 60% of each for train, the right 40% for val."""
    try:
        from skimage import data
    except ImportError as err:  # pragma: no cover - scikit-image is in the dev extra
        raise ImportError("the scenes generator reads scikit-image's bundled photographs: "
                          "pip install scikit-image (or pip install 'piip[scenes]')") from err
    images = []
    for name in SCENE_BACKGROUNDS:
        image = np.asarray(getattr(data, name)())
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=2)
        image = image[..., :3]
        if image.dtype != np.uint8:
            image = (255 * (image - image.min()) / max(1e-9, float(image.max() - image.min()))).astype(np.uint8)
        cut = int(image.shape[1] * 0.6)
        images.append(image[:, :cut] if split == "train" else image[:, cut:])
    return images


def _crop(background: np.ndarray, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """A random crop of ``background`` resized to ``height x width`` (random scale and flip)."""
    from PIL import Image

    bh, bw = background.shape[:2]
    scale = rng.uniform(0.5, 1.0)
    ch, cw = max(16, int(bh * scale)), max(16, int(bw * scale))
    ch, cw = min(ch, bh), min(cw, bw)
    y, x = rng.integers(0, bh - ch + 1), rng.integers(0, bw - cw + 1)
    crop = Image.fromarray(np.ascontiguousarray(background[y:y + ch, x:x + cw]))
    crop = np.asarray(crop.resize((width, height), Image.BILINEAR))
    return crop[:, ::-1].copy() if rng.random() < 0.5 else crop.copy()


def _colour(rng: np.random.Generator) -> np.ndarray:
    """A saturated colour (RGB gains, the brightest channel 1): items keep their own grey shading and
    stand out from the photographs as real objects do from real backgrounds."""
    hue = rng.uniform(0, 6)
    sector, frac = int(hue), hue - int(hue)
    low = rng.uniform(0.0, 0.35)
    rising, falling = low + (1 - low) * frac, 1 - (1 - low) * frac
    return np.array([(1, rising, low), (falling, 1, low), (low, 1, rising), (low, falling, 1),
                     (rising, low, 1), (1, low, falling)][sector % 6])


def _item(image: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A 28x28 item resized to ``size``: its grey values and its mask (pixels above 10% grey)."""
    from PIL import Image

    grey = np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR), dtype=np.float32)
    return grey, grey > 25.5


def scene_split(items: np.ndarray, labels: np.ndarray, backgrounds: list[np.ndarray], count: int,
                rng: np.random.Generator, *, canvas: tuple[int, int], max_objects: int, min_size: int,
                max_size: int, min_visible: float) -> Iterator[tuple[np.ndarray, list[dict]]]:
    """Yield ``count`` scenes: an RGB uint8 image and its objects (``label``, ``mask``)."""
    for index in range(count):
        height, width = canvas if index % 2 == 0 else canvas[::-1]  # landscape and portrait scenes
        image = _crop(backgrounds[rng.integers(len(backgrounds))], height, width, rng).astype(np.float32)
        placed: list[dict] = []
        for _ in range(rng.integers(1, max_objects + 1)):
            size = int(round(np.exp(rng.uniform(np.log(min_size), np.log(min(max_size, height, width))))))
            k = rng.integers(len(items))
            grey, mask = _item(items[k], size)
            y, x = rng.integers(0, height - size + 1), rng.integers(0, width - size + 1)
            full = np.zeros((height, width), dtype=bool)
            full[y:y + size, x:x + size] = mask
            region = image[y:y + size, x:x + size]
            region[mask] = np.clip(grey[mask, None] * _colour(rng), 0, 255)
            for other in placed:  # the new item hides what lies below it
                other["mask"] &= ~full
            placed.append({"label": int(labels[k]), "mask": full, "area0": int(full.sum())})
        objects = [o for o in placed if o["mask"].sum() >= max(4, min_visible * o["area0"])]
        yield image.astype(np.uint8), objects


def _annotation(obj: dict, image_id: int, ann_id: int) -> dict:
    from faster_coco_eval.core import mask as mask_util

    mask = obj["mask"]
    ys, xs = np.nonzero(mask)
    x1, y1, x2, y2 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"id": ann_id, "image_id": image_id, "category_id": obj["label"] + 1,
            "bbox": [x1, y1, x2 - x1, y2 - y1], "area": int(mask.sum()), "iscrowd": 0,
            "segmentation": {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}}


def generate_scenes(out: str | os.PathLike, *, train_images: int = 800, val_images: int = 200, seed: int = 0,
                    canvas: tuple[int, int] = (168, 224), max_objects: int = 6, min_size: int = 10,
                    max_size: int = 168, min_visible: float = 0.4, fashion_mnist_root: str | None = None,
                    progress: bool = False) -> dict[str, str]:
    """Write a COCO-format dataset to ``out``: ``annotations/instances_{train,val}.json`` and the PNG
    images in ``train/`` and ``val/``. Returns the annotation paths.

    Args:
        canvas: ``(height, width)`` of the landscape scenes; every other scene is portrait.
        max_objects: items per scene (1 to this many, before occlusion removes any).
        min_size, max_size: the items' side in pixels (log-uniform): COCO small, medium and large.
        min_visible: an item hidden below this fraction of its area by later items is left out.
        fashion_mnist_root: the IDX files (default: the Debian package's folder).
    """
    from PIL import Image

    if not 1 <= min_size <= max_size:
        raise ValueError(f"need 1 <= min_size <= max_size, got {min_size}, {max_size}")
    out = Path(out)
    root = fashion_mnist_root or default_fashion_mnist_root()
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(FASHION_MNIST_CLASSES)]
    paths = {}
    for split, count, source, offset in (("train", train_images, "train", 0), ("val", val_images, "val", 1)):
        items, labels = (t.numpy() for t in _load_fashion_mnist(root, source))
        rng = np.random.default_rng([seed, offset])
        (out / split).mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        scenes = scene_split(items, labels, _backgrounds(split), count, rng, canvas=canvas,
                             max_objects=max_objects, min_size=min_size, max_size=max_size,
                             min_visible=min_visible)
        if progress:
            from rich.progress import track

            scenes = track(scenes, total=count, description=f"scenes {split}")
        for i, (image, objects) in enumerate(scenes):
            name = f"{i:06d}.png"
            Image.fromarray(image).save(out / split / name)
            images.append({"id": i + 1, "file_name": name, "height": image.shape[0], "width": image.shape[1]})
            for obj in objects:
                annotations.append(_annotation(obj, i + 1, len(annotations) + 1))
        path = out / "annotations" / f"instances_{split}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"info": {"description": "Fashion-MNIST scenes (piip)", "seed": seed,
                                             "version": SCENES_VERSION},
                                    "images": images, "annotations": annotations, "categories": categories}))
        paths[split] = str(path)
    return paths


def generate_semantic_scenes(out: str | os.PathLike, *, train_images: int = 800, val_images: int = 200, seed: int = 0,
                             canvas: tuple[int, int] = (168, 224), max_objects: int = 6, min_size: int = 10,
                             max_size: int = 168, min_visible: float = 0.4, fashion_mnist_root: str | None = None,
                             progress: bool = False) -> str:
    """The same scenes for semantic segmentation, in the ADE20K layout: ``images/{training,validation}/
    *.jpg``, ``annotations/{training,validation}/*.png`` and ``classes.txt``. Every pixel has a class:
    ``background`` (0) or the Fashion-MNIST class of the item it shows (1..10). As in ADE20K's files,
    the PNGs store class + 1 (0 would be "other", unused here), so the ADE20K reader's
    ``reduce_zero_label`` gives the classes back. Returns ``out``."""
    from PIL import Image

    out = Path(out)
    root = fashion_mnist_root or default_fashion_mnist_root()
    for split, count, source, offset, folder in (("train", train_images, "train", 0, "training"),
                                                 ("val", val_images, "val", 1, "validation")):
        items, labels = (t.numpy() for t in _load_fashion_mnist(root, source))
        rng = np.random.default_rng([seed, offset])
        for kind in ("images", "annotations"):
            (out / kind / folder).mkdir(parents=True, exist_ok=True)
        scenes = scene_split(items, labels, _backgrounds(split), count, rng, canvas=canvas, max_objects=max_objects,
                             min_size=min_size, max_size=max_size, min_visible=min_visible)
        if progress:
            from rich.progress import track

            scenes = track(scenes, total=count, description=f"semantic scenes {split}")
        for i, (image, objects) in enumerate(scenes):
            label = np.ones(image.shape[:2], dtype=np.uint8)          # background: class 0, stored as 1
            for obj in objects:
                label[obj["mask"]] = obj["label"] + 2                  # item class 1..10, stored + 1
            Image.fromarray(image).save(out / "images" / folder / f"{i:06d}.jpg", quality=95)
            Image.fromarray(label).save(out / "annotations" / folder / f"{i:06d}.png")
    (out / "classes.txt").write_text("\n".join(["background", *FASHION_MNIST_CLASSES]) + "\n")
    return str(out)
