"""Sharing a model the Hugging Face Hub way (``piip.weights.sharing``, the card of
``piip.analysis.model_card``, ``piip share``), offline: every kind round-trips through a local folder
bit-exactly, the card's figures are ``piip flops``'s, an edited folder is refused, and the hub fails fast
without network."""
from __future__ import annotations

import json
import re
import shlex
import socket
import time

import pytest
import torch

import piip
from piip.cli import main
from piip.tasks import build_detector, build_segmenter
from piip.tasks.segmentation import PIIPSegmenter
from piip.weights import CheckpointError, HubUnavailableError, save_checkpoint
from piip.weights.sharing import from_pretrained, push_to_hub

DET_RESOLUTIONS = "168/136/68"  # piip_fmnist_tsb as `piip demo det` runs it (the pyramid's stride 32 fits)
SMALL_HEADS = {
    "mask_rcnn": dict(fpn_channels=32, box_head_dim=64, mask_head_dim=32),
    "cascade_mask_rcnn": dict(fpn_channels=32, box_head_dim=64, mask_head_dim=32),
    "dino": dict(fpn_channels=32, num_queries=20, dn_queries=10, encoder_layers=1, decoder_layers=1,
                 transformer_ffn_dim=32),
}


@pytest.fixture(autouse=True)
def _one_thread():
    """The models are tiny: one thread runs them fastest, and is not slowed down by a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _perturbed(model):
    with torch.no_grad():  # every tensor non-trivial (the interaction gates start at zero)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def _model(kind: str):
    """``(model, input, class names)`` of one kind, small enough for CPU tests."""
    names = None
    if kind == "backbone":
        model = piip.create_model("piip_fmnist_tsb", task="det", resolutions=DET_RESOLUTIONS)
        x = torch.rand(1, 3, 168, 168)
    elif kind == "classifier":
        model, x = piip.create_model("piip_fmnist_tsb", task="cls"), torch.rand(2, 3, 28, 28)
        names = [f"class {i}" for i in range(10)]
    elif kind == "vit":
        model, x = piip.create_model("vit_fmnist_s", task="cls"), torch.rand(2, 3, 28, 28)
    elif kind == "segmenter":
        body = piip.create_model("piip_fmnist_tsb", task="seg", resolutions=DET_RESOLUTIONS)
        model = build_segmenter(body, 3, class_names=("sky", "tree", "road"), channels=16, aux_channels=8,
                                test_scale=None, inference="whole")
        x = torch.rand(1, 3, 168, 168)
    else:
        fpn_levels = (1, 2, 3) if kind == "dino" else (0, 1, 2, 3)
        body = piip.create_model("piip_fmnist_tsb", task="det", resolutions=DET_RESOLUTIONS, fpn_levels=fpn_levels)
        model = build_detector(body, 2, kind=kind, class_names=("red", "green"), min_size=128, max_size=168,
                               **SMALL_HEADS[kind])
        x = [torch.rand(3, 128, 150)]
    return _perturbed(model), x, names


def _flat(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _flat(v)]
    return [t for item in out for t in _flat(item)]


KINDS = ["backbone", "classifier", "vit", "segmenter", "mask_rcnn", "cascade_mask_rcnn", "dino"]


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_round_trips_through_a_folder_bit_exactly(kind, tmp_path):
    model, x, names = _model(kind)
    folder = model.save_pretrained(tmp_path / kind, class_names=names)
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    for source in (folder, folder / "model.safetensors"):  # the folder, or its checkpoint alone
        loaded = piip.from_pretrained(source)
        assert type(loaded) is type(model) and not loaded.training and loaded.config == model.config
        a, b = model.state_dict(), loaded.state_dict()
        assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
        with torch.no_grad():
            mine, theirs = _flat(model(x)), _flat(loaded(x))
        assert len(mine) == len(theirs) > 0 and all(torch.equal(u, v) for u, v in zip(mine, theirs))
    record = json.loads((folder / "config.json").read_text())
    assert record["model"] == {"classifier": "piip", "vit": "piip", "backbone": "piip",
                               "segmenter": "segmenter"}.get(kind, "detector")
    assert type(model.config).from_dict(record["config"]) == model.config
    expected_names = names or list(getattr(model.config, "class_names", ()))
    assert record.get("class_names", []) == expected_names
    if names:  # a classifier's names travel in its checkpoint header
        assert loaded.class_names == tuple(names)
    assert type(model).from_pretrained(folder).config == model.config  # the classmethod, checked


def _figures(card: str) -> dict[str, dict[str, int | None]]:
    """The card's parameter and MAC cells, by convention (``None``: n/a)."""
    def cells(row: str) -> list[int | None]:
        line = next(ln for ln in card.splitlines() if ln.startswith(f"| {row}"))
        return [int(c.split(" (")[0].replace(",", "")) if c.strip() != "n/a" else None
                for c in [c.strip() for c in line.strip("|").split("|")[1:]]]

    params, macs = cells("Parameters"), cells("MACs")
    return {c: {"params": p, "macs": m} for c, p, m in zip(("paper", "actual"), params, macs)}


def _flops(capsys, args: list[str]) -> dict | None:
    """What ``piip flops ARGS --json`` prints (``None`` when it refuses)."""
    capsys.readouterr()
    code = main([*args, "--json"])
    out = capsys.readouterr().out
    return json.loads(out) if code == 0 else None


def test_the_cards_figures_are_piip_flops(capsys):
    """PIIP-TSB (both conventions) and the tiny classifier (actual only: the paper's script assumes patch
    16): the numbers in the card equal what `piip flops --json` prints, run as the card names it."""
    from piip.analysis.model_card import model_card

    with torch.device("meta"):
        tsb = piip.create_model("piip_tsb")
    tiny = piip.create_model("piip_fmnist_tsb", task="cls")
    for model, expected_command in ((tsb, "flops piip_tsb"), (tiny, "flops piip_fmnist_tsb --task cls")):
        card = model_card(model, repo_id="someone/model")
        named = set(re.findall(r"`piip (flops [^`]*?) --json`", card))  # the commands that give its figures
        assert {c.replace(" --convention actual", "") for c in named} == {expected_command}
        figures = _figures(card)
        for convention in ("paper", "actual"):
            command = expected_command + (" --convention actual" if convention == "actual" else "")
            printed = _flops(capsys, shlex.split(command))
            assert (command in named) == (printed is not None)
            if printed is None:
                assert figures[convention] == {"params": None, "macs": None}
                assert f"no {convention}-convention figure" in card
            else:
                assert figures[convention] == {"params": printed["params"], "macs": printed["macs"]}
        if model is tsb:  # the README's figures of PIIP-TSB
            assert figures["paper"] == {"params": 146_441_707, "macs": 243_132_125_952}


def test_a_detectors_card_counts_its_backbone_and_its_whole_size(tmp_path, capsys):
    model, _, _ = _model("mask_rcnn")
    card = (model.save_pretrained(tmp_path / "det") / "README.md").read_text()
    printed = _flops(capsys, ["flops", "piip_fmnist_tsb", "--resolutions", DET_RESOLUTIONS, "--convention", "actual"])
    assert _figures(card)["actual"] == {"params": printed["params"], "macs": printed["macs"]}
    whole = sum(p.numel() for p in model.parameters())
    assert f"(backbone, neck and heads) has {whole:,} parameters" in card
    assert "pipeline_tag: object-detection" in card and "| Classes | 2 classes: red, green |" in card
    assert 'model = piip.from_pretrained("path/to/this/folder")' in card


def test_the_licence_comes_from_timm():
    from piip.analysis.model_card import _licence_summary, branch_licences, model_card
    from piip.models import get_config

    with torch.device("meta"):
        card = model_card(piip.create_model("vitdet_base"))
    assert "license: apache-2.0" in card
    assert "**Licence of the branch weights:** apache-2.0 (`deit3_base_patch16_224.fb_in22k_ft_in1k`)." in card
    mixed = branch_licences(get_config("piip_lh6b"))  # InternViT-6B (not in timm), MAE ViT-H, DeiT-III ViT-L
    assert [licence for _, _, licence in mixed] == ["unknown", "cc-by-nc-4.0", "apache-2.0"]
    assert _licence_summary(mixed)[0] == "other"
    scratch = model_card(piip.create_model("piip_fmnist_tsb", task="cls"))
    assert "license: unknown" in scratch and "**Licence of the branch weights:** none:" in scratch
    assert "license: mit" in model_card(piip.create_model("vit_fmnist_t", task="cls"), license="mit")


def test_an_edited_folder_is_refused(tmp_path):
    model, _, names = _model("classifier")
    folder = model.save_pretrained(tmp_path / "m", class_names=names)
    path = folder / "config.json"
    original = path.read_text()
    record = json.loads(original)
    record["config"]["branches"][0]["depth"] = 5
    path.write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match=r"config\.json' does not agree with .*model\.safetensors': "
                                              r"config\.branches\[0\]\.depth is 5 in config\.json but 4 in the header"):
        piip.from_pretrained(folder)
    record = json.loads(original)
    record["class_names"][3] = "renamed"
    path.write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match=r"class_names\[3\] is 'renamed' in config\.json but 'class 3'"):
        piip.from_pretrained(folder)
    path.unlink()  # the weights file alone still loads
    assert piip.from_pretrained(folder).config == model.config


def test_what_is_neither_a_folder_nor_a_repo_id(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no folder or file 'nothing', and 'nothing' is not a hub repo id "
                                                r"owner/name\[@revision\]"):
        piip.from_pretrained("nothing")
    with pytest.raises(FileNotFoundError, match="is not a hub repo id"):
        piip.from_pretrained(str(tmp_path / "missing" / "folder"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no model.safetensors"):
        piip.from_pretrained(tmp_path / "empty")
    model, _, _ = _model("classifier")
    with pytest.raises(ValueError, match="class_names has 2 names for a classifier of 10 classes"):
        model.save_pretrained(tmp_path / "m", class_names=["a", "b"])
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(json.dumps({"task": "cls", "optim": {}}))
    with pytest.raises(ValueError, match="holds a config.json that save_pretrained did not write"):
        model.save_pretrained(tmp_path / "run")
    with pytest.raises(TypeError, match="holds a PIIP, not a PIIPSegmenter"):
        PIIPSegmenter.from_pretrained(model.save_pretrained(tmp_path / "cls"))


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


@pytest.mark.parametrize("offline", ["HF_HUB_OFFLINE", "unreachable"])
def test_the_hub_fails_fast_without_network(offline, monkeypatch, tmp_path):
    for name in ("HTTPS_PROXY", "https_proxy", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    if offline == "HF_HUB_OFFLINE":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    model, _, _ = _model("vit")
    start = time.perf_counter()
    with pytest.raises(HubUnavailableError, match=r"cannot push to 'someone/piip-test' on the Hugging Face hub"):
        push_to_hub(model, "someone/piip-test")
    with pytest.raises(HubUnavailableError, match=r"cannot load 'someone/piip-test' \(revision 'v1'\) from the "
                                                  r"Hugging Face hub: .*pass a folder written by save_pretrained"):
        from_pretrained("someone/piip-test@v1")
    assert time.perf_counter() - start < 10
    # the command line: one line, before anything is written
    assert main(["share", "someone/piip-test", str(tmp_path / "out")]) == 2
    assert main(["share", str(model.save_pretrained(tmp_path / "m")), str(tmp_path / "out"),
                 "--push", "someone/piip-test"]) == 2
    assert not (tmp_path / "out").exists()


def test_piip_share_reads_a_training_run(tmp_path, capsys):
    """A `piip train` run folder (its run config, summary and classifier with class names) becomes a
    shared folder whose card holds the recipe and the metrics."""
    from piip.engine import load_config

    run = tmp_path / "run"
    run.mkdir()
    load_config(None, ["model.name=piip_fmnist_tsb", "optim.epochs=2", "optim.lr=0.001"], task="cls").save(
        run / "config.json")
    (run / "summary.json").write_text(json.dumps({"step": 40, "epoch": 2, "best": 0.81, "train_time_s": 90,
                                                  "world_size": 1, "eval": {"top1": 0.81, "top5": 0.99,
                                                                            "num_samples": 1000}}))
    model, _, names = _model("classifier")
    save_checkpoint(model, run / "model.safetensors", metadata={"class_names": json.dumps(names)})
    capsys.readouterr()
    assert main(["share", str(run), str(tmp_path / "out"), "--metric", "top1_ema=0.82", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["files"] == ["README.md", "config.json", "model.safetensors"]
    card = (tmp_path / "out" / "README.md").read_text()
    for line in ("| top1 | 0.81 |", "| top1_ema | 0.82 |", "| best top1 during training | 0.81 |",
                 "**Initialisation**: random (trained from scratch)", "2 epochs, batch", "adamw lr 0.001",
                 "| Classes | 10 classes: class 0, class 1,"):
        assert line in card, line
    loaded = piip.from_pretrained(tmp_path / "out")
    a, b = model.state_dict(), loaded.state_dict()
    assert loaded.class_names == tuple(names) and all(torch.equal(a[k], b[k]) for k in a)
    # sharing the shared folder again keeps its recipe and metrics (config.json holds them)
    assert main(["share", str(tmp_path / "out"), str(tmp_path / "again")]) == 0
    assert "| top1_ema | 0.82 |" in (tmp_path / "again" / "README.md").read_text()
    assert main(["share", str(run), str(tmp_path / "bad"), "--metric", "oops"]) == 2
    assert "piip: error: --metric 'oops' is not NAME=VALUE" in capsys.readouterr().err
