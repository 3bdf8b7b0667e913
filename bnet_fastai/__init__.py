"""bnet-fastai: BatchNorm vs BNET (Batch Normalization with Enhanced Linear Transformation) with fastai."""
import warnings

# fastai.layers applies torch.jit.script at import time, which recent torch deprecates: fastai's warning,
# nothing a user of this package can act on. Silenced for these imports only.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated", category=FutureWarning)
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
