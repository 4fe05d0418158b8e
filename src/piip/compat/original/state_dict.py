"""The authors' backbone state dicts -> piip's key names, checked against the model's shapes."""
from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from ...models.piip import PIIP
from ...weights.checkpoint import CheckpointError, check_state_dict

__all__ = ["map_key", "convert_state_dict"]

_BRANCH = re.compile(r"branch(\d+)\.(.+)")
_UNIT = re.compile(r"interactions\.(\d+)\.interaction_units_(\d)(\d)\.(.+)")
_MERGE = re.compile(r"merge_branch(\d+)\.(.+)")
_WEIGHT = re.compile(r"w(\d+)")
_GAMMA = re.compile(r"(blocks\.\d+\.)gamma_([12])(.*)")
_UNIT_PARTS = (
    ("branch1to2_proj.", "proj_a_to_b."),
    ("branch2to1_proj.", "proj_b_to_a."),
    ("branch2to1_injector.", "inject_b_to_a."),
    ("branch1to2_injector.", "inject_a_to_b."),
)


_SINGLE_BRANCH_ROOTS = ("patch_embed.", "pos_embed", "cls_token", "blocks.")
_UP = re.compile(r"up([1-4])\.(.+)")


def map_key(key: str, *, head: str = "det") -> str | None:
    """Our name for one of their backbone keys (``None`` when it has no counterpart).

    ``head`` selects what ``merge_branch*``/``w*`` become: ``"det"`` (conv merge, ``merge.*``) or
    ``"merged"`` (the classification GroupNorm/Linear merge, ``classifier.*``). The scalar weights
    ``w{i}`` map to ``merge.weights[i-1]`` / ``classifier.weights[i-1]`` and are written
    ``<target>#<index>``. ``head="single"`` maps a single-branch baseline (``vit_models`` /
    ``InternViT6B`` with ``with_fpn=True``): its ViT keys to branch 0, ``up1``/``up2`` to the pyramid.
    """
    if head == "single":
        if key.startswith(_SINGLE_BRANCH_ROOTS):
            return map_key(f"branch1.{key}")
        m = _UP.fullmatch(key)
        return f"fpn.fpn{m.group(1)}.{m.group(2)}" if m else None
    m = _BRANCH.fullmatch(key)
    if m:
        index, rest = int(m.group(1)), m.group(2)
        if index < 1:
            return None
        g = _GAMMA.fullmatch(rest)
        if g:
            rest = f"{g.group(1)}ls{g.group(2)}.gamma{g.group(3)}"
        return f"branches.{index - 1}.{rest}"
    m = _UNIT.fullmatch(key)
    if m:
        k, a, b, rest = int(m.group(1)), int(m.group(2)), int(m.group(3)), m.group(4)
        if a < 1 or b != a + 1:
            return None
        for theirs, ours in _UNIT_PARTS:
            if rest.startswith(theirs):
                rest = ours + rest[len(theirs):]
                break
        else:
            return None
        rest = rest.replace(".ffn.dwconv.dwconv.", ".ffn.dwconv.")
        return f"interactions.{k}.units.{a - 1}.{rest}"
    m = _WEIGHT.fullmatch(key)
    if m and int(m.group(1)) >= 1:
        target = "merge.weights" if head == "det" else "classifier.weights"
        return f"{target}#{int(m.group(1)) - 1}"
    m = _MERGE.fullmatch(key)
    if m:
        index, rest = int(m.group(1)) - 1, m.group(2)
        if index < 0:
            return None
        if head == "det":
            return f"merge.projections.{index}.{rest}"
        # classification merge: branch 1 is a GroupNorm, the others GroupNorm -> Linear -> GroupNorm
        if rest in ("weight", "bias"):
            return f"classifier.merge_norms.{index}.{rest}"
        part, _, leaf = rest.partition(".")
        target = {"0": "merge_norms", "1": "merge_linears", "2": "merge_out_norms"}.get(part)
        return f"classifier.{target}.{index}.{leaf}" if target and leaf else None
    for theirs, ours in (("fpn1.", "fpn.fpn1."), ("fpn2.", "fpn.fpn2."),
                         ("cls_norm.", "classifier.norm."), ("cls_head.", "classifier.head.")):
        if key.startswith(theirs):
            return ours + key[len(theirs):]
    return None


def _head_kind(model: PIIP) -> str:
    if model.config.num_branches == 1:
        return "single"
    return "merged" if model.config.task == "cls" and model.config.cls_head == "merged" else "det"


def convert_state_dict(state_dict: Mapping[str, torch.Tensor], model: PIIP) -> dict[str, torch.Tensor]:
    """Map the authors' backbone ``state_dict`` to ``model``'s keys, checked against its shapes.

    ``state_dict`` is the backbone's own state dict (their key names; an MMDetection-style
    ``backbone.`` prefix is stripped). The result holds exactly ``model``'s keys, so
    ``model.load_state_dict(result, strict=True)`` succeeds. Tensors keep their dtype
    (``load_state_dict`` casts them).

    Raises :class:`CheckpointError` naming the first key whose shape differs (their name, ours, both
    shapes), and listing the model keys the checkpoint does not provide and the checkpoint keys that
    have no place in the model (never silently dropped).
    """
    expected = model.state_dict()
    head = _head_kind(model)
    out: dict[str, torch.Tensor] = {}
    names: dict[str, str] = {}
    scalars: dict[str, dict[int, tuple[str, torch.Tensor]]] = {}
    unmapped: list[str] = []
    for key, tensor in state_dict.items():
        if not isinstance(tensor, torch.Tensor):
            unmapped.append(f"{key} (not a tensor: {type(tensor).__name__})")
            continue
        source = key[len("backbone."):] if key.startswith("backbone.") else key
        target = map_key(source, head=head)
        if target is None:
            unmapped.append(key)
            continue
        if "#" in target:
            target, index = target.split("#")
            scalars.setdefault(target, {})[int(index)] = (key, tensor)
            continue
        if target in out:
            raise CheckpointError(f"keys {names[target]!r} and {key!r} both map to {target!r}")
        out[target] = tensor
        names[target] = key
    for target, parts in scalars.items():
        bad = [(k, tuple(t.shape)) for k, t in parts.values() if t.numel() != 1]
        if bad:
            k, shape = bad[0]
            raise CheckpointError(f"{k!r} must be a scalar merge weight, got shape {list(shape)}")
        width = expected[target].shape[0] if target in expected else max(parts) + 1
        missing = [i for i in range(width) if i not in parts]
        if missing:
            raise CheckpointError(
                f"the checkpoint lacks the merge weight(s) {['w%d' % (i + 1) for i in missing]} "
                f"({target!r} needs w1..w{width})")
        first = parts[0][1]
        out[target] = torch.stack([parts[i][1].reshape(()).to(first.dtype) for i in range(len(parts))])
        names[target] = ", ".join(parts[i][0] for i in range(len(parts)))

    check_state_dict(out, expected, what="converted checkpoint", names=names, unmapped=unmapped)
    return out

