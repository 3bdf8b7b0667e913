"""Per-epoch checkpoints of a run, resuming from them, and the weights a finished run keeps.

After every epoch `EpochCheckpoint` saves ``<run_dir>/checkpoint.pth``, atomically (a temporary file, fsync,
rename: a kill during the write leaves the previous checkpoint in place, never a broken one; Ctrl-C and
SIGTERM wait until the write is done). It holds
everything the next epoch depends on:

- the model's and the optimizer's state (fastai's `Optimizer.state_dict`: Adam's moments, the per-parameter
  ``do_wd`` flags), and the mixed-precision `GradScaler`'s state when there is one;
- the number of finished epochs and fastai's training-iteration counter;
- the smoothed training loss the `Recorder` carries from epoch to epoch (the ``train_loss`` column);
- every random state the next epoch draws from: python's `random` (fastai's augmentation and our cached
  pipeline), numpy's, torch's CPU and CUDA generators (dropout, DataLoader worker seeds), and the shuffling
  generator of each fastai DataLoader (``dl.rng``);
- the run it belongs to: its ``run_id`` and the settings that define it. A checkpoint is resumed only by
  that run (`load_checkpoint`); one that is not resumed (another run's, damaged, from an incompatible
  model) is moved to ``<out>/.set-aside/`` with one line saying why, and the run trains from the start.

`Resume` puts a checkpoint back into a freshly built Learner and lets fastai skip the finished epochs
(`Learner.fit(..., start_epoch=k)`'s `SkipToEpoch`, given to either schedule through ``cbs``: fastai 2.8's
`fit_flat_cos` drops its own ``start_epoch``). With every state above restored, a resumed run on a CPU ends
with exactly the weights and history values of an uninterrupted run (tests/test_resume.py). DataLoader
worker processes are seeded from torch's generator, so that holds with workers too, unless they are
persistent (ours are not).

A finished run keeps ``model.pth`` (the model's state_dict) and drops its checkpoint; see `load_model`.
"""
from __future__ import annotations

import contextlib
import io
import os
import random
import signal
import threading
import time
from pathlib import Path

import numpy as np
import torch
from fastai.callback.core import Callback
from fastai.callback.progress import CSVLogger
from fastai.learner import Learner, Recorder, SkipToEpoch

from bnet_fastai._checks import check_type
from bnet_fastai._files import atomic_file
from bnet_fastai._notice import notice

CHECKPOINT, WEIGHTS = "checkpoint.pth", "model.pth"


def unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The model itself, without DDP's wrapper or torch.compile's."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def atomic_save(obj: object, path: Path) -> None:
    """`torch.save` that readers (and a later resume) see whole or not at all.

    Serialised in memory, then written by Python: torch's zip writer reports a full disk as
    ``unexpected pos …``, Python as ``OSError(ENOSPC)``, which names the cause (`_files.file_fault`)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with atomic_file(path, "wb") as f:
        f.write(buffer.getbuffer())


@contextlib.contextmanager
def signals_held():
    """Hold Ctrl-C and SIGTERM until the block is done (they are raised right after), so neither cuts a
    checkpoint short: the epoch that just finished is saved before the run stops. Main thread only (where
    Python runs signal handlers); elsewhere the block runs as is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    held = [s for s in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(s) is not None]  # None: not Python's
    previous = {s: signal.signal(s, lambda signum, frame: pending.append(signum)) for s in held}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for s in pending:
            signal.raise_signal(s)


def _loaders(learn: Learner) -> list:
    """The DataLoaders whose ``rng`` shuffles batches (inside a distributed wrapper, the wrapped one too)."""
    found = []
    for dl in learn.dls.loaders:
        found += [d for d in (dl, getattr(dl, "dl", None)) if hasattr(d, "rng")]
    return found


def random_states(learn: Learner) -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,  # this process's GPU
            "loaders": [dl.rng.getstate() for dl in _loaders(learn)]}


def set_random_states(learn: Learner, states: dict) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if torch.cuda.is_available() and isinstance(states["cuda"], torch.Tensor):
        torch.cuda.set_rng_state(states["cuda"])
    for dl, state in zip(_loaders(learn), states["loaders"]):
        dl.rng.setstate(state)


class EpochCheckpoint(Callback):
    """Save ``checkpoint.pth`` after every epoch (rank 0 only: give it to that process alone)."""

    order = Recorder.order + 5  # after the Recorder wrote the epoch's history row and TensorBoard its scalars

    def __init__(self, run_dir: Path, seconds_before: float = 0.0, run: dict | None = None):
        self.path, self.seconds_before, self.run = Path(run_dir) / CHECKPOINT, seconds_before, run or {}

    def before_fit(self) -> None:
        self.started = time.time()

    def after_epoch(self) -> None:
        if skipped(self.learn):
            return
        smooth = self.recorder.smooth_loss
        scaler = getattr(self.learn, "scaler", None)
        seconds = self.seconds_before + time.time() - self.started  # training time over every session
        state = {"run": self.run, "epochs_done": self.epoch + 1, "train_iter": self.train_iter, "seconds": seconds,
                 "model": unwrapped(self.model).state_dict(), "opt": self.opt.state_dict(),
                 "scaler": scaler.state_dict() if scaler is not None else None,
                 "smooth_loss": (smooth.count, smooth.val), "random": random_states(self.learn)}
        with signals_held():
            atomic_save(state, self.path)


class Resume(Callback):
    """Continue a run from `state` (a loaded checkpoint): fastai skips its finished epochs; the states that
    the first unfinished epoch depends on are restored just before it trains."""

    order = SkipToEpoch.order + 1  # runs after the skip decision: only for epochs that really train

    def __init__(self, state: dict):
        self.state, self.restored = state, False

    def before_fit(self) -> None:
        _state_to_params_device(self.opt)  # fastai has just moved the model to its device; not the state
        scaler = getattr(self.learn, "scaler", None)  # MixedPrecision makes it in its own before_fit
        if scaler is not None and self.state["scaler"] is not None:
            scaler.load_state_dict(self.state["scaler"])

    def before_train(self) -> None:
        if self.restored:
            return
        self.restored = True
        # fastai works out the number of inputs from one item the first time a batch is split, drawing that
        # item's augmentation from `random`; an uninterrupted run did that in its first epoch: do it now
        getattr(self.dls, "n_inp", None)
        smooth = self.recorder.smooth_loss
        smooth.count, smooth.val = self.state["smooth_loss"]
        self.learn.train_iter = self.state["train_iter"]
        set_random_states(self.learn, self.state["random"])


def _state_to_params_device(opt) -> None:
    """Put the optimizer's per-parameter state (Adam's moments; Lookahead's slow weights, for ranger) on the
    device of its parameter: a checkpoint is loaded on the CPU, a GPU run's parameters live on the GPU."""
    for p, *_ in opt.all_params():
        opt.state[p] = {k: v.to(p.device) if torch.is_tensor(v) else v for k, v in opt.state[p].items()}
    if getattr(opt, "slow_weights", None) is not None:  # fastai's Lookahead keeps them outside `state`
        opt.slow_weights = type(opt.slow_weights)([[w.to(p.device) for w, p in zip(ws, ps)]
                                                   for ws, ps in zip(opt.slow_weights, opt.param_lists)])


def skipped(learn: Learner) -> bool:
    """True in the after_epoch of an epoch fastai skipped because a resumed run had finished it already."""
    skip = next((cb for cb in learn.cbs if isinstance(cb, SkipToEpoch)), None)
    return skip is not None and learn.epoch < skip._skip_to


class QuietSkippedEpochs(Callback):
    """fastai's `Recorder` still hands a skipped epoch's (empty) values to ``learn.logger``: drop them, so
    history.csv and the epoch lines only get the epochs that trained."""

    order = 65  # after CSVLogger and the progress callbacks (60) installed their loggers

    def before_fit(self) -> None:
        logger = self.learn.logger
        self.learn.logger = lambda log: None if skipped(self.learn) else logger(log)


class AppendingCSVLogger(CSVLogger):
    """fastai's `CSVLogger` continuing a resumed run's history.csv: appends rows, writes no second header."""

    def __init__(self, fname: str = "history.csv"):
        super().__init__(fname, append=True)

    def before_fit(self) -> None:
        self.file = (self.path / self.fname).open("a")
        self.old_logger, self.learn.logger = self.logger, self._write_line


def load_checkpoint(run_dir: Path, run_id: str) -> tuple[dict | None, str | None]:
    """The run's own checkpoint and None, or None and why the file there cannot be resumed (None, None: none).

    Resumed only if it reads whole and records `run_id`: a checkpoint copied from another run (another seed,
    another norm) or written before checkpoints recorded their run is not this run's history.
    """
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        return None, None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001  (whatever torch raises on a damaged file: start over instead)
        return None, f"it cannot be read ({type(e).__name__}: {one_line(e)})"
    if not (isinstance(state, dict) and {"epochs_done", "model", "opt", "random"} <= set(state)):
        return None, "it is not a checkpoint of this package"
    owner = (state.get("run") or {}).get("run_id")
    if owner is None:
        return None, "it records no run (written before checkpoints named their run)"
    if owner != run_id:
        return None, f"it belongs to run {owner}"
    return state, None


def set_aside(run_dir: Path, why: str) -> Path:
    """Move `run_dir`'s checkpoint to ``<out>/.set-aside/`` (kept for inspection, never resumed) and say so."""
    run_dir = Path(run_dir)
    stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{time.time_ns() % 10**9:09d}"  # two set aside in a second differ
    dest = run_dir.parent / ".set-aside" / f"{run_dir.name}.{stamp}.{CHECKPOINT}"
    dest.parent.mkdir(exist_ok=True)
    (run_dir / CHECKPOINT).replace(dest)
    notice(f"{run_dir.name}: not resuming from {CHECKPOINT}: {why}; moved to {dest}, training from the start")
    return dest


def one_line(error: BaseException, width: int = 160) -> str:
    """An exception's message cut to one line: a state_dict mismatch lists every key over many lines."""
    text = (str(error).strip().splitlines() or [""])[0]
    return text if len(text) <= width else text[:width - 3] + "..."


def restore(learn: Learner, state: dict) -> None:
    """Load the checkpoint's model and optimizer state into `learn` (before fitting)."""
    unwrapped(learn.model).load_state_dict(state["model"])
    if learn.opt is None:
        learn.create_opt()
    learn.opt.load_state_dict(state["opt"])


def save_weights(learn: Learner, run_dir: Path) -> None:
    """The finished run's weights, ``model.pth``: the model's state_dict, on the CPU."""
    model = unwrapped(learn.model)
    atomic_save({k: v.detach().cpu() for k, v in model.state_dict().items()}, Path(run_dir) / WEIGHTS)


def load_model(run_dir: str | Path) -> torch.nn.Module:
    """A finished run's model, rebuilt from its config.json with `create_model` and loaded from model.pth.

    Only the weights the run wrote are loaded: a run that did not finish, a missing or unreadable model.pth, or
    one whose size or sha256 differs from the record in status.json (another run's file copied in) raises
    ValueError in one line naming the run, its status and what to do."""
    import json

    from bnet_fastai.nn.models import create_model
    from bnet_fastai.runs.runstate import file_differs, read_status

    check_type("load_model", "a run folder (a path)", run_dir, (str, os.PathLike),
               "pass <out>/<run_id>, e.g. load_model('results/<run_id>')")
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        runs = sorted(p.parent for p in run_dir.glob("*/config.json"))
        if runs:
            raise ValueError(f"{run_dir} is an experiment folder ({len(runs)} runs), not a run: pass one run "
                             f"folder, e.g. load_model({str(runs[0])!r})")
        raise ValueError(f"{run_dir} is not a run folder (it has no config.json): pass <out>/<run_id>")
    status = read_status(run_dir)
    if status["status"] != "finished":
        why = status.get("error") or status.get("reason")
        raise ValueError(f"{run_dir.name} is {status['status']}{f' ({why})' if why else ''}: it has no trained "
                         f"weights to load; run it again (the same command resumes it)")
    weights = run_dir / WEIGHTS
    if not weights.is_file():
        raise ValueError(f"{run_dir.name} finished without {WEIGHTS} (trained with keep_weights=False, or the file "
                         f"was removed): train it again with --force to get its weights")
    differs = file_differs(run_dir, WEIGHTS, status)
    if differs:
        raise ValueError(f"{run_dir.name}: {differs}: it is not the file this run wrote; put the run's own back "
                         f"or train it again with --force")
    saved = json.loads((run_dir / "config.json").read_text())
    c = saved["config"]
    model = create_model(c["arch"], c["norm"], n_out=len(saved["dataset"]["classes"]), placement=c["placement"],
                         k=c["k"], act=c["act"], bnet_init=c["bnet_init"], sa=c.get("sa", False),
                         pool=c.get("pool", "avg"))
    try:
        state = torch.load(weights, map_location="cpu")
    except Exception as e:  # torch's zip reader: "failed finding central directory", "unexpected EOF", ...
        raise ValueError(f"{run_dir.name}: {WEIGHTS} cannot be read ({one_line(e)}); train the run again with "
                         f"--force") from None
    model.load_state_dict(state)
    return model.eval()
