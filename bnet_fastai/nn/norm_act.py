"""BNET with timm's norm+activation contract: `BNETAct2d`, and its place in timm's norm-layer factories.

Many timm families (EfficientNet, MobileNetV3, RegNet, DenseNet, CSPNet, VoVNet, ...) build
``BatchNormAct2d``: a BatchNorm2d whose forward also applies a ``drop`` and an ``act`` module. `BNETAct2d`
is its BNET twin: BNET, then the same ``drop`` and ``act``, in that order, with the same constructor
arguments (``apply_act``, ``act_layer``, ``act_kwargs``, ``inplace``, ``drop_layer``).

timm resolves a model's ``norm_layer`` to a norm+act class in ``timm.layers.get_norm_act_layer``: a
class is looked up by its lower-cased name in a norm -> norm+act map, a string in a name -> norm+act map.
Importing this module (which ``import bnet_fastai`` does as soon as timm's layers are imported:
`bnet_fastai.nn.registration`) adds BNET to both maps (and ``bnet`` / ``bnet2d`` to timm's plain ``get_norm_layer``
names), so that, for every timm family::

    timm.create_model(name, norm_layer=BNET2d)                  # or bnet_fastai.get_norm_layer("bnet")
    timm.create_model(name, norm_layer=get_norm_layer("bnet", k=5))   # kwargs bound on a partial carry over
    timm.create_model(name, norm_layer="bnet")

builds BNET where the family uses plain norms and `BNETAct2d` where it uses norm+act layers, every
activation kept. The registration only adds names timm does not use; nothing of timm's changes.
"""
from __future__ import annotations

from typing import Any

import torch
from timm.layers import create_act_layer
from timm.layers import create_norm as _timm_norm
from timm.layers import create_norm_act as _timm_norm_act
from timm.layers import register_notrace_module
from torch import nn

from bnet_fastai.nn.layers import BNET1d, BNET2d, BNET3d


class BNETAct2d(BNET2d):
    """BNET2d followed by `drop` and `act`: timm's ``BatchNormAct2d`` with BNET in place of its BatchNorm."""

    def __init__(self, num_features: int, k: int = 3, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, apply_act: bool = True,
                 act_layer: Any = nn.ReLU, act_kwargs: dict | None = None, inplace: bool = True,
                 drop_layer: type[nn.Module] | None = None, init: str = "identity", device=None, dtype=None,
                 impl: str = "auto"):
        super().__init__(num_features, k=k, eps=eps, momentum=momentum, init=init, affine=affine,
                         track_running_stats=track_running_stats, device=device, dtype=dtype, impl=impl)
        self.drop = drop_layer() if drop_layer is not None else nn.Identity()
        # As timm's BatchNormAct2d builds its act (`timm.layers.norm_act._create_act`).
        act = create_act_layer(act_layer, **{"inplace": inplace, **(act_kwargs or {})}) if apply_act else None
        self.act = nn.Identity() if act is None else act

    @classmethod
    def from_bn(cls, bn: nn.Module, k: int = 3, init: str = "auto") -> "BNETAct2d":
        """A BNETAct2d replacing a ``BatchNormAct2d`` or ``SyncBatchNormAct``: the same drop and act modules."""
        new = super().from_bn(bn, k=k, init=init)
        # SyncBatchNormAct carries drop/act only when timm's convert_sync_batchnorm set them.
        new.drop = getattr(bn, "drop", nn.Identity())
        new.act = getattr(bn, "act", nn.Identity())
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(x)))


def _register_with_timm() -> None:
    """Make timm's norm and norm+act factories resolve BNET (see the module docstring)."""
    _timm_norm_act._NORM_TO_NORM_ACT_MAP["bnet2d"] = BNETAct2d  # norm_layer=BNET2d (a class, or a partial)
    _timm_norm_act._NORM_ACT_MAP.update(bnet=BNETAct2d, bnet2d=BNETAct2d)  # norm_layer="bnet"
    _timm_norm_act._NORM_ACT_TYPES.add(BNETAct2d)  # norm_layer=BNETAct2d
    _timm_norm_act._NORM_ACT_REQUIRES_ARG.add(BNETAct2d)  # timm passes the family's act_layer through
    _timm_norm._NORM_MAP.update(bnet=BNET2d, bnet2d=BNET2d)
    _timm_norm._NORM_TYPES.add(BNET2d)
    # timm's fx feature extraction treats its norm+act layers as leaves; ours are leaves too.
    for cls in (BNET1d, BNET2d, BNET3d, BNETAct2d):
        register_notrace_module(cls)


_register_with_timm()
