"""How a run spreads over its processes (``run.strategy``): the one place that decides, per
strategy, how the model is wrapped, which optimiser steps it, how gradients are clipped and
accumulated, what a checkpoint holds and how the final model is gathered for export.

* ``"ddp"`` (default): every process holds the whole model and optimiser state;
  ``DistributedDataParallel`` all-reduces the gradients once per optimiser step (``no_sync`` on the
  micro-batches before the last). Checkpoints: one ``step-*.pt`` file, written by rank 0.
* ``"zero1"``: DDP as above, and the optimiser state partitioned over the processes
  (``ZeroRedundancyOptimizer`` around the same AdamW and parameter groups: lr multipliers and
  weight decay unchanged): each process updates its own parameters, then broadcasts them.
  Gradients and clipping are DDP's (every process holds every gradient).
* ``"fsdp"``: FSDP2, ``fully_shard`` on every ViT block of every branch, every interaction unit and
  the root: parameters, gradients and optimiser state are sharded, a block's parameters gathered
  only while it runs. ``run.amp=bf16`` gathers them in bfloat16 and reduces gradients in float32
  (``MixedPrecisionPolicy``); otherwise everything is float32. Gradients are reduce-scattered
  after every micro-batch and accumulate sharded (no unsharded gradient copy: the memory of a
  6B-parameter model), and clipping takes the norm over all shards (the norm DDP computes).
  Evaluation gathers the whole model once (every process then runs its own shard of the
  validation set, however many batches that is). Refused with fsdp: ``run.ema_decay`` (the EMA
  would be a whole unsharded copy on every process), ``run.compile`` and ``run.amp=fp16``.

``zero1`` and ``fsdp`` checkpoints are sharded folders (:func:`~piip.engine.checkpoint.save_sharded_checkpoint`):
each process writes its own shard through ``torch.distributed.checkpoint``. zero1's optimiser state
is saved per parameter, under the parameter's name, by the process that owns it: no process
gathers the whole state (55 GB for a 6.9B model), and the folder holds the same layout as an FSDP
one. A sharded checkpoint resumes under the same strategy and world size only.

With one process every strategy trains as plain single-process training (no wrapper, the whole
optimiser) and writes ``.pt`` checkpoints, as ``ddp`` does.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, ContextManager

import torch
from torch import nn

from ..layers.branch import ViTBranch
from ..layers.interaction import InteractionUnit
from ..weights.checkpoint import model_from_config
from . import distributed as D
from .distributed import bare_model
from .optim import build_optimizer, optimizer_spec

__all__ = ["STRATEGIES", "check_strategy", "make_strategy", "Strategy", "ZeRO1", "FSDP"]

STRATEGIES = ("ddp", "zero1", "fsdp")


def check_strategy(run: Any) -> None:
    """Refuse an unknown ``run.strategy`` and what a strategy cannot train, with a one-line
    :class:`ValueError` naming the field (run by :meth:`TrainConfig.validate` and by the engine)."""
    if run.strategy not in STRATEGIES:
        raise ValueError(f"run.strategy={run.strategy!r}: expected 'ddp', 'zero1' or 'fsdp'")
    if run.strategy != "fsdp":
        return
    if run.ema_decay is not None:
        raise ValueError(f"run.ema_decay={run.ema_decay!r} is not supported with run.strategy=fsdp (the EMA would be "
                         "a whole unsharded copy of the model on every process); use run.strategy=zero1 or ddp, or "
                         "run.ema_decay=null")
    if run.compile:
        raise ValueError("run.compile=true is not supported with run.strategy=fsdp; use run.compile=false, or "
                         "run.strategy=zero1 or ddp")
    if run.amp == "fp16":
        raise ValueError("run.amp='fp16' is not supported with run.strategy=fsdp (its loss scaling would see only "
                         "each process's gradient shard); use run.amp=bf16")


def make_strategy(run: Any, world: int, device: torch.device, *, find_unused_parameters: bool = False) -> "Strategy":
    """The strategy of a run config's ``run`` section for ``world`` processes (with one process,
    plain training whatever ``run.strategy`` says)."""
    check_strategy(run)
    cls = {"ddp": Strategy, "zero1": ZeRO1, "fsdp": FSDP}[run.strategy] if world > 1 else Strategy
    return cls(run.strategy, world, device, amp=run.amp, find_unused_parameters=find_unused_parameters)


class Strategy:
    """``ddp``, and every strategy with one process. Subclasses override what differs.

    ``name``: the run's ``run.strategy``; ``sharded``: whether checkpoints are sharded DCP folders
    (else one ``.pt`` file of the whole state, written by rank 0).
    """

    sharded = False

    def __init__(self, name: str, world: int, device: torch.device, *, amp: str = "fp32",
                 find_unused_parameters: bool = False):
        self.name, self.world, self.device, self.amp = name, world, device, amp
        self.find_unused_parameters = find_unused_parameters

    # -- training ------------------------------------------------------------------------------
    def wrap(self, model: nn.Module) -> nn.Module:
        """What the steps run (before ``torch.compile``): ``model`` in DDP across processes."""
        if self.world == 1:
            return model
        return nn.parallel.DistributedDataParallel(
            model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
            find_unused_parameters=self.find_unused_parameters)

    def build_optimizer(self, model: nn.Module, optim_cfg: Any) -> torch.optim.Optimizer:
        """The optimiser of ``model``'s parameters (after :meth:`wrap`)."""
        return build_optimizer(model, optim_cfg)

    def micro_batch(self, train_model: nn.Module, last: bool) -> ContextManager:
        """The context of one micro-batch's forward and backward; ``last``: the step's last one,
        after which the gradients must be synchronised (DDP: ``no_sync`` before it)."""
        if last or not isinstance(train_model, nn.parallel.DistributedDataParallel):
            return contextlib.nullcontext()
        return train_model.no_sync()

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        """Scale the (unscaled, synchronised) gradients to a total 2-norm of at most ``max_norm``;
        returns the norm before clipping."""
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)

    # -- checkpoints ---------------------------------------------------------------------------
    def state(self, model: nn.Module, optimizer: torch.optim.Optimizer, *,
              template: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
        """The model's and the optimiser's state to checkpoint (sharded strategies: this process's
        part). ``template``: the same structure to load a sharded checkpoint into (an optimiser
        state not created yet is created, with no update)."""
        return bare_model(model).state_dict(), optimizer.state_dict()

    def load_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict[str, Any],
                   optim_state: dict[str, Any]) -> None:
        """Continue from :meth:`state`'s two parts."""
        bare_model(model).load_state_dict(model_state)
        optimizer.load_state_dict(optim_state)

    def check_resume(self, state: dict[str, Any]) -> None:
        """Refuse a checkpoint this run cannot continue exactly: one written under another strategy
        or by another number of processes (before anything is built or communicated)."""
        written, world = state.get("strategy"), state["world_size"]
        where = f" {state['checkpoint_folder']!r}" if state.get("checkpoint_folder") else ""
        got = f"got run.strategy={self.name} with {self.world} process{'es' if self.world > 1 else ''}"
        if written is None and self.sharded:
            raise ValueError(f"the checkpoint is a .pt file, written under run.strategy=ddp or by one process; resume "
                             f"it with run.strategy=ddp and {world} processes ({got}): zero1 and fsdp resume "
                             "their own sharded checkpoint folders")
        if written is not None and (written != self.name or world != self.world):
            raise ValueError(f"the sharded checkpoint{where} was written under run.strategy={written} by {world} "
                             f"processes; resume it with the same strategy and world size ({got})")
        if world != self.world:
            raise ValueError(f"checkpoint was written by {world} processes; resume with the "
                             f"same world size (got {self.world}) for an exact continuation")

    # -- evaluation and export -----------------------------------------------------------------
    def full_params(self, model: nn.Module) -> ContextManager:
        """A context in which ``model`` runs without communication (evaluation: every process
        runs its own number of batches)."""
        return contextlib.nullcontext()

    def full_model(self, model: nn.Module) -> nn.Module | None:
        """The whole trained model on rank 0 (``None`` elsewhere), to export; every process calls it."""
        return bare_model(model) if D.is_main() else None


def _init_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Create ``optimizer``'s per-parameter state (a step with zero gradients and lr 0: AdamW
    leaves every parameter as it is), so a checkpoint can be loaded into it in place."""
    if optimizer.state:
        return
    params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
    for p in params:
        p.grad = torch.zeros_like(p)
    lrs = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    optimizer.step()
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)


class ZeRO1(Strategy):
    """``zero1``: DDP, and the optimiser state partitioned (``ZeroRedundancyOptimizer``)."""

    sharded = True

    def build_optimizer(self, model: nn.Module, optim_cfg: Any) -> torch.optim.Optimizer:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        optimizer_class, groups, defaults = optimizer_spec(model, optim_cfg)
        return ZeroRedundancyOptimizer(groups, optimizer_class=optimizer_class, **defaults)

    def state(self, model, optimizer, *, template=False):
        """The model (whole: DCP writes a tensor all processes hold once) and the state of the
        parameters this process owns, under their names, with the groups' settings."""
        local = optimizer.optim
        if template:
            _init_optimizer_state(local)
        names = {p: name for name, p in bare_model(model).named_parameters()}
        owned = {names[p]: dict(values) for p, values in local.state.items()}
        groups = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
        return bare_model(model).state_dict(), {"state": owned, "param_groups": groups}

    def load_state(self, model, optimizer, model_state, optim_state):
        bare_model(model).load_state_dict(model_state)
        params = dict(bare_model(model).named_parameters())
        for name, values in optim_state["state"].items():
            optimizer.optim.state[params[name]].update(values)
        # the groups' settings (lr, ...); each step copies them to the local optimiser
        for group, saved in zip(optimizer.param_groups, optim_state["param_groups"]):
            group.update(saved)


class FSDP(Strategy):
    """``fsdp``: FSDP2 (``fully_shard``) per ViT block, per interaction unit and at the root."""

    sharded = True

    def wrap(self, model: nn.Module) -> nn.Module:
        """Shard ``model`` in place: every block of every branch and every interaction unit is a
        unit of its own (gathered while it runs, resharded after), the root holds the rest."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(self.device.type, (self.world,))
        policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
                  if self.amp == "bf16" else MixedPrecisionPolicy())
        units = [unit for module in model.modules()
                 for unit in (module.blocks if isinstance(module, ViTBranch) else
                              [module] if isinstance(module, InteractionUnit) else [])]
        for unit in units:
            fully_shard(unit, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
        # the root keeps the task's inputs as they are (a detector's box targets stay float32)
        fully_shard(model, mesh=mesh, mp_policy=dataclasses.replace(policy, cast_forward_inputs=False),
                    reshard_after_forward=False)
        if self.find_unused_parameters:  # a parameter without a gradient on one process reduces zeros
            model.set_reduce_scatter_unused_params(True)
        return model

    def micro_batch(self, train_model, last):
        # every micro-batch reduce-scatters: gradients accumulate in their shards, never whole
        return contextlib.nullcontext()

    def clip_grad_norm(self, model, max_norm):
        from torch.distributed.tensor import DTensor

        params = [p for p in model.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], norm_type=2.0)
        if isinstance(norm, DTensor):  # each process holds a partial norm: reduce it
            norm = norm.full_tensor()
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
        return norm

    def state(self, model, optimizer, *, template=False):
        """This process's shards (DTensors) of the model and of the optimiser state, by name
        (``torch.distributed.checkpoint.state_dict.get_state_dict``)."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        return get_state_dict(model, optimizer)

    def load_state(self, model, optimizer, model_state, optim_state):
        from torch.distributed.checkpoint.state_dict import set_state_dict

        set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state)

    @contextlib.contextmanager
    def full_params(self, model):
        """Every unit gathered and kept gathered through any number of forwards, then resharded."""
        from torch.distributed.fsdp import FSDPModule

        units = [m for m in model.modules() if isinstance(m, FSDPModule)]
        for unit in units:
            unit.unshard()
            unit.set_reshard_after_forward(False, recurse=False)
        try:
            yield
        finally:
            for unit in units:
                unit.reshard()
                unit.set_reshard_after_forward(unit is not model, recurse=False)

    def full_model(self, model):
        """The whole state gathered to rank 0's CPU, loaded into a model of the same config built
        there without memory of its own (``meta`` tensors, then the gathered ones assigned)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not D.is_main():
            return None
        with torch.device("meta"):
            whole = model_from_config(model.config)
        whole.load_state_dict(state, assign=True)
        return whole
