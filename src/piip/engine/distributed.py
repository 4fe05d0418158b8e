"""Process-group helpers: env-based init (torchrun), gloo on CPU / nccl on CUDA."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "init_distributed", "is_dist", "is_main", "rank", "world_size", "barrier",
           "all_reduce_mean", "broadcast_object", "gather_objects", "cleanup", "bare_model"]


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def init_distributed(device: str = "auto") -> DistInfo:
    """Initialise from torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` (a no-op without them).

    ``device``: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``. The backend follows the
    device: nccl for CUDA, gloo for CPU.
    """
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank_ = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", rank=rank_, world_size=world)
    return DistInfo(rank_, world, local, dev)


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_dist():
        dist.barrier()


def all_reduce_mean(value: torch.Tensor | float) -> torch.Tensor:
    """Mean over ranks (a float becomes a float64 tensor on the current backend's device)."""
    t = value.detach().clone() if isinstance(value, torch.Tensor) else torch.tensor(float(value), dtype=torch.float64)
    if is_dist():
        if dist.get_backend() == "nccl" and t.device.type != "cuda":
            t = t.cuda()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t = t / dist.get_world_size()
    return t


def broadcast_object(obj, src: int = 0):
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Copy ``src``'s buffers (BatchNorm running statistics) to every rank, as DDP does at the start
    of each forward: after the last training step each rank holds its own, and evaluation must
    score the model that rank 0 saves."""
    if is_dist():
        for buffer in module.buffers():
            dist.broadcast(buffer.data, src=src)


def gather_objects(items: list) -> list:
    """Every rank's ``items`` concatenated in rank order (on every rank; the list itself without a
    process group). Used by the tasks' evaluations through the engine."""
    if not is_dist():
        return list(items)
    boxes = [None] * dist.get_world_size()
    dist.all_gather_object(boxes, list(items))
    return [item for box in boxes for item in box]


def bare_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside its ``torch.compile`` and DDP wrappers, whichever wraps the other (an FSDP
    model is its own bare model)."""
    model = getattr(model, "_orig_mod", model)
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def cleanup() -> None:
    if is_dist():
        dist.destroy_process_group()
