"""``piip predict`` on folders: batches equal single images, one JSON line per image, resume after an
interruption, refusals of another run's folder, unreadable images recorded, no pictures on request."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import piip
from piip.cli import main
from piip.tasks.predict import predict_files, read_predictions

from conftest import jsonl_by_image, tiny_config
from test_detection import tiny_detector


def _images(folder, sizes, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"im{i:02d}.png")
    return folder


def _classifier(tmp_path, name="cls.safetensors", seed=0):
    torch.manual_seed(seed)
    model = piip.PIIP(tiny_config(task="cls", num_classes=7, cls_pool="avg"))
    return piip.save(model, tmp_path / name, metadata={"class_names": json.dumps(list("abcdefg"))})


def _top(records):
    return {image: [(t["label"], t["probability"]) for t in r["top"]] for image, r in records.items()}


def test_classifier_batches_equal_single_images_and_resume_after_a_kill(tmp_path):
    checkpoint = _classifier(tmp_path)
    folder = _images(tmp_path / "images", [(40, 50), (64, 48), (50, 50), (33, 70), (48, 48), (60, 40), (45, 45)])
    single = predict_files(checkpoint, [folder], tmp_path / "one", batch_size=1)
    batched = predict_files(checkpoint, [folder], tmp_path / "three", batch_size=3)
    assert single["predicted"] == batched["predicted"] == 7 and single["skipped"] == 0
    lines = jsonl_by_image(tmp_path / "three" / "predictions.jsonl")
    assert sorted(lines) == sorted(str(p) for p in folder.iterdir())
    one, three = _top(jsonl_by_image(tmp_path / "one" / "predictions.jsonl")), _top(lines)
    for image in one:
        assert [label for label, _ in one[image]] == [label for label, _ in three[image]]
        assert np.allclose([p for _, p in one[image]], [p for _, p in three[image]], atol=1e-5)

    # a run killed after two batches, in the middle of writing the third: 6 lines and half a line
    jsonl = tmp_path / "three" / "predictions.jsonl"
    text = jsonl.read_text().splitlines(keepends=True)
    jsonl.write_text("".join(text[:6]) + text[6][:25])
    resumed = predict_files(checkpoint, [folder], tmp_path / "three", batch_size=3)
    assert resumed["predicted"] == 1 and resumed["skipped"] == 6
    final = jsonl.read_text().splitlines()
    assert len(final) == 7 and all(json.loads(line)["image"] for line in final)
    assert _top(jsonl_by_image(jsonl)) == three
    again = predict_files(checkpoint, [folder], tmp_path / "three")
    assert again["predicted"] == 0 and again["skipped"] == 7 and len(jsonl.read_text().splitlines()) == 7


def test_another_runs_folder_is_refused_overwrite_starts_again(tmp_path):
    folder = _images(tmp_path / "images", [(40, 40), (50, 40)])
    first = _classifier(tmp_path)
    predict_files(first, [folder], tmp_path / "out")
    other = _classifier(tmp_path, "other.safetensors", seed=1)
    with pytest.raises(ValueError, match="holds predictions of another run.*checkpoint_sha256.*--overwrite"):
        predict_files(other, [folder], tmp_path / "out")
    with pytest.raises(ValueError, match="score_threshold 0.5 there, 0.3 now"):
        predict_files(first, [folder], tmp_path / "out", score_threshold=0.3)
    result = predict_files(other, [folder], tmp_path / "out", overwrite=True)
    assert result["predicted"] == 2 and len((tmp_path / "out" / "predictions.jsonl").read_text().splitlines()) == 2
    # a damaged line that is not the last is an error naming the line, never skipped silently
    jsonl = tmp_path / "out" / "predictions.jsonl"
    jsonl.write_text("{not json\n" + jsonl.read_text())
    with pytest.raises(ValueError, match="line 1 is not a prediction record"):
        read_predictions(jsonl)


def test_unreadable_image_is_recorded_and_the_run_goes_on(tmp_path, capsys):
    checkpoint = _classifier(tmp_path)
    folder = _images(tmp_path / "images", [(40, 40), (50, 40)])
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    assert main(["predict", str(folder), "--checkpoint", str(checkpoint), "--out", str(tmp_path / "out"),
                 "--batch-size", "2"]) == 0
    assert "predicted 2 images" in capsys.readouterr().out
    records = jsonl_by_image(tmp_path / "out" / "predictions.jsonl")
    assert len(records) == 3 and "unreadable image" in records[str(folder / "broken.png")]["error"]
    with pytest.raises(SystemExit) as exit_:
        main(["predict", str(folder), "--checkpoint", str(checkpoint), "--out", str(tmp_path / "out"),
              "--batch-size", "0"])
    assert exit_.value.code == 2 and "--batch-size: must be >= 1, got 0" in capsys.readouterr().err


def test_detector_batch_of_mixed_sizes_equals_one_at_a_time_without_pictures(tmp_path):
    torch.manual_seed(0)
    model = tiny_detector(num_classes=3, score_thresh=0.0)
    checkpoint = piip.save(model, tmp_path / "det.safetensors")
    folder = _images(tmp_path / "images", [(96, 128), (128, 96), (96, 128), (112, 112)])
    single = predict_files(checkpoint, [folder], tmp_path / "one", batch_size=1, score_threshold=0.0, draw=False)
    batched = predict_files(checkpoint, [folder], tmp_path / "four", batch_size=4, score_threshold=0.0, draw=False)
    assert single["predicted"] == batched["predicted"] == 4 and not single["images"] and not batched["images"]
    assert not list((tmp_path / "four").glob("*.png"))
    one, four = (jsonl_by_image(tmp_path / d / "predictions.jsonl") for d in ("one", "four"))
    assert sum(len(r["boxes"]) for r in one.values()) > 0
    for image, record in one.items():
        assert record["labels"] == four[image]["labels"]
        assert np.allclose(record["boxes"], four[image]["boxes"], atol=0.11)  # rounded to 0.1 px in the file
        assert np.allclose(record["scores"], four[image]["scores"], atol=1e-4)


def test_images_with_one_stem_get_pictures_of_their_own(tmp_path):
    torch.manual_seed(0)
    checkpoint = piip.save(tiny_detector(num_classes=3, score_thresh=0.0), tmp_path / "det.safetensors")
    first, second = _images(tmp_path / "a", [(96, 128)], seed=0), _images(tmp_path / "b", [(128, 96)], seed=1)
    Image.open(first / "im00.png").save(first / "im00.jpg")
    result = predict_files(checkpoint, [first, second], tmp_path / "out", score_threshold=0.0)
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == ["im00-2_pred.png", "im00-3_pred.png",
                                                                         "im00_pred.png"]
    assert len(result["images"]) == 3 and len(jsonl_by_image(tmp_path / "out" / "predictions.jsonl")) == 3
