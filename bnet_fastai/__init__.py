"""bnet-fastai: BatchNorm vs BNET (Batch Normalization with Enhanced Linear Transformation) with fastai.

The public names below are imported on first use (PEP 562), so ``bnet-fastai --help`` and the argument
checks of the command line never load torch.
"""
import importlib
import warnings

__version__ = "0.1.0"

_PUBLIC = {  # name -> the module that defines it
    "FusedBNET": "fuse", "fuse_bn": "fuse", "fuse_bnet": "fuse",
    # the layers come through norm_act, whose import registers BNET with timm's norm-layer factories
    "BNET1d": "norm_act", "BNET2d": "norm_act", "BNET3d": "norm_act", "BNETAct2d": "norm_act",
    "bnet_extra_params": "layers",
    "create_model": "models", "list_archs": "models",
    "count_norms": "norms", "get_norm_layer": "norms", "list_norms": "norms", "select_norms": "norms",
    "register_conversion": "norms", "swap_norm": "norms",
    "BNETWeightDecay": "weight_decay", "bnet_params": "weight_decay", "no_decay_params": "weight_decay",
}
__all__ = sorted(_PUBLIC)

# fastai.layers applies torch.jit.script at import time, which recent torch deprecates: fastai's warning,
# nothing a user of this package can act on. Filtered by its message, for the torch.jit module only.
warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated", category=FutureWarning,
                        module="torch.jit")


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'bnet_fastai' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])
