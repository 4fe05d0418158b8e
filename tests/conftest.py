import os
import socket
from pathlib import Path

import pytest
import torch

from piip import BranchConfig, InteractionConfig, PIIPConfig


#: The authors' golden fixtures: ``shared/`` lives beside the repository checkout (as in CI).
FIXTURES = Path(os.environ.get(
    "PIIP_OFFICIAL_FIXTURES", Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "official"))
if not FIXTURES.is_dir() or not any(FIXTURES.glob("*.json")):
    raise RuntimeError(f"the official fixtures are missing: expected them under {FIXTURES} "
                       "(set PIIP_OFFICIAL_FIXTURES to their folder)")

#: Tests that read real Fashion-MNIST (Debian's dataset-fashion-mnist; `make test` installs it).
FMNIST = os.environ.get("PIIP_FASHION_MNIST", "/usr/share/datasets/fashion-mnist")
needs_fmnist = pytest.mark.skipif(
    not os.path.isdir(FMNIST),
    reason="Fashion-MNIST missing: apt-get install dataset-fashion-mnist (or set PIIP_FASHION_MNIST)")


def tiny_branch(dim: int, res: int, *, depth: int = 2, heads: int = 2, groups=((0, 0), (1, 1)), **kw) -> BranchConfig:
    return BranchConfig(embed_dim=dim, depth=depth, num_heads=heads, resolution=res,
                        interaction_indexes=tuple(groups), pretrain_img_size=kw.pop("pretrain", 64), **kw)


def tiny_config(task: str = "det", **kw) -> PIIPConfig:
    """A three-branch PIIP small enough for CPU tests (64/32/32 wide at 64/96/128)."""
    branches = (
        tiny_branch(64, 64, heads=4, pretrain=64, **kw.pop("b1", {})),
        tiny_branch(32, 96, pretrain=96, **kw.pop("b2", {})),
        tiny_branch(32, 128, pretrain=128, **kw.pop("b3", {})),
    )
    interaction = kw.pop("interaction", InteractionConfig(num_heads=4, drop_path_rate=0.0))
    return PIIPConfig(branches=branches, interaction=interaction, task=task, **kw)


def jsonl_by_image(path) -> dict:
    """The records of a ``predictions.jsonl`` by their ``image``, parsed here line by line."""
    import json
    return {record["image"]: record for record in map(json.loads, open(path).read().splitlines())}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# -- DDP on CPU (gloo): helpers for torch.multiprocessing.spawn workers -----------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join_process_group(rank: int, world: int, port: int) -> None:
    """What torchrun would set for process ``rank`` of ``world``; one thread each on the 2-core runners."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)


def train_config_file(rank: int, world: int, port: int, config_path: str) -> None:
    """A spawn worker: ``piip.engine.train`` of a run config file as process ``rank`` of ``world``."""
    join_process_group(rank, world, port)
    from piip.engine import load_config, train
    from piip.engine.distributed import cleanup

    try:
        train(load_config(config_path))
    finally:
        cleanup()
