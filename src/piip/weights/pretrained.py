"""Deprecated: branch initialisation was split by job (:mod:`piip.weights`: ``branch_init``,
``formats``, ``renaming``, ``adapt``, ``hub``, ``reports``, ``paper``); this alias of its public names
stays for one release. The weights table generator is ``tools/weights_table.py``."""
import warnings

from .adapt import adapt_branch_state_dict
from .branch_init import load_branch, load_branch_weights
from .formats import load_weights_file
from .hub import HubUnavailableError
from .paper import paper_weights
from .reports import BranchLoadReport, BranchWeightsError, LoadReport

__all__ = ["BranchLoadReport", "BranchWeightsError", "HubUnavailableError", "LoadReport", "adapt_branch_state_dict",
           "load_branch", "load_branch_weights", "load_weights_file", "paper_weights"]

warnings.warn("piip.weights.pretrained is deprecated: import from piip.weights",
              DeprecationWarning, stacklevel=2)
