"""piip's own checkpoint format (``piip.weights.checkpoint``)."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from piip import PIIP, PIIPConfig
from piip.weights import (CheckpointError, check_state_dict, load_checkpoint, load_state_dict_checked,
                          read_checkpoint, save_checkpoint)

from conftest import tiny_config


def _model(task: str = "det", **kw) -> PIIP:
    model = PIIP(tiny_config(task, **kw)).eval()
    with torch.no_grad():  # make every parameter non-trivial (gates start at zero)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _outputs(out):
    return list(out.values()) if isinstance(out, dict) else [out]


@pytest.mark.parametrize("task", ["det", "cls"])
def test_roundtrip_is_bit_exact(task, tmp_path):
    kw = dict(cls_pool="first_patch", num_classes=7) if task == "cls" else {}
    if task == "cls":
        kw.update(b1=dict(class_token=True), b2=dict(class_token=True), b3=dict(class_token=True))
    model = _model(task, **kw)
    path = save_checkpoint(model, tmp_path / "m.safetensors")
    loaded = load_checkpoint(path)
    assert isinstance(loaded, PIIP) and not loaded.training
    assert loaded.config == model.config
    a, b = model.state_dict(), loaded.state_dict()
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        for u, v in zip(_outputs(model(x)), _outputs(loaded(x))):
            assert torch.equal(u, v)


def test_config_and_metadata_are_stored(tmp_path):
    model = _model(b2=dict(window_size=3, window_block_indexes=(0, 1), window_padding="after_qkv"))
    path = save_checkpoint(model, tmp_path / "m.safetensors", metadata={"source": "x.pth"})
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == "piip" and meta["source"] == "x.pth"
    assert PIIPConfig.from_dict(json.loads(meta["config"])) == model.config
    assert json.loads(meta["config"])["branches"][1]["window_padding"] == "after_qkv"
    data = read_checkpoint(path)
    assert data["config"] == model.config and data["extra"] == {}
    assert data["metadata"]["source"] == "x.pth"
    assert len(data["state_dict"]) == len(model.state_dict())
    header = read_checkpoint(path, tensors=False)  # what a caller decides on before loading
    assert header["kind"] == "piip" and header["config"] == model.config and header["metadata"] == data["metadata"]
    assert header["state_dict"] == {} and header["extra"] == {}


def test_extra_tensors_keep_their_prefixes(tmp_path):
    model = _model()
    neck = {"lateral_convs.0.conv.weight": torch.randn(256, 64, 1, 1)}
    extra = {"neck": neck, "rpn_head.rpn_cls.weight": torch.randn(3, 256, 1, 1)}
    path = save_checkpoint(model, tmp_path / "m.safetensors", extra=extra)
    loaded, got = load_checkpoint(path, return_extra=True)
    assert set(got) == {"neck", "rpn_head"}
    assert torch.equal(got["neck"]["lateral_convs.0.conv.weight"], neck["lateral_convs.0.conv.weight"])
    assert torch.equal(got["rpn_head"]["rpn_cls.weight"], extra["rpn_head.rpn_cls.weight"])
    assert set(loaded.state_dict()) == set(model.state_dict())
    with pytest.raises(ValueError, match="collide"):
        save_checkpoint(model, tmp_path / "bad.safetensors", extra={"merge": {"x": torch.zeros(1)}})
    with pytest.raises(ValueError, match="prefix"):
        save_checkpoint(model, tmp_path / "bad.safetensors", extra={"x": torch.zeros(1)})
    with pytest.raises(ValueError, match="reserved"):
        save_checkpoint(model, tmp_path / "bad.safetensors", metadata={"config": "{}"})


def test_load_into_another_variant_names_the_key_and_both_shapes(tmp_path):
    path = save_checkpoint(_model(), tmp_path / "m.safetensors")
    other = PIIP(tiny_config())
    # same layout: loads
    load_checkpoint(path, model=other)
    wider = PIIP(dataclasses.replace(other.config, branches=(
        other.config.branches[0], dataclasses.replace(other.config.branches[1], embed_dim=64, num_heads=2),
        other.config.branches[2])))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, model=wider)
    key, got, want = info.value.mismatched[0]
    assert key.startswith("branches.1.") and got[-1] == 32 and want[-1] == 64
    assert repr(key) in str(info.value) and str(list(got)) in str(info.value) and str(list(want)) in str(info.value)


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    model = _model()
    path = save_checkpoint(model, tmp_path / "m.safetensors")
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    del tensors["fpn.fpn2.0.bias"]
    tensors["branches.0.blocks.0.attn.bogus"] = torch.zeros(2)
    broken = tmp_path / "broken.safetensors"
    save_file(tensors, str(broken), metadata=meta)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(broken)
    assert info.value.missing == ["fpn.fpn2.0.bias"]
    assert info.value.unexpected == ["branches.0.blocks.0.attn.bogus"]
    assert "fpn.fpn2.0.bias" in str(info.value) and "attn.bogus" in str(info.value)


def test_corrupt_truncated_and_foreign_files(tmp_path):
    path = save_checkpoint(_model(), tmp_path / "m.safetensors")
    data = open(path, "rb").read()
    for cut in (4, 100, len(data) // 2, len(data) - 1):
        truncated = tmp_path / f"cut{cut}.safetensors"
        truncated.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="corrupt or truncated"):
            load_checkpoint(truncated)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\xff" * 1000)
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(garbage)
    plain = tmp_path / "plain.safetensors"
    save_file({"a": torch.zeros(2)}, str(plain))
    with pytest.raises(CheckpointError, match="not a piip checkpoint"):
        load_checkpoint(plain)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.safetensors")


def test_check_state_dict_helpers():
    model = _model()
    sd = model.state_dict()
    check_state_dict(sd, model)
    load_state_dict_checked(model, sd)
    bad = dict(sd)
    bad["merge.weights"] = torch.ones(4)
    with pytest.raises(CheckpointError, match=r"'merge.weights' has shape \[4\].*\[3\]"):
        check_state_dict(bad, model)


def test_shared_and_strided_tensors_are_saved(tmp_path):
    model = _model()
    with torch.no_grad():  # tie two parameters and make one non-contiguous-view-backed
        model.branches[1].blocks[0].norm1.weight = model.branches[1].blocks[0].norm2.weight
    extra = {"neck": {"t": torch.randn(4, 6).t()}}
    path = save_checkpoint(model, tmp_path / "m.safetensors", extra=extra)
    loaded, got = load_checkpoint(path, return_extra=True)
    assert torch.equal(got["neck"]["t"], extra["neck"]["t"])
    assert torch.equal(loaded.branches[1].blocks[0].norm1.weight, model.branches[1].blocks[0].norm2.weight)
