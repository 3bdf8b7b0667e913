"""bnet-fastai: BatchNorm vs BNET (Batch Normalization with Enhanced Linear Transformation) with fastai."""
from .fuse import FusedBNET, fuse_bnet
from .layers import BNET1d, BNET2d, BNET3d, bnet_extra_params
from .models import create_model, list_archs
from .norms import count_norms, get_norm_layer, list_norms, select_norms, swap_norm
from .weight_decay import BNETWeightDecay, bnet_params, no_decay_params

__version__ = "0.1.0"

__all__ = [
    "BNET1d", "BNET2d", "BNET3d", "BNETWeightDecay", "FusedBNET", "bnet_extra_params", "bnet_params",
    "count_norms", "create_model", "fuse_bnet", "get_norm_layer", "list_archs", "list_norms",
    "no_decay_params", "select_norms", "swap_norm",
]
