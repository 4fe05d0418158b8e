"""Inference for people: ``predict(model, images)`` and the files ``piip predict`` writes.

Works for every kind of piip checkpoint, through the task that owns the model
(:func:`piip.engine.task.task_for_model`): a detector gives boxes, class names, scores and masks; a
segmenter a label map; a classifier its top-5 classes. ``predict_files`` runs a checkpoint over
folders of any size: images in batches (decoded in a background thread while the model runs), one
line per image appended to ``predictions.jsonl`` as soon as its batch is done, so a run that is
stopped loses nothing and a rerun into the same folder skips the images already predicted. The task
draws each image (boxes with "class score" labels, masks and label maps as translucent overlays
with a legend) unless drawing is turned off.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from ..engine.task import task_for_model
from ..weights.checkpoint import load_checkpoint
from ..data.unreadable import DECODE_ERRORS
from ..weights.io import atomic_write
from .base import evaluation_progress
from .drawing import draw_detections, legend_strip, load_image, overlay_segmentation

__all__ = ["predict", "predict_files", "read_predictions", "draw_detections", "overlay_segmentation",
           "legend_strip", "IMAGE_SUFFIXES", "PREDICTIONS_FILE"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
#: the run's predictions, one JSON object per image (``{"image": path, ...}``), in the output folder
PREDICTIONS_FILE = "predictions.jsonl"
#: what the predictions in an output folder were made with; a rerun must match it to resume
RUN_FILE = "predict_run.json"


@torch.no_grad()
def predict(model: nn.Module, images: Sequence[Any], *, score_threshold: float = 0.5, topk: int = 5,
            class_names: Sequence[str] | None = None, device: str | torch.device = "cpu") -> list[dict[str, Any]]:
    """Predictions for ``images`` (paths, PIL images or float (3, H, W) tensors in [0, 1]).

    Detector: per image ``boxes`` (x1 y1 x2 y2 pixels), ``labels`` (1-based), ``classes``,
    ``scores`` and, for Mask R-CNN, ``masks`` (``(N, H, W)`` bool tensor), above
    ``score_threshold``. Segmenter: per image ``labels`` (``(H, W)`` int64 class map, the model's
    inference mode) and ``classes`` (the classes present with their share of the pixels).
    Classifier: per image ``top`` = the ``topk`` classes as ``{"label", "class", "probability"}``
    (names from ``class_names`` when given).
    """
    task = task_for_model(model)
    device = torch.device(device)
    was_training = model.training
    model.eval().to(device)
    try:
        return task.predict(model, [load_image(im) for im in images], score_threshold=score_threshold, topk=topk,
                            class_names=class_names, device=device)
    finally:
        model.train(was_training)


def _expand(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files.extend(sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES))
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"{str(path)!r} is neither an image file nor a folder")
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {[str(i) for i in inputs]}")
    return list(dict.fromkeys(files))


def _unique_stems(files: list[Path]) -> dict[Path, str]:
    """The name each image's pictures are written under: its stem, with ``-2``, ``-3`` ... for a stem
    met before (``a.png`` and ``a.jpg``, or two folders' ``0001.png``), so that no picture overwrites
    another; the same list of files always gives the same names (a resumed run's too)."""
    names: dict[Path, str] = {}
    taken: set[str] = set()
    for path in files:
        stem, k = path.stem, 1
        while stem in taken:
            k += 1
            stem = f"{path.stem}-{k}"
        taken.add(stem)
        names[path] = stem
    return names


def _file_digest(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def read_predictions(path: str | os.PathLike, *, repair: bool = False) -> dict[str, dict[str, Any]]:
    """The records of a ``predictions.jsonl`` by image path (the file's order).

    A last line cut short (the run was killed while writing it) is not a prediction: it is ignored,
    and with ``repair`` cut off the file so that the next record starts on a line of its own. Any
    other line that is not a JSON object with an ``image`` raises ``ValueError`` naming the line."""
    records: dict[str, dict[str, Any]] = {}
    with open(path, "rb") as f:
        data = f.read()
    lines = data.split(b"\n")
    good_end = 0
    for number, line in enumerate(lines, start=1):
        last = number == len(lines)
        if not line.strip():
            good_end += len(line) + (not last)
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or "image" not in record:
                raise ValueError("not an object with an 'image'")
        except ValueError as err:
            if last:  # the partial line of an interrupted write
                break
            raise ValueError(f"{str(path)!r} line {number} is not a prediction record ({err}); move the file away "
                             "or predict into another folder") from None
        records[record["image"]] = record
        good_end += len(line) + (not last)
    if repair and good_end < len(data):
        with open(path, "r+b") as f:
            f.truncate(good_end)
    return records


def _run_identity(checkpoint: str | os.PathLike, score_threshold: float) -> dict[str, Any]:
    return {"checkpoint": os.path.abspath(checkpoint), "checkpoint_sha256": _file_digest(checkpoint),
            "score_threshold": score_threshold}


def _start_or_resume(out: Path, identity: dict[str, Any], overwrite: bool) -> dict[str, dict[str, Any]]:
    """The records already in ``out`` (empty for a new run); the run file says what made them."""
    jsonl, run_file = out / PREDICTIONS_FILE, out / RUN_FILE
    if overwrite or not jsonl.exists():
        jsonl.unlink(missing_ok=True)
        atomic_write(run_file, "w", lambda f: json.dump(identity, f, indent=1))
        return {}
    made_by = json.loads(run_file.read_text()) if run_file.exists() else None
    if made_by is None or {k: made_by.get(k) for k in identity} != identity:
        differs = "no record of what made them" if made_by is None else ", ".join(
            f"{k} {made_by.get(k)!r} there, {v!r} now" for k, v in identity.items() if made_by.get(k) != v)
        raise ValueError(f"{str(out)!r} holds predictions of another run ({differs}); predict into another "
                         "folder, or pass overwrite=True (--overwrite) to start again")
    return read_predictions(jsonl, repair=True)


def _batches(files: list[Path], batch_size: int) -> Iterator[list[tuple[Path, torch.Tensor | Exception]]]:
    """Decoded images in batches, the next batch decoded in a thread while the caller works (PIL
    releases the GIL while it decodes); an unreadable file comes as its error."""
    def decode(chunk: list[Path]) -> list[tuple[Path, torch.Tensor | Exception]]:
        out = []
        for path in chunk:
            try:
                out.append((path, load_image(path)))
            except DECODE_ERRORS as err:
                out.append((path, err))
        return out

    chunks = [files[i:i + batch_size] for i in range(0, len(files), batch_size)]
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(decode, chunks[0]) if chunks else None
        for k in range(len(chunks)):
            batch = pending.result()
            pending = pool.submit(decode, chunks[k + 1]) if k + 1 < len(chunks) else None
            yield batch


def predict_files(checkpoint: str | os.PathLike, inputs: Sequence[str | os.PathLike], out_dir: str | os.PathLike,
                  *, score_threshold: float = 0.5, device: str | torch.device = "cpu", batch_size: int = 4,
                  draw: bool = True, overwrite: bool = False, progress: bool = False) -> dict[str, Any]:
    """Run a checkpoint over image files/folders into ``out_dir``: ``predictions.jsonl`` (one line
    per image, appended batch by batch) and, with ``draw``, what its task draws of each image.

    Resumable: a rerun into the same folder with the same checkpoint and threshold skips the images
    already in ``predictions.jsonl`` (another checkpoint or threshold is refused, ``overwrite``
    starts again). Batches of ``batch_size`` images run together where the model allows it with
    results equal to one image at a time: a classifier batches its resized crops, a detector runs
    the images of one padded size together (as its evaluation), a segmenter runs one image at a
    time (its sliding windows are per image). An unreadable image is recorded with its ``error``
    and does not stop the run.

    Returns ``{"predictions": {file: record} (every image of the folder, earlier runs' too),
    "json": the JSON lines file, "images": files drawn now, "descriptions": {file: one line},
    "predicted": images predicted now, "skipped": already there, "failed": unreadable now,
    "seconds", "images_per_second"}``."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    files = _expand(inputs)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"the output folder {str(out)!r} is a file; name a folder for predictions.jsonl and the "
                         "drawn images")
    model = load_checkpoint(checkpoint, device=device)
    names = getattr(model, "class_names", None)  # a classifier's, from its header
    task = task_for_model(model)
    out.mkdir(parents=True, exist_ok=True)
    done = _start_or_resume(out, _run_identity(checkpoint, score_threshold), overwrite)
    done_paths = {os.path.realpath(p) for p in done}
    todo = [p for p in files if os.path.realpath(p) not in done_paths]
    stems = _unique_stems(files)
    records = {image: {k: v for k, v in r.items() if k != "image"} for image, r in done.items()}
    drawn, failed, started = [], 0, time.perf_counter()
    with open(out / PREDICTIONS_FILE, "a", encoding="utf-8") as jsonl, \
            evaluation_progress(progress, len(todo), "predict") as advance:
        for batch in _batches(todo, batch_size):
            readable = [(path, image) for path, image in batch if isinstance(image, torch.Tensor)]
            predictions = predict(model, [image for _, image in readable], score_threshold=score_threshold,
                                  class_names=names, device=device) if readable else []
            made = dict(zip((path for path, _ in readable), predictions))
            for path, image in batch:
                if path in made:
                    record, pictures = task.save_prediction(model, image, made[path], out, stems[path], names, draw=draw)
                    drawn.extend(pictures)
                else:
                    record, failed = {"error": f"unreadable image ({type(image).__name__}: {image})"}, failed + 1
                records[str(path)] = record
                jsonl.write(json.dumps({"image": str(path), **record}) + "\n")
            jsonl.flush()
            os.fsync(jsonl.fileno())
            advance(len(batch))
    seconds = time.perf_counter() - started
    return {"predictions": records, "json": str(out / PREDICTIONS_FILE), "images": drawn,
            "descriptions": {p: task.describe_prediction(r) if "error" not in r else r["error"]
                             for p, r in records.items()},
            "predicted": len(todo) - failed, "skipped": len(files) - len(todo), "failed": failed,
            "seconds": seconds, "images_per_second": (len(todo) - failed) / seconds if todo else 0.0}
