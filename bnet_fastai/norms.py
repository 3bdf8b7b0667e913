"""The norm switch: a registry of norm layers by name, and `swap_norm` to convert a built model.

Placement follows the two implementations of BNET:
- ``"all"``: every BatchNorm becomes BNET (the seed implementation of this project);
- ``"last"``: only the last norm of each residual block's main path (the paper's released code puts
  BNET in ``bn3`` of each bottleneck). Shortcut (downsample) norms and the stem keep BN.
"""
from __future__ import annotations

import functools
from collections.abc import Iterator

import torch
from fastai.layers import ResBlock
from timm.models.resnest import ResNestBottleneck
from timm.models.resnet import BasicBlock, Bottleneck
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import names
from ._checks import check_choice, check_kernel_size
from .layers import BNET1d, BNET2d, BNET3d, _BNETNd

# name -> layer class for 1d, 2d and 3d inputs; the contract of each class is `cls(num_features, **kw)`.
NORM_LAYERS: dict[str, tuple[type[nn.Module], type[nn.Module], type[nn.Module]]] = {
    "bn": (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d),
    "bnet": (BNET1d, BNET2d, BNET3d),
}
PLACEMENTS, SWAP_INITS = names.PLACEMENTS, names.SWAP_INITS

# Residual blocks we know, and the attribute holding their shortcut branch (whose norms are never "last").
RESIDUAL_BLOCKS: dict[type[nn.Module], str] = {
    ResBlock: "idpath",  # fastai xresnet / xse_resnet / xresnext
    BasicBlock: "downsample",  # timm ResNet
    Bottleneck: "downsample",
    ResNestBottleneck: "downsample",  # timm ResNeSt
}


def list_norms() -> list[str]:
    """Names accepted wherever a `norm` is asked for."""
    return list(NORM_LAYERS)


def get_norm_layer(norm: str = "bnet", ndim: int = 2, **kw) -> type[nn.Module] | functools.partial:
    """The layer class for `norm` (with `kw` bound), usable as timm's or torchvision's `norm_layer`."""
    check_choice("norm", norm, NORM_LAYERS)
    check_choice("ndim", ndim, (1, 2, 3))
    cls = NORM_LAYERS[norm][ndim - 1]
    return functools.partial(cls, **kw) if kw else cls


def _is_norm(m: nn.Module) -> bool:
    return isinstance(m, (_BatchNorm, _BNETNd))


def _norms(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """(name, layer) for each BN or BNET in `module`, in registration order, never inside a BNET."""
    for name, child in module.named_children():
        full = f"{prefix}{name}"
        if _is_norm(child):
            yield full, child
        else:
            yield from _norms(child, full + ".")


def _last_norms(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """(name, layer) for the last norm of each known residual block's main path."""
    for name, child in module.named_children():
        full = f"{prefix}{name}"
        shortcut = next((attr for cls, attr in RESIDUAL_BLOCKS.items() if isinstance(child, cls)), None)
        if shortcut is None:
            yield from _last_norms(child, full + ".")
            continue
        main = [(n, m) for n, m in _norms(child, full + ".") if not n.startswith(f"{full}.{shortcut}.")]
        if main:
            yield main[-1]


def select_norms(model: nn.Module, placement: str = "all") -> list[tuple[str, nn.Module]]:
    """The norm layers (BN or BNET) of `model` that `placement` designates, by qualified name."""
    check_choice("placement", placement, PLACEMENTS)
    found = list(_norms(model) if placement == "all" else _last_norms(model))
    if placement == "last" and not found:
        known = ", ".join(f"{c.__module__}.{c.__name__}" for c in RESIDUAL_BLOCKS)
        raise ValueError(f"placement='last' found no residual block in {type(model).__name__}; "
                         f"known blocks: {known} (add yours to bnet_fastai.norms.RESIDUAL_BLOCKS)")
    return found


def _bn_ndim(bn: _BatchNorm) -> int:
    # SyncBatchNorm accepts any input rank; the 2d layer is the common case.
    return next((i + 1 for i, cls in enumerate(NORM_LAYERS["bn"]) if isinstance(bn, cls)), 2)


def swap_norm(model: nn.Module, norm: str = "bnet", placement: str = "all", k: int = 3,
              init: str = "auto") -> nn.Module:
    """Convert the BatchNorms that `placement` selects into `norm` layers, in place; returns `model`.

    Running statistics are carried over. `init` (BNET only): ``"auto"`` gives ``zero`` where the BN's
    gamma is zero (library zero-init of a block's last BN) and ``identity`` elsewhere; ``"copy"`` moves
    gamma/beta into the centre tap/bias, so a trained model keeps its function; or a BNET init name.
    """
    check_choice("norm", norm, NORM_LAYERS)
    check_choice("placement", placement, PLACEMENTS)
    check_kernel_size(k)
    check_choice("swap_norm init", init, SWAP_INITS)
    if norm == "bn":  # BN is what every supported library builds: nothing to convert.
        return model
    for name, layer in select_norms(model, placement):
        if isinstance(layer, _BatchNorm):
            new_cls = NORM_LAYERS[norm][_bn_ndim(layer) - 1]
            model.set_submodule(name, new_cls.from_bn(layer, k=k, init=init))
    return model


def count_norms(model: nn.Module) -> dict[str, int]:
    """How many BN and BNET layers `model` holds (BNET's inner normaliser is not counted as BN)."""
    layers = [m for _, m in _norms(model)]
    return {"bn": sum(isinstance(m, _BatchNorm) for m in layers),
            "bnet": sum(isinstance(m, _BNETNd) for m in layers)}


def kernel_stats(model: nn.Module, x: torch.Tensor | None = None) -> list[dict]:
    """For each BNET: its name, stage and the mean |weight| of every kernel tap over channels.

    Stages are the top-level children holding residual blocks (``stage 1`` ...); BNETs before them are
    ``stem``. With a sample input `x`, each entry also gets the ``spatial`` size the layer sees: a BNET on
    1x1 maps (ResNeSt's split-attention) only ever uses its centre tap. This is what a report's kernel
    picture shows: which neighbours the learned kernels weigh.
    """
    stages = [name for name, child in model.named_children()
              if any(isinstance(m, tuple(RESIDUAL_BLOCKS)) for m in child.modules())]
    bnets = [(name, layer) for name, layer in _norms(model) if isinstance(layer, _BNETNd)]
    spatial = {}
    if x is not None:
        def record(name: str):
            def hook(module, inputs, output) -> None:
                spatial.setdefault(name, list(inputs[0].shape[2:]))
            return hook

        hooks = [layer.register_forward_hook(record(name)) for name, layer in bnets]
        was_training = model.training
        with torch.no_grad():
            model.eval()(x)
        model.train(was_training)
        for h in hooks:
            h.remove()
    stats = []
    for name, layer in bnets:
        top = name.split(".")[0]
        stats.append({"layer": name, "stage": f"stage {stages.index(top) + 1}" if top in stages else "stem",
                      "k": layer.k, "spatial": spatial.get(name),
                      "mean_abs": layer.weight.detach().abs().mean(0)[0].cpu().tolist()})
    return stats
