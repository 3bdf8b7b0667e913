"""BNET2d in Triton: the normalisation fused into the depthwise conv, forward and backward, for CUDA tensors.

In eager PyTorch a BNET layer is BN's normalisation (read x, write x̂) and then a depthwise conv (read x̂, write
y); its backward is the conv's two gradients, then BN's. Here, per pass over a full map (N·C·H·W elements):

    forward (training)   1. statistics: read x                                   -> per-channel mean, var
                         2. y = b + Σ_taps W · x̂, x̂ = (x − mean)·invstd on load: read x, write y
    forward (eval)       2. only, with the running statistics                     read x, write y
    backward             3. dx̂ = Σ_taps W · dy (the transposed conv), x̂ recomputed from x; the per-channel
                            sums Σdx̂, Σdx̂·x̂, Σdy and each tap's Σdy·x̂ (dW):      read dy, x
                         4. dx = invstd·(dx̂ − mean(dx̂) − x̂·mean(dx̂·x̂)):          read dy, x, write dx

so training reads x twice and writes y once forward (BN: read x twice, write y), and backward reads dy and x
twice and writes dx (BN: the same). The layer keeps x (not x̂) and two per-channel vectors for its backward:
one saved map, as BN. Each tap's loads hit the cache lines of its neighbours, not memory again, on a GPU.

Reductions are deterministic: every program writes its block's partial (count, mean, M2) or sums to its own
slot, and torch combines the slots in a fixed order (Chan's formula for the variance). Loads are converted to
float32 and every sum accumulates in float32; outputs take the dtype the layer's conv would give (autocast's,
else the input's). Kernels take strides, so contiguous and channels_last inputs both work.

Under ``TRITON_INTERPRET=1`` (set before triton is first imported: Triton decorates its own library then)
Triton's interpreter runs the same kernels on the CPU with numpy: that is how `tests/test_triton.py` checks them
without a GPU.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_C, BLOCK_P = 16, 64  # channels x flattened (n, h, w) positions per program


@triton.jit
def _position(p, HW, W, sn, sh, sw):
    """The (n, h, w) of flattened positions `p` and their offsets without the channel term."""
    n = p // HW
    hw = p % HW
    h = hw // W
    w = hw % W
    return n, h, w, n.to(tl.int64) * sn + h * sh + w * sw


@triton.jit
def _tile(mean_ptr, invstd_ptr, C, NHW, HW, W, sn, sh, sw, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """This program's channels and positions, their masks, and the channels' mean and invstd as columns."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    n, h, w, off = _position(p, HW, W, sn, sh, sw)
    cmask = c < C
    valid = cmask[:, None] & (p[None, :] < NHW)
    mean = tl.load(mean_ptr + c, mask=cmask, other=0.0)[:, None]
    invstd = tl.load(invstd_ptr + c, mask=cmask, other=0.0)[:, None]
    return c, n, h, w, off, cmask, valid, mean, invstd


@triton.jit
def _stats_kernel(x_ptr, count_ptr, mean_ptr, m2_ptr, C, NHW, HW, W, sn, sc, sh, sw,
                  BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    pid_c, pid_p = tl.program_id(0), tl.program_id(1)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    n, h, w, off = _position(p, HW, W, sn, sh, sw)
    mask = (c[:, None] < C) & (p[None, :] < NHW)
    x = tl.load(x_ptr + c[:, None] * sc + off[None, :], mask=mask, other=0.0).to(tl.float32)
    count = tl.sum(mask.to(tl.float32), axis=1)
    mean = tl.sum(x, axis=1) / tl.maximum(count, 1.0)
    centred = tl.where(mask, x - mean[:, None], 0.0)
    slot = pid_p * C + c
    tl.store(count_ptr + slot, count, mask=c < C)
    tl.store(mean_ptr + slot, mean, mask=c < C)
    tl.store(m2_ptr + slot, tl.sum(centred * centred, axis=1), mask=c < C)


@triton.jit
def _forward_kernel(x_ptr, y_ptr, mean_ptr, invstd_ptr, w_ptr, b_ptr, C, NHW, HW, H, W, sn, sc, sh, sw,
                    yn, yc, yh, yw, K: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    c, n, h, w, _, cmask, valid, mean, invstd = _tile(mean_ptr, invstd_ptr, C, NHW, HW, W, sn, sh, sw, BLOCK_C,
                                                      BLOCK_P)
    acc = tl.zeros((BLOCK_C, BLOCK_P), dtype=tl.float32)
    for u in tl.static_range(K):
        for v in tl.static_range(K):
            hh = h + (u - K // 2)
            ww = w + (v - K // 2)
            inside = valid & ((hh >= 0) & (hh < H) & (ww >= 0) & (ww < W))[None, :]
            off = n.to(tl.int64) * sn + hh * sh + ww * sw
            x = tl.load(x_ptr + c[:, None] * sc + off[None, :], mask=inside, other=0.0).to(tl.float32)
            xhat = tl.where(inside, (x - mean) * invstd, 0.0)  # the conv zero-pads the normalised map
            tap = tl.load(w_ptr + c * (K * K) + (u * K + v), mask=cmask, other=0.0).to(tl.float32)
            acc += xhat * tap[:, None]
    acc += tl.load(b_ptr + c, mask=cmask, other=0.0).to(tl.float32)[:, None]
    out = c[:, None] * yc + (n.to(tl.int64) * yn + h * yh + w * yw)[None, :]
    tl.store(y_ptr + out, acc.to(y_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _dxhat(dy_ptr, w_ptr, c, cmask, n, h, w, valid, H, W, dn, dc, dh, dw_, K: tl.constexpr,
           BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """dx̂ at positions (n, h, w) = Σ_taps W[c, u, v] · dy[n, c, h − u + K//2, w − v + K//2] (in bounds)."""
    acc = tl.zeros((BLOCK_C, BLOCK_P), dtype=tl.float32)
    for u in tl.static_range(K):
        for v in tl.static_range(K):
            hh = h - (u - K // 2)
            ww = w - (v - K // 2)
            inside = valid & ((hh >= 0) & (hh < H) & (ww >= 0) & (ww < W))[None, :]
            off = n.to(tl.int64) * dn + hh * dh + ww * dw_
            dy = tl.load(dy_ptr + c[:, None] * dc + off[None, :], mask=inside, other=0.0).to(tl.float32)
            tap = tl.load(w_ptr + c * (K * K) + (u * K + v), mask=cmask, other=0.0).to(tl.float32)
            acc += dy * tap[:, None]
    return acc


@triton.jit
def _backward_sums_kernel(dy_ptr, x_ptr, mean_ptr, invstd_ptr, w_ptr, sums_ptr, dwp_ptr, C, NHW, HW, H, W,
                          sn, sc, sh, sw, dn, dc, dh, dw_, K: tl.constexpr, BLOCK_C: tl.constexpr,
                          BLOCK_P: tl.constexpr):
    """Per block: Σdx̂, Σdx̂·x̂, Σdy (the bias gradient) and, per tap, Σ dy[o] · x̂[o + tap] (the kernel's)."""
    c, n, h, w, off, cmask, valid, mean, invstd = _tile(mean_ptr, invstd_ptr, C, NHW, HW, W, sn, sh, sw, BLOCK_C,
                                                        BLOCK_P)
    x = tl.load(x_ptr + c[:, None] * sc + off[None, :], mask=valid, other=0.0).to(tl.float32)
    xhat = tl.where(valid, (x - mean) * invstd, 0.0)
    pid_p = tl.program_id(1)
    slot = pid_p * C + c
    dxhat = tl.zeros((BLOCK_C, BLOCK_P), dtype=tl.float32)
    dy_here = tl.zeros((BLOCK_C, BLOCK_P), dtype=tl.float32)
    for u in tl.static_range(K):  # x̂ here meets dy at (h − u + K//2, w − v + K//2) through tap (u, v)
        for v in tl.static_range(K):
            hh = h - (u - K // 2)
            ww = w - (v - K // 2)
            inside = valid & ((hh >= 0) & (hh < H) & (ww >= 0) & (ww < W))[None, :]
            doff = n.to(tl.int64) * dn + hh * dh + ww * dw_
            dy = tl.load(dy_ptr + c[:, None] * dc + doff[None, :], mask=inside, other=0.0).to(tl.float32)
            tl.store(dwp_ptr + (pid_p * (K * K) + (u * K + v)) * C + c, tl.sum(dy * xhat, axis=1), mask=cmask)
            tap = tl.load(w_ptr + c * (K * K) + (u * K + v), mask=cmask, other=0.0).to(tl.float32)
            dxhat += dy * tap[:, None]  # each dy load serves the kernel's gradient and dx̂ alike
            if u == K // 2 and v == K // 2:
                dy_here = dy  # the centre tap: dy at this very position, for the bias gradient
    tl.store(sums_ptr + slot, tl.sum(tl.where(valid, dxhat, 0.0), axis=1), mask=cmask)
    tl.store(sums_ptr + (tl.num_programs(1) * C) + slot, tl.sum(tl.where(valid, dxhat * xhat, 0.0), axis=1),
             mask=cmask)
    tl.store(sums_ptr + 2 * (tl.num_programs(1) * C) + slot, tl.sum(dy_here, axis=1), mask=cmask)


@triton.jit
def _backward_dx_kernel(dy_ptr, x_ptr, dx_ptr, mean_ptr, invstd_ptr, w_ptr, mdx_ptr, mdxx_ptr, C, NHW, HW, H, W,
                        sn, sc, sh, sw, dn, dc, dh, dw_, on, oc, oh, ow, K: tl.constexpr,
                        BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    c, n, h, w, off, cmask, valid, mean, invstd = _tile(mean_ptr, invstd_ptr, C, NHW, HW, W, sn, sh, sw, BLOCK_C,
                                                        BLOCK_P)
    x = tl.load(x_ptr + c[:, None] * sc + off[None, :], mask=valid, other=0.0).to(tl.float32)
    xhat = (x - mean) * invstd
    dxhat = _dxhat(dy_ptr, w_ptr, c, cmask, n, h, w, valid, H, W, dn, dc, dh, dw_, K, BLOCK_C, BLOCK_P)
    mdx = tl.load(mdx_ptr + c, mask=cmask, other=0.0)[:, None]
    mdxx = tl.load(mdxx_ptr + c, mask=cmask, other=0.0)[:, None]
    dx = invstd * (dxhat - mdx - xhat * mdxx)
    out = c[:, None] * oc + (n.to(tl.int64) * on + h * oh + w * ow)[None, :]
    tl.store(dx_ptr + out, dx.to(dx_ptr.dtype.element_ty), mask=valid)


def _grid(C: int, NHW: int) -> tuple[int, int]:
    return triton.cdiv(C, BLOCK_C), triton.cdiv(NHW, BLOCK_P)


def _shape(x: torch.Tensor) -> dict:
    N, C, H, W = x.shape
    return dict(C=C, NHW=N * H * W, HW=H * W, W=W)


def batch_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance of (N, C, H, W) `x`, in float32, deterministically."""
    s = _shape(x)
    grid = _grid(s["C"], s["NHW"])
    parts = torch.empty(3, grid[1], s["C"], device=x.device, dtype=torch.float32)
    _stats_kernel[grid](x, parts[0], parts[1], parts[2], s["C"], s["NHW"], s["HW"], s["W"], *x.stride(),
                        BLOCK_C=BLOCK_C, BLOCK_P=BLOCK_P)
    count, means, m2 = parts  # Chan et al.: combine the blocks' (count, mean, M2) in block order
    total = count.sum(0)
    mean = (count * means).sum(0) / total
    var = (m2.sum(0) + (count * (means - mean) ** 2).sum(0)) / total
    return mean, var


def forward(x: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
            dtype: torch.dtype) -> torch.Tensor:
    """y = depthwise_conv(x̂, weight) + bias with x̂ = (x − mean)·invstd normalised on load; y in `dtype`, in x's
    memory format."""
    s = _shape(x)
    y = torch.empty_like(x, dtype=dtype)
    K = weight.shape[-1]
    _forward_kernel[_grid(s["C"], s["NHW"])](x, y, mean, invstd, weight.contiguous(), bias.contiguous(), s["C"],
                                             s["NHW"], s["HW"], x.shape[2], s["W"], *x.stride(), *y.stride(),
                                             K=K, BLOCK_C=BLOCK_C, BLOCK_P=BLOCK_P)
    return y


def backward(dy: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor, weight: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dweight, dbias) of a training-mode BNET2d (batch statistics), from dy, the saved x and statistics."""
    s = _shape(x)
    C, NHW, K = s["C"], s["NHW"], weight.shape[-1]
    grid = _grid(C, NHW)
    w = weight.contiguous()
    sums = torch.empty(3, grid[1], C, device=x.device, dtype=torch.float32)
    dwp = torch.empty(grid[1], K * K, C, device=x.device, dtype=torch.float32)
    _backward_sums_kernel[grid](dy, x, mean, invstd, w, sums, dwp, C, NHW, s["HW"], x.shape[2], s["W"],
                                *x.stride(), *dy.stride(), K=K, BLOCK_C=BLOCK_C, BLOCK_P=BLOCK_P)
    sdx, sdxx, db = sums.sum(1)  # block order: deterministic
    dweight = dwp.sum(0).t().reshape(weight.shape)
    dx = torch.empty_like(x)
    _backward_dx_kernel[grid](dy, x, dx, mean, invstd, w, sdx / NHW, sdxx / NHW, C, NHW, s["HW"], x.shape[2],
                              s["W"], *x.stride(), *dy.stride(), *dx.stride(), K=K, BLOCK_C=BLOCK_C,
                              BLOCK_P=BLOCK_P)
    return dx, dweight.to(weight.dtype), db.to(weight.dtype)


class TritonBNET(torch.autograd.Function):
    """BNET2d's training step through the kernels above: saves x and the per-channel statistics only."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, factor: float, eps: float, dtype, layer: str):
        n = x.numel() // x.shape[1]
        if n <= 1:  # as torch.batch_norm refuses it
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {list(x.shape)}")
        mean, var = batch_stats(x)
        invstd = torch.rsqrt(var + eps)
        if running_mean is not None:  # as _BatchNorm updates them: the unbiased variance
            with torch.no_grad():
                running_mean.mul_(1 - factor).add_(mean.to(running_mean.dtype), alpha=factor)
                running_var.mul_(1 - factor).add_((var * n / (n - 1)).to(running_var.dtype), alpha=factor)
        ctx.save_for_backward(x, mean, invstd, weight)
        ctx.layer = layer
        return forward(x, mean, invstd, weight, bias, dtype)

    @staticmethod
    def backward(ctx, dy):
        if torch.is_grad_enabled():
            raise RuntimeError(f"{ctx.layer}: BNET's Triton backward is not differentiable twice (create_graph=True): "
                               f"use impl='torch' (`bnet_fastai.nn.layers.set_impl(model, 'torch')`)")
        x, mean, invstd, weight = ctx.saved_tensors
        dx, dweight, dbias = backward(dy, x, mean, invstd, weight)
        return dx, dweight, dbias, None, None, None, None, None, None
