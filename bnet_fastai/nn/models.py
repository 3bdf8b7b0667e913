"""The model zoo: fastai's xresnet family and timm's ResNeSt, built with BN, then switched to `norm`.

Every arch is built by its own library with BatchNorm, so the library's init runs exactly as it does
for BN; `swap_norm` then converts the norms `placement` selects. A BN whose gamma the library
zero-initialised (fastai ``NormType.BatchZero``, timm ``zero_init_last``) becomes a BNET with
``init="zero"``, every other BN a BNET with ``init="identity"``: a fresh BNET model starts from the
function of the fresh BN model, up to fastai's BN bias of 1e-3, which BNET starts at 0.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import timm
from fastai.layers import AvgPool, MaxPool, ResBlock, SEBlock
from fastai.vision.models import xresnet as fx
from torch import nn

from bnet_fastai import names
from bnet_fastai._checks import check_block_args, check_model_args, require
from bnet_fastai.nn.norms import swap_norm

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "mish": nn.Mish, "silu": nn.SiLU}

# One block per stage, half width: small enough to train on a CPU in minutes.
_MINI_XRESNET = dict(layers=[1, 1, 1, 1], widen=0.5)
_MINI_RESNEST = dict(channels=(32, 64, 128, 256), stem_width=16)


@dataclass(frozen=True)
class Arch:
    """How to build one named architecture: the library, its builder and fixed keyword arguments."""

    library: str  # "fastai" or "timm"
    builder: Callable[..., nn.Module]
    kwargs: dict = field(default_factory=dict)
    takes_act: bool = True  # the builder is given the activation (False: a timm model by name keeps its own)

    def build(self, n_out: int, act: type[nn.Module], **kw) -> nn.Module:
        if self.library == "fastai":
            return self.builder(n_out=n_out, act_cls=act, **self.kwargs, **kw)
        acts = {"act_layer": act} if self.takes_act else {}
        return self.builder(num_classes=n_out, **acts, **self.kwargs, **kw)


def _fastai(fn: Callable[..., nn.Module], **kwargs) -> Arch:
    return Arch("fastai", fn, kwargs)


def _timm(name: str, **kwargs) -> Arch:
    return Arch("timm", functools.partial(timm.create_model, name, pretrained=False), kwargs)


def _xresnet_mini(block: Callable[..., nn.Module], **block_kw) -> Arch:
    layers = _MINI_XRESNET["layers"]
    return _fastai(functools.partial(fx.XResNet, block, 1, layers),
                   widen=_MINI_XRESNET["widen"], **block_kw)


_MINIS = {"xmininet": _xresnet_mini(ResBlock), "xsemininet": _xresnet_mini(SEBlock, **fx.se_kwargs1),
          "mininest": _timm("resnest14d", **_MINI_RESNEST)}  # resnest14d has one block per stage already
# every name of `names.ARCHS`: fastai's builder of that name, timm's, or a mini model
ARCHS: dict[str, Arch] = {name: _MINIS.get(name) or (_fastai(getattr(fx, name)) if name in names.XRESNETS
                                                      else _timm(name)) for name in names.ARCHS}


def list_archs() -> list[str]:
    """The project's names accepted by `create_model` (any timm model name is accepted too: `arch_of`)."""
    return list(ARCHS)


def arch_of(name: str) -> Arch:
    """How to build `name`: the project's registered arch, or any timm model by name (``timm.create_model(name,
    num_classes=...)``, its own activation and init), whose norms `create_model` converts with `swap_norm` as it
    converts the registered timm archs (placement all or last, the same refusals)."""
    return ARCHS[name] if name in ARCHS else Arch("timm", functools.partial(timm.create_model, name, pretrained=False),
                                                  takes_act=False)


def max_blur_pools(model: nn.Module) -> nn.Module:
    """Replace every `nn.MaxPool2d` by kornia's anti-aliased `MaxBlurPool2D` (max, then a blurred stride).

    As the leaderboard entry did (its `convert_MP_to_blurMP`): build with fastai's MaxPool in the shortcuts,
    then swap every max pool, the stem's included. kornia's current MaxBlurPool2D(3) (a 2x2 max at stride 1,
    then a 3x3 binomial blur at the pool's stride) stands for the kornia 0.4 version the entry ran.
    """
    MaxBlurPool2D = require("kornia.filters", "leaderboard", "pool='maxblur' (the leaderboard recipe)").MaxBlurPool2D

    for name, child in model.named_children():
        if isinstance(child, nn.MaxPool2d):
            stride = child.stride if isinstance(child.stride, int) else child.stride[0]
            setattr(model, name, MaxBlurPool2D(3, stride=stride, max_pool_size=2))
        else:
            max_blur_pools(child)
    return model


def create_model(arch: str, norm: str = "bn", n_out: int = 10, *, placement: str = "all", k: int = 3,
                 act: str = "relu", bnet_init: str = "auto", sa: bool = False, pool: str = "avg",
                 **kw) -> nn.Module:
    """Build `arch` (a name of `list_archs()`, or any timm model name) with `n_out` outputs whose norm layers (as
    `placement` selects) are `norm`.

    `bnet_init` is passed to `swap_norm` (``"auto"``: zero where the library zero-inits gamma, identity
    elsewhere). `sa` (fastai's simple self-attention) and `pool` (the shortcut pooling: ``"avg"``, ``"max"``
    or ``"maxblur"``) are for the xresnet family. Extra `kw` go to the library's builder (fastai ``XResNet``
    or ``timm.create_model``).
    """
    check_model_args(arch, norm, placement, k, act, bnet_init)
    check_block_args(arch, sa, pool)
    spec = arch_of(arch)
    if spec.library == "fastai":
        kw = dict(sa=sa, pool=MaxPool if pool in ("max", "maxblur") else AvgPool, **kw)
    model = spec.build(n_out, ACTIVATIONS[act], **kw)
    if pool == "maxblur":
        max_blur_pools(model)
    return swap_norm(model, norm, placement=placement, k=k, init=bnet_init)
