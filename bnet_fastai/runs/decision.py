"""What a run does with its folder, decided before it trains: reuse the finished run, resume it from its
checkpoint, or train it from the start (another live process holding its lock: `RunLocked`).

Rank 0 decides (`decide`) and, under a distributed launch, tells the other ranks (`distributed.share_decision`),
which build the same Learner and read the same checkpoint (`follow`).
"""
from __future__ import annotations

import contextlib
from pathlib import Path

from fastai.torch_core import rank_distrib

from bnet_fastai.runs.checkpoint import CHECKPOINT, load_checkpoint, one_line, restore, set_aside
from bnet_fastai.runs.config import RunConfig
from bnet_fastai.runs.learner import build_learner, check_batch_size
from bnet_fastai.runs.runstate import DONE, RunFailed, check_run, history_rows, lock_path, raw_status, run_lock, write_status


def decide(config: RunConfig, run_dir: Path, force: bool, wait: bool,
            lock: contextlib.ExitStack) -> tuple[dict, tuple | None]:
    """Rank 0's decision: reuse the finished run, or train it from `start_epoch` — then with the Learner
    built and, when resuming, its checkpoint restored: ``(learn, divergence, checkpoint or None)``."""
    check_batch_size(config)  # prepares the dataset: bad input raises before the folder is touched
    out_existed, lock_existed = run_dir.parent.is_dir(), lock_path(run_dir).exists()
    lock.enter_context(run_lock(run_dir, wait))
    previous = raw_status(run_dir)  # under the lock a "running" status is stale
    status, damage = previous["status"], None
    if status in DONE and not force:
        damage = check_run(run_dir, previous)
        if damage is None:
            (run_dir / CHECKPOINT).unlink(missing_ok=True)  # left by a kill just after the run finished
            return {"action": "reuse", "result": {**previous, "run_dir": str(run_dir), "reused": True}}, None
    state, why = (None, None) if force or status in DONE else load_checkpoint(run_dir, config.run_id)
    if state and history_rows(run_dir) < state["epochs_done"]:  # history lost rows: it cannot continue
        state, why = None, f"history.csv has fewer rows than its {state['epochs_done']} epochs"
    if why:
        set_aside(run_dir, why)
    try:
        learn, divergence = build_learner(config)  # builds the dataset's cache too, before the other ranks
        if state:
            try:
                restore(learn, state)
            except Exception as e:  # noqa: BLE001  (e.g. another model's weights: start over)
                set_aside(run_dir, f"it does not fit this run's model or optimizer ({type(e).__name__}: "
                                   f"{one_line(e)})")
                state = None
                learn, divergence = build_learner(config)
    except ValueError:  # bad input: the output folder is left as it was
        if not lock_existed:
            lock_path(run_dir).unlink(missing_ok=True)
        if not out_existed:
            with contextlib.suppress(OSError):
                run_dir.parent.rmdir()
        raise
    except Exception as e:
        if status not in DONE:
            run_dir.mkdir(parents=True, exist_ok=True)
            write_status(run_dir, "failed", error=f"{type(e).__name__}: {e}")
        raise
    decision = {"action": "train", "start_epoch": state["epochs_done"] if state else 0, "damage": damage}
    return decision, (learn, divergence, state)


def follow(config: RunConfig, run_dir: Path, start: int) -> tuple:
    """A rank other than 0: the Learner, and the checkpoint rank 0 resumes from (every rank must read the same
    one: `out` is a folder they all share)."""
    learn, divergence = build_learner(config)
    state = load_checkpoint(run_dir, config.run_id)[0] if start else None
    if start and (state is None or state["epochs_done"] != start):
        raise RunFailed(f"rank {rank_distrib()} cannot read the checkpoint of epoch {start} that rank 0 resumes "
                        f"from in {run_dir}: give every rank the same --out folder")
    if state:
        restore(learn, state)
    return learn, divergence, state
