"""Helpers shared by the tests."""
import torch

from bnet_fastai.nn.compute import cpp_bnet
from bnet_fastai.nn.layers import _BNETNd

# what BNET2d's impl="auto" computes through on this machine's CPU: the C++ kernels where a compiler, Python's headers
# and ninja are there (a failing build with them there fails tests/test_cpp_bnet.py), else the torch path
CPU_IMPL = "cpp" if cpp_bnet.missing() is None else "torch"


def perturb_bnets(model: torch.nn.Module, scale: float = 0.1) -> torch.nn.Module:
    """Give every BNET a kernel and bias that are not the identity, so the conv visibly matters."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BNETNd):
                m.weight.add_(scale * torch.randn_like(m.weight))
                m.bias.add_(scale * torch.randn_like(m.bias))
    return model


def warm_running_stats(model: torch.nn.Module, shape=(4, 3, 32, 32), steps: int = 3) -> torch.nn.Module:
    """A few train-mode forwards on shifted, scaled noise, so running stats are far from (0, 1)."""
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            model(torch.randn(shape) * 2 + 0.5)
    return model
