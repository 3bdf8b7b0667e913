"""The norm switch: a registry of norm layers by name, and `swap_norm` to convert a built model.

Placement follows the two implementations of BNET:
- ``"all"``: every BatchNorm becomes BNET (the seed implementation of this project);
- ``"last"``: only the last norm of each residual block's main path, the norm right before the residual
  addition (the paper's released code puts BNET in ``bn3`` of each torchvision bottleneck): the latest norm
  every path of the branch passes through, never one on a parallel (re-parameterisation) branch or one that
  normalises the block's input (`graph.residual_additions`). Shortcut (downsample) norms and the stem keep
  BN. The blocks are found by tracing the model (`graph`); block classes fx cannot trace are read from
  `RESIDUAL_BLOCKS`.

Which BNET replaces which BatchNorm is `NORM_CONVERSIONS`: a BatchNorm subclass whose forward does more
than normalise (timm's ``BatchNormAct2d`` applies a drop and an activation) becomes a BNET that does the
same work; a subclass with a forward of its own that no conversion covers is refused, never simplified.
"""
from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterator

import torch
from fastai.layers import ResBlock
from timm.layers import BatchNormAct2d, SyncBatchNormAct
from timm.models.efficientvit_mit import LiteMLA
from timm.models.efficientvit_msra import LocalWindowAttention
from timm.models.resnest import ResNestBottleneck
from timm.models.resnet import BasicBlock, Bottleneck
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torchvision.ops.misc import FrozenBatchNorm2d

from bnet_fastai.nn import graph
from bnet_fastai import names
from bnet_fastai._checks import check_choice, check_kernel_size, check_type
from bnet_fastai.nn.graph import _join
from bnet_fastai.nn.graph import is_norm as _is_norm
from bnet_fastai.nn.layers import BNET1d, BNET2d, BNET3d, _BNETNd
from bnet_fastai.nn.norm_act import BNETAct2d

# name -> layer class for 1d, 2d and 3d inputs; the contract of each class is `cls(num_features, **kw)`.
NORM_LAYERS: dict[str, tuple[type[nn.Module], type[nn.Module], type[nn.Module]]] = {
    "bn": (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d),
    "bnet": (BNET1d, BNET2d, BNET3d),
}
PLACEMENTS, SWAP_INITS = names.PLACEMENTS, names.SWAP_INITS

# BatchNorm class -> how swap_norm converts one: fn(bn, k, init) returning a module that computes the same
# function with BNET in place of the normalisation (and keeps anything else the forward does). A subclass
# is converted by the entry of the nearest class in its MRO, provided it does not override that forward.
NORM_CONVERSIONS: dict[type[_BatchNorm], Callable[[_BatchNorm, int, str], nn.Module]] = {
    nn.BatchNorm1d: BNET1d.from_bn,
    nn.BatchNorm2d: BNET2d.from_bn,
    nn.BatchNorm3d: BNET3d.from_bn,
    nn.SyncBatchNorm: BNET2d.from_bn,  # a SyncBatchNorm takes any rank; (N, C, H, W) is the common case
    BatchNormAct2d: BNETAct2d.from_bn,  # timm: BatchNorm, then its drop and act modules
    SyncBatchNormAct: BNETAct2d.from_bn,
}

# Residual blocks by class, with the attribute holding their shortcut branch (whose norms are never "last"):
# what decides for a block that fx cannot trace. Traceable blocks need no entry; on these classes the traced
# rule picks the same layers (tests/test_conversions.py).
RESIDUAL_BLOCKS: dict[type[nn.Module], str] = {
    ResBlock: "idpath",  # fastai xresnet / xse_resnet / xresnext
    BasicBlock: "downsample",  # timm ResNet
    Bottleneck: "downsample",
    ResNestBottleneck: "downsample",  # timm ResNeSt
}

# Modules that fx does not trace (timm marks them not to: `register_notrace_module`) ending a residual branch,
# with the path of the last norm inside them, read from their forward (tests/test_conversions.py checks it is the
# last norm each one calls). A branch ending in another such module is named in a warning and keeps BatchNorm.
HIDDEN_LAST: dict[type[nn.Module], str] = {
    LiteMLA: "proj.norm",  # EfficientViT (MIT): the output projection's ConvNormAct
    LocalWindowAttention: "attn.proj.1.bn",  # EfficientViT (MSRA): cascaded group attention's projection
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


def register_conversion(bn_cls: type[_BatchNorm], convert: Callable[[_BatchNorm, int, str], nn.Module]) -> None:
    """Teach `swap_norm` a BatchNorm subclass: ``convert(bn, k, init)`` returns its BNET replacement."""
    if not (isinstance(bn_cls, type) and issubclass(bn_cls, _BatchNorm)):
        raise TypeError(f"register_conversion takes a BatchNorm class (a _BatchNorm subclass), got {bn_cls!r}")
    NORM_CONVERSIONS[bn_cls] = convert


def _conversion(name: str, bn: _BatchNorm) -> Callable[[_BatchNorm, int, str], nn.Module]:
    """The registered conversion for `bn`, or a one-line refusal naming its class and the fix."""
    cls = type(bn)
    base = next((c for c in cls.__mro__ if c in NORM_CONVERSIONS), None)
    if base is not None and cls.forward is base.forward:
        return NORM_CONVERSIONS[base]
    qual = f"{cls.__module__}.{cls.__qualname__}"
    raise ValueError(f"swap_norm cannot convert {name!r} ({qual}): its forward does more than BatchNorm and no "
                     f"conversion is registered for it; register one with bnet_fastai.register_conversion("
                     f"{cls.__name__}, fn) where fn(bn, k, init) returns its BNET replacement")


def _norms(module: nn.Module, prefix: str = "", every_name: bool = False) -> Iterator[tuple[str, nn.Module]]:
    """(name, layer) for each BN or BNET in `module`, in registration order, never inside a BNET. `every_name`:
    a layer registered twice in one parent is given under each of its names too (torch's `named_children`
    gives it once)."""
    children = ((n, c) for n, c in module._modules.items() if c is not None) if every_name else module.named_children()
    for name, child in children:
        full = f"{prefix}{name}"
        if _is_norm(child):
            yield full, child
        else:
            yield from _norms(child, full + ".", every_name)


def _registered_block_last(name: str, block: nn.Module) -> str | None:
    """The last norm of a `RESIDUAL_BLOCKS` block's main path, by registration order."""
    shortcut = next(attr for cls, attr in RESIDUAL_BLOCKS.items() if isinstance(block, cls))
    main = [n for n, _ in _norms(block, name + ".") if not n.startswith(f"{name}.{shortcut}.")]
    return main[-1] if main else None


def _last_norms(model: nn.Module) -> tuple[set[str], int]:
    """Qualified names of the last norm on each residual block's main path (see the module docstring), and how
    many residual additions have none (a sum of parallel branches, a pre-norm block)."""
    traced = graph.trace(model)
    found, seen, without = set(), set(), 0
    undecided: list[str] = []  # modules on a main path that hide its last norm, and no rule to find it
    hiding: list[str] = []  # every module on a main path that hides its last norm: its norms are accounted for
    for prefix, root, g in traced.units:
        for _, last in graph.residual_additions(root, g):
            if last is None:
                without += 1
            elif not graph.holds_norms(root.get_submodule(last)):
                found.add(_join(prefix, last))
            else:
                hiding.append(_join(prefix, last))
                inner = next((p for cls, p in HIDDEN_LAST.items() if isinstance(root.get_submodule(last), cls)), None)
                (found.add(_join(_join(prefix, last), inner)) if inner else undecided.append(_join(prefix, last)))
        seen |= {_join(prefix, n.target) for n in g.nodes if n.op == "call_module"}
    registered = [n for n, m in traced.opaque.items() if isinstance(m, tuple(RESIDUAL_BLOCKS))]
    for name in registered:
        last = _registered_block_last(name, model.get_submodule(name))
        if last:
            found.add(last)

    def holder(name: str) -> str | None:  # the innermost untraceable module around `name`
        return max((o for o in traced.opaque if not o or name.startswith(o + ".")), key=len, default=None)

    if undecided:
        kinds = sorted({type(model.get_submodule(u)).__name__ for u in undecided})
        warnings.warn(f"placement='last': {len(undecided)} residual branch(es) end in {', '.join(kinds)}, which "
                      f"torch.fx does not trace, so their last norm was not decided and they keep BatchNorm "
                      f"({undecided[0]} ...); add the class and the path of its last norm to "
                      f"bnet_fastai.nn.norms.HIDDEN_LAST", stacklevel=3)
    unseen = [n for n, _ in _norms(model) if n not in seen and holder(n) is not None
              and not any(n.startswith(r + ".") for r in registered + hiding)]
    if unseen:  # a norm that is never called (dead code) is seen by no graph and has no untraceable holder
        holders = sorted({type(traced.opaque[holder(u)]).__name__ for u in unseen})
        warnings.warn(f"placement='last': torch.fx cannot trace {', '.join(holders)}, so {len(unseen)} norm(s) "
                      f"inside ({unseen[0]} ...) were not considered; if such a module is a residual block, add "
                      f"its class to bnet_fastai.nn.norms.RESIDUAL_BLOCKS", stacklevel=3)
    return found, without


def select_norms(model: nn.Module, placement: str = "all") -> list[tuple[str, nn.Module]]:
    """The norm layers (BN or BNET) of `model` that `placement` designates, by qualified name, in order."""
    check_choice("placement", placement, PLACEMENTS)
    if placement == "all":
        return list(_norms(model))
    last, without = _last_norms(model)
    found = [(n, m) for n, m in _norms(model) if n in last]
    if not found and without:
        raise ValueError(f"placement='last' found no last norm in {type(model).__name__}: all {without} additions "
                         f"of a shortcut to a path with norms add a path that ends in a sum of parallel branches "
                         f"(re-parameterisable blocks) or whose only norm normalises the block's input; use "
                         f"placement='all'")
    if not found:
        raise ValueError(f"placement='last' found no residual block in {type(model).__name__}: no addition of a "
                         f"shortcut to a path with a norm (use placement='all', or add an untraceable block class "
                         f"to bnet_fastai.nn.norms.RESIDUAL_BLOCKS)")
    return found


# Normalisation layers that are not BatchNorm: torch's, torchvision's frozen BN, and timm's norm modules.
_OTHER_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm, nn.LocalResponseNorm,
                nn.RMSNorm, FrozenBatchNorm2d)
_TIMM_NORM_MODULES = ("timm.layers.norm", "timm.layers.norm_act", "timm.layers.evo_norm",
                      "timm.layers.filter_response_norm")


def is_other_norm(m: nn.Module) -> bool:
    """A normalisation layer that is not BatchNorm or BNET (LayerNorm, GroupNorm, FrozenBatchNorm2d, timm's)."""
    return not _is_norm(m) and (isinstance(m, _OTHER_NORMS) or type(m).__module__ in _TIMM_NORM_MODULES)


def _other_norms(model: nn.Module) -> list[str]:
    """Class names of the normalisation layers in `model` that are not BatchNorm or BNET."""
    return sorted({type(m).__name__ for m in model.modules() if is_other_norm(m)})


def swap_norm(model: nn.Module, norm: str = "bnet", placement: str = "all", k: int = 3,
              init: str = "auto") -> nn.Module:
    """Convert the BatchNorms that `placement` selects into `norm` layers, in place; returns `model`.

    Running statistics are carried over. `init` (BNET only): ``"auto"`` gives ``zero`` where the BN's
    gamma is zero (library zero-init of a block's last BN) and ``identity`` elsewhere; ``"copy"`` moves
    gamma/beta into the centre tap/bias, so a trained model keeps its function; or a BNET init name.

    Each layer is converted by `NORM_CONVERSIONS`: timm's ``BatchNormAct2d`` becomes `BNETAct2d` with the
    same drop and act modules. A layer registered under several names (tied, or shared by blocks) becomes one
    BNET under each of them. Every selected layer is checked before any is replaced: a BatchNorm subclass
    with a forward of its own and no registered conversion, a model with no BatchNorm at all (a LayerNorm
    model), or one holding BNETs of another `k` raises ValueError and leaves the model as it was; a
    TorchScript module raises TypeError.
    """
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError("swap_norm takes an eager nn.Module, not a TorchScript module: convert the model first, "
                        "then export it (torch.export, ONNX)")
    check_type("swap_norm", "a model (a torch nn.Module)", model, nn.Module,
               "build it first, e.g. swap_norm(timm.create_model('resnet18')), or use create_timm_model(name)")
    check_choice("norm", norm, NORM_LAYERS)
    check_choice("placement", placement, PLACEMENTS)
    check_kernel_size(k)
    check_choice("swap_norm init", init, SWAP_INITS)
    if norm == "bn":  # BN is what every supported library builds: nothing to convert.
        return model
    kernels = sorted({m.k for _, m in _norms(model) if isinstance(m, _BNETNd)} - {k})
    if kernels:
        raise ValueError(f"swap_norm(k={k}): {type(model).__name__} already holds BNET layers with "
                         f"k={', '.join(map(str, kernels))}, and swap_norm converts BatchNorm only; convert the "
                         f"BatchNorm model with k={k} instead")
    if not any(True for _ in _norms(model)):
        others = _other_norms(model)
        uses = f"it uses {', '.join(others)}" if others else "it has no normalisation layer"
        raise ValueError(f"no BatchNorm layer in {type(model).__name__}: {uses}; BNET replaces BatchNorm only")
    todo = [(name, layer, _conversion(name, layer)) for name, layer in select_norms(model, placement)
            if isinstance(layer, _BatchNorm)]
    new = {}  # one BNET per BatchNorm object, however many names it has
    for _, layer, convert in todo:
        if id(layer) not in new:
            new[id(layer)] = convert(layer, k, init)
    for name, layer in list(_norms(model, every_name=True)):  # ... set under each of them
        if id(layer) in new:
            model.set_submodule(name, new[id(layer)])
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
    tops = {n.split(".")[0] for n in _last_norms(model)[0]}
    stages = [name for name, _ in model.named_children() if name in tops]
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
