"""The state of a run folder: `status.json`, written atomically, and a lock held while the run trains.

``status.json`` is ``running`` while a run trains and is replaced, atomically, by ``finished``,
``diverged``, ``failed`` or ``interrupted``, so a crash or a kill never leaves a run that looks finished.
Whether a ``running`` run is really alive is told by its lock, ``<out>/.<run_id>.lock``, which the training
process holds with ``flock`` and the kernel releases when that process dies, however it dies.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import platform
import time
from collections.abc import Iterator
from pathlib import Path

from ._files import atomic_write

DONE = ("finished", "diverged")  # a sweep does not redo these: a diverged run would diverge again


def _lock_path(run_dir: Path) -> Path:
    return run_dir.parent / f".{run_dir.name}.lock"


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold the run's lock for the block; RuntimeError if another live process holds it."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(_lock_path(run_dir), "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"{run_dir} is being trained by another process: wait for it or stop it") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _lock_held(run_dir: Path) -> bool:
    try:
        with open(_lock_path(run_dir)) as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(f, fcntl.LOCK_UN)
            return False
    except FileNotFoundError:
        return False


def raw_status(run_dir: Path) -> dict:
    """`status.json` as written (``{"status": "missing"}`` if there is none)."""
    try:
        return json.loads((Path(run_dir) / "status.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {"status": "missing"}


def read_status(run_dir: Path) -> dict:
    """The run's status; a `running` run whose lock nobody holds any more reads as `interrupted`."""
    status = raw_status(run_dir)
    if status["status"] == "running" and not _lock_held(Path(run_dir)):
        status = {**status, "status": "interrupted", "reason": "the process ended without writing a status"}
    return status


def write_status(run_dir: Path, status: str, **extra) -> None:
    """Replace `status.json` atomically."""
    atomic_write(Path(run_dir) / "status.json", json.dumps(
        {"status": status, "pid": os.getpid(), "host": platform.node(), "time": time.time(), **extra}, indent=1))
