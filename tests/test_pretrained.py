"""Branch initialisation from pretrained weights (``piip.weights.branch_init`` and the modules it uses).

Every checkpoint here is generated on the fly from a tiny timm ``VisionTransformer`` (or a tiny
InternViT-style branch) in the layout of the real files: DeiT v1 (``{"model": ...}`` .pth, class row
in the position embedding, no layer scale), DeiT-III (original ``gamma_1``/``gamma_2`` names, no
class row), AugReg (the original JAX ``.npz`` layout that timm's loader reads, and timm's
safetensors), InternViT (timm-style and Hugging Face names, RMSNorm, full-width qk-norm, patch 14)
and DINOv2 (``mask_token``, patch 14). Nothing touches the network.
"""
import dataclasses
import importlib.util
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.layers import resample_patch_embed
from timm.models.vision_transformer import VisionTransformer

import piip
from piip import PIIP, BranchConfig
from piip.layers.branch import ViTBranch
from piip.weights import (BranchWeightsError, HubUnavailableError, adapt_branch_state_dict, hub, load_branch,
                          load_branch_weights, load_weights_file)

from conftest import tiny_config

ROOT = Path(__file__).resolve().parents[1]


# -- generated checkpoints -----------------------------------------------------------------------

@torch.no_grad()
def _perturb(module: torch.nn.Module) -> torch.nn.Module:
    """Make every tensor distinctive (norm weights, biases and gammas too)."""
    for p in module.parameters():
        p.add_(torch.randn_like(p) * 0.05)
    return module.eval()


def timm_vit(dim: int, heads: int, img: int, *, patch: int = 16, depth: int = 2, **kw) -> VisionTransformer:
    return _perturb(VisionTransformer(img_size=img, patch_size=patch, embed_dim=dim, depth=depth,
                                      num_heads=heads, **kw))


def deit_v1(dim, heads, img, num_classes=10):
    """DeiT (v1) layout: class token with a position row, no layer scale."""
    return timm_vit(dim, heads, img, num_classes=num_classes, class_token=True, no_embed_class=False,
                    init_values=None)


def deit3(dim, heads, img, num_classes=10):
    """DeiT-III layout: class token without a position row, layer scale."""
    return timm_vit(dim, heads, img, num_classes=num_classes, class_token=True, no_embed_class=True,
                    init_values=0.1)


def state(model) -> dict:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def to_deit3_names(sd: dict) -> dict:
    """timm names -> the original DeiT-III file's ``blocks.N.gamma_1`` names."""
    return {k.replace(".ls1.gamma", ".gamma_1").replace(".ls2.gamma", ".gamma_2"): v for k, v in sd.items()}


def write_augreg_npz(model: VisionTransformer, path: Path) -> None:
    """Write ``model`` in the original ViT / AugReg JAX layout (``Transformer/encoderblock_N/...``),
    i.e. the inverse of timm's ``_load_weights``."""
    sd = state(model)
    D = model.embed_dim
    H = model.blocks[0].attn.num_heads
    hd = D // H
    w = {
        "embedding/kernel": sd["patch_embed.proj.weight"].permute(2, 3, 1, 0),
        "embedding/bias": sd["patch_embed.proj.bias"],
        "cls": sd["cls_token"],
        "Transformer/posembed_input/pos_embedding": sd["pos_embed"],
        "Transformer/encoder_norm/scale": sd["norm.weight"],
        "Transformer/encoder_norm/bias": sd["norm.bias"],
        "head/kernel": sd["head.weight"].T,
        "head/bias": sd["head.bias"],
    }
    for i in range(len(model.blocks)):
        b, s = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
        w[b + "LayerNorm_0/scale"], w[b + "LayerNorm_0/bias"] = sd[s + "norm1.weight"], sd[s + "norm1.bias"]
        w[b + "LayerNorm_2/scale"], w[b + "LayerNorm_2/bias"] = sd[s + "norm2.weight"], sd[s + "norm2.bias"]
        qkv_w, qkv_b = sd[s + "attn.qkv.weight"], sd[s + "attn.qkv.bias"]
        for j, n in enumerate(("query", "key", "value")):
            w[f"{b}MultiHeadDotProductAttention_1/{n}/kernel"] = qkv_w[j * D:(j + 1) * D].T.reshape(D, H, hd)
            w[f"{b}MultiHeadDotProductAttention_1/{n}/bias"] = qkv_b[j * D:(j + 1) * D].reshape(H, hd)
        w[b + "MultiHeadDotProductAttention_1/out/kernel"] = sd[s + "attn.proj.weight"].reshape(D, H, hd).permute(1, 2, 0)
        w[b + "MultiHeadDotProductAttention_1/out/bias"] = sd[s + "attn.proj.bias"]
        for r in range(2):
            w[f"{b}MlpBlock_3/Dense_{r}/kernel"] = sd[f"{s}mlp.fc{r + 1}.weight"].T
            w[f"{b}MlpBlock_3/Dense_{r}/bias"] = sd[f"{s}mlp.fc{r + 1}.bias"]
    np.savez(path, **{k: v.numpy().astype(np.float32) for k, v in w.items()})


def internvit_source(dim=64, heads=4, img=112, patch=14) -> ViTBranch:
    """An InternViT-6B-style ViT at patch 14: RMSNorm, full-width qk-norm, no qkv bias, layer scale,
    class row in the position embedding."""
    cfg = BranchConfig(embed_dim=dim, depth=2, num_heads=heads, resolution=img, patch_size=patch,
                       pretrain_img_size=img, pretrain_patch_size=patch, qkv_bias=False, qk_norm=True,
                       norm_layer="rmsnorm", init_values=0.1, class_token=True, pos_embed_class_row=True,
                       family="internvit")
    return _perturb(ViTBranch(cfg))


def to_hf_internvit(sd: dict) -> dict:
    """timm-style InternViT names -> Hugging Face ``InternVisionModel`` names."""
    out = {}
    for k, v in sd.items():
        k = {"cls_token": "embeddings.class_embedding", "pos_embed": "embeddings.position_embedding"}.get(k, k)
        k = k.replace("patch_embed.proj.", "embeddings.patch_embedding.")
        k = k.replace("blocks.", "encoder.layers.").replace(".ls1.gamma", ".ls1").replace(".ls2.gamma", ".ls2")
        out[k] = v
    return out


INTERNVIT_BRANCH = dict(pretrain_patch_size=14, qkv_bias=False, qk_norm=True,
                        norm_layer="rmsnorm", init_values=0.1, pos_embed_class_row=True,
                        family="internvit", drop_path_schedule="linear")


def with_pretrain_size(config, index: int, size: int):
    """``config`` with branch ``index``'s pretraining image size set (tiny_config fixes it)."""
    branches = list(config.branches)
    branches[index] = dataclasses.replace(branches[index], pretrain_img_size=size)
    return dataclasses.replace(config, branches=tuple(branches))


def snapshot(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def unchanged(module, before) -> bool:
    return all(torch.equal(v, before[k]) for k, v in module.state_dict().items())


def bicubic_grid(rows: torch.Tensor, old: int, new: int) -> torch.Tensor:
    """Independent reference: the original's bicubic pos-embed resize."""
    x = rows.reshape(1, old, old, -1).permute(0, 3, 1, 2)
    x = F.interpolate(x, size=(new, new), mode="bicubic", align_corners=False)
    return x.permute(0, 2, 3, 1).reshape(1, new * new, -1)


@pytest.fixture
def no_network(monkeypatch):
    """Any connection attempt or timm download fails the test loudly."""
    def refuse(*args, **kwargs):
        raise AssertionError("the test tried to reach the network")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr("timm.create_model", refuse)
    monkeypatch.setattr(hub, "_cached_file", lambda cfg: None)


# -- DeiT v1 -------------------------------------------------------------------------------------

def test_deit_v1_pth_loads_into_a_deit_style_branch(tmp_path, no_network):
    """DeiT (v1) ``{"model": sd}`` .pth into branch 2 of a detection PIIP: weights equal, class row
    dropped, layer scale kept at 1.0 and reported, head/norm/cls_token ignored and reported, the
    other branches and the new modules untouched."""
    model = PIIP(tiny_config("det"))
    before = snapshot(model)
    src = deit_v1(32, 2, 96)
    sd = state(src)
    torch.save({"model": sd, "epoch": 300}, tmp_path / "deit_tiny.pth")

    report = load_branch_weights(model, {"branch2": tmp_path / "deit_tiny.pth"}, use_hub=False)

    branch = model.branches[1].state_dict()
    for key, value in sd.items():
        if key.startswith(("blocks.", "patch_embed.")):
            assert torch.equal(branch[key], value), key
    assert torch.equal(branch["pos_embed"], sd["pos_embed"][:, 1:])  # class row dropped, grid 6x6 kept
    for key in [k for k in branch if k.endswith(("ls1.gamma", "ls2.gamma"))]:
        assert torch.equal(branch[key], torch.ones(32)), key
    r = report["branch2"]
    assert set(r.initialised) == {f"blocks.{i}.ls{j}.gamma" for i in range(2) for j in (1, 2)}
    assert all("init_values=1" in why for why in r.initialised.values())
    assert {"head.weight", "head.bias", "norm.weight", "norm.bias", "cls_token"} <= set(r.ignored)
    assert r.resampled == {"pos_embed": "class row dropped"}
    assert any("'model' container" in n for n in r.notes)
    assert set(report.skipped) == {"branch1", "branch3"}
    assert {"interactions", "merge", "fpn"} <= set(report.new_modules)
    for key, value in model.state_dict().items():
        if not key.startswith("branches.1."):
            assert torch.equal(value, before[key]), key
    text = str(report)
    assert "branch2 <- " in text and "blocks.*.ls1.gamma (x2)" in text and "ignored" in text
    assert "branch1: not loaded" in text


# -- DeiT-III: the whole PIIP equals the timm models it was initialised from ----------------------

def test_deit3_branches_forward_like_their_timm_sources(tmp_path, no_network):
    """Three DeiT-III-style files (original gamma_1 names in .safetensors, timm names in .pth and
    .safetensors), loaded under the three accepted key forms. With the interaction gates at their
    initial zero, every branch's tokens and the averaged logits equal timm's own forward of the
    source models on the same pyramid images."""
    config = tiny_config("cls", num_classes=10, cls_pool="class_token",
                         b1=dict(class_token=True), b2=dict(class_token=True), b3=dict(class_token=True))
    model = PIIP(config).eval()
    sources = [deit3(64, 4, 64), deit3(32, 2, 96), deit3(32, 2, 128)]
    save_file(to_deit3_names(state(sources[0])), tmp_path / "deit3_b.safetensors")
    torch.save(state(sources[1]), tmp_path / "deit3_s.pth")
    save_file(state(sources[2]), tmp_path / "deit3_t.safetensors")

    report = load_branch_weights(model, {"branch1": tmp_path / "deit3_b.safetensors",
                                         1: tmp_path / "deit3_s.pth",
                                         "branches.2": str(tmp_path / "deit3_t.safetensors")},
                                 use_hub=False)

    assert list(report.branches) == ["branch1", "branch2", "branch3"]
    for r in report.branches.values():
        assert r.initialised == {} and r.resampled == {} and r.ignored == []  # heads/norms are used
    assert any("gamma_1/gamma_2" in n for n in report["branch1"].notes)
    gates = [p for n, p in model.named_parameters() if n.endswith(("ca_gamma", "cffn_gamma"))]
    assert gates and all(torch.count_nonzero(g) == 0 for g in gates)  # documented init kept

    images = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        tokens, grids = model.forward_tokens(images)
        logits = model(images)
        refs = [src.forward_features(img) for src, img in zip(sources, model.pyramid(images))]
        ref_logits = torch.stack([src.forward_head(f) for src, f in zip(sources, refs)]).mean(0)
    assert grids == [(4, 4), (6, 6), (8, 8)]
    for branch, x, ref in zip(model.branches, tokens, refs):
        torch.testing.assert_close(branch.norm(x), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)


# -- AugReg --------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["npz", "safetensors"])
def test_augreg_into_an_internvit_style_branch(tmp_path, fmt, no_network):
    """AugReg, as the original JAX .npz (converted by timm's loader) or timm's safetensors, into an
    InternViT-style classification branch (class row kept): every tensor equal, layer scale kept at
    1.0 and reported, and the branch's logits equal timm's on the source grid."""
    src = deit_v1(32, 2, 96)  # AugReg has DeiT v1's layout: class row, no layer scale
    with torch.no_grad():
        # The original (and PIIP) never add the class row to the class token; timm does. Zero it so
        # that timm's forward is the reference for the whole sequence.
        src.pos_embed[:, :1] = 0
    sd = state(src)
    path = tmp_path / f"augreg_s.{fmt}"
    if fmt == "npz":
        write_augreg_npz(src, path)
        converted = load_weights_file(path)
        assert converted.keys() == sd.keys()
        for key in sd:
            assert torch.equal(converted[key], sd[key]), key
    else:
        save_file(sd, path)

    internvit = dict(class_token=True, pos_embed_class_row=True, family="internvit",
                     drop_path_schedule="linear")
    model = PIIP(tiny_config("cls", num_classes=10, cls_pool="class_token", b1=dict(class_token=True),
                             b2=internvit, b3=dict(class_token=True))).eval()
    report = load_branch_weights(model, {"branch2": path}, use_hub=False)

    branch = model.branches[1]
    for key, value in branch.state_dict().items():
        if key in sd:
            assert torch.equal(value, sd[key]), key  # pos_embed with its class row included
        else:
            assert key.endswith(("ls1.gamma", "ls2.gamma")) and torch.equal(value, torch.ones(32)), key
    r = report["branch2"]
    assert len(r.initialised) == 4 and r.resampled == {} and r.ignored == []
    if fmt == "npz":
        assert any(".npz" in n for n in r.notes)

    image = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        x, hw = branch.embed(image)
        x = branch.forward_blocks(x, hw, 0, branch.config.depth - 1)
        logits = branch.forward_head(x)
        ref = src.forward_head(src.forward_features(image))
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)


# -- InternViT -----------------------------------------------------------------------------------

@pytest.mark.parametrize("names", ["timm", "huggingface"])
def test_internvit_patch14_file_into_a_patch16_branch(tmp_path, names, no_network):
    """InternViT-style file (RMSNorm, full-width q/k norm, no qkv bias, ls gammas, class row, patch 14
    at 112 px: an 8x8 grid) into a patch-16 branch (7x7 grid): the class row is kept, the grid and
    the kernel are resized exactly like the original's bicubic F.interpolate, everything else equal.
    The Hugging Face layout (``vision_model.embeddings.*``, ``encoder.layers.N.ls1``) maps the same."""
    src = state(internvit_source())
    src["norm.weight"] = torch.ones(64)  # a final norm the dense branch has no use for
    file_sd = src
    if names == "huggingface":
        file_sd = {f"vision_model.{k}": v for k, v in to_hf_internvit(src).items()}
        file_sd["mlp1.0.weight"] = torch.zeros(4, 4)  # InternVL's projector, outside the ViT
    save_file(file_sd, tmp_path / "internvit.safetensors")

    model = PIIP(with_pretrain_size(tiny_config("det", b1=INTERNVIT_BRANCH), 0, 112))
    report = load_branch_weights(model, {"branch1": tmp_path / "internvit.safetensors"}, use_hub=False)

    branch = model.branches[0].state_dict()
    assert branch["pos_embed"].shape == (1, 1 + 7 * 7, 64)
    assert torch.equal(branch["pos_embed"][:, :1], src["pos_embed"][:, :1])
    torch.testing.assert_close(branch["pos_embed"][:, 1:], bicubic_grid(src["pos_embed"][:, 1:], 8, 7))
    assert branch["patch_embed.proj.weight"].shape == (64, 3, 16, 16)
    torch.testing.assert_close(branch["patch_embed.proj.weight"], F.interpolate(
        src["patch_embed.proj.weight"], size=(16, 16), mode="bicubic", align_corners=False))
    for key, value in branch.items():
        if key not in ("pos_embed", "patch_embed.proj.weight"):
            assert torch.equal(value, src[key]), key  # q_norm/k_norm (64,), ls gammas, RMSNorm weights
    assert branch["blocks.0.attn.q_norm.weight"].shape == (64,)
    r = report["branch1"]
    assert r.initialised == {}
    assert r.resampled["pos_embed"] == "grid 8x8 -> 7x7 (bicubic)"
    assert r.resampled["patch_embed.proj.weight"].startswith("kernel 14x14 -> 16x16")
    assert {"cls_token", "norm.weight"} <= set(r.ignored)  # dense branch: no class token, no norm
    if names == "huggingface":
        assert "mlp1.0.weight" in r.ignored
        assert any("Hugging Face InternViT" in n for n in r.notes)


def test_load_branch_hf_internvit_state_dict_into_a_bare_branch():
    """``load_branch`` takes an in-memory state dict: Hugging Face InternViT names into a branch of
    the source's own architecture reproduce the source's forward exactly."""
    source = internvit_source()
    branch = ViTBranch(source.config)
    report = load_branch(branch, to_hf_internvit(state(source)), name="branch1")
    assert report.initialised == {} and report.ignored == [] and report.resampled == {}
    image = torch.randn(1, 3, 112, 112)
    with torch.no_grad():
        outs = []
        for b in (source, branch):
            x, hw = b.embed(image)
            outs.append(b.forward_blocks(x, hw, 0, 1))
    assert torch.equal(outs[0], outs[1])


def test_patch_kernel_pi_resampling_option(tmp_path, no_network):
    """``patch_resample="pi"`` uses timm's FlexiViT pseudo-inverse resize instead."""
    src = state(internvit_source())
    save_file(src, tmp_path / "internvit.safetensors")
    model = PIIP(with_pretrain_size(tiny_config("det", b1=INTERNVIT_BRANCH), 0, 112))
    load_branch_weights(model, {"branch1": tmp_path / "internvit.safetensors"}, use_hub=False,
                        patch_resample="pi")
    torch.testing.assert_close(model.branches[0].patch_embed.proj.weight.detach(),
                               resample_patch_embed(src["patch_embed.proj.weight"], [16, 16]))


def test_dinov2_style_file_mask_token_ignored_grid_resized(tmp_path, no_network):
    """DINOv2 layout (patch 14, class row, ls gammas, ``mask_token``): a 5x5 grid at 70 px becomes
    the branch's 4x4 grid (70 // 16); mask_token is ignored and reported."""
    src = timm_vit(32, 2, 70, patch=14, num_classes=0, class_token=True, no_embed_class=False,
                   init_values=1.0)
    sd = state(src)
    sd["mask_token"] = torch.zeros(1, 32)
    torch.save(sd, tmp_path / "dinov2_vits14_pretrain.pth")
    b3 = dict(pretrain_patch_size=14, pos_embed_class_row=True, family="internvit")
    model = PIIP(with_pretrain_size(tiny_config("det", b3=b3), 2, 70))
    report = load_branch_weights(model, {"branch3": tmp_path / "dinov2_vits14_pretrain.pth"}, use_hub=False)
    pos = model.branches[2].pos_embed.detach()
    assert pos.shape == (1, 1 + 16, 32)
    torch.testing.assert_close(pos[:, 1:], bicubic_grid(sd["pos_embed"][:, 1:], 5, 4))
    assert "mask_token" in report["branch3"].ignored
    assert torch.equal(model.branches[2].blocks[1].ls2.gamma.detach(), sd["blocks.1.ls2.gamma"])


# -- errors --------------------------------------------------------------------------------------

def test_keys_that_do_not_fit_raise_and_leave_the_model_unchanged(tmp_path, no_network):
    model = PIIP(tiny_config("det"))
    before = snapshot(model)
    good = tmp_path / "good.safetensors"
    save_file(state(deit3(64, 4, 64)), good)

    incomplete = state(deit3(32, 2, 96))
    del incomplete["blocks.1.mlp.fc2.weight"]
    save_file(incomplete, tmp_path / "missing.safetensors")
    with pytest.raises(BranchWeightsError, match=r"(?s)branch2.*missing from the file: blocks\.1\.mlp\.fc2\.weight"):
        load_branch_weights(model, {"branch1": good, "branch2": tmp_path / "missing.safetensors"}, use_hub=False)
    assert unchanged(model, before)  # branch1's good file was not applied either

    deeper = timm_vit(32, 2, 96, depth=3, no_embed_class=True, init_values=0.1)
    save_file(state(deeper), tmp_path / "deeper.safetensors")
    with pytest.raises(BranchWeightsError, match=r"unexpected in the file: blocks\.2\.attn"):
        load_branch_weights(model, {"branch2": tmp_path / "deeper.safetensors"}, use_hub=False)

    save_file(state(deit3(48, 2, 96)), tmp_path / "wider.safetensors")
    with pytest.raises(BranchWeightsError, match=r"shape mismatch: .*file \(48, 3, 16, 16\), model \(32, 3, 16, 16\)"):
        load_branch_weights(model, {"branch2": tmp_path / "wider.safetensors"}, use_hub=False)

    sd = state(deit3(32, 2, 96))
    del sd["blocks.1.ls2.gamma"]  # layer scale in the file, but not for every block
    save_file(sd, tmp_path / "partial_ls.safetensors")
    with pytest.raises(BranchWeightsError, match=r"blocks\.1\.ls2\.gamma"):
        load_branch_weights(model, {"branch2": tmp_path / "partial_ls.safetensors"}, use_hub=False)
    assert unchanged(model, before)

    report = load_branch_weights(model, {"branch2": tmp_path / "missing.safetensors"}, use_hub=False,
                                 strict=False)
    assert "MISSING" in report["branch2"].initialised["blocks.1.mlp.fc2.weight"]
    assert torch.equal(model.branches[1].blocks[1].mlp.fc2.weight, before["branches.1.blocks.1.mlp.fc2.weight"])
    assert torch.equal(model.branches[1].blocks[1].mlp.fc1.weight.detach(), incomplete["blocks.1.mlp.fc1.weight"])


def test_branch_names_and_files_are_checked(tmp_path, no_network):
    model = PIIP(tiny_config("det"))
    with pytest.raises(BranchWeightsError, match=r'"branch1", "branch2", "branch3"'):
        load_branch_weights(model, {"branch4": tmp_path / "x.pth"}, use_hub=False)
    with pytest.raises(BranchWeightsError, match="given twice"):
        load_branch_weights(model, {"branch1": tmp_path / "x.pth", 0: tmp_path / "x.pth"}, use_hub=False)
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_branch_weights(model, {"branch1": tmp_path / "nope.safetensors"}, use_hub=False)
    with torch.device("meta"):
        meta = PIIP(tiny_config("det"))
    with pytest.raises(BranchWeightsError, match="meta device"):
        load_branch_weights(meta, {"branch1": tmp_path / "nope.safetensors"}, use_hub=False)


def test_branch_without_a_timm_tag_needs_a_file():
    model = PIIP(tiny_config("det"))  # tiny branches have pretrained=None
    with pytest.raises(BranchWeightsError, match=r'(?s)branch1: no pretrained weights.*branch_weights=\{"branch1"'):
        load_branch_weights(model)
    with torch.device("meta"):
        big = piip.create_model("internvit_6b")
    with pytest.raises(BranchWeightsError, match="OpenGVLab/InternViT-6B-224px"):
        load_branch_weights(big)


# -- the hub -------------------------------------------------------------------------------------

TAG = "deit3_small_patch16_224.fb_in22k_ft_in1k"


def _hub_model(tmp_path):
    """A PIIP whose branch 2 names a timm tag; branches 1 and 3 get local files."""
    model = PIIP(tiny_config("det", b2=dict(pretrained=TAG)))
    save_file(state(deit3(64, 4, 64)), tmp_path / "b1.safetensors")
    save_file(state(deit3(32, 2, 128)), tmp_path / "b3.safetensors")
    return model, {"branch1": tmp_path / "b1.safetensors", "branch3": tmp_path / "b3.safetensors"}


def test_hub_offline_fails_fast_with_instructions(tmp_path, monkeypatch, no_network):
    model, files = _hub_model(tmp_path)
    before = snapshot(model)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(HubUnavailableError) as err:
        load_branch_weights(model, files)
    assert time.monotonic() - start < 2
    message = str(err.value)
    assert "branch2" in message and TAG in message and "HF_HUB_OFFLINE" in message
    assert 'branch_weights={"branch2": "/path/to/' in message
    assert unchanged(model, before)

    # every branch that cannot get weights is listed in one error (here the 6B has no timm tag)
    with torch.device("meta"):
        h6b = piip.create_model("piip_h6b")
    with pytest.raises(HubUnavailableError, match=r'(?s)branch1: InternViT-6B is not in timm.*OpenGVLab'
                       r'.*branch2: cannot download timm .vit_huge_patch14_224\.mae.*'
                       r'branch_weights=\{"branch1": .*, "branch2": '):
        load_branch_weights(h6b)


def test_hub_unreachable_fails_fast(tmp_path, monkeypatch, no_network):
    model, files = _hub_model(tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    for var in ("HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(var, raising=False)

    def unreachable(address, timeout=None, *args, **kwargs):
        raise OSError("no route to host")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    start = time.monotonic()
    with pytest.raises(HubUnavailableError, match=r"(?s)huggingface\.co:443 is not reachable.*branch_weights="):
        load_branch_weights(model, files)
    assert time.monotonic() - start < 2


def test_hub_download_through_timm(tmp_path, monkeypatch, no_network):
    """With the hub reachable, the tag goes through ``timm.create_model(tag, pretrained=True)``
    (simulated here); a failing download is reported with the same instructions."""
    model, files = _hub_model(tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "_reachable", lambda host, port, timeout: True)
    downloaded = deit3(32, 2, 96)
    calls = []

    def create_model(name, pretrained=False, **kwargs):
        calls.append((name, pretrained))
        return downloaded

    monkeypatch.setattr("timm.create_model", create_model)
    report = load_branch_weights(model, files)
    assert calls == [(TAG, True)] and report["branch2"].source == f"timm:{TAG}"
    assert torch.equal(model.branches[1].blocks[1].ls2.gamma.detach(), downloaded.blocks[1].ls2.gamma.detach())

    def fail(name, pretrained=False, **kwargs):
        raise OSError("connection reset")

    monkeypatch.setattr("timm.create_model", fail)
    with pytest.raises(HubUnavailableError, match=r'(?s)connection reset.*branch_weights=\{"branch2"'):
        load_branch_weights(model, files)


def test_hub_tag_served_from_the_local_cache(tmp_path, monkeypatch, no_network):
    """A tag whose file is already in the local hub cache loads without any network access."""
    model, files = _hub_model(tmp_path)
    cached = tmp_path / "hub_cache_model.safetensors"
    src = state(deit3(32, 2, 224))  # the tag's own 224 px grid: 14x14, resized to the branch's 6x6
    save_file(src, cached)
    monkeypatch.setattr(hub, "_cached_file", lambda cfg: str(cached))
    report = load_branch_weights(model, files)
    r = report["branch2"]
    assert r.source.startswith(f"timm:{TAG}")
    assert r.resampled["pos_embed"] == "grid 14x14 -> 6x6 (bicubic)"
    torch.testing.assert_close(model.branches[1].pos_embed.detach(), bicubic_grid(src["pos_embed"], 14, 6))
    assert torch.equal(model.branches[1].blocks[0].attn.qkv.weight.detach(), src["blocks.0.attn.qkv.weight"])


# -- the README table ----------------------------------------------------------------------------

def test_weights_table_covers_the_registry_and_is_up_to_date():
    spec = importlib.util.spec_from_file_location("weights_table", ROOT / "tools" / "weights_table.py")
    weights_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(weights_table)
    table = weights_table.pretrained_weights_table()
    for name in piip.list_models():
        assert f"| `{name}` |" in table
        for task in ("det", "cls"):
            for b in piip.get_config(name, task=task).branches:
                if b.pretrained:
                    assert f"`{b.pretrained}`" in table
    assert "| `piip_tsb` | cls | 1 | ViT-B (768-d, 12 blocks) | DeiT ViT-B/16 (v1), IN-1k" in table
    assert "`deit_3_large_384_21k.pth`" in table and "`mae_pretrain_vit_huge.pth`" in table
    doc = ROOT / "docs" / "pretrained_weights.md"
    assert doc.read_text(encoding="utf-8") == table, \
        "docs/pretrained_weights.md is stale: run python tools/weights_table.py"


# -- the real architectures ----------------------------------------------------------------------

@pytest.mark.slow
def test_every_registered_timm_tag_fits_its_branch(monkeypatch):
    """The state dict of the timm architecture behind every registered tag (built on the meta
    device: shapes only, no weights, no network) adapts to its branch without error. Only layer
    scale is left initialised, and only for files without it (DeiT v1, AugReg and MAE in detection
    branches; the classification AugReg branches have no layer scale)."""
    import timm

    def refuse(*args, **kwargs):
        raise AssertionError("the test tried to reach the network")

    monkeypatch.setattr(socket, "create_connection", refuse)
    configs = {}
    for task in ("det", "cls"):  # each tag once; cls-only tags (DeiT v1 S/B, AugReg 224) with a head
        for name in piip.list_models():
            for b in piip.get_config(name, task=task).branches:
                if b.pretrained:
                    configs.setdefault(b.pretrained, (b, 1000 if task == "cls" else 0))
    assert len(configs) == 16
    for tag, (config, num_classes) in configs.items():
        with torch.device("meta"):
            sd = timm.create_model(tag, pretrained=False).state_dict()
            branch = ViTBranch(config, num_classes=num_classes)
        tensors, report = adapt_branch_state_dict(branch, sd, source=tag)
        assert tensors.keys() == branch.state_dict().keys() - report.initialised.keys(), tag
        has_layer_scale = tag.startswith("deit3_")
        assert all(k.endswith(("ls1.gamma", "ls2.gamma")) for k in report.initialised), tag
        # left initialised exactly when the branch has layer scale and the file has none
        assert bool(report.initialised) == (config.init_values is not None and not has_layer_scale), tag
        grid = config.pretrain_img_size // config.pretrain_patch_size
        if grid != config.pos_embed_grid:
            assert report.resampled["pos_embed"].endswith(
                f"grid {grid}x{grid} -> {config.pos_embed_grid}x{config.pos_embed_grid} (bicubic)"), tag
