"""Timing side by side: one training step of each model, in interleaved rounds.

`bnet-fastai check` (`bnet_fastai.app.preflight`) and the scripts in ``benchmarks/`` time with these, so a ratio
the preflight prints and one a benchmark prints are measured the same way. On a GPU each step is timed with
CUDA events (the GPU's own clock, no host-side launch latency counted) and the GPU is synchronised before
the rounds start; on a CPU with `time.perf_counter`.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn


def interleaved(steps: dict[str, Callable[[], object]], rounds: int = 5, warmup: int = 2,
                device: torch.device | str | None = None, spread: dict[str, float] | None = None) -> dict[str, float]:
    """Median seconds of each step, measured in interleaved rounds (every step runs once per round) so that
    drift of the machine (other load, clock changes) hits every contender alike: read the ratios.

    `device`: where the steps run; default the GPU when there is one. `spread`: filled with each step's spread
    between rounds, (slowest − fastest) / median (0 with one round), for `load_warning`."""
    device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    for _ in range(warmup):
        for step in steps.values():
            step()
    if cuda:
        torch.cuda.synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                step()
                end.record()
                end.synchronize()
                times[name].append(start.elapsed_time(end) / 1e3)  # elapsed_time is in milliseconds
            else:
                start = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - start)
    if spread is not None:
        spread.update({name: (max(t) - min(t)) / statistics.median(t) for name, t in times.items()})
    return {name: statistics.median(t) for name, t in times.items()}


# A machine is quiet when, before the timing, its 1-minute load average is at most this share of its cores, and the
# rounds of every step are within this share of their median of each other: on this project's 2-core machine,
# quiet runs measured round spreads of 1-8% and loads below 0.3 per core; under a test suite, 2-4 per core.
QUIET_LOAD, QUIET_SPREAD = 0.5, 0.25


def load_warning(load: float, cores: int, spreads: Iterable[float]) -> str:
    """"" for a quiet machine (`QUIET_LOAD`, `QUIET_SPREAD`); else one line saying the timings are not to be
    trusted, with what was seen: `load` is the 1-minute load average read before the timing started."""
    worst = max(spreads, default=0.0)
    seen = [f"load average {load:.2f} on {cores} cores before the timing"] if load > QUIET_LOAD * cores else []
    seen += [f"a step's rounds {100 * worst:.0f}% apart"] if worst > QUIET_SPREAD else []
    if not seen:
        return ""
    return (f"WARNING: the machine was not quiet ({'; '.join(seen)}): these timings are not to be trusted; "
            f"rerun with nothing else running")


def quiet_line(load: float, cores: int, spreads: Iterable[float]) -> str:
    """The line a benchmark ends with: `load_warning`'s, or what shows the machine was quiet."""
    spreads = list(spreads)
    return load_warning(load, cores, spreads) or (
        f"machine quiet: load average {load:.2f} on {cores} cores before the timing, rounds within "
        f"{100 * max(spreads, default=0.0):.0f}% of each other")


def amp_dtype(device: torch.device | str) -> torch.dtype | None:
    """The mixed-precision dtype runs train with on `device` (fastai's `to_fp16`: float16 on a GPU), None
    on a CPU, where runs train in float32 (`RunConfig.fp16="auto"`)."""
    return torch.float16 if torch.device(device).type == "cuda" else None


OPTIMIZERS = ("sgd", "adam")  # `training_step`'s: torch's SGD with momentum, or fastai's Adam as runs train


def training_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype | None = None,
                  lr: float = 1e-3, opt: str = "sgd", no_decay: Iterable[nn.Parameter] = ()
                  ) -> Callable[[], torch.Tensor]:
    """One training step (forward, backward, update) of `model` on the batch `x`, `y`, as a closure returning
    the loss. `opt`: ``"sgd"`` (torch's SGD, momentum 0.9) or ``"adam"`` (fastai's `Adam` with weight decay
    0.01 except on `no_decay`, as `bnet_fastai.nn.weight_decay.no_decay_params` gives the runs: the optimizer
    a run's step pays for, its Python loop over parameters included). With `dtype`, the forward runs under autocast in that dtype and float16
    gradients go through a `GradScaler`, as fastai's `MixedPrecision` trains."""
    if opt not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {opt!r}; valid choices: {', '.join(OPTIMIZERS)}")
    if opt == "adam":
        from fastai.optimizer import Adam

        optimizer = Adam(list(model.parameters()), lr=lr, wd=1e-2)
        for p in no_decay:
            optimizer.state[p]["do_wd"] = False
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    scaler = torch.amp.GradScaler(x.device.type, enabled=dtype is torch.float16)

    def step() -> torch.Tensor:
        optimizer.zero_grad()
        with torch.autocast(x.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        return loss.detach()

    return step


def saved_activation_bytes(model: nn.Module, x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype | None = None
                           ) -> int:
    """Bytes that one training forward of `model` keeps for its backward, counted exactly: every tensor autograd
    saves (`torch.autograd.graph.saved_tensors_hooks`), each storage once, parameters' storages left out. A
    deterministic number (no allocator, no resident-set noise), so memory ratios can be tested."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast(x.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        loss = F.cross_entropy(model(x), y)
    del loss  # the graph and what it saved go with it
    return sum(storages.values())
