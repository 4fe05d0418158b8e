"""The PIIP model: shapes, equality with timm, window attention, interactions, bad input."""
import dataclasses
import math
import resource
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

import piip
from piip import InteractionConfig, PIIPConfig
from piip.layers.branch import window_attention
from conftest import tiny_branch, tiny_config


def test_det_forward_backward_shapes():
    model = piip.PIIP(tiny_config(task="det"))
    images = torch.randn(2, 3, 128, 160)
    out = model(images)
    assert list(out) == ["0", "1", "2", "3"]
    # finest branch: 128x160 at patch 16 -> 8x10 tokens at stride 16
    assert [tuple(v.shape) for v in out.values()] == [(2, 64, 32, 40), (2, 64, 16, 20), (2, 64, 8, 10), (2, 64, 4, 5)]
    assert model.out_channels == 64 and model.strides == (4, 8, 16, 32)
    sum(v.float().pow(2).mean() for v in out.values()).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None for g in grads.values()), [n for n, g in grads.items() if g is None]
    # zero-initialised gates still receive gradient, so interactions can learn
    gate = model.interactions[0].units[0].inject_b_to_a.ca_gamma
    assert gate.grad.abs().sum() > 0


def test_cls_forward_backward():
    config = tiny_config(task="cls", num_classes=7, cls_pool="class_token",
                         b1={"class_token": True}, b2={"class_token": True}, b3={"class_token": True})
    model = piip.PIIP(config)
    logits = model(torch.randn(2, 3, 128, 128))
    assert logits.shape == (2, 7)
    logits.sum().backward()
    assert model.branches[0].cls_token.grad is not None


def test_cls_logits_are_the_mean_of_branch_heads():
    config = tiny_config(task="cls", num_classes=5, cls_pool="avg")
    model = piip.PIIP(config).eval()
    images = torch.randn(1, 3, 128, 128)
    tokens, _ = model.forward_tokens(images)
    expected = sum(b.head(b.fc_norm(x.mean(1))) for b, x in zip(model.branches, tokens)) / 3
    torch.testing.assert_close(model(images), expected)


def test_merged_classifier_head():
    config = tiny_config(task="cls", cls_head="merged", num_classes=4)
    model = piip.PIIP(config)
    assert model(torch.randn(2, 3, 128, 128)).shape == (2, 4)
    assert not hasattr(model.branches[0], "head")


def _timm_twin(branch) -> VisionTransformer:
    c = branch.config
    vit = VisionTransformer(img_size=c.pretrain_img_size, patch_size=c.patch_size, num_classes=0,
                            embed_dim=c.embed_dim, depth=c.depth, num_heads=c.num_heads, class_token=False,
                            no_embed_class=True, global_pool="avg", final_norm=False, init_values=c.init_values,
                            norm_layer=torch.nn.LayerNorm)
    for block in vit.blocks:  # timm's default eps is 1e-6 through its own partial; match ours explicitly
        block.norm1.eps = block.norm2.eps = 1e-6
    missing, unexpected = vit.load_state_dict(branch.state_dict(), strict=False)
    assert not unexpected and not [k for k in missing if not k.startswith(("norm", "head", "fc_norm"))]
    return vit.eval()


def test_zero_gates_branch_tokens_equal_timm_forward_features():
    model = piip.PIIP(tiny_config(task="det")).eval()
    # the interactions are live modules: give them non-zero weights so only the gates keep them out
    for unit in model.interactions.modules():
        if isinstance(unit, torch.nn.Linear):
            torch.nn.init.normal_(unit.weight, std=0.5)
    images = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        tokens, grids = model.forward_tokens(images)
        for branch, image, x in zip(model.branches, model.pyramid(images), tokens):
            expected = _timm_twin(branch).forward_features(image)
            torch.testing.assert_close(x, expected, rtol=1e-5, atol=1e-5)
        # and with open gates the tokens do change
        for name, p in model.named_parameters():
            if name.endswith(("ca_gamma", "cffn_gamma")):
                p.fill_(0.5)
        changed, _ = model.forward_tokens(images)
    assert all((a - b).abs().max() > 1e-3 for a, b in zip(changed, tokens))


def test_avg_pool_classifier_is_timms_avg_pool_vit():
    """A single-branch avg-pool classifier is timm's average-pooling ViT: mean of the patch tokens,
    then the final LayerNorm (``fc_norm``), then the head."""
    config = piip.PIIPConfig(branches=(tiny_branch(32, 64, groups=()),), task="cls", num_classes=5,
                             cls_pool="avg")
    model = piip.PIIP(config).eval()
    assert isinstance(model.branches[0].fc_norm, torch.nn.LayerNorm)
    torch.nn.init.normal_(model.branches[0].fc_norm.weight, mean=1.0, std=0.3)
    c = config.branches[0]
    vit = VisionTransformer(img_size=c.pretrain_img_size, patch_size=c.patch_size, num_classes=5,
                            embed_dim=c.embed_dim, depth=c.depth, num_heads=c.num_heads, class_token=False,
                            no_embed_class=True, global_pool="avg", init_values=c.init_values,
                            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6)).eval()
    vit.load_state_dict({k.removeprefix("branches.0."): v for k, v in model.state_dict().items()})
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(images), vit(images), rtol=1e-5, atol=1e-5)


def _reference_window_attention(attn, x, hw, window):
    """Independent float64 reference: pad tokens, qkv with bias, softmax per window, crop."""
    B, N, C = x.shape
    H, W = hw
    heads = attn.num_heads
    Hp, Wp = math.ceil(H / window) * window, math.ceil(W / window) * window
    grid = torch.zeros(B, Hp, Wp, C, dtype=x.dtype)
    grid[:, :H, :W] = x.view(B, H, W, C)
    out = torch.zeros(B, Hp, Wp, C, dtype=x.dtype)
    for b in range(B):
        for wy in range(0, Hp, window):
            for wx in range(0, Wp, window):
                tokens = grid[b, wy:wy + window, wx:wx + window].reshape(-1, C)
                qkv = tokens @ attn.qkv.weight.T + attn.qkv.bias
                q, k, v = qkv.split(C, dim=-1)
                res = []
                for h in range(heads):
                    sl = slice(h * C // heads, (h + 1) * C // heads)
                    a = torch.softmax(q[:, sl] @ k[:, sl].T / math.sqrt(C // heads), dim=-1)
                    res.append(a @ v[:, sl])
                y = torch.cat(res, -1) @ attn.proj.weight.T + attn.proj.bias
                out[b, wy:wy + window, wx:wx + window] = y.view(window, window, C)
    return out[:, :H, :W].reshape(B, H * W, C)


@pytest.mark.parametrize("hw,window", [((7, 10), 4), ((4, 6), 3), ((6, 6), 3)])
def test_window_attention_pads_before_qkv(hw, window):
    from timm.layers.attention import Attention

    attn = Attention(16, num_heads=2, qkv_bias=True).double()
    torch.nn.init.normal_(attn.qkv.bias, std=1.0)
    x = torch.randn(2, hw[0] * hw[1], 16, dtype=torch.float64)
    torch.testing.assert_close(window_attention(attn, x, hw, window), _reference_window_attention(attn, x, hw, window))


def _reference_block_attention(attn, x, hw, window, padding):
    """Float64 reference of one attention call: global when ``window`` is None, else windowed with
    zero padding of the tokens (``before_qkv``: padded q/k/v = qkv bias) or of the qkv output
    (``after_qkv``: padded q/k/v = 0); no mask either way."""
    B, N, C = x.shape
    H, W = hw
    heads, d = attn.num_heads, C // attn.num_heads
    ws_h, ws_w = (H, W) if window is None else (window, window)
    Hp, Wp = math.ceil(H / ws_h) * ws_h, math.ceil(W / ws_w) * ws_w
    qkv_grid = torch.zeros(B, Hp, Wp, 3 * C, dtype=x.dtype)
    if padding == "before_qkv":
        qkv_grid[:] = attn.qkv.bias
    qkv_grid[:, :H, :W] = (x @ attn.qkv.weight.T + attn.qkv.bias).view(B, H, W, 3 * C)
    out = torch.zeros(B, Hp, Wp, C, dtype=x.dtype)
    for b in range(B):
        for wy in range(0, Hp, ws_h):
            for wx in range(0, Wp, ws_w):
                q, k, v = qkv_grid[b, wy:wy + ws_h, wx:wx + ws_w].reshape(-1, 3 * C).split(C, dim=-1)
                res = [torch.softmax(q[:, h * d:(h + 1) * d] @ k[:, h * d:(h + 1) * d].T / math.sqrt(d), -1)
                       @ v[:, h * d:(h + 1) * d] for h in range(heads)]
                y = torch.cat(res, -1) @ attn.proj.weight.T + attn.proj.bias
                out[b, wy:wy + ws_h, wx:wx + ws_w] = y.view(ws_h, ws_w, C)
    return out[:, :H, :W].reshape(B, H * W, C)


@pytest.mark.parametrize("padding", ["before_qkv", "after_qkv"])
def test_per_block_window_sizes_match_a_float64_reference(padding):
    from piip.layers.branch import ViTBranch

    windows = (2, 2, None, 4, 4, None)
    config = piip.BranchConfig(embed_dim=16, depth=6, num_heads=2, resolution=112, pretrain_img_size=112,
                               window_size=windows, window_padding=padding)
    assert config.window_sizes == windows and config.window_block_indexes == (0, 1, 3, 4)
    branch = ViTBranch(config).double().eval()
    for name, p in branch.named_parameters():
        if name.endswith("qkv.bias"):
            torch.nn.init.normal_(p, std=1.0)  # padded keys/values show up only through the bias
    hw = (7, 5)  # 7x5 tokens: windows 2 and 4 both need padding
    x = torch.randn(2, 35, 16, dtype=torch.float64)
    expected = x
    for block, window in zip(branch.blocks, windows):
        y = _reference_block_attention(block.attn, block.norm1(expected), hw, window, padding)
        expected = expected + block.ls1(y)
        expected = expected + block.ls2(block.mlp(block.norm2(expected)))
    with torch.no_grad():
        torch.testing.assert_close(branch.forward_blocks(x, hw, 0, 5), expected, rtol=1e-10, atol=1e-10)
        # the same weights with one window size everywhere compute something else
        other = ViTBranch(dataclasses.replace(config, window_size=2)).double().eval()
        other.load_state_dict(branch.state_dict())
        assert (other.forward_blocks(x, hw, 0, 5) - expected).abs().max() > 1e-3


def test_window_size_forms_and_errors():
    make = partial(piip.BranchConfig, embed_dim=32, depth=3, num_heads=2, resolution=64)
    # a per-block tuple with one size is stored in the int form: one network, one config
    assert make(window_size=(3, None, 3)) == make(window_size=3, window_block_indexes=(0, 2))
    assert make(window_size=[None, None, None]) == make()
    assert make(window_size=5, window_block_indexes=(1,)).window_sizes == (None, 5, None)
    roundtrip = PIIPConfig(branches=(make(window_size=(2, None, 4)),))
    assert PIIPConfig.from_dict(roundtrip.to_dict()) == roundtrip
    with pytest.raises(ValueError, match="2 entries for 3 blocks"):
        make(window_size=(2, 2))
    with pytest.raises(ValueError, match="positive ints or None"):
        make(window_size=(2, 0, None))
    with pytest.raises(ValueError, match="disagree"):
        make(window_size=(2, None, 4), window_block_indexes=(0,))
    with pytest.raises(ValueError, match="positive int"):
        make(window_size=0, window_block_indexes=(0,))


def test_windowed_branch_runs_and_differs_from_global():
    config = tiny_config(b3={"window_block_indexes": (0, 1), "window_size": 3})
    model = piip.PIIP(config).eval()
    glob = piip.PIIP(dataclasses.replace(config, branches=config.branches[:2] + (
        dataclasses.replace(config.branches[2], window_block_indexes=()),))).eval()
    glob.load_state_dict(model.state_dict())
    images = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        a, _ = model.forward_tokens(images)
        b, _ = glob.forward_tokens(images)
    torch.testing.assert_close(a[0], b[0])  # branch 1 is global in both
    assert (a[2] - b[2]).abs().max() > 1e-3


def test_interaction_units_read_pre_update_partner_tokens():
    unit = piip.models.piip.Interaction([64, 32], InteractionConfig(num_heads=4, drop_path_rate=0.0)).units[0]
    for p in unit.parameters():
        torch.nn.init.normal_(p, std=0.2)
    xa, xb = torch.randn(1, 16, 64), torch.randn(1, 36, 32)
    new_a, new_b = unit(xa, (4, 4), xb, (6, 6))
    # b's update must depend on the OLD a: recompute the b direction from xa directly
    expected_b = unit.inject_a_to_b(xb, (6, 6), unit.proj_a_to_b(xa), (4, 4))
    torch.testing.assert_close(new_b, expected_b)


def test_interaction_order_is_finest_pair_first():
    model = piip.PIIP(tiny_config())
    calls = []
    for i, unit in enumerate(model.interactions[0].units):
        unit.register_forward_hook(lambda m, args, out, i=i: calls.append(i))
    model(torch.randn(1, 3, 128, 128))
    assert calls[:2] == [1, 0]


def test_zero_interactions_variant_has_no_interaction_modules():
    config = tiny_config().with_interactions(0)
    model = piip.PIIP(config)
    assert len(model.interactions) == 0
    assert model(torch.randn(1, 3, 128, 128))["2"].shape == (1, 64, 8, 8)


def test_regular_cross_attention_variant_runs():
    config = dataclasses.replace(tiny_config(), interaction=InteractionConfig(attn_type="regular", num_heads=4))
    out = piip.PIIP(config)(torch.randn(1, 3, 128, 128))
    assert out["0"].shape == (1, 64, 32, 32)


def test_no_proj_no_norm_interactions():
    config = dataclasses.replace(tiny_config(), interaction=InteractionConfig(with_proj=False, with_norm=False, num_heads=4))
    model = piip.PIIP(config)
    unit = model.interactions[0].units[0]
    assert unit.proj_a_to_b is None and isinstance(unit.inject_b_to_a.query_norm, torch.nn.Identity)
    # value input width is the partner's width without the projection
    assert unit.inject_b_to_a.attn.value_proj.in_features == 32
    model(torch.randn(1, 3, 128, 128))


def test_sizes_not_multiple_of_patch_are_floored():
    model = piip.PIIP(tiny_config()).eval()
    images = torch.randn(1, 3, 130, 150)
    with torch.no_grad():
        _, grids = model.forward_tokens(images)
        # branch images: floor(130*64/128)=65 -> 4 tokens; floor(130*96/128)=97 -> 6; 130 -> 8
        assert grids == [(4, 4), (6, 7), (8, 9)]
        # the ignored bottom/right remainder does not reach the finest branch (gates are still zero,
        # so the coarser branches, which see the resized remainder, do not leak it in)
        cropped = images.clone()
        cropped[..., 128:, :] = 0
        cropped[..., :, 144:] = 0
        a, _ = model.forward_tokens(images)
        b, _ = model.forward_tokens(cropped)
    torch.testing.assert_close(a[2], b[2])
    assert model(images)["2"].shape == (1, 64, 8, 9)


def test_pyramid_uses_scale_factor_semantics():
    model = piip.PIIP(tiny_config())
    images = torch.randn(1, 3, 128, 160)
    pyramid = model.pyramid(images)
    expected = F.interpolate(images, scale_factor=0.5, mode="bilinear", align_corners=False)
    torch.testing.assert_close(pyramid[0], expected)
    assert pyramid[1].shape[-2:] == (96, 120) and pyramid[2] is images


@pytest.mark.parametrize("images,match", [
    (torch.randn(1, 1, 128, 128), "3 channels"),
    (torch.randn(3, 128, 128), r"\(B, C, H, W\)"),
    (torch.randn(1, 3, 16, 128), "too small"),
])
def test_bad_images_raise(images, match):
    with pytest.raises(ValueError, match=match):
        piip.PIIP(tiny_config())(images)


def test_images_too_small_for_the_pyramids_coarsest_level_raise():
    # piip_fmnist_tsb: patch 4, coarsest branch 12/28: 28 px passes the branch check, but the
    # stride-32 level would max-pool the 7x7 patch grid by 8 to nothing
    model = piip.create_model("piip_fmnist_tsb", task="det")
    with pytest.raises(ValueError, match="stride-32 level pools the 4-pixel patch grid by 8, so each side must be >= 32"):
        model(torch.randn(1, 3, 28, 28))
    assert model(torch.randn(1, 3, 32, 32))["3"].shape[-2:] == (1, 1)
    assert piip.create_model("piip_fmnist_tsb", task="cls")(torch.randn(1, 3, 28, 28)).shape == (1, 10)


def test_bad_configs_raise():
    with pytest.raises(ValueError, match="same number of interaction_indexes"):
        PIIPConfig(branches=(tiny_branch(64, 64, heads=4), tiny_branch(32, 128, groups=((0, 1),))))
    with pytest.raises(ValueError, match="divisible by 32"):
        PIIPConfig(branches=(tiny_branch(48, 64, heads=4), tiny_branch(32, 128)))
    with pytest.raises(ValueError, match="not divisible by interaction num_heads"):
        PIIPConfig(branches=(tiny_branch(64, 64, heads=4), tiny_branch(40, 128, heads=2)))
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        tiny_branch(30, 64, heads=4)
    with pytest.raises(ValueError, match="contiguous"):
        tiny_branch(32, 64, groups=((0, 0), (2, 2)), depth=3)
    with pytest.raises(ValueError, match="A/B/C"):
        tiny_config().with_resolutions("1120/eight/448")
    with pytest.raises(ValueError, match="3 branches"):
        tiny_config().with_resolutions("1120/448")


def test_grad_checkpointing_matches():
    model = piip.PIIP(tiny_config())
    images = torch.randn(1, 3, 128, 128)
    ref = sum(v.sum() for v in model(images).values())
    ref.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    out = sum(v.sum() for v in model(images).values())
    out.backward()
    torch.testing.assert_close(out, ref)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], msg=n)


def test_initialisation_follows_the_original():
    model = piip.PIIP(tiny_config())
    inj = model.interactions[0].units[0].inject_b_to_a
    assert torch.all(inj.ca_gamma == 0) and torch.all(inj.cffn_gamma == 0)
    dw = inj.ffn.dwconv
    assert abs(dw.weight.std().item() - math.sqrt(2 / 9)) < 0.15
    assert torch.all(model.merge.weights == 1)
    assert torch.all(inj.attn.attention_weights.weight == 0)


def test_meta_device_build_costs_no_memory():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.device("meta"):
        model = piip.create_model("piip_h6b")
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    n = sum(p.numel() for p in model.parameters())
    assert n > 6e9 and all(p.is_meta for p in model.parameters())
    assert grown_mb < 500, f"meta build grew RSS by {grown_mb:.0f} MiB"



@pytest.mark.parametrize("onednn", [False, True])
def test_torch_compile_sees_the_backbone_as_one_graph(onednn):
    """No graph break in a PIIP forward (inference at a resized position embedding, the case of the
    cache, and with either dense-layer route): a break splits the model into frames that dynamo
    recompiles per branch shape until it gives up and runs them eagerly."""
    from piip.ops import use_onednn_linears

    model = use_onednn_linears(piip.create_model(tiny_config(task="det")).eval(), onednn)
    size = model.config.input_size
    x = torch.randn(1, 3, size + 32, size + 32)  # not the stored grid: the position embedding is resized
    with torch.no_grad():
        explained = torch._dynamo.explain(model)(x)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
