"""timm's feature-extraction contracts: ``forward_intermediates``, ``feature_info`` and
``create_model(features_only=True)``, checked against timm's own ViT on a branch."""
from functools import partial

import pytest
import torch
from timm.models._features import FeatureGetterNet
from timm.models.vision_transformer import VisionTransformer
from torch import nn

import piip


def timm_twin(branch, image: torch.Tensor) -> VisionTransformer:
    """timm's ViT with the branch's architecture and weights, built for ``image``'s size (the branch's
    position embedding resized to that grid as the branch does it)."""
    c = branch.config
    grid = (image.shape[-2] // c.patch_size, image.shape[-1] // c.patch_size)
    has_norm = not isinstance(getattr(branch, "norm", nn.Identity()), nn.Identity)
    vit = VisionTransformer(img_size=tuple(image.shape[-2:]), patch_size=c.patch_size, num_classes=0, global_pool="",
                            embed_dim=c.embed_dim, depth=c.depth, num_heads=c.num_heads, class_token=c.class_token,
                            no_embed_class=True, init_values=c.init_values, final_norm=has_norm, fc_norm=False,
                            norm_layer=partial(nn.LayerNorm, eps=1e-6))
    state = {k: v for k, v in branch.state_dict().items() if not k.startswith(("head.", "fc_norm."))}
    state["pos_embed"] = branch.resized_pos_embed(grid)
    vit.load_state_dict(state)  # strict: every tensor has its twin under the same name
    return vit.eval()


def assert_same(actual, expected, atol=2e-6):
    """Equal structure (tensors, tuples, lists) and values within ``atol``."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor) and actual.shape == expected.shape, (actual, expected.shape)
        assert (actual - expected).abs().max() <= atol
        return
    assert type(actual) is type(expected) and len(actual) == len(expected), (type(actual), type(expected))
    for a, e in zip(actual, expected):
        assert_same(a, e, atol)


@pytest.mark.parametrize("task,overrides,size", [
    ("cls", dict(class_token=True, cls_pool="class_token"), 28),  # a final norm and a class token
    ("det", {}, 56),  # windowed blocks: 14-token windows on the 14x14 grid are global attention
])
def test_single_branch_is_timms_vit(task, overrides, size):
    model = piip.create_model("vit_fmnist_s", task=task, **overrides).eval()
    images = torch.randn(2, 3, size, size)
    vit = timm_twin(model.branches[0], images)
    has_norm = task == "cls"
    with torch.no_grad():
        for indices in (None, 2, [-1, 0], (1, -2)):
            for output_fmt in ("NCHW", "NLC"):
                for norm in (False, True) if has_norm else (False,):
                    for prefix, only in ((False, False), (True, True)):
                        kw = dict(indices=indices, output_fmt=output_fmt, norm=norm, return_prefix_tokens=prefix,
                                  intermediates_only=only)
                        assert_same(model.forward_intermediates(images, **kw), vit.forward_intermediates(images, **kw))
        # stop_early: the final tokens are those after the last selected block, as timm's
        kw = dict(indices=[1], stop_early=True)
        assert_same(model.forward_intermediates(images, **kw), vit.forward_intermediates(images, **kw))
    assert model.feature_info == [dict(num_chs=64, reduction=4, module=f"branches.0.blocks.{i}", branch=0, block=i)
                                  for i in range(4)]
    assert [d["module"].removeprefix("branches.0.") for d in model.feature_info] == \
        [d["module"] for d in vit.feature_info]


def _open_gates(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("ca_gamma", "cffn_gamma")):
                p.fill_(0.5)


@pytest.mark.parametrize("task,overrides", [
    ("det", dict(window_block_indexes=())),  # global attention, so timm's ViT is the same network
    ("cls", dict(class_token=True, cls_pool="class_token")),  # final norms and class tokens
])
def test_piip_branch_points_are_timms_vit_at_zero_gates(task, overrides):
    model = piip.create_model("piip_fmnist_tsb", task=task, **overrides).eval()
    with torch.no_grad():  # live interactions: only the zero gates keep them out
        for module in model.interactions.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.5)
    images = torch.randn(2, 3, 28, 28)
    norms = (False, True) if task == "cls" else (False,)
    with torch.no_grad():
        for norm in norms:
            out = model.forward_intermediates(images, norm=norm, return_prefix_tokens=True, intermediates_only=True)
            assert len(out) == len(model.feature_info)
            for k, (branch, image) in enumerate(zip(model.branches, model.pyramid(images))):
                entries = [i for i, d in enumerate(model.feature_info) if d.get("branch") == k]
                ends = [end for _, end in branch.config.interaction_indexes]
                expected = timm_twin(branch, image).forward_intermediates(
                    image, indices=ends, norm=norm, return_prefix_tokens=True, intermediates_only=True)
                assert_same([out[i] for i in entries], expected)
        closed = model.forward_intermediates(images, intermediates_only=True)
        _open_gates(model)
        final, opened = model.forward_intermediates(images)
        maps = model.forward_features(images)
        tokens, _ = model.forward_tokens(images)
    for i, info in enumerate(model.feature_info):
        if "branch" in info:
            assert (opened[i] - closed[i]).abs().max() > 1e-3, info  # the interactions reach every point
            if info["interaction"] == 1:
                torch.testing.assert_close(opened[i], maps[info["branch"]], rtol=0, atol=0)
    assert_same(final, [b.norm(x) if task == "cls" else x for b, x in zip(model.branches, tokens)])
    if task == "det":
        merged = [i for i, d in enumerate(model.feature_info) if d["module"] == "merge"]
        assert merged == [2]
        torch.testing.assert_close(opened[2], model.merge(maps), rtol=0, atol=0)


def test_each_point_is_the_output_of_its_module_and_stop_early_stops():
    model = piip.create_model("piip_fmnist_tsb").eval()
    _open_gates(model)
    modules = dict(model.named_modules())
    seen = {}
    for i, info in enumerate(model.feature_info):
        modules[info["module"]].register_forward_hook(lambda m, args, out, i=i: seen.setdefault(i, out))
    images = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        out = model.forward_intermediates(images, output_fmt="NLC", intermediates_only=True)
        for i, y in enumerate(out):
            hooked = seen[i].flatten(2).transpose(1, 2) if model.feature_info[i]["module"] == "merge" else seen[i]
            torch.testing.assert_close(y, hooked, rtol=0, atol=0, msg=str(model.feature_info[i]))
        seen.clear()
        first, early = model.forward_intermediates(images, indices=[0, 3], stop_early=True)
        assert sorted(seen) == [0, 3, 5]  # interaction 0 only: interaction 1 and the merge never ran
    torch.testing.assert_close(early[1], model.forward_intermediates(images, indices=[3])[1][0], rtol=0, atol=0)
    assert [x.shape[1] for x in first] == [9, 25, 49]  # the tokens after interaction 0


def test_features_only_is_timms_feature_getter():
    net = piip.create_model("piip_fmnist_tsb", features_only=True).eval()
    assert type(net) is FeatureGetterNet and isinstance(net.model, piip.PIIP)
    info = net.feature_info
    assert info.channels() == [32, 128, 64, 128]
    assert info.reduction() == pytest.approx([4, 4, 5.6, 28 / 3])
    assert info.module_name() == ["interactions.1.units.1.inject_a_to_b", "merge",
                                  "interactions.1.units.0.inject_a_to_b", "interactions.1.units.0.inject_b_to_a"]
    images = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        maps = net(images)
        pyramid = net.model(images)  # the wrapped model's own contract is untouched
    # the branches' grids (24, 40 and 56-pixel images at patch 4); round(), as 28/3 is no exact float
    assert [tuple(m.shape[1:]) for m in maps] == [(c, round(56 / r), round(56 / r))
                                                   for c, r in zip(info.channels(), info.reduction())]
    assert net.model.out_channels == 128 and list(pyramid) == ["0", "1", "2", "3"]

    vit = piip.create_model("vit_fmnist_b", features_only=True, out_indices=(0, -1), output_fmt="NLC")
    assert vit.feature_info.channels() == [128, 128] and vit.feature_info.reduction() == [4, 4]
    assert vit.feature_info.module_name() == ["branches.0.blocks.0", "branches.0.blocks.3"]
    assert [tuple(t.shape) for t in vit(torch.randn(1, 3, 28, 28))] == [(1, 49, 128)] * 2
    default = piip.create_model("vit_fmnist_b", features_only=True)  # timm's ViT default: the last 3 blocks
    assert default.feature_info.module_name() == [f"branches.0.blocks.{i}" for i in (1, 2, 3)]

    no_interactions = piip.create_model("piip_fmnist_tsb", interactions=0, features_only=True)
    assert no_interactions.feature_info.module_name() == ["branches.2.blocks.3", "merge", "branches.1.blocks.3",
                                                          "branches.0.blocks.3"]
    normed = piip.create_model("piip_fmnist_tsb", task="cls", class_token=True, cls_pool="class_token",
                               features_only=True, norm=True)
    assert normed.feature_info.channels() == [32, 64, 128]

    with torch.device("meta"):  # the paper's PIIP-TSB, as the README shows it
        tsb = piip.create_model("piip_tsb", features_only=True)
    assert tsb.feature_info.channels() == [192, 768, 384, 768] and tsb.feature_info.reduction() == [16, 16, 20, 40]


def test_errors_are_one_clear_message_each():
    model = piip.create_model("piip_fmnist_tsb")
    images = torch.randn(1, 3, 28, 28)
    with pytest.raises(ValueError, match=r"feature index 7 is out of range \(0 to 6\): piip_fmnist_tsb has 7 "):
        model.forward_intermediates(images, indices=[7])
    with pytest.raises(ValueError, match=r"last-n \(8\) is out of range \(1 to 7\)"):
        model.forward_intermediates(images, indices=8)
    with pytest.raises(ValueError, match=r"feature index -1 is out of range"):
        model.prune_intermediate_layers([-8])
    with pytest.raises(ValueError, match=r"feature index 9 is out of range"):
        piip.create_model("vit_fmnist_t", features_only=True, out_indices=[9])
    with pytest.raises(ValueError, match="output_fmt must be 'NCHW' or 'NLC', got 'NHWC'"):
        model.forward_intermediates(images, output_fmt="NHWC")
    with pytest.raises(ValueError, match="output_fmt must be 'NCHW' or 'NLC', got 'NHWC'"):
        piip.create_model("vit_fmnist_t", features_only=True, output_fmt="NHWC")
    with pytest.raises(ValueError, match="norm=True: the branches of piip_fmnist_tsb have no final token norm"):
        model.forward_intermediates(images, norm=True)
    with pytest.raises(ValueError, match="norm=True: the branches of vit_fmnist_t have no final token norm"):
        piip.create_model("vit_fmnist_t", task="cls", features_only=True, norm=True)  # avg pool: fc_norm only
    with pytest.raises(ValueError, match="configure features_only=True"):
        piip.create_model("vit_fmnist_t", out_indices=2)
    assert model.prune_intermediate_layers([0, -1]) == [0, 6]  # absolute indices; nothing pruned
