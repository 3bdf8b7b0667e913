"""Inference-time fusion: fold each BNET's normalisation into its depthwise conv.

In eval mode BNET computes ``conv_W(s * (x - m)) + b`` with ``s = 1/sqrt(running_var + eps)`` and
``m = running_mean``, the conv zero-padding the *normalised* map. Folding gives
``conv_{W*s}(x) + b - m * conv_{W*s}(1)``: the last term is constant in the interior but not on the
border, where padded taps contributed 0 rather than ``-m*W*s``. So the fused layer adds a per-position
bias map (computed once per input size and cached), which keeps it exact at the border.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from .layers import _BNETNd
from .norms import _norms


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


def fuse_bnet(model: nn.Module) -> nn.Module:
    """An eval-only copy of `model` with every BNET replaced by a `FusedBNET`; `model` is untouched."""
    if isinstance(model, _BNETNd):
        return FusedBNET(model)
    fused = copy.deepcopy(model).eval()
    for name, layer in list(_norms(fused)):
        if isinstance(layer, _BNETNd):
            fused.set_submodule(name, FusedBNET(layer))
    return fused
