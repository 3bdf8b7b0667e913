"""Where data and results live, importable without torch or fastai.

Data root: ``data/`` beside the package's project (or ``./data`` when installed elsewhere), unless
``BNET_FASTAI_DATA`` names another folder; results root likewise: ``results/`` or ``BNET_FASTAI_RESULTS``.
"""
from __future__ import annotations

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
