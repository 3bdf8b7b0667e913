"""A dataset's record: how many images each split and class folder held when the dataset was written.

`prepare` writes the record (``.bnet_fastai_dataset.json``) when it writes or extracts a dataset, and compares
the folder with it before every run: a count of files per class folder, not a re-hash of 70,000 images. A class
folder emptied, images deleted or added, a split half written: the run stops in one line naming the folder and
the fix. A dataset made before records existed (extracted by hand, by fastai, or by an older bnet-fastai) gets
its record on first use, from the counts published for it where they are known (`expected`), else from what it
holds then, said in one line. The record's digest (`key`) names the copy of the dataset a decode cache was
built from (`data.cache`): a dataset written anew gets a new record, and its cache is rebuilt.
"""
from __future__ import annotations

import hashlib
import json
import os
from datetime import datetime, timezone
from pathlib import Path

from bnet_fastai._checks import DatasetError
from bnet_fastai._files import atomic_write
from bnet_fastai._notice import notice
from bnet_fastai.paths import state_folder

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
RECORD_FILE = ".bnet_fastai_dataset.json"
Counts = dict[str, dict[str, int]]  # split -> class folder (relative to the split) -> images


def count_images(path: Path, splits: tuple[str, ...]) -> Counts:
    """The image files under each split folder of `path`, counted by the folder holding them."""
    counts: Counts = {}
    for split in splits:
        root, found = Path(path) / split, {}
        for folder, _, files in os.walk(root):
            n = sum(Path(f).suffix.lower() in IMAGE_EXTENSIONS for f in files)
            if n:
                found[Path(folder).relative_to(root).as_posix()] = n
        counts[split] = dict(sorted(found.items()))
    return counts


def write(folder: Path, name: str, counts: Counts, origin: str) -> dict:
    """Record `counts` as dataset `name`'s in `folder` (`origin`: how the dataset came to be); returns it."""
    record = {"dataset": name, "counts": counts, "origin": origin,
              "written": datetime.now(timezone.utc).isoformat(timespec="microseconds")}
    atomic_write(Path(folder) / RECORD_FILE, json.dumps(record, indent=1))
    return record


def read(path: Path) -> dict | None:
    """The record of the dataset at `path`: beside its images, else in its state folder (a read-only root)."""
    for folder in (Path(path), state_folder(path)):
        if (folder / RECORD_FILE).is_file():
            return _valid(folder / RECORD_FILE)
    return None


def _valid(file: Path) -> dict:
    """The record in `file`; DatasetError in one line, naming the file and the fix, when it is damaged."""
    try:
        record = json.loads(file.read_text())
        counts = record["counts"]
        if not all(isinstance(n, int) and not isinstance(n, bool) for split in counts.values() for n in split.values()):
            raise TypeError("a count is not a whole number")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
        what = "not valid JSON" if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
        raise DatasetError(f"the dataset record {file} is damaged ({what}): delete it, and the next run records "
                           f"the dataset's image counts again") from None
    return record


def key(record: dict) -> str:
    """A digest naming this copy of the dataset: its counts and when they were recorded."""
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def _total(counts: Counts) -> str:
    classes = {c for split in counts.values() for c in split}
    return ", ".join(f"{sum(n.values())} {s}" for s, n in counts.items()) + f" images in {len(classes)} classes"


def differences(found: Counts, recorded: Counts) -> list[str]:
    """Each class folder whose count differs from the record, as ``split/class holds n images, m recorded``."""
    out = []
    for split in recorded.keys() | found.keys():
        have, want = found.get(split, {}), recorded.get(split, {})
        for cls in sorted(have.keys() | want.keys()):
            if have.get(cls, 0) != want.get(cls, 0):
                where = f"{split}/{cls}" if cls != "." else f"{split}/"
                out.append(f"{where} holds {have.get(cls, 0)} images, {want.get(cls, 0)} recorded")
    return sorted(out)


def check(name: str, path: Path, splits: tuple[str, ...], expected: Counts | None = None) -> dict:
    """The record of dataset `name` at `path`, after checking that the folder holds what it records.

    No record yet: `expected` (the published counts) is checked and recorded when given; else the counts found
    are recorded, with one line on stderr. A difference raises DatasetError naming the folder and the fix."""
    found = count_images(path, splits)
    record = read(path)
    fix = f"delete {path} and run `bnet-fastai data {name}` again"
    if record is None and expected is None:
        record = write(state_folder(path), name, found, "counted on first use")
        notice(f"recorded the image counts of dataset {name!r} at {path} ({_total(found)}): later runs check them")
        return record
    recorded = record["counts"] if record else expected
    wrong = differences(found, recorded)
    if wrong:
        more = f" (and {len(wrong) - 1} more class folder(s))" if len(wrong) > 1 else ""
        what = "its record" if record else "the published counts"
        raise DatasetError(f"dataset {name!r} at {path} does not match {what}: {wrong[0]}{more}; {fix}")
    return record or write(state_folder(path), name, found, "published counts, checked on first use")
