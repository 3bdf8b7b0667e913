"""BNET: BatchNorm whose per-channel affine transform is replaced by a depthwise k×k conv with bias.

Xu et al., "Batch Normalization with Enhanced Linear Transformation", arXiv 2011.14150.
BN computes ``gamma * x_hat + beta`` per channel; BNET computes ``dwconv_k(x_hat) + bias`` so that each
output also sees its spatial neighbourhood. With ``k=1`` BNET is exactly BN.

Design: BNET *contains* an affine-free BatchNorm (`BNETNorm2d`, ...) instead of subclassing one.
- The normaliser is a ``_BatchNorm`` but deliberately not an ``nn.BatchNorm2d``: library init loops
  (torchvision's ResNet, MobileNet, RegNet; timm's EfficientNet, DenseNet, ...) do
  ``if isinstance(m, nn.BatchNorm2d): nn.init.ones_(m.weight)``, which fails on an affine-free BN, so
  ``norm_layer=BNET2d`` would not build. Its state_dict is a BatchNorm's (``norm.running_mean`` ...).
- ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` replaces every ``_BatchNorm`` instance by a plain
  ``SyncBatchNorm`` and never calls extra child modules; a subclass (the authors' formulation) would
  silently lose its conv under DDP. Here only the inner normaliser becomes ``SyncBatchNorm`` and the
  kernel stays in ``forward``.
- The kernel and bias are BNET's own parameters (``weight``, ``bias``), used with ``F.conv*d``: library
  init loops that re-initialise every ``nn.Conv2d`` (fastai ``init_cnn``, timm ``ResNet.init_weights``)
  do not touch them, and timm's ``zero_init_last`` (which zeros ``norm.weight``) zeros the kernel,
  which is ``init="zero"``.
- fastai's ``norm_bias_params`` finds ``bias`` (it collects every ``.bias``) but not the kernel, because
  BNET is not one of fastai's ``norm_types``; `bnet_fastai.nn.weight_decay.BNETWeightDecay` gives the
  kernel the same treatment as BN's gamma (see that module for the rule).
"""
from __future__ import annotations

import math
import os

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnet_fastai import names
from bnet_fastai._checks import check_choice, check_kernel_size, check_type
from bnet_fastai.nn.compute import cpp_bnet
from bnet_fastai.nn.compute.one_map import OneMapBNET

BNET_INITS = ("identity", "zero", "official")
# How a BNET2d computes (`bnet_fastai.nn.compute`): "torch" (the one-map step, or the composed path; every device),
# "cpp" (the fused C++ kernels of `cpp_bnet`: float32 CPU maps, k 1/3/5/7), "triton" (the fused Triton kernels of
# `triton_bnet`, CUDA tensors), "auto": "cpp" for what the C++ kernels compute where they build, "torch" otherwise
# (on a GPU until a measurement there shows the Triton kernels faster and equal: benchmarks/README.md).
BNET_IMPLS = names.BNET_IMPLS
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# What a layer's `init` may read: `copy` marks a layer that took a BatchNorm's gamma and beta (`from_bn`);
# it resets as a BatchNorm resets (gamma 1, beta 0), which is `identity`.
_RESET_AS = {"copy": "identity"}


class _BNETNorm(_BatchNorm):
    """BNET's normaliser: ``_BatchNorm(affine=False)`` checking the input rank of its dimensionality."""

    _ranks: tuple[int, ...]

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() not in self._ranks:
            raise ValueError(f"expected {' or '.join(f'{r}D' for r in self._ranks)} input (got {input.dim()}D input)")


class BNETNorm1d(_BNETNorm):
    """The normaliser of BNET1d: what ``nn.BatchNorm1d(affine=False)`` computes, on (N, C) or (N, C, L)."""

    _ranks = (2, 3)


class BNETNorm2d(_BNETNorm):
    """The normaliser of BNET2d: what ``nn.BatchNorm2d(affine=False)`` computes, on (N, C, H, W)."""

    _ranks = (4,)


class BNETNorm3d(_BNETNorm):
    """The normaliser of BNET3d: what ``nn.BatchNorm3d(affine=False)`` computes, on (N, C, D, H, W)."""

    _ranks = (5,)


class _BNETNd(nn.Module):
    """BN(affine=False) followed by a depthwise conv with bias; subclasses fix the dimensionality."""

    ndim: int
    _norm_cls: type[_BatchNorm]
    _conv = staticmethod(F.conv2d)

    def __init__(self, num_features: int, k: int = 3, eps: float = 1e-5, momentum: float | None = 0.1,
                 init: str = "identity", track_running_stats: bool = True, affine: bool = True,
                 device=None, dtype=None, impl: str = "auto"):
        super().__init__()
        check_kernel_size(k)
        check_choice("BNET init", init, BNET_INITS)
        self.impl = _check_impl(impl, self.ndim)
        if not affine:  # accepted so that code calling `norm_layer(c, affine=True)` like a BatchNorm works
            raise ValueError("BNET has no affine=False form: its kernel and bias are the layer; use a BatchNorm")
        factory = dict(device=device, dtype=dtype)
        self.num_features, self.k, self.init = num_features, k, init
        self.norm = self._norm_cls(num_features, eps=eps, momentum=momentum, affine=False,
                                   track_running_stats=track_running_stats, **factory)
        self.weight = nn.Parameter(torch.empty(num_features, 1, *(k,) * self.ndim, **factory))
        self.bias = nn.Parameter(torch.empty(num_features, **factory))
        self.reset_parameters()

    def reset_parameters(self, init: str | None = None) -> None:
        """Initialise the kernel: `identity` (a fresh BN), `zero`, or `official` (the authors' code)."""
        init = _RESET_AS.get(self.init, self.init) if init is None else init
        check_choice("BNET init", init, BNET_INITS)
        with torch.no_grad():
            self.weight.zero_()
            self.bias.zero_()
            if init == "identity":
                self.weight[(slice(None), 0) + (self.k // 2,) * self.ndim] = 1.0
            elif init == "official":
                # The released code builds torchvision's ResNet, whose init loop applies
                # kaiming_normal_(fan_out, relu) to every nn.Conv2d, BNET's conv included.
                nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")

    @classmethod
    def from_bn(cls, bn: _BatchNorm, k: int = 3, init: str = "auto") -> "_BNETNd":
        """A BNET replacing `bn`, with its running statistics.

        `init="auto"`: `zero` where `bn`'s gamma is all zeros (a library's zero-init of a residual
        block's last BN), else `identity`. `init="copy"`: the centre tap takes gamma and the bias
        takes beta, so the model computes exactly what it computed before (for trained models); the layer's
        `init` then reads ``"copy"``. A `SyncBatchNorm` gives a BNET whose normaliser is a `SyncBatchNorm`
        of the same process group, so a converted DDP model keeps synchronising its statistics.
        """
        check_choice("swap_norm init", init, ("auto", "copy") + BNET_INITS)
        has_affine = bn.weight is not None
        if init == "auto":  # a meta-device gamma has no values to read: identity, as a fresh layer
            init = "zero" if has_affine and not bn.weight.is_meta and not bn.weight.detach().any() else "identity"
        ref = bn.running_mean if bn.running_mean is not None else (bn.weight if has_affine else None)
        factory = dict(device=ref.device, dtype=ref.dtype) if ref is not None else {}
        new = cls(bn.num_features, k=k, eps=bn.eps, momentum=bn.momentum,
                  init="identity" if init == "copy" else init,
                  track_running_stats=bn.track_running_stats, **factory)
        if isinstance(bn, nn.SyncBatchNorm):
            new.norm = nn.SyncBatchNorm(bn.num_features, eps=bn.eps, momentum=bn.momentum, affine=False,
                                        track_running_stats=bn.track_running_stats,
                                        process_group=bn.process_group, **factory)
        if init == "copy":
            new.init = "copy"
            if has_affine:
                with torch.no_grad():
                    new.weight[(slice(None), 0) + (k // 2,) * cls.ndim] = bn.weight
                    new.bias.copy_(bn.bias)
        if bn.track_running_stats:
            new.norm.load_state_dict({n: b for n, b in bn.state_dict().items()
                                      if n in ("running_mean", "running_var", "num_batches_tracked")})
        new.train(bn.training)
        return new

    # Read-through views of the normaliser, for code that expects a BatchNorm's attributes.
    @property
    def eps(self) -> float: return self.norm.eps

    @property
    def momentum(self) -> float | None: return self.norm.momentum

    @property
    def running_mean(self) -> torch.Tensor | None: return self.norm.running_mean

    @property
    def running_var(self) -> torch.Tensor | None: return self.norm.running_var

    one_map = True  # train through `OneMapBNET` (one saved map, as BN); False: the composed path, as before
    last_impl: str | None = None  # the computation the last forward ran: "torch", "cpp" or "triton" (None: none yet)
    train_impl: str | None = None  # the computation the last training-mode forward ran

    @property
    def _batch_stats(self) -> bool:
        """Whether a forward normalises with the batch's statistics (training, or no running statistics)."""
        norm = self.norm
        return norm.training or (norm.running_mean is None and norm.running_var is None)

    @property
    def _fused_path_allowed(self) -> bool:
        """The one-map function and the Triton kernels replace the composed path only for a plain normaliser (a
        SyncBatchNorm's statistics are all-reduced by its own function), and not under compile or export."""
        return (type(self.norm) is self._norm_cls and not torch.compiler.is_compiling()
                and not torch.compiler.is_exporting())

    @property
    def _name(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"

    def _use_one_map(self, x: torch.Tensor) -> bool:
        """Whether this forward trains through `OneMapBNET`: batch statistics and a gradient to keep."""
        wants_grad = torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad
                                                  or self.bias.requires_grad)
        return self.one_map and self._batch_stats and wants_grad and self._fused_path_allowed

    def _batch_step(self, x: torch.Tensor) -> tuple[float, torch.Tensor | None, torch.Tensor | None]:
        """A batch-statistics step's running-average factor and the buffers it updates (None: none), counting
        the batch, as `_BatchNorm.forward` does; one value per channel is refused first, in BatchNorm's words
        (its variance is undefined: the running variance would turn NaN and every later eval output with it)."""
        if x.shape[0] * math.prod(x.shape[2:]) == 1:  # as torch.nn.functional.batch_norm verifies
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {x.size()}")
        norm = self.norm
        factor = 0.0 if norm.momentum is None else norm.momentum
        if norm.training and norm.track_running_stats and norm.num_batches_tracked is not None:
            norm.num_batches_tracked.add_(1)
            factor = 1.0 / float(norm.num_batches_tracked) if norm.momentum is None else norm.momentum
        update = norm.training and norm.track_running_stats  # as _BatchNorm passes its buffers to F.batch_norm
        return factor, *((norm.running_mean, norm.running_var) if update else (None, None))

    def _one_map_forward(self, x: torch.Tensor) -> torch.Tensor:
        self.norm._check_input_dim(x)
        factor, running_mean, running_var = self._batch_step(x)
        return OneMapBNET.apply(x, self.weight, self.bias, running_mean, running_var, factor, self.norm.eps,
                                self._name)

    def _use_triton(self, x: torch.Tensor) -> bool:
        """Whether this forward runs the Triton kernels: impl "triton" ("auto" chooses "torch" for now) and a
        float32/float16/bfloat16 input; on a CPU only under Triton's interpreter (else one line)."""
        if self.impl != "triton" or x.dtype not in _TRITON_DTYPES or not self._fused_path_allowed:
            return False
        if not triton_runs_on(x.device):
            raise ValueError(f"{type(self).__name__}(impl='triton') needs a CUDA tensor, got one on {x.device}: "
                             f"use impl='torch' (set_impl(model, 'torch')), or start Python with TRITON_INTERPRET=1 "
                             f"to run the kernels in Triton's CPU interpreter")
        return True

    def _triton_forward(self, x: torch.Tensor) -> torch.Tensor:
        try:  # imports triton: only where a layer asks for it
            from bnet_fastai.nn.compute import triton_bnet
        except ImportError:
            raise ValueError("impl='triton' needs the triton package, which is not installed (it comes with "
                             "torch's CUDA build on Linux): pip install triton, or use impl='torch'") from None

        norm = self.norm
        norm._check_input_dim(x)
        dtype = autocast_dtype(x)  # what the conv would return: autocast's dtype, else x's
        if self._batch_stats:
            factor, running_mean, running_var = self._batch_step(x)
            return triton_bnet.TritonBNET.apply(x, self.weight, self.bias, running_mean, running_var, factor,
                                                norm.eps, dtype, self._name)
        invstd = torch.rsqrt(norm.running_var.float() + norm.eps)  # eval: the running statistics
        return triton_bnet.forward(x, norm.running_mean.float(), invstd, self.weight, self.bias, dtype)

    def __prepare_scriptable__(self):
        """torch.jit.script calls this on every submodule first: refuse in one line rather than fail inside."""
        raise RuntimeError(f"{type(self).__name__} does not support TorchScript (torch.jit.script, deprecated by "
                           f"torch): export the model with torch.export or ONNX, or script fuse_bnet(model)")

    def _use_cpp(self, x: torch.Tensor) -> bool:
        """Whether this forward runs the C++ kernels: impl "cpp" or "auto", a map they compute (float32 CPU, k 1/3/5/7,
        no autocast) with batch statistics (through the one-map rule: not after `set_one_map(model, False)`), or
        with running statistics and no gradient to keep; "auto" where they build, "cpp" or one line why not."""
        if self.impl not in ("cpp", "auto") or self.ndim != 2 or not self._fused_path_allowed:
            return False
        if self.impl == "cpp" and x.device.type != "cpu":
            raise ValueError(f"{self._name}: impl='cpp' computes CPU tensors, got one on {x.device}: use "
                             f"impl='auto' or 'torch' (set_impl(model, 'auto'))")
        if not cpp_bnet.supports(x, self.weight):
            return False
        if self._batch_stats:
            if not self.one_map and torch.is_grad_enabled():
                return False
        elif torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad or self.bias.requires_grad):
            return False  # running statistics with a gradient: the torch path's backward
        if cpp_bnet.load() is None:
            if self.impl == "cpp":
                raise ValueError(f"{self._name}: {cpp_bnet.unavailable_reason()}; use impl='auto' or 'torch'")
            return False
        return True

    def _cpp_forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = self.norm
        norm._check_input_dim(x)
        if self._batch_stats:
            factor, running_mean, running_var = self._batch_step(x)
            return cpp_bnet.train(x, self.weight, self.bias, running_mean, running_var, factor, norm.eps, self._name)
        invstd = torch.rsqrt(norm.running_var + norm.eps)  # eval: the running statistics, as BN's eval
        return cpp_bnet.forward(x, norm.running_mean, invstd, self.weight, self.bias)

    def _ran(self, impl: str) -> None:
        """Record the computation this forward runs (in training mode also as the one that trains the layer)."""
        if not torch.compiler.is_compiling():  # plain attributes: written past nn.Module.__setattr__'s checks
            self.__dict__["last_impl"] = impl
            if self.training:
                self.__dict__["train_impl"] = impl

    def _traced_normalise(self, x: torch.fx.Proxy) -> torch.fx.Proxy:
        norm = self.norm
        return _normalise(x, norm.running_mean, norm.running_var, norm.num_batches_tracked, norm.training,
                          norm.track_running_stats, norm.momentum, norm.eps)

    def _traced_forward(self, x: torch.fx.Proxy) -> torch.fx.Proxy:
        """What torch.fx records (symbolic_trace, torchvision's create_feature_extractor, timm's fx features): the
        normaliser as one call of `_normalise` (the mode and the buffers of this layer; training mode updates them
        when the graph runs), then the depthwise conv. Sizes are unknown here, so a 1x1 map takes the conv too
        (the same values: only the centre tap meets data). No fused kernels: the graph runs the composed path."""
        return self._conv(self._traced_normalise(x), self.weight, self.bias, padding=self.k // 2, groups=self.num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, torch.fx.Proxy):
            return self._traced_forward(x)
        if self._use_triton(x):
            self._ran("triton")
            return self._triton_forward(x)
        if self._use_cpp(x):
            self._ran("cpp")
            return self._cpp_forward(x)
        self._ran("torch")
        if self._use_one_map(x):
            return self._one_map_forward(x)
        x = self.norm(x)
        if all(n == 1 for n in x.shape[2:]):
            # A 1x1 map (ResNeSt's split attention) only ever meets the centre tap: the zero-padded conv
            # reduces to a per-channel scale, same values and gradients, at the cost of one elementwise op.
            # Under autocast it returns the autocast dtype, as the conv it stands for does.
            centre = self.weight[(slice(None), 0) + (self.k // 2,) * self.ndim]
            dtype = autocast_dtype(x)
            return torch.addcmul(self.bias.view(-1, *(1,) * self.ndim).to(dtype), x.to(dtype),
                                 centre.view(-1, *(1,) * self.ndim).to(dtype))
        return self._conv(x, self.weight, self.bias, padding=self.k // 2, groups=self.num_features)

    def extra_repr(self) -> str:
        impl = f", impl={self.impl!r}" if self.impl != "auto" else ""
        return f"{self.num_features}, k={self.k}, init={self.init!r}{impl}"


def _normalise(x: torch.Tensor, running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
               num_batches_tracked: torch.Tensor | None, training: bool, track_running_stats: bool,
               momentum: float | None, eps: float) -> torch.Tensor:
    """What `_BatchNorm.forward` computes for an affine-free normaliser, as a function of its buffers: one node of a
    torch.fx graph (`torch.fx.wrap`), where the module's forward would branch on tensors fx cannot see."""
    factor = 0.0 if momentum is None else momentum
    if training and track_running_stats and num_batches_tracked is not None:
        num_batches_tracked.add_(1)
        factor = 1.0 / float(num_batches_tracked) if momentum is None else momentum
    batch_stats = training or (running_mean is None and running_var is None)
    keep = not training or track_running_stats
    return F.batch_norm(x, running_mean if keep else None, running_var if keep else None, None, None, batch_stats,
                        factor, eps)


torch.fx.wrap("_normalise")


def triton_runs_on(device: torch.device) -> bool:
    """Whether the Triton kernels can run on `device`: CUDA, or any device under Triton's CPU interpreter
    (``TRITON_INTERPRET=1`` when Python starts)."""
    return torch.device(device).type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def _check_impl(impl: str, ndim: int) -> str:
    check_choice("BNET impl", impl, BNET_IMPLS)
    if impl in ("triton", "cpp") and ndim != 2:
        raise ValueError(f"impl={impl!r} is BNET2d's (2-D kernels); BNET{ndim}d takes impl='torch' or 'auto'")
    return impl


def resolve_impl(impl: str, device: torch.device | str, fp16: bool = False) -> str:
    """What BNET2d's `impl` computes through for float32 maps (or, `fp16`, under mixed precision) on `device`:
    "auto" is "cpp" on a CPU where the C++ kernels build (building them now if needed), else "torch"."""
    check_choice("BNET impl", impl, BNET_IMPLS)
    if impl != "auto":
        return impl
    return "cpp" if torch.device(device).type == "cpu" and not fp16 and cpp_bnet.load() is not None else "torch"


def impls_used(model: nn.Module, training: bool = False) -> list[str]:
    """The computations `model`'s BNET layers ran in their last forward ("cpp", "torch", "triton"), sorted;
    `training`: in their last training-mode forward."""
    found = {m.train_impl if training else m.last_impl for m in model.modules() if isinstance(m, _BNETNd)}
    return sorted(found - {None})


def set_impl(model: nn.Module, impl: str) -> nn.Module:
    """Every BNET2d of `model` computes through `impl` ("auto", "torch", "cpp" or "triton"); returns `model`."""
    check_type("set_impl", "a model (a torch nn.Module)", model, nn.Module, "set_impl(model, 'torch')")
    check_choice("BNET impl", impl, BNET_IMPLS)
    for m in model.modules():
        if isinstance(m, _BNETNd) and m.ndim == 2:
            m.impl = impl
    return model


def set_one_map(model: nn.Module, enabled: bool) -> nn.Module:
    """Train every BNET layer of `model` through `OneMapBNET` (`enabled`, the default: one saved map, as BN) or
    through the composed path (BN, then the conv, through autograd: two saved maps, differentiable twice)."""
    check_type("set_one_map", "a model (a torch nn.Module)", model, nn.Module, "set_one_map(model, False)")
    check_type("set_one_map", "enabled as a bool", enabled, bool, "set_one_map(model, False) for the composed path")
    for m in model.modules():
        if isinstance(m, _BNETNd):
            m.one_map = enabled
    return model


def autocast_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a convolution of `x` returns here: the autocast dtype where autocast is on, else x's."""
    device = x.device.type  # autocast lowers float32 only (a float64 conv stays float64)
    lowered = torch.is_autocast_enabled(device) and x.dtype == torch.float32
    return torch.get_autocast_dtype(device) if lowered else x.dtype


class BNET1d(_BNETNd):
    """BNET for (N, C, L) inputs, and for (N, C) inputs, where only the centre tap sees data."""

    ndim, _norm_cls, _conv = 1, BNETNorm1d, staticmethod(F.conv1d)

    def _traced_forward(self, x: torch.fx.Proxy) -> torch.fx.Proxy:
        """(N, C) or (N, C, L): the rank is unknown while tracing, so the conv sees (N, C, L or 1) either way."""
        xhat = self._traced_normalise(x)
        y = self._conv(xhat.reshape(xhat.shape[0], xhat.shape[1], -1), self.weight, self.bias, padding=self.k // 2,
                       groups=self.num_features)
        return y.reshape(xhat.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.fx.Proxy) and x.dim() == 2:
            return super().forward(x.unsqueeze(-1)).squeeze(-1)
        return super().forward(x)


class BNET2d(_BNETNd):
    """BNET for (N, C, H, W) inputs: BN without affine, then a depthwise k×k conv with bias."""

    ndim, _norm_cls, _conv = 2, BNETNorm2d, staticmethod(F.conv2d)


class BNET3d(_BNETNd):
    """BNET for (N, C, D, H, W) inputs: BN without affine, then a depthwise k×k×k conv with bias."""

    ndim, _norm_cls, _conv = 3, BNETNorm3d, staticmethod(F.conv3d)


def bnet_extra_params(num_features: int, k: int, ndim: int = 2) -> int:
    """Parameters a BNET adds over the BN it replaces: C·k^ndim + C (kernel, bias) − 2C (gamma, beta)."""
    return num_features * math.prod((k,) * ndim) + num_features - 2 * num_features
