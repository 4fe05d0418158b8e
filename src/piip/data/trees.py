"""Real aerial photographs with hand-drawn tree-crown boxes, as a small COCO-format detection set.

The ``deepforest`` package (PyPI, MIT licence) ships sample data of the NEON Airborne Observation
Platform (RGB orthophotos at 10 cm per pixel, released by NEON under CC0) with Pascal-VOC boxes
drawn by hand around every tree crown. :func:`write_tree_crowns` cuts those photographs into crops
of three orientations (landscape 384x288, portrait 288x384, square 336x336), keeps each box that
lies at least half inside a crop (clipped to it) and writes a COCO-2017-style root: train and val
crops share no pixels and both have every orientation. Boxes only: real detection data mostly has
no masks, which is what it is for (a first run on data nobody here made).

The files are read from the installed distribution (``pip install --no-deps deepforest==2.1.0``,
about 20 MB; ``--no-deps`` because its import pulls PyTorch Lightning and more, and nothing of it is
imported here), and its licence is copied beside the data.
"""
from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from pathlib import Path

__all__ = ["TREE_SOURCES", "TILE_SIZES", "write_tree_crowns"]

DISTRIBUTION = "deepforest"
#: the annotated photographs: name -> (image, Pascal-VOC boxes) under deepforest/data/
TREE_SOURCES = {
    "yell541": ("2019_YELL_2_541000_4977000_image_crop.png", "2019_YELL_2_541000_4977000_image_crop.xml"),  # 1249x1035, 279 crowns
    "yell528": ("2019_YELL_2_528000_4978000_image_crop2.png", "2019_YELL_2_528000_4978000_image_crop2.xml"),  # 2299x2472, 574
}
#: crop sizes (width, height): landscape, portrait, square
TILE_SIZES = ((384, 288), (288, 384), (336, 336))


def _package_data() -> tuple[Path, str, list[Path]]:
    """The package's data folder, its version and its licence files."""
    from importlib import metadata

    try:
        dist = metadata.distribution(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        raise FileNotFoundError(f"the tree-crown photographs come with the {DISTRIBUTION!r} package: "
                                f"pip install --no-deps {DISTRIBUTION}==2.1.0") from None
    licences = [Path(dist.locate_file(f)) for f in dist.files or () if "licen" in str(f).lower()]
    return Path(dist.locate_file(f"{DISTRIBUTION}/data")), dist.version, licences


def _voc_boxes(path: Path) -> list[tuple[float, float, float, float]]:
    root = ET.parse(path).getroot()
    return [tuple(float(obj.find("bndbox").findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
            for obj in root.iter("object")]


def _layout(width: int, height: int) -> list[tuple[int, int, int, int]]:
    """Crops ``(x, y, w, h)`` that do not overlap: a row of landscape crops, then a row alternating
    portrait and square crops, and so on down the photograph."""
    (lw, lh), portrait, square = TILE_SIZES
    crops, y, row = [], 0, 0
    while True:
        pattern = [(lw, lh)] if row % 2 == 0 else [portrait, square]
        row_height = max(h for _, h in pattern)
        if y + row_height > height:
            if row % 2 == 0 or y + lh > height:
                break
            pattern, row_height = [(lw, lh)], lh
        x, k = 0, 0
        while x + pattern[k % len(pattern)][0] <= width:
            w, h = pattern[k % len(pattern)]
            crops.append((x, y, w, h))
            x, k = x + w, k + 1
        y, row = y + row_height, row + 1
    return crops


def _clip(boxes, crop, min_visible: float) -> list[list[float]]:
    """COCO ``[x, y, w, h]`` of the boxes at least ``min_visible`` inside ``crop``, clipped to it."""
    cx, cy, cw, ch = crop
    kept = []
    for x0, y0, x1, y1 in boxes:
        ix0, iy0, ix1, iy1 = max(x0, cx), max(y0, cy), min(x1, cx + cw), min(y1, cy + ch)
        if ix1 > ix0 and iy1 > iy0 and (ix1 - ix0) * (iy1 - iy0) >= min_visible * (x1 - x0) * (y1 - y0):
            kept.append([ix0 - cx, iy0 - cy, ix1 - ix0, iy1 - iy0])
    return kept


def write_tree_crowns(out: str | os.PathLike, *, sources: tuple[str, ...] = ("yell541",), val_every: int = 3,
                      min_visible: float = 0.5) -> dict[str, Path]:
    """Write the tree-crown set to ``out`` (``annotations/instances_{train,val}.json``, ``train/``,
    ``val/`` and the package's licence files); returns the two annotation files.

    Args:
        sources: photographs of :data:`TREE_SOURCES` (``"yell541"``: 10 crops, 238 crowns;
            both photographs: 46 crops, 678 crowns).
        val_every: every ``val_every``-th crop of each orientation (counting from the second) is
            held apart for validation.
        min_visible: the share of a crown's box that must lie in a crop for it to be kept.
    """
    from PIL import Image

    unknown = sorted(set(sources) - set(TREE_SOURCES))
    if unknown or not sources:
        raise ValueError(f"sources must be some of {sorted(TREE_SOURCES)}, got {list(sources)}")
    if val_every < 2:
        raise ValueError(f"val_every must be >= 2 (a training crop between held-apart ones), got {val_every}")
    data_dir, version, licences = _package_data()
    out = Path(out)
    splits = {s: {"info": {"description": f"tree crowns in NEON aerial photographs ({DISTRIBUTION} {version} "
                                          "sample data, MIT licence; imagery NEON, CC0)"},
                  "images": [], "annotations": [], "categories": [{"id": 1, "name": "tree"}]}
              for s in ("train", "val")}
    seen: dict[tuple[int, int], int] = {}
    for source in sources:
        image_name, boxes_name = TREE_SOURCES[source]
        boxes = _voc_boxes(data_dir / boxes_name)
        with Image.open(data_dir / image_name) as photo:
            photo = photo.convert("RGB")
            for crop in _layout(*photo.size):
                kept = _clip(boxes, crop, min_visible)
                if not kept:
                    continue
                shape = crop[2:]
                order = seen[shape] = seen.get(shape, -1) + 1
                split = "val" if order % val_every == 1 else "train"
                coco = splits[split]
                image_id = sum(len(s["images"]) for s in splits.values()) + 1
                name = f"{source}_{crop[0]}_{crop[1]}_{crop[2]}x{crop[3]}.png"
                (out / split).mkdir(parents=True, exist_ok=True)
                x, y, w, h = crop
                photo.crop((x, y, x + w, y + h)).save(out / split / name)
                coco["images"].append({"id": image_id, "file_name": name, "width": w, "height": h})
                for box in kept:
                    coco["annotations"].append({"id": sum(len(s["annotations"]) for s in splits.values()) + 1,
                                                "image_id": image_id, "category_id": 1, "bbox": box,
                                                "area": box[2] * box[3], "iscrowd": 0})
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, coco in splits.items():
        paths[split] = out / "annotations" / f"instances_{split}.json"
        paths[split].write_text(json.dumps(coco))
    for licence in licences:
        (out / f"{DISTRIBUTION}-{licence.name}").write_bytes(licence.read_bytes())
    return paths
