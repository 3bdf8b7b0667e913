"""How a run shows its progress on the console: fastai's bars on a terminal and in a notebook, one plain
line per epoch anywhere else (nohup, a cluster job, a pipe into a log file).

fastprogress decides "terminal" with ``getattr(stdout, 'isatty', False)`` — the method itself, which is
always true — so off a terminal its console bars write carriage returns and half-drawn bars into the log,
and fastai's epoch table comes out in between. `plain_output` asks ``sys.stdout.isatty()`` instead.
"""
from __future__ import annotations

import sys

import fastprogress.fastprogress
from fastai.callback.core import Callback
from fastai.callback.progress import ProgressCallback
from fastai.learner import Learner
from fastcore.imports import IN_NOTEBOOK


def plain_output() -> bool:
    """True when stdout is neither a terminal nor a notebook (the same notebook test fastprogress uses)."""
    return not IN_NOTEBOOK and not sys.stdout.isatty()


def _format(value: object) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


class EpochLines(Callback):
    """One plain line per epoch: ``<run_name> epoch 2/5 train_loss 0.6123 valid_loss 0.5012 ... time 00:14``.

    fastai's `Recorder` hands each epoch's values to ``learn.logger``, which `ProgressCallback` turns into its
    table; this callback takes that hook over instead, so the values are printed once, in the same order.
    `CSVLogger` wraps whichever logger it finds, so history.csv is written as before.
    """

    order = ProgressCallback.order - 1  # before CSVLogger (same order as ProgressCallback) wraps the logger

    def __init__(self, run_name: str):
        self.run_name = run_name

    def before_fit(self) -> None:
        self.old_logger, self.learn.logger = self.learn.logger, self._print

    def after_fit(self) -> None:
        self.learn.logger = self.old_logger

    def _print(self, log: list) -> None:
        epoch, *values = log
        fields = " ".join(f"{name} {_format(v)}" for name, v in zip(self.recorder.metric_names[1:], values))
        print(f"{self.run_name} epoch {epoch + 1}/{self.n_epoch} {fields}", flush=True)


def show_progress(learn: Learner, name: str, main_process: bool = True) -> None:
    """Keep fastai's bars on a terminal or in a notebook; elsewhere replace them with `EpochLines(name)`,
    printed by the main process only (the other ranks of a distributed run print nothing)."""
    if plain_output():
        learn.remove_cb(ProgressCallback)
        if main_process:
            learn.add_cb(EpochLines(name))


def plain_download_bars() -> None:
    """Off a terminal and a notebook, switch off fastprogress's console bars everywhere (fastdownload's
    download bar, for one), so a log file gets no carriage returns while a dataset downloads."""
    if plain_output():
        fastprogress.fastprogress.NO_BAR = True
