"""Detection on real photographs nobody here annotated: NEON aerial images with hand-drawn tree-crown
boxes from the ``deepforest`` package (MIT; imagery CC0), cut into crops of mixed orientation.
``make test`` installs the package (``pip install --no-deps deepforest==2.1.0``)."""
from __future__ import annotations

import importlib.metadata
import json

import pytest

from conftest import jsonl_by_image
from test_detection import det_config

pytestmark = pytest.mark.skipif(
    not any(d.metadata["Name"] == "deepforest" for d in importlib.metadata.distributions()),
    reason="the tree-crown photographs need: pip install --no-deps deepforest==2.1.0 (make test does it)")


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    from piip.data.trees import write_tree_crowns

    root = tmp_path_factory.mktemp("trees")
    write_tree_crowns(root)
    return root


def test_tree_crowns_are_a_coco_set_of_mixed_orientation(trees):
    from piip.data.coco import CocoDetection

    counts = {}
    for split in ("train", "val"):
        data = json.loads((trees / "annotations" / f"instances_{split}.json").read_text())
        shapes = sorted({(im["width"], im["height"]) for im in data["images"]})
        assert shapes == [(288, 384), (336, 336), (384, 288)]       # portrait, square, landscape in both
        counts[split] = (len(data["images"]), len(data["annotations"]))
        dataset = CocoDetection(trees / "annotations" / f"instances_{split}.json", trees / split, train=True)
        assert dataset.mask_annotations == 0 and dataset.num_annotations == counts[split][1]
    assert counts == {"train": (6, 137), "val": (4, 101)}
    assert "MIT" in (trees / "deepforest-LICENSE").read_text()


@pytest.mark.parametrize("kind", ["mask_rcnn", "cascade_mask_rcnn", "dino"])
def test_train_evaluate_predict_on_real_tree_crowns(kind, trees, tmp_path, capsys):
    """A few steps of a small detector of each kind on the crowns (box-only data: found and said
    before training by the kinds with a mask head), COCO box AP on the held-apart crops, and drawn
    predictions."""
    from piip.cli import main
    from test_detector_kinds import KIND_HEADS

    cfg = det_config(tmp_path / "det.json", trees, tmp_path / "run", epochs=2, batch_size=2)
    if kind != "mask_rcnn":
        config = json.loads(cfg.read_text())
        config["model"]["head"] = KIND_HEADS[kind]
        cfg.write_text(json.dumps(config))
    if kind == "dino":  # no mask head: nothing to say
        assert main(["train", "det", str(cfg), "--json"]) == 0
    else:
        with pytest.warns(UserWarning, match="boxes but no instance masks"):
            assert main(["train", "det", str(cfg), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["step"] == 6 and summary["eval"]["num_images"] == 4
    assert 0.0 <= summary["eval"]["bbox_AP50"] <= 100.0 and "segm_AP" not in summary["eval"]
    model = tmp_path / "run" / "model.safetensors"
    assert main(["eval", "det", "--checkpoint", str(model), "--data", str(trees), "--split", "val",
                 "--batch-size", "4", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["bbox_AP"] == pytest.approx(summary["eval"]["bbox_AP"])  # batch 4 = the run's batch 2
    assert main(["predict", str(trees / "val"), "--checkpoint", str(model), "--out", str(tmp_path / "pred"),
                 "--score-threshold", "0.0"]) == 0
    predictions = jsonl_by_image(tmp_path / "pred" / "predictions.jsonl")
    assert len(predictions) == 4 and len(list((tmp_path / "pred").glob("*_pred.png"))) == 4
    assert all(set(p["classes"]) <= {"tree"} for p in predictions.values())
