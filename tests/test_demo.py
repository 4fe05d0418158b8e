"""The Fashion-MNIST demonstration: tiny variants, shipped configs, the pretrain-then-fine-tune
workflow through ``branch_weights=``, and ``piip demo`` end to end on a few hundred real images."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

import piip
from piip.analysis import complexity
from piip.cli import main
from piip.engine import list_configs, load_config
from piip.models.tiny import TINY_BRANCHES

from conftest import needs_fmnist


@pytest.mark.parametrize("size", sorted(TINY_BRANCHES))
def test_tiny_vits_are_timm_vits(size):
    """Same parameters and logits as timm's own VisionTransformer of that size."""
    model = piip.create_model(f"vit_fmnist_{size}", task="cls").eval()
    dim, heads = TINY_BRANCHES[size]
    vit = VisionTransformer(img_size=28, patch_size=4, embed_dim=dim, depth=4, num_heads=heads, num_classes=10,
                            class_token=False, global_pool="avg", no_embed_class=True).eval()
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in vit.parameters())
    vit.load_state_dict({k.removeprefix("branches.0."): v for k, v in model.state_dict().items()})
    images = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(model(images), vit(images), rtol=1e-5, atol=1e-5)


def test_tiny_piip_is_parameter_inverted_and_cheaper_than_its_baseline():
    config = piip.get_config("piip_fmnist_tsb", task="cls")
    assert config.resolutions == (28, 20, 12)
    assert [b.embed_dim for b in config.branches] == [128, 64, 32]  # branch 1, the largest, sees 12 px
    assert [b.resolution for b in config.branches] == [12, 20, 28]
    piip_macs = complexity(config, "actual").macs
    vit_macs = complexity(piip.get_config("vit_fmnist_b", task="cls"), "actual").macs
    assert piip_macs < 0.5 * vit_macs


def test_shipped_configs_load_by_name_and_unknown_names_are_clear():
    assert "fashion_mnist" in list_configs()
    cfg = load_config("fashion_mnist", ["optim.epochs=2"])
    assert cfg.model.name == "piip_fmnist_tsb" and cfg.optim.epochs == 2 and cfg.data.dataset == "fashion_mnist"
    with pytest.raises(FileNotFoundError, match="shipped: .*fashion_mnist"):
        load_config("no_such_recipe")


def test_branch_weights_from_single_branch_runs(tmp_path):
    """The paper's workflow: save single-branch ViTs, build PIIP from them. Every block weight lands
    in its branch; the 7x7 position grid is resized to the branch's own resolution."""
    files, vits = {}, {}
    for i, size in enumerate(("b", "s", "t")):
        vits[size] = piip.create_model(f"vit_fmnist_{size}", task="cls")
        files[f"branch{i + 1}"] = piip.save(vits[size], tmp_path / f"vit_{size}.safetensors")
    model = piip.create_model("piip_fmnist_tsb", task="cls", branch_weights=files)
    for branch, size in zip(model.branches, ("b", "s", "t")):
        source = dict(vits[size].branches[0].named_parameters())
        for name, p in branch.named_parameters():
            if name != "pos_embed":
                torch.testing.assert_close(p, source[name], rtol=0, atol=0)
        torch.testing.assert_close(branch.pos_embed, source["pos_embed"], rtol=0, atol=0)  # stored at 7x7
    report = model.pretrained_report
    assert sorted(report.branches) == ["branch1", "branch2", "branch3"]


@needs_fmnist
def test_demo_end_to_end_on_a_few_hundred_images(tmp_path, capsys):
    """`piip demo --pretrain-branches` on 512 images: every run trains, the table, JSON and plot are
    written, and a second call reuses the finished runs."""
    argv = ["demo", "--out", str(tmp_path), "--epochs", "1", "--pretrain-branches",
            "data.limit=512", "optim.batch_size=64", "run.save_every_steps=0"]
    assert main(argv) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert [r["key"] for r in results] == ["vit_b", "piip_scratch", "vit_s", "vit_t", "piip_pretrained"]
    for r in results:
        assert 0 <= r["top1"] <= 100 and r["train_time_s"] > 0 and r["images_per_s"] > 0
    by_key = {r["key"]: r for r in results}
    assert by_key["piip_pretrained"]["init"] == "branch weights" and by_key["piip_scratch"]["init"] == "scratch"
    assert by_key["piip_scratch"]["macs"] < by_key["vit_b"]["macs"]
    png = (tmp_path / "accuracy_vs_macs.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert "PIIP-TSB (from scratch)" in (tmp_path / "results.md").read_text()
    out = capsys.readouterr().out
    assert "top-1" in out
    assert main(argv) == 0
    assert capsys.readouterr().out.count("reusing the finished run") == 5


@needs_fmnist
def test_scenes_are_coco_format_deterministic_and_span_the_coco_scales(tmp_path):
    from pycocotools import mask as coco_mask

    from piip.data.coco import CocoDetection
    from piip.data.scenes import generate_scenes

    a = generate_scenes(tmp_path / "a", train_images=24, val_images=6, seed=3)
    b = generate_scenes(tmp_path / "b", train_images=24, val_images=6, seed=3)
    assert Path(a["train"]).read_text() == Path(b["train"]).read_text()            # deterministic
    assert (tmp_path / "a" / "train" / "000005.png").read_bytes() == (tmp_path / "b" / "train" / "000005.png").read_bytes()
    data = json.loads(Path(a["train"]).read_text())
    assert [c["name"] for c in data["categories"]][:2] == ["T-shirt/top", "Trouser"]
    areas = np.array([ann["area"] for ann in data["annotations"]])
    assert (areas < 32 ** 2).any() and ((areas >= 32 ** 2) & (areas < 96 ** 2)).any() and (areas >= 96 ** 2).any()
    for ann in data["annotations"][:20]:   # the mask is the item's visible pixels, the box is tight around it
        mask = coco_mask.decode({"size": ann["segmentation"]["size"], "counts": ann["segmentation"]["counts"].encode()})
        ys, xs = np.nonzero(mask)
        assert ann["area"] == mask.sum() and ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
    ds = CocoDetection(a["val"], tmp_path / "a" / "val", train=True)
    image, target = ds[0]
    assert image.shape[0] == 3 and len(target["labels"]) == len(target["masks"]) >= 1
    assert len({tuple(im.shape) for im, _ in (ds[0], ds[1])}) == 2                  # landscape and portrait


@needs_fmnist
def test_detection_demo_end_to_end_on_a_few_scenes(tmp_path, capsys):
    """`piip demo det` on 8 scenes: pretraining, both detectors, the table, JSON and plots; a second
    call reuses every finished run."""
    argv = ["demo", "det", "--out", str(tmp_path), "--train-scenes", "8", "--val-scenes", "2",
            "--pretrain-limit", "256", "--epochs", "1", "optim.batch_size=2"]
    assert main(argv) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert [r["key"] for r in results["runs"]] == ["piip", "vit_b"] and results["pretrain_time_s"] > 0
    piip_run, vit_run = results["runs"]
    assert piip_run["backbone_macs"] < vit_run["backbone_macs"]
    for r in results["runs"]:
        assert {"bbox_AP", "segm_AP", "bbox_APs", "bbox_APm", "bbox_APl"} <= set(r["metrics"])
    for png in ("ap_vs_macs.png", "predictions.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "box AP" in (tmp_path / "results.md").read_text()
    capsys.readouterr()
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("reusing the finished run") == 5 and "reusing the scenes" in out


def test_segmentation_demo_end_to_end_on_a_few_scenes(tmp_path, capsys):
    """`piip demo seg` on 8 scenes: pretraining, both segmenters, the table, JSON and overlays; a
    second call reuses every finished run."""
    argv = ["demo", "seg", "--out", str(tmp_path), "--train-scenes", "8", "--val-scenes", "2",
            "--pretrain-limit", "256", "--epochs", "1", "optim.batch_size=2"]
    assert main(argv) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert [r["key"] for r in results["runs"]] == ["piip", "vit_b"] and results["pretrain_time_s"] > 0
    piip_run, vit_run = results["runs"]
    assert piip_run["backbone_macs"] < vit_run["backbone_macs"]
    for r in results["runs"]:
        assert 0 <= r["metrics"]["mIoU"] <= r["metrics"]["aAcc"] <= 100 and "mAcc" in r["metrics"]
    assert (tmp_path / "predictions.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "mIoU" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "scenes" / "annotations" / "validation").is_dir()  # the ADE20K layout
    capsys.readouterr()
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("reusing the finished run") == 5 and "reusing the scenes" in out
