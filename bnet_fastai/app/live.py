"""The live view of a sweep in a notebook: one bar over the runs of the grid (runs done of total, elapsed,
ETA) above fastai's per-epoch bars, and a figure of validation accuracy per epoch of every finished and
running run — one panel per arch, BN always blue, each BNET variant its own colour — redrawn in place after
every epoch. Runs reused from an earlier sweep appear from their history.csv.

Both are display handles updated in place (IPython's ``display(..., display_id=True)`` / ``.update``); the
`display` argument of `LiveMonitor` swaps them for anything with an ``update`` method (tests count updates).

Below them, the run in progress shows fastai's bar and epoch table; when it ends, that output is replaced by
the run's one-line outcome, so a finished run leaves one line (its numbers are in the figure, history.csv and
the report) and the bar and figure stay in view however many runs the grid has.
"""
from __future__ import annotations

import dataclasses
import html
import io
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import pandas as pd
from fastai.callback.core import Callback
from fastai.callback.progress import ProgressCallback
from fastai.learner import Recorder
from fastprogress.fastprogress import format_time, html_progress_bar

from bnet_fastai.runs.checkpoint import skipped
from bnet_fastai.analysis.report import variant

if TYPE_CHECKING:
    from bnet_fastai.runs.config import RunConfig


class Handle(Protocol):
    def update(self, obj: object) -> None: ...


def ipython_display(obj: object) -> Handle:
    """Show `obj` in the notebook; the returned handle replaces it in place."""
    from IPython.display import DisplayHandle

    handle = DisplayHandle()
    handle.display(obj)
    return handle


class _AccuracyFeed(Callback):
    """Hands each epoch's validation accuracy of one run to its `LiveMonitor`."""

    order = Recorder.order + 1  # after the Recorder has the epoch's values

    def __init__(self, monitor: LiveMonitor, config: RunConfig):
        self.monitor, self.config = monitor, config

    def after_epoch(self) -> None:
        if skipped(self.learn):  # a resumed run's earlier epochs: fastai skips them, they have no values
            return
        values = dict(zip(self.recorder.metric_names[1:], self.recorder.values[-1]))
        self.monitor.epoch_done(self.config, float(values["accuracy"]))


class _KeepRunOutput(Callback):
    """Keeps the display handle of fastai's notebook bar and epoch table of one run (fastai's
    `ProgressCallback` forgets it at the end of the fit), so the monitor can replace that output with the
    run's one-line outcome."""

    order = ProgressCallback.order - 1  # its after_fit drops the bar: take the handle just before

    def __init__(self, monitor: LiveMonitor, config: RunConfig):
        self.monitor, self.config = monitor, config

    def after_fit(self) -> None:
        handle = getattr(getattr(getattr(self.learn, "progress", None), "mbar", None), "out", None)
        if handle is not None:
            self.monitor.run_outputs[self.config.run_id] = handle


class LiveMonitor:
    """A sweep's grid bar and live accuracy figure; `sweep(..., live=LiveMonitor())` drives it (the
    notebook's `run_study(study, out, live=LiveMonitor())`).

    `display(obj)` shows a first version of an output and returns its handle (default: IPython's).
    The sweep calls `start` once, `run_started` as a run begins, passes `callbacks(config)` to each run and
    `run_done` after each.
    """

    def __init__(self, display: Callable[[object], Handle] = ipython_display, dpi: int = 80):
        self.display, self.dpi = display, dpi

    def start(self, configs: list[RunConfig]) -> None:
        """Show the bar at 0 of len(configs) runs and the empty figure, one panel per arch."""
        self.configs = {c.run_id: c for c in configs}
        self.curves: dict[str, list[float]] = {}  # run_id -> validation accuracy per epoch
        self.finished: set[str] = set()
        self.run_outputs: dict[str, Handle] = {}  # run_id -> fastai's bar and table of a run that just ended
        self.current, self.trained_epochs, self.started = "", 0, time.time()
        variants = sorted({variant(dataclasses.asdict(c)) for c in configs})  # "bn" first when present
        others = [v for v in variants if v != "bn"]
        self.colours = {v: "C0" if v == "bn" else f"C{1 + others.index(v) % 9}" for v in variants}  # C0 is blue
        self.bar, self.figure = self.display(self._bar()), self.display(self._figure())

    def callbacks(self, config: RunConfig) -> list[Callback]:
        """The fastai callbacks that feed run `config`'s epochs into this view."""
        return [_AccuracyFeed(self, config), _KeepRunOutput(self, config)]

    def run_started(self, config: RunConfig) -> None:
        """Name the run in the bar as it begins (its data, checkpoint, first epoch)."""
        self.current = f"{config.run_id} starting"
        self.bar.update(self._bar())

    def epoch_done(self, config: RunConfig, accuracy: float) -> None:
        """Add an epoch to the running run's curve; redraw bar and figure."""
        curve = self.curves.setdefault(config.run_id, [])
        curve.append(accuracy)
        self.trained_epochs += 1
        self.current = f"{config.run_id} epoch {len(curve)}/{config.epochs}"
        self.bar.update(self._bar())
        self.figure.update(self._figure())

    def run_done(self, config: RunConfig, result: dict, line: str | None = None) -> bool:
        """Count the run as done (a reused run's curve comes from its history.csv) and replace its fastai bar
        and table with `line`; False when it showed none (reused, trained elsewhere): print `line` then."""
        self.finished.add(config.run_id)
        self.current = ""
        if result.get("reused"):
            history = Path(result["run_dir"]) / "history.csv"
            self.curves[config.run_id] = pd.read_csv(history)["accuracy"].tolist() if history.exists() else []
            self.figure.update(self._figure())
        self.bar.update(self._bar())
        output = self.run_outputs.pop(config.run_id, None)
        if output is None or line is None:
            return False
        from IPython.display import HTML

        output.update(HTML(f"<div>{html.escape(line)}</div>"))
        return True

    def _bar(self) -> object:
        done, total = len(self.finished), len(self.configs)
        elapsed = time.time() - self.started
        eta = "?"
        if self.trained_epochs:  # seconds per trained epoch (reused runs cost none) times the epochs left
            left = sum(c.epochs - len(self.curves.get(run_id, [])) for run_id, c in self.configs.items()
                       if run_id not in self.finished)
            eta = format_time(elapsed / self.trained_epochs * left)
        label = f"{done}/{total} runs, {format_time(elapsed)} elapsed, ETA {eta}"
        return html_progress_bar(done, total, label + (f" | {self.current}" if self.current else ""))

    def _figure(self) -> object:
        from IPython.display import Image
        from matplotlib.figure import Figure
        from matplotlib.lines import Line2D

        from bnet_fastai.analysis.plots import integer_epochs

        archs = list(dict.fromkeys(c.arch for c in self.configs.values()))
        fig = Figure(figsize=(4.2 * len(archs), 3.4), layout="constrained")
        axes = fig.subplots(1, len(archs), squeeze=False, sharey=True)[0]
        for run_id, curve in self.curves.items():
            config = self.configs[run_id]
            colour = self.colours[variant(dataclasses.asdict(config))]
            axes[archs.index(config.arch)].plot(range(1, len(curve) + 1), curve, marker="o", ms=3, color=colour)
        last = max(c.epochs for c in self.configs.values())
        for ax, arch in zip(axes, archs):
            ax.set(title=arch, xlabel="epoch", xlim=(0.8, last + 0.2))
            integer_epochs(ax)
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("validation accuracy")
        axes[0].legend(handles=[Line2D([], [], color=c, marker="o", ms=3, label=v) for v, c in self.colours.items()],
                       fontsize=8, loc="lower right")
        studies = ", ".join(dict.fromkeys(f"{c.dataset}, {c.size} px" for c in self.configs.values()))
        fig.suptitle(f"Validation accuracy per epoch — {studies}", fontsize=9)
        png = io.BytesIO()
        fig.savefig(png, format="png", dpi=self.dpi)
        return Image(data=png.getvalue())
