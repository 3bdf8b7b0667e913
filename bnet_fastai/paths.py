"""Where data and results live, importable without torch or fastai.

Data root: ``BNET_FASTAI_DATA`` when set; else ``data/`` in a checkout (the package beside its pyproject.toml);
else, as for an installed package, fastai's own data folder (``data`` of ``$FASTAI_HOME/config.ini``, by default
``~/.fastai/data``, where fastai's ``untar_data`` puts Imagenette too: a dataset fastai already downloaded is
reused). Results root: ``BNET_FASTAI_RESULTS`` when set; else ``results/`` in a checkout, or in the folder the
command runs in: results stay where the user works.

What a run writes beside a prepared dataset (the decode cache, the record of unreadable images, their
locks) goes into the dataset's own folder when it is writable, else into a folder of its own under
``BNET_FASTAI_CACHE`` (default ``$XDG_CACHE_HOME/bnet-fastai``, i.e. ``~/.cache/bnet-fastai``): a dataset
prepared once can be trained on from a read-only mount or another user's folder (`state_folder`).
"""
from __future__ import annotations

import configparser
import hashlib
import os
import urllib.parse
from pathlib import Path

MIRROR_SCHEMES = ("http", "https", "ftp", "file")  # what urllib fetches


def _checkout() -> Path | None:
    """The project folder when the package runs from a checkout (beside its pyproject.toml), else None."""
    project = Path(__file__).resolve().parents[1]
    return project if (project / "pyproject.toml").exists() else None


def fastai_data_folder() -> Path:
    """fastai's configured data folder, read as fastai's ``fastai_cfg().path("data")`` reads it (without importing
    fastai): ``data`` of ``$FASTAI_HOME/config.ini`` (``FASTAI_HOME`` default ``~/.fastai``) relative to that
    folder, ``data`` when the file or the key is missing."""
    home = Path(os.environ.get("FASTAI_HOME", "~/.fastai")).expanduser().absolute()
    config = configparser.ConfigParser()
    config.read(home / "config.ini")
    return (home / Path(config["DEFAULT"].get("data", "data")).expanduser()).resolve()


def data_root() -> Path:
    """The folder datasets are downloaded and extracted into (see the module docstring)."""
    if os.environ.get("BNET_FASTAI_DATA"):
        return Path(os.environ["BNET_FASTAI_DATA"]).expanduser().resolve()
    project = _checkout()
    return project / "data" if project else fastai_data_folder()


def results_root() -> Path:
    """The folder experiments are written into by default (see the module docstring)."""
    if os.environ.get("BNET_FASTAI_RESULTS"):
        return Path(os.environ["BNET_FASTAI_RESULTS"]).expanduser().resolve()
    return (_checkout() or Path.cwd()) / "results"


def where_files_go() -> str:
    """One line for ``--help``: where data and results go on this installation."""
    return (f"data: {data_root()} (BNET_FASTAI_DATA; outside a checkout fastai's data folder); results: "
            f"{results_root()} (BNET_FASTAI_RESULTS; outside a checkout ./results where the command runs)")


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
