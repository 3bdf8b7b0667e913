"""One run: `run(config)` trains a `RunConfig` (`bnet_fastai.runs.config`) into its own folder.

A run folder ``<out>/<run_id>/`` holds ``config.json``, ``history.csv`` (fastai's `CSVLogger`, one row per
epoch), ``status.json`` (see `bnet_fastai.runs.runstate`), TensorBoard event files (losses, accuracy and learning
rate per epoch, see `bnet_fastai.runs.tensorboard_log`), for BNET runs ``kernels.json`` (mean |weight| of each
kernel tap per layer, for the report's kernel picture), and once finished ``model.pth``, the trained weights
(`checkpoint.load_model`). While it trains, ``checkpoint.pth`` holds the last finished epoch, so a stopped run
resumes there (`bnet_fastai.runs.checkpoint`). Off a terminal a run prints one line per epoch instead of progress
bars (`bnet_fastai.runs.progress`). The Learner comes from `bnet_fastai.runs.learner`, the choice between
reusing, resuming and training from the start from `bnet_fastai.runs.decision`.
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
from fastai.callback.core import Callback
from fastai.callback.fp16 import MixedPrecision
from fastai.callback.progress import CSVLogger
from fastai.learner import Learner, SkipToEpoch
from fastai.torch_core import num_distrib, rank_distrib

from bnet_fastai._checks import check_output_folder
from bnet_fastai._files import atomic_write, file_fault
from bnet_fastai.data import fashion_mnist
from bnet_fastai.nn.fuse import fuse_bnet
from bnet_fastai.nn.layers import impls_used, resolve_impl
from bnet_fastai.nn.norms import kernel_stats
from bnet_fastai.nn.weight_decay import no_decay_params
from bnet_fastai.runs.checkpoint import (
    CHECKPOINT,
    AppendingCSVLogger,
    EpochCheckpoint,
    QuietSkippedEpochs,
    Resume,
    save_weights,
    unwrapped,
)
from bnet_fastai.runs.config import SCHEDULES, RunConfig
from bnet_fastai.runs.decision import decide, follow
from bnet_fastai.runs.learner import DivergenceCallback, validation_accuracy
from bnet_fastai.runs.progress import show_progress
from bnet_fastai.runs.runstate import RunFailed, RunLocked, file_record, write_status
from bnet_fastai.runs.tensorboard_log import TensorBoardScalars, tensorboard_installed


def _git_commit() -> str | None:
    """The commit of the package's checkout, None outside one."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# Read when this module is imported: the commit of the code this process runs. A long sweep whose checkout
# moves on (a commit made while it trains) keeps recording the code it imported, not the new HEAD.
_COMMIT = _git_commit()


def _environment() -> dict:
    import fastai
    import timm

    from bnet_fastai import __version__

    commit = _COMMIT
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"
    return {"bnet_fastai": __version__, "torch": torch.__version__, "fastai": fastai.__version__,
            "timm": timm.__version__, "python": platform.python_version(), "git_commit": commit,
            "device": device, "host": platform.node(),
            # what this process may use: a --parallel worker sees its one GPU (bnet_fastai.sweeps.executors)
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "gpus_visible": torch.cuda.device_count() if torch.cuda.is_available() else 0,
            # a CPU run's numbers depend on its thread count (reductions split differently): to match a run, match it
            "torch_threads": torch.get_num_threads(), "torch_interop_threads": torch.get_num_interop_threads()}


def run(config: RunConfig, out: str | Path = "results/default", force: bool = False,
        cbs: list[Callback] | None = None, wait: bool = False) -> dict:
    """Train `config` into ``<out>/<run_id>/`` and return its final status (with ``run_dir``).

    A run already `finished` or `diverged` there is reused, not retrained, unless `force` or its files are
    damaged (`check_run`; the result then names the damage under ``"damaged"``). A run that was stopped (a
    crash, SIGKILL, SIGTERM, Ctrl-C) resumes from its last per-epoch checkpoint (`bnet_fastai.runs.checkpoint`);
    with none, it trains from the start. Bad input (ValueError: a bad field, an `out` that is not a writable
    folder, a dataset that cannot be had, a batch larger than the training set) is raised before anything is
    written under `out`. A run that another live process is training raises `RunLocked`, or with `wait`, is
    waited for and then reused (or resumed, if that process ended without finishing it).

    Under a distributed launch (``WORLD_SIZE`` > 1, e.g. ``accelerate launch``) rank 0 alone decides (reuse,
    resume, locked) and prepares the dataset and its cache while the other ranks wait for its decision
    (`distributed.share_decision`); every rank then trains, and rank 0 writes the files.
    `cbs` are extra fastai callbacks for this fit (a sweep's live view, for instance).
    """
    config.validate()
    run_dir = check_output_folder(out) / config.run_id
    main_process = rank_distrib() == 0
    if num_distrib() > 1:
        from bnet_fastai.runs.distributed import use_own_gpu

        use_own_gpu()
    with contextlib.ExitStack() as lock:
        decision, built, error = {}, None, None
        if main_process:
            try:
                decision, built = decide(config, run_dir, force, wait, lock)
            except Exception as e:  # noqa: BLE001  (told to every rank first, then raised)
                decision, error = {"action": "raise", "error": type(e).__name__, "message": str(e)}, e
        if num_distrib() > 1:
            from bnet_fastai.runs.distributed import share_decision

            decision = share_decision(decision)
        if error is not None:
            raise error
        if decision["action"] == "raise":
            raise {"ValueError": ValueError, "DatasetError": ValueError,
                   "RunLocked": RunLocked}.get(decision["error"], RunFailed)(decision["message"])
        if decision["action"] == "reuse":
            return decision["result"]
        learn, divergence, state = built or follow(config, run_dir, decision["start_epoch"])
        if main_process:
            try:
                _open_run(learn, config, run_dir, state)
            except OSError as e:
                _raise_if_fixable(e, run_dir)
                raise
        show_progress(learn, config.run_id, main_process)
        learn.add_cbs(cbs or [])
        result = _fit(learn, divergence, config, run_dir, main_process, state)
        return {**result, "damaged": decision["damage"]} if decision["damage"] else result


def _open_run(learn: Learner, config: RunConfig, run_dir: Path, state: dict | None) -> None:
    """Rank 0: a fresh run folder, or a resumed one (`state`: its checkpoint) whose history keeps the rows of
    its finished epochs byte for byte."""
    start = state["epochs_done"] if state else 0
    if start:
        print(f"{run_dir.name}: resuming from its checkpoint after epoch {start} of {config.epochs}", flush=True)
        for stale in run_dir.glob(".*.tmp"):  # a write the kill cut short
            stale.unlink()
        lines = (run_dir / "history.csv").read_text().splitlines(keepends=True)
        atomic_write(run_dir / "history.csv", "".join(lines[:start + 1]))
        write_status(run_dir, "running", resumed_from_epoch=start)
    else:
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        write_status(run_dir, "running")
        _write_config(learn, config, run_dir)
    learn.path = run_dir  # CSVLogger writes relative to learn.path, which fastai sets to the dataset folder
    learn.add_cbs([AppendingCSVLogger("history.csv") if start else CSVLogger(fname="history.csv"),
                   *([TensorBoardScalars(run_dir, first_step=start + 1)] if tensorboard_installed() else []),
                   EpochCheckpoint(run_dir, seconds_before=state.get("seconds", 0) if state else 0,
                                   run={"run_id": config.run_id, "config": asdict(config)})])


def _fit(learn: Learner, divergence: DivergenceCallback, config: RunConfig, run_dir: Path,
         main_process: bool, state: dict | None) -> dict:
    start = time.time()
    fit = getattr(learn, SCHEDULES[config.schedule])  # learn.fit_one_cycle or learn.fit_flat_cos
    # fastai's start_epoch, for both schedules (fit_flat_cos drops its own): skip the finished epochs
    resume = [SkipToEpoch(state["epochs_done"]), Resume(state), QuietSkippedEpochs()] if state else None
    try:
        if num_distrib() > 1:
            from bnet_fastai.runs.distributed import distrib_ctx

            with distrib_ctx(learn, sync_bn=torch.cuda.is_available()):
                fit(config.epochs, config.lr, cbs=resume)
        else:
            fit(config.epochs, config.lr, cbs=resume)
    except KeyboardInterrupt:
        if main_process:
            write_status(run_dir, "interrupted", reason="KeyboardInterrupt or SIGTERM",
                         **({"resumed_from_epoch": state["epochs_done"]} if state else {}))
        raise
    except Exception as e:
        if main_process:
            _raise_if_fixable(e, run_dir)
            write_status(run_dir, "failed", error=f"{type(e).__name__}: {e}")
        raise RunFailed(f"{type(e).__name__}: {e} (see {run_dir / 'status.json'})") from e
    trained = [v for v in learn.recorder.values if len(v)]  # a resumed run's skipped epochs have none
    done = (state["epochs_done"] if state else 0) + len(trained)
    final = {"epochs_done": done, "seconds": round(time.time() - start + (state or {}).get("seconds", 0), 2),
             "final_accuracy": float(trained[-1][2]) if trained else _last_accuracy(run_dir)}
    if state:
        final["resumed_from_epoch"] = state["epochs_done"]
    status = "diverged" if divergence.diverged else "finished"
    if main_process:
        try:
            _finish(learn, config, run_dir, status, final)
        except Exception as e:  # the last checkpoint stays: running the run again finishes it
            _raise_if_fixable(e, run_dir)
            write_status(run_dir, "failed", error=f"after the last epoch: {type(e).__name__}: {e}")
            raise RunFailed(f"{type(e).__name__}: {e} (see {run_dir / 'status.json'})") from e
    return {"status": status, **final, "run_dir": str(run_dir), "reused": False}


def _raise_if_fixable(error: BaseException, run_dir: Path) -> None:
    """A write error the user can fix (a full disk, a read-only or foreign folder): status `failed` with the
    cause where it can still be written, and one line naming the folder, the cause and the fix."""
    fault = file_fault(error)
    if fault is None:
        return
    what, fix = fault
    message = (f"cannot write {run_dir}: {what}; {fix}, then run the same command again (it resumes from its "
               f"last finished epoch)")
    with contextlib.suppress(OSError):  # on a full disk the removed temporary file may have made room
        write_status(run_dir, "failed", error=message)
    raise RunFailed(message) from error


def _last_accuracy(run_dir: Path) -> float | None:
    """The accuracy of history.csv's last row (a run resumed after its last epoch trains none)."""
    lines = (run_dir / "history.csv").read_text().splitlines()
    return float(lines[-1].split(",")[lines[0].split(",").index("accuracy")]) if len(lines) > 1 else None


def _finish(learn: Learner, config: RunConfig, run_dir: Path, status: str, final: dict) -> None:
    """Rank 0, after the last epoch: kernels.json, the weights (and for BNET the fused model's accuracy),
    then status.json with the record of every file, and last the checkpoint is dropped."""
    model = unwrapped(learn.model)
    if config.norm == "bnet":
        final["bnet_impls_used"] = impls_used(model, training=True)  # what BNET's layers trained through
        sample = learn.dls.valid.one_batch()[0][:2].float()
        atomic_write(run_dir / "kernels.json", json.dumps(kernel_stats(model, sample)))
        if status == "finished":
            final.update(_fused_accuracy(learn))
    if config.keep_weights and status == "finished":
        save_weights(learn, run_dir)
    write_status(run_dir, status, **final, **file_record(run_dir))  # what its files must be from now on
    (run_dir / CHECKPOINT).unlink(missing_ok=True)


def _fused_accuracy(learn: Learner) -> dict:
    """Validation accuracy of the trained BNET model and of `fuse_bnet` of it (each BNET's normalisation
    folded into its convolutions): the two must agree. Measured with a plain loop over the validation
    batches, not `learn.validate`, which would replay the epoch callbacks (history, TensorBoard, checkpoint)."""
    model = unwrapped(learn.model).eval()
    fp16 = any(isinstance(cb, MixedPrecision) for cb in learn.cbs)
    return {"accuracy": validation_accuracy(model, learn.dls.valid, fp16),
            "fused_accuracy": validation_accuracy(fuse_bnet(model), learn.dls.valid, fp16)}


def _write_config(learn: Learner, config: RunConfig, run_dir: Path) -> None:
    """config.json: the run's settings, its data, its model's size and the environment it ran in."""
    model, dls = learn.model, learn.dls
    atomic_write(run_dir / "config.json", json.dumps({
        "run_id": config.run_id, "config": asdict(config),
        "dataset": {"name": config.dataset, "path": str(dls.path), "n_train": len(dls.train_ds),
                    "n_valid": len(dls.valid_ds), "classes": list(map(str, dls.vocab)),
                    **fashion_mnist.provenance(dls.path)},  # Fashion-MNIST: its source, published files or not
        "model": {"parameters": sum(p.numel() for p in model.parameters()),
                  "parameters_not_decayed": sum(p.numel() for p in no_decay_params(model))},
        "weight_decay_rule": ("every parameter is decayed" if config.wd_norm else
                              "no decay for BN gamma/beta, BNET kernel/bias and any bias; decay for the rest"),
        "training": {"schedule": SCHEDULES[config.schedule],
                     "fp16": any(isinstance(cb, MixedPrecision) for cb in learn.cbs),
                     # what BNET2d computes through here ("auto" resolved; status.json: what its layers ran)
                     "bnet_impl": (resolve_impl(config.bnet_impl, dls.device or "cpu",
                                                any(isinstance(cb, MixedPrecision) for cb in learn.cbs))
                                   if config.norm == "bnet" else None),
                     "world_size": max(num_distrib(), 1),
                     "device": str(dls.device or "cpu")},  # where the batches (and so the model) went
        "environment": _environment()}, indent=1))
