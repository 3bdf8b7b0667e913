"""The BN vs BNET study behind `notebooks/experiments.ipynb`: profiles, the dataset choice, one call to run it.

``PROFILE="auto"`` picks the full recipe on a GPU (fastai's Imagenette leaderboard setting: xresnet18/50,
xse_resnet50 and resnest26d at 128 px, 5 epochs, 3 seeds) and a quick one on a CPU (mini archs, small
images) that finishes in minutes on 2 cores. ``DATASET="auto"`` uses Imagenette-160 when it is on disk or
its archive can be reached, else the offline `sample` digits.
"""
from __future__ import annotations

import dataclasses
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ._checks import check_choice
from .data import DATASETS, EXTRACTED_FILE, data_root, download_url
from .sweep import sweep
from .train import RunConfig

PROFILES: dict[str, dict] = {
    "full": dict(archs=["xresnet18", "xresnet50", "xse_resnet50", "resnest26d"], size=128, epochs=5,
                 seeds=[0, 1, 2], bs=64, lr=3e-3, fraction=1.0),
    "quick": dict(archs=["xmininet", "mininest"], size=32, epochs=5, seeds=[0, 1, 2], bs=64, lr=1e-2,
                  fraction=1.0),
}
# The quick profile on a real dataset (a CPU machine with network) trains on a tenth of it at 64 px.
QUICK_ON_IMAGES = dict(size=64, epochs=3, fraction=0.1)


@dataclass
class Study:
    """A resolved study: every setting the sweep will use, and why the automatic ones were chosen."""

    dataset: str
    profile: str
    archs: list[str]
    norms: list[str]
    seeds: list[int]
    base: RunConfig
    reasons: list[str] = field(default_factory=list)

    @property
    def grid(self) -> dict[str, list]:
        return {"arch": self.archs, "norm": self.norms, "seed": self.seeds}

    def describe(self) -> str:
        b = self.base
        lines = [f"dataset: {self.dataset} | profile: {self.profile} | archs: {', '.join(self.archs)} | "
                 f"norms: {', '.join(self.norms)} | seeds: {self.seeds}",
                 f"size {b.size} px, {b.epochs} epochs, bs {b.bs}, lr {b.lr}, k {b.k}, placement {b.placement!r}, "
                 f"training fraction {b.fraction}"]
        return "\n".join(lines + self.reasons)


def dataset_available(name: str, timeout: float = 5.0) -> bool:
    """True when dataset `name` is extracted under the data root or its archive answers a HEAD request."""
    archive = DATASETS[name].archive
    if (data_root() / archive.removesuffix(".tgz") / EXTRACTED_FILE).exists():
        return True
    try:
        with urllib.request.urlopen(urllib.request.Request(download_url(name), method="HEAD"), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def resolve(dataset: str = "auto", profile: str = "auto", archs: list[str] | None = None,
            norms: list[str] | None = None, seeds: list[int] | None = None, **overrides) -> Study:
    """Turn the notebook's parameters into a `Study`; `None` means "the profile's value"."""
    check_choice("profile", profile, ("auto", *PROFILES))
    reasons = []
    if profile == "auto":
        profile = "full" if torch.cuda.is_available() else "quick"
        reasons.append(f"PROFILE auto -> {profile!r}: {'a GPU is' if profile == 'full' else 'no GPU is'} available")
    if dataset == "auto":
        dataset = "imagenette-160" if dataset_available("imagenette-160") else "sample"
        reasons.append(f"DATASET auto -> {dataset!r}: Imagenette-160 is "
                       f"{'on disk or reachable' if dataset != 'sample' else 'neither on disk nor reachable'}")
    check_choice("dataset", dataset, DATASETS)
    settings = dict(PROFILES[profile])
    if profile == "quick" and dataset != "sample":
        settings.update(QUICK_ON_IMAGES)
    archs, seeds = archs or settings.pop("archs"), seeds if seeds is not None else settings.pop("seeds")
    settings.pop("archs", None), settings.pop("seeds", None)
    settings.update({k: v for k, v in overrides.items() if v is not None})
    base = RunConfig(dataset=dataset, **settings)
    study = Study(dataset, profile, list(archs), list(norms or ["bn", "bnet"]), list(seeds), base, reasons)
    for config in (dataclasses.replace(base, arch=a, norm=n) for a in study.archs for n in study.norms):
        config.validate()
    return study


def run_study(study: Study, out: str | Path) -> list[dict]:
    """Run (or reuse) every run of `study` into the experiment folder `out`."""
    return sweep(study.base, study.grid, out)
