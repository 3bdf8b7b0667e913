"""One run: `RunConfig` (the whole configuration, logged with the results) and `run(config)`.

A run folder ``<out>/<run_id>/`` holds ``config.json``, ``history.csv`` (fastai's `CSVLogger`, one row per
epoch), ``status.json`` (see `bnet_fastai.runstate`), TensorBoard event files (losses, accuracy and learning
rate per epoch, see `bnet_fastai.tensorboard_log`) and, for BNET runs, ``kernels.json`` (mean |weight| of each
kernel tap per layer, for the report's kernel picture). Off a terminal a run prints one line per epoch
instead of progress bars (`bnet_fastai.progress`).
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import subprocess
import time
from dataclasses import asdict
from pathlib import Path

import torch
from fastai.callback import schedule  # noqa: F401  (adds Learner.fit_one_cycle and fit_flat_cos)
from fastai.callback.channelslast import ChannelsLast
from fastai.callback.core import Callback
from fastai.callback.fp16 import MixedPrecision
from fastai.callback.progress import CSVLogger
from fastai.callback.tracker import TerminateOnNaNCallback
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat, LabelSmoothingCrossEntropyFlat
from fastai.metrics import accuracy
from fastai.optimizer import SGD, Adam, ranger
from fastai.torch_core import num_distrib, rank_distrib, set_seed

from ._checks import check_output_folder
from ._files import atomic_write
from .cache import cached_dataloaders
from .config import ADDED_LATER, SCHEDULES, RunConfig  # noqa: F401  (public here too)
from .data import DATASETS, dataloaders, image_files, prepare, subsample_train
from .models import create_model
from .norms import kernel_stats
from .progress import show_progress
from .runstate import DONE, RunFailed, check_run, file_record, raw_status, run_lock, write_status
from .tensorboard_log import TensorBoardScalars
from .weight_decay import BNETWeightDecay, no_decay_params

OPTIMIZERS = {"adam": Adam, "ranger": ranger, "sgd": SGD}  # the names of `names.OPTIMIZERS`
PIPELINES = {"cached": cached_dataloaders, "fastai": dataloaders}  # same items, split and augmentation


class DivergenceCallback(TerminateOnNaNCallback):
    """fastai's TerminateOnNaN, remembering that it fired so the run is marked `diverged`."""

    diverged = False

    def after_batch(self) -> None:
        if not torch.isfinite(self.loss.detach()).all():
            self.diverged = True
        super().after_batch()


def _environment() -> dict:
    import fastai
    import timm

    from . import __version__

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"
    return {"bnet_fastai": __version__, "torch": torch.__version__, "fastai": fastai.__version__,
            "timm": timm.__version__, "python": platform.python_version(), "git_commit": commit,
            "device": device, "host": platform.node()}


def run(config: RunConfig, out: str | Path = "results/default", force: bool = False,
        cbs: list[Callback] | None = None, wait: bool = False) -> dict:
    """Train `config` into ``<out>/<run_id>/`` and return its final status (with ``run_dir``).

    A run already `finished` or `diverged` there is reused, not retrained, unless `force` or its files are
    damaged (`check_run`; the result then names the damage under ``"damaged"``); any other state (missing,
    failed, interrupted) is trained from the start. Bad input (ValueError: a bad field, an `out` that is not a
    writable folder, a dataset that cannot be had, a batch larger than the training set) is raised before
    anything is written under `out`. Under a distributed launch
    (``WORLD_SIZE`` > 1, e.g. ``accelerate launch``) every rank trains and rank 0 writes the files.
    `cbs` are extra fastai callbacks for this fit (a sweep's live view, for instance). A run that another
    live process is training raises `RunLocked`, or with `wait`, is waited for and then reused (or trained,
    if that process ended without finishing it).
    """
    config.validate()
    run_dir = check_output_folder(out) / config.run_id
    check_batch_size(config)  # prepares the dataset first
    main_process = rank_distrib() == 0
    with run_lock(run_dir, wait) if main_process else contextlib.nullcontext():
        previous = raw_status(run_dir)  # under the lock a "running" status is stale
        status, damage = previous["status"], None
        if status in DONE and not force:
            damage = check_run(run_dir, previous)
            if damage is None:
                return {**previous, "run_dir": str(run_dir), "reused": True}
            status = "damaged"  # trained again from the start, like any run that is not done
        try:
            learn, divergence = build_learner(config)
        except ValueError:  # bad input: the run folder is left as it was
            raise
        except Exception as e:
            if main_process and status not in DONE:
                run_dir.mkdir(parents=True, exist_ok=True)
                write_status(run_dir, "failed", error=f"{type(e).__name__}: {e}")
            raise
        if main_process:
            shutil.rmtree(run_dir, ignore_errors=True)
            run_dir.mkdir(parents=True)
            write_status(run_dir, "running")
            _log_to(learn, config, run_dir)
        show_progress(learn, config.run_id, main_process)
        learn.add_cbs(cbs or [])
        result = _fit(learn, divergence, config, run_dir, main_process)
        return {**result, "damaged": damage} if damage else result


def _fit(learn: Learner, divergence: "DivergenceCallback", config: RunConfig, run_dir: Path,
         main_process: bool) -> dict:
    start = time.time()
    fit = getattr(learn, SCHEDULES[config.schedule])  # learn.fit_one_cycle or learn.fit_flat_cos
    try:
        if num_distrib() > 1:
            from .distributed import distrib_ctx

            with distrib_ctx(learn, sync_bn=torch.cuda.is_available()):
                fit(config.epochs, config.lr)
        else:
            fit(config.epochs, config.lr)
    except KeyboardInterrupt:
        if main_process:
            write_status(run_dir, "interrupted", reason="KeyboardInterrupt or SIGTERM")
        raise
    except Exception as e:
        if main_process:
            write_status(run_dir, "failed", error=f"{type(e).__name__}: {e}")
        raise RunFailed(f"{type(e).__name__}: {e} (see {run_dir / 'status.json'})") from e
    final = {"epochs_done": len(learn.recorder.values), "seconds": round(time.time() - start, 2),
             "final_accuracy": float(learn.recorder.values[-1][2]) if learn.recorder.values else None}
    status = "diverged" if divergence.diverged else "finished"
    if main_process:
        if config.norm == "bnet":
            model = getattr(learn.model, "module", learn.model)  # DDP wraps it,
            model = getattr(model, "_orig_mod", model)  # and torch.compile
            sample = learn.dls.valid.one_batch()[0][:2].float()
            atomic_write(run_dir / "kernels.json", json.dumps(kernel_stats(model, sample)))
        write_status(run_dir, status, **final, **file_record(run_dir))  # what its files must be from now on
    return {"status": status, **final, "run_dir": str(run_dir), "reused": False}


def check_batch_size(config: RunConfig) -> None:
    """ValueError unless `config.bs` images are there to train on (fastai drops the last partial batch, so
    a larger batch would train on nothing). Prepares (downloads) the dataset to count them."""
    spec, path = DATASETS[config.dataset], prepare(config.dataset)
    train_dir = path / spec.train
    items = image_files(path, spec)
    if config.fraction < 1:
        items = subsample_train(items, train_dir, config.fraction, config.seed)
    n_train = sum(train_dir in p.parents for p in items)
    if config.bs > n_train:
        raise ValueError(f"bs={config.bs} is larger than the {n_train} training images of {config.dataset!r} "
                         f"(fraction={config.fraction}); use a smaller --bs")


def build_learner(config: RunConfig) -> tuple[Learner, DivergenceCallback]:
    """Seeded data, model and fastai Learner for `config`, and its divergence watch; writes nothing."""
    config.validate()
    set_seed(config.seed, reproducible=True)
    dls = PIPELINES[config.pipeline](config.dataset, size=config.size, bs=config.bs, workers=config.workers,
                                     fraction=config.fraction, seed=config.seed)
    if len(dls.train) == 0:  # fastai drops the last partial batch: nothing would be trained
        raise ValueError(f"bs={config.bs} is larger than the {len(dls.train_ds)} training images of "
                         f"{config.dataset!r} (fraction={config.fraction}); use a smaller --bs")
    model = create_model(config.arch, config.norm, n_out=len(dls.vocab), placement=config.placement, k=config.k,
                         act=config.act, bnet_init=config.bnet_init, sa=config.sa, pool=config.pool)
    if config.compile:
        model = torch.compile(model)
    smoothing = config.label_smoothing
    loss = LabelSmoothingCrossEntropyFlat(eps=smoothing) if smoothing else CrossEntropyLossFlat()
    divergence = DivergenceCallback()
    learn = Learner(dls, model, loss_func=loss, opt_func=OPTIMIZERS[config.opt], metrics=accuracy, wd=config.wd,
                    wd_bn_bias=config.wd_norm, cbs=[BNETWeightDecay(), divergence])
    if config.channels_last:
        learn.add_cb(ChannelsLast())
    if config.fp16 == "on" or (config.fp16 == "auto" and torch.cuda.is_available()):
        learn.to_fp16()
    return learn, divergence


def _log_to(learn: Learner, config: RunConfig, run_dir: Path) -> None:
    """Point the Learner's history.csv (fastai CSVLogger) and TensorBoard events at `run_dir`; write config.json."""
    learn.path = run_dir  # CSVLogger writes relative to learn.path, which fastai sets to the dataset folder
    learn.add_cbs([CSVLogger(fname="history.csv"), TensorBoardScalars(run_dir)])
    model, dls = learn.model, learn.dls
    atomic_write(run_dir / "config.json", json.dumps({
        "run_id": config.run_id, "config": asdict(config),
        "dataset": {"name": config.dataset, "path": str(dls.path), "n_train": len(dls.train_ds),
                    "n_valid": len(dls.valid_ds), "classes": list(map(str, dls.vocab))},
        "model": {"parameters": sum(p.numel() for p in model.parameters()),
                  "parameters_not_decayed": sum(p.numel() for p in no_decay_params(model))},
        "weight_decay_rule": ("every parameter is decayed" if config.wd_norm else
                              "no decay for BN gamma/beta, BNET kernel/bias and any bias; decay for the rest"),
        "training": {"schedule": SCHEDULES[config.schedule],
                     "fp16": any(isinstance(cb, MixedPrecision) for cb in learn.cbs),
                     "world_size": max(num_distrib(), 1)},
        "environment": _environment()}, indent=1))
