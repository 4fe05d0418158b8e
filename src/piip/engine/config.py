"""Typed, serialisable training configuration.

A run is described by one :class:`TrainConfig` (nested dataclasses). It is read from a JSON or YAML
file, every field can be overridden from the command line with ``section.field=value`` (values are
coerced to the field's declared type: ``optim.lr=3e-5``, ``run.amp=bf16``, ``optim.clip_grad=none``,
``model.branch_drop_path=[0.1,0.05,0.05]``), and the resolved config is written to
``<out_dir>/config.json`` at the start of every run.

Example (JSON)::

    {"task": "cls",
     "model": {"name": "piip_tsb_deit", "resolutions": "224/160/96", "num_classes": 10},
     "data":  {"dataset": "fashion_mnist", "root": "data", "image_size": 224},
     "optim": {"lr": 3e-5, "epochs": 20, "batch_size": 1024},
     "run":   {"out_dir": "runs/demo", "amp": "bf16"}}

``model.piip`` may hold a whole :class:`~piip.config.model.PIIPConfig` dict (``PIIPConfig.to_dict()``
layout: explicit branch widths, depths, resolutions, interaction groups) instead of a registered
``model.name``. The configs shipped in ``piip/configs/`` are loaded by name
(``load_config("fashion_mnist")``).

The ``data`` section belongs to the task: its dataclass is the task's ``data_config``
(:mod:`piip.tasks`), so ``data.*`` keys and overrides are checked against that task's fields.

**null** means the same everywhere, in a file (``null``) and on the command line (``null``, or
``none`` except in a plain text field, where ``none`` is the text: ``data.augment=none``): a field
that accepts ``None`` (its type says ``| None``: ``optim.clip_grad=none`` turns clipping off) is set
to ``None``; any other field goes back to its default, dropping the value a recipe gave it. The same
holds for the task's ``model.head`` settings, checked against the task model's config
(``model.head.class_weight=null``: the segmenter's default, no class weights, instead of the
shipped recipe's 11; ``model.head.anchor_sizes=null``: the detector's default anchors).

Values are checked against the declared types, element by element where the type names them
(``tuple[int, ...]``), and :meth:`TrainConfig.validate` (run by :func:`load_config`) refuses
out-of-range numbers (a batch size below 1, a negative lr, ...). Every such error is a
:class:`ValueError` of one line naming the field.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config.typed import (Serializable, accepts_none, apply_overrides as apply_field_overrides, build_config,
                            check_value, parse_value, split_override, yaml_problem)
from .task import get_task_class

__all__ = ["MODEL_OVERRIDES", "ModelConfig", "OptimConfig", "AugConfig", "RunConfig", "TrainConfig", "CONFIG_DIR",
           "list_configs", "resolve_config_path", "load_config", "apply_overrides", "parse_value",
           "check_value", "accepts_none"]


@dataclass
class ModelConfig:
    """Which network to train.

    Either ``name`` (a registered variant, ``piip list``) with the generic overrides, or ``piip``: a
    full ``PIIPConfig.to_dict()`` (takes precedence; the overrides below still apply).

    Attributes:
        name: registered variant name.
        piip: explicit PIIPConfig dict (branch widths/depths/resolutions/interaction groups).
        resolutions: branch resolutions, finest first ("224/160/96").
        num_classes: classifier width; ``None`` takes it from the dataset's ``classes``.
        interactions / interaction_attn: number and type of interactions.
        cls_head / cls_pool: classification head layout (see PIIPConfig).
        drop_path_rate: stochastic depth applied to every branch.
        branch_drop_path: per-branch stochastic depth, branch 1 (largest) first; wins over
            ``drop_path_rate``.
        interaction_drop_path: drop path inside the interaction units.
        pretrained: initialise the branches from the timm weights the variant names.
        branch_weights: local weight files per branch ``{"branch1": "file.safetensors", ...}``.
        checkpoint: a whole piip checkpoint to start from (fine-tuning; exclusive with
            ``pretrained``/``branch_weights``).
        head: the task's head settings (detection: ``{"masks": true, "fpn_channels": 256, ...}``,
            see the task's head config); empty for classification.
        overrides: any other setting of the network, by the names of
            :meth:`PIIPConfig.with_overrides <piip.config.model.PIIPConfig.with_overrides>`
            (``model.overrides.qk_norm=true``, ``model.overrides.interaction={num_points: 8}``).
    """

    name: str = ""
    piip: dict | None = None
    resolutions: str | None = None
    num_classes: int | None = None
    interactions: int | None = None
    interaction_attn: str | None = None
    cls_head: str | None = None
    cls_pool: str | None = None
    drop_path_rate: float | None = None
    branch_drop_path: list[float] | None = None
    interaction_drop_path: float | None = None
    pretrained: bool = False
    branch_weights: dict | None = None
    checkpoint: str | None = None
    head: dict = field(default_factory=dict)
    overrides: dict | None = None


#: the :class:`ModelConfig` fields that are overrides of the network (``PIIPConfig.with_overrides``)
MODEL_OVERRIDES = ("resolutions", "num_classes", "interactions", "interaction_attn", "cls_head", "cls_pool",
                   "drop_path_rate", "branch_drop_path", "interaction_drop_path")


@dataclass
class OptimConfig:
    """Optimiser and schedule (AdamW; linear warm-up, then cosine, step or poly decay; stepped per
    optimiser step).

    Paper classification recipe (reference §8.3): lr 3e-5 (unscaled, global batch 1024), wd 0.1,
    20 epochs, 5 warm-up epochs from 1e-6, min_lr 1e-5, new_module_lr_mult 10 (the interactions),
    no layer decay, no clipping. Detection (§8.1) uses lr 1e-4, wd 0.05 and layer decay 0.85 with
    the last block of every branch aligned.

    Attributes:
        batch_size: *global* batch per optimiser step (all ranks, all accumulation micro-steps).
        accum_steps: gradient-accumulation micro-steps per optimiser step.
        warmup_steps: overrides ``warmup_epochs`` when set.
        warmup_lr: lr at the start of the warm-up (scaled by each group's multiplier).
        new_module_lr_mult: lr multiplier of parameters outside the pretrained branches.
        layer_decay: per-branch layer-wise lr decay rate (``None``: off).
        layer_decay_num_layers / layer_decay_skip: the original's ``num_layers`` and ``skip_stride``;
            ``None`` derives them so the last block of every branch aligns (deepest branch depth,
            strides ``num_layers / depth_k``).
        decay_exempt_by_name: also exempt ``model.no_weight_decay()`` names (pos_embed, cls_token,
            gates, merge weights); the original only exempted 1-d params and biases.
        schedule: after the warm-up, ``"cosine"`` (to ``min_lr`` at the end), ``"step"`` (times
            ``gamma`` at each of ``milestones``, in epochs: MMDetection's 1x is ``[8, 11]`` of 12)
            or ``"poly"`` (``(1 - progress) ** power`` down to ``min_lr``: MMSegmentation's).
        steps: total optimiser steps, for iteration-based schedules (MMSegmentation's 80k); wins
            over ``epochs`` (the run stops mid-epoch when it reaches them).
    """

    optimizer: str = "adamw"
    lr: float = 3e-5
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    new_module_lr_mult: float = 10.0
    layer_decay: float | None = None
    layer_decay_num_layers: float | None = None
    layer_decay_skip: list[float] | None = None
    decay_exempt_by_name: bool = True
    clip_grad: float | None = None
    epochs: int = 20
    warmup_epochs: float = 5.0
    warmup_steps: int | None = None
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5
    batch_size: int = 1024
    accum_steps: int = 1
    schedule: str = "cosine"
    steps: int | None = None
    milestones: list[float] = field(default_factory=list)
    gamma: float = 0.1
    power: float = 1.0


@dataclass
class AugConfig:
    """Batch-level regularisation (timm). Defaults suit tiny CPU runs; the paper's classification
    recipe uses mixup 0.8, cutmix 1.0, label smoothing 0.1, EMA 0.99996 (``run.ema_decay``)."""

    mixup: float = 0.0
    cutmix: float = 0.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    label_smoothing: float = 0.1


@dataclass
class RunConfig:
    """Everything about how the run executes.

    Attributes:
        amp: ``"fp32"``, ``"bf16"`` (autocast; the deformable sampling stays float32) or ``"fp16"``
            (autocast + GradScaler).
        compile: ``torch.compile`` the model.
        grad_checkpointing: activation checkpointing of every block and interaction.
        ema_decay: timm ModelEmaV3 decay (``None``: no EMA).
        log_every: optimiser steps between JSONL/progress updates.
        eval_every: epochs between evaluations (0: only at the end).
        save_every_steps: optimiser steps between checkpoints (0: end of every epoch only).
        keep_last: step checkpoints kept (``best`` is kept separately).
        halt_at_step: stop abruptly after this optimiser step, with no extra save or export
            (simulates a kill; used by the resume tests).
        progress: show the rich progress bar (rank 0, and only on a terminal).
        device: ``"auto"`` (cuda when available), ``"cpu"`` or ``"cuda"``.
        onednn_linears: float32 CPU dense layers on oneDNN (``true``) or ``F.linear`` (``false``);
            ``None``: the process setting (``PIIP_ONEDNN_LINEARS``, else what is measured faster on
            this CPU; :mod:`piip.ops.linear`).
        strategy: how the processes share the work (:mod:`piip.engine.strategy`). ``"ddp"``: each
            holds the whole model and optimiser state, ``step-*.pt`` checkpoints. ``"zero1"``: the
            optimiser state partitioned over the processes (``ZeroRedundancyOptimizer``).
            ``"fsdp"``: parameters, gradients and optimiser state sharded (FSDP2, per ViT block and
            interaction unit; ``amp=bf16`` gathers bfloat16 weights and reduces float32 gradients),
            without ``ema_decay``, ``compile`` or ``amp=fp16``. zero1 and fsdp write sharded
            checkpoint folders (``step-*/``, ``best/``: every process its shard), which resume under
            the same strategy and number of processes only and which ``piip.load`` reads as the
            whole model. With one process every strategy is plain single-process training (and
            ``.pt`` checkpoints).
    """

    out_dir: str = "runs/default"
    seed: int = 0
    amp: str = "fp32"
    compile: bool = False
    grad_checkpointing: bool = False
    ema_decay: float | None = None
    log_every: int = 10
    eval_every: int = 1
    save_every_steps: int = 0
    keep_last: int = 2
    halt_at_step: int | None = None
    num_workers: int = 4
    tensorboard: bool = False
    progress: bool = True
    device: str = "auto"
    onednn_linears: bool | None = None
    strategy: str = "ddp"


@dataclass
class TrainConfig(Serializable):
    """A whole training run."""

    task: str = "cls"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: Any = None
    optim: OptimConfig = field(default_factory=OptimConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        """Type the ``data`` section with the task's data config (a dict is checked field by field)."""
        data_cls = get_task_class(self.task).data_config
        if self.data is None:
            self.data = data_cls()
        elif isinstance(self.data, dict):
            self.data = build_config(data_cls, self.data, "data.")
        elif not isinstance(self.data, data_cls):
            raise ValueError(f"data must be a {data_cls.__name__} for task {self.task!r}, "
                             f"got {type(self.data).__name__}")

    def validate(self) -> "TrainConfig":
        """Refuse out-of-range values of the engine's sections (a batch size below 1, a negative lr,
        an unknown ``run.device``, ...) with a one-line :class:`ValueError` naming the field; returns
        the config. :func:`load_config` runs it; the task's ``data`` and ``model.head`` are checked
        by the task's own configs."""
        _validate(self)
        return self

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(self.to_json())


# -- ranges ------------------------------------------------------------------------------------
#: accepted values of the engine's numeric fields (every element of a list field): ``[`` / ``]``
#: closed, ``(`` / ``)`` open ends. The task's sections (``data``, ``model.head``) check their own.
_RANGES = {
    "model.drop_path_rate": "[0, 1)", "model.branch_drop_path": "[0, 1)", "model.interaction_drop_path": "[0, 1)",
    "optim.lr": "[0, inf)", "optim.weight_decay": "[0, inf)", "optim.betas": "[0, 1)", "optim.eps": "(0, inf)",
    "optim.new_module_lr_mult": "[0, inf)", "optim.layer_decay": "(0, 1]", "optim.layer_decay_num_layers": "(0, inf)",
    "optim.clip_grad": "(0, inf)", "optim.epochs": "[1, inf)", "optim.warmup_epochs": "[0, inf)",
    "optim.warmup_steps": "[0, inf)", "optim.warmup_lr": "[0, inf)", "optim.min_lr": "[0, inf)",
    "optim.batch_size": "[1, inf)", "optim.accum_steps": "[1, inf)", "optim.steps": "[1, inf)",
    "optim.milestones": "[0, inf)", "optim.gamma": "(0, inf)", "optim.power": "[0, inf)",
    "aug.mixup": "[0, inf)", "aug.cutmix": "[0, inf)", "aug.mixup_prob": "[0, 1]", "aug.mixup_switch_prob": "[0, 1]",
    "aug.label_smoothing": "[0, 1)",
    "run.ema_decay": "[0, 1]", "run.log_every": "[1, inf)", "run.eval_every": "[0, inf)",
    "run.save_every_steps": "[0, inf)", "run.keep_last": "[0, inf)", "run.halt_at_step": "[0, inf)",
    "run.num_workers": "[0, inf)",
}


def apply_overrides(cfg: TrainConfig, overrides: list[str] | dict[str, Any]) -> TrainConfig:
    """Apply ``["optim.lr=1e-4", "run.amp=bf16", ...]`` in place (and return ``cfg``); see
    :func:`piip.config.typed.apply_overrides`. The task is the command's or the file's, never an
    override."""
    items = overrides.items() if isinstance(overrides, dict) else [split_override(o) for o in overrides]
    for key, raw in items:
        if key == "task" and raw != cfg.task:
            raise ValueError(f"{key}={raw!r}: the task of a run is the command's (piip train TASK) or the "
                             f"config file's, not an override")
    return apply_field_overrides(cfg, dict(items))


def _check_range(where: str, value, spec: str) -> None:
    low, high = (float(x) for x in spec[1:-1].split(","))
    values = value if isinstance(value, (list, tuple)) else [value]
    ok = all((v >= low if spec[0] == "[" else v > low) and (v <= high if spec[-1] == "]" else v < high)
             for v in values)
    if not ok:
        bound = f"{'>=' if spec[0] == '[' else '>'} {low:g}" if high == float("inf") else f"in {spec}"
        every = "every value " if isinstance(value, (list, tuple)) else ""
        raise ValueError(f"{where}={value!r} is out of range: {every}must be {bound}")


def _validate(cfg: TrainConfig) -> None:
    for where, spec in _RANGES.items():
        section, name = where.split(".")
        value = getattr(getattr(cfg, section), name)
        if value is not None:
            _check_range(where, value, spec)
    if len(cfg.optim.betas) != 2:
        raise ValueError(f"optim.betas={cfg.optim.betas!r} needs 2 values (AdamW's beta1, beta2)")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", cfg.run.device):
        raise ValueError(f"run.device={cfg.run.device!r}: expected 'auto', 'cpu', 'cuda' or 'cuda:N'")
    from .strategy import check_strategy

    check_strategy(cfg.run)
    # the task's data section checks itself when built; overrides set fields after that
    check_data = getattr(cfg.data, "__post_init__", None)
    if check_data is not None:
        check_data()


#: Training configs shipped with the package (``piip train cls fashion_mnist``).
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def list_configs() -> list[str]:
    """Names of the training configs shipped with piip."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def resolve_config_path(path: str | os.PathLike) -> Path:
    """``path`` itself when it is a file, else the shipped config of that name."""
    candidate = Path(path)
    if candidate.exists() and not candidate.is_dir():
        return candidate
    shipped = CONFIG_DIR / f"{candidate.name.removesuffix('.json')}.json"
    if candidate.parent == Path(".") and shipped.exists():
        return shipped
    if candidate.is_dir():
        raise ValueError(f"config {str(path)!r} is a folder, not a JSON or YAML config file")
    raise FileNotFoundError(f"config {str(path)!r} is neither a file nor a shipped config "
                            f"(shipped: {', '.join(list_configs())})")


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None,
                task: str | None = None) -> TrainConfig:
    """Read a JSON or YAML config file, or a shipped config by name (``None``: defaults), apply
    command-line style overrides and :meth:`~TrainConfig.validate` the result. ``task`` (the
    command line's) must agree with the file's."""
    data: Any = {}
    if path is not None:
        path = resolve_config_path(path)
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            raise ValueError(f"config {str(path)!r} is not a text (JSON or YAML) file") from None
        if path.suffix in (".yaml", ".yml"):
            import yaml

            try:
                data = yaml.safe_load(text)
            except yaml.YAMLError as err:
                raise ValueError(f"{path} is not valid YAML: {yaml_problem(err)}") from None
            data = {} if data is None else data
        elif not text.strip():
            raise ValueError(f"{path} is empty (a JSON config holds at least {{}})")
        else:
            try:
                data = json.loads(text)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path} is not valid JSON: {err}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a mapping of config sections (task, model, data, optim, aug, "
                             f"run), not a {type(data).__name__}")
    if task is not None:
        if data.get("task", task) != task:
            raise ValueError(f"the config {str(path)!r} is for task {data['task']!r}, not {task!r}")
        data = {**data, "task": task}
    cfg = TrainConfig.from_dict(data)
    return apply_overrides(cfg, overrides or []).validate()
