"""Inference-time fusion: fold each BNET's normalisation away, exactly.

In eval mode BNET computes ``dwconv_W(s * (x - m)) + b`` with ``s = 1/sqrt(running_var + eps)`` and
``m = running_mean``, the depthwise conv zero-padding the *normalised* map. Two exact folds:

- Into the convolution before it, where BNET's input is that conv's output and nothing else uses it (read
  from the model's torch.fx graph, `graph.conv_norm_pairs`: fastai's ``ConvLayer``, timm's ``conv1 -> bn1``,
  ``ConvNormAct`` ...): that conv's weight is scaled by ``s`` and its bias becomes ``(bias - m) * s``, and
  BNET is left as its plain depthwise conv (`FusedDepthwise`). The depthwise conv still pads with zeros,
  exactly as it padded the normalised map. This removes the normalisation pass altogether.
- Otherwise into the depthwise conv itself (`FusedBNET`): ``dwconv_{W*s}(x) + b - m * dwconv_{W*s}(1)``.
  The last term is constant in the interior but not on the border, where padded taps contributed 0
  rather than ``-m*W*s``, so it is a per-position bias map, computed once per input size and cached
  (computed afresh inside torch.export / torch.compile / tracing, where the size may be symbolic).
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils import parametrize, remove_spectral_norm, remove_weight_norm
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from bnet_fastai._checks import check_type
from bnet_fastai.nn import graph
from bnet_fastai.nn.layers import _BNETNd
from bnet_fastai.nn.norms import _join, _norms


def _cacheable(x: torch.Tensor) -> bool:
    """Whether a map computed from `x` may be kept for later calls: eager, with concrete sizes.

    Under torch.export, torch.compile or tracing (ONNX), sizes may be symbolic and tensors fake; the map is
    then part of the traced computation, built from the input's size, so the export holds at any size.
    """
    kind = type(x).__module__  # "torch" for a tensor; fastai's TensorImage is welcome, torch's fake ones are not
    return ((kind == "torch" or not kind.startswith("torch")) and not torch.compiler.is_compiling()
            and not torch.jit.is_tracing() and all(type(n) is int for n in x.shape))


class _Fused(nn.Module):
    """What fused BNET layers share: eval-only, and the drop and act of a `BNETAct2d` kept after the conv."""

    def __init__(self, bnet: _BNETNd):
        super().__init__()
        self.num_features, self.k, self.ndim, self._conv = bnet.num_features, bnet.k, bnet.ndim, bnet._conv
        for name in ("drop", "act"):  # BNETAct2d: the same modules, applied in the same order
            if hasattr(bnet, name):
                self.add_module(name, getattr(bnet, name))
        self.eval()

    def _check_eval(self) -> None:
        if self.training:
            raise RuntimeError("a fused BNET is eval-only: keep the unfused model for training")

    def _finish(self, y: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(y)) if hasattr(self, "act") else y

    def extra_repr(self) -> str:
        return f"{self.num_features}, k={self.k}, ndim={self.ndim}"


class FusedBNET(_Fused):
    """Eval-only BNET: one depthwise conv with the normalisation folded in, plus a border-exact bias map."""

    def __init__(self, bnet: _BNETNd):
        norm = bnet.norm
        if not norm.track_running_stats or norm.running_var is None:
            raise ValueError("fuse_bnet needs running statistics (track_running_stats=True)")
        super().__init__(bnet)
        scale = torch.rsqrt(norm.running_var + norm.eps)
        self.register_buffer("weight", (bnet.weight * scale.view((-1, 1) + (1,) * bnet.ndim)).detach().clone())
        self.register_buffer("bias", bnet.bias.detach().clone())
        self.register_buffer("mean", norm.running_mean.detach().view((-1,) + (1,) * bnet.ndim).clone())
        self._bias_maps: dict[tuple, torch.Tensor] = {}

    def _compute_bias_map(self, x: torch.Tensor) -> torch.Tensor:
        # In the buffers' precision whatever autocast says; the caller rounds it to the output's dtype.
        with torch.autocast(x.device.type, enabled=False):
            ones = torch.ones((1, self.num_features, *x.shape[2:]), device=x.device, dtype=self.weight.dtype)
            taps_sum = self._conv(ones, self.weight, None, padding=self.k // 2, groups=self.num_features)
            return (self.bias.view_as(self.mean) - self.mean * taps_sum)[0]

    def _bias_map(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if not _cacheable(x):
            return self._compute_bias_map(x).to(dtype)
        key = (tuple(x.shape[2:]), x.device, dtype)
        if key not in self._bias_maps:
            self._bias_maps[key] = self._compute_bias_map(x).to(dtype)
        return self._bias_maps[key]

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self._bias_maps.clear()  # the maps derive from the buffers being replaced
        super()._load_from_state_dict(*args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_eval()
        squeeze = x.dim() == 2  # BNET1d on (N, C)
        if squeeze:
            x = x.unsqueeze(-1)
        y = self._conv(x, self.weight.to(x.dtype), None, padding=self.k // 2, groups=self.num_features)
        y = y + self._bias_map(x, y.dtype)
        return self._finish(y.squeeze(-1) if squeeze else y)


class FusedDepthwise(_Fused):
    """What is left of a BNET once its normalisation is folded into the conv before it: the depthwise conv."""

    def __init__(self, bnet: _BNETNd):
        super().__init__(bnet)
        self.register_buffer("weight", bnet.weight.detach().clone())
        self.register_buffer("bias", bnet.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_eval()
        return self._finish(self._conv(x, self.weight.to(x.dtype), self.bias.to(x.dtype), padding=self.k // 2,
                                       groups=self.num_features))


def _conv_norm_pairs(model: nn.Module, kind: type | tuple[type, ...] = _BNETNd) -> list[tuple[str, str]]:
    """(conv name, norm name) for each norm of `kind` whose input is a conv's output and that conv's only use."""
    pairs = []
    for prefix, root, g in graph.trace(model).units:
        for conv, norm in graph.conv_norm_pairs(root, g):
            norm_module, conv_module = root.get_submodule(norm), root.get_submodule(conv)
            if isinstance(norm_module, kind) and conv_module.out_channels == norm_module.num_features:
                pairs.append((_join(prefix, conv), _join(prefix, norm)))
    return pairs


def fuse_bn(model: nn.Module) -> nn.Module:
    """An eval-only copy of `model` with each BatchNorm that follows a convolution folded into it
    (`torch.nn.utils.fusion.fuse_conv_bn_eval`; the same conv->norm graph as `fuse_bnet`): BN's deployed
    form, the fair baseline for a fused BNET model (benchmarks/eval_and_memory.py). BNETs are left alone."""
    fused = copy.deepcopy(model).eval()
    batchnorms = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
    for conv_name, bn_name in _conv_norm_pairs(fused, batchnorms):
        bn = fused.get_submodule(bn_name)
        if type(bn) in batchnorms and bn.track_running_stats and bn.running_var is not None:
            fused.set_submodule(conv_name, fuse_conv_bn_eval(fused.get_submodule(conv_name), bn))
            fused.set_submodule(bn_name, nn.Identity())
    return fused


_WEIGHT_HOOKS = {WeightNorm: remove_weight_norm, SpectralNorm: remove_spectral_norm}  # torch's hook-based forms


def _plain(conv: nn.Module) -> bool:
    """Make the fused copy's `conv` compute with plain weight and bias tensors, where that keeps its function:
    a parametrization (``torch.nn.utils.parametrizations.weight_norm`` ...) is removed keeping its current value,
    as are torch's hook-based weight and spectral norms (eval: the weight they computed). False (no fold: the BNET
    stays a `FusedBNET`) where another hook runs around the conv, whose effect a fold could not carry."""
    if parametrize.is_parametrized(conv):
        # deepcopy keeps the injected class that the original shares, and removing a parametrization deletes its
        # property from that class: the copy gets a class of its own first, so the original stays whole
        cls = type(conv)
        conv.__class__ = type(cls.__name__, cls.__bases__,
                              {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")})
        for name in list(conv.parametrizations):
            parametrize.remove_parametrizations(conv, name, leave_parametrized=True)
    for hook in list(conv._forward_pre_hooks.values()):
        if type(hook) in _WEIGHT_HOOKS:
            _WEIGHT_HOOKS[type(hook)](conv, hook.name)
    return not (conv._forward_pre_hooks or conv._forward_hooks)


@torch.no_grad()
def _fold_into_conv(conv: nn.Module, bnet: _BNETNd) -> None:
    """Scale `conv`'s output channels by BNET's inverse std and shift them by its mean, in new tensors: the conv's
    weight may be a Parameter other convs share (TridentNet-style branches), which must keep their own values."""
    norm = bnet.norm  # computed in float64, then rounded once to the conv's dtype
    scale = torch.rsqrt(norm.running_var.double() + norm.eps)
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(scale)
    weight = conv.weight.double() * scale.view(-1, *(1,) * (conv.weight.dim() - 1))
    conv.weight = nn.Parameter(weight.to(conv.weight.dtype))
    conv.bias = nn.Parameter(((bias - norm.running_mean.double()) * scale).to(conv.weight.dtype))


def fuse_bnet(model: nn.Module) -> nn.Module:
    """An eval-only copy of `model` with every BNET's normalisation folded away; `model` is untouched.

    A BNET whose input is a convolution's output (found by tracing the model with torch.fx) has its
    normalisation folded into that conv (`FusedDepthwise`); any other becomes a `FusedBNET`. Both keep a
    `BNETAct2d`'s drop and act, return the autocast dtype under autocast, and export with torch.export
    and ONNX at a dynamic input size.
    """
    check_type("fuse_bnet", "a model (a torch nn.Module)", model, nn.Module,
               "pass the trained model, e.g. fuse_bnet(model.eval())")
    if isinstance(model, _BNETNd):
        return FusedBNET(copy.deepcopy(model))  # a BNETAct2d's drop and act are the copy's, not the original's
    try:
        fused = copy.deepcopy(model).eval()
    except RuntimeError as e:
        if "deepcopy protocol" not in str(e):
            raise
        raise ValueError("fuse_bnet copies the model, and torch cannot copy one holding torch.nn.utils.weight_norm "
                         "(the hook-based form): use torch.nn.utils.parametrizations.weight_norm, or call "
                         "torch.nn.utils.remove_weight_norm on those modules first") from None
    for conv_name, bnet_name in _conv_norm_pairs(fused):
        bnet = fused.get_submodule(bnet_name)
        if bnet.norm.track_running_stats and bnet.norm.running_var is not None and _plain(
                fused.get_submodule(conv_name)):
            _fold_into_conv(fused.get_submodule(conv_name), bnet)
            fused.set_submodule(bnet_name, FusedDepthwise(bnet))
    for name, layer in list(_norms(fused)):
        if isinstance(layer, _BNETNd):
            fused.set_submodule(name, FusedBNET(layer))
    return fused


_REPARAM_METHODS = ("fuse", "reparameterize", "switch_to_deploy")  # what timm's reparameterize_model calls


def reparameterize_model(model: nn.Module, inplace: bool = False) -> nn.Module:
    """timm's ``reparameterize_model`` for a model that may hold BNET: refused in one line where a
    re-parameterisable block (RepVGG, MobileOne, FastViT ...) holds a BNET, else timm's result.

    A re-parameterisable block folds each branch's BatchNorm into the branch conv (gamma/std scaling a k×k
    kernel) and sums the branches into one conv. A BNET's normalisation is followed by a k×k depthwise
    kernel: composed with the branch's conv it is a conv of a larger kernel, which the block's single conv
    cannot hold, and timm would read the BNET's kernel as gamma and fail deep inside ("The size of tensor a
    (3) must match ..."). `fuse_bnet(model)` deploys such a model, branches kept.
    """
    from timm.models import reparameterize_model as timm_reparameterize  # timm's own, for everything else

    for name, block in model.named_modules():
        if any(callable(getattr(block, m, None)) for m in _REPARAM_METHODS) and not isinstance(block, _BNETNd):
            inner = next((n for n, m in _norms(block) if isinstance(m, _BNETNd)), None)
            if inner is not None:
                raise ValueError(f"reparameterize_model: {name} ({type(block).__name__}) holds BNET {name}.{inner},"
                                 f" whose k×k kernel cannot fold into the block's single conv; deploy it with "
                                 f"bnet_fastai.fuse_bnet(model), which keeps the branches and folds each BNET's "
                                 f"normalisation away")
    return timm_reparameterize(model, inplace=inplace)
