"""BNET's training step keeping one map for its backward, as BatchNorm does.

Composed of autograd's pieces, BNET (an affine-free BatchNorm, then a depthwise conv) keeps two maps of the size
of its input for the backward: the input, for the normaliser, and the normalised map x̂, for the conv. `OneMapBNET`
keeps only x̂ and the per-channel inverse standard deviation. Its backward takes the conv's gradients from
`aten.convolution_backward` (x̂ is the conv's input) and the input gradient from x̂ alone, BatchNorm's formula

    dx = invstd · (dx̂ − mean(dx̂) − x̂ · mean(dx̂ · x̂))      (means over the batch and every spatial position)

which `aten.native_batch_norm_backward` computes in one call when told that the "input" x̂ has mean 0 and
inverse std 1 and given the real inverse std as its per-channel weight (a separate multiply by invstd was
15–19% slower per layer on channels_last maps). This is the idea of In-Place Activated BatchNorm (Rota Bulò et al.,
CVPR 2018): recover what the backward needs from the layer's output rather than keep its input.

`_BNETNd.forward` uses it while training with batch statistics; it keeps the composed path for a
`SyncBatchNorm` normaliser, in eval mode, without gradients, and under `torch.compile` / `torch.export`. The
backward is not differentiable again: ``create_graph=True`` through it stops in one line naming the layer and
the fix (`bnet_fastai.nn.layers.set_one_map(model, False)` trains through the composed path, which supports it).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class OneMapBNET(torch.autograd.Function):
    """y = depthwise_conv(batch_norm(x, no affine, batch statistics), weight) + bias, saving x̂ and invstd."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, running_mean, running_var,
                factor: float, eps: float, layer: str) -> torch.Tensor:
        # the normaliser's forward as torch.batch_norm runs it on this device (running statistics updated in place)
        xhat, _, invstd = torch.ops.aten.native_batch_norm(x, None, None, running_mean, running_var, True,
                                                           factor, eps)
        channels, ndim = x.shape[1], x.dim() - 2
        ctx.one_by_one = all(n == 1 for n in x.shape[2:])
        if ctx.one_by_one:  # a 1x1 map only meets the centre tap: a per-channel scale, as the composed path takes it
            shape = (-1,) + (1,) * ndim
            lowered = torch.is_autocast_enabled(x.device.type) and x.dtype == torch.float32  # as the conv would be
            dtype = torch.get_autocast_dtype(x.device.type) if lowered else x.dtype
            y = torch.addcmul(bias.view(shape).to(dtype), xhat.to(dtype), _centre(weight).view(shape).to(dtype))
        else:
            y = _CONV[ndim](xhat, weight, bias, padding=weight.shape[-1] // 2, groups=channels)  # autocast applies
        ctx.save_for_backward(xhat, invstd, weight)
        ctx.conv_dtype, ctx.layer = y.dtype, layer
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        if torch.is_grad_enabled():  # backward(create_graph=True): x̂ was saved without its graph
            raise RuntimeError(f"{ctx.layer}: BNET's one-map backward is not differentiable twice "
                               f"(create_graph=True): train it through the composed path, "
                               f"`bnet_fastai.nn.layers.set_one_map(model, False)`")
        xhat, invstd, weight = ctx.saved_tensors
        channels, ndim = xhat.shape[1], xhat.dim() - 2
        dtype = ctx.conv_dtype  # the dtype the conv ran in (autocast's), so its backward runs in it too
        k = weight.shape[-1]
        if ctx.one_by_one:
            dxhat, dweight, dbias = _one_by_one_backward(dy.to(dtype), xhat.to(dtype), weight, ctx.needs_input_grad)
        else:
            dxhat, dweight, dbias = torch.ops.aten.convolution_backward(
                dy.to(dtype), xhat.to(dtype), weight.to(dtype), [channels], [1] * ndim, [k // 2] * ndim,
                [1] * ndim, False, [0] * ndim, channels, [True, ctx.needs_input_grad[1], ctx.needs_input_grad[2]])
        dx = None
        if ctx.needs_input_grad[0]:
            # BN's backward of an "input" x̂ with mean 0 and inverse std 1, scaled per channel by its `weight`:
            # passing invstd as that weight gives dx in one pass (no separate multiply)
            stats = torch.float32 if xhat.dtype in (torch.float16, torch.bfloat16) else xhat.dtype
            zeros = torch.zeros(channels, dtype=stats, device=xhat.device)
            ones = torch.ones(channels, dtype=stats, device=xhat.device)
            dx, _, _ = torch.ops.aten.native_batch_norm_backward(
                dxhat.to(xhat.dtype), xhat, invstd.to(stats), None, None, zeros, ones, True, 0.0,
                [True, False, False])
        return (dx, None if dweight is None else dweight.to(weight.dtype),
                None if dbias is None else dbias.to(weight.dtype), None, None, None, None, None)


def _centre(weight: torch.Tensor) -> torch.Tensor:
    """The centre tap of each channel's kernel, (C,)."""
    return weight[(slice(None), 0) + (weight.shape[-1] // 2,) * (weight.dim() - 2)]


def _one_by_one_backward(dy: torch.Tensor, xhat: torch.Tensor, weight: torch.Tensor, needs: tuple):
    """The conv's gradients on a 1x1 map: dx̂ = centre·dy, the centre tap's Σ dy·x̂ (other taps 0), Σdy."""
    shape = (-1,) + (1,) * (weight.dim() - 2)
    reduce = [0] + list(range(2, dy.dim()))
    dxhat = dy * _centre(weight).view(shape).to(dy.dtype)
    dweight = dbias = None
    if needs[1]:
        dweight = torch.zeros_like(weight, dtype=dy.dtype)
        dweight[(slice(None), 0) + (weight.shape[-1] // 2,) * (weight.dim() - 2)] = (dy * xhat).sum(reduce)
    if needs[2]:
        dbias = dy.sum(reduce)
    return dxhat, dweight, dbias
