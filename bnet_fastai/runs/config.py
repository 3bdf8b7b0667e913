"""`RunConfig`: everything that defines a run, checked without importing torch (see `bnet_fastai.names`).

`bnet_fastai.runs.train` trains it; the command line builds and validates it before anything heavy is imported.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import json
import math
import re
from dataclasses import asdict, dataclass

from bnet_fastai import names
from bnet_fastai._checks import check_block_args, check_choice, check_kernel_size, check_model_args, is_timm_arch

SCHEDULES = {"one_cycle": "fit_one_cycle", "flat_cos": "fit_flat_cos"}  # fastai Learner methods
# Fields added after runs were first published: at their default they stay out of the run_id hash, so
# run folders written before them keep their names and are reused.
ADDED_LATER = {"schedule": "one_cycle", "sa": False, "pool": "avg", "bnet_impl": "auto"}
# Fields that change no result: never in a run_id, never a difference between two recipes (report).
NO_RESULT_CHANGE = ("workers", "keep_weights")
MAX_SEED = 2 ** 32 - 1  # numpy's seeding takes 0 .. 2**32 - 1 (fastai's set_seed seeds numpy, torch, random)


@dataclass
class RunConfig:
    """Everything that defines a run. Written to config.json; its hash names the run folder."""

    arch: str = "xresnet18"  # a name from list_archs(), or any timm model name
    norm: str = "bn"  # "bn" or "bnet"
    dataset: str = "imagenette-160"  # a name from list_datasets()
    size: int = 128  # training image size (RandomResizedCrop), pixels
    bs: int = 64  # batch size
    epochs: int = 5  # training epochs
    lr: float = 3e-3  # peak learning rate of the schedule
    schedule: str = "one_cycle"  # "one_cycle" (fit_one_cycle) or "flat_cos" (fit_flat_cos: the leaderboard's)
    wd: float = 1e-2  # decoupled weight decay (AdamW-style, fastai's default true_wd)
    wd_norm: bool = False  # decay norm affine params too (BN gamma/beta, BNET kernel/bias); fastai: False
    opt: str = "adam"  # "adam", "ranger" or "sgd" (fastai's optimizers)
    label_smoothing: float = 0.1  # 0 gives plain cross-entropy; 0.1 as fastai's Imagenette example
    seed: int = 0  # set_seed(seed, reproducible=True): weights, data order, augmentation
    k: int = 3  # BNET kernel size (odd)
    placement: str = "all"  # "all" or "last" (BNET only in each residual block's last norm)
    bnet_init: str = "auto"  # zero where the library zero-inits gamma, identity elsewhere
    act: str = "relu"  # activation: "relu", "mish" or "silu"
    sa: bool = False  # fastai's simple self-attention (xresnet family only), as in the leaderboard recipe
    pool: str = "avg"  # shortcut downsampling pool of the xresnet family: "avg" (fastai's), "max", "maxblur"
    fraction: float = 1.0  # share of each training class used (quick runs); validation stays whole
    channels_last: bool = True  # channels_last memory format: faster for BN and BNET (benchmarks/README.md)
    fp16: str = "auto"  # mixed precision: "auto" (on when a GPU is used), "on" or "off"
    pipeline: str = "cached"  # "cached": decoded once, augmented as tensors (bnet_fastai.data.cache); "fastai": PIL
    compile: bool = False  # torch.compile the model; off by default, see benchmarks/README.md
    bnet_impl: str = "auto"  # how BNET2d computes: "torch", "cpp" (fused C++ kernels, CPU), "triton" (fused kernels,
    # CUDA) or "auto" ("cpp" on a CPU where they build, else "torch"); config.json records what it resolved to
    workers: int | None = None  # DataLoader worker processes; None: up to 8 (does not change results)
    keep_weights: bool = True  # keep model.pth when the run finishes; false saves disk (does not change results)

    def validate(self) -> None:
        """Raise ValueError naming the valid choices for any bad field, before anything is written."""
        check_model_args(self.arch, self.norm, self.placement, self.k, self.act, self.bnet_init)
        check_choice("schedule", self.schedule, SCHEDULES)
        check_block_args(self.arch, sa=self.sa, pool=self.pool, size=self.size)
        check_choice("dataset", self.dataset, names.DATASETS)
        check_choice("opt", self.opt, names.OPTIMIZERS)
        check_choice("fp16", self.fp16, ("auto", "on", "off"))
        check_choice("pipeline", self.pipeline, names.PIPELINES)
        check_choice("bnet_impl", self.bnet_impl, names.BNET_IMPLS)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be a whole number in 0 .. {MAX_SEED} (what numpy's and torch's "
                             f"seeding take), got {self.seed!r}")
        for name, low in (("size", 1), ("bs", 2), ("epochs", 1)):  # BatchNorm needs 2 samples a batch
            if getattr(self, name) < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {getattr(self, name)!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr!r}")
        if not (math.isfinite(self.wd) and self.wd >= 0):
            raise ValueError(f"wd must be a finite number >= 0, got {self.wd!r}")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing!r}")
        if self.workers is not None and self.workers < 0:
            raise ValueError(f"workers must be >= 0 (or None for automatic), got {self.workers!r}")
        if not 0 < self.fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {self.fraction!r}")
        if self.norm == "bnet" and is_timm_arch(self.arch):
            check_timm_conversion(self.arch, self.placement, self.k, self.bnet_init)

    @property
    def run_id(self) -> str:
        """Readable name plus a hash of every field that changes results.

        `workers` and `keep_weights` do not change results; nor do `k`, `placement` and `bnet_init` when norm is "bn", so
        a grid over k trains its BN baseline once.
        """
        ignored = set(NO_RESULT_CHANGE) | ({"k", "placement", "bnet_init", "bnet_impl"} if self.norm == "bn" else set())
        ignored |= {k for k, default in ADDED_LATER.items() if getattr(self, k) == default}
        fields = {k: v for k, v in asdict(self).items() if k not in ignored}
        digest = hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:8]
        variant = f"{self.norm}-k{self.k}-{self.placement}" if self.norm == "bnet" else self.norm
        return f"{self.arch}_{variant}_s{self.seed}_{digest}"


@functools.cache  # a grid validates each of its runs: one conversion per arch, placement, k and init
def check_timm_conversion(arch: str, placement: str, k: int, bnet_init: str) -> None:
    """A timm model by name is converted as `swap_norm` converts it, refusals included (no BatchNorm at all; no
    residual block for placement="last"): tried on the meta device (no memory, no init) so that the refusal comes
    before anything is written. Imports torch and timm: only for a timm name."""
    import torch

    from bnet_fastai.nn.models import create_model

    with torch.device("meta"):
        create_model(arch, "bnet", placement=placement, k=k, bnet_init=bnet_init)


def _one_of(choices) -> str:
    return "one of " + ", ".join(choices)


# What each RunConfig field is, for `bnet-fastai run --help` / `sweep --help` (the CLI adds the default).
FIELD_HELP: dict[str, str] = {
    "arch": f"the network: {_one_of(names.ARCHS)} (`bnet-fastai archs`), or any timm model name (resnet18, "
            f"efficientnet_b0 ...: built by timm with its own activation, its BatchNorms converted by swap_norm)",
    "norm": f"the norm layers: {_one_of(names.NORMS)} (sweep: also BNET variants such as bnet-k5-last)",
    "dataset": f"{_one_of(names.DATASETS)}; downloaded on first use",
    "size": "training image size in pixels (RandomResizedCrop; validation is resized to it)",
    "bs": "batch size (at least 2: BatchNorm needs two samples)",
    "epochs": "training epochs (the schedule spans all of them)",
    "lr": "peak learning rate of the schedule",
    "schedule": f"the learning-rate schedule: {_one_of(SCHEDULES)} (fastai's fit_one_cycle / fit_flat_cos)",
    "wd": "decoupled weight decay (AdamW-style, fastai's true_wd)",
    "wd_norm": "true: decay the norms' parameters too (BN gamma/beta, BNET kernel/bias); fastai's default is false",
    "opt": f"the optimizer: {_one_of(names.OPTIMIZERS)} (fastai's)",
    "label_smoothing": "label smoothing of the cross-entropy, in [0, 1); 0 is plain cross-entropy",
    "seed": "the seed of weights, data order and augmentation (fastai's set_seed, reproducible)",
    "k": "BNET's kernel size, odd (1 is BN's per-channel affine; the paper uses 3)",
    "placement": f"which norms become BNET: {_one_of(names.PLACEMENTS)} (last: the last norm of each residual block)",
    "bnet_init": f"BNET's kernel init: {_one_of(names.SWAP_INITS)} (auto: zero where the library zero-inits gamma, "
                 f"identity elsewhere)",
    "act": f"the activation of the project's archs: {_one_of(names.ACTIVATIONS)} (a timm model by name keeps its own)",
    "sa": "true: fastai's simple self-attention (xresnet family only)",
    "pool": f"the shortcut's downsampling pool: {_one_of(names.POOLS)} (xresnet family only)",
    "fraction": "share of each training class used, in (0, 1]; validation stays whole",
    "channels_last": "true: channels_last memory format (faster for BN and BNET on most devices)",
    "fp16": "mixed precision: one of auto, on, off (auto: on when a GPU is used)",
    "pipeline": f"the data pipeline: {_one_of(names.PIPELINES)} (cached: decoded once, augmented as tensors)",
    "compile": "true: torch.compile the model",
    "bnet_impl": f"how BNET computes: {_one_of(names.BNET_IMPLS)} (auto: the C++ kernels on a CPU where they "
                 f"build, else torch; results agree to float rounding)",
    "workers": "DataLoader worker processes, or none for up to 8 (changes no result)",
    "keep_weights": "true: keep model.pth when the run finishes (changes no result)",
}


# A BNET variant named as the report names it (`bnet_fastai.analysis.report.variant`): norm, k and placement.
_VARIANT = re.compile(r"bnet-k(\d+)-([a-z]+)")
VARIANT_FORM = "bn, bnet, or a BNET variant bnet-k<odd k>-<all|last> (bnet-k5-last, bnet-k1-all, ...)"


def variant_fields(norm: str) -> dict:
    """The `RunConfig` fields a grid's `norm` value stands for.

    ``"bn"`` and ``"bnet"`` are norms (a ``"bnet"`` takes k and placement from the grid's other axes); a
    variant name such as ``"bnet-k5-last"`` fixes k and placement as well, so a grid can list the BNET
    variants it compares (``["bn", "bnet-k3-all", "bnet-k5-last", "bnet-k1-all"]``) instead of a product of
    k × placement. Anything else raises ValueError naming the valid forms.
    """
    if norm in names.NORMS:
        return {"norm": norm}
    match = _VARIANT.fullmatch(norm) if isinstance(norm, str) else None
    if match is None:
        raise ValueError(f"unknown norm {norm!r}; valid: {VARIANT_FORM}")
    k, placement = int(match[1]), match[2]
    check_kernel_size(k)
    check_choice("placement", placement, names.PLACEMENTS)
    return {"norm": "bnet", "k": k, "placement": placement}


def check_grid_axes(grid: dict[str, list]) -> None:
    """ValueError in one line for a grid axis that would be dropped or would split an arm without a word: a k or
    placement axis beside BNET variant names only (the variants fix their own), and several `bnet_impl` values
    (how BNET is computed is no arm: BN would be trained once and paired with one of them)."""
    impls = list(grid.get("bnet_impl", []))
    if len(set(impls)) > 1:
        raise ValueError(f"bnet_impl takes one value per grid, got {', '.join(map(str, impls))}: it is how BNET is "
                         f"computed, not an arm (the results agree to float rounding: benchmarks/impl_agreement.py); "
                         f"time the implementations with benchmarks/train_step.py --variants bnet-k3-all-torch,"
                         f"bnet-k3-all-cpp")
    norms = [n for n in grid.get("norm", []) if isinstance(n, str)]
    variants = [n for n in norms if _VARIANT.fullmatch(n)]
    axes = [axis for axis in ("k", "placement") if axis in grid]
    if axes and variants and "bnet" not in norms:
        raise ValueError(f"{' and '.join(axes)} appl{'y' if len(axes) > 1 else 'ies'} to norm 'bnet' only, and the norms are BNET variants that fix "
                         f"their own ({', '.join(variants)}): name the variants you want (e.g. bnet-k5-last) or "
                         f"add bnet to the norms")


def expand_grid(base: RunConfig, grid: dict[str, list] | list[dict[str, list]]) -> list[RunConfig]:
    """Every combination of `grid` values applied to `base`, validated before anything runs.

    A list of grids is the union of their products (e.g. a budget study's extra budget for BN alone), ordered
    by seed so that a study cut short leaves complete seeds. A `norm` value may name a BNET variant
    (`variant_fields`): its k and placement override the grid's.
    """
    grids = grid if isinstance(grid, (list, tuple)) else [grid]
    names = {f.name for f in dataclasses.fields(RunConfig)}
    unknown = sorted(set().union(*grids) - names)
    if unknown:
        raise ValueError(f"unknown RunConfig field(s) {', '.join(unknown)}; valid fields: {', '.join(sorted(names))}")
    for g in grids:
        check_grid_axes(g)
    configs = []
    for g in grids:
        for values in itertools.product(*(g[k] for k in g)):
            fields = dict(zip(g, values))
            fields.update(variant_fields(fields["norm"]) if "norm" in fields else {})
            configs.append(dataclasses.replace(base, **fields))
    if len(grids) > 1:
        seeds = list(dict.fromkeys(c.seed for c in configs))
        configs.sort(key=lambda c: seeds.index(c.seed))  # stable: each grid's own order within a seed
    for config in configs:
        config.validate()
    # the same run twice in one grid (k varied for norm="bn": same run_id) is trained once
    return list({c.run_id: c for c in configs}.values())
