"""Training engine: parameter groups, exact kill-and-resume, atomic checkpoints, DDP equivalence,
and a tiny end-to-end run."""
import json
import math

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch.utils.data import TensorDataset

from piip import BranchConfig, InteractionConfig, PIIPConfig
from piip.engine import TrainConfig, apply_overrides, build_backbone, param_rules, train
from piip.engine.checkpoint import (check_training_state, latest_checkpoint, load_training_checkpoint,
                                   save_training_checkpoint)
from piip.engine.config import load_config
from piip.engine.optim import build_scheduler

from conftest import free_port, join_process_group, needs_fmnist

NUM_CLASSES = 4


def micro_piip(**kw) -> dict:
    """Three branches, parameter-inverted (48 wide/3 deep @32, 32/2 @48, 16/1 @64)."""
    def branch(dim, depth, res, heads):
        groups = ((0, 0), (1, depth - 1)) if depth > 1 else ((0, 0),)
        return BranchConfig(embed_dim=dim, depth=depth, num_heads=heads, resolution=res,
                            interaction_indexes=groups, pretrain_img_size=res)
    b1 = BranchConfig(embed_dim=64, depth=4, num_heads=4, resolution=32,
                      interaction_indexes=((0, 1), (2, 3)), pretrain_img_size=32)
    b2 = branch(32, 2, 48, 2)
    b3 = BranchConfig(embed_dim=32, depth=2, num_heads=2, resolution=64,
                      interaction_indexes=((0, 0), (1, 1)), pretrain_img_size=64)
    cfg = PIIPConfig(branches=(b1, b2, b3), task="cls", cls_pool="avg", num_classes=NUM_CLASSES,
                     interaction=InteractionConfig(num_heads=4, drop_path_rate=0.0), **kw)
    return cfg.to_dict()


def synthetic(n=32, seed=0, size=64):
    """Class k brightens quadrant k: learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % NUM_CLASSES
    images = torch.randn(n, 3, size, size, generator=g) * 0.5
    h = size // 2
    for i, k in enumerate(labels.tolist()):
        r, c = divmod(k, 2)
        images[i, :, r * h:(r + 1) * h, c * h:(c + 1) * h] += 2.0
    ds = TensorDataset(images, labels)
    ds.classes = [f"c{k}" for k in range(NUM_CLASSES)]
    return ds


def make_cfg(out_dir, *overrides) -> TrainConfig:
    cfg = TrainConfig()
    cfg.model.piip = micro_piip()
    apply_overrides(cfg, [f"run.out_dir={out_dir}", "run.num_workers=0", "run.progress=false",
                          "run.log_every=1", "run.eval_every=0", "run.device=cpu",
                          "optim.lr=1e-3", "optim.min_lr=1e-5", "optim.warmup_steps=2",
                          "optim.weight_decay=0.05", "optim.batch_size=8", "optim.epochs=2",
                          "aug.label_smoothing=0.1", *overrides])
    return cfg


# -- 1. parameter groups --------------------------------------------------------------------------
def test_param_groups_multipliers_and_decay_exemptions():
    cfg = TrainConfig()
    cfg.model.piip = micro_piip(cls_head="merged")
    model = build_backbone(cfg.model, "cls")
    # a class token on branch 1 to check its exemption
    cfg.model.piip["branches"][0]["class_token"] = True
    model_tok = build_backbone(cfg.model, "cls")
    rules = param_rules(model_tok, weight_decay=0.1, new_module_lr_mult=10.0)
    for name, rule in rules.items():
        new = name.startswith(("interactions.", "classifier."))
        assert rule.lr_scale == (10.0 if new else 1.0), name
        assert rule.new_module == new
    wd = {n: r.weight_decay for n, r in rules.items()}
    assert wd["branches.0.cls_token"] == 0 and wd["branches.0.pos_embed"] == 0
    assert wd["branches.0.blocks.0.norm1.weight"] == 0 and wd["branches.0.blocks.0.attn.qkv.bias"] == 0
    assert wd["branches.0.blocks.0.ls1.gamma"] == 0
    assert wd["branches.0.blocks.0.attn.qkv.weight"] == 0.1
    assert wd["branches.0.patch_embed.proj.weight"] == 0.1
    gates = [n for n in wd if n.endswith(("ca_gamma", "cffn_gamma"))]
    assert gates and all(wd[n] == 0 for n in gates)
    assert all(r.weight_decay == 0.1 for n, r in rules.items()
               if n.startswith("interactions.") and n.endswith(".weight") and "norm" not in n
               and torch.Tensor.dim(dict(model_tok.named_parameters())[n]) > 1)
    merge_weights = [n for n in wd if n.endswith("merge.weights")]
    assert all(wd[n] == 0 for n in merge_weights)
    assert len(rules) == len(list(model.named_parameters())) + 1


def test_layer_decay_aligns_last_blocks():
    cfg = TrainConfig()
    cfg.model.piip = micro_piip()
    model = build_backbone(cfg.model, "cls")
    rules = param_rules(model, weight_decay=0.05, new_module_lr_mult=10.0, layer_decay=0.5)
    ids = {n: r.layer_id for n, r in rules.items()}
    # depths 4/2/2 -> num_layers 4, strides 1/2/2; Ltot = 6
    assert ids["branches.0.pos_embed"] == 0 and ids["branches.2.patch_embed.proj.weight"] == 0
    assert ids["branches.0.blocks.3.mlp.fc1.weight"] == 4
    assert ids["branches.1.blocks.1.mlp.fc1.weight"] == 4 and ids["branches.2.blocks.1.attn.qkv.weight"] == 4
    assert ids["branches.1.blocks.0.norm1.weight"] == 2 and ids["branches.0.blocks.1.norm1.weight"] == 2
    assert ids["branches.0.blocks.0.norm1.weight"] == 1
    assert rules["branches.0.blocks.3.norm1.weight"].lr_scale == pytest.approx(0.5)
    assert rules["branches.2.blocks.1.norm1.weight"].lr_scale == pytest.approx(0.5)
    assert rules["branches.0.pos_embed"].lr_scale == pytest.approx(0.5 ** 5)
    inter = [r for n, r in rules.items() if n.startswith("interactions.")]
    assert inter and all(r.layer_id == 5 and r.lr_scale == pytest.approx(10.0) for r in inter)
    assert rules["branches.0.head.weight"].lr_scale == pytest.approx(1.0)
    # the original's explicit setting (num_layers, skip) gives the same ids here
    explicit = param_rules(model, weight_decay=0.05, layer_decay=0.5, layer_decay_num_layers=4,
                           layer_decay_skip=[2, 2])
    assert {n: r.layer_id for n, r in explicit.items()} == ids


def test_schedule_warmup_and_cosine():
    cfg = TrainConfig()
    apply_overrides(cfg, ["optim.lr=1e-3", "optim.warmup_steps=4", "optim.warmup_lr=0",
                          "optim.min_lr=1e-5", "optim.epochs=2"])
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([{"params": [p], "lr": 1e-2}])  # a 10x group
    sched = build_scheduler(opt, cfg.optim, steps_per_epoch=7)
    lrs = []
    for _ in range(14):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] == 0 and lrs[2] == pytest.approx(5e-3) and lrs[4] == pytest.approx(1e-2)
    assert lrs[-1] == pytest.approx(1e-4)  # min_lr, times the group's 10x
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))


def _lrs(cfg, steps_per_epoch: int) -> list[float]:
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([{"params": [p], "lr": cfg.optim.lr}])
    sched = build_scheduler(opt, cfg.optim, steps_per_epoch=steps_per_epoch)
    lrs = []
    for _ in range(cfg.optim.epochs * steps_per_epoch):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def test_step_schedule_is_mmdetections_1x():
    """lr 1e-4, 500 linear warm-up steps from 0.001 x lr, x0.1 at epochs 8 and 11 of 12."""
    cfg = TrainConfig()
    apply_overrides(cfg, ["optim.lr=1e-4", "optim.warmup_steps=500", "optim.warmup_lr=1e-7",
                          "optim.schedule=step", "optim.milestones=[8,11]", "optim.epochs=12"])
    lrs = _lrs(cfg, steps_per_epoch=100)
    assert lrs[0] == pytest.approx(1e-7) and lrs[250] == pytest.approx(1e-7 + (1e-4 - 1e-7) * 0.5)
    assert lrs[500] == pytest.approx(1e-4) and lrs[799] == pytest.approx(1e-4)
    assert lrs[800] == pytest.approx(1e-5) and lrs[1099] == pytest.approx(1e-5)
    assert lrs[1100] == pytest.approx(1e-6) and lrs[-1] == pytest.approx(1e-6)


def test_poly_schedule_is_mmsegmentations():
    """Power 1.0 from lr to min_lr 0 over all steps, after a linear warm-up from 1e-6 x lr."""
    cfg = TrainConfig()
    apply_overrides(cfg, ["optim.lr=4e-5", "optim.warmup_steps=15", "optim.warmup_lr=4e-11", "optim.min_lr=0",
                          "optim.schedule=poly", "optim.power=1.0", "optim.epochs=1"])
    lrs = _lrs(cfg, steps_per_epoch=100)
    assert lrs[0] == pytest.approx(4e-11)
    assert lrs[15] == pytest.approx(4e-5 * (1 - 15 / 100)) and lrs[60] == pytest.approx(4e-5 * 0.4)
    with pytest.raises(ValueError, match="optim.schedule"):
        apply_overrides(cfg, ["optim.schedule=linear"])
        _lrs(cfg, 10)


def test_grouped_batches_keep_one_aspect_ratio_and_skip_exactly():
    from torch.utils.data import DistributedSampler

    from piip.engine.sampling import GroupedBatchSampler, SkipBatchSampler, ShardSampler

    groups = [i % 3 == 0 for i in range(50)]  # 17 of one group, 33 of the other
    sampler = DistributedSampler(range(50), num_replicas=1, rank=0, shuffle=True, seed=3)
    sampler.set_epoch(1)
    grouped = GroupedBatchSampler(sampler, groups, 4)
    out = list(grouped)
    assert len(out) == len(grouped) == 12 and all(len(b) == 4 for b in out)
    assert len({i for b in out for i in b}) == 48                           # each sample at most once
    # 17 + 33 samples: 4 + 8 full one-group batches, the 1 + 1 leftovers make no full batch
    assert all(len({groups[i] for i in b}) == 1 for b in out)
    assert out == list(GroupedBatchSampler(sampler, groups, 4))             # deterministic per epoch
    skip = SkipBatchSampler(grouped)
    skip.skip = 5
    assert list(skip) == out[5:] and len(skip) == 7
    assert list(ShardSampler(10, 1, 3)) == [1, 4, 7]


def test_config_overrides_and_round_trip(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  name: piip_tsb_deit\noptim:\n  lr: 1.0e-4\n")
    cfg = load_config(path, ["optim.clip_grad=1.5", "run.ema_decay=none", "run.compile=true",
                             "model.branch_drop_path=[0.1,0.05,0.0]", "optim.epochs=3", "data.limit=10"])
    assert cfg.optim.lr == 1e-4 and cfg.optim.clip_grad == 1.5 and cfg.run.compile is True
    assert cfg.model.branch_drop_path == [0.1, 0.05, 0.0] and cfg.optim.epochs == 3
    assert TrainConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ValueError, match="unknown config key"):
        apply_overrides(cfg, ["optim.lrr=1"])
    with pytest.raises(ValueError):
        apply_overrides(cfg, ["optim.epochs=abc"])
    # an unset mapping field takes keys one by one; a value is not a section
    apply_overrides(cfg, ["model.branch_weights.branch1=b.safetensors", "model.branch_weights.branch2=s.safetensors"])
    assert cfg.model.branch_weights == {"branch1": "b.safetensors", "branch2": "s.safetensors"}
    with pytest.raises(ValueError, match="'lr' is a value, not a section"):
        apply_overrides(cfg, ["optim.lr.x=1"])


# -- 2. kill and resume -------------------------------------------------------------------------
def test_kill_and_resume_reproduces_every_step(tmp_path):
    data = synthetic(16)
    # drop path, mixup and EMA all draw randomness; 2 epochs x 2 steps, accumulation 2
    common = ["model.drop_path_rate=0.1", "aug.mixup=0.8", "aug.cutmix=1.0", "run.ema_decay=0.9",
              "optim.accum_steps=2", "optim.clip_grad=1.0"]
    full = train(make_cfg(tmp_path / "full", *common), train_dataset=data)
    assert sorted(full["step_losses"]) == [1, 2, 3, 4]

    cut = tmp_path / "cut"
    first = train(make_cfg(cut, *common, "run.save_every_steps=1", "run.keep_last=0", "run.halt_at_step=3"), train_dataset=data)
    assert first["halted"] and sorted(first["step_losses"]) == [1, 2, 3]
    # a kill right after step 3's checkpoint -> resume mid-epoch (epoch 1, first step done)
    second = train(make_cfg(cut, *common, "run.keep_last=0"), train_dataset=data, resume=True)
    assert sorted(second["step_losses"]) == [4]
    merged = {**first["step_losses"], **second["step_losses"]}
    assert merged == full["step_losses"]  # bit-exact

    # resume from an earlier checkpoint (step 2, an epoch boundary) re-runs steps 3, 4 identically
    third = train(make_cfg(cut, *common), train_dataset=data, resume=str(cut / "checkpoints" / "step-00000002.pt"))
    assert third["step_losses"] == {k: full["step_losses"][k] for k in (3, 4)}
    a = load_training_checkpoint(tmp_path / "full")
    b = load_training_checkpoint(cut)
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=0)
    for k in a["ema"]:
        torch.testing.assert_close(a["ema"][k], b["ema"][k], rtol=0, atol=0)
    records = [json.loads(l) for l in (cut / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4]


# -- 3. atomic save --------------------------------------------------------------------------------
def test_atomic_save_survives_a_crash_mid_write(tmp_path, monkeypatch):
    good = {"step": 1, "w": torch.arange(10.0)}
    save_training_checkpoint(tmp_path, good, step=1)
    assert latest_checkpoint(tmp_path).name == "step-00000001.pt"

    real_save = torch.save

    def crashing_save(obj, f, *a, **k):
        f.write(b"partial garbage")  # some bytes hit the disk, then the process "dies"
        raise KeyboardInterrupt("killed during save")

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        save_training_checkpoint(tmp_path, {"step": 2, "w": torch.zeros(10)}, step=2)
    monkeypatch.setattr(torch, "save", real_save)
    latest = latest_checkpoint(tmp_path)
    assert latest.name == "step-00000001.pt"
    state = load_training_checkpoint(tmp_path)
    assert state["step"] == 1 and torch.equal(state["w"], good["w"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000001.pt"]  # no tmp left

    # keep_last prunes old step files; 'latest' always names a complete one
    for s in (2, 3, 4):
        save_training_checkpoint(tmp_path, {"step": s}, step=s, keep=2)
    assert sorted(p.name for p in tmp_path.glob("step-*.pt")) == ["step-00000003.pt", "step-00000004.pt"]
    assert load_training_checkpoint(tmp_path)["step"] == 4


# -- 4. DDP (gloo, CPU) == one process with the same global batch ---------------------------------
def _ddp_worker(rank, world, port, out_dir, overrides):
    join_process_group(rank, world, port)
    from piip.engine.distributed import cleanup

    try:
        train(make_cfg(out_dir, *overrides), train_dataset=synthetic(32))
    finally:
        cleanup()


def test_two_process_ddp_matches_single_process(tmp_path):
    overrides = ["optim.epochs=1", "optim.clip_grad=1.0", "aug.label_smoothing=0.1"]  # 4 steps, batch 8
    mp.spawn(_ddp_worker, args=(2, free_port(), str(tmp_path / "ddp"), overrides), nprocs=2, join=True)
    single = train(make_cfg(tmp_path / "single", *overrides), train_dataset=synthetic(32))
    ddp_state = load_training_checkpoint(tmp_path / "ddp")
    one_state = load_training_checkpoint(tmp_path / "single")
    assert ddp_state["step"] == one_state["step"] == 4 and ddp_state["world_size"] == 2
    for k, v in one_state["model"].items():
        torch.testing.assert_close(ddp_state["model"][k], v, rtol=1e-5, atol=1e-5, msg=k)
    ddp_losses = [json.loads(l)["loss"] for l in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert ddp_losses == pytest.approx(list(single["step_losses"].values()), rel=1e-5)


# -- 5. end to end -------------------------------------------------------------------------------
def test_tiny_end_to_end_loss_decreases(tmp_path):
    cfg = make_cfg(tmp_path, "optim.epochs=4", "optim.lr=2e-3", "run.eval_every=2", "optim.new_module_lr_mult=10")
    summary = train(cfg, train_dataset=synthetic(32), val_dataset=synthetic(16, seed=1))
    losses = list(summary["step_losses"].values())
    assert len(losses) == 16 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-4:]) / 4 < 0.8 * sum(losses[:4]) / 4
    assert summary["eval"]["num_samples"] == 16 and summary["best"] is not None
    assert (tmp_path / "config.json").is_file() and (tmp_path / "checkpoints" / "best.pt").is_file()
    assert TrainConfig.from_json((tmp_path / "config.json").read_text()).to_json() == cfg.to_json()
    import piip

    model = piip.load(summary["model_path"])
    assert model.config.num_classes == NUM_CLASSES


def test_grad_checkpointing_and_bf16_runs_follow_the_fp32_run(tmp_path):
    """Activation checkpointing recomputes the same numbers (same losses at every step); bf16
    autocast trains the same model within bf16 precision."""
    runs = {}
    for name, extra in {"fp32": [], "ckpt": ["run.grad_checkpointing=true"], "bf16": ["run.amp=bf16"]}.items():
        cfg = make_cfg(tmp_path / name, "optim.epochs=1", *extra)
        runs[name] = list(train(cfg, train_dataset=synthetic(24))["step_losses"].values())
    assert len(runs["fp32"]) == 3
    assert runs["ckpt"] == pytest.approx(runs["fp32"], rel=1e-5)
    assert runs["bf16"] == pytest.approx(runs["fp32"], rel=3e-2)


@needs_fmnist
def test_tiny_run_on_real_fashion_mnist_images_loss_decreases(tmp_path):
    """The shipped recipe and tiny PIIP on 512 real Fashion-MNIST images: loss goes down."""
    cfg = load_config("fashion_mnist", [f"run.out_dir={tmp_path}", "run.progress=false", "run.log_every=1",
                                        "data.limit=512", "optim.batch_size=64", "optim.epochs=3",
                                        "optim.warmup_epochs=0.3", "run.save_every_steps=0"])
    summary = train(cfg)
    losses = list(summary["step_losses"].values())
    assert len(losses) == 24 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-4:]) / 4 < 0.8 * sum(losses[:4]) / 4
    assert summary["eval"]["num_samples"] == 512 and summary["images_seen"] == 24 * 64


def test_resume_never_runs_code_from_the_file(tmp_path):
    """--resume reads with the one safe reader: the engine's own state types, nothing else."""
    from piip.weights.checkpoint import CheckpointError

    marker = tmp_path / "ran"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    bad = tmp_path / "step-00000001.pt"
    torch.save({"model": {}, "step": 1, "payload": Exploit()}, bad)
    with pytest.raises(CheckpointError, match="refusing to read .*refers to io.open"):
        load_training_checkpoint(bad)
    assert not marker.exists()
    # numpy's RNG state, which every training checkpoint holds, is read back exactly
    state = {"rng": [{"numpy": np.random.get_state(), "torch": torch.get_rng_state()}], "step": 3}
    save_training_checkpoint(tmp_path / "ok", state, step=3)
    back = load_training_checkpoint(tmp_path / "ok")
    assert back["step"] == 3 and np.array_equal(back["rng"][0]["numpy"][1], state["rng"][0]["numpy"][1])
    # a file that is no torch.save file at all (a JSON given by mistake) is named as such
    (tmp_path / "run.json").write_text('{"step": 3}')
    with pytest.raises(CheckpointError, match="not a torch.save file"):
        load_training_checkpoint(tmp_path / "run.json")
    # a readable file that is not a training checkpoint is named, before anything is built
    with pytest.raises(CheckpointError, match="not a piip training checkpoint"):
        check_training_state(back, tmp_path / "ok")
