"""One mechanism each: overrides of the network (Python keywords and the run config's fields reach the
same fields through ``PIIPConfig.with_overrides``), config serialisation (every config round-trips
through the one typed reader), and tasks as plug-ins (the commands and ``piip.load`` dispatch through
the registered :class:`~piip.engine.task.Task` classes)."""
from __future__ import annotations

import argparse
import dataclasses

import pytest
import torch

import piip
from piip.config.model import PIIPConfig
from piip.engine import build_model_config, load_config
from piip.engine.task import task_for_model
from piip.models import get_config
from piip.tasks import (ClassificationTask, DetectionTask, SegmentationTask, Task, build_detector, build_segmenter,
                        get_task_class, task_classes)


def test_python_keywords_and_run_fields_reach_the_same_network():
    by_keywords = get_config("piip_tsb", task="det", resolutions="896/672/448", interactions=2, interaction_attn="regular",
                             drop_path_rate=0.05, qk_norm=True, interaction={"num_points": 8}, num_classes=7)
    cfg = load_config(None, ["model.name=piip_tsb", "model.resolutions=896/672/448", "model.interactions=2",
                             "model.interaction_attn=regular", "model.drop_path_rate=0.05",
                             "model.overrides.qk_norm=true", "model.overrides.interaction={num_points: 8}",
                             "model.num_classes=7"], task="cls")
    by_run = build_model_config(cfg.model, "det")
    assert by_run == by_keywords
    # what each override set, checked field by field against the registered variant
    base = get_config("piip_tsb", task="det")
    assert by_run.resolutions == (896, 672, 448) and base.resolutions != by_run.resolutions
    assert by_run.num_interactions == 2 and base.num_interactions != 2
    assert by_run.interaction.attn_type == "regular" and by_run.interaction.num_points == 8
    assert by_run.interaction.num_heads == base.interaction.num_heads  # the nested config is updated, not replaced
    assert all(b.qk_norm and b.drop_path_rate == 0.05 for b in by_run.branches)
    assert by_run.num_classes == 7


def test_per_branch_drop_path_wins_and_overrides_are_checked():
    config = get_config("piip_tsb", branch_drop_path=[0.3, 0.2, 0.1], drop_path_rate=None)
    assert [b.drop_path_rate for b in config.branches] == [0.3, 0.2, 0.1]
    cfg = load_config(None, ["model.name=piip_tsb", "model.drop_path_rate=0.05",
                             "model.branch_drop_path=[0.3,0.2,0.1]"], task="cls")
    assert [b.drop_path_rate for b in build_model_config(cfg.model, "det").branches] == [0.3, 0.2, 0.1]
    with pytest.raises(ValueError, match="branch_drop_path needs 3 values"):
        get_config("piip_tsb", branch_drop_path=[0.1])
    with pytest.raises(ValueError, match="qk_norm"):
        get_config("piip_tsb", qk_norm="yes please")
    with pytest.raises(TypeError, match="unknown override"):
        get_config("piip_tsb", qk_nrom=True)
    cfg = load_config(None, ["model.name=piip_tsb", "model.overrides.qk_nrom=true"], task="cls")
    with pytest.raises(ValueError, match=r"model: unknown override\(s\) \['qk_nrom'\]"):
        build_model_config(cfg.model, "det")


def test_every_config_round_trips_through_the_one_reader():
    backbone = get_config("piip_fmnist_tsb", task="det")
    assert PIIPConfig.from_json(backbone.to_json()) == backbone
    detector = build_detector(piip.create_model(backbone), 3, class_names=("a", "b", "c"), masks=False)
    again = type(detector.config).from_json(detector.config.to_json())
    assert again == detector.config and isinstance(again.backbone, PIIPConfig)
    segmenter = build_segmenter(piip.create_model(backbone), 4)
    assert type(segmenter.config).from_json(segmenter.config.to_json()) == segmenter.config
    with pytest.raises(ValueError, match=r"backbone\.branches\[0\]\.depth"):  # nested, element by element
        data = detector.config.to_dict()
        data["backbone"]["branches"][0]["depth"] = "deep"
        type(detector.config).from_dict(data)
    with pytest.raises(ValueError, match=r"\['branches'\] are required"):
        PIIPConfig.from_dict({"task": "det"})


def test_tasks_are_plug_ins_behind_one_protocol():
    assert [t.name for t in task_classes()] == ["cls", "det", "seg"]
    assert [t.model_kind for t in task_classes()] == ["piip", "detector", "segmenter"]
    for cls in task_classes():
        assert isinstance(cls.__new__(cls), Task)  # every protocol member is there
    assert get_task_class("det") is DetectionTask
    backbone = piip.create_model(get_config("piip_fmnist_tsb", task="det"))
    assert task_for_model(build_segmenter(backbone, 3)) is SegmentationTask
    assert task_for_model(piip.create_model("piip_fmnist_tsb", task="cls", num_classes=10)) is ClassificationTask
    with pytest.raises(ValueError, match="no task owns a PIIP"):
        task_for_model(backbone)  # a dense backbone alone predicts nothing


def test_a_fourth_task_plugs_into_eval_predict_and_load(tmp_path, monkeypatch):
    """A task registered by one line gets its ``piip eval`` subcommand, its checkpoints load by
    their kind and ``piip.predict`` reaches it: nothing else in the library names the tasks."""
    from piip.engine import task as registry
    from piip.tasks.base import BaseTask
    from piip.weights.checkpoint import _MODEL_KINDS

    @dataclasses.dataclass(frozen=True)
    class CounterConfig(piip.config.Serializable):
        width: int = 3

    class Counter(torch.nn.Module):
        def __init__(self, config: CounterConfig):
            super().__init__()
            self.config = config
            self.scale = torch.nn.Parameter(torch.arange(config.width, dtype=torch.float32))

    class CounterCli:
        HELP = "count things"

        @staticmethod
        def add_eval_arguments(p):
            p.add_argument("--things", type=int, default=1)

        @staticmethod
        def run_eval_command(args, console):
            print(f"counted {args.things}")

    class CounterInference:
        @staticmethod
        def predict(model, images, **kwargs):
            return [{"count": int(im.shape[-1] * model.scale.sum())} for im in images]

        save_prediction = describe_prediction = staticmethod(lambda *a: None)

    class CounterTask(BaseTask, name="count", data_config=dict, metric="count", model_kind="counter",
                      model_config=CounterConfig, model_from_config=Counter, evaluate_checkpoint=None,
                      cli=CounterCli, inference=CounterInference):
        @staticmethod
        def owns(model):
            return isinstance(model, Counter)

    monkeypatch.setattr(registry, "_TASKS", dict(registry._TASKS))
    monkeypatch.setitem(_MODEL_KINDS, "counter", None)  # restored (removed) after the test
    registry.register_task(CounterTask)
    model = Counter(CounterConfig(width=4))
    path = piip.save(model, tmp_path / "counter.safetensors")
    loaded = piip.load(path)
    assert isinstance(loaded, Counter) and loaded.config == CounterConfig(width=4)
    assert piip.predict(loaded, [torch.zeros(3, 2, 5)]) == [{"count": 5 * 6}]
    from piip.cli import build_parser

    args = build_parser().parse_args(["eval", "count", "--checkpoint", str(path), "--things", "3"])
    assert isinstance(args, argparse.Namespace) and args.things == 3 and args.task == "count"


def test_the_builders_follow_the_onednn_switch_and_the_class_stays_plain(monkeypatch):
    """``PIIP(config)`` re-classes nothing; the builders (create_model, build_detector, build_segmenter,
    checkpoint loading) route the dense layers as the process setting says, the CLI/env can turn it off."""
    from piip.models.piip import PIIP
    from piip.ops import Linear, set_onednn_linears

    def kinds(model):
        return {type(m) for m in model.modules() if isinstance(m, torch.nn.Linear)}

    config = get_config("piip_fmnist_tsb", task="det")
    assert kinds(PIIP(config)) == {torch.nn.Linear}
    try:
        for enabled, expected in ((True, {Linear}), (False, {torch.nn.Linear})):
            set_onednn_linears(enabled)
            backbone = piip.create_model(config)
            assert kinds(backbone) == expected
            assert kinds(build_detector(backbone, 2)) == expected  # torchvision's box head included
            assert kinds(build_segmenter(piip.create_model(config), 2)) == expected
    finally:
        set_onednn_linears(None)
    cfg = load_config(None, ["model.name=piip_fmnist_tsb", "run.onednn_linears=false"], task="cls")
    assert cfg.run.onednn_linears is False
