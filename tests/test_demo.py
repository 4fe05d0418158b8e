"""The Fashion-MNIST demonstration: tiny variants, shipped configs, the pretrain-then-fine-tune
workflow through ``branch_weights=``, and ``piip demo`` end to end on a few hundred real images."""
import json

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
