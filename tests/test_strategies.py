"""Training strategies (``run.strategy``): zero1 and fsdp train as ddp does, their sharded
checkpoints resume exactly and read back as the whole model, and what they refuse is named.

Every distributed run here shares one ``mp.spawn`` of 2 gloo processes (imports cost ~5 s a
process): the worker trains several runs in one process group, each in its own folder, and the
parent compares what they wrote.
"""
import datetime
import json
import os
import pickle
import shutil

import pytest
import torch
import torch.multiprocessing as mp

import piip
from piip import BranchConfig, InteractionConfig, PIIPConfig
from piip.engine import apply_overrides, train
from piip.engine.checkpoint import (latest_checkpoint, load_training_checkpoint, save_sharded_checkpoint)
from piip.weights.checkpoint import CheckpointError, read_checkpoint

from conftest import free_port, join_process_group
from test_engine import NUM_CLASSES, make_cfg, synthetic

# one epoch of 4 optimiser steps (32 samples, global batch 8), 2 micro-batches each, clipped
COMMON = ["optim.epochs=1", "optim.accum_steps=2", "optim.clip_grad=0.5", "model.drop_path_rate=0.1",
          "run.onednn_linears=false"]


def small_piip() -> dict:
    """Two branches, two interactions (one deformable unit each): ~140 tensors, so that every
    sharded save stays quick."""
    def branch(dim, res, heads):
        return BranchConfig(embed_dim=dim, depth=2, num_heads=heads, resolution=res,
                            interaction_indexes=((0, 0), (1, 1)), pretrain_img_size=res)
    return PIIPConfig(branches=(branch(64, 32, 4), branch(32, 64, 2)), task="cls", cls_pool="avg",
                      num_classes=NUM_CLASSES, interaction=InteractionConfig(num_heads=4, drop_path_rate=0.0)).to_dict()


def strategy_cfg(out_dir, *overrides):
    cfg = make_cfg(out_dir, *COMMON, *overrides)
    cfg.model.piip = small_piip()
    return cfg


def _runs(root: str) -> list[tuple[str, list[str], dict]]:
    """(name, overrides, how) of every run the worker trains, in order. ``val``: with the uneven
    9-sample validation set (5 + 4 samples: each process runs its own number of batches)."""
    return [
        ("ddp", ["run.strategy=ddp"], {"val": True}),
        ("zero1", ["run.strategy=zero1", "run.ema_decay=0.9"], {}),
        ("fsdp", ["run.strategy=fsdp"], {}),
        # killed after step 3 (its checkpoint written mid-epoch), then resumed from 'latest'
        ("fsdp_cut", ["run.strategy=fsdp", "run.save_every_steps=3", "run.halt_at_step=3"], {}),
        ("fsdp_cut", ["run.strategy=fsdp"], {"resume": True, "val": True}),
        ("zero1_cut", ["run.strategy=zero1", "run.ema_decay=0.9", "run.save_every_steps=3", "run.halt_at_step=3"], {}),
        ("zero1_cut", ["run.strategy=zero1", "run.ema_decay=0.9"], {"resume": True}),
        # bf16 (bfloat16 gathers, float32 gradient reduction) with activation checkpointing: 2 steps
        ("fsdp_bf16", ["run.strategy=fsdp", "run.amp=bf16", "run.grad_checkpointing=true", "run.halt_at_step=2"], {}),
        # refused before anything is built: another strategy, a .pt checkpoint into fsdp
        ("refused_strategy", ["run.strategy=zero1"], {"resume": f"{root}/fsdp_cut/checkpoints/step-00000003"}),
        ("refused_pt", ["run.strategy=fsdp"], {"resume": f"{root}/ddp"}),
    ]


def _worker(rank, world, port, root):
    join_process_group(rank, world, port)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world,
                                         timeout=datetime.timedelta(seconds=120))  # a hang fails, not waits
    results = {}
    try:
        for name, overrides, how in _runs(root):
            resume = how.get("resume")
            try:
                summary = train(strategy_cfg(f"{root}/{name}", *overrides), train_dataset=synthetic(32),
                                val_dataset=synthetic(9, seed=1) if how.get("val") else None, resume=resume)
            except ValueError as err:
                results[name] = {"error": str(err)}
                continue
            results.setdefault(name, {"step_losses": {}})["step_losses"].update(summary["step_losses"])
            results[name]["eval"] = summary["eval"]
        if rank == 0:
            with open(f"{root}/results.json", "w") as f:
                json.dump(results, f)
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("strategies")
    mp.spawn(_worker, args=(2, free_port(), str(root)), nprocs=2, join=True)
    results = json.loads((root / "results.json").read_text())
    return root, {name: {**r, "step_losses": {int(k): v for k, v in r.get("step_losses", {}).items()}}
                  for name, r in results.items()}


def _records(run_dir, key):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in records if r["kind"] == "train"]


def _weights(path):
    return read_checkpoint(path)["state_dict"]


def _assert_same_weights(a, b, atol):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=atol, msg=key)


def test_zero1_and_fsdp_train_as_ddp_does(runs):
    """Same per-step losses, gradient norms (before clipping) and final weights as ddp: zero1
    bit-exact (the same gradients and the same AdamW per parameter), fsdp to float32 rounding
    (its gradients are reduce-scattered per micro-batch, in another order of sums)."""
    root, r = runs
    ddp = r["ddp"]["step_losses"]
    assert sorted(ddp) == [1, 2, 3, 4]
    assert r["zero1"]["step_losses"] == ddp
    assert r["fsdp"]["step_losses"] == pytest.approx(ddp, rel=1e-5, abs=0)
    norms = _records(root / "ddp", "grad_norm")
    assert len(norms) == 4 and all(n > 0.5 for n in norms)  # clipping acts at every step
    assert _records(root / "zero1", "grad_norm") == norms
    assert _records(root / "fsdp", "grad_norm") == pytest.approx(norms, rel=1e-5)
    ddp_weights = _weights(root / "ddp" / "model.safetensors")
    _assert_same_weights(_weights(root / "zero1" / "model.safetensors"), ddp_weights, atol=0)
    _assert_same_weights(_weights(root / "fsdp" / "model.safetensors"), ddp_weights, atol=1e-5)
    # evaluation of the uneven validation set under fsdp (at the end of the resumed run): each process
    # runs its own number of batches
    assert r["fsdp_cut"]["eval"]["num_samples"] == r["ddp"]["eval"]["num_samples"] == 9
    assert r["fsdp_cut"]["eval"]["loss"] == pytest.approx(r["ddp"]["eval"]["loss"], rel=1e-4)
    # bf16 with activation checkpointing trains the same model within bfloat16's precision
    assert r["fsdp_bf16"]["step_losses"] == pytest.approx({k: ddp[k] for k in (1, 2)}, rel=3e-2)


def test_sharded_checkpoints_resume_exactly(runs):
    """Killed after step 3 and resumed from its sharded checkpoint: the same steps, bit for bit
    (the same data order, RNG states, optimiser state and sums as the uninterrupted run)."""
    root, r = runs
    for name in ("fsdp", "zero1"):
        assert r[f"{name}_cut"]["step_losses"] == r[name]["step_losses"], name
        _assert_same_weights(_weights(root / f"{name}_cut" / "model.safetensors"),
                             _weights(root / name / "model.safetensors"), atol=0)
    _assert_same_weights(_weights(root / "zero1_cut" / "model_ema.safetensors"),  # zero1 keeps an EMA
                         _weights(root / "zero1" / "model_ema.safetensors"), atol=0)
    for name in ("fsdp", "zero1"):
        # the layout: step folders, 'latest' naming the last, no temporary folder left
        checkpoints = root / f"{name}_cut" / "checkpoints"
        best = ["best"] if name == "fsdp" else []  # the evaluation at its end made one
        assert sorted(p.name for p in checkpoints.iterdir()) == [*best, "latest", "step-00000003", "step-00000004"]
        assert latest_checkpoint(checkpoints) == checkpoints / "step-00000004"
        state = load_training_checkpoint(root / f"{name}_cut")
        assert state["step"] == 4 and state["world_size"] == 2 and state["strategy"] == name
        assert len(state["rng"]) == 2


def test_piip_load_reads_a_sharded_folder_as_the_whole_model(runs):
    root, _ = runs
    for name in ("fsdp", "zero1"):
        exported = _weights(root / name / "model.safetensors")
        model = piip.load(root / name / "checkpoints" / "step-00000004")
        assert model.config.num_classes == NUM_CLASSES and not model.training
        assert model.class_names == ("c0", "c1", "c2", "c3")  # the task's header strings, as in its export
        _assert_same_weights(model.state_dict(), exported, atol=0)
        _assert_same_weights(model.state_dict(), _weights(root / "ddp" / "model.safetensors"), atol=1e-5)
    best = piip.load(root / "fsdp_cut" / "checkpoints" / "best")
    _assert_same_weights(best.state_dict(), _weights(root / "fsdp" / "model.safetensors"), atol=0)


def test_what_is_refused(runs, tmp_path):
    root, r = runs
    assert r["refused_strategy"]["error"].startswith(
        f"the sharded checkpoint '{root}/fsdp_cut/checkpoints/step-00000003' was written under run.strategy=fsdp "
        "by 2 processes; resume it with the same strategy and world size (got run.strategy=zero1 with 2 processes)")
    assert "the checkpoint is a .pt file, written under run.strategy=ddp or by one process" in r["refused_pt"]["error"]
    # another world size: one process resumes a 2-process fsdp checkpoint
    with pytest.raises(ValueError, match=r"written under run.strategy=fsdp by 2 processes; resume it with the same "
                                         r"strategy and world size \(got run.strategy=fsdp with 1 process\)"):
        train(strategy_cfg(tmp_path / "one", "run.strategy=fsdp"), train_dataset=synthetic(32),
              resume=str(root / "fsdp_cut"))
    cfg = strategy_cfg(tmp_path / "x")
    with pytest.raises(ValueError, match=r"^run.strategy='foo': expected 'ddp', 'zero1' or 'fsdp'$"):
        apply_overrides(cfg, ["run.strategy=foo"]).validate()
    for overrides, field in ((["run.ema_decay=0.9"], "run.ema_decay=0.9 is not supported with run.strategy=fsdp"),
                             (["run.compile=true"], "run.compile=true is not supported with run.strategy=fsdp"),
                             (["run.amp=fp16"], "run.amp='fp16' is not supported with run.strategy=fsdp")):
        with pytest.raises(ValueError, match=field):
            apply_overrides(strategy_cfg(tmp_path / "x"), ["run.strategy=fsdp", *overrides]).validate()
    # piip.load of folders that are not (whole) piip checkpoints
    with pytest.raises(CheckpointError, match="is a folder but not a piip checkpoint: it holds no piip.json"):
        piip.load(tmp_path)
    broken = tmp_path / "broken"
    shutil.copytree(root / "fsdp" / "checkpoints" / "step-00000004", broken)
    (broken / "__1_0.distcp").unlink()
    with pytest.raises(CheckpointError, match=r"is missing shard file\(s\) \['__1_0.distcp'\]"):
        piip.load(broken)
    # DCP's metadata is a pickle: read through an allowlist, nothing from the file runs
    marker = tmp_path / "ran"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (broken / ".metadata").write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(CheckpointError, match="refusing to read the DCP metadata: it refers to io.open"):
        piip.load(broken)
    assert not marker.exists()


def test_a_sharded_save_is_atomic(tmp_path, monkeypatch):
    """One process (no process group): a save killed mid-write leaves 'latest' at the previous
    folder; a step saved again replaces its folder with 'latest' naming a complete one throughout."""
    import torch.distributed.checkpoint as dcp

    def state(step):
        return {"model": {"w": torch.full((3,), float(step))}, "optimizer": {"state": {}, "param_groups": []},
                "step": step, "world_size": 1, "strategy": "fsdp"}

    save_sharded_checkpoint(tmp_path, state(1), "step-00000001", keep=2)
    real_save = dcp.save

    def killed(*args, **kwargs):
        real_save(*args, **kwargs)  # the shards are written, the folder is not complete yet
        raise KeyboardInterrupt("killed during save")

    monkeypatch.setattr(dcp, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        save_sharded_checkpoint(tmp_path, state(2), "step-00000002", keep=2)
    monkeypatch.setattr(dcp, "save", real_save)
    assert latest_checkpoint(tmp_path) == tmp_path / "step-00000001"
    assert load_training_checkpoint(tmp_path)["step"] == 1
    for step in (2, 3):
        save_sharded_checkpoint(tmp_path, state(step), f"step-{step:08d}", keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000002", "step-00000003"]
    # step 3 saved again (a resumed run): while the new folder is renamed into place 'latest' names the
    # complete temporary folder, and resolves to its final name once renamed
    real_rename = os.rename

    def rename(source, target):
        if os.path.basename(source) == ".step-00000003.tmp":
            raise KeyboardInterrupt("killed before the rename")
        real_rename(source, target)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        save_sharded_checkpoint(tmp_path, state(3), "step-00000003", keep=2)
    monkeypatch.undo()
    assert (tmp_path / "latest").read_text().strip() == ".step-00000003.tmp"
    assert latest_checkpoint(tmp_path) == tmp_path / ".step-00000003.tmp"
    (tmp_path / ".step-00000003.tmp").rename(tmp_path / "step-00000003")  # the rename, then the kill
    assert latest_checkpoint(tmp_path) == tmp_path / "step-00000003"
    assert load_training_checkpoint(tmp_path)["step"] == 3
    # killed before the rename once more: the next save of that step completes the interrupted one first
    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        save_sharded_checkpoint(tmp_path, state(3), "step-00000003", keep=2)
    monkeypatch.undo()
    save_sharded_checkpoint(tmp_path, state(3), "step-00000003", keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000002", "step-00000003"]
    assert load_training_checkpoint(tmp_path)["step"] == 3
