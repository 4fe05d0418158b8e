"""What a user can get wrong on piip's command line ends in one line naming the file, field or option
(``piip: error: ...`` on stderr, exit status 2; argparse's own errors name the option), never in a
traceback; ``null`` in a run config means the field's default (or ``None`` where the field takes it).

Every run here fails before training: the data roots point at folders that do not exist, so a check
that is missing shows up as the wrong message, not as a long run."""
import json

import pytest

from piip.cli import main
from piip.engine.config import OptimConfig, RunConfig, TrainConfig, load_config

from conftest import tiny_config


def run_cli(argv, capsys) -> tuple[int, str, str]:
    """``(exit status, stdout, stderr)`` of ``piip argv`` run in this process."""
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's errors
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, out, err, *names) -> str:
    """Exit status 2, nothing on stdout, one line ``piip: error: ...`` on stderr naming ``names``."""
    assert code == 2, (out, err)
    assert "Traceback" not in out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("piip: error: "), err
    assert out.strip() == ""
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


def assert_option_error(code, out, err, option) -> str:
    """argparse's refusal: exit status 2, its usage, then one error line naming ``option``."""
    assert code == 2 and "Traceback" not in out + err
    last = err.strip().splitlines()[-1]
    assert ": error: argument " + option in last, err
    return last


@pytest.fixture
def cls_run(tmp_path):
    """``piip train cls`` arguments whose data does not exist (fails fast if a check is missing)."""
    return ["train", "cls", "fashion_mnist", f"data.root={tmp_path / 'no_data'}", f"run.out_dir={tmp_path / 'run'}",
            "run.progress=false"]


@pytest.fixture
def det_run(tmp_path):
    return ["train", "det", "scenes_det", f"data.root={tmp_path / 'no_data'}", f"run.out_dir={tmp_path / 'run'}",
            "run.progress=false"]


# -- null means the default ------------------------------------------------------------------------
def test_null_anchor_sizes_means_the_detectors_default_anchors(tmp_path):
    from piip.tasks.detection.model import DetectorConfig
    from piip.tasks.detection.task import DetectionTask

    cfg = load_config("scenes_det", ["model.head.anchor_sizes=null", f"data.root={tmp_path}"])
    task = DetectionTask(cfg)
    assert "anchor_sizes" not in task.head and task.head["fpn_channels"] == 64   # the rest of the recipe stays
    config = DetectorConfig(backbone=tiny_config("det"), num_classes=3, **task.head)
    assert config.anchor_sizes == (32, 64, 128, 256, 512)


def test_null_class_weight_drops_the_recipes_eleven_weights(tmp_path):
    from piip.tasks.segmentation.model import SegmenterConfig
    from piip.tasks.segmentation.task import SegmentationTask

    assert len(load_config("scenes_seg").model.head["class_weight"]) == 11
    task = SegmentationTask(load_config("scenes_seg", ["model.head.class_weight=null"]))
    assert "class_weight" not in task.head and task.head["channels"] == 64
    config = SegmenterConfig(backbone=tiny_config("det"), num_classes=2, **task.head)   # a 2-class dataset
    assert config.class_weight == ()


def test_null_keeps_none_where_the_field_takes_it(tmp_path):
    from piip.tasks.segmentation.task import SegmentationTask

    task = SegmentationTask(load_config("scenes_seg", ["model.head.test_scale=null"]))
    assert task.head["test_scale"] is None                                   # "keep the images' size"
    cfg = load_config("fashion_mnist", ["optim.clip_grad=none", "run.ema_decay=null", "data.root=null"])
    assert cfg.optim.clip_grad is None and cfg.run.ema_decay is None and cfg.data.root is None


def test_null_is_the_default_in_every_section_and_in_files(tmp_path):
    cfg = load_config("scenes_seg", ["optim.lr=null", "optim.batch_size=none", "run.out_dir=null",
                                     "data.scale=null", "optim.milestones=null", "model.head=null"])
    assert cfg.optim.lr == OptimConfig.lr and cfg.optim.batch_size == OptimConfig.batch_size
    assert cfg.run.out_dir == RunConfig.out_dir and cfg.data.scale == [2048, 512] and cfg.optim.milestones == []
    assert cfg.model.head == {}
    # a plain text field reads "none" as the text (Fashion-MNIST without augmentation)
    assert load_config("fashion_mnist", ["data.augment=none"]).data.augment == "none"
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"task": "seg", "model": {"name": "piip_fmnist_tsb", "head": {"class_weight": None}},
                                "optim": {"batch_size": None, "betas": None}, "run": None}))
    cfg = load_config(path)
    assert cfg.optim.batch_size == 1024 and cfg.optim.betas == [0.9, 0.999] and cfg.run == RunConfig()
    assert TrainConfig.from_json(cfg.to_json()) == cfg


def test_the_issues_commands_end_in_one_line_naming_the_data_not_a_traceback(tmp_path, capsys):
    """``null`` passes the head check; the run then stops at the missing data (before training)."""
    code, out, err = run_cli(["train", "det", "scenes_det", "model.head.anchor_sizes=null",
                              f"data.root={tmp_path / 'none'}", f"run.out_dir={tmp_path / 'r1'}"], capsys)
    assert_one_line_error(code, out, err, str(tmp_path / "none"))
    code, out, err = run_cli(["train", "seg", "scenes_seg", "model.head.class_weight=null",
                              f"data.root={tmp_path / 'none'}", f"run.out_dir={tmp_path / 'r2'}"], capsys)
    assert_one_line_error(code, out, err, str(tmp_path / "none"))


# -- the CLI's handler: one line on stderr ---------------------------------------------------------
def test_a_long_library_error_is_one_line_on_stderr(capsys):
    code, out, err = run_cli(["train", "cls", "nonexistent_config"], capsys)
    line = assert_one_line_error(code, out, err, "nonexistent_config")
    assert "upernet_piip_h6b_ade20k_80k" in line                            # not wrapped at the terminal width


@pytest.mark.parametrize("text,name,message", [
    ("task: [unclosed\n", "bad.yaml", "not valid YAML"),
    ("- 1\n- 2\n", "list.yaml", "must hold a mapping"),
    ("[1, 2]", "list.json", "must hold a mapping"),
    ("", "empty.json", "is empty"),
    ("not json {", "bad.json", "not valid JSON"),
])
def test_config_files_that_are_not_configs(tmp_path, capsys, text, name, message):
    path = tmp_path / name
    path.write_text(text)
    code, out, err = run_cli(["train", "cls", str(path)], capsys)
    assert_one_line_error(code, out, err, name, message)


def test_a_folder_or_a_binary_file_as_the_config(tmp_path, capsys):
    code, out, err = run_cli(["train", "cls", str(tmp_path)], capsys)
    assert_one_line_error(code, out, err, str(tmp_path), "is a folder")
    binary = tmp_path / "model.safetensors"
    binary.write_bytes(b"\x80\x81\xfe\xff" * 8)
    code, out, err = run_cli(["train", "cls", str(binary)], capsys)
    assert_one_line_error(code, out, err, "model.safetensors")


@pytest.mark.parametrize("override,names", [
    ("optim.betas=[a,b]", ["optim.betas", "list[float]"]),
    ("optim.betas=[0.9]", ["optim.betas", "2 values"]),
    ("optim.milestones=[a]", ["optim.milestones"]),
    ("model.branch_drop_path=[a,b,c]", ["model.branch_drop_path"]),
    ("data.mean=[a,b,c]", ["data.mean", "tuple[float, float, float]"]),
    ("optim.betas=[0.9,", ["optim.betas"]),
    ("optim.batch_size=0", ["optim.batch_size", ">= 1"]),
    ("optim.batch_size=-4", ["optim.batch_size", ">= 1"]),
    ("optim.accum_steps=0", ["optim.accum_steps"]),
    ("optim.epochs=-1", ["optim.epochs"]),
    ("optim.steps=-1", ["optim.steps"]),
    ("optim.lr=-1", ["optim.lr", ">= 0"]),
    ("optim.warmup_steps=-5", ["optim.warmup_steps"]),
    ("aug.label_smoothing=2", ["aug.label_smoothing", "[0, 1)"]),
    ("aug.mixup=-1", ["aug.mixup"]),
    ("run.log_every=0", ["run.log_every"]),
    ("run.eval_every=-1", ["run.eval_every"]),
    ("run.ema_decay=2", ["run.ema_decay"]),
    ("run.device=nodevice", ["run.device", "'nodevice'"]),
    ("run.device=cuda:99", ["run.device", "cuda:99"]),
    ("task=det", ["task", "not an override"]),
    ("=1", ["'=1'", "no key"]),
    ("optim.lr=abc", ["optim.lr", "float"]),
])
def test_bad_values_are_refused_before_the_run_in_one_line(cls_run, capsys, override, names):
    code, out, err = run_cli([*cls_run, override], capsys)
    assert_one_line_error(code, out, err, *names)


@pytest.mark.parametrize("override,names", [
    ("model.head.anchor_sizes=[a,b,c,d,e]", ["model.head.anchor_sizes", "tuple[int, ...]"]),
    ("model.head.anchor_sizes=abc", ["model.head.anchor_sizes"]),
    ("model.head.fpn_channels=abc", ["model.head.fpn_channels", "int"]),
    ("model.head.image_mean=[1,2]", ["model.head.image_mean"]),
    ("model.head.masks=maybe", ["model.head.masks", "bool"]),
    ("model.head.score_thresh=[1,", ["model.head.score_thresh", "YAML"]),
])
def test_head_values_of_the_wrong_type_name_the_head_field(det_run, capsys, override, names):
    code, out, err = run_cli([*det_run, override], capsys)
    assert_one_line_error(code, out, err, *names)


def test_segmenter_settings_out_of_range_are_one_line_errors():
    from piip.tasks.segmentation.model import SegmenterConfig

    backbone = tiny_config("det")
    for settings, name in [({"channels": -1}, "channels"), ({"aux_channels": -1}, "aux_channels"),
                           ({"dropout": 2.0}, "dropout"), ({"image_std": (0.0, 0.0, 0.0)}, "image_std"),
                           ({"class_weight": None}, "class_weight"), ({"crop_size": 0}, "crop_size")]:
        with pytest.raises(ValueError, match=f"SegmenterConfig.*{name}"):
            SegmenterConfig(backbone=backbone, num_classes=2, **settings)


# -- options -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv,option", [
    (["eval", "cls", "--checkpoint", "x.safetensors", "--data", "fashion_mnist", "--batch-size", "0"], "--batch-size"),
    (["eval", "cls", "--checkpoint", "x.safetensors", "--data", "fashion_mnist", "--limit", "-1"], "--limit"),
    (["eval", "cls", "--checkpoint", "x.safetensors", "--data", "fashion_mnist", "--crop-pct", "-1"], "--crop-pct"),
    (["eval", "det", "--checkpoint", "x.safetensors", "--workers", "-1"], "--workers"),
    (["eval", "seg", "--checkpoint", "x.safetensors", "--device", "nodevice"], "--device"),
    (["predict", "img.png", "--checkpoint", "x.safetensors", "--device", "cuda:99"], "--device"),
    (["predict", "img.png", "--checkpoint", "x.safetensors", "--score-threshold", "2"], "--score-threshold"),
    (["bench", "vit_fmnist_t", "--device", "nodevice"], "--device"),
    (["flops", "piip_tsb", "--interactions", "-1"], "--interactions"),
    (["data", "scenes", "OUT", "--train", "-1"], "--train"),
    (["demo", "--epochs", "-1"], "--epochs"),
    (["demo", "det", "--train-scenes", "0"], "--train-scenes"),
])
def test_out_of_range_options_are_refused_by_the_parser(tmp_path, monkeypatch, capsys, argv, option):
    # if a check were missing: nothing written where the tests run, no Fashion-MNIST to train on
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PIIP_FASHION_MNIST", str(tmp_path / "no_fashion_mnist"))
    code, out, err = run_cli(argv, capsys)
    assert_option_error(code, out, err, option)


def test_train_without_a_config_asks_only_for_the_config(capsys):
    code, out, err = run_cli(["train", "cls"], capsys)
    assert code == 2 and err.strip().splitlines()[-1].endswith("the following arguments are required: config")


# -- what the handler catches, and what it does not ----------------------------------------------------
def _failing_command(monkeypatch, error):
    def fail(args):
        raise error
    monkeypatch.setattr("piip.cli._cmd_list", fail)


def test_weights_that_cannot_be_downloaded_are_one_line(monkeypatch, capsys):
    from piip.weights import HubUnavailableError

    _failing_command(monkeypatch, HubUnavailableError("cannot initialise every branch:\n  branch1: offline\n"
                                                      "Pass local files: model.branch_weights"))
    code, out, err = run_cli(["list"], capsys)
    assert_one_line_error(code, out, err, "branch1: offline", "model.branch_weights")


def test_a_diverging_run_is_one_line(monkeypatch, capsys):
    _failing_command(monkeypatch, FloatingPointError("loss is nan at step 3"))
    assert_one_line_error(*run_cli(["list"], capsys), "loss is nan at step 3")


def test_an_interrupt_is_one_line(monkeypatch, capsys):
    _failing_command(monkeypatch, KeyboardInterrupt())
    try:
        code, out, err = run_cli(["list"], capsys)
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped piip's main: a traceback")
    assert code == 130 and err.strip() == "piip: interrupted"


@pytest.mark.parametrize("error", [KeyError("x"), TypeError("x"), RuntimeError("x"), AttributeError("x")])
def test_programming_errors_keep_their_traceback(monkeypatch, error):
    _failing_command(monkeypatch, error)
    with pytest.raises(type(error)):
        main(["list"])


def test_data_and_network_sections_set_by_overrides_are_checked():
    """An override sets a task's data field after the section was built: it is checked all the same;
    a hand-written model.piip that is not a network config is named."""
    with pytest.raises(ValueError, match="data.crop_size must be positive"):
        load_config("scenes_seg", ["data.crop_size=-1"])
    with pytest.raises(ValueError, match="data.scale"):
        load_config("scenes_seg", ["data.scale=[a,b]"])
    from piip.engine.build import build_model_config

    cfg = load_config("scenes_det", ["model.piip={x: 1}"])
    with pytest.raises(ValueError, match="model.piip is not a PIIPConfig"):
        build_model_config(cfg.model, "det")


def test_predict_into_a_file_and_convert_with_a_list_config_say_what_is_wrong(tmp_path, capsys):
    from PIL import Image

    from piip.compat.original.files import _resolve_config

    image, taken = tmp_path / "a.png", tmp_path / "taken"
    Image.new("RGB", (8, 8)).save(image)
    taken.write_text("not a folder")
    code = main(["predict", str(image), "--checkpoint", str(tmp_path / "missing.safetensors"), "--out", str(taken)])
    out, err = capsys.readouterr()
    assert code == 2 and "is a file; name a folder" in err and "Errno" not in err
    listing = tmp_path / "list.json"
    listing.write_text("[1, 2]")
    with pytest.raises(ValueError, match="holds a JSON list, not the authors' backbone kwargs"):
        _resolve_config(str(listing))


def test_classification_refuses_head_settings_it_has_none_of(capsys):
    code = main(["train", "cls", "fashion_mnist", "model.head.x=1", "run.device=cpu"])
    out, err = capsys.readouterr()
    assert code == 2 and "classification has no model.head settings (got model.head.['x'])" in err
