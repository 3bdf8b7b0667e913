"""File writing that a crash or a kill cannot leave half done, and one writer at a time."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

# Write errors a user can fix, by errno: what happened, and what to do.
_FIXABLE = {
    errno.ENOSPC: ("no space left on its device", "free some space"),
    errno.EDQUOT: ("the disk quota is exceeded", "free some space or raise the quota"),
    errno.EROFS: ("its file system is read-only", "use a writable folder"),
    errno.EACCES: ("permission denied", "make it writable or use another folder"),
    errno.EPERM: ("operation not permitted", "make it writable or use another folder"),
}


def file_fault(error: BaseException) -> tuple[str, str] | None:
    """(what happened, the fix) when `error`, or an error it was raised from, is a write error a user can fix.

    fastai re-raises a callback's error with its own message but the same object, so the errno survives."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _FIXABLE:
            return _FIXABLE[error.errno]
        error = error.__cause__ or error.__context__
    return None


@contextlib.contextmanager
def atomic_file(path: Path, mode: str = "w") -> Iterator:
    """A file to write `path` through: readers see the old file or the new one, never half of it. It is
    written as ``.<name>.<pid>.tmp`` beside `path`, synced, then renamed; on an error the temp file goes."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: Path, text: str) -> None:
    """Write `text` to `path` atomically (`atomic_file`)."""
    with atomic_file(path) as f:
        f.write(text)


def shared_tempdir(prefix: str, dir: Path) -> Path:
    """`tempfile.mkdtemp`, but with the mode a new folder gets from the umask (mkdtemp's is 0700): a dataset
    or cache renamed from it into place is readable by the other users of a shared data root."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=dir))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)
    return tmp


@contextlib.contextmanager
def writer_lock(dest: Path) -> Iterator[None]:
    """One writer at a time (ranks of a distributed run, parallel runs); the others wait, then reuse."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.parent / f".{dest.name}.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
