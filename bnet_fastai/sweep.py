"""Sweeps: a grid over any `RunConfig` fields, run one after another into one experiment folder.

Re-running the same sweep skips runs that are `finished` (or `diverged`) and restarts any other, so a
sweep killed at any moment is resumed by running the same command again; every finished run's files
stay byte for byte as they were, because a run folder is only ever written by the run that owns it.
"""
from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

from .data import prepare
from .train import RunConfig, run


def expand_grid(base: RunConfig, grid: dict[str, list]) -> list[RunConfig]:
    """Every combination of `grid` values applied to `base`, validated before anything runs."""
    names = {f.name for f in dataclasses.fields(RunConfig)}
    unknown = sorted(set(grid) - names)
    if unknown:
        raise ValueError(f"unknown RunConfig field(s) {', '.join(unknown)}; valid fields: {', '.join(sorted(names))}")
    keys = list(grid)
    configs = [dataclasses.replace(base, **dict(zip(keys, values)))
               for values in itertools.product(*(grid[k] for k in keys))]
    for config in configs:
        config.validate()
    # the same run twice in one grid (k varied for norm="bn": same run_id) is trained once
    return list({c.run_id: c for c in configs}.values())


def sweep(base: RunConfig, grid: dict[str, list], out: str | Path, force: bool = False) -> list[dict]:
    """Run every configuration of the grid into `out`; returns each run's final status.

    A run that raises is recorded as `failed` (its status.json says why) and the sweep goes on;
    Ctrl-C or SIGTERM marks the current run `interrupted` and stops the sweep.
    """
    configs = expand_grid(base, grid)
    for dataset in dict.fromkeys(c.dataset for c in configs):
        prepare(dataset)  # one download per dataset, before the first run
    results = []
    for i, config in enumerate(configs, 1):
        print(f"[{i}/{len(configs)}] {config.run_id}", flush=True)
        try:
            results.append(run(config, out, force=force))
        except Exception as e:  # noqa: BLE001  (one failed run must not stop the grid; status.json has it)
            results.append({"status": "failed", "error": f"{type(e).__name__}: {e}",
                            "run_dir": str(Path(out).resolve() / config.run_id)})
        last = results[-1]
        print(f"[{i}/{len(configs)}] {config.run_id}: {last['status']}{' (reused)' if last.get('reused') else ''}"
              f"{': ' + last['error'] if last.get('error') else ''}", flush=True)
    return results
