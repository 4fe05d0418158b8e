"""Weights: piip's own checkpoint format, and branch initialisation from pretrained weights
(:mod:`~piip.weights.branch_init`: files read by :mod:`~piip.weights.formats`, renamed by
:mod:`~piip.weights.renaming`, adapted by :mod:`~piip.weights.adapt`, timm tags fetched by
:mod:`~piip.weights.hub`, reported by :mod:`~piip.weights.reports`)."""
from .adapt import adapt_branch_state_dict
from .branch_init import load_branch, load_branch_weights
from .checkpoint import (CheckpointError, check_state_dict, load_checkpoint, load_state_dict_checked,
                         read_checkpoint, save_checkpoint)
from .formats import load_weights_file
from .hub import HubUnavailableError
from .paper import paper_weights
from .reports import BranchLoadReport, BranchWeightsError, LoadReport
