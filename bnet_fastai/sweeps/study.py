"""The BN vs BNET study behind `notebooks/experiments.ipynb`: profiles, the dataset choice, one call to run it.

Profiles (``PROFILES``): ``quick`` (CPU, minutes), ``cpu`` (Fashion-MNIST, about an hour on 2 cores: the
accuracy study at equal epochs, 5 seeds), ``convergence`` (Fashion-MNIST, a budget study: the same recipe
trained as complete schedules of 2, 3 and 4 epochs, BN also at 5 and 6, 20 seeds, BNET in every norm, in the last
norm of each block with k=3 and k=5, and a k=1 placebo: the README's answers (a)-(d)), ``full`` (GPU,
Imagenette-160: 4 archs × BN, BNET all, BNET last × 10 seeds) and ``leaderboard`` (fastai's Imagenette 128 px /
5 epoch leaderboard recipe, for BN and BNET, 8 seeds). ``PROFILE="auto"`` is ``full`` on a GPU and ``quick`` on
a CPU. ``DATASET="auto"`` is the profile's own dataset where it has one (the GPU profiles and the Fashion-MNIST
ones: never swapped for another; a dataset that cannot be had stops the study before its first run, in one line
naming the download and ``BNET_FASTAI_MIRROR``); for ``quick`` it takes the first of ``EXPERIMENT_DATASETS``
that can be had: Imagenette-160 when on disk or reachable, else Fashion-MNIST when it can be had without a
network, else the embedded `sample` digits.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bnet_fastai._checks import check_choice, parse_parameter
from bnet_fastai.analysis.stats import seeds_needed
from bnet_fastai.data.available import auto_dataset
from bnet_fastai.data.datasets import DATASETS
from bnet_fastai.sweeps.sweep import expand_grid, sweep
from bnet_fastai.runs.config import RunConfig, check_grid_axes

PROFILES: dict[str, dict] = {
    # GPU: the question on Imagenette-160 with this project's default recipe (Adam, one-cycle, ReLU), BNET in
    # every norm and in the paper's placement (the last norm of each block): 4 archs x 2 placements = 8
    # comparisons. Seeds: the exact sign-flip p of n paired seeds is at least 2/2^n, and Holm's first step
    # over 8 comparisons needs p <= 0.05/8 = 0.00625, so n >= 9 before any verdict is possible; 10 seeds give
    # p >= 0.00195, room for a seed or two against the rest. In our Fashion-MNIST studies the paired
    # differences (final accuracy, BNET - BN by seed; docs/gpu.md has the numbers) had an SD of 0.25-0.58
    # point (the k=1 placebo 0.25-0.38) against mean gains of 0.6-1.3 point for BNET-all, 0.25-0.6 for "last":
    # with 10 pairs a BNET-all-sized gain is about 5 standard errors, a "last"-sized one 2-3 (it may stay
    # "cannot tell" after Holm; more seeds: --seeds).
    "full": dict(archs=["xresnet18", "xresnet50", "xse_resnet50", "resnest26d"], dataset="imagenette-160",
                 size=128, epochs=5, seeds=list(range(10)), bs=64, lr=3e-3, fraction=1.0,
                 placement=["all", "last"]),
    # GPU: fastai's Imagenette leaderboard entry at 128 px / 5 epochs (87.43%, mean of 5 runs), for BN and
    # BNET: xse_resnext50, Mish, simple self-attention, max-blur pooling, ranger, flat-cos at lr 8e-3, bs 32,
    # label smoothing, Imagenette-320 images trained at 128 px. One comparison: 8 seeds let the sign-flip p
    # reach 2/256 = 0.0078 < 0.05 (the entry's 5 could not go below 0.0625).
    "leaderboard": dict(archs=["xse_resnext50"], dataset="imagenette-320", size=128, epochs=5,
                        seeds=list(range(8)), bs=32, lr=8e-3, opt="ranger", schedule="flat_cos", act="mish",
                        sa=True, pool="maxblur", label_smoothing=0.1, fraction=1.0),
    # CPU, about an hour on 2 cores: the accuracy study at equal epochs (docs/results.md). Fashion-MNIST at its own 28 px; a quarter
    # of the training set (15,000 images) and 5 epochs keep each of the 30 runs (bn, bnet-k3-all, bnet-k3-last
    # x xmininet, mininest x 5 seeds) at 1.5-2.5 min (measured: ~16 s and ~25 s per epoch), while the whole
    # 10,000-image test set is every run's validation set. xsemininet would add ~25 min: left out.
    "cpu": dict(archs=["xmininet", "mininest"], dataset="fashion-mnist", size=28, epochs=5,
                seeds=[0, 1, 2, 3, 4], bs=128, lr=1e-2, fraction=0.25, placement=["all", "last"]),
    # CPU, on 2 cores about 90 minutes for BN and bnet-k3-all and about as long again for the three variants added
    # later (see docs/results.md for the measured times): the budget study behind the README's (a)-(d). The cpu
    # profile's recipe for xmininet, each budget its own complete one-cycle schedule (with one-cycle, mid-schedule
    # points are snapshots at a high learning rate, not a convergence measure). The BNET arms are a list of
    # variants, not a product of k x placement: BNET in every norm (k=3); the paper's placement, the last norm of
    # each residual block (k=3 and k=5, the kernel sizes of its COCO table); and a placebo, k=1 in every norm,
    # which *is* BN (same init, same weight-decay rule) computed through BNET's code: its differences from BN
    # are the pipeline's own noise. BN is also trained at 5 and 6 epochs (`bn_only`) so that BNET at E epochs can
    # be set against BN at the budget that costs the same, E x the variant's BNET/BN training-step ratio measured
    # by benchmarks/train_step.py (docs/fashion-mnist-convergence/cost.json), interpolated and never
    # extrapolated, and so that the break-even ratio can reach 6/E. Budgets 2-4 rather than 3-5 keep the runs near
    # the time. 20 seeds (seeds 0-11 first, 12-19 added by resuming the study): the sign-flip test reaches
    # p = 2/2^20, and a verdict no longer hangs on one seed (the report's drop-one-seed column checks it).
    "convergence": dict(archs=["xmininet"], dataset="fashion-mnist", size=28, epochs=[2, 3, 4],
                        seeds=list(range(20)), bs=128, lr=1e-2, fraction=0.25,
                        norms=["bn", "bnet-k3-all", "bnet-k3-last", "bnet-k5-last", "bnet-k1-all"],
                        bn_only=dict(epochs=[5, 6])),
    # GPU: the convergence study's design on a real network and Imagenette-160, for a user's own network
    # (--archs: one of ours or any timm name) and own break-even: complete one-cycle schedules of 5, 10 and 15
    # epochs (BN also 20, so the break-even ratio can reach 20/15 = 1.33 at 15 epochs and 4 at 5), the four BNET
    # variants and the k=1 placebo, 12 seeds (12 equal-epoch comparisons need 9 before any verdict; 12 give a
    # drop-one-seed check room). 170 epochs a seed, 2,040 in all for one network: at an assumed 5-15 s an epoch
    # (xresnet50 at 128 px, one H100-class GPU, fp16; not measured here: this project has not had a GPU) about
    # 3-8.5 GPU-hours. Then time the same network on the same GPU into OUT/cost.json (docs/gpu.md has the
    # command) and `bnet-fastai report OUT` answers (a)-(d) for that network.
    "budget": dict(archs=["xresnet50"], dataset="imagenette-160", size=128, epochs=[5, 10, 15],
                   seeds=list(range(12)), bs=64, lr=3e-3, fraction=1.0,
                   norms=["bn", "bnet-k3-all", "bnet-k3-last", "bnet-k5-last", "bnet-k1-all"],
                   bn_only=dict(epochs=[20])),
    # CPU, minutes: the machinery on whatever dataset DATASET gives (see QUICK_ON_DATASET).
    "quick": dict(archs=["xmininet", "mininest"], size=32, epochs=5, seeds=[0, 1, 2], bs=64, lr=1e-2,
                  fraction=1.0),
}
# The quick profile on a real dataset trains on a fraction of it: minutes on 2 cores.
QUICK_ON_DATASET = {"sample": {}, "fashion-mnist": dict(size=28, epochs=3, fraction=0.05, bs=128)}
QUICK_ON_IMAGES = dict(size=64, epochs=3, fraction=0.1)  # Imagenette and the other archives
EXPERIMENT_DATASETS = ("imagenette-160", "fashion-mnist", "sample")  # DATASET="auto" in experiments.ipynb


@dataclass
class Study:
    """A resolved study: every setting the sweep will use, and why the automatic ones were chosen.

    `norms` are ``"bn"``, ``"bnet"`` (k and placement from `axes` or `base`) or BNET variant names such as
    ``"bnet-k5-last"`` (`bnet_fastai.runs.config.variant_fields`). `axes` holds the settings given as lists
    besides arch, norm and seed (e.g. ``k=[3, 5]``,
    ``placement=["all", "last"]``, ``epochs=[3, 4, 5]``): the grid is the product of all of them, BN trained
    once per seed. `bn_only` holds values trained for BN alone (a budget study's extra budget).
    """

    dataset: str
    profile: str
    archs: list[str]
    norms: list[str]
    seeds: list[int]
    base: RunConfig
    reasons: list[str] = field(default_factory=list)
    axes: dict[str, list] = field(default_factory=dict)
    bn_only: dict[str, list] = field(default_factory=dict)

    @property
    def grids(self) -> list[dict[str, list]]:
        """Every field varied, with its values (the union of these grids' products, `expand_grid`); seed
        first, so a study cut short leaves complete pairs."""
        grid = {"seed": self.seeds, "arch": self.archs, "norm": self.norms, **self.axes}
        extra = [{**grid, "norm": ["bn"], **self.bn_only}] if self.bn_only and "bn" in self.norms else []
        return [grid, *extra]

    def configs(self) -> list[RunConfig]:
        """Every run of the study, validated (bad values raise ValueError before anything is trained)."""
        return expand_grid(self.base, self.grids)

    def describe(self) -> str:
        b = self.base
        k, placement = self.axes.get("k", b.k), self.axes.get("placement", b.placement)
        epochs = self.axes.get("epochs", b.epochs)
        extra = "".join(f", BN also at {name} {values}" for name, values in self.bn_only.items())
        configs = self.configs()
        lines = [f"dataset: {self.dataset} | profile: {self.profile} | archs: {', '.join(self.archs)} | "
                 f"norms: {', '.join(self.norms)} | seeds: {self.seeds} | {len(configs)} runs, "
                 f"{sum(c.epochs for c in configs)} epochs in all",
                 f"size {b.size} px, {epochs} epochs{extra}, bs {b.bs}, lr {b.lr}, opt {b.opt}, "
                 f"schedule {b.schedule}, {f'k {k}, placement {placement}, ' if 'bnet' in self.norms else ''}"
                 f"training fraction {b.fraction:.3g}, "
                 f"torch threads {torch.get_num_threads()}"]
        return "\n".join(lines + self.reasons + ([self.seeds_note] if self.seeds_note else []))

    @property
    def seeds_note(self) -> str:
        """A line where this study's seeds are too few for any verdict in its family of equal-epoch comparisons
        (`stats.seeds_needed`); "" otherwise."""
        arms = {(c.arch, c.k, c.placement, c.epochs) for c in self.configs() if c.norm == "bnet"}
        need = seeds_needed(len(arms)) if arms else 0
        if len(self.seeds) >= need:
            return ""
        return (f"note: {len(self.seeds)} seed{'s' if len(self.seeds) > 1 else ''} can never reach a verdict here: the "
                f"exact p of n paired seeds is at least 2/2^n, and Holm over the {len(arms)} BNET-vs-BN comparisons "
                f"needs {need} seeds at least (--seeds 0,...,{need - 1}; more to detect a small gain: docs/gpu.md)")


def resolve(dataset: str = "auto", profile: str = "auto", archs: list[str] | None = None,
            norms: list[str] | None = None, seeds: list[int] | None = None, **overrides) -> Study:
    """Turn the notebook's parameters into a `Study`; `None` means "the profile's value".

    Every value is checked and converted where it enters (`_checks.parse_parameter`): lists may come as
    Python/JSON lists or comma-separated strings (what papermill's ``-p`` passes), numbers as text; `k` and
    `placement` take a single value or a list. A bad value raises ValueError in one line, before anything
    is written.
    """
    dataset, profile = parse_parameter("DATASET", dataset, str), parse_parameter("PROFILE", profile, str)
    archs, norms = parse_parameter("ARCHS", archs, str, many=True), parse_parameter("NORMS", norms, str, many=True)
    seeds = parse_parameter("SEEDS", seeds, int, many=True)
    for seed in seeds or []:
        if not 0 <= seed < 2 ** 32:  # numpy's and torch's seeding take 0 .. 2**32 - 1
            raise ValueError(f"SEEDS must be in 0 .. {2 ** 32 - 1}, got {seed}")
    overrides = {name: _parse_override(name, value) for name, value in overrides.items()}
    check_choice("profile", profile, ("auto", *PROFILES))
    reasons = []
    if profile == "auto":
        profile = "full" if torch.cuda.is_available() else "quick"
        reasons.append(f"PROFILE auto -> {profile!r}: {'a GPU is' if profile == 'full' else 'no GPU is'} available")
    settings = dict(PROFILES[profile])
    if dataset == "auto" and "dataset" in settings:
        dataset = settings["dataset"]
        reasons.append(f"DATASET auto -> {dataset!r}: the {profile!r} profile's dataset")
    elif dataset == "auto":
        dataset, why = auto_dataset(EXPERIMENT_DATASETS)
        reasons.append(why)
    check_choice("dataset", dataset, DATASETS)
    settings.pop("dataset", None)
    if profile == "quick":
        settings.update(QUICK_ON_DATASET.get(dataset, QUICK_ON_IMAGES))
    archs, seeds = archs or settings.pop("archs"), seeds if seeds is not None else settings.pop("seeds")
    norms = norms or settings.pop("norms", ["bn", "bnet"])
    settings.pop("archs", None), settings.pop("seeds", None), settings.pop("norms", None)
    bn_only = settings.pop("bn_only", {})
    if "bnet" not in norms:  # variant names fix their own k and placement: the profile's axes do not apply
        settings = {k: v for k, v in settings.items() if k not in ("k", "placement") or not isinstance(v, list)}
        given = {k: v if isinstance(v, list) else [v] for k, v in overrides.items()
                 if k in ("k", "placement") and v is not None}
        check_grid_axes({"norm": norms, **given})  # --k / --placement beside variant names only: refused
    settings.update({k: v for k, v in overrides.items() if v is not None})
    bn_only = {k: v for k, v in bn_only.items() if k not in overrides or overrides[k] is None}  # overridden: gone
    axes = {k: list(v) for k, v in settings.items() if isinstance(v, (list, tuple))}
    base = RunConfig(dataset=dataset, **{k: v for k, v in settings.items() if k not in axes})
    study = Study(dataset, profile, list(archs), list(norms), list(seeds), base, reasons, axes,
                  bn_only)
    study.configs()  # validates every run
    return study


_FIELD_TYPES = {"int": int, "float": float, "str": str, "bool": bool, "int | None": int}
_LIST_FIELDS = ("k", "placement", "epochs")  # grid axes a notebook may give as a list


def _parse_override(name: str, value: object) -> object:
    """A `RunConfig` field from the notebook, converted to the field's type (a list for `k`, `placement`)."""
    fields = {f.name: f.type for f in dataclasses.fields(RunConfig)}
    if name not in fields:
        raise ValueError(f"unknown setting {name!r}; valid: {', '.join(sorted(fields))}")
    many = name in _LIST_FIELDS
    parsed = parse_parameter(name.upper(), value, _FIELD_TYPES[fields[name]], many=many)
    return parsed[0] if many and parsed is not None and len(parsed) == 1 else parsed


def run_study(study: Study, out: str | Path, **kw) -> list[dict]:
    """Run (or reuse) every run of `study` into the experiment folder `out` (`kw` go to `sweep`)."""
    return sweep(study.base, study.grids, out, **kw)
