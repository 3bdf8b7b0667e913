"""Inference-time fusion: fold each BNET's normalisation away, exactly.

In eval mode BNET computes ``dwconv_W(s * (x - m)) + b`` with ``s = 1/sqrt(running_var + eps)`` and
``m = running_mean``, the depthwise conv zero-padding the *normalised* map. Two exact folds:

- Into the convolution before it, where BNET directly follows one (fastai's ``ConvLayer``, timm's
  ``conv1 -> bn1`` ...): that conv's weight is scaled by ``s`` and its bias becomes ``(bias - m) * s``, and
  BNET is left as its plain depthwise conv (`FusedDepthwise`). The depthwise conv still pads with zeros,
  exactly as it padded the normalised map. This removes the normalisation pass altogether.
- Otherwise into the depthwise conv itself (`FusedBNET`): ``dwconv_{W*s}(x) + b - m * dwconv_{W*s}(1)``.
  The last term is constant in the interior but not on the border, where padded taps contributed 0
  rather than ``-m*W*s``, so it is a per-position bias map, computed once per input size and cached.
"""
from __future__ import annotations

import copy

import torch
from timm.layers import SplitAttn
from timm.models.resnest import ResNestBottleneck
from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from torch import nn

from .layers import _BNETNd
from .norms import _norms

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
# Modules whose forward feeds attribute `conv` straight into attribute `norm` and nowhere else.
_CONV_NORM_PAIRS: dict[type, tuple[tuple[str, str], ...]] = {
    ResNet: (("conv1", "bn1"),),  # conv1 may be the deep stem, a Sequential ending in a conv
    BasicBlock: (("conv1", "bn1"), ("conv2", "bn2")),
    Bottleneck: (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")),
    ResNestBottleneck: (("conv1", "bn1"), ("conv3", "bn3")),
    SplitAttn: (("conv", "bn0"), ("fc1", "bn1")),
}


class FusedBNET(nn.Module):
    """Eval-only BNET: one depthwise conv with the normalisation folded in, plus a border-exact bias map."""

    def __init__(self, bnet: _BNETNd):
        super().__init__()
        norm = bnet.norm
        if not norm.track_running_stats or norm.running_var is None:
            raise ValueError("fuse_bnet needs running statistics (track_running_stats=True)")
        scale = torch.rsqrt(norm.running_var + norm.eps)
        view = (-1,) + (1,) * bnet.ndim
        self.num_features, self.k, self.ndim, self._conv = bnet.num_features, bnet.k, bnet.ndim, bnet._conv
        self.register_buffer("weight", (bnet.weight * scale.view((-1, 1) + (1,) * bnet.ndim)).detach().clone())
        self.register_buffer("bias", bnet.bias.detach().clone())
        self.register_buffer("mean", norm.running_mean.detach().view(view).clone())
        self._bias_maps: dict[tuple, torch.Tensor] = {}
        self.eval()

    def _bias_map(self, x: torch.Tensor) -> torch.Tensor:
        key = (tuple(x.shape[2:]), x.device, x.dtype)
        if key not in self._bias_maps:
            ones = torch.ones((1, self.num_features, *x.shape[2:]), device=x.device, dtype=x.dtype)
            taps_sum = self._conv(ones, self.weight.to(x.dtype), None, padding=self.k // 2, groups=self.num_features)
            self._bias_maps[key] = (self.bias.to(x.dtype).view_as(self.mean) - self.mean.to(x.dtype) * taps_sum)[0]
        return self._bias_maps[key]

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self._bias_maps.clear()  # the maps derive from the buffers being replaced
        super()._load_from_state_dict(*args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            raise RuntimeError("a fused BNET is eval-only: keep the unfused model for training")
        squeeze = x.dim() == 2  # BNET1d on (N, C)
        if squeeze:
            x = x.unsqueeze(-1)
        y = self._conv(x, self.weight, None, padding=self.k // 2, groups=self.num_features) + self._bias_map(x)
        return y.squeeze(-1) if squeeze else y

    def extra_repr(self) -> str:
        return f"{self.num_features}, k={self.k}, ndim={self.ndim}"


class FusedDepthwise(nn.Module):
    """What is left of a BNET once its normalisation is folded into the conv before it: the depthwise conv."""

    def __init__(self, bnet: _BNETNd):
        super().__init__()
        self.num_features, self.k, self._conv = bnet.num_features, bnet.k, bnet._conv
        self.register_buffer("weight", bnet.weight.detach().clone())
        self.register_buffer("bias", bnet.bias.detach().clone())
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            raise RuntimeError("a fused BNET is eval-only: keep the unfused model for training")
        return self._conv(x, self.weight, self.bias, padding=self.k // 2, groups=self.num_features)


def _conv_before(module: nn.Module) -> nn.Module | None:
    """The conv whose output `module` is, if `module` is a conv or a Sequential ending in one."""
    while isinstance(module, nn.Sequential) and len(module):
        module = module[-1]
    return module if isinstance(module, _CONVS) and module.transposed is False else None


def _conv_bnet_pairs(model: nn.Module) -> list[tuple[nn.Module, nn.Module, str]]:
    """(conv, parent, bnet name in parent) for each BNET fed directly, and only, by a conv."""
    pairs = []
    for parent in model.modules():
        names = [n for n, _ in parent.named_children()]
        if isinstance(parent, nn.Sequential):
            candidates = list(zip(names, names[1:]))
        else:
            candidates = next((v for cls, v in _CONV_NORM_PAIRS.items() if isinstance(parent, cls)), ())
        for conv_name, norm_name in candidates:
            conv, bnet = getattr(parent, conv_name, None), getattr(parent, norm_name, None)
            conv = _conv_before(conv) if conv is not None else None
            if isinstance(bnet, _BNETNd) and conv is not None and conv.out_channels == bnet.num_features:
                pairs.append((conv, parent, norm_name))
    return pairs


@torch.no_grad()
def _fold_into_conv(conv: nn.Module, bnet: _BNETNd) -> None:
    norm = bnet.norm  # computed in float64, then rounded once to the conv's dtype
    scale = torch.rsqrt(norm.running_var.double() + norm.eps)
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(scale)
    weight = conv.weight.double() * scale.view(-1, *(1,) * (conv.weight.dim() - 1))
    conv.weight.copy_(weight.to(conv.weight.dtype))
    conv.bias = nn.Parameter(((bias - norm.running_mean.double()) * scale).to(conv.weight.dtype))


def fuse_bnet(model: nn.Module) -> nn.Module:
    """An eval-only copy of `model` with every BNET's normalisation folded away; `model` is untouched."""
    if isinstance(model, _BNETNd):
        return FusedBNET(model)
    fused = copy.deepcopy(model).eval()
    for conv, parent, name in _conv_bnet_pairs(fused):
        bnet = getattr(parent, name)
        if bnet.norm.track_running_stats and bnet.norm.running_var is not None:
            _fold_into_conv(conv, bnet)
            setattr(parent, name, FusedDepthwise(bnet))
    for name, layer in list(_norms(fused)):
        if isinstance(layer, _BNETNd):
            fused.set_submodule(name, FusedBNET(layer))
    return fused
