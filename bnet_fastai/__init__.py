"""bnet-fastai: BatchNorm vs BNET (Batch Normalization with Enhanced Linear Transformation) with fastai.

The public names below are imported on first use (PEP 562), so ``bnet-fastai --help`` and the argument
checks of the command line never load torch. The package's parts are its subpackages: `nn` (what you lift
into a model), `data`, `runs`, `sweeps`, `analysis` and `app` (the command line, the notebooks' helpers), each
importing only the ones before it; `names`, `paths`, `_checks` and `_files` are torch-free helpers, `speed`
times training steps side by side. Importing the package registers BNET with timm and fastai once they are
imported (`nn.registration`: timm's norm_layer="bnet", fastai's norm_types), without loading torch itself.
"""
import importlib
import warnings

from bnet_fastai.nn import registration as _registration  # torch-free: see its docstring

__version__ = "0.1.0"

_PUBLIC = {  # name -> the module that defines it
    "FusedBNET": "nn.fuse", "fuse_bn": "nn.fuse", "fuse_bnet": "nn.fuse", "reparameterize_model": "nn.fuse",
    # the layers come through norm_act, whose import registers BNET with timm's norm-layer factories
    "BNET1d": "nn.norm_act", "BNET2d": "nn.norm_act", "BNET3d": "nn.norm_act", "BNETAct2d": "nn.norm_act",
    "bnet_extra_params": "nn.layers",
    "create_model": "nn.models", "list_archs": "nn.models", "create_timm_model": "nn.timm_route",
    "count_norms": "nn.norms", "get_norm_layer": "nn.norms", "list_norms": "nn.norms", "select_norms": "nn.norms",
    "register_conversion": "nn.norms", "swap_norm": "nn.norms",
    "BNETWeightDecay": "nn.weight_decay", "bnet_params": "nn.weight_decay", "no_decay_params": "nn.weight_decay",
    "load_model": "runs.checkpoint",
}
__all__ = sorted(_PUBLIC)

# fastai.layers applies torch.jit.script at import time, which recent torch deprecates: fastai's warning,
# nothing a user of this package can act on. Filtered by its message, for the torch.jit module only.
warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated", category=FutureWarning,
                        module="torch.jit")

# BNET joins timm's norm factories (norm_layer="bnet") and fastai's norm_types (BN's weight-decay rule) as soon as
# timm and fastai are imported, before or after this package, without this import loading torch.
_registration.install()


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'bnet_fastai' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])
