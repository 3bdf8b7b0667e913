"""timm's ``norm_layer=`` route to a BNET model, with what it leaves behind reported or converted.

``timm.create_model(name, norm_layer=BNET2d)`` reaches only the norms a family's builder builds from its
``norm_layer``: skresnet18's selective-kernel attention, dpn68's blocks and fastvit_t8's stages build their own
BatchNorm, which the route silently keeps. And the user's ``norm_layer`` replaces the family's own, with the
eps and momentum the family bound to it (xception41: eps 1e-3). `create_timm_model` takes the route, then:

- gives every BNET the eps and momentum of the BatchNorm the family builds under the same name (read from the
  family's own model, built on the meta device: no memory, no init);
- deals with the BatchNorm left in place by `leftover`: ``"swap"`` (the default) converts it with `swap_norm`
  (same `k`, ``init="auto"``); ``"raise"`` refuses in one line naming the modules; ``"keep"`` keeps it and
  warns in one line. `count_norms(model)` says what a model holds.
"""
from __future__ import annotations

import warnings

import timm
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnet_fastai._checks import check_choice, check_kernel_size
from bnet_fastai.nn.layers import _BNETNd
from bnet_fastai.nn.norms import _norms, get_norm_layer, swap_norm

LEFTOVERS = ("swap", "raise", "keep")


def _family_norms(name: str, kw: dict) -> dict[str, _BatchNorm]:
    """The family's own BatchNorms by qualified name, built on the meta device (or on the CPU where a builder
    cannot run on meta)."""
    try:
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False, **kw)
    except Exception:  # noqa: BLE001 - a builder that computes with tensor values cannot run on meta
        model = timm.create_model(name, pretrained=False, **kw)
    return {n: m for n, m in _norms(model) if isinstance(m, _BatchNorm)}


def create_timm_model(name: str, norm: str = "bnet", k: int = 3, *, leftover: str = "swap", **kw) -> nn.Module:
    """``timm.create_model(name, norm_layer=get_norm_layer(norm, k=k), **kw)``, keeping the family's eps and
    momentum, with the BatchNorm the builder leaves in place converted, refused or kept (`leftover`)."""
    check_choice("norm", norm, ("bn", "bnet"))
    check_kernel_size(k)
    check_choice("leftover", leftover, LEFTOVERS)
    if norm == "bn":
        return timm.create_model(name, **kw)
    family = _family_norms(name, kw)
    model = timm.create_model(name, norm_layer=get_norm_layer("bnet", k=k), **kw)
    for qualname, layer in _norms(model):
        own = family.get(qualname)
        if isinstance(layer, _BNETNd) and own is not None:
            layer.norm.eps, layer.norm.momentum = own.eps, own.momentum
    left = [n for n, m in _norms(model) if isinstance(m, _BatchNorm)]
    if not left:
        return model
    what = (f"timm's {name} builder kept {len(left)} BatchNorm layer(s) with norm_layer=BNET "
            f"({', '.join(left[:3])}{', ...' if len(left) > 3 else ''})")
    if leftover == "raise":
        raise ValueError(f"{what}; leftover='swap' converts them with swap_norm, leftover='keep' keeps them")
    if leftover == "keep":
        warnings.warn(f"{what}: kept as BatchNorm (leftover='keep'); leftover='swap' converts them", stacklevel=2)
        return model
    return swap_norm(model, "bnet", k=k)
