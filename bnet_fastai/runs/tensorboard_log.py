"""TensorBoard scalars of a run, in its run folder: ``tensorboard --logdir results/<experiment>`` compares
every run of the experiment, live.

fastai's `TensorBoardCallback` is a poor fit here: it traces the model graph (refused under mixed
precision), logs every optimizer hyper-parameter of every parameter group at every batch (step = iteration)
and pushes sample predictions through the model after each epoch. A run writes what history.csv holds plus
the learning rate, one point per epoch with step = epoch number, so runs with different numbers of
batches line up.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from fastai.callback.core import Callback
from fastai.learner import Recorder

from bnet_fastai._notice import notice
from bnet_fastai.runs.checkpoint import skipped

_told = False  # the missing extra is said once per process


def tensorboard_installed() -> bool:
    """Whether the `tensorboard` extra is installed (torch's SummaryWriter needs the tensorboard package)."""
    global _told
    if importlib.util.find_spec("tensorboard") is not None:
        return True
    if not _told:
        notice("TensorBoard is not installed: runs write no event files (history.csv holds the same numbers); "
               "pip install 'bnet-fastai[tensorboard]'")
        _told = True
    return False


class TensorBoardScalars(Callback):
    """After each epoch: train_loss, valid_loss, each metric (as history.csv) and lr, at step = epoch number.

    ``lr`` is the learning rate of the epoch's last batch (of the last parameter group, as fastai's `Recorder`
    records it). Events are flushed every epoch so TensorBoard shows a run while it trains.
    """

    order = Recorder.order + 1  # after the Recorder has the epoch's values

    def __init__(self, log_dir: str | Path, first_step: int = 1):
        self.log_dir, self.first_step = Path(log_dir), first_step

    def before_fit(self) -> None:
        # opened here: a run that never fits writes none. A resumed run (first_step > 1) has TensorBoard drop
        # the points an interrupted session wrote at the epochs trained again.
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard extra: see `tensorboard_installed`

        purge = self.first_step if self.first_step > 1 else None
        self.writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=purge)

    def after_epoch(self) -> None:
        if skipped(self.learn):  # a resumed run's epochs finished before: their points are there already
            return
        step = self.epoch + 1
        for name, value in zip(self.recorder.metric_names, self.recorder.log):
            if name not in ("epoch", "time") and value is not None:
                self.writer.add_scalar(name, value, step)
        if self.recorder.lrs:
            self.writer.add_scalar("lr", self.recorder.lrs[-1], step)
        self.writer.flush()

    def after_fit(self) -> None:
        self.writer.close()
