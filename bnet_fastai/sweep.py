"""Sweeps: a grid over any `RunConfig` fields, run one after another into one experiment folder.

Re-running the same sweep skips runs that are `finished` (or `diverged`) and restarts any other, so a
sweep killed at any moment is resumed by running the same command again; every finished run's files
stay byte for byte as they were, because a run folder is only ever written by the run that owns it.
A finished run whose files were damaged since (`bnet_fastai.runstate.check_run`) is named, with the damaged
file, and trained again.
"""
from __future__ import annotations

from pathlib import Path

from ._checks import check_output_folder
from .config import RunConfig, expand_grid
from .live import LiveMonitor, live_monitor
from .progress import plain_output
from .runstate import DONE, check_run, raw_status
from .train import check_batch_size, run


def sweep(base: RunConfig, grid: dict[str, list], out: str | Path, force: bool = False,
          live: bool | LiveMonitor | None = None) -> list[dict]:
    """Run every configuration of the grid into `out`; returns each run's final status.

    A run that raises is recorded as `failed` (its status.json says why) and the sweep goes on;
    Ctrl-C or SIGTERM marks the current run `interrupted` and stops the sweep. `live` shows a bar over the
    grid and a live accuracy figure (`bnet_fastai.live`): None shows them in a notebook only, True or False
    always or never, or pass a `LiveMonitor` of your own.
    """
    configs = expand_grid(base, grid)  # the whole grid, its output folder and its data are checked first
    check_output_folder(out)
    for config in {(c.dataset, c.fraction, c.bs): c for c in configs}.values():
        check_batch_size(config)  # downloads each dataset once, before the first run
    monitor = live_monitor(live)
    if monitor:
        monitor.start(configs)
    results = []
    for i, config in enumerate(configs, 1):
        if not plain_output():  # off a terminal each epoch line names the run: one line per run is enough
            print(f"[{i}/{len(configs)}] {config.run_id}", flush=True)
        damage = None if force else _damage(Path(out).resolve() / config.run_id)
        if damage:
            print(f"[{i}/{len(configs)}] {config.run_id}: damaged ({damage}): training it again", flush=True)
        try:
            results.append(run(config, out, force=force, cbs=monitor.callbacks(config) if monitor else None))
        except Exception as e:  # noqa: BLE001  (one failed run must not stop the grid; status.json has it)
            results.append({"status": "failed", "error": f"{type(e).__name__}: {e}",
                            "run_dir": str(Path(out).resolve() / config.run_id)})
        if monitor:
            monitor.run_done(config, results[-1])
        print(f"[{i}/{len(configs)}] {config.run_id}: {_outcome(results[-1])}", flush=True)
    return results


def _damage(run_dir: Path) -> str | None:
    """Why a run that reads as done (or has a damaged status.json) cannot be reused; None otherwise."""
    status = raw_status(run_dir)
    return check_run(run_dir, status) if status["status"] in (*DONE, "damaged") else None


def _outcome(result: dict) -> str:
    """`finished (reused), accuracy 0.8231, 61 s` or `failed: <error>`: a run's result in one line."""
    text = result["status"] + (" (reused)" if result.get("reused") else "")
    if result.get("final_accuracy") is not None:
        text += f", accuracy {result['final_accuracy']:.4f}"
    if result.get("seconds") is not None:
        text += f", {result['seconds']:.0f} s"
    return text + (f": {result['error']}" if result.get("error") else "")
