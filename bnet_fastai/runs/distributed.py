"""Distributed data parallel training through fastai's `distrib_ctx` (Hugging Face accelerate underneath).

Launch any run on N processes with ``accelerate launch --num_processes N -m bnet_fastai run ...`` (or
``torchrun --nproc_per_node N -m bnet_fastai run ...``): `run` sees ``WORLD_SIZE`` > 1 and trains
inside `distrib_ctx`. On GPUs that is fastai's own context with SyncBatchNorm: BNET survives the
conversion because only its inner normaliser is a `_BatchNorm` (see `bnet_fastai.nn.layers`).

Without GPUs (gloo backend, used to test this path on a CPU) fastai needs two adjustments: accelerate
must be told ``cpu=True``, and fastai's `DistributedDL` broadcasts the shuffled batch order through a
``.cuda()`` tensor (written for NCCL); `_GlooDistributedDL` broadcasts the CPU tensor instead.
SyncBatchNorm needs GPUs, so on CPU each rank keeps its own batch statistics.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator

import torch
from fastai.distributed import DistributedDL, DistributedTrainer
from fastai.learner import Learner

# How long the other ranks wait for rank 0's decision: rank 0 may be downloading and caching a dataset.
PREPARE_TIMEOUT = datetime.timedelta(hours=2)


class _GlooDistributedDL(DistributedDL):
    """fastai's `DistributedDL`, broadcasting the batch order as a CPU tensor (gloo)."""

    def _broadcast(self, t: list, rank: int) -> list:
        t = torch.LongTensor(t)
        torch.distributed.broadcast(t, rank)
        return t.tolist()


class _CPUDistributedTrainer(DistributedTrainer):
    """fastai's `DistributedTrainer` on CPU processes: accelerate with ``cpu=True`` and gloo-safe loaders."""

    def __init__(self):
        super().__init__(sync_bn=False, cpu=True)

    def _wrap_dl(self, dl):
        return dl if isinstance(dl, DistributedDL) else _GlooDistributedDL(dl, device=self.learn.model.device)


@contextlib.contextmanager
def distrib_ctx(learn: Learner, sync_bn: bool = True) -> Iterator[Learner]:
    """fastai's `Learner.distrib_ctx` on GPUs; its CPU (gloo) counterpart otherwise. Yields `learn`."""
    if torch.cuda.is_available():
        with learn.distrib_ctx(sync_bn=sync_bn):
            yield learn
        return
    learn.add_cb(_CPUDistributedTrainer())
    try:
        yield learn
    finally:
        learn.detach_distributed()


def use_own_gpu() -> None:
    """Make this rank's GPU the current one (``LOCAL_RANK``, as fastai's `setup_distrib` does) before its
    Learner is built: fastai puts the loaders, and so the model, on the current GPU, which is otherwise GPU 0
    for every rank. A launcher that gives each rank one visible GPU is served too (modulo the count)."""
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")))
        torch.cuda.set_device(local % torch.cuda.device_count())


def share_decision(decision: dict) -> dict:
    """Rank 0's `decision` on every rank: the other ranks wait here (a barrier) until rank 0 has made it.

    Starts torch's default process group when the launcher has not (accelerate then uses it, with torch's
    default timeouts): gloo for Python objects, NCCL for the training's CUDA tensors where there are GPUs.
    The decision travels in a gloo group of its own whose timeout, `PREPARE_TIMEOUT`, leaves rank 0 time to
    download and cache a dataset; training keeps the default group's timeout.
    """
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    group = torch.distributed.new_group(backend="gloo", timeout=PREPARE_TIMEOUT)
    box = [decision]
    try:
        torch.distributed.broadcast_object_list(box, src=0, group=group)
    finally:
        torch.distributed.destroy_process_group(group)
    return box[0]
