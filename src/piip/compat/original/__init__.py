"""Compatibility with the authors' code (OpenGVLab/PIIP): their configs, their state dicts, their files.

Three layers, each usable alone:

* **configs** — :func:`to_piip_config` / :func:`build` translate the keyword dictionary of one of
  their backbone classes (``PIIPTwoBranch`` / ``PIIPThreeBranch`` / ``PIIPFourBranch`` of the
  MMDetection copy for ``task="det"``, the MMSegmentation copy for ``task="seg"``, the
  classification ``PIIPThreeBranch`` & co. for ``task="cls"``, and the single-branch
  ``vit_models`` / ``InternViT6B`` detection and segmentation baselines) into a
  :class:`~piip.config.model.PIIPConfig` whose network computes what theirs computes. Every
  constructor argument is converted, ignored or refused by name as the audit in :mod:`.arguments`
  says (``docs/original_arguments.md``); a key the config leaves out takes the default of *the
  class that reads it* (the two copies of ``InternViT6B`` and ``vit_models`` differ); the branch
  class is the one their code picks (``'deit'`` in the ``pretrained`` path, ``model_type`` in the
  classification code). Their segmentation copies differ from the detection ones in the position
  embeddings only (sized for ``img_size``, never resized), so a ``"seg"`` config is a dense one.
* **state dicts** — :func:`convert_state_dict` renames their keys to ours (``gamma_1`` ->
  ``ls1.gamma``, ``interaction_units_23`` -> ``units.1``, ``branch2to1_injector`` ->
  ``inject_b_to_a``, ``ffn.dwconv.dwconv`` -> ``ffn.dwconv``, ``merge_branch{i}`` ->
  ``merge.projections.{i-1}``, the scalars ``w1..wn`` -> one ``merge.weights`` vector, ``fpn1/2``
  -> ``fpn.fpn1/2``, ...). The result loads with ``strict=True`` or the error says why (first key
  whose shape differs with both shapes; missing keys; keys it could not map — never dropped).
* **files** — :func:`load_original_checkpoint` reads the layouts their training wrote: MMDetection
  (``state_dict`` with ``backbone.`` next to ``neck.``/``rpn_head.``/``roi_head.``/``bbox_head.``),
  MMSegmentation (``backbone.`` next to ``decode_head.``/``auxiliary_head.``),
  DeepSpeed (``module``), classification (``model`` plus the EMA copy ``model_ema``), plain state
  dicts and the golden-fixture safetensors files. Pickles are read with ``weights_only=True`` and,
  when they hold other objects (configs, ``argparse.Namespace``, numpy values), with a restricted
  unpickler that replaces every non-tensor class by an inert placeholder: no code from the file runs.
  :func:`convert_checkpoint` does the whole trip to piip's own safetensors format, Mask R-CNN and
  UperNet heads included (each task converts its own: :mod:`piip.tasks.detection.authors_heads`,
  :mod:`piip.tasks.segmentation.authors_heads`).

Quirks reproduced (reference §9): the 4-branch *detection* class builds branch 4 with branch 3's
kwargs (``vit_models(**branch3)``), so its released checkpoints hold a ViT-S-wide branch 4; the
classification heads read the first *patch* token; class tokens get no position embedding;
``vit_models`` windows pad the tokens before ``qkv`` on the flash path and the ``qkv`` output on the
non-flash path.
"""
from ...weights.checkpoint import CheckpointError
from .configs import branch_kwargs, build, original_class, original_class_name, to_piip_config
from .files import convert_checkpoint, load_original_checkpoint
from .state_dict import convert_state_dict, map_key

__all__ = [
    "build",
    "to_piip_config",
    "branch_kwargs",
    "original_class",
    "original_class_name",
    "convert_state_dict",
    "map_key",
    "load_original_checkpoint",
    "convert_checkpoint",
    "CheckpointError",
]
