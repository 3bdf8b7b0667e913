"""timm's ``norm_layer=`` route to a BNET model, with what it leaves behind reported or converted.

``timm.create_model(name, norm_layer=BNET2d)`` reaches only the norms a family's builder builds from its
``norm_layer``: skresnet18's selective-kernel attention, dpn68's blocks and fastvit_t8's stages build their own
BatchNorm, which the route silently keeps. And the user's ``norm_layer`` replaces the family's own, with the
eps and momentum the family bound to it (xception41: eps 1e-3). `create_timm_model` takes the route, then:

- gives every BNET the eps and momentum of the BatchNorm the family builds under the same name (read from the
  family's own model, built on the meta device: no memory, no init);
- deals with the BatchNorm left in place by `leftover`: ``"swap"`` (the default) converts it with `swap_norm`
  (same `k`, ``init="auto"``); ``"raise"`` refuses in one line naming the modules; ``"keep"`` keeps it and
  warns in one line. `count_norms(model)` says what a model holds;
- takes the family's own model through `swap_norm` instead where the route cannot keep the family's design: a
  builder that refuses ``norm_layer`` (MobileNetV4 sets its own; tf_efficientnet passes ``bn_eps`` on) or that
  builds its GroupNorm or LayerNorm from it (shvit, resnetv2 BiT, convnext): BNET replaces BatchNorm only.
"""
from __future__ import annotations

import warnings

import timm
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnet_fastai._checks import check_choice, check_kernel_size, check_type
from bnet_fastai.nn.layers import _BNETNd
from bnet_fastai.nn.graph import is_norm
from bnet_fastai.nn.norms import _norms, get_norm_layer, is_other_norm, swap_norm

LEFTOVERS = ("swap", "raise", "keep")


def _family_norms(name: str, kw: dict) -> dict[str, nn.Module]:
    """The family's own norms of every kind (BatchNorm, GroupNorm, LayerNorm ...) by qualified name, built on the
    meta device (or on the CPU where a builder cannot run on meta)."""
    try:
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False, **kw)
    except Exception:  # noqa: BLE001 - a builder that computes with tensor values cannot run on meta
        model = timm.create_model(name, pretrained=False, **kw)
    return {n: m for n, m in model.named_modules() if is_norm(m) or is_other_norm(m)}


def _routed(name: str, k: int, family: dict[str, nn.Module], kw: dict) -> nn.Module | None:
    """The family built with ``norm_layer=BNET`` and the eps and momentum of its own BatchNorms, or None where
    that route cannot keep the family's design: the builder refuses a ``norm_layer`` (MobileNetV4 sets its own,
    tf_efficientnet passes ``bn_eps`` on), or it built BNET where the family has another norm (shvit's GroupNorm,
    convnext's LayerNorm): BNET replaces BatchNorm only."""
    try:
        model = timm.create_model(name, norm_layer=get_norm_layer("bnet", k=k), **kw)
    except TypeError:  # a keyword the builder does not take alongside norm_layer; the family's own build decides
        return None
    for qualname, layer in _norms(model):
        own = family.get(qualname)
        if isinstance(layer, _BNETNd) and own is not None and not isinstance(own, _BatchNorm):
            return None
        if isinstance(layer, _BNETNd) and own is not None:
            layer.norm.eps, layer.norm.momentum = own.eps, own.momentum
    return model


def create_timm_model(name: str, norm: str = "bnet", k: int = 3, *, leftover: str = "swap", **kw) -> nn.Module:
    """``timm.create_model(name, norm_layer=get_norm_layer(norm, k=k), **kw)``, keeping the family's eps and
    momentum, with the BatchNorm the builder leaves in place converted, refused or kept (`leftover`).

    Where the route cannot keep the family's design (a builder that refuses ``norm_layer``: MobileNetV4,
    tf_efficientnet; or one that builds its GroupNorm or LayerNorm from it: shvit, resnetv2 BiT, convnext), the
    family's own model is converted with ``swap_norm`` instead: BNET in place of each BatchNorm, every other norm
    kept, as `swap_norm` does (a model with no BatchNorm at all is refused in one line)."""
    check_type("create_timm_model", "a timm model name (a str such as 'resnet18')", name, str,
               "to convert a model you have built, use swap_norm(model)")
    check_choice("norm", norm, ("bn", "bnet"))
    check_kernel_size(k)
    check_choice("leftover", leftover, LEFTOVERS)
    if norm == "bn":
        return timm.create_model(name, **kw)
    model = _routed(name, k, _family_norms(name, kw), kw)
    if model is None:
        return swap_norm(timm.create_model(name, **kw), "bnet", k=k)
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
