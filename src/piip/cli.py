"""``piip <command>``: a thin shell over the Python API (parse, call the library, print).

Each command imports the part of the library it runs (the converter, the demonstrations, the
benchmark) inside its function, so that ``piip list`` or ``piip --help`` does not load them all."""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import warnings

from rich.console import Console
from rich.table import Table

from .argtypes import DTYPES, NON_NEGATIVE, POSITIVE, POSITIVE_FLOAT, check_device, device as _device, fraction
from .config.typed import read_yaml_value, split_override
from .tasks import task_classes, task_names

__all__ = ["main"]

# wide enough for the tables when the output is not a terminal (CI logs, pipes)
console = Console(width=shutil.get_terminal_size((120, 24)).columns)


def _model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="registered variant (see `piip list`)")
    parser.add_argument("--resolutions", help="branch resolutions, finest first, e.g. 1120/896/448")
    parser.add_argument("--task", choices=("det", "seg", "cls"), default="det",
                        help="the backbone as the authors' detection, segmentation or classification code builds it")
    parser.add_argument("--interactions", type=NON_NEGATIVE, help="number of evenly spaced interactions")
    parser.add_argument("--attn", choices=("deform", "regular"), help="interaction attention type")


def _overrides(args: argparse.Namespace) -> dict:
    overrides = {"task": args.task}
    if args.resolutions:
        overrides["resolutions"] = args.resolutions
    if args.interactions is not None:
        overrides["interactions"] = args.interactions
    if args.attn:
        overrides["interaction_attn"] = args.attn
    return overrides


def _cmd_list(args: argparse.Namespace) -> None:
    from .models.registry import describe, get_config, list_models

    table = Table(title="PIIP variants")
    for column in ("name", "branches", "resolutions (det)", "description"):
        table.add_column(column)
    for name in list_models(args.pattern):
        config = get_config(name)
        widths = "/".join(str(b.embed_dim) for b in config.branches)
        table.add_row(name, widths, "/".join(map(str, config.resolutions)), describe(name))
    console.print(table)


def _cmd_flops(args: argparse.Namespace) -> None:
    from .analysis import complexity
    from .models.registry import get_config

    config = get_config(args.name, **_overrides(args))
    result = complexity(config, convention=args.convention)
    record = {
        "name": args.name, "task": config.task, "resolutions": "/".join(map(str, config.resolutions)),
        "interactions": config.num_interactions, "attn": config.interaction.attn_type,
        "convention": args.convention, "params": result.params, "macs": result.macs,
    }
    if args.convention == "actual":
        record["fpn_macs"] = result.fpn_macs
    if args.json:
        print(json.dumps(record))
        return
    console.print(f"[bold]{args.name}[/] ({config.task}, {record['resolutions']}, "
                  f"{record['interactions']} interactions, {record['attn']}), {args.convention} convention")
    console.print(f"  params: {result.params / 1e6:,.2f} M")
    scope = ("the whole backbone as built, simple feature pyramid included: "
             f"{record['fpn_macs'] / 1e9:,.2f} G" if args.convention == "actual"
             else "backbone only, as the paper counted")
    console.print(f"  MACs:   {result.macs / 1e9:,.2f} G  (multiply-accumulates, batch 1; {scope})")


def _cmd_bench(args: argparse.Namespace) -> None:
    from .analysis.bench import benchmark, compare

    if args.train and args.task == "seg":
        raise ValueError("--train times a detector step (--task det) or a classifier step (--task cls)")
    if args.detector is not None and args.task != "det":
        raise ValueError(f"--detector needs --task det (a dense backbone), got --task {args.task}")
    common = dict(batch=args.batch, repeat=args.repeat, warmup=args.warmup, device=args.device,
                  tune_malloc=not args.no_tune_malloc, train=args.train, detector=args.detector,
                  compile=args.compile)
    with console.status(f"benchmarking {args.name} ({args.dtype}) ..."):
        model = benchmark(args.name, dtype=args.dtype, **common, **_overrides(args))
    baseline_overrides = {"task": args.task}
    if args.baseline_resolutions:
        baseline_overrides["resolutions"] = args.baseline_resolutions
    baseline_dtype = args.baseline_dtype or args.dtype
    with console.status(f"benchmarking baseline {args.baseline} ({baseline_dtype}) ..."):
        base = benchmark(args.baseline, dtype=baseline_dtype, **common, **baseline_overrides)
    ratios = compare(model, base)
    if args.json:
        print(json.dumps({"model": model.to_dict(), "baseline": base.to_dict(), "ratios": ratios}))
        return
    detector = {"mask_rcnn": "Mask R-CNN", "cascade_mask_rcnn": "Cascade Mask R-CNN", "dino": "DINO"}.get(
        model.detector, model.detector)
    what = ("classifier training step" if args.task == "cls" else f"{detector} training step") if args.train \
        else f"{detector} inference" if detector else "forward"
    table = Table(title=f"{what}, batch {args.batch}, {args.device}, median of {args.repeat}")
    for column in ("model", "dtype", "resolutions", "params (M)", "MACs (G)",
                   "step (ms)" if args.train else "latency (ms)", "peak mem (MiB)", "beyond weights (MiB)",
                   "images/s" if args.train else "GMACs/s"):
        table.add_column(column, justify="right")
    for r in (model, base):
        rate = f"{r.batch / (r.latency_ms / 1e3):.2f}" if args.train else f"{r.macs_per_s / 1e9:.1f}"
        table.add_row(r.name, r.dtype, r.resolutions, f"{r.params / 1e6:.1f}", f"{r.macs / 1e9:.1f}",
                      f"{r.latency_ms:.0f}", f"{r.peak_memory_mb:.0f}", f"{r.activation_memory_mb:.0f}", rate)
    table.add_row("ratio", "", "", f"{model.params / base.params:.3f}", f"{ratios['macs']:.3f}",
                  f"{ratios['latency']:.3f}", f"{ratios['peak_memory']:.3f}", f"{ratios['activation_memory']:.3f}",
                  f"{ratios['speedup']:.3f}" if args.train else f"{ratios['macs_per_s']:.3f}")
    console.print(table)
    if "output_rel_error" in ratios:
        console.print(f"output relative L2 error vs baseline: {ratios['output_rel_error']:.2e}; "
                      f"speed-up {ratios['speedup']:.2f}x")


def _cmd_plan(args: argparse.Namespace) -> None:
    from .analysis.memory_plan import plan_memory

    with console.status(f"measuring {args.source}'s activations ..."):
        plan = plan_memory(args.source, task=args.task, gpus=args.gpus, gpu_memory_gb=args.gpu_memory,
                           batch_per_gpu=args.batch_per_gpu, amp=args.amp)
    if args.json:
        print(json.dumps(plan.to_dict(), default=str))
        return
    table = Table(title=f"per-GPU memory (GB) of training {plan.model} on {plan.gpus} x {plan.gpu_memory_gb:g} GB")
    table.add_column("")
    for s in plan.strategies:
        table.add_column(s.strategy, justify="right")
    for label, values in plan.rows():
        table.add_row(label, *(f"{v / 1e9:.2f}" if isinstance(v, int) else v for v in values))
    console.print(table)
    for line in plan.summary():
        console.print(line, highlight=False, markup=False)


def _cmd_convert(args: argparse.Namespace) -> None:
    from .compat.original import convert_checkpoint

    heads = {}
    for item in args.head:
        key, raw = split_override(item)
        heads[key] = read_yaml_value(raw, f"--head {key}")
    with console.status(f"converting {args.checkpoint} ..."):
        summary = convert_checkpoint(args.checkpoint, args.config, args.output, task=args.task,
                                     use_ema=args.ema, heads=heads or None)
    if args.json:
        print(json.dumps(summary, default=str))
        return
    console.print(f"[green]wrote[/] {summary['output']} ({summary['num_tensors']} tensors, "
                  f"{summary['num_params'] / 1e6:.1f}M parameters, task {summary['task']}, "
                  f"from a {summary['layout']} checkpoint) and {summary['config_json']}")
    if summary["extra"]:
        kept = ", ".join(f"{prefix} ({n})" for prefix, n in summary["extra"].items())
        console.print(f"kept head tensors under their own prefixes: {kept}")
    console.print(f"load it with: piip.load({summary['output']!r})")


def _cmd_share(args: argparse.Namespace) -> None:
    from .analysis.model_card import card_info_from
    from .weights.sharing import from_pretrained, repo_to_push, require_hub, save_pretrained, upload_pretrained

    if args.push:
        require_hub("push to", repo_to_push(args.push))  # within seconds, before anything is loaded or written
    metrics = {}
    for item in args.metric:
        name, sep, raw = item.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"--metric {item!r} is not NAME=VALUE")
        metrics[name.strip()] = read_yaml_value(raw, f"--metric {name.strip()}")
    info = card_info_from(args.source)
    if args.recipe:
        info["recipe"] = args.recipe
    if metrics:
        info["metrics"] = {**info.get("metrics", {}), **metrics}
    with console.status(f"writing {args.out_dir} ..."):
        model = from_pretrained(args.source)
        out = save_pretrained(model, args.out_dir, repo_id=args.push, license=args.license, **info)
    url = None
    if args.push:
        with console.status(f"uploading to {args.push} ..."):
            url = upload_pretrained(out, args.push, private=args.private)
    if args.json:
        files = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
        print(json.dumps({"out_dir": str(out), "files": files, "repo_id": args.push, "url": url}))
        return
    console.print(f"[green]wrote[/] {out}/model.safetensors, config.json and README.md (the model card)")
    if url:
        console.print(f"[green]pushed[/] to {url}")
    console.print(f"load it with: piip.from_pretrained({(args.push or str(out))!r})")


def _cmd_train(args: argparse.Namespace) -> None:
    from .engine import load_config, train
    from .engine.distributed import cleanup, is_main

    cfg = load_config(args.config, args.overrides, task=args.task)
    check_device(cfg.run.device, "run.device")
    try:
        summary = train(cfg, resume=args.resume or None)
        if is_main():
            summary = {k: v for k, v in summary.items() if k != "step_losses"}
            if args.json:
                print(json.dumps(summary, default=str))
            else:
                console.print(f"[green]done[/]: {summary['step']} steps, {summary['epoch']} epochs; "
                              f"eval {summary['eval']}; outputs in {summary['out_dir']}")
    finally:
        cleanup()


def _cmd_demo(args: argparse.Namespace) -> None:
    overrides = list(args.overrides)
    task = overrides.pop(0) if overrides and overrides[0] in ("cls", "det", "seg") else "cls"
    if task == "seg":
        from .demo.segmentation import run_segmentation_demo

        run_segmentation_demo(args.out or "outputs/demo_seg", train_scenes=args.train_scenes or 400,
                              val_scenes=args.val_scenes, pretrain_limit=args.pretrain_limit, epochs=args.epochs,
                              overrides=overrides, fresh=args.fresh, console=console)
        return
    if task == "det":
        from .demo.detection import run_detection_demo

        run_detection_demo(args.out or "outputs/demo_det", train_scenes=args.train_scenes or 400, val_scenes=args.val_scenes,
                           pretrain_limit=args.pretrain_limit, epochs=args.epochs, overrides=overrides,
                           fresh=args.fresh, console=console)
        return
    from .demo import run_demo

    if args.data is not None:
        overrides.append(f"data.root={args.data}")
    run_demo(args.out or "outputs/demo", epochs=args.epochs or 1, pretrain_branches=args.pretrain_branches,
             overrides=overrides, finetune_epochs=args.finetune_epochs, fresh=args.fresh, console=console)


def _cmd_eval(args: argparse.Namespace) -> None:
    from .tasks import get_task_class

    get_task_class(args.task).run_eval_command(args, console)


def _cmd_predict(args: argparse.Namespace) -> None:
    from .tasks.predict import predict_files

    result = predict_files(args.checkpoint, args.inputs, args.out, score_threshold=args.score_threshold,
                           device=args.device, batch_size=args.batch_size, draw=not args.no_draw,
                           overwrite=args.overwrite, progress=console.is_terminal and not args.json)
    if args.json:
        print(json.dumps(result["predictions"]))
        return
    if len(result["descriptions"]) <= 20:
        for path, line in result["descriptions"].items():
            console.print(f"{path}: {line}")
    rate = f" ({result['images_per_second']:.2f} images/s)" if result["predicted"] else ""
    console.print(f"predicted {result['predicted']} images{rate}"
                  + (f", skipped {result['skipped']} already in {result['json']}" if result["skipped"] else "")
                  + (f", {result['failed']} unreadable (their lines say why)" if result["failed"] else "")
                  + f"; wrote {result['json']}"
                  + (f" and {len(result['images'])} drawn images to {args.out}" if result["images"] else ""))


def _cmd_export_onnx(args: argparse.Namespace) -> int:
    import os

    from .export import export_onnx

    if os.path.isfile(args.source):
        if args.task is not None:
            raise ValueError("--task applies to a variant name; a checkpoint holds its own model")
        from .weights.checkpoint import load_checkpoint

        model = load_checkpoint(args.source)
    else:
        from .models import create_model, list_models

        if args.source not in list_models() and os.sep in args.source or args.source.endswith(".safetensors"):
            raise FileNotFoundError(f"{args.source!r}: no such checkpoint file")
        model = create_model(args.source, task=args.task or "det")
    with console.status(f"exporting {args.source} to {args.output} ..."):
        result = export_onnx(model, args.output, size=tuple(args.size) if args.size else None, dynamic=args.dynamic,
                             opset=args.opset, check=not args.no_check)
    if args.json:
        print(json.dumps(result.to_dict(), default=str))
    else:
        dynamic = list(result.dynamic_axes.get("images", {}).values())
        console.print(f"[green]wrote[/] {result.path} ({result.file_bytes / 2**20:.1f} MiB, {result.kind}, input "
                      f"images {'x'.join(map(str, result.input_shape))}"
                      f"{', dynamic ' + '/'.join(dynamic) if dynamic else ''}, opset {result.opset}) "
                      f"in {result.export_seconds:.1f} s")
        console.print(f"outputs: {', '.join(result.output_names)}")
        for note in result.notes:
            console.print(f"note: {note}")
        for check in result.checks:
            console.print(f"check (onnxruntime vs PyTorch) {check.describe()}")
    return 1 if result.check_passed is False else 0


def _cmd_data_scenes(args: argparse.Namespace) -> None:
    from .data.scenes import generate_scenes, generate_semantic_scenes

    if args.semantic:
        root = generate_semantic_scenes(args.out, train_images=args.train, val_images=args.val, seed=args.seed,
                                        fashion_mnist_root=args.fashion_mnist, progress=console.is_terminal)
        console.print(f"[green]wrote[/] {args.train} training and {args.val} validation scenes in the ADE20K layout "
                      f"to {root} (data.dataset=ade20k data.root={root})")
        return
    paths = generate_scenes(args.out, train_images=args.train, val_images=args.val, seed=args.seed,
                            fashion_mnist_root=args.fashion_mnist, progress=console.is_terminal)
    console.print(f"[green]wrote[/] {args.train} training and {args.val} validation scenes: "
                  f"{paths['train']}, {paths['val']} (COCO format; data.root={args.out} "
                  "data.train_split=train data.val_split=val)")


def _cmd_data_trees(args: argparse.Namespace) -> None:
    from .data.trees import write_tree_crowns

    paths = write_tree_crowns(args.out, sources=("yell541", "yell528") if args.full else ("yell541",))
    counts = {split: json.loads(path.read_text()) for split, path in paths.items()}
    sizes = ", ".join(f"{len(d['images'])} {split} crops ({len(d['annotations'])} crowns)" for split, d in counts.items())
    console.print(f"[green]wrote[/] {sizes} to {args.out} (COCO format, boxes only; data.root={args.out} "
                  "data.train_split=train data.val_split=val)")


def _add_eval_run_options(p: argparse.ArgumentParser) -> None:
    """How every ``piip eval`` subcommand runs: loader workers, image limit, device, dtype, output."""
    p.add_argument("--workers", type=NON_NEGATIVE, default=0, help="DataLoader worker processes")
    p.add_argument("--limit", type=POSITIVE, help="only the first N images")
    p.add_argument("--device", type=_device, default="cpu")
    p.add_argument("--dtype", choices=DTYPES, default="fp32", help="autocast dtype")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _add_model_commands(sub) -> None:
    """`piip` subcommands: list, flops, bench and plan: the registered variants, their counts, speed
    and training memory."""
    p = sub.add_parser("list", help="list registered variants")
    p.add_argument("pattern", nargs="?", default="*")
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser("flops", help="parameters and MACs of a variant")
    _model_args(p)
    p.add_argument("--convention", choices=("paper", "actual"), default="paper",
                   help="paper: how the published numbers were counted; actual: the model as built")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_flops)

    p = sub.add_parser("bench", help="forward or training-step latency / memory / MACs/s against a baseline")
    _model_args(p)
    p.add_argument("--baseline", default="vitdet_base")
    p.add_argument("--baseline-resolutions")
    p.add_argument("--dtype", choices=DTYPES, default="fp32",
                   help="autocast dtype of the model (fp32: no autocast)")
    p.add_argument("--baseline-dtype", choices=DTYPES,
                   help="dtype of the baseline (default: --dtype); e.g. --baseline NAME --dtype bf16 "
                        "--baseline-dtype fp32 measures the bf16 speed-up and error")
    p.add_argument("--batch", type=POSITIVE, default=1)
    p.add_argument("--repeat", type=POSITIVE, default=3)
    p.add_argument("--warmup", type=NON_NEGATIVE, default=1)
    p.add_argument("--device", type=_device, default="cpu")
    p.add_argument("--train", action="store_true",
                   help="time one optimiser step instead of a forward: a whole detector around each "
                        "backbone (--task det; --detector), the classifier with cross-entropy (--task cls)")
    p.add_argument("--detector", metavar="KIND",
                   help="the detector kind around each dense backbone: mask_rcnn (the --train default), "
                        "cascade_mask_rcnn or dino; without --train, one inference of the whole detector")
    p.add_argument("--compile", action="store_true",
                   help="run both backbones under torch.compile (compiled in the warm-up, not timed)")
    p.add_argument("--no-tune-malloc", action="store_true",
                   help="measure memory: glibc maps every block over 128 KiB alone and returns it at free, so "
                        "the resident set follows the live tensors (see piip.analysis.bench)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("plan", help="per-GPU memory of training a variant or recipe with ddp, zero1 or fsdp: "
                                    "does it fit?")
    p.add_argument("source", help="a registered variant (its first shipped recipe for --task) or a recipe "
                                  "(shipped name or JSON/YAML file)")
    p.add_argument("--task", choices=("det", "seg", "cls"), help="default: the recipe's; det for a variant")
    p.add_argument("--gpus", type=POSITIVE, default=8)
    p.add_argument("--gpu-memory", type=POSITIVE_FLOAT, default=80.0, metavar="GB", help="per GPU, 10^9 bytes")
    p.add_argument("--batch-per-gpu", type=POSITIVE, metavar="B",
                   help="images per GPU (default: the recipe's global batch over the GPUs)")
    p.add_argument("--amp", choices=("bf16", "fp32"), help="the backbone's precision (default: the recipe's; bf16 without one)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_plan)


def _add_convert_and_demo(sub) -> None:
    """`piip` subcommands: convert the authors' checkpoints; share a model; the demonstrations."""
    p = sub.add_parser("convert", help="convert an authors' PIIP checkpoint to piip's safetensors format")
    p.add_argument("checkpoint", help="their .pth (MMDetection, MMSegmentation, DeepSpeed or classification layout)")
    p.add_argument("--config", required=True,
                   help="a registered variant name, or a JSON file with the authors' backbone kwargs")
    p.add_argument("-o", "--output", required=True, help="output .safetensors path")
    p.add_argument("--task", choices=("det", "seg", "cls"), help="default: inferred")
    p.add_argument("--ema", action="store_true", help="convert the EMA weights of a classification checkpoint")
    p.add_argument("--head", action="append", default=[], metavar="KEY=VALUE",
                   help="a setting of the detector / segmenter built around the file's heads (repeatable), e.g. "
                        "the test resize and normalisation a DINO file does not hold: --head min_size=1400 "
                        "--head image_mean=[0.485,0.456,0.406]")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("share", help="write a model folder for the Hugging Face hub (model.safetensors, config.json, "
                                     "README.md model card) and optionally push it")
    p.add_argument("source", help="a piip checkpoint (.safetensors), a `piip train` run folder (its recipe and "
                                  "metrics go into the card), a folder written by save_pretrained, or a hub repo id")
    p.add_argument("out_dir", help="the folder to write")
    p.add_argument("--recipe", help="how the model was trained, for the card (default: the run folder's)")
    p.add_argument("--metric", action="append", default=[], metavar="NAME=VALUE",
                   help="an evaluation result for the card (repeatable), e.g. --metric top1=0.91")
    p.add_argument("--license", help="the card's licence id (default: the branch weights' licence from timm)")
    p.add_argument("--push", metavar="REPO_ID", help="also upload the folder to this hub model repo (owner/name)")
    p.add_argument("--private", action="store_true", help="create the pushed repo private")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_share)

    p = sub.add_parser("demo", help="train PIIP and a ViT baseline here: classification (default), "
                                    "detection (piip demo det) or segmentation (piip demo seg) on Fashion-MNIST")
    p.add_argument("overrides", nargs="*", default=[], metavar="[cls|det|seg] OVERRIDE",
                   help="the demo (cls, the default: Fashion-MNIST accuracy vs MACs; det: Mask R-CNN on "
                        "Fashion-MNIST scenes; seg: UperNet on their per-pixel classes), then "
                        "section.field=value overrides for its runs")
    p.add_argument("--out", help="folder for the runs, the results and the plots "
                                 "(default outputs/demo, outputs/demo_det, outputs/demo_seg)")
    p.add_argument("--epochs", type=POSITIVE,
                   help="training epochs of every run (cls: default 1, `piip train cls fashion_mnist` trains 5; "
                        "det/seg: the scenes_det/scenes_seg recipe's)")
    p.add_argument("--train-scenes", type=POSITIVE, help="det/seg: training scenes (default 400)")
    p.add_argument("--val-scenes", type=POSITIVE, default=100, help="det/seg: validation scenes")
    p.add_argument("--pretrain-limit", type=POSITIVE, default=20000,
                   help="det/seg: Fashion-MNIST images for the one-epoch ViT pretraining")
    p.add_argument("--data", help="folder of the Fashion-MNIST IDX files (default: the Debian package's)")
    p.add_argument("--pretrain-branches", action="store_true",
                   help="also train ViT-S/T and fine-tune PIIP from the three saved ViTs (branch_weights)")
    p.add_argument("--finetune-epochs", type=POSITIVE, help="epochs of the fine-tuning run (default: --epochs)")
    p.add_argument("--fresh", action="store_true", help="retrain runs that already finished in --out")
    p.set_defaults(func=_cmd_demo)


def _add_eval_and_data(sub) -> None:
    """`piip` subcommands: eval (one subcommand per registered task, its options from the task) and data."""
    p = sub.add_parser("eval", help="evaluate a checkpoint on a dataset (one subcommand per task)")
    tasks = p.add_subparsers(dest="task", required=True)
    for task in task_classes():
        p = tasks.add_parser(task.name, help=task.eval_help)
        p.add_argument("--checkpoint", required=True, help=f"a piip {task.name} checkpoint (.safetensors)")
        task.add_eval_arguments(p)
        _add_eval_run_options(p)
        p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("data", help="make datasets")
    kinds = p.add_subparsers(dest="kind", required=True)
    p = kinds.add_parser("scenes", help="Fashion-MNIST items at every scale on real photographs (COCO format)")
    p.add_argument("out", help="output folder")
    p.add_argument("--train", type=POSITIVE, default=800, help="training scenes (items from Fashion-MNIST train)")
    p.add_argument("--val", type=NON_NEGATIVE, default=200, help="validation scenes (items from Fashion-MNIST test)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fashion-mnist", help="folder of the Fashion-MNIST IDX files (default: the Debian package's)")
    p.add_argument("--semantic", action="store_true",
                   help="per-pixel classes in the ADE20K layout (semantic segmentation) instead of COCO instances")
    p.set_defaults(func=_cmd_data_scenes)
    p = kinds.add_parser("trees", help="real aerial photographs with hand-drawn tree-crown boxes (COCO format; "
                                       "needs: pip install --no-deps deepforest==2.1.0)")
    p.add_argument("out", help="output folder")
    p.add_argument("--full", action="store_true",
                   help="both photographs: 46 crops, 678 crowns (default: one photograph, 10 crops, 238 crowns)")
    p.set_defaults(func=_cmd_data_trees)


def _add_predict_and_train(sub) -> None:
    """`piip` subcommands: predict and train."""
    p = sub.add_parser("predict", help="run a checkpoint on images or folders: drawn detections / segmentation "
                                       "overlays / top-5 classes + JSON lines (batched, resumable)")
    p.add_argument("inputs", nargs="+", help="image files or folders")
    p.add_argument("--checkpoint", required=True, help="a piip detector, segmenter or classifier checkpoint")
    p.add_argument("--score-threshold", type=fraction(low_open=False), default=0.5,
                   help="detections below are not shown")
    p.add_argument("--out", default="predictions",
                   help="output folder (predictions.jsonl, drawn images); a rerun into it skips the images "
                        "already predicted")
    p.add_argument("--batch-size", type=POSITIVE, default=4,
                   help="images run together (a detector: those of one padded size; a segmenter: one at a time)")
    p.add_argument("--no-draw", action="store_true", help="write predictions.jsonl only (and label maps), no pictures")
    p.add_argument("--overwrite", action="store_true",
                   help="start again in an output folder that holds another run's predictions")
    p.add_argument("--device", type=_device, default="cpu")
    p.add_argument("--json", action="store_true", help="print the predictions as one JSON object")
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("train", help="train (torchrun --nproc_per_node=N -m piip train ... for DDP)")
    p.add_argument("task", choices=task_names(), help="the task (cls: classification, det: detection, seg: semantic segmentation)")
    p.add_argument("config", help="a JSON or YAML TrainConfig file, or a shipped config by name "
                                  "(e.g. fashion_mnist)")
    p.add_argument("overrides", nargs="*", default=[],
                   help="section.field=value overrides, e.g. optim.lr=1e-4 run.amp=bf16 (null: the field's "
                        "default, or None where the field takes None)")
    p.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="continue from the run's latest checkpoint (or from the given checkpoint file)")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    p.set_defaults(func=_cmd_train)


def _add_export(sub) -> None:
    """`piip export onnx`: a checkpoint or a variant to an ONNX file, checked against PyTorch."""
    p = sub.add_parser("export", help="export a model to another format (onnx)")
    formats = p.add_subparsers(dest="format", required=True)
    p = formats.add_parser("onnx", help="export a checkpoint (any kind) or a variant to ONNX and compare it with "
                                        "PyTorch in onnxruntime (needs: pip install piip[onnx])")
    p.add_argument("source", help="a piip checkpoint file (backbone, classifier, segmenter, DINO detector) or a "
                                  "registered variant name (random weights)")
    p.add_argument("-o", "--output", required=True, help="the .onnx file to write")
    p.add_argument("--task", choices=("det", "cls"), help="a variant's form: det (the feature pyramid, the default) "
                                                          "or cls (a classifier)")
    p.add_argument("--size", type=POSITIVE, nargs=2, metavar=("H", "W"),
                   help="input size (default: the model's: the finest branch's resolution, a segmenter's crop, a "
                        "detector's test size)")
    p.add_argument("--dynamic", action="store_true", help="dynamic batch, height and width where the model allows")
    p.add_argument("--opset", type=POSITIVE, default=18, help="ONNX opset (>= 16)")
    p.add_argument("--no-check", action="store_true", help="skip the onnxruntime comparison")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.set_defaults(func=_cmd_export_onnx)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="piip", description="Parameter-Inverted Image Pyramid Networks")
    parser.add_argument("--onednn-linears", choices=("auto", "on", "off"),
                        help="float32 CPU dense layers on oneDNN (on) or F.linear (off); default: "
                             "$PIIP_ONEDNN_LINEARS, else auto (what is measured faster on this CPU)")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_model_commands(sub)
    _add_convert_and_demo(sub)
    _add_eval_and_data(sub)
    _add_predict_and_train(sub)
    _add_export(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    # section.field=value overrides may also follow options (argparse fills a positional list once)
    stray = [token for token in rest if token.startswith("-") or "=" not in token]
    if stray or (rest and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or rest)}")
    if rest:
        args.overrides = [*args.overrides, *rest]
    if args.onednn_linears is not None:
        from .ops import set_onednn_linears

        set_onednn_linears({"auto": None, "on": True, "off": False}[args.onednn_linears])
    formatwarning = warnings.formatwarning
    warnings.formatwarning = _one_line_warning
    try:
        status = args.func(args)
    # what a user's input can cause: bad values, files, options (CheckpointError, DataError: ValueErrors), a
    # diverging run (the trainer's FloatingPointError), weights that cannot be downloaded
    except (ValueError, OSError, NotImplementedError, FloatingPointError) as error:
        return _fail(error)
    except RuntimeError as error:
        from .weights import HubUnavailableError

        if not isinstance(error, HubUnavailableError):
            raise  # a programming error: its traceback
        return _fail(error)
    except KeyboardInterrupt:
        print("piip: interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.formatwarning = formatwarning
    return status or 0  # a command may return its own status (piip export: 1 when the check fails)


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """What the library warns a user about (box-only data, skipped images, ...), one line on stderr."""
    return f"piip: warning: {message}\n"


def _fail(error: BaseException) -> int:
    """Report a failure the user can fix as one line on stderr (``piip: error: ...``); exit status 2."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    print(f"piip: error: {'; '.join(lines) or type(error).__name__}", file=sys.stderr, flush=True)
    return 2


if __name__ == "__main__":
    sys.exit(main())
