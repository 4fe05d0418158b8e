"""Weights: piip's own checkpoint format (and branch initialisation from pretrained weights)."""
from .checkpoint import (CheckpointError, check_state_dict, load_checkpoint, load_state_dict_checked,
                         read_checkpoint, save_checkpoint)
from .pretrained import (BranchLoadReport, BranchWeightsError, HubUnavailableError, LoadReport,
                         adapt_branch_state_dict, load_branch, load_branch_weights, load_weights_file,
                         paper_weights, pretrained_weights_table, write_weights_table)
