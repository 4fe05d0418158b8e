"""The detector kinds side by side: the config each kind resolves, the paper's Table 2 recipes for
Cascade Mask R-CNN and DINO, and ``piip bench --detector``."""
import json

import pytest

import piip
from piip.cli import main
from piip.engine import load_config
from piip.engine.build import build_model_config
from piip.tasks.detection import DETECTOR_KINDS, DetectorConfig
from piip.tasks.detection.task import DetectionTask

from conftest import jsonl_by_image, tiny_config


def test_every_kind_is_registered_with_its_defaults():
    assert set(DETECTOR_KINDS) == {"mask_rcnn", "cascade_mask_rcnn", "dino"}
    backbone = tiny_config(task="det")
    resolved = {kind: DetectorConfig(backbone=backbone, num_classes=3, kind=kind) for kind in DETECTOR_KINDS}
    assert [(c.masks, c.box_loss, c.detections_per_img) for c in resolved.values()] == [
        (True, "l1", 100), (True, "smooth_l1", 100), (False, "l1", 300)]
    # the stored config holds the resolved values: a checkpoint rebuilds the same detector later
    again = DetectorConfig.from_dict(resolved["dino"].to_dict())
    assert again == resolved["dino"] and again.to_dict()["detections_per_img"] == 300


def test_every_kind_builds_on_every_registered_dense_backbone():
    """Each kind around each registered variant's dense backbone (on the meta device: the 6B ones
    too), its neck reading the backbone's width."""
    import torch

    from piip.models.piip import PIIP
    from piip.models.registry import get_config, list_models

    for name in list_models():
        backbone = get_config(name, task="det")
        with torch.device("meta"):
            body = PIIP(backbone)
            for kind, registered in DETECTOR_KINDS.items():
                detector = registered.assemble(DetectorConfig(backbone=backbone, num_classes=80, kind=kind), body)
                neck = detector.backbone.neck.convs[0][0] if kind == "dino" else detector.backbone.fpn.inner_blocks[0][0]
                assert neck.in_channels == body.out_channels, (name, kind)


def test_a_kind_refuses_what_it_cannot_build():
    backbone = tiny_config(task="det")
    with pytest.raises(ValueError, match="dino detector has no mask head"):
        DetectorConfig(backbone=backbone, num_classes=3, kind="dino", masks=True)
    with pytest.raises(ValueError, match=r"kind must be one of \['cascade_mask_rcnn', 'dino', 'mask_rcnn'\]"):
        DetectorConfig(backbone=backbone, num_classes=3, kind="retinanet")
    three_levels = tiny_config(task="det", fpn_levels=(1, 2, 3))
    with pytest.raises(ValueError, match=r"mask_rcnn detector needs the backbone's pyramid levels \(0, 1, 2, 3\)"):
        DetectorConfig(backbone=three_levels, num_classes=3)
    assert DetectorConfig(backbone=three_levels, num_classes=3, kind="dino").backbone.fpn_levels == (1, 2, 3)
    with pytest.raises(ValueError, match="num_queries must be >= 1"):
        DetectorConfig(backbone=backbone, num_classes=3, kind="dino", num_queries=0)
    # 900 queries cannot be chosen from the 85 tokens of a 64 x 64 image (the authors' code fails in topk)
    import torch

    from piip.tasks.detection import build_detector

    dino = build_detector(piip.PIIP(backbone), 3, kind="dino", encoder_layers=1, decoder_layers=1,
                          min_size=64, max_size=64, size_divisible=32).eval()
    with pytest.raises(ValueError, match=r"85 encoder tokens, fewer than the 900 queries.*model.head.num_queries"):
        dino([torch.rand(3, 64, 64)])


def test_a_checkpoint_config_from_before_the_kinds_is_a_mask_rcnn():
    old = DetectorConfig(backbone=tiny_config(task="det"), num_classes=2).to_dict()
    for name in ("kind", "num_queries", "dn_queries", "dn_label_noise", "dn_box_noise", "encoder_layers",
                 "decoder_layers", "transformer_ffn_dim"):
        del old[name]
    config = DetectorConfig.from_dict(old)
    assert (config.kind, config.masks, config.box_loss, config.detections_per_img) == ("mask_rcnn", True, "l1", 100)


@pytest.mark.parametrize("variant", ["tsb", "sbl"])
def test_cascade_recipes_are_table_2s(variant):
    """Cascade Mask R-CNN 1x and 3x + MS: the paper's batch 16, AdamW lr 1e-4, wd 0.05 (section 4.2),
    the authors' Mask R-CNN layer decay 0.85, ViT-Adapter's 2000 training proposals."""
    one_x, three_x = (load_config(f"cascade_mask_rcnn_piip_{variant}_{s}") for s in ("1x", "3x_ms"))
    mask_rcnn = load_config(f"mask_rcnn_piip_{variant}_1x")
    for cfg in (one_x, three_x):
        assert cfg.model.name == f"piip_{variant}" and cfg.model.head["kind"] == "cascade_mask_rcnn"
        assert cfg.model.head["rpn_post_nms_top_n_train"] == 2000
        assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.batch_size, cfg.optim.layer_decay) == (
            mask_rcnn.optim.lr, mask_rcnn.optim.weight_decay, mask_rcnn.optim.batch_size, 0.85) == (1e-4, 0.05, 16, 0.85)
    assert (one_x.optim.epochs, one_x.optim.milestones, one_x.data.multi_scale) == (12, [8, 11], False)
    assert (three_x.optim.epochs, three_x.optim.milestones, three_x.data.multi_scale) == (36, [27, 33], True)


def test_dino_recipes_are_the_authors_configs():
    """dino_4scale_deit_384_sbl_1792_1120_672_fpn_3x_coco_bs32_ms and
    dino_4scale_internvit_h6b_1024_768_fpn_1x_coco_bs32_ms: AdamW lr 2e-4, wd 0.05, layer decay 0.85,
    global batch 32, their schedules, normalisation, padding and test scales."""
    sbl, h6b = load_config("dino_piip_sbl_3x_ms"), load_config("dino_piip_h6b_1x_ms")
    for cfg in (sbl, h6b):
        assert cfg.model.head["kind"] == "dino" and cfg.data.multi_scale
        assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.batch_size, cfg.optim.layer_decay,
                cfg.optim.warmup_steps) == (2e-4, 0.05, 32, 0.85, 500)
    assert (sbl.optim.epochs, sbl.optim.milestones) == (36, [27, 33])
    assert (h6b.optim.epochs, h6b.optim.milestones) == (12, [8, 11])
    assert (h6b.optim.layer_decay_num_layers, h6b.optim.layer_decay_skip) == (48, [1.5])
    sbl_net, h6b_net = build_model_config(sbl.model, "det"), build_model_config(h6b.model, "det")
    assert sbl_net.resolutions == (1792, 1120, 672) and sbl_net.fpn_levels == (0, 1, 2, 3)
    assert h6b_net.resolutions == (1024, 768) and h6b_net.fpn_levels == (1, 2, 3)
    sbl_task, h6b_task = DetectionTask(sbl), DetectionTask(h6b)
    assert (sbl_task.head["min_size"], sbl_task.head["max_size"]) == (1400, 2332)  # test (2332, 1400)
    assert (h6b_task.head["min_size"], h6b_task.head["max_size"]) == (800, 1333)
    sbl_detector = DetectorConfig(backbone=sbl_net, num_classes=80, **sbl_task.head)
    h6b_detector = DetectorConfig(backbone=h6b_net, num_classes=80, **h6b_task.head)
    assert sbl_detector.image_mean == (0.485, 0.456, 0.406) and sbl_detector.image_std == (0.229, 0.224, 0.225)
    assert h6b_detector.image_mean == h6b_detector.image_std == (0.5, 0.5, 0.5)
    assert sbl_detector.resize == (1400, 2332, 224) and h6b_detector.resize == (800, 1333, 64)
    for detector in (sbl_detector, h6b_detector):
        assert (detector.masks, detector.num_queries, detector.dn_queries, detector.detections_per_img) == (
            False, 900, 100, 300)


def test_bench_times_a_detector_kinds_training_step_against_the_baseline(capsys):
    assert main(["bench", "piip_tsb", "--resolutions", "192/160/128", "--baseline", "vitdet_base",
                 "--baseline-resolutions", "160", "--detector", "dino", "--train", "--repeat", "1", "--warmup", "0",
                 "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    model, base = record["model"], record["baseline"]
    assert model["mode"] == base["mode"] == "train" and model["detector"] == base["detector"] == "dino"
    assert model["input_size"] == [192 * 800 // 1333, 192] and base["input_size"] == [160 * 800 // 1333, 160]
    assert model["latency_ms"] > 0 and base["latency_ms"] > 0
    assert 0 < model["activation_memory_mb"] <= model["peak_memory_mb"]


def test_bench_runs_a_whole_detector_in_evaluation_and_refuses_unknown_kinds(capsys):
    assert main(["bench", "piip_tsb", "--resolutions", "192/160/128", "--baseline", "piip_tsb",
                 "--baseline-resolutions", "128/96/64", "--detector", "dino", "--repeat", "1",
                 "--warmup", "0", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    model, base = record["model"], record["baseline"]
    assert model["mode"] == "forward" and model["detector"] == base["detector"] == "dino"
    assert record["ratios"]["macs"] > 1 and model["latency_ms"] > 0
    assert main(["bench", "piip_tsb", "--detector", "retinanet", "--train"]) == 2
    assert "detector must be one of" in capsys.readouterr().err
    assert main(["bench", "vit_fmnist_t", "--task", "cls", "--detector", "dino"]) == 2
    assert "--detector needs --task det" in capsys.readouterr().err


# -- each kind through the engine and the command line ---------------------------------------------

#: small heads of each kind for CPU tests
KIND_HEADS = {
    "cascade_mask_rcnn": dict(kind="cascade_mask_rcnn", fpn_channels=32, box_head_dim=64, mask_head_dim=32,
                              anchor_sizes=(16, 32, 64, 128, 256), min_size=128, max_size=160, size_divisible=32),
    "dino": dict(kind="dino", fpn_channels=64, num_queries=30, dn_queries=10, encoder_layers=1, decoder_layers=2,
                 transformer_ffn_dim=64, min_size=128, max_size=160, size_divisible=32),
}


@pytest.mark.parametrize("kind", sorted(KIND_HEADS))
def test_cli_trains_evaluates_and_predicts_each_kind(kind, tmp_path, capsys):
    """``piip train det`` / ``eval det`` / ``predict`` on a COCO-format folder: the checkpoint rebuilds
    the kind by itself, evaluation scores what the kind predicts (DINO: boxes only)."""
    from test_detection import det_config, write_shapes

    write_shapes(tmp_path / "data")
    path = det_config(tmp_path / "det.json", tmp_path / "data", tmp_path / "run")
    config = json.loads(path.read_text())
    config["model"]["head"] = KIND_HEADS[kind]
    path.write_text(json.dumps(config))
    assert main(["train", "det", str(path), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["step"] == 4 and summary["eval"]["num_images"] == 4
    assert ("segm_AP" in summary["eval"]) == (kind != "dino")
    checkpoint = tmp_path / "run" / "model.safetensors"
    model = piip.load(str(checkpoint))
    assert model.config.kind == kind and model.config.class_names == ("red", "green")
    assert main(["eval", "det", "--checkpoint", str(checkpoint), "--data", str(tmp_path / "data"), "--split", "val",
                 "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["bbox_AP"] == pytest.approx(summary["eval"]["bbox_AP"], abs=1e-9)
    assert main(["predict", str(tmp_path / "data" / "val"), "--checkpoint", str(checkpoint),
                 "--out", str(tmp_path / "pred"), "--score-threshold", "0.0"]) == 0
    predictions = jsonl_by_image(tmp_path / "pred" / "predictions.jsonl")
    assert len(predictions) == 4 and all(set(p) >= {"boxes", "classes", "scores"} for p in predictions.values())
    assert all(("masks" in p or "mask_pixels" in p) == (kind != "dino") for p in predictions.values())


@pytest.mark.parametrize("kind", sorted(KIND_HEADS))
def test_two_process_ddp_step_equals_one_process_for_each_kind(kind, tmp_path):
    """Identical images, every proposal sampled (Cascade) and no denoising noise (DINO): one step with
    2 processes x 1 image equals 1 process x 2 images.

    AdamW's first step is the gradient's sign wherever ``|g| >> eps``, which makes float32 rounding
    of gradients that are zero in exact arithmetic (the attention key biases: softmax ignores a
    constant) a full step of either sign; the runs take ``eps=1e-3``, a step that follows the
    gradient. Cascade's box heads normalise over the RoI batch (BatchNorm), which turns the
    rounding of a batch of 1 or 2 into gradients ~1e-3 apart (1e-14 in float64: measured, the same
    batch math), hence its 5e-3 tolerance: a wrong normalisation over processes is a factor of 2."""
    import torch

    from test_detection import ddp_and_single_step

    head = dict(KIND_HEADS[kind])
    head.update(dict(rpn_batch_size_per_image=10 ** 6, box_batch_size_per_image=10 ** 6) if kind != "dino"
                else dict(dn_queries=0))
    a, b = ddp_and_single_step(tmp_path, head, eps=1e-3)
    rtol = 5e-3 if kind == "cascade_mask_rcnn" else 1e-4
    for key, value in b["model"].items():
        torch.testing.assert_close(a["model"][key], value, rtol=rtol, atol=1e-5, msg=key)
