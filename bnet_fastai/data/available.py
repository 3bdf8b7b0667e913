"""Which datasets can be had here, asked without downloading: `DATASET="auto"` in the notebooks takes the first."""
from __future__ import annotations

import urllib.request

from bnet_fastai.data import fashion_mnist
from bnet_fastai.data.datasets import DATASETS, EXTRACTED_FILE, data_root, download_url


def dataset_available(name: str, timeout: float = 5.0) -> bool:
    """True when dataset `name` can be had: `sample` always; Fashion-MNIST when written or its files are on
    disk (no network asked); an archive when extracted under the data root or it answers a HEAD request."""
    spec = DATASETS[name]
    if spec.writer == "sample":
        return True
    if spec.writer == "fashion-mnist":
        return fashion_mnist.available_offline(data_root() / spec.folder)
    if (data_root() / spec.folder / EXTRACTED_FILE).exists():
        return True
    try:
        with urllib.request.urlopen(urllib.request.Request(download_url(name), method="HEAD"), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def auto_dataset(candidates: tuple[str, ...]) -> tuple[str, str]:
    """The first of `candidates` that `dataset_available` finds, and a sentence saying why
    (the study passes `study.EXPERIMENT_DATASETS`, the BatchNorm notebook `basics.BASICS_DATASETS`)."""
    passed = []
    for name in candidates:
        if dataset_available(name):
            why = f"{', '.join(passed)} not available; " if passed else ""
            return name, f"DATASET auto -> {name!r}: {why}{name} is available"
        passed.append(name)
    raise ValueError(f"none of the datasets {', '.join(candidates)} is available")
