"""create_model wiring: branch_weights=, pretrained=, checkpoint=."""
import time

import pytest
import torch
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer

import piip
from piip.models import registry
from piip.weights import HubUnavailableError
from conftest import tiny_config


@pytest.fixture(autouse=True)
def tiny_variant(monkeypatch):
    """A tiny registered variant, visible only inside these tests."""
    registry.list_models()  # load the paper's variants first
    monkeypatch.setitem(registry._VARIANTS, "tiny_for_factory_tests", lambda task: tiny_config(task=task))


def test_branch_weights_load_a_local_timm_file(tmp_path):
    source = VisionTransformer(img_size=64, patch_size=16, embed_dim=64, depth=2, num_heads=4,
                               num_classes=0, init_values=1.0, no_embed_class=True, class_token=False,
                               global_pool="avg")
    path = tmp_path / "branch1.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    model = piip.create_model("tiny_for_factory_tests", branch_weights={"branch1": path})
    torch.testing.assert_close(model.branches[0].blocks[1].mlp.fc2.weight, source.blocks[1].mlp.fc2.weight)
    torch.testing.assert_close(model.branches[0].pos_embed, source.pos_embed)
    assert "branch2" in str(model.pretrained_report)  # the other branches are reported as skipped


def test_pretrained_without_network_fails_fast_with_instructions(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises((HubUnavailableError, ValueError)) as error:
        piip.create_model("tiny_for_factory_tests", pretrained=True)
    assert time.perf_counter() - start < 5
    assert "branch_weights" in str(error.value)


def test_checkpoint_round_trip_through_create_model_and_load(tmp_path):
    model = piip.create_model("tiny_for_factory_tests").eval()
    for name, p in model.named_parameters():
        if name.endswith(("ca_gamma", "cffn_gamma")):
            torch.nn.init.normal_(p, std=0.1)
    path = tmp_path / "tiny.safetensors"
    piip.save(model, path)
    images = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        expected = model(images)
        for restored in (piip.create_model("tiny_for_factory_tests", checkpoint=path), piip.load(path)):
            for key, value in restored(images).items():
                assert torch.equal(value, expected[key])


def test_checkpoint_and_branch_weights_are_exclusive(tmp_path):
    with pytest.raises(ValueError, match="not both"):
        piip.create_model("tiny_for_factory_tests", checkpoint=tmp_path / "x", branch_weights={"branch1": "y"})
