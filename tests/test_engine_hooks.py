"""The training loop and its hooks on a task small enough to train in a blink: when each hook is
called, and best-checkpoint selection in both directions of a task's metric."""
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset, default_collate

from piip.engine import TrainConfig, apply_overrides, train
from piip.engine.checkpoint import load_training_checkpoint
from piip.engine.distributed import DistInfo
from piip.engine.hooks import Hook
from piip.engine.trainer import TrainLoop


class LinearTask:
    """Three classes of 8 random features; ``evaluate`` reports the scripted ``scores`` in turn."""

    metric = "score"

    def __init__(self, scores=(), higher_is_better=True, nan_at_step=None):
        self.scores, self.higher_is_better, self.nan_at_step = list(scores), higher_is_better, nan_at_step
        self.evaluations = 0
        self.steps = 0

    def collate(self, batch):
        return default_collate(batch)

    def build_model(self, cfg, train_dataset):
        return nn.Linear(8, 3)

    def loss(self, model, batch, device):
        features, labels = batch
        loss = F.cross_entropy(model(features), labels)
        self.steps += 1
        if self.steps == self.nan_at_step:
            loss = loss * float("nan")
        return loss, len(labels)

    def evaluate(self, model, loader, device, amp_dtype, gather=None, save_to=None):
        score = self.scores[self.evaluations]
        self.evaluations += 1
        return {"score": score, "num_samples": len(gather(list(loader.dataset)))}

    def export(self, model, path):
        torch.save(model.state_dict(), path)
        return path


def dataset(n, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 8, generator=generator), torch.arange(n) % 3)


def make_cfg(out_dir, *overrides):
    cfg = TrainConfig()
    apply_overrides(cfg, [f"run.out_dir={out_dir}", "run.num_workers=0", "run.progress=false", "run.device=cpu",
                          "run.log_every=1", "run.eval_every=1", "optim.batch_size=4", "optim.epochs=2",
                          "optim.warmup_steps=1", *overrides])
    return cfg


class Recorder(Hook):
    """Writes ``(name, point, loop.step)`` to a shared list at every point of the loop."""

    def __init__(self, name, events):
        self.name, self.events = name, events

    def before_train(self):
        self.events.append((self.name, "before_train", self.loop.step))

    def after_step(self):
        self.events.append((self.name, "after_step", self.loop.step))

    def after_epoch(self):
        self.events.append((self.name, "after_epoch", self.loop.step))

    def after_train(self):
        self.events.append((self.name, "after_train", self.loop.step))


def single_process_loop(cfg, task):
    return TrainLoop(cfg, task, DistInfo(0, 1, 0, torch.device("cpu")), dataset(8), None)


def run_recorded(cfg, task):
    loop, events = single_process_loop(cfg, task), []
    loop.run([Recorder("a", events), Recorder("b", events)])
    return loop, events


def test_hooks_are_called_in_order_at_every_point_of_the_loop(tmp_path):
    loop, events = run_recorded(make_cfg(tmp_path), LinearTask())  # 2 epochs x 2 steps
    both = lambda point, step: [("a", point, step), ("b", point, step)]
    assert events == (both("before_train", 0) + both("after_step", 1) + both("after_step", 2)
                      + both("after_epoch", 2) + both("after_step", 3) + both("after_step", 4)
                      + both("after_epoch", 4) + both("after_train", 4))
    assert (loop.epoch, loop.step, loop.halted) == (2, 4, False) and sorted(loop.step_losses) == [1, 2, 3, 4]


def test_a_halt_skips_the_epoch_end_and_a_nan_loss_still_ends_the_hooks(tmp_path):
    # halted in the second epoch: no epoch end for it, but the hooks' end
    loop, events = run_recorded(make_cfg(tmp_path / "halt", "run.halt_at_step=3"), LinearTask())
    assert [(point, step) for name, point, step in events if name == "a"] == [
        ("before_train", 0), ("after_step", 1), ("after_step", 2), ("after_epoch", 2), ("after_step", 3),
        ("after_train", 3)]
    assert loop.halted and (loop.epoch, loop.step) == (1, 3)
    # an iteration schedule of 3 steps ends mid-epoch, and that epoch still ends
    loop, events = run_recorded(make_cfg(tmp_path / "steps", "optim.steps=3"), LinearTask())
    assert [point for name, point, step in events if name == "a"][-3:] == ["after_step", "after_epoch", "after_train"]
    assert not loop.halted and (loop.epoch, loop.step) == (2, 3)
    # the loss of step 2 is NaN: the step raises, after the hooks of step 1 and before its own
    loop, events = single_process_loop(make_cfg(tmp_path / "nan"), LinearTask(nan_at_step=2)), []
    with pytest.raises(FloatingPointError, match="loss is nan at step 2"):
        loop.run([Recorder("a", events)])
    assert events == [("a", "before_train", 0), ("a", "after_step", 1), ("a", "after_train", 2)]


@pytest.mark.parametrize("higher_is_better, best, best_epoch", [(True, 3.0, 3), (False, 1.0, 2)])
def test_the_best_checkpoint_follows_the_direction_of_the_task_metric(tmp_path, higher_is_better, best,
                                                                      best_epoch):
    task = LinearTask(scores=[2.0, 1.0, 3.0, None], higher_is_better=higher_is_better)
    summary = train(make_cfg(tmp_path, "optim.epochs=4"), train_dataset=dataset(8), val_dataset=dataset(6, seed=1),
                    task=task)
    assert summary["best"] == best and summary["eval"] == {"score": None, "num_samples": 6}
    best_state = load_training_checkpoint(tmp_path / "checkpoints" / "best.pt")
    assert (best_state["best"], best_state["epoch"], best_state["step"]) == (best, best_epoch, 2 * best_epoch)
    # every later checkpoint carries the best score on, so a resumed run keeps comparing against it
    assert load_training_checkpoint(tmp_path)["best"] == best
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["score"]) for r in records if r["kind"] == "eval"] == [
        (1, 2.0), (2, 1.0), (3, 3.0), (4, None)]
