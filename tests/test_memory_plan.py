"""``piip plan``: the per-GPU memory of training with ddp, zero1 and fsdp (piip.analysis.memory_plan).

The byte arithmetic of each strategy against numbers worked out by hand; the planner's prediction for
one training step of a small real model against the step's peak measured independently (the
profiler's allocation events on CPU, not the planner's saved-tensor counting); the command line."""
import json

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import piip
from piip.analysis.memory_plan import (ALLOWANCE_FIXED_GB, ALLOWANCE_FRACTION, GB, plan_memory, recipes_for,
                                       strategy_memory)
from piip.engine import load_config
from piip.engine.optim import build_optimizer

from test_cli_errors import assert_one_line_error, assert_option_error, run_cli


def allowed(subtotal: float) -> int:
    """The documented allowance on top of ``subtotal`` bytes: 1 GB + 10%."""
    return int(ALLOWANCE_FIXED_GB * GB + ALLOWANCE_FRACTION * subtotal)


# -- arithmetic ------------------------------------------------------------------------------------
def test_each_strategy_against_hand_computed_bytes():
    """1e9 parameters, all trainable, 8 GPUs, bf16, 1e9 of them cast by autocast, 3 GB of saved
    activations, no checkpointing; fsdp units: a root of 1e8 and blocks of 5e7; AdamW's largest group
    1e8. Every phase holds the weights, moments and buckets; the peak here is the backward's."""
    common = dict(params=10**9, gpus=8, activations=3 * 10**9, cast_params=10**9, root_params=10**8,
                  unit_params=5 * 10**7, largest_group=10**8)
    ddp, zero1, fsdp = (strategy_memory(name, **common) for name in ("ddp", "zero1", "fsdp"))
    # ddp: 4 B weights, 4 B gradients, 8 B AdamW moments, 4 B DDP buckets, 2 B autocast copies
    assert (ddp.weights, ddp.gradients, ddp.optimizer, ddp.buckets, ddp.working) == (4e9, 4e9, 8e9, 4e9, 2e9)
    assert ddp.forward_peak == 16e9 + 2e9 + 3e9                        # no gradients yet
    assert ddp.backward_peak == 16e9 + 4e9 + 3e9 + 2e9 == 25e9         # autograd keeps the copies
    assert ddp.step_peak == 16e9 + 4e9 + 4 * 1e8
    assert ddp.peak_phase == "backward" and ddp.allowance == allowed(25e9) == 3.5e9 and ddp.total == 28.5e9
    # zero1: the moments / 8, the rest as ddp
    assert (zero1.weights, zero1.gradients, zero1.optimizer, zero1.buckets) == (4e9, 4e9, 1e9, 4e9)
    assert zero1.without_allowance == 9e9 + 4e9 + 3e9 + 2e9 == 18e9 and zero1.total == 18e9 + allowed(18e9) == 20.8e9
    # fsdp: weights, gradients and moments / 8; gathered bf16: root + 2 units, + root + 1 unit of gradients
    assert (fsdp.weights, fsdp.gradients, fsdp.optimizer, fsdp.buckets) == (0.5e9, 0.5e9, 1e9, 0)
    assert fsdp.forward_peak == 1.5e9 + 2 * (1e8 + 2 * 5e7) + 3e9
    assert fsdp.working == 2 * (1e8 + 2 * 5e7) + 2 * (1e8 + 5e7) == 0.7e9
    assert fsdp.without_allowance == 1.5e9 + 0.5e9 + 0.7e9 + 3e9 == 5.7e9 and fsdp.total == 5.7e9 + allowed(5.7e9)
    assert [s.fits for s in (ddp, zero1, fsdp)] == [True, True, True]
    assert not strategy_memory("ddp", **common, gpu_memory_gb=28).fits


def test_checkpointing_and_the_phases():
    # checkpointing: the copies live only through the forward; the backward recomputes one unit
    # (1 GB of activations) and recasts its 5e7 parameters
    ddp = strategy_memory("ddp", params=10**9, activations=3 * 10**9, recompute=10**9, checkpointing=True,
                          cast_params=10**9, unit_params=5 * 10**7)
    assert (ddp.forward_peak, ddp.backward_peak) == (16e9 + 2e9 + 3e9, 16e9 + 4e9 + 3e9 + 1e9 + 1e8)
    assert ddp.working == 2e9 and ddp.activations == 4e9 and ddp.peak_phase == "backward"
    # mostly frozen: the forward's copies outweigh the backward's gradients
    frozen = strategy_memory("ddp", params=10**9, trainable=10**8, activations=3 * 10**9, recompute=10**9,
                             checkpointing=True, cast_params=10**9, unit_params=5 * 10**7)
    assert (frozen.weights, frozen.gradients, frozen.optimizer, frozen.buckets) == (4e9, 4e8, 8e8, 4e8)
    assert frozen.peak_phase == "forward" and frozen.without_allowance == 5.2e9 + 2e9 + 3e9
    # accumulating micro-batches: the gradients are there in the forward too
    assert strategy_memory("ddp", params=10**9, cast_params=10**9, accumulating=True).forward_peak == 16e9 + 4e9 + 2e9
    # AdamW's foreach temporary sets the peak when it exceeds the activations (it comes after them)
    step = strategy_memory("ddp", params=10**9, largest_group=10**9, activations=10**9)
    assert step.optimizer_step_temp == 4e9 and step.peak_phase == "optimiser step"
    assert step.without_allowance == 20e9 + 4e9


def test_arithmetic_edge_cases():
    # one GPU: no DDP buckets, nothing sharded
    one = strategy_memory("zero1", params=10**9, gpus=1)
    assert (one.weights, one.gradients, one.optimizer, one.buckets, one.working) == (4e9, 4e9, 8e9, 0, 0)
    # fp32: no autocast copies; fsdp gathers 4-byte parameters
    assert strategy_memory("ddp", params=10, cast_params=10, amp="fp32").working == 0
    assert strategy_memory("fsdp", params=100, root_params=10, unit_params=5, amp="fp32").working == 4 * 20 + 4 * 15
    with pytest.raises(ValueError, match="strategy must be one of ddp, zero1, fsdp"):
        strategy_memory("zero3", params=1)
    with pytest.raises(ValueError, match="gpus must be >= 1"):
        strategy_memory("ddp", params=1, gpus=0)


def test_a_variants_recipes_in_the_stated_order():
    assert recipes_for("piip_sbl", "det") == ["mask_rcnn_piip_sbl_1x", "mask_rcnn_piip_sbl_3x_ms",
                                              "cascade_mask_rcnn_piip_sbl_1x", "cascade_mask_rcnn_piip_sbl_3x_ms"]
    assert recipes_for("h6b", "det") == ["dino_piip_h6b_1x_ms"]
    assert recipes_for("piip_h6b", "seg") == []              # the shipped UperNet trains piip_h6b_speedup
    assert recipes_for("piip_h6b_speedup", "seg") == ["upernet_piip_h6b_ade20k_80k"]


# -- measured against predicted ---------------------------------------------------------------------
def _measured_peak(size, batch: int, checkpointing: bool, amp: str) -> int:
    """The peak bytes the CPU allocator holds over two real training steps of the fashion_mnist
    recipe's classifier (built, optimised and trained here as the engine does: the loss under
    ``amp`` autocast, backward, AdamW step, gradients set to None), from the profiler's allocation
    and free events, counted from before the model exists; the second step starts with the AdamW
    moments allocated."""
    cfg = load_config("fashion_mnist")
    images, labels = torch.rand(batch, 3, *size), torch.randint(0, 10, (batch,))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model = piip.create_model("piip_fmnist_tsb", task="cls", num_classes=10).train()
        model.set_grad_checkpointing(checkpointing)
        optimizer = build_optimizer(model, cfg.optim)
        for _ in range(2):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp == "bf16"):
                loss = F.cross_entropy(model(images).float(), labels, label_smoothing=0.1)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            del loss
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("amp,checkpointing", [("fp32", False), ("fp32", True), ("bf16", True)])
def test_the_plan_predicts_a_real_steps_peak_within_25_percent(amp, checkpointing):
    """ddp on one GPU without the allowance (the peak of the step's phases: weights, gradients, AdamW
    moments, autocast copies, activations) against the measured peak of the step. Measured here:
    fp32 1.03x without checkpointing, 1.14x with it (all gradients counted with all activations, and
    the recomputed unit whole), bf16 with checkpointing 1.19x (bf16 without: 1.09x)."""
    batch = 32
    plan = plan_memory("fashion_mnist", gpus=1, batch_per_gpu=batch, amp=amp, grad_checkpointing=checkpointing)
    ddp = plan.strategy("ddp")
    assert plan.amp == amp and ddp.buckets == 0 and plan.input_size == (28, 28)
    assert (ddp.working > 0) == (amp == "bf16")
    measured = _measured_peak(plan.input_size, batch, checkpointing, amp)
    assert abs(ddp.without_allowance / measured - 1) < 0.25, (ddp.without_allowance, measured)


# -- the command line -------------------------------------------------------------------------------
def test_piip_plan_json(capsys):
    code, out, err = run_cli(["plan", "piip_fmnist_tsb", "--task", "cls", "--gpus", "2", "--gpu-memory", "0.01",
                              "--json"], capsys)
    assert code == 0, err
    data = json.loads(out)
    assert data["recipe"] == "fashion_mnist" and data["batch_per_gpu"] == 64 and data["gpus"] == 2
    assert set(data["strategies"]) == {"ddp", "zero1", "fsdp"}
    ddp = data["strategies"]["ddp"]
    assert ddp["total"] == max(ddp["forward_peak"], ddp["backward_peak"], ddp["step_peak"]) + ddp["allowance"]
    assert ddp["backward_peak"] == ddp["weights"] + ddp["optimizer"] + ddp["buckets"] + ddp["gradients"] \
        + ddp["activations"]                                        # fp32, no checkpointing: no copies
    assert data["fitting"] == []                                   # nothing fits 10 MB: the allowance alone is 1 GB
    assert len(data["measured_sizes"]) == 3 and data["fit"]["max_residual"] < 0.05


def test_piip_plan_table(capsys, monkeypatch):
    import piip.analysis.memory_plan as memory_plan

    plan = memory_plan.plan_memory("fashion_mnist", gpus=1, batch_per_gpu=32)
    monkeypatch.setattr(memory_plan, "plan_memory", lambda *args, **kwargs: plan)
    code, out, err = run_cli(["plan", "fashion_mnist"], capsys)
    assert code == 0, err
    for text in ("ddp", "zero1", "fsdp", "weights", "gradients", "AdamW moments", "activations", "allowance",
                 "total", "fits 1 x 80 GB: ddp, zero1, fsdp", "measured:", "32 per GPU (given)",
                 "with activation checkpointing on"):
        assert text in out, text


@pytest.mark.parametrize("argv,names", [
    (["plan", "piip_tbs"], ["unknown PIIP variant", "did you mean 'piip_tsb'", "recipe"]),
    (["plan", "null"], ["'null'"]),
    (["plan", "runs/missing.yaml"], ["recipe file 'runs/missing.yaml' does not exist"]),
    (["plan", "fashion_mnist", "--task", "det"], ["fashion_mnist", "'cls'", "'det'"]),
])
def test_bad_sources_are_one_line(capsys, argv, names):
    assert_one_line_error(*run_cli(argv, capsys), *names)


@pytest.mark.parametrize("argv,option", [
    (["plan", "piip_tsb", "--gpus", "0"], "--gpus"),
    (["plan", "piip_tsb", "--gpus", "null"], "--gpus"),
    (["plan", "piip_tsb", "--gpu-memory", "0"], "--gpu-memory"),
    (["plan", "piip_tsb", "--gpu-memory", "-80"], "--gpu-memory"),
    (["plan", "piip_tsb", "--gpu-memory", "nan"], "--gpu-memory"),
    (["plan", "piip_tsb", "--gpu-memory", "null"], "--gpu-memory"),
    (["plan", "piip_tsb", "--batch-per-gpu", "0"], "--batch-per-gpu"),
    (["plan", "piip_tsb", "--amp", "fp16"], "--amp"),
])
def test_bad_options_are_refused_by_the_parser(capsys, argv, option):
    assert_option_error(*run_cli(argv, capsys), option)


@pytest.mark.parametrize("kwargs,message", [
    (dict(gpus=0), "gpus must be an integer >= 1"),
    (dict(gpus=None), "gpus must be an integer >= 1"),
    (dict(gpu_memory_gb=0), "gpu_memory_gb must be a number > 0"),
    (dict(gpu_memory_gb=None), "gpu_memory_gb must be a number > 0"),
    (dict(batch_per_gpu=0), "batch_per_gpu must be an integer >= 1"),
    (dict(amp="fp8"), "amp must be 'bf16' or 'fp32'"),
    (dict(task="detection"), "task must be 'det', 'seg' or 'cls'"),
])
def test_bad_arguments_of_the_library(kwargs, message):
    with pytest.raises(ValueError, match=message):
        plan_memory("piip_fmnist_tsb", **kwargs)
