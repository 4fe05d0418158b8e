"""Classification data (Fashion-MNIST, ImageFolder), evaluation and `piip eval cls`."""
import json
import math
import warnings

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import piip
from piip import PIIP
from piip.cli import main
from piip.data import (FASHION_MNIST_CLASSES, DataConfig, build_dataset, build_transforms,
                       check_num_classes, resolve_data_arg)
from piip.tasks import evaluate

from conftest import FMNIST, needs_fmnist, tiny_config


def tiny_cls_model(num_classes: int = 10) -> PIIP:
    config = tiny_config(task="cls", cls_pool="avg", num_classes=num_classes).with_resolutions("64/48/32")
    return PIIP(config).eval()


# -- Fashion-MNIST ------------------------------------------------------------------------------
@needs_fmnist
@pytest.mark.parametrize("augment", ["auto", "timm", "none"])
def test_fashion_mnist_items(augment):
    cfg = DataConfig(image_size=48, limit=200, augment=augment)
    train, val = build_dataset(cfg, "train"), build_dataset(cfg, "val")
    assert len(train) == 200 and len(val) == 200
    assert train.classes == FASHION_MNIST_CLASSES == val.classes
    for ds in (train, val):
        image, label = ds[3]
        assert image.shape == (3, 48, 48) and image.dtype == torch.float32
        assert isinstance(label, int) and 0 <= label < 10
    # grayscale repeated to 3 identical channels (per-channel normalisation aside)
    image, _ = val[0]
    mean, std = torch.tensor(cfg.mean)[:, None, None], torch.tensor(cfg.std)[:, None, None]
    raw = image * std + mean
    assert torch.allclose(raw[0], raw[1], atol=1e-5) and torch.allclose(raw[1], raw[2], atol=1e-5)
    # the official first labels: train starts with Ankle boot (9), test with Ankle boot (9), Pullover (2)
    assert train.targets[:3].tolist() == [9, 0, 0] and val.targets[:2].tolist() == [9, 2]
    assert {int(t) for t in build_dataset(DataConfig(limit=1000), "train").targets} == set(range(10))


@needs_fmnist
def test_fashion_mnist_eval_is_deterministic_and_limit_is_a_prefix():
    a = build_dataset(DataConfig(limit=50), "val")
    b = build_dataset(DataConfig(limit=10), "val")
    assert torch.equal(a[7][0], a[7][0]) and torch.equal(a[7][0], b[7][0])


def test_fashion_mnist_missing_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_dataset(DataConfig(root=str(tmp_path / "nope")), "train")
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        build_dataset(DataConfig(root=str(tmp_path)), "train")


def test_fashion_mnist_env_override(tmp_path, monkeypatch):
    monkeypatch.setenv("PIIP_FASHION_MNIST", str(tmp_path))
    assert DataConfig().resolved_root() == str(tmp_path)


def test_data_config_roundtrip_and_validation():
    cfg = DataConfig(dataset="imagefolder", root="/x", image_size=96, limit=5)
    again = DataConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    with pytest.raises(ValueError, match="dataset"):
        DataConfig(dataset="cifar")
    with pytest.raises(ValueError, match="augment"):
        DataConfig(augment="heavy")
    with pytest.raises(ValueError, match="root is required"):
        build_dataset(DataConfig(dataset="imagefolder"), "train")


def test_timm_train_transform_is_the_papers_recipe():
    t = repr(build_transforms(DataConfig(dataset="imagefolder", root="/x", image_size=64), train=True))
    assert "RandAugment" in t and "bicubic" in t and "RandomErasing" not in t
    e = repr(build_transforms(DataConfig(dataset="imagefolder", root="/x", image_size=64), train=False))
    assert "CenterCrop" in e and "Resize" in e
    # posterize at magnitude 10 (bits 0) must not crash on current Pillow
    cfg = DataConfig(dataset="imagefolder", root="/x", image_size=32, auto_augment="rand-m10-n4-inc1")
    transform = build_transforms(cfg, train=True)
    img = Image.new("RGB", (40, 40), (120, 60, 30))
    for _ in range(50):
        assert transform(img).shape == (3, 32, 32)


# -- ImageFolder --------------------------------------------------------------------------------
def make_folder(root, classes=("cat", "dog", "eel"), per_class=3, corrupt=True, splits=("train", "val")):
    for split in splits:
        for c, name in enumerate(classes):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB" if i % 2 == 0 else "L", (40 + 4 * i, 36), (40 * c, 80, 20 * i)[:1] * 3
                          if i % 2 == 0 else 40 * c).save(d / f"{i}.png")
    if corrupt:
        (root / "train" / classes[1] / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return root


def test_imagefolder_items_and_corrupt_file_skipped(tmp_path):
    root = make_folder(tmp_path)
    cfg = DataConfig(dataset="imagefolder", root=str(root), image_size=32)
    train = build_dataset(cfg, "train")
    assert train.classes == ["cat", "dog", "eel"] and len(train) == 10
    with pytest.warns(RuntimeWarning, match="broken.png"):
        items = [train[i] for i in range(len(train))]
    assert all(x.shape == (3, 32, 32) and x.dtype == torch.float32 for x, _ in items)
    assert train.skipped == 1 and train.bad_files[0].endswith("broken.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a known bad file is counted again, not re-warned
        _ = [train[i] for i in range(len(train))]
    assert train.skipped == 2
    # a whole epoch through a DataLoader
    loader = DataLoader(train, batch_size=4)
    assert sum(len(y) for _, y in loader) == 10 and train.skipped == 3
    val = build_dataset(cfg, "val")
    assert val.classes == train.classes and val[0][0].shape == (3, 32, 32)


def test_imagefolder_val_uses_train_classes(tmp_path):
    make_folder(tmp_path, corrupt=False, splits=("train",))
    (tmp_path / "val" / "eel").mkdir(parents=True)
    Image.new("RGB", (20, 20)).save(tmp_path / "val" / "eel" / "a.png")
    val = build_dataset(DataConfig(dataset="imagefolder", root=str(tmp_path), image_size=16), "val")
    assert val.targets == [2] and val.classes == ["cat", "dog", "eel"]
    (tmp_path / "val" / "fox").mkdir()
    with pytest.raises(ValueError, match="fox"):
        build_dataset(DataConfig(dataset="imagefolder", root=str(tmp_path), image_size=16), "val")


def test_imagefolder_errors(tmp_path):
    cfg = lambda root: DataConfig(dataset="imagefolder", root=str(root), image_size=16)  # noqa: E731
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_dataset(cfg(tmp_path / "missing"), "train")
    with pytest.raises(FileNotFoundError, match="split folder"):
        build_dataset(cfg(tmp_path), "train")
    (tmp_path / "train").mkdir()
    with pytest.raises(ValueError, match="no class sub-folders"):
        build_dataset(cfg(tmp_path), "train")
    (tmp_path / "train" / "a").mkdir()
    (tmp_path / "train" / "a" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="no images"):
        build_dataset(cfg(tmp_path), "train")


def test_check_num_classes(tmp_path):
    root = make_folder(tmp_path, corrupt=False)
    ds = build_dataset(DataConfig(dataset="imagefolder", root=str(root), image_size=16), "train")
    check_num_classes(ds, tiny_cls_model(3).config)
    with pytest.raises(ValueError, match="class-count mismatch.*3 classes.*10 outputs"):
        check_num_classes(ds, tiny_cls_model(10))
    with pytest.raises(ValueError, match="task='cls'"):
        check_num_classes(ds, tiny_config(task="det"))


def test_resolve_data_arg(tmp_path):
    assert resolve_data_arg("fashion_mnist") == ("fashion_mnist", None)
    assert resolve_data_arg(str(tmp_path)) == ("imagefolder", str(tmp_path))
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(b"")
    assert resolve_data_arg(str(tmp_path))[0] == "fashion_mnist"
    with pytest.raises(FileNotFoundError):
        resolve_data_arg(str(tmp_path / "nope"))


# -- evaluation ---------------------------------------------------------------------------------
def test_evaluate_matches_hand_computed_metrics():
    model = tiny_cls_model(10)
    images = torch.randn(12, 3, 64, 64)
    labels = torch.arange(12) % 10
    loader = [(images[:5], labels[:5]), (images[5:], labels[5:])]
    metrics = evaluate(model, loader, num_classes=10)
    with torch.no_grad():
        logits = model(images)
    top1 = 100.0 * (logits.argmax(1) == labels).float().mean().item()
    top5 = 100.0 * (logits.topk(5, 1).indices == labels[:, None]).any(1).float().mean().item()
    assert metrics.num_samples == 12
    assert metrics.top1 == pytest.approx(top1) and metrics.top5 == pytest.approx(top5)
    assert metrics.loss == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item(), rel=1e-5)
    assert metrics.per_class_count == [2, 2] + [1] * 8
    hit = (logits.argmax(1) == labels).float()
    for c in range(10):
        assert metrics.per_class[c] == pytest.approx(100.0 * hit[labels == c].mean().item())
    # a model that is right by construction
    class Oracle(torch.nn.Module):
        def __init__(self, n=4):
            super().__init__()
            self.n = n

        def forward(self, x):
            return torch.nn.functional.one_hot(x[:, 0, 0, 0].long(), self.n).float()
    x = torch.zeros(6, 3, 2, 2)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    x[:, 0, 0, 0] = y.float()
    m = evaluate(Oracle(), [(x, y)], num_classes=4, classes=list("abcd"))
    assert m.top1 == 100.0 and m.per_class == [100.0] * 4 and m.classes == list("abcd")
    y2 = torch.tensor([1, 1, 1, 1, 1, 1])
    m = evaluate(Oracle(5), [(x, y2)], num_classes=5)
    assert m.top1 == pytest.approx(100 * 2 / 6) and m.per_class[0] is None and m.per_class[1] == m.top1
    with pytest.raises(ValueError, match="logits of shape"):
        evaluate(Oracle(), [(x, y)], num_classes=7)


def test_evaluate_bf16_autocast_runs():
    model = tiny_cls_model(10)
    images, labels = torch.randn(4, 3, 64, 64), torch.tensor([1, 2, 3, 4])
    m = evaluate(model, [(images, labels)], 10, amp_dtype=torch.bfloat16)
    assert m.num_samples == 4 and math.isfinite(m.loss)
    assert model.training is False


@needs_fmnist
def test_cli_eval_cls_end_to_end(tmp_path, capsys):
    model = tiny_cls_model(10)
    path = piip.save(model, tmp_path / "tiny.safetensors")
    assert main(["eval", "cls", "--checkpoint", str(path), "--data", "fashion_mnist", "--limit", "64",
                 "--batch-size", "32", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["num_samples"] == 64 and record["dataset"] == "fashion_mnist"
    assert 0 <= record["top1"] <= record["top5"] <= 100 and len(record["per_class"]) == 10
    assert record["classes"] == FASHION_MNIST_CLASSES
    # the same numbers through the library
    ds = build_dataset(DataConfig(image_size=64, limit=64), "val")
    m = evaluate(piip.load(path), DataLoader(ds, batch_size=16), 10)
    assert m.top1 == pytest.approx(record["top1"]) and m.loss == pytest.approx(record["loss"], rel=1e-4)
    # table output
    assert main(["eval", "cls", "--checkpoint", str(path), "--data", FMNIST, "--limit", "16"]) == 0
    out = capsys.readouterr().out
    assert "top-1" in out and "Ankle boot" in out


def test_cli_eval_cls_errors(tmp_path, capsys):
    path = piip.save(tiny_cls_model(5), tmp_path / "five.safetensors")
    make_folder(tmp_path / "data", corrupt=False)
    assert main(["eval", "cls", "--checkpoint", str(path), "--data", str(tmp_path / "data")]) == 2
    assert "class-count mismatch" in capsys.readouterr().err
    assert main(["eval", "cls", "--checkpoint", str(path), "--data", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    det = piip.save(PIIP(tiny_config(task="det")), tmp_path / "det.safetensors")
    assert main(["eval", "cls", "--checkpoint", str(det), "--data", str(tmp_path / "data")]) == 2
    assert "task='cls'" in capsys.readouterr().err


def test_cli_eval_cls_imagefolder(tmp_path, capsys):
    path = piip.save(tiny_cls_model(3), tmp_path / "three.safetensors")
    make_folder(tmp_path / "data")
    assert main(["eval", "cls", "--checkpoint", str(path), "--data", str(tmp_path / "data"), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["num_samples"] == 9 and record["classes"] == ["cat", "dog", "eel"]


def test_cli_train_then_eval_cls_on_an_imagefolder(tmp_path, capsys):
    """`piip train cls` and `piip eval cls` on an ImageFolder tree (a corrupt training image is
    skipped with a warning): the image size comes from the model, the head from the class folders."""
    data = make_folder(tmp_path / "data", per_class=6)
    run = tmp_path / "run"
    with pytest.warns(RuntimeWarning, match="broken.png"):
        assert main(["train", "cls", "fashion_mnist", "data.dataset=imagefolder", f"data.root={data}",
                     "model.name=vit_fmnist_t", "optim.epochs=1", "optim.batch_size=6",
                     f"run.out_dir={run}", "run.progress=false", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["step"] == 3 and summary["eval"]["num_samples"] == 18
    assert json.loads((run / "config.json").read_text())["data"]["dataset"] == "imagefolder"
    assert main(["eval", "cls", "--checkpoint", str(run / "model.safetensors"), "--data", str(data),
                 "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["classes"] == ["cat", "dog", "eel"] and record["num_samples"] == 18
    assert record["top1"] == pytest.approx(summary["eval"]["top1"])
