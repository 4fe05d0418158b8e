"""Parameter and FLOP counts in the PIIP paper's convention, by pure arithmetic on a config.

The paper's (and the authors' README's) ``#Param`` / ``#FLOPs`` columns were not measured on the
detection backbone that was trained. They come from the authors' ``classification/get_flops.py``,
which builds a *classification proxy* of every config and runs mmcv's module-hook counter on it,
then adds hand formulas for the parts the hooks cannot see (reference notes §4.1-§4.3). This module
reproduces that convention in closed form, without allocating any tensor, so even InternViT-6B
variants are counted instantly.

What the convention counts (all figures are multiply-accumulates, "FLOPs" in the paper = MACs):

* **Input**: one square image at the finest branch's size; branch ``b`` sees ``N_b = (S_b//16)^2``
  patch tokens (plus a class token where the branch has one).
* **Hooked modules** (mmcv rules): ``Linear`` = ``numel(input) * out_features`` (no bias term);
  ``Conv2d`` = kernel MACs plus one bias MAC per output element; ``LayerNorm``/``GroupNorm`` =
  ``2 * numel``. RMSNorm (a custom class), GELU, softmax, residual adds, layer scale,
  interpolation and every functional matmul are *not* counted by the hooks.
* **Hand formulas**: self-attention ``2*N^2*D`` per global block and ``2*N*ws^2*D`` per windowed
  block (no padding; a window larger than the token grid covers the grid, i.e. is global), always
  with ``N = (S//16)^2`` patch tokens (class token excluded); deformable cross-attention
  ``5 * Nq * P * Dq`` per injector (``P`` = 4 points, ``Dq`` the query branch's full width);
  regular cross-attention ``2 * Nq * Nkv * Dq`` per injector.
* **Proxy model**: position embeddings sized at the branch's *real* token grid (``N*D``, plus a class
  row for InternViT-class branches); dense configs get the classification merge (``GN`` for branch 1,
  ``GN -> Linear -> GN`` for the others), a ``LayerNorm`` and a 1000-way head instead of the
  conv merges and feature pyramid; single-branch baselines get their final ``LayerNorm`` and a
  1000-way head. Classification configs are counted as built: per-branch final norm + head, or the
  merged head.
* **InternViT-class branches** (AugReg/MAE/DINOv2/InternViT-6B in the original): windowed blocks pad
  the tokens *before* ``qkv``, so that Linear is counted on the padded grid (README numbers; the
  paper's Table 3 InternViT rows were counted without it, see ``window_padding``).

See :func:`paper_complexity`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..config.model import BranchConfig, PIIPConfig

__all__ = ["PartComplexity", "PaperComplexity", "paper_complexity"]

#: Tokens per side in the hand formulas are always ``size // 16`` in the authors' script.
_FORMULA_PATCH = 16
#: The proxy model's classifier width for dense (det/seg) configs.
_PROXY_CLASSES = 1000


@dataclass(frozen=True)
class PartComplexity:
    """Params and MACs of one part of the network, with an optional finer breakdown."""

    name: str
    params: int
    macs: int
    items: tuple[tuple[str, int, int], ...] = ()

    @property
    def mparams(self) -> float:
        return self.params / 1e6

    @property
    def gmacs(self) -> float:
        return self.macs / 1e9


@dataclass(frozen=True)
class PaperComplexity:
    """Result of :func:`paper_complexity`: totals and per-part breakdown.

    ``macs`` is what the paper calls ``#FLOPs`` (multiply-accumulates); ``gflops`` / ``mparams``
    give the paper's units (``1e9`` MACs, ``1e6`` parameters).
    """

    params: int
    macs: int
    parts: tuple[PartComplexity, ...]
    input_size: int
    name: str = ""

    @property
    def mparams(self) -> float:
        return self.params / 1e6

    @property
    def gflops(self) -> float:
        return self.macs / 1e9

    gmacs = gflops

    def part(self, name: str) -> PartComplexity:
        for p in self.parts:
            if p.name == name:
                return p
        raise KeyError(f"no part {name!r}; parts are {[p.name for p in self.parts]}")

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "input_size": self.input_size,
            "params": self.params,
            "macs": self.macs,
            "parts": {p.name: {"params": p.params, "macs": p.macs,
                               "items": {n: {"params": pp, "macs": m} for n, pp, m in p.items}}
                      for p in self.parts},
        }

    def table(self) -> str:
        """A small text table, one line per part plus the total."""
        lines = [f"{'part':<14}{'params (M)':>12}{'MACs (G)':>12}"]
        for p in self.parts:
            lines.append(f"{p.name:<14}{p.mparams:>12.2f}{p.gmacs:>12.2f}")
        lines.append(f"{'total':<14}{self.mparams:>12.2f}{self.gflops:>12.2f}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return f"{self.name or 'PIIP'}: {self.mparams:.1f}M params, {self.gflops:.1f}G MACs"


class _Acc:
    """Accumulates named (params, macs) items."""

    def __init__(self) -> None:
        self.items: list[tuple[str, int, int]] = []

    def add(self, name: str, params: int = 0, macs: int = 0) -> None:
        self.items.append((name, int(params), int(macs)))

    def part(self, name: str) -> PartComplexity:
        merged: dict[str, list[int]] = {}
        for n, p, m in self.items:
            slot = merged.setdefault(n, [0, 0])
            slot[0] += p
            slot[1] += m
        items = tuple((n, v[0], v[1]) for n, v in merged.items())
        return PartComplexity(name, sum(v[1] for v in items), sum(v[2] for v in items), items)


# -- pieces ----------------------------------------------------------------------------------------

def _norm_macs(kind: str, numel: int) -> int:
    """mmcv hook: LayerNorm/GroupNorm count ``2*numel`` (affine); RMSNorm is invisible."""
    return 2 * numel if kind == "layernorm" else 0


def _norm_params(kind: str, dim: int) -> int:
    return 2 * dim if kind == "layernorm" else dim


def _side(size: int, patch: int) -> int:
    return size // patch


def _window_area(ws: int, side: int) -> int:
    """Tokens one query attends to in a windowed block of a ``side x side`` grid.

    A window larger than the grid covers the grid (the published SBL sweep counts ViT-L at 224
    with window 28 as global attention over its 14x14 grid).
    """
    w = min(ws, side)
    return w * w


def _branch(b: BranchConfig, index: int, window_padding: bool) -> PartComplexity:
    acc = _Acc()
    D, p = b.embed_dim, b.patch_size
    side = _side(b.resolution, p)
    n = side * side                                   # patch tokens seen by the hooks
    t = n + (1 if b.class_token else 0)               # tokens through the blocks
    f_side = _side(b.resolution, _FORMULA_PATCH)
    f_n = f_side * f_side                             # tokens in the hand formulas
    hidden = int(D * b.mlp_ratio)

    # patch embedding: Conv2d(3, D, k=p, s=p) with bias
    acc.add("patch_embed", 3 * p * p * D + D, n * (3 * p * p * D + D))
    # position embedding sized at the real token grid (proxy), plus class row where stored
    acc.add("pos_embed", (n + (1 if b.pos_embed_class_row else 0)) * D, 0)
    if b.class_token:
        acc.add("cls_token", D, 0)

    for i, window in enumerate(b.window_sizes):
        qkv_tokens = t
        if window is not None and b.family == "internvit" and window_padding:
            # InternViT-class windowed attention pads the token grid before the qkv Linear
            pad = math.ceil(side / window) * window
            qkv_tokens = pad * pad
        lin_params = (3 * D * D + (3 * D if b.qkv_bias else 0) + D * D + D
                      + D * hidden + hidden + hidden * D + D)
        lin_macs = qkv_tokens * D * 3 * D + t * D * D + t * D * hidden + t * hidden * D
        acc.add("linear", lin_params, lin_macs)
        norm_params = 2 * _norm_params(b.norm_layer, D)
        norm_macs = 2 * _norm_macs(b.norm_layer, t * D)
        if b.qk_norm:
            norm_params += 2 * _norm_params(b.norm_layer, D)
            norm_macs += 2 * _norm_macs(b.norm_layer, t * D)
        acc.add("norm", norm_params, norm_macs)
        if b.init_values is not None:
            acc.add("layer_scale", 2 * D, 0)
        if window is not None:
            acc.add("attention", 0, 2 * f_n * _window_area(window, f_side) * D)
        else:
            acc.add("attention", 0, 2 * f_n * f_n * D)
    return acc.part(f"branch{index}")


def _tokens(b: BranchConfig) -> int:
    return _side(b.resolution, b.patch_size) ** 2


def _formula_tokens(b: BranchConfig) -> int:
    return _side(b.resolution, _FORMULA_PATCH) ** 2


def _injector(acc: _Acc, cfg: PIIPConfig, q: BranchConfig, v: BranchConfig) -> None:
    """One injector: query branch ``q`` attends to branch ``v`` (counted as in §4.3)."""
    it = cfg.interaction
    dq, nq, nv = q.embed_dim, _tokens(q), _tokens(v)
    d_feat = dq if it.with_proj else v.embed_dim      # width of the key/value input
    if it.with_norm:
        acc.add("norm", 2 * dq + 2 * d_feat, 2 * nq * dq + 2 * nv * d_feat)
    if it.attn_type == "deform":
        hp = it.num_heads * it.num_points              # single level
        dv = int(dq * it.value_ratio)
        acc.add("attn_linear",
                (dq * hp * 2 + hp * 2) + (dq * hp + hp) + (d_feat * dv + dv) + (dv * dq + dq),
                nq * dq * hp * 2 + nq * dq * hp + nv * d_feat * dv + nq * dv * dq)
        # 5 MACs per sampling point and channel (4 bilinear taps + the weighted sum) over the query
        # branch's full width; the authors' script hard-codes 4 points, the num_points of every
        # published config
        acc.add("attn_core", 0, 5 * _formula_tokens(q) * it.num_points * dq)
    else:
        # plain multi-head cross-attention: wq (Dq->Dq), wk/wv (d_feat->Dq) without bias, proj (Dq->Dq)
        acc.add("attn_linear",
                dq * dq + 2 * d_feat * dq + (dq * dq + dq),
                nq * dq * dq + 2 * nv * d_feat * dq + nq * dq * dq)
        acc.add("attn_core", 0, 2 * _formula_tokens(q) * _formula_tokens(v) * dq)
    acc.add("gamma", dq, 0)
    if it.with_ffn:
        h = int(dq * it.ffn_ratio)
        if it.with_norm:
            acc.add("norm", 2 * dq, 2 * nq * dq)
        acc.add("ffn", dq * h + h + 10 * h + h * dq + dq, nq * dq * h + nq * h * 10 + nq * h * dq)
        acc.add("gamma", dq, 0)


def _interactions(cfg: PIIPConfig) -> PartComplexity:
    acc = _Acc()
    if cfg.num_branches > 1:
        for _ in range(cfg.num_interactions):
            for a, b in zip(cfg.branches[:-1], cfg.branches[1:]):
                if cfg.interaction.with_proj:
                    acc.add("proj", 2 * a.embed_dim * b.embed_dim + a.embed_dim + b.embed_dim,
                            _tokens(a) * a.embed_dim * b.embed_dim
                            + _tokens(b) * b.embed_dim * a.embed_dim)
                _injector(acc, cfg, a, b)
                _injector(acc, cfg, b, a)
    return acc.part("interactions")


def _merge(cfg: PIIPConfig) -> PartComplexity:
    """The classification proxy's merge: GN (branch 1), GN->Linear->GN (others), scalar w_i."""
    acc = _Acc()
    d1 = cfg.branches[0].embed_dim
    for i, b in enumerate(cfg.branches):
        n, d = _tokens(b), b.embed_dim
        if i == 0:
            acc.add("groupnorm", 2 * d1, 2 * n * d1)
        else:
            acc.add("groupnorm", 2 * d + 2 * d1, 2 * n * d + 2 * n * d1)
            acc.add("linear", d * d1 + d1, n * d * d1)
        acc.add("weights", 1, 0)
    return acc.part("merge")


def _head(cfg: PIIPConfig, classes: int, merged: bool) -> PartComplexity:
    acc = _Acc()
    if merged:
        d1, n_last = cfg.branches[0].embed_dim, _tokens(cfg.branches[-1])
        acc.add("norm", 2 * d1, 2 * n_last * d1)
        acc.add("classifier", d1 * classes + classes, d1 * classes)
    else:
        # one final norm + head per branch (single-branch baselines, per-branch cls heads); the
        # norm sees the patch tokens only (the original splits the class token off before it)
        for b in cfg.branches:
            d = b.embed_dim
            acc.add("norm", _norm_params(b.norm_layer, d), _norm_macs(b.norm_layer, _tokens(b) * d))
            acc.add("classifier", d * classes + classes, d * classes)
    return acc.part("head")


def paper_complexity(config: PIIPConfig, *, window_padding: bool = True) -> PaperComplexity:
    """Params and MACs of ``config`` as the PIIP paper / README count them (no model is built).

    Dense (``task="det"``) configs are counted on the authors' classification proxy: merges as
    ``GN``/``GN-Linear-GN`` and a 1000-way head (single-branch models: final LayerNorm + head).
    Classification configs are counted with their own head (per-branch or merged) and
    ``config.num_classes``.

    Args:
        config: the network.
        window_padding: count the ``qkv`` Linear of InternViT-class windowed blocks on the padded
            token grid, as the authors' public script does (README numbers, e.g. AugReg PIIP-SBL
            1874G). ``False`` counts it on the real grid like every other Linear, which is how the
            paper's Table 3 InternViT figures were counted (they came from the authors' internal
            codebase, which ran InternViT with window attention): InternViT-6B @1024 with window 14
            gives 24416G (published 24418G) without padding, 25601G with it.

    Returns a :class:`PaperComplexity` with ``params``, ``macs`` and ``parts`` (one per branch,
    ``interactions``, ``merge`` and ``head``); each part has a finer ``items`` breakdown.
    """
    other = sorted({b.patch_size for b in config.branches} - {_FORMULA_PATCH})
    if other:
        raise ValueError(f"the paper convention reproduces the authors' counting script, which assumes "
                         f"patch {_FORMULA_PATCH}; {config.name or 'this model'} uses patch {other[0]}: "
                         "count it with convention='actual' (--convention actual)")
    parts = [_branch(b, i + 1, window_padding) for i, b in enumerate(config.branches)]
    multi = config.num_branches > 1
    if multi:
        parts.append(_interactions(config))
    if config.task == "det":
        classes = _PROXY_CLASSES
        merged = multi
    else:
        classes = config.num_classes
        merged = config.cls_head == "merged"
    if merged:
        parts.append(_merge(config))
    parts.append(_head(config, classes, merged))
    return PaperComplexity(
        params=sum(p.params for p in parts),
        macs=sum(p.macs for p in parts),
        parts=tuple(parts),
        input_size=max(b.resolution for b in config.branches),
        name=config.name,
    )
