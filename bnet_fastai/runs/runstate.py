"""The state of a run folder: `status.json`, written atomically, and a lock held while the run trains.

``status.json`` is ``running`` while a run trains and is replaced, atomically, by ``finished``,
``diverged``, ``failed`` or ``interrupted``, so a crash or a kill never leaves a run that looks finished.
Whether a ``running`` run is really alive is told by its lock, ``<out>/.<run_id>.lock``, which the training
process holds with ``flock`` and the kernel releases when that process dies, however it dies.

A finished (or diverged) run's status also records what its files must be (`file_record`: size and sha256 of
``history.csv``, ``config.json``, ``kernels.json`` and ``model.pth``, and the number of history rows; the
weights may be deleted to save disk, but not altered), so a file damaged
later is caught (`check_run`) before a sweep reuses the run or a report counts it. Runs written before that
record existed are checked by parsing: complete history rows, as many as epochs, and readable JSON.
"""
from __future__ import annotations

import contextlib
import csv
import fcntl
import hashlib
import json
import math
import os
import platform
import time
from collections.abc import Iterator
from pathlib import Path

from bnet_fastai._files import atomic_write

DONE = ("finished", "diverged")  # a sweep does not redo these: a diverged run would diverge again
# the files a finished run's status vouches for; model.pth may be deleted to save disk (the results stand)
RECORDED = ("history.csv", "config.json", "kernels.json", "model.pth")
OPTIONAL = ("model.pth",)
HISTORY_COLUMNS = ("epoch", "train_loss", "valid_loss", "accuracy", "time")  # fastai CSVLogger's columns
CONFIG_KEYS = ("arch", "norm", "k", "placement", "seed", "dataset", "size", "epochs")  # what a report reads


class RunFailed(RuntimeError):
    """Training itself failed (not the configuration); the run's status.json holds the error."""


class RunLocked(RuntimeError):
    """Another live process holds the run's lock: it is training that run now."""


def lock_path(run_dir: Path) -> Path:
    return run_dir.parent / f".{run_dir.name}.lock"


@contextlib.contextmanager
def run_lock(run_dir: Path, wait: bool = False) -> Iterator[None]:
    """Hold the run's lock for the block: `RunLocked` if another live process holds it, or with `wait`, block
    until that process is done."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path(run_dir), "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise RunLocked(f"{run_dir} is being trained by another process: wait for it or stop it") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _lock_held(run_dir: Path) -> bool:
    try:
        with open(lock_path(run_dir)) as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(f, fcntl.LOCK_UN)
            return False
    except FileNotFoundError:
        return False


def raw_status(run_dir: Path) -> dict:
    """`status.json` as written: ``{"status": "missing"}`` if there is none, ``"damaged"`` (with the
    reason) if it is unreadable or has no status."""
    try:
        status = json.loads((Path(run_dir) / "status.json").read_text())
    except FileNotFoundError:
        return {"status": "missing"}
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {"status": "damaged", "reason": "status.json: not valid JSON"}
    if not isinstance(status, dict) or not isinstance(status.get("status"), str):
        return {"status": "damaged", "reason": "status.json: no status entry"}
    return status


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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _history_rows(path: Path, allow_nan: bool) -> int:
    """The number of complete rows of a fastai history.csv; ValueError (without the file name) if any is not."""
    text = path.read_text(encoding="utf-8")
    if not text.endswith("\n"):  # CSVLogger ends every line with a newline: anything else was cut
        raise ValueError("empty" if not text else "last row cut short (no line end)")
    rows = list(csv.reader(text.splitlines()))
    header = rows[0]
    missing = [c for c in HISTORY_COLUMNS if c not in header]
    if missing:
        raise ValueError(f"no column {', '.join(missing)}")
    for number, row in enumerate(rows[1:]):
        if len(row) != len(header) or "" in row:
            raise ValueError(f"row {number + 1} is incomplete")
        values = dict(zip(header, row))
        try:
            numbers = [float(values[c]) for c in ("train_loss", "valid_loss", "accuracy")]
            time_parts = [float(p) for p in values["time"].split(":")]
            epoch = int(values["epoch"])
        except ValueError:
            raise ValueError(f"row {number + 1} is not numbers") from None
        if epoch != number:
            raise ValueError(f"row {number + 1} is epoch {epoch}, expected {number}")
        if not all(map(math.isfinite, time_parts)) or not (allow_nan or all(map(math.isfinite, numbers))):
            raise ValueError(f"row {number + 1} has a number that is not finite")
    return len(rows) - 1


def _json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError("not valid JSON") from None


def file_record(run_dir: Path) -> dict:
    """What a finished run's files must be, for its status.json: size and sha256 of each of `RECORDED` that
    exists, and the number of rows of history.csv."""
    run_dir = Path(run_dir)
    files = {name: {"size": (run_dir / name).stat().st_size, "sha256": _sha256(run_dir / name)}
             for name in RECORDED if (run_dir / name).exists()}
    return {"files": files, "history_rows": max(history_rows(run_dir), 0)}


def history_rows(run_dir: Path) -> int:
    """The number of rows (lines after the header) of the run's history.csv; -1 if it has none."""
    try:
        return len((Path(run_dir) / "history.csv").read_text().splitlines()) - 1
    except (FileNotFoundError, UnicodeDecodeError):
        return -1


def check_run(run_dir: Path, status: dict | None = None) -> str | None:
    """None if the files of a finished or diverged run are intact, else one line naming the damaged file
    and what is wrong: ``history.csv: size 120, expected 363`` or ``config.json: not valid JSON``.

    With the record of `file_record` in its status, sizes and checksums decide; a run written before that
    record is checked by parsing (`status`: its status.json, read here when not given).
    """
    run_dir = Path(run_dir)
    status = raw_status(run_dir) if status is None else status
    if status["status"] == "damaged":
        return status["reason"]
    recorded = status.get("files")
    if isinstance(recorded, dict) and "history.csv" in recorded and all(isinstance(v, dict) for v in recorded.values()):
        for name in recorded:
            if not (run_dir / name).is_file() and name in OPTIONAL:
                continue
            differs = file_differs(run_dir, name, status)
            if differs:
                return differs
        return None
    return _check_by_parsing(run_dir, status)


def file_differs(run_dir: Path, name: str, status: dict) -> str | None:
    """How the run's file `name` differs from the size and sha256 its status recorded when the run finished
    (``model.pth: size 120, expected 363``, ``...: missing``); None when it matches or nothing was recorded."""
    files = status.get("files")
    expected = files.get(name) if isinstance(files, dict) else None
    if not isinstance(expected, dict):
        return None
    path = Path(run_dir) / name
    if not path.is_file():
        return f"{name}: missing"
    if path.stat().st_size != expected.get("size"):
        return f"{name}: size {path.stat().st_size}, expected {expected.get('size')}"
    if _sha256(path) != expected.get("sha256"):
        return f"{name}: sha256 differs from the one recorded when the run finished"
    return None


def _check_by_parsing(run_dir: Path, status: dict) -> str | None:
    """`check_run` for a run whose status has no file record: every file parses, history has every epoch."""
    try:
        config = _json(run_dir / "config.json") if (run_dir / "config.json").is_file() else None
    except ValueError as e:
        return f"config.json: {e}"
    if config is None:
        return "config.json: missing"
    settings = config.get("config") if isinstance(config, dict) else None
    if not isinstance(settings, dict) or any(k not in settings for k in CONFIG_KEYS):
        return f"config.json: no 'config' entry with {', '.join(CONFIG_KEYS)}"
    if not (run_dir / "history.csv").is_file():
        return "history.csv: missing"
    try:
        rows = _history_rows(run_dir / "history.csv", allow_nan=status["status"] == "diverged")
    except (ValueError, UnicodeDecodeError, csv.Error) as e:
        return f"history.csv: {e}"
    # a diverged run stopped early: its epochs_done says when (at most `epochs` if it does not say)
    expected = status.get("epochs_done", settings["epochs"])
    if rows != expected and not (status["status"] == "diverged" and "epochs_done" not in status and rows <= expected):
        return f"history.csv: {rows} complete rows, expected {expected}"
    if (run_dir / "kernels.json").is_file():
        try:
            if not isinstance(_json(run_dir / "kernels.json"), list):
                return "kernels.json: not a list of layers"
        except ValueError as e:
            return f"kernels.json: {e}"
    return None
