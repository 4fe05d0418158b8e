"""Every configuration file the authors ship, through ``piip.compat.original``.

``tests/data/authors_backbone_configs.json`` holds the backbone kwargs of all 36 files under
``classification/configs/`` and ``mmdetection/configs/piip/`` (OpenGVLab/PIIP @ 7a8eceb). Each one
either builds (on the meta device) with exactly the parameter count the authors' class has, counted
here by an independent closed-form transcription of their modules (reference §2, §4.3, §6), or
raises the documented ``NotImplementedError`` (BEiT, UniPerceiver and ConvNeXt branches). The
registered variants that correspond to released files build the same network as the converter.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from piip.compat import original
from piip.compat.original.arguments import ARGUMENTS, argument_table
from piip.models.registry import get_config

DATA = json.loads((Path(__file__).parent / "data" / "authors_backbone_configs.json").read_text())["configs"]
DOCS = Path(__file__).resolve().parents[1] / "docs" / "original_arguments.md"


# -- their parameter counts, from the documented rules (independent of piip's modules) ---------------

def _branch_class(task: str, count: int, kwargs: dict) -> str:
    if task == "cls":
        return {"deit": "vit", "augreg": "intern"}[kwargs.get("model_type", "deit")]
    if count == 4 or "deit" in kwargs["pretrained"]:
        return "vit"
    return "intern"


def _branch_params(task: str, kind: str, kw: dict) -> int:
    """One ViT of the authors' ``vit_models`` ("vit") or ``InternViT6B`` ("intern"), as built."""
    D, L, p = kw["embed_dim"], kw["depth"], kw.get("patch_size", 16)
    hidden = int(D * kw.get("mlp_ratio", 4))
    if task == "det":  # detection: grid of the pretraining size; InternViT keeps a class row
        grid = (kw["pretrain_img_size"] // p) ** 2
    else:  # classification: grid of img_size
        grid = (kw.get("img_size", 224) // p) ** 2
    total = 3 * p * p * D + D + grid * D + (D if kind == "intern" else 0)
    if task == "cls" and kw.get("use_cls_token", True):
        total += D
    if kind == "vit":
        norm, layer_scale, qk_norm = 2 * D, 2 * D, 0           # LayerNorm; gamma_1/gamma_2 always
        qkv_bias = kw.get("qkv_bias", False)
    else:
        defaults = {"det": dict(init_values=0.1, qk_normalization=True, norm_layer_type="RMSNorm"),
                    "cls": dict(init_values=None, qk_normalization=False, norm_layer_type="ln")}[task]
        kw = {**defaults, **kw}
        norm = D if kw["norm_layer_type"] == "RMSNorm" else 2 * D
        layer_scale = 2 * D if kw["init_values"] else 0
        qk_norm = 2 * norm if kw["qk_normalization"] else 0
        qkv_bias = kw.get("qkv_bias", False)
    block = (2 * norm + 3 * D * D + (3 * D if qkv_bias else 0) + D * D + D
             + D * hidden + hidden + hidden * D + D + layer_scale + qk_norm)
    total += L * block
    if task == "cls":  # separate heads: final norm + head
        total += norm + D * kw.get("num_classes", 1000) + kw.get("num_classes", 1000)
    return total


def _injector(dq: int, dv: int, top: dict) -> int:
    proj, norm = top.get("interaction_proj", True), top.get("norm_layer") != "none"
    heads, points, ratio, ffn = top["deform_num_heads"], top["n_points"], top["deform_ratio"], top["cffn_ratio"]
    d_feat = dq if proj else dv
    value = int(dq * ratio)
    total = dq                                                   # ca_gamma
    total += (2 * dq + 2 * d_feat) if norm else 0                # query_norm, feat_norm
    total += dq * heads * points * 2 + heads * points * 2        # sampling_offsets
    total += dq * heads * points + heads * points                # attention_weights
    total += d_feat * value + value + value * dq + dq            # value_proj, output_proj
    if top["with_cffn"]:
        h = int(dq * ffn)
        total += (2 * dq if norm else 0) + dq * h + h + 9 * h + h + h * dq + dq + dq   # ffn_norm, ffn, cffn_gamma
    return total


def their_parameter_count(task: str, config: dict) -> int:
    """What ``sum(p.numel())`` of the authors' backbone class built from ``config`` gives."""
    if config.get("type") in ("vit_models", "InternViT6B"):       # single-branch baselines
        kind = "vit" if config["type"] == "vit_models" else "intern"
        D = config["embed_dim"]
        return _branch_params("det", kind, config) + 2 * (4 * D * D + D) + 2 * D + (4 * D * D + D)
    branches = [config[f"branch{i}"] for i in range(1, 5) if f"branch{i}" in config]
    count = len(branches)
    built = list(branches)
    if task == "det" and count == 4:                             # vit_models(**branch3)
        built[3] = branches[2]
    kinds = [_branch_class(task, count, b) for b in branches]
    dims = [b["embed_dim"] for b in built]
    total = sum(_branch_params(task, k, b) for k, b in zip(kinds, built))
    groups = len(branches[0]["interaction_indexes"])
    for a, b in zip(dims[:-1], dims[1:]):
        unit = (2 * a * b + a + b) if config.get("interaction_proj", True) else 0
        total += groups * (unit + _injector(a, b, config) + _injector(b, a, config))
    if task == "det":
        d1 = dims[0]
        total += sum(9 * d * d1 + 2 * d1 + 9 * d1 * d1 + 2 * d1 for d in dims) + count   # merges, w_i
        with_fpn1 = not (config.get("is_dino") and count != 3)
        total += (2 * (4 * d1 * d1 + d1) + 2 * d1 if with_fpn1 else 0) + 4 * d1 * d1 + d1
    return total


#: what the reference measured by building the authors' modules (§3.5, [ran]), in millions
MEASURED = {
    "mask_rcnn_deit_tsb_1120_896_448": 175.0, "mask_rcnn_deit_sbl_1120_672_448": 547.8,
    "mask_rcnn_deit_tsbl_1344_896_672_448": 593.2, "mask_rcnn_augreg_sbl_1568_1120_672_fpn_1x_coco_bs16.py": 548.6,
    "mask_rcnn_augreg_sbl_1568_1120_672_fpn_1x_coco_bs16_speedup": 521.2, "mask_rcnn_dinov2_sbl": 549.6,
    "mask_rcnn_mae_sbl": 547.8, "dino_4scale_deit_384_sbl": 548.6, "mask_rcnn_deit_vit_b": 92.9,
    "mask_rcnn_deit_vit_l": 315.9, "piip_3branch_tsb_368-192-128": 144.0, "piip_3branch_sbl_320-160-96": 488.8,
    "piip_3branch_sbl_384-192-128": 488.9,
}
UNSUPPORTED = {"beit": "BEiT", "uniperceiver": "UniPerceiver", "convnext": "ConvNe[Xx]t"}


def _task(path: str) -> str:
    return "cls" if path.startswith("classification/") else "det"


def test_the_table_holds_every_shipped_file():
    assert len(DATA) == 36
    assert sum(p.startswith("classification/configs/") for p in DATA) == 3
    assert sum(p.startswith("mmdetection/configs/piip/") for p in DATA) == 33


@pytest.mark.parametrize("path", sorted(DATA))
def test_every_shipped_config_builds_with_their_parameter_count(path):
    task, config = _task(path), DATA[path]
    name = Path(path).stem
    refused = next((label for key, label in UNSUPPORTED.items() if key in name), None)
    if refused:
        with pytest.raises(NotImplementedError, match=refused):
            original.build(config, task)
        return
    with torch.device("meta"):
        model = original.build(config, task)
    ours = sum(p.numel() for p in model.parameters())
    assert ours == their_parameter_count(task, config), name
    for key, millions in MEASURED.items():
        if key in path:
            assert round(ours / 1e6, 1) == millions, name


# -- the registered variants are the released networks ---------------------------------------------

_P = "mmdetection/configs/piip/"
RELEASED = [  # (variant, task, resolutions or None, the file)
    ("piip_tsb", "det", None, _P + "3branch/mask_rcnn_deit_tsb_1120_896_448_fpn_1x_coco_bs16.py"),
    ("piip_tsb", "det", "1568/896/448", _P + "3branch/mask_rcnn_deit_tsb_1568_896_448_fpn_1x_coco_bs16.py"),
    ("piip_tsb", "det", "1568/1120/672", _P + "3branch/mask_rcnn_deit_tsb_1568_1120_672_fpn_1x_coco_bs16.py"),
    ("piip_sbl", "det", None, _P + "3branch/mask_rcnn_deit_sbl_1120_672_448_fpn_1x_coco_bs16.py"),
    ("piip_sbl", "det", "1344/896/448", _P + "3branch/mask_rcnn_deit_sbl_1344_896_448_fpn_1x_coco_bs16.py"),
    ("piip_sbl", "det", "1568/896/672", _P + "3branch/mask_rcnn_deit_sbl_1568_896_672_fpn_1x_coco_bs16.py"),
    ("piip_sbl", "det", "1568/1120/672", _P + "3branch/mask_rcnn_deit_sbl_1568_1120_672_fpn_1x_coco_bs16.py"),
    ("piip_sbl_augreg", "det", None, _P + "3branch/mask_rcnn_augreg_sbl_1568_1120_672_fpn_1x_coco_bs16.py"),
    ("piip_sbl_augreg_speedup", "det", None,
     _P + "3branch/mask_rcnn_augreg_sbl_1568_1120_672_fpn_1x_coco_bs16_speedup.py"),
    ("piip_sbl_384", "det", None, _P + "3branch/dino_4scale_deit_384_sbl_1792_1120_672_fpn_3x_coco_bs32_ms.py"),
    ("piip_h6b", "det", None, _P + "2branch/mask_rcnn_internvit_h6b_1024_512_fpn_1x_coco_bs16_ms.py"),
    ("piip_h6b_speedup", "det", None, _P + "2branch/mask_rcnn_internvit_h6b_1024_512_fpn_1x_coco_bs16_ms_speedup.py"),
    ("piip_lh6b_speedup", "det", None, _P + "3branch/mask_rcnn_internvit_lh6b_1536_1024_512_fpn_1x_coco_bs32_ms.py"),
    ("vitdet_base", "det", None, _P + "baseline/mask_rcnn_deit_vit_b_fpn_1x_coco_bs16.py"),
    ("vitdet_large", "det", None, _P + "baseline/mask_rcnn_deit_vit_l_fpn_1x_coco_bs16.py"),
    ("internvit_6b", "det", None, _P + "baseline/mask_rcnn_internvit_6b_fpn_1x_coco_bs16_ms.py"),
    ("piip_tsb", "cls", None, "classification/configs/piip_3branch_tsb_368-192-128_cls_token_deit1.py"),
    ("piip_sbl", "cls", None, "classification/configs/piip_3branch_sbl_384-192-128_cls_token_augreg.py"),
    ("piip_sbl", "cls", "320/160/96", "classification/configs/piip_3branch_sbl_320-160-96_cls_token_augreg.py"),
]


def _network(config):
    """The config without what does not change the network: its name and the pretrained tags."""
    return dataclasses.replace(config, name="", branches=tuple(
        dataclasses.replace(b, pretrained=None) for b in config.branches))


@pytest.mark.parametrize("variant,task,resolutions,path", RELEASED,
                         ids=[f"{r[0]}-{r[1]}-{r[2] or 'default'}" for r in RELEASED])
def test_registered_variants_build_the_released_networks(variant, task, resolutions, path):
    ours = get_config(variant, task=task, resolutions=resolutions)
    theirs = original.to_piip_config(DATA[path], task)
    assert _network(ours) == _network(theirs)


def test_piip_tsbl_is_the_paper_network_not_the_released_one():
    """The released TSBL files come from the 4-branch class that builds branch 4 from branch 3's
    kwargs (a ViT-S); ``piip_tsbl`` is the paper's network with a true ViT-T: the only difference."""
    theirs = original.to_piip_config(
        DATA[_P + "4branch/mask_rcnn_deit_tsbl_1568_1120_672_448_fpn_1x_coco_bs16.py"], "det")
    ours = get_config("piip_tsbl")
    assert (theirs.branches[3].embed_dim, ours.branches[3].embed_dim) == (384, 192)
    fixed = dataclasses.replace(theirs, branches=theirs.branches[:3] + (
        dataclasses.replace(ours.branches[3], pretrained=None),))
    assert _network(fixed) == _network(ours)


# -- the audit table ---------------------------------------------------------------------------------

def test_docs_table_is_current():
    """docs/original_arguments.md is what ``write_argument_table`` writes (regenerate it after
    changing the audit: ``python -c "from piip.compat.original.arguments import write_argument_table;
    write_argument_table()"``)."""
    assert argument_table() in DOCS.read_text()


def test_every_argument_of_every_shipped_config_is_audited():
    """No key of a shipped config is missing from the table of its class."""
    def names(task, cls):
        return {a.name for a in ARGUMENTS[(task, cls)]}

    for path, config in DATA.items():
        task = _task(path)
        if config.get("type") in ("vit_models", "InternViT6B", "ConvNextHFWrapper"):
            table = names("det", config["type"]) if config["type"] != "ConvNextHFWrapper" else None
            if table:
                assert set(config) - {"type"} <= table, path
            continue
        cls = {2: "PIIPTwoBranch", 3: "PIIPThreeBranch", 4: "PIIPFourBranch"}[
            sum(k.startswith("branch") for k in config)]
        top = {k for k in config if not k.startswith("branch") and k != "type"}
        assert top <= names(task, cls), (path, top - names(task, cls))
        for key, branch in ((k, v) for k, v in config.items() if k.startswith("branch")):
            name = Path(path).stem
            if any(u in name for u in UNSUPPORTED) and "deit" not in branch.get("pretrained", "deit"):
                continue
            kind = ("vit_models" if branch.get("model_type", "deit") == "deit" else "InternViT6B") \
                if task == "cls" else ("vit_models" if "deit" in branch["pretrained"] else "InternViT6B")
            consumed = {f"branchN.{k}" for k in branch} & names(task, cls)
            rest = {k for k in branch if f"branchN.{k}" not in consumed}
            assert rest <= names(task, kind), (path, key, rest - names(task, kind))


# -- a checkpoint in the layout of the released PIIP-SBL classification files ---------------------

def their_state_dict(config: dict, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random tensors under the key names and shapes of the authors' classification checkpoints
    (reference §6), built from the config alone; every interaction gate is zero."""
    sd: dict[str, torch.Tensor] = {}

    def add(name, *shape, zero=False, one=False):
        t = torch.zeros(shape) if zero else torch.randn(shape, generator=generator) * 0.02
        sd[name] = (t + 1.0 if one else t).half()

    branches = [config[f"branch{i}"] for i in range(1, 4)]
    for i, b in enumerate(branches, start=1):
        D, L, n = b["embed_dim"], b["depth"], (b["img_size"] // 16) ** 2
        augreg = b.get("model_type") == "augreg"
        p = f"branch{i}."
        add(p + "cls_token", 1, 1, D)
        add(p + "pos_embed", 1, n + (1 if augreg else 0), D)
        add(p + "patch_embed.proj.weight", D, 3, 16, 16)
        add(p + "patch_embed.proj.bias", D)
        for k in range(L):
            q = f"{p}blocks.{k}."
            for norm in ("norm1", "norm2"):
                add(q + norm + ".weight", D, one=True)
                add(q + norm + ".bias", D)
            add(q + "attn.qkv.weight", 3 * D, D)
            add(q + "attn.qkv.bias", 3 * D)
            add(q + "attn.proj.weight", D, D)
            add(q + "attn.proj.bias", D)
            add(q + "mlp.fc1.weight", 4 * D, D)
            add(q + "mlp.fc1.bias", 4 * D)
            add(q + "mlp.fc2.weight", D, 4 * D)
            add(q + "mlp.fc2.bias", D)
        add(p + "norm.weight", D, one=True)
        add(p + "norm.bias", D)
        add(p + "head.weight", 1000, D)
        add(p + "head.bias", 1000)
    dims = [b["embed_dim"] for b in branches]
    for k in range(len(branches[0]["interaction_indexes"])):
        for j, (da, db) in enumerate(zip(dims[:-1], dims[1:]), start=1):
            u = f"interactions.{k}.interaction_units_{j}{j + 1}."
            add(u + "branch1to2_proj.weight", db, da)
            add(u + "branch1to2_proj.bias", db)
            add(u + "branch2to1_proj.weight", da, db)
            add(u + "branch2to1_proj.bias", da)
            for inj, d in (("branch2to1_injector.", da), ("branch1to2_injector.", db)):
                v = u + inj
                for norm in ("query_norm", "feat_norm", "ffn_norm"):
                    add(v + norm + ".weight", d, one=True)
                    add(v + norm + ".bias", d)
                add(v + "attn.sampling_offsets.weight", 16 * 4 * 2, d)
                add(v + "attn.sampling_offsets.bias", 16 * 4 * 2)
                add(v + "attn.attention_weights.weight", 16 * 4, d)
                add(v + "attn.attention_weights.bias", 16 * 4)
                add(v + "attn.value_proj.weight", d // 2, d)
                add(v + "attn.value_proj.bias", d // 2)
                add(v + "attn.output_proj.weight", d, d // 2)
                add(v + "attn.output_proj.bias", d)
                add(v + "ffn.fc1.weight", d // 4, d)
                add(v + "ffn.fc1.bias", d // 4)
                add(v + "ffn.dwconv.dwconv.weight", d // 4, 1, 3, 3)
                add(v + "ffn.dwconv.dwconv.bias", d // 4)
                add(v + "ffn.fc2.weight", d, d // 4)
                add(v + "ffn.fc2.bias", d)
                add(v + "ca_gamma", d, zero=True)
                add(v + "cffn_gamma", d, zero=True)
    return sd


@pytest.mark.slow
def test_released_piip_sbl_classification_layout_converts_and_each_branch_equals_timm_augreg(tmp_path):
    """A file in the layout of ``piip_3branch_sbl_384-192-128_cls_token_augreg.pth`` (its config's
    shapes, random values, their key names, ``{"model", "model_ema", ...}``) goes through
    ``piip convert`` and loads strictly; with the gates at zero each branch is its AugReg ViT, so its
    class-token (and patch) features equal timm's own ``VisionTransformer`` with LayerNorm and no
    layer scale, given the same weights. PIIP adds no position to the class token, so timm's twin
    gets a zero class row; the checkpoint's own class row is unused (changing it changes nothing)."""
    import argparse
    from functools import partial

    from timm.models.vision_transformer import VisionTransformer

    import piip
    from piip.cli import main

    path = "classification/configs/piip_3branch_sbl_384-192-128_cls_token_augreg.py"
    config = DATA[path]
    sd = their_state_dict(config, torch.Generator().manual_seed(0))
    assert sum(t.numel() for t in sd.values()) == their_parameter_count("cls", config)
    ema = dict(sd, **{"branch1.head.bias": sd["branch1.head.bias"] + 1})
    source = tmp_path / "piip_3branch_sbl_384-192-128_cls_token_augreg.pth"
    torch.save({"model": sd, "model_ema": ema, "epoch": 19, "args": argparse.Namespace(lr=3e-5)}, source)
    (tmp_path / "kwargs.json").write_text(json.dumps(config))
    out = tmp_path / "piip_sbl_cls.safetensors"
    assert main(["convert", str(source), "--config", str(tmp_path / "kwargs.json"), "-o", str(out)]) == 0
    del ema, source
    model = piip.load(str(out))              # rebuilt from the stored config, loaded strictly
    assert _network(model.config) == _network(get_config("piip_sbl", task="cls"))
    torch.testing.assert_close(model.branches[0].head.bias, sd["branch1.head.bias"].float())  # not the EMA

    images = torch.randn(1, 3, 384, 384, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        tokens, _ = model.forward_tokens(images)
        pyramid = model.pyramid(images)
        for i, (branch, kw) in enumerate(zip(model.branches, [config[f"branch{k}"] for k in (1, 2, 3)])):
            twin = VisionTransformer(img_size=kw["img_size"], patch_size=16, embed_dim=kw["embed_dim"],
                                     depth=kw["depth"], num_heads=kw["num_heads"], qkv_bias=True,
                                     class_token=True, no_embed_class=False, global_pool="token",
                                     init_values=None, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6)).eval()
            weights = {k[len(f"branch{i + 1}."):]: v.float() for k, v in sd.items()
                       if k.startswith(f"branch{i + 1}.")}
            weights["pos_embed"] = weights["pos_embed"].clone()
            weights["pos_embed"][:, 0] = 0
            twin.load_state_dict(weights, strict=True)
            expected = twin.forward_features(pyramid[i])
            ours = branch.norm(tokens[i])
            torch.testing.assert_close(ours[:, 0], expected[:, 0], rtol=1e-4, atol=1e-4)   # class token
            torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)               # every token
            del twin, weights
        branch = model.branches[2]
        before = branch.norm(tokens[2])[:, 0].clone()
        branch.pos_embed[:, 0] += 5.0                     # the unused class row
        after = branch.norm(model.forward_tokens(images)[0][2])[:, 0]
    torch.testing.assert_close(after, before, rtol=0, atol=0)
