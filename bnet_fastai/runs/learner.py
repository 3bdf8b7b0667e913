"""The fastai `Learner` of a run: seeded data, model, optimizer, loss and callbacks, from its `RunConfig`.

`build_learner` writes nothing; `bnet_fastai.runs.train.run` trains what it builds. `check_batch_size`
prepares the dataset and rejects a batch larger than its training set before anything is written.
"""
from __future__ import annotations

import torch
from fastai.callback.channelslast import ChannelsLast
from fastai.callback.tracker import TerminateOnNaNCallback
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat, LabelSmoothingCrossEntropyFlat
from fastai.metrics import accuracy
from fastai.optimizer import SGD, Adam, ranger
from fastai.torch_core import set_seed

from bnet_fastai.data.cache import cached_dataloaders
from bnet_fastai.data.datasets import DATASETS, dataloaders, image_files, prepare, subsample_train
from bnet_fastai.nn.layers import resolve_impl, set_impl, triton_runs_on
from bnet_fastai.nn.models import create_model
from bnet_fastai.nn.weight_decay import BNETWeightDecay
from bnet_fastai.runs.config import RunConfig

OPTIMIZERS = {"adam": Adam, "ranger": ranger, "sgd": SGD}  # the names of `names.OPTIMIZERS`
PIPELINES = {"cached": cached_dataloaders, "fastai": dataloaders}  # same items, split and augmentation


class DivergenceCallback(TerminateOnNaNCallback):
    """fastai's TerminateOnNaN, remembering that it fired so the run is marked `diverged`."""

    diverged = False

    def after_batch(self) -> None:
        if not torch.isfinite(self.loss.detach()).all():
            self.diverged = True
        super().after_batch()


def check_batch_size(config: RunConfig) -> None:
    """ValueError unless `config.bs` images are there to train on (fastai drops the last partial batch, so
    a larger batch would train on nothing). Prepares (downloads) the dataset to count them."""
    spec, path = DATASETS[config.dataset], prepare(config.dataset)
    train_dir = path / spec.train
    items = image_files(path, spec)
    if config.fraction < 1:
        items = subsample_train(items, train_dir, config.fraction, config.seed)
    _check_batch_fits(config, sum(train_dir in p.parents for p in items))


def _check_batch_fits(config: RunConfig, n_train: int) -> None:
    if config.bs > n_train:
        raise ValueError(f"bs={config.bs} is larger than the {n_train} training images of {config.dataset!r} "
                         f"(fraction={config.fraction}); use a smaller --bs")


def build_learner(config: RunConfig) -> tuple[Learner, DivergenceCallback]:
    """Seeded data, model and fastai Learner for `config`, and its divergence watch; writes nothing."""
    config.validate()
    set_seed(config.seed, reproducible=True)
    dls = PIPELINES[config.pipeline](config.dataset, size=config.size, bs=config.bs, workers=config.workers,
                                     fraction=config.fraction, seed=config.seed)
    _check_batch_fits(config, len(dls.train_ds))  # e.g. images left out of the cache since the first count
    model = create_model(config.arch, config.norm, n_out=len(dls.vocab), placement=config.placement, k=config.k,
                         act=config.act, bnet_init=config.bnet_init, sa=config.sa, pool=config.pool)
    device = torch.device(dls.device or "cpu")
    if config.bnet_impl == "triton" and config.norm == "bnet" and not triton_runs_on(device):
        raise ValueError("bnet_impl='triton' runs the fused Triton kernels on CUDA tensors; this run trains on the "
                         "CPU: use bnet_impl 'torch' or 'auto'")  # before the run writes anything
    set_impl(model, config.bnet_impl)  # BNET2d's computation: no BNET, no change
    if config.norm == "bnet" and config.bnet_impl in ("auto", "cpp") and device.type == "cpu":
        resolve_impl(config.bnet_impl, device)  # the C++ kernels built (once) now, not in the first batch
    if config.compile:
        model = torch.compile(model)
    smoothing = config.label_smoothing
    loss = LabelSmoothingCrossEntropyFlat(eps=smoothing) if smoothing else CrossEntropyLossFlat()
    divergence = DivergenceCallback()
    learn = Learner(dls, model, loss_func=loss, opt_func=OPTIMIZERS[config.opt], metrics=accuracy, wd=config.wd,
                    wd_bn_bias=config.wd_norm, cbs=[BNETWeightDecay(), divergence])
    if config.channels_last:
        learn.add_cb(ChannelsLast())
    if config.fp16 == "on" or (config.fp16 == "auto" and device.type == "cuda"):
        learn.to_fp16()  # "auto": on where the run trains on a GPU (fastai's default device)
    return learn, divergence


def validation_accuracy(model: torch.nn.Module, dl, fp16: bool) -> float:
    """Share of `dl`'s images `model` classifies right, under autocast when `fp16` (as the run validated)."""
    correct = total = 0
    with torch.no_grad(), torch.autocast(dl.device.type if dl.device else "cpu", enabled=fp16):
        for xb, yb in dl:
            correct += int((model(xb).argmax(dim=1) == yb).sum())
            total += len(yb)
    return correct / total
