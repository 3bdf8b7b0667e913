"""Sweeps: a grid over any `RunConfig` fields, trained into one experiment folder.

Re-running the same sweep skips runs that are `finished` (or `diverged`) and resumes any other from its last
per-epoch checkpoint (`bnet_fastai.runs.checkpoint`), so a sweep killed at any moment loses at most the epochs in
flight; every finished run's files
stay byte for byte as they were, because a run folder is only ever written by the run that owns it.
A finished run whose files were damaged since (`bnet_fastai.runs.runstate.check_run`) is named, with the damaged
file, and trained again.

Runs train one after another in this process, `parallel` at a time in worker processes (one GPU each where
there are GPUs), or as tasks on a Ray cluster (`bnet_fastai.sweeps.executors`). Whatever trains them, each run is
trained once: a run whose lock another live process holds (another sweep on the same folder) is left to it
and waited for once the other runs are done, then reported as trained by another process.
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol

from bnet_fastai.sweeps import executors
from bnet_fastai._checks import check_output_folder
from bnet_fastai.runs.config import RunConfig, expand_grid
from bnet_fastai.runs.progress import plain_output
from bnet_fastai.runs.runstate import DONE, check_run, raw_status
from bnet_fastai.runs.learner import check_batch_size


class Monitor(Protocol):
    """What a sweep tells the view its caller gives it (`bnet_fastai.app.live.LiveMonitor` in a notebook)."""

    def start(self, configs: list[RunConfig]) -> None: ...

    def run_started(self, config: RunConfig) -> None: ...

    def callbacks(self, config: RunConfig) -> list: ...

    def run_done(self, config: RunConfig, result: dict, line: str | None = None) -> bool: ...


def sweep(base: RunConfig, grid: dict[str, list] | list[dict[str, list]], out: str | Path, force: bool = False,
          live: Monitor | None = None, parallel: int = 1, ray: str | None = None) -> list[dict]:
    """Run every configuration of the grid into `out`; returns each run's final status, in grid order.

    `grid` is a dict of field values (their product) or a list of such dicts (the union; `expand_grid`).

    A run that raises is recorded as `failed` (its status.json says why) and the sweep goes on;
    Ctrl-C or SIGTERM marks the runs in training `interrupted` and stops the sweep. `parallel` trains that many
    runs at a time on this machine; `ray` (``local``, ``auto``, ``ray://HOST:PORT`` or ``HOST:PORT``) makes each
    run a task on that Ray cluster. `live` is the caller's view of the grid (a `Monitor`, e.g. the notebook's
    `bnet_fastai.app.live.LiveMonitor()`: a bar over the grid and a live accuracy figure); None shows none; runs trained outside this process (`parallel` > 1, `ray`) appear in the
    figure when they finish, not epoch by epoch.
    """
    configs = expand_grid(base, grid)  # the whole grid, its output folder and its data are checked first
    check_output_folder(out)
    executor = executors.create(parallel, ray)  # a bad `parallel`, no Ray, an address that does not answer
    for config in {(c.dataset, c.fraction, c.bs): c for c in configs}.values():
        check_batch_size(config)  # downloads each dataset once, before the first run
    position = {c.run_id: i for i, c in enumerate(configs, 1)}
    tag = {c.run_id: f"[{position[c.run_id]}/{len(configs)}] {c.run_id}" for c in configs}
    for config in configs:
        damage = None if force else _damage(Path(out).resolve() / config.run_id)
        if damage:
            print(f"{tag[config.run_id]}: damaged ({damage}): training it again", flush=True)
    monitor = live
    if monitor:
        monitor.start(configs)
    results: dict[str, dict] = {}

    def done(config: RunConfig, result: dict) -> None:
        results[config.run_id] = result
        line = f"{tag[config.run_id]}: {_outcome(result)}"
        # a run trained elsewhere reached no callback: its curve is read from history.csv; a run the live view
        # showed has its bar and epoch table replaced by this line
        shown = monitor and monitor.run_done(config, result if executor.in_process else {**result, "reused": True},
                                             line)
        if not shown:
            print(line, flush=True)

    def started(config: RunConfig) -> None:
        if monitor:  # the grid bar names the run
            monitor.run_started(config)
        elif not plain_output():  # on a terminal fastai's bars follow: name the run above them (off a terminal
            print(tag[config.run_id], flush=True)  # each epoch line names the run: one line per run is enough)

    callbacks = monitor.callbacks if monitor else None
    with executor:
        deferred = []
        for config, result in executor.map(configs, out, force, callbacks=callbacks, started=started):
            if result["status"] == "locked":  # another process trains it: wait once the rest are done
                deferred.append(config)
            else:
                done(config, result)
        if deferred:
            print(f"waiting for {len(deferred)} run(s) that another process is training: "
                  f"{', '.join(c.run_id for c in deferred)}", flush=True)
        # not `force`: the other process has just trained it; if it died instead, the run is trained here
        for config, result in executor.map(deferred, out, wait=True, callbacks=callbacks, started=started):
            done(config, {**result, "by_another_process": True} if result.get("reused") else result)
    return [results[c.run_id] for c in configs]


def _damage(run_dir: Path) -> str | None:
    """Why a run that reads as done (or has a damaged status.json) cannot be reused; None otherwise."""
    status = raw_status(run_dir)
    return check_run(run_dir, status) if status["status"] in (*DONE, "damaged") else None


def _outcome(result: dict) -> str:
    """`finished (reused), accuracy 0.8231, 61 s`, `finished (trained by another process), ...` or
    `failed: <error>`: a run's result in one line."""
    text = result["status"]
    if result.get("by_another_process"):
        text += " (trained by another process)"
    elif result.get("reused"):
        text += " (reused)"
    elif result.get("resumed_from_epoch"):
        text += f" (resumed from epoch {result['resumed_from_epoch']})"
    if result.get("final_accuracy") is not None:
        text += f", accuracy {result['final_accuracy']:.4f}"
    if result.get("seconds") is not None:
        text += f", {result['seconds']:.0f} s"
    return text + (f": {result['error']}" if result.get("error") else "")
