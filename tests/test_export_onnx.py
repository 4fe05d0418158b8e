"""ONNX export (``piip.export_onnx``, ``piip export onnx``): every kind of piip model that exports is
written with standard operators only and onnxruntime reproduces PyTorch on the export input and, with
``dynamic``, on another batch and size; the kinds that cannot export are refused in one line.

Exports are the slow part (torch.export and the ONNX translation: 3-25 s each on 2 cores, growing with
the graph), so each model is exported once, the PIIP with a dynamic export is a smaller one than
``piip_fmnist_tsb`` (two branches of one block, one deformable interaction) and the segmenter's and
the detector's backbones are vit_fmnist_t with two blocks and that small PIIP: the same code paths in
less time."""
from __future__ import annotations

import json

import onnx
import pytest
import torch

import piip
from piip import BranchConfig, InteractionConfig, PIIPConfig
from piip.cli import main
from piip.export import OnnxExportError, export_onnx
from piip.ops import Linear, use_onednn_linears
from piip.tasks.detection import build_detector
from piip.tasks.segmentation.model import build_segmenter

#: DINO heads small enough for a CPU test (as tests/test_detector_kinds.py's KIND_HEADS, one decoder layer)
DINO_HEADS = dict(kind="dino", fpn_channels=32, num_queries=20, dn_queries=0, encoder_layers=1, decoder_layers=1,
                  transformer_ffn_dim=32, min_size=96, max_size=128, size_divisible=32)
#: R-CNN heads as tests/test_detection.py's SMALL
RCNN_HEADS = dict(fpn_channels=32, box_head_dim=64, mask_head_dim=32, anchor_sizes=(16, 32, 64, 128, 256),
                  min_size=128, max_size=160, size_divisible=32)


def short_vit():
    """vit_fmnist_t (det) with two of its four blocks, one windowed and one global: the heads' tests'
    backbone (the export time grows with the graph; the full model is exported alone)."""
    return piip.create_model("vit_fmnist_t", task="det", depth=2, window_block_indexes=(0,))


def domains(path) -> set[str]:
    model = onnx.load(str(path))
    nodes = list(model.graph.node) + [n for f in model.functions for n in f.node]
    return {n.domain for n in nodes}


def op_types(path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path)).graph.node}


def assert_checked(result, sizes: int) -> None:
    """``sizes`` onnxruntime comparisons, every one passed (the tolerances are the brief's)."""
    assert len(result.checks) == sizes and result.check_passed, [c.describe() for c in result.checks]
    for check in result.checks:
        assert check.mismatch is None and check.errors
        for name, error in check.errors.items():
            assert error <= (1e-3 if name == "boxes" else 1e-4), (name, error)


def small_piip(task: str) -> PIIPConfig:
    """Two branches (64 wide at 32 px, 32 wide at 48 px, patch 8), one block each, one deformable interaction."""
    branches = tuple(BranchConfig(embed_dim=dim, depth=1, num_heads=2, resolution=res, patch_size=8,
                                  pretrain_img_size=res, pretrain_patch_size=8, interaction_indexes=((0, 0),))
                     for dim, res in ((64, 32), (32, 48)))
    extra = dict(num_classes=5, cls_head="per_branch", cls_pool="avg") if task == "cls" else {}
    return PIIPConfig(branches=branches, interaction=InteractionConfig(num_heads=4, drop_path_rate=0.0), task=task,
                      **extra)


def test_piip_backbone_exports_deformable_attention_as_grid_sample(tmp_path):
    """piip_fmnist_tsb's feature pyramid: the outputs named by its keys, deformable attention as
    GridSample (no piip:: node), and the model left as it was (oneDNN dense layers, train mode)."""
    model = piip.create_model("piip_fmnist_tsb", task="det")
    use_onednn_linears(model, True)
    model.train()
    result = export_onnx(model, tmp_path / "backbone.onnx", size=64)
    assert result.kind == "backbone" and result.output_names == ["0", "1", "2", "3"]
    assert result.input_names == ["images"] and result.input_shape == (1, 3, 64, 64) and not result.dynamic_axes
    assert result.file_bytes == (tmp_path / "backbone.onnx").stat().st_size > 1e6 and result.export_seconds > 0
    assert_checked(result, 1)
    assert domains(tmp_path / "backbone.onnx") <= {"", "ai.onnx"}
    assert "GridSample" in op_types(tmp_path / "backbone.onnx")
    assert model.training and any(type(m) is Linear for m in model.modules())


def test_piip_classifier_exports_with_dynamic_batch_and_size(tmp_path):
    model = piip.PIIP(small_piip("cls"))
    result = export_onnx(model, tmp_path / "cls.onnx", dynamic=True)
    assert result.kind == "classifier" and result.output_names == ["logits"]
    assert result.dynamic_axes["images"] == {0: "batch", 2: "height", 3: "width"}
    assert result.input_shape == (2, 3, 48, 48)  # the finest branch's resolution; batch 2 frees the batch axis
    assert_checked(result, 2)
    assert [c.input_shape for c in result.checks] == [(2, 3, 48, 48), (1, 3, 72, 60)]
    assert domains(tmp_path / "cls.onnx") <= {"", "ai.onnx"} and "GridSample" in op_types(tmp_path / "cls.onnx")


def test_vit_backbone_exports_with_dynamic_batch_and_size(tmp_path):
    """A single-branch ViTDet-style backbone (windowed and global blocks): one graph for every size."""
    result = export_onnx(piip.create_model("vit_fmnist_t", task="det"), tmp_path / "vit.onnx", size=64, dynamic=True)
    assert result.kind == "backbone" and result.dynamic_axes["0"] == {0: "batch", 2: "(height//4)", 3: "(width//4)"}
    assert_checked(result, 2)
    assert domains(tmp_path / "vit.onnx") <= {"", "ai.onnx"}


#: the heads' backbones: a single ViT, and a two-branch PIIP (its interaction is deformable attention)
BACKBONES = {"vit": short_vit, "piip": lambda: piip.PIIP(small_piip("det"))}


@pytest.mark.parametrize("backbone,dynamic", [("vit", True), ("piip", False)])
def test_segmenter_exports_logits_at_the_input_size_for_any_size(backbone, dynamic, tmp_path):
    """UperNet's pyramid pooling exports for every map size (adaptive pooling as bin matrices); the
    PIIP one exports at its crop (one export each keeps the suite short; the dynamic path is the ViT's)."""
    model = build_segmenter(BACKBONES[backbone](), 3, channels=16, aux_channels=8, crop_size=64, stride=48)
    result = export_onnx(model, tmp_path / "seg.onnx", dynamic=dynamic)
    assert result.kind == "segmenter" and result.input_shape == (2 if dynamic else 1, 3, 64, 64)  # the crop
    assert result.dynamic_axes.get("logits", {}) == ({0: "batch", 2: "height", 3: "width"} if dynamic else {})
    assert_checked(result, 2 if dynamic else 1)
    assert domains(tmp_path / "seg.onnx") <= {"", "ai.onnx"}
    assert ("GridSample" in op_types(tmp_path / "seg.onnx")) == (backbone == "piip")


@pytest.mark.parametrize("backbone", ["vit", "piip"])
def test_dino_detector_exports_boxes_labels_scores(backbone, tmp_path):
    """One raw image in, the detector's own transform inside; checked on the export image and a second
    image of the same size (a graph that fixed a data-dependent value would pass on its own example)."""
    model = build_detector(BACKBONES[backbone](), 3, **DINO_HEADS)
    result = export_onnx(model, tmp_path / "dino.onnx")
    assert result.kind == "detector (dino)" and result.output_names == ["boxes", "labels", "scores"]
    assert result.input_shape == (1, 3, 96, 128)  # the test resize's (min_size, max_size)
    assert_checked(result, 2)
    assert all(c.detections > 0 and c.labels_equal for c in result.checks)  # a comparison that can fail
    assert domains(tmp_path / "dino.onnx") <= {"", "ai.onnx"} and "GridSample" in op_types(tmp_path / "dino.onnx")


@pytest.mark.parametrize("kind", ["mask_rcnn", "cascade_mask_rcnn"])
def test_rcnn_detectors_are_refused_in_one_line(kind, tmp_path):
    model = build_detector(piip.create_model("vit_fmnist_t", task="det"), 3, kind=kind, **RCNN_HEADS)
    with pytest.raises(OnnxExportError, match=f"a {kind} detector cannot be exported to ONNX: torch.export") as error:
        export_onnx(model, tmp_path / "rcnn.onnx")
    assert "\n" not in str(error.value) and not (tmp_path / "rcnn.onnx").exists()


def test_what_cannot_export_is_refused_in_one_line(tmp_path, monkeypatch):
    dino = build_detector(piip.create_model("vit_fmnist_t", task="det"), 3, **DINO_HEADS)
    backbone = piip.create_model("piip_fmnist_tsb", task="det")
    refusals = [
        (lambda: export_onnx(dino, tmp_path / "a.onnx", dynamic=True), "a DINO detector exports at a fixed input size"),
        (lambda: export_onnx(backbone, tmp_path / "a.onnx", size=64, dynamic=True),
         r"cannot be traced at 64x64: that input is a single attention window in branch 1 \(6x6 tokens, window 14\) "
         r"and branch 2 \(11x11 tokens, window 14\).*\(e\.g\. 144x144\)"),
        (lambda: export_onnx(backbone, tmp_path / "a.onnx"), r"the backbone does not run on a 28x28 input \("),
        (lambda: export_onnx(torch.nn.Linear(2, 2), tmp_path / "a.onnx"), "export_onnx exports piip models"),
        (lambda: export_onnx(backbone, tmp_path / "a.onnx", size=64, opset=13), "opset must be an int >= 16"),
        (lambda: export_onnx(backbone, tmp_path / "a.onnx", size=(64, 0)), "size must be a positive int"),
    ]
    for call, message in refusals:
        with pytest.raises(ValueError, match=message) as error:
            call()
        assert "\n" not in str(error.value)
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else real(name, *a))
    with pytest.raises(ImportError, match=r"ONNX export needs onnxscript: pip install piip\[onnx\]"):
        export_onnx(backbone, tmp_path / "a.onnx", size=64)
    assert not (tmp_path / "a.onnx").exists()


def test_cli_exports_a_variant_and_a_checkpoint_and_refuses_in_one_line(tmp_path, capsys, monkeypatch):
    out = tmp_path / "vit_cls.onnx"
    assert main(["export", "onnx", "vit_fmnist_t", "--task", "cls", "-o", str(out), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["kind"] == "classifier" and record["check_passed"] is True and record["output_names"] == ["logits"]
    assert record["input_shape"] == [1, 3, 28, 28] and out.stat().st_size == record["file_bytes"]
    # a checkpoint rebuilds its own model: a Mask R-CNN is refused in one line, exit status 2
    checkpoint = piip.save(build_detector(piip.create_model("vit_fmnist_t", task="det"), 2, **RCNN_HEADS),
                           tmp_path / "det.safetensors")
    assert main(["export", "onnx", str(checkpoint), "-o", str(tmp_path / "det.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("piip: error: a mask_rcnn detector cannot be exported to ONNX") and err.count("\n") == 1
    assert main(["export", "onnx", str(checkpoint), "--task", "cls", "-o", str(tmp_path / "det.onnx")]) == 2
    assert "--task applies to a variant name" in capsys.readouterr().err
    assert main(["export", "onnx", str(tmp_path / "missing.safetensors"), "-o", str(tmp_path / "m.onnx")]) == 2
    assert "missing.safetensors': no such checkpoint file" in capsys.readouterr().err
    assert main(["export", "onnx", "vit_fmnist_t", "-o", str(tmp_path / "no" / "such" / "x.onnx")]) == 2
    assert f"the folder {str(tmp_path / 'no' / 'such')!r} does not exist" in capsys.readouterr().err
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnx" else real(name, *a))
    assert main(["export", "onnx", "vit_fmnist_t", "-o", str(tmp_path / "x.onnx")]) == 2
    assert capsys.readouterr().err == "piip: error: ONNX export needs onnx: pip install piip[onnx]\n"
