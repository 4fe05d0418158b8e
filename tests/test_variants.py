"""The variant registry: every paper configuration builds, with the settings of the shipped configs."""
from __future__ import annotations

import pytest

from piip.config.model import PIIPConfig
from piip.models.registry import describe, get_config, list_models, resolve_name

CANONICAL = [
    "vitdet_base", "vitdet_large", "internvit_6b", "internvit_6b_window",
    "piip_tsb", "piip_tsb_direct", "piip_sbl", "piip_sbl_augreg", "piip_sbl_augreg_speedup",
    "piip_sbl_384", "piip_tsbl", "piip_bbb", "piip_lll", "piip_h6b", "piip_h6b_speedup",
    "piip_lh6b", "piip_lh6b_speedup", "piip_b_scratch",
]


def test_required_names_registered() -> None:
    assert set(CANONICAL) <= set(list_models())
    assert set(list_models()) <= set(list_models(include_aliases=True))
    assert list_models("piip_tsb_*") == ["piip_tsb_direct"]


@pytest.mark.parametrize("name", CANONICAL)
@pytest.mark.parametrize("task", ["det", "cls"])
def test_every_variant_builds(name: str, task: str) -> None:
    cfg = get_config(name, task=task)
    assert isinstance(cfg, PIIPConfig)
    assert cfg.task == task and cfg.name == name
    assert describe(name)
    # round trip through plain data
    assert PIIPConfig.from_dict(cfg.to_dict()) == cfg
    if task == "cls" and cfg.cls_head == "per_branch":
        # the authors' classification classes: global attention, a class token, position
        # embeddings at the branch's own grid, constant drop path; several branches' heads read
        # the first patch token (their released checkpoints), a single ViT its class token
        for b in cfg.branches:
            assert b.class_token and not b.window_block_indexes
            assert b.pos_embed_at_resolution and b.drop_path_schedule == "constant"
        assert cfg.cls_pool == ("first_patch" if cfg.num_branches > 1 else "class_token")


@pytest.mark.parametrize("alias, name", [
    ("piip-tsb", "piip_tsb"), ("TSB", "piip_tsb"), ("vit_b_1024", "vitdet_base"),
    ("vit_l_1024", "vitdet_large"), ("piip-h6b-speedup", "piip_h6b_speedup"), ("piip-b", "piip_b_scratch"),
    ("piip_lh6b_1536_1024_512", "piip_lh6b_speedup"),
])
def test_aliases(alias: str, name: str) -> None:
    assert resolve_name(alias) == name
    assert get_config(alias) == get_config(name)


def test_pretrained_tags_exist_in_timm() -> None:
    timm = pytest.importorskip("timm")
    available = set(timm.list_pretrained())
    tags = {b.pretrained for n in CANONICAL for t in ("det", "cls")
            for b in get_config(n, task=t).branches if b.pretrained}
    assert tags, "no pretrained tags at all"
    missing = sorted(tags - available)
    assert not missing, f"timm does not know {missing}"


# -- the settings of the authors' configs (reference §3.2, §3.4) ----------------------------------

def _widths(cfg):
    return [b.embed_dim for b in cfg.branches]


def test_tsb() -> None:
    det = get_config("piip_tsb")
    assert det.resolutions == (1120, 896, 448) and _widths(det) == [768, 384, 192]
    assert [b.pretrained for b in det.branches] == [
        "deit3_base_patch16_224.fb_in22k_ft_in1k", "deit3_small_patch16_224.fb_in22k_ft_in1k",
        "deit_tiny_patch16_224.fb_in1k"]
    assert [b.drop_path_rate for b in det.branches] == [0.15, 0.05, 0.05]
    for b in det.branches:
        assert b.window_size == 14 and b.window_block_indexes == tuple(range(12))
        assert b.interaction_indexes == tuple((i, i) for i in range(12))
        assert b.family == "deit" and b.drop_path_schedule == "constant" and not b.class_token
    assert det.interaction.attn_type == "deform" and det.interaction.with_proj and det.interaction.with_norm
    cls = get_config("piip_tsb", task="cls")
    assert cls.resolutions == (368, 192, 128)
    assert [b.pretrained for b in cls.branches] == [
        "deit_base_patch16_224.fb_in1k", "deit_small_patch16_224.fb_in1k", "deit_tiny_patch16_224.fb_in1k"]
    assert [b.drop_path_rate for b in cls.branches] == [0.2, 0.05, 0.05]


def test_sbl_and_tsbl() -> None:
    det = get_config("piip_sbl")
    assert det.resolutions == (1120, 672, 448) and _widths(det) == [1024, 768, 384]
    assert det.branches[0].interaction_indexes == tuple((2 * i, 2 * i + 1) for i in range(12))
    assert all(b.window_size == 28 and len(b.window_block_indexes) == b.depth for b in det.branches)
    assert [b.drop_path_rate for b in det.branches] == [0.4, 0.15, 0.05]
    cls = get_config("piip_sbl", task="cls")
    assert cls.resolutions == (384, 192, 128)
    # the classification InternViT6B class: LayerNorm, no layer scale, no qk-norm, constant drop path
    assert all(b.family == "internvit" and b.pos_embed_class_row and b.drop_path_schedule == "constant"
               and b.init_values is None and not b.qk_norm and b.norm_layer == "layernorm"
               for b in cls.branches)
    assert cls.branches[0].pretrained == "vit_large_patch16_224.augreg_in21k_ft_in1k"
    tsbl = get_config("piip_tsbl")
    assert tsbl.resolutions == (1568, 1120, 672, 448)
    assert _widths(tsbl) == [1024, 768, 384, 192]            # a true ViT-T 4th branch
    aug = get_config("piip_sbl_augreg")
    assert aug.resolutions == (1568, 1120, 672)
    assert [b.drop_path_rate for b in aug.branches] == [0.4, 0.3, 0.2]
    assert all(b.pretrain_img_size == 384 for b in aug.branches)
    speed = get_config("piip_sbl_augreg_speedup")
    assert not speed.interaction.with_proj and not speed.interaction.with_norm
    assert all(b.act_layer == "gelu_tanh" for b in speed.branches)


def test_baselines() -> None:
    b = get_config("vitdet_base")
    assert b.num_branches == 1 and b.fpn_norm == "layernorm" and b.num_interactions == 0
    assert b.branches[0].window_block_indexes == (0, 1, 3, 4, 6, 7, 9, 10)
    l = get_config("vitdet_large").branches[0]
    assert l.window_size == 14 and set(range(24)) - set(l.window_block_indexes) == set(range(2, 24, 3))
    g = get_config("internvit_6b").branches[0]
    assert (g.embed_dim, g.depth, g.num_heads) == (3200, 48, 25)
    assert g.qk_norm and g.norm_layer == "rmsnorm" and not g.qkv_bias and g.init_values == 0.1
    assert g.pretrain_patch_size == 14 and g.patch_size == 16 and g.family == "internvit"
    assert g.pos_embed_class_row and not g.window_block_indexes
    assert get_config("internvit_6b_window").branches[0].window_block_indexes == tuple(range(48))


def test_internvit_scale() -> None:
    h6b = get_config("piip_h6b")
    assert h6b.resolutions == (1024, 512) and _widths(h6b) == [3200, 1280]
    assert h6b.branches[0].interaction_indexes == tuple((4 * i, 4 * i + 3) for i in range(12))
    assert h6b.branches[1].interaction_indexes == (
        (0, 1), (2, 3), (4, 5), (6, 7), (8, 10), (11, 13), (14, 16), (17, 19), (20, 22), (23, 25),
        (26, 28), (29, 31))
    assert h6b.branches[1].pretrained == "vit_huge_patch14_224.mae"
    assert all(b.drop_path_schedule == "linear" for b in h6b.branches)
    sp = get_config("piip_h6b_speedup")
    assert not sp.interaction.with_proj and not sp.interaction.with_norm
    lh = get_config("piip_lh6b")
    assert lh.resolutions == (1280, 1024, 640) and _widths(lh) == [3200, 1280, 1024]
    assert lh.num_interactions == 12
    assert lh.branches[2].pretrained == "deit3_large_patch16_384.fb_in22k_ft_in1k"
    assert lh.branches[2].family == "deit"
    rel = get_config("piip_lh6b_speedup")
    assert rel.resolutions == (1536, 1024, 512) and rel.num_interactions == 4
    assert [len(range(s, e + 1)) for s, e in rel.branches[1].interaction_indexes] == [8] * 4


def test_table9_and_scratch() -> None:
    direct = get_config("piip_tsb_direct")
    assert direct.resolutions == (448, 672, 896) and _widths(direct) == [768, 384, 192]
    assert get_config("piip_bbb").resolutions == (896, 448, 224)
    assert _widths(get_config("piip_lll")) == [1024] * 3
    b = get_config("piip_b_scratch", task="cls")
    assert b.cls_head == "merged" and b.resolutions == (512, 256, 128)
    assert [(x.embed_dim, x.num_heads, x.depth) for x in b.branches] == [(640, 8, 12), (320, 4, 12), (160, 2, 12)]
    assert get_config("piip_b_scratch", task="det").task == "det"


# -- generic overrides and errors -----------------------------------------------------------------

def test_resolution_override() -> None:
    cfg = get_config("piip_tsb", resolutions="1344/896/448")
    assert cfg.resolutions == (1344, 896, 448)
    assert [b.resolution for b in cfg.branches] == [448, 896, 1344]
    assert get_config("piip_tsb", resolutions=[1568, 1120, 672]).resolutions == (1568, 1120, 672)


def test_interaction_overrides() -> None:
    cfg = get_config("piip_tsb", interactions=2, interaction_attn="regular", num_classes=10,
                     drop_path_rate=0.0)
    assert cfg.num_interactions == 2 and cfg.interaction.attn_type == "regular"
    assert cfg.num_classes == 10 and all(b.drop_path_rate == 0.0 for b in cfg.branches)
    none = get_config("piip_tsb", interactions=0)
    assert none.num_interactions == 0


@pytest.mark.parametrize("resolutions, match", [
    ("1344/896", "2 sizes but the model has 3 branches"),
    ("1344/896/448/224", "4 sizes but the model has 3 branches"),
    ("big/small/tiny", "not of the form"),
    ("1344/-896/448", "positive"),
])
def test_bad_resolutions(resolutions: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        get_config("piip_tsb", resolutions=resolutions)


def test_unknown_name_suggests_closest() -> None:
    with pytest.raises(ValueError, match="did you mean 'piip_tsb'"):
        get_config("piip_tbs")
    with pytest.raises(ValueError, match="unknown PIIP variant"):
        get_config("resnet50")


def test_bad_task_and_overrides() -> None:
    with pytest.raises(ValueError, match="task must be"):
        get_config("piip_tsb", task="segmentation")
    with pytest.raises(ValueError, match="interaction_attn"):
        get_config("piip_tsb", interaction_attn="sparse")
    with pytest.raises(ValueError, match="single-branch"):
        get_config("vitdet_base", interactions=2)
    with pytest.raises(TypeError, match="unknown override"):
        get_config("piip_tsb", widht=3)
