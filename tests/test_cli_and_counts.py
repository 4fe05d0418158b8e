"""The CLI and the `actual` counting convention (the model as built, counted on the meta device)."""
import json
import subprocess
import sys

import pytest

from piip.analysis import actual_complexity
from piip.cli import main
from piip.models.registry import get_config, list_models


PAPER_VARIANTS = [n for n in list_models() if "fmnist" not in n]


@pytest.mark.parametrize("name", PAPER_VARIANTS)
def test_flops_json_answers_every_paper_variant(name, capsys):
    assert main(["flops", name, "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["name"] == name and record["convention"] == "paper"
    assert isinstance(record["params"], int) and record["params"] > 1e6
    assert isinstance(record["macs"], int) and record["macs"] > 1e9
    assert record["resolutions"] == "/".join(map(str, get_config(name).resolutions))


def test_flops_overrides_and_cls(capsys):
    assert main(["flops", "piip_tsb", "--task", "cls", "--resolutions", "368/192/128", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["task"] == "cls" and abs(record["macs"] / 1e9 - 17.4) < 0.1
    assert main(["flops", "piip_tsb", "--interactions", "2", "--attn", "regular", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["interactions"] == 2 and record["attn"] == "regular" and abs(record["macs"] / 1e9 - 245) < 1.5


def test_flops_of_the_tiny_patch_4_variants(capsys):
    """The paper convention is the authors' patch-16 script: it refuses patch 4 and says what to use."""
    assert main(["flops", "piip_fmnist_tsb", "--task", "cls", "--convention", "actual", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["resolutions"] == "28/20/12" and 1e6 < record["params"] < 2e6 and 1e7 < record["macs"] < 3e7
    assert main(["flops", "piip_fmnist_tsb"]) == 2
    assert "--convention actual" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["flops", "piip_tbs"], "did you mean 'piip_tsb'"),
    (["flops", "piip_tsb", "--resolutions", "1120/x/448"], "A/B/C"),
    (["flops", "piip_tsb", "--resolutions", "1120/448"], "3 branches"),
])
def test_cli_bad_input_is_a_clear_error(argv, message, capsys):
    assert main(argv) == 2
    assert message in " ".join(capsys.readouterr().err.split())


def test_cli_dtype_choices_are_the_autocast_table():
    from piip.cli import DTYPES
    from piip.precision import AUTOCAST_DTYPES

    assert DTYPES == tuple(AUTOCAST_DTYPES)


def test_console_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "piip", "flops", "vitdet_base", "--json"],
                         capture_output=True, text=True, check=True).stdout
    record = json.loads(out)
    assert record["name"] == "vitdet_base" and record["params"] / 1e6 == pytest.approx(89.6, abs=0.05)


# Real detection backbones as built and counted by running the authors' code (reference §3.5 and
# §4.4, "[ran]"): parameters of the whole backbone incl. conv merges and simple-FPN deconvolutions.
@pytest.mark.parametrize("name,params_m", [
    ("vitdet_base", 92.9), ("vitdet_large", 315.9), ("piip_tsb", 175.0), ("piip_sbl", 547.8),
    ("piip_sbl_augreg", 548.6),
])
def test_actual_params_match_the_authors_built_backbones(name, params_m):
    assert actual_complexity(get_config(name)).params / 1e6 == pytest.approx(params_m, abs=0.06)


def test_actual_macs_of_tsb_match_the_authors_detection_counter():
    # get_flops_det.py on the real TSB 1120/896/448 backbone stops after the merge: 307.3G
    result = actual_complexity(get_config("piip_tsb"))
    assert (result.macs - result.fpn_macs) / 1e9 == pytest.approx(307.3, rel=0.005)
    assert result.fpn_macs > 0


def test_actual_count_of_a_6b_variant_allocates_nothing():
    result = actual_complexity(get_config("piip_h6b"))
    assert result.params > 7e9 and result.macs > 1e13


def test_convert_command_on_an_mmdetection_style_checkpoint(tmp_path, capsys):
    import torch
    from safetensors.torch import load_file

    import piip
    from conftest import FIXTURES

    tensors = load_file(str(FIXTURES / "det3_deit.safetensors"))
    state = {f"backbone.{k[len('state_dict/'):]}": v for k, v in tensors.items() if k.startswith("state_dict/")}
    state["neck.lateral_convs.0.conv.weight"] = torch.randn(4, 4, 1, 1)
    source = tmp_path / "mask_rcnn_fixture.pth"
    torch.save({"meta": {"epoch": 12}, "state_dict": state}, source)
    out = tmp_path / "converted.safetensors"
    assert main(["convert", str(source), "--config", str(FIXTURES / "det3_deit.json"), "-o", str(out)]) == 0
    assert "neck" in capsys.readouterr().out
    assert json.loads(out.with_suffix(".json").read_text())["task"] == "det"
    model = piip.load(out)
    with torch.no_grad():
        maps = list(model(tensors["input"]).values())
    for i, produced in enumerate(maps):
        expected = tensors[f"output/{i}"]
        assert ((produced - expected).norm() / expected.norm()).item() < 1e-4
    assert main(["convert", str(tmp_path / "missing.pth"), "--config", "piip_tsb", "-o", str(out)]) == 2


def test_bench_measures_in_a_subprocess_and_compares(capsys, monkeypatch):
    # both subprocesses take the same dense-layer path: the automatic oneDNN choice is a timing
    # probe, which a busy host can decide differently in each (outputs then differ by ~1e-6)
    monkeypatch.setenv("PIIP_ONEDNN_LINEARS", "0")
    assert main(["bench", "piip_tsb", "--resolutions", "192/160/128", "--baseline", "piip_tsb",
                 "--baseline-resolutions", "192/160/128", "--repeat", "1", "--warmup", "0", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    model, base, ratios = record["model"], record["baseline"], record["ratios"]
    assert model["latency_ms"] > 0 and model["peak_memory_mb"] > 0 and model["malloc_tuned"]
    expected = actual_complexity(get_config("piip_tsb", resolutions="192/160/128"))
    assert model["macs"] == expected.macs and model["params"] == expected.params
    assert ratios["macs"] == 1.0 and base["macs"] == model["macs"] and base["latency_ms"] > 0
    assert ratios["output_rel_error"] == 0.0  # same seed, same weights, same images, same dtype


def test_bench_times_a_classifier_training_step_with_exact_memory(capsys):
    assert main(["bench", "vit_fmnist_t", "--task", "cls", "--train", "--baseline", "vit_fmnist_s",
                 "--batch", "8", "--repeat", "1", "--warmup", "0", "--no-tune-malloc", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    model, base = record["model"], record["baseline"]
    assert model["mode"] == base["mode"] == "train" and not model["malloc_tuned"]
    assert model["macs"] == actual_complexity(get_config("vit_fmnist_t", task="cls"), (28, 28)).macs
    assert 0 < model["activation_memory_mb"] <= model["peak_memory_mb"]
    assert record["ratios"]["macs"] < 1  # T against S
    assert main(["bench", "vit_fmnist_t", "--task", "seg", "--train"]) == 2
