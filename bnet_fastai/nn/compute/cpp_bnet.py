"""BNET2d in C++ for CPU tensors: the normalisation fused into the depthwise conv, with BatchNorm's passes.

The torch path runs BNET as BN's normalisation (read x, write x̂), then mkldnn's depthwise conv, and backward the
conv's two gradients, then BN's: about ten passes over each map where BN makes five. The kernels of
``csrc/bnet_cpu.cpp`` make BN's five, per full map (N·C·H·W elements):

    forward (training)   1. statistics: read x                                     -> per-channel mean, invstd
                         2. y = b + Σ_taps W · x̂, x̂ = (x − mean)·invstd on load: read x, write y
    forward (eval)       2. only, with the running statistics
    backward             3. sums: db = Σdy, dW[t] = Σ dy · x̂(shifted by tap t), S[t] = Σdy where tap t sees
                            the map:                                                read dy, x
                         4. dx = invstd·(dx̂ − mean(dx̂) − x̂·mean(dx̂·x̂)), dx̂ the conv of dy with the flipped
                            kernel; Σdx̂·x̂ = Σ_t W[t]·dW[t] and Σdx̂ = Σ_t W[t]·S[t] exactly, so dx̂ is
                            never stored:                                           read dy, x, write dx

Each input row is normalised once into a zero-padded buffer (a task's rows, about 128 KiB) that every tap reads;
channels_last maps (the runs' format) are vectorised over channels, contiguous maps over columns (those narrower
than 16 columns are computed in channels_last). A map smaller than the kernel runs only the taps that can see it
(a 1x1 map: the centre tap). Tasks run in parallel on torch's own thread pool (`at::parallel_for`: one OpenMP
runtime). Reductions write a slot per task, tasks depend on the shape alone, and slots combine in order in double
(the statistics shifted by a sample of each channel and accumulated in double): results are bit-identical run to
run and whatever the number of threads. The training step is an autograd function written in C++; it saves x and
two per-channel vectors: one map, as BN.

Float32 only, kernel sizes 1, 3, 5 and 7 (compiled as templates); `_BNETNd` sends anything else through the
torch path. The extension is built at first use with ``torch.utils.cpp_extension`` (ninja, -O3, OpenMP,
-march=native: built on the machine that runs it) into torch's extension cache under a name that hashes the
source, the flags and the CPU, so a changed source or another machine builds anew; torch's build lock makes
concurrent processes wait for one build. Where it cannot be built (no compiler, no Python headers, no ninja, a
failing build) `load()` says so in one line, once, and returns None.
"""
from __future__ import annotations

import hashlib
import os
import platform
import shutil
import sys
import sysconfig
import threading
from pathlib import Path

import torch

from bnet_fastai._notice import notice

SOURCE = Path(__file__).resolve().parent / "csrc" / "bnet_cpu.cpp"
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-DNDEBUG"] + (["-mprefer-vector-width=512"] if platform.machine() in ("x86_64", "AMD64") else [])
LDFLAGS = ["-fopenmp"]  # libgomp.so.1: torch's own copy, already loaded under that soname
KERNEL_SIZES = (1, 3, 5, 7)
_lock = threading.Lock()
_state: dict = {"module": None, "error": None}


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), platform.processor())
    except OSError:
        return platform.processor()


def extension_name() -> str:
    """The extension's name: a hash of its source, flags, CPU and torch, so that any change builds anew."""
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(CFLAGS + LDFLAGS).encode() + _cpu().encode()
                            + torch.__version__.encode()).hexdigest()[:12]
    return f"bnet_cpu_{digest}"


def missing() -> str | None:
    """What the build lacks on this machine (a compiler, Python's headers, ninja), or None."""
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler!r} not found; install g++, or set CXX)"
    if not (Path(sysconfig.get_paths()["include"]) / "Python.h").is_file():
        return f"no Python headers (Python.h; install python{sys.version_info[0]}.{sys.version_info[1]}-dev)"
    if shutil.which("ninja") is None and not (Path(sys.executable).parent / "ninja").exists():
        return "no ninja (pip install ninja)"
    return None


def load(quiet: bool = False):
    """The built extension (built now if needed, about a minute once), or None with one line, once, saying why."""
    with _lock:
        if _state["module"] is not None or _state["error"] is not None:
            return _state["module"]
        why = missing()
        if why is None:
            try:
                _state["module"] = _build(quiet)
            except Exception as e:  # noqa: BLE001  (any failing build: the torch path computes the same)
                lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
                errors = [line for line in lines if "error:" in line]  # the compiler's first error, else the last line
                why = f"the build failed ({type(e).__name__}: {(errors or lines or [''])[0 if errors else -1]})"
        if why is not None:
            _state["error"] = why
            notice(f"BNET: the C++ kernels cannot be built here: {why}; BNET2d computes through the torch path")
        return _state["module"]


def _build(quiet: bool):
    from torch.utils import cpp_extension

    name = extension_name()
    folder = Path(cpp_extension._get_build_directory(name, verbose=False))
    built = any(folder.glob(f"{name}*.so"))
    if not built and not quiet:
        notice(f"BNET: building its C++ kernels for this CPU (once, about a minute) in {folder}")
    # torch's build reads the ninja on PATH: the one this environment installed
    path = os.environ.get("PATH", "")
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{path}"
    try:
        module = cpp_extension.load(name=name, sources=[str(SOURCE)], extra_cflags=CFLAGS, extra_ldflags=LDFLAGS,
                                    verbose=False)
    finally:
        os.environ["PATH"] = path
    return module


def unavailable_reason() -> str | None:
    """Why the kernels do not run here (after `load`), or None."""
    return _state["error"]


def _functorch_wrapped(x: torch.Tensor) -> bool:
    """Whether `x` is a torch.func transform's tensor (vmap, grad): the kernels read raw memory, so they don't take it."""
    check = getattr(getattr(torch._C, "_functorch", None), "is_functorch_wrapped_tensor", None)
    return bool(check(x)) if check is not None else False


def supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the kernels compute this BNET2d input: a non-empty 4-D float32 CPU map, float32 kernel of size 1/3/5/7,
    outside autocast, tracing (`torch.jit.trace` and the ONNX exporter built on it record no raw-memory kernel) and
    torch.func transforms."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 4 and x.numel() > 0
            and weight.dtype == torch.float32 and weight.shape[-1] in KERNEL_SIZES
            and not torch.is_autocast_enabled("cpu") and not torch.jit.is_tracing() and not _functorch_wrapped(x))


NCHW_MIN_WIDTH = 16  # contiguous maps narrower than this are computed in channels_last (vectors over channels)


def _layout(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """x as the kernels read it (channels_last, or contiguous at least `NCHW_MIN_WIDTH` wide: the NCHW kernels
    vectorise over columns), and whether the output goes back to contiguous."""
    if x.is_contiguous(memory_format=torch.channels_last):
        return x, False
    if x.is_contiguous() and x.shape[-1] >= NCHW_MIN_WIDTH:
        return x, False
    return x.contiguous(memory_format=torch.channels_last), x.is_contiguous()


def forward(x: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor, weight: torch.Tensor,
            bias: torch.Tensor) -> torch.Tensor:
    """y = depthwise_conv(x̂, weight) + bias with x̂ = (x − mean)·invstd normalised on load (eval), in x's format."""
    x, back = _layout(x)
    y = load().forward_eval(x, mean.float(), invstd.float(), weight.detach(), bias.detach())
    return y.contiguous() if back else y


_NO_STATISTICS = torch.empty(0)  # the running statistics' place where a layer keeps none (or is not updating them)


def train(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, running_mean: torch.Tensor | None,
          running_var: torch.Tensor | None, factor: float, eps: float, layer: str) -> torch.Tensor:
    """BNET2d's training step (batch statistics; running statistics updated in place as torch's BatchNorm does),
    differentiable once: an autograd function written in C++ that saves x and the per-channel mean and invstd only.
    One value per channel is refused as BN refuses it (ValueError); a double backward stops in one line naming
    `layer`."""
    x, back = _layout(x)
    update = running_mean is not None
    y = load().train(x, weight, bias, running_mean if update else _NO_STATISTICS,
                     running_var if update else _NO_STATISTICS, update, float(factor), float(eps), layer)
    return y.contiguous() if back else y
