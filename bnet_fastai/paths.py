"""Where data and results live, importable without torch or fastai.

Data root: ``data/`` beside the package's project (or ``./data`` when installed elsewhere), unless
``BNET_FASTAI_DATA`` names another folder; results root likewise: ``results/`` or ``BNET_FASTAI_RESULTS``.

What a run writes beside a prepared dataset (the decode cache, the record of unreadable images, their
locks) goes into the dataset's own folder when it is writable, else into a folder of its own under
``BNET_FASTAI_CACHE`` (default ``$XDG_CACHE_HOME/bnet-fastai``, i.e. ``~/.cache/bnet-fastai``): a dataset
prepared once can be trained on from a read-only mount or another user's folder (`state_folder`).
"""
from __future__ import annotations

import hashlib
import os
import urllib.parse
from pathlib import Path

MIRROR_SCHEMES = ("http", "https", "ftp", "file")  # what urllib fetches


def _project_folder(name: str, variable: str) -> Path:
    if os.environ.get(variable):
        return Path(os.environ[variable]).expanduser().resolve()
    project = Path(__file__).resolve().parents[1]
    return project / name if (project / "pyproject.toml").exists() else Path.cwd() / name


def data_root() -> Path:
    """The folder datasets are downloaded and extracted into: `BNET_FASTAI_DATA`, else ``data/``."""
    return _project_folder("data", "BNET_FASTAI_DATA")


def results_root() -> Path:
    """The folder experiments are written into by default: `BNET_FASTAI_RESULTS`, else ``results/``."""
    return _project_folder("results", "BNET_FASTAI_RESULTS")


def mirror() -> str:
    """`BNET_FASTAI_MIRROR` without its trailing slash ("" when unset); ValueError when it is not a URL that
    urllib fetches, raised before anything is downloaded or written."""
    value = os.environ.get("BNET_FASTAI_MIRROR", "").rstrip("/")
    if value and urllib.parse.urlparse(value).scheme not in MIRROR_SCHEMES:
        raise ValueError(f"BNET_FASTAI_MIRROR={value!r} is not a URL with a scheme urllib fetches "
                         f"({', '.join(MIRROR_SCHEMES)}): e.g. http://host/path")
    return value


def cache_root() -> Path:
    """`BNET_FASTAI_CACHE`, else ``$XDG_CACHE_HOME/bnet-fastai`` (``~/.cache/bnet-fastai``)."""
    if os.environ.get("BNET_FASTAI_CACHE"):
        return Path(os.environ["BNET_FASTAI_CACHE"]).expanduser().resolve()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser().resolve() / "bnet-fastai"


def state_folder(dataset: Path) -> Path:
    """Where runs write what they keep beside the prepared dataset at `dataset`: the folder itself if it is
    writable, else ``<cache root>/<name>-<hash of its path>``; ValueError (one line, the setting) when neither is."""
    dataset = Path(dataset)
    if os.access(dataset, os.W_OK | os.X_OK):
        return dataset
    key = hashlib.sha256(str(dataset.resolve()).encode()).hexdigest()[:12]
    folder = cache_root() / f"{dataset.name}-{key}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"{dataset} is read-only and the cache folder {folder} cannot be made ({e.strerror}): "
                         f"set BNET_FASTAI_CACHE to a writable folder") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{dataset} is read-only and so is the cache folder {folder}: set BNET_FASTAI_CACHE "
                         f"to a writable folder")
    return folder
