"""Budget studies: runs of one recipe that differ only in `epochs`, each a complete schedule.

With a one-cycle schedule an epoch in the middle of a run is a snapshot at a high learning rate, not a
measure of how far training has come; the final accuracy of complete schedules of different lengths is.
So convergence speed is read across budgets:
- **epochs to match**: the budget a BNET variant needs to reach BN's mean final accuracy at a BN budget
  (every BN budget is a reference; the largest is the headline), on the BNET mean accuracy-vs-budget curve
  interpolated linearly between budgets; "at or below" the smallest budget when BNET is already there,
  "not reached" when it never is. Its interval: 95% percentile bootstrap over seeds (`BOOT` resamples,
  seed 0; BN and BNET resampled by the same seeds), a resample that never reaches counting as above every
  budget;
- **equal cost**: BNET at budget E against BN at budget r × E, where r is BNET's training-step time over
  BN's, measured side by side by ``benchmarks/train_step.py`` (never from run times on a shared machine).
  BN's per-seed accuracy-vs-budget curve is interpolated linearly at r × E; where r × E lies outside BN's
  budgets the comparison is not made (it would extrapolate). Paired by seed like every comparison here;
- **break-even ratio**: the step-cost ratio r below which BNET at E epochs beats BN given the same training
  time. BN's mean accuracy-vs-budget curve reaches BNET's mean accuracy at E at some BN budget B (linear
  between BN's budgets): BN needs B epochs for what BNET does in E, so BNET pays off while r × E < B, i.e.
  r < B / E. Never extrapolated: when BN's largest budget does not reach BNET's accuracy the ratio is a bound,
  "≥ largest / E"; when BN's smallest budget already does, "≤ smallest / E". Its interval: a 95% BCa
  bootstrap over seeds (`bca_interval`: better small-sample coverage than the percentile interval, measured by
  simulation in the tests), a resample beyond BN's budgets counting as its bound. A GPU user measures their
  own r (``benchmarks/train_step.py --opt adam``) and reads the answer off;
- **placebo**: a k=1 BNET with the default init *is* BN (its 1×1 depthwise kernel is gamma, its bias beta,
  both initialised and weight-decayed as BN's): trained through BNET's code it is an A/A test, whose
  differences from BN measure what the pipeline alone produces. Its rows are marked (`is_placebo`).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from bnet_fastai.analysis import stats

BUDGET_KEYS = ["dataset", "size", "recipe", "arch"]  # one budget study per recipe and arch
BOOT = 2000
COST_FILE = "cost.json"  # benchmarks/train_step.py --json, read from the experiment folder by default


def budget_studies(per_run: pd.DataFrame) -> list[tuple[dict, pd.DataFrame]]:
    """The (keys, runs) of every recipe × arch whose BN arm and at least one BNET arm have two or more budgets."""
    studies = []
    for keys, runs in per_run.groupby(BUDGET_KEYS):
        budgets = runs.groupby("variant")["epochs"].nunique()
        if budgets.get("bn", 0) >= 2 and (budgets.drop("bn") >= 2).any():
            studies.append((dict(zip(BUDGET_KEYS, keys)), runs))
    return studies


def crossing(budgets, accuracies, target: float) -> tuple[float, str]:
    """The budget at which the piecewise-linear curve first reaches `target`, and "reached",
    "at or below" (already at the smallest budget) or "not reached" (NaN)."""
    b, a = np.asarray(budgets, dtype=float), np.asarray(accuracies, dtype=float)
    if a[0] >= target:
        return float(b[0]), "at or below"
    for i in range(1, len(b)):
        if a[i] >= target:
            return float(b[i - 1] + (target - a[i - 1]) / (a[i] - a[i - 1]) * (b[i] - b[i - 1])), "reached"
    return float("nan"), "not reached"


def _matrix(runs: pd.DataFrame, variant: str) -> pd.DataFrame:
    """Final accuracy of one variant, seeds × budgets (NaN where a seed lacks a budget)."""
    table = runs[runs["variant"] == variant].pivot(index="seed", columns="epochs", values="final_accuracy")
    return table.sort_index(axis=1)


def paired_arms(per_run: pd.DataFrame):
    """For every budget study and BNET variant with two or more seeds complete in both arms: its keys, the
    variant, the paired seeds, and BN's and BNET's budgets and seeds × budgets accuracy matrices."""
    for keys, runs in budget_studies(per_run):
        bn_table = _matrix(runs, "bn").dropna()
        for variant in sorted(set(runs["variant"]) - {"bn"}):
            table = _matrix(runs, variant).dropna()
            seeds = sorted(set(bn_table.index) & set(table.index))
            if len(seeds) >= 2:
                yield (keys, variant, seeds, bn_table.columns.to_numpy(dtype=float), bn_table.loc[seeds].to_numpy(),
                       table.columns.to_numpy(dtype=float), table.loc[seeds].to_numpy())


def is_placebo(variant: str) -> bool:
    """A k=1 BNET with the default init (`bnet-k1-all`, `bnet-k1-last`): BN computed through BNET's code."""
    return variant.startswith("bnet-k1-") and variant.count("-") == 2


def bn_epochs_to_match(bn_budgets: np.ndarray, bn: np.ndarray, bnet_j: np.ndarray, pick: np.ndarray) -> np.ndarray:
    """The BN budget whose mean accuracy (over the seeds `pick`) equals BNET's mean at one budget, for a whole
    array of picks at once (`pick`: ... × n seed indices): linear between BN's budgets, BN's smallest budget
    where BN is there already, its largest where BN never gets there (a bound, never extrapolated)."""
    curve = bn[pick].mean(axis=-2)  # ... × BN budgets
    target = bnet_j[pick].mean(axis=-1)[..., None]
    reached = curve >= target
    first = np.argmax(reached, axis=-1)
    before = np.maximum(first - 1, 0)
    a0, a1 = np.take_along_axis(curve, before[..., None], -1)[..., 0], np.take_along_axis(curve, first[..., None], -1)[..., 0]
    b0, b1 = bn_budgets[before], bn_budgets[first]
    with np.errstate(invalid="ignore", divide="ignore"):
        between = b0 + (target[..., 0] - a0) / (a1 - a0) * (b1 - b0)
    return np.where(~reached.any(axis=-1), bn_budgets.max(), np.where(first == 0, bn_budgets.min(), between))


BREAK_EVEN_CI = ("95% BCa bootstrap over seeds, expanded for small samples ({boot} resamples, seed {seed}; "
                 "scipy.stats.bootstrap), a resample beyond BN's budgets counting as the bound")


def expanded_level(n: int, level: float = 0.95) -> float:
    """The bootstrap confidence level that gives `level` with n seeds: Hesterberg's small-sample expansion (each
    tail at Φ(−√(n/(n−1))·t_{n−1}) instead of (1 − level)/2), which undoes the bootstrap's too-narrow spread with
    few seeds (0.9785 for 12 seeds, 0.9682 for 20)."""
    from scipy import stats as scipy_stats

    if n < 2:
        return level
    tail = scipy_stats.norm.cdf(-np.sqrt(n / (n - 1)) * scipy_stats.t.ppf(1 - (1 - level) / 2, n - 1))
    return float(1 - 2 * tail)


def bca_interval(statistic, n: int, boot: int = BOOT, seed: int = 0) -> tuple[float, float, str]:
    """95% bias-corrected and accelerated (BCa) bootstrap interval of `statistic(pick)` over n seeds
    (`pick`: ... × n seed indices, vectorised) at the `expanded_level`, and how it was computed. With 12 seeds
    the plain percentile interval of a break-even ratio covers about 92%, this one about 95.5%
    (tests/test_report_faults.py measures both by simulation). Where BCa is undefined (every resample on one
    side of the estimate, e.g. at a bound) the expanded percentile interval is given, and named."""
    import warnings

    from scipy import stats as scipy_stats

    level = expanded_level(n)
    estimate = float(statistic(np.arange(n)))
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns where BCa is undefined: handled below
        result = scipy_stats.bootstrap((np.arange(n),), lambda idx, axis=-1: statistic(idx.astype(int)),
                                       vectorized=True, n_resamples=boot, method="BCa", confidence_level=level,
                                       random_state=np.random.default_rng(seed))
    values = result.bootstrap_distribution  # the same resamples serve the checks and the fallback
    if np.ptp(values) <= 1e-12 * max(1.0, abs(estimate)):  # equal up to float rounding: no spread to bootstrap
        return estimate, estimate, "all resamples equal"
    low, high = result.confidence_interval
    if np.isfinite(low) and np.isfinite(high) and low <= estimate <= high:
        return float(low), float(high), "BCa"
    low, high = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high), "percentile (BCa undefined at a bound)"


def break_even(per_run: pd.DataFrame, cost: list[dict] | float | None = None, boot: int = BOOT,
               seed: int = 0) -> pd.DataFrame:
    """One row per budget study × BNET variant × BNET budget: the break-even step-cost ratio (see the module
    docstring), its BCa bootstrap interval (`bca_interval`), and this machine's measured ratio (`cost`) beside it."""
    rows = []
    for keys, variant, seeds, bn_budgets, bn, budgets, bnet in paired_arms(per_run):
        ratio, low_ratio, high_ratio, source = cost_ratio(cost, keys, variant)
        low_bound, high_bound = bn_budgets.min(), bn_budgets.max()
        for j, budget in enumerate(budgets):
            value, how = crossing(bn_budgets, bn.mean(axis=0), bnet[:, j].mean())
            low, high, method = bca_interval(
                lambda pick, j=j: bn_epochs_to_match(bn_budgets, bn, bnet[:, j], pick), len(seeds), boot, seed)
            bn_match = high_bound if how == "not reached" else value
            rows.append({**keys, "variant": variant, "is_placebo": is_placebo(variant), "n_pairs": len(seeds),
                         "seeds": ",".join(map(str, seeds)), "bnet_epochs": int(budget),
                         "bnet_accuracy_mean": bnet[:, j].mean(), "bn_budgets": ",".join(str(int(b)) for b in bn_budgets),
                         "bn_epochs_to_match": bn_match, "match": how,
                         "bound": {"reached": "", "at or below": "<=", "not reached": ">="}[how],
                         "break_even": bn_match / budget, "ci_low": low / budget, "ci_high": high / budget,
                         "ci_low_bound": _bound(low, low_bound, high_bound),
                         "ci_high_bound": _bound(high, low_bound, high_bound),
                         "cost_ratio": ratio, "cost_ratio_low": low_ratio, "cost_ratio_high": high_ratio,
                         "cost_source": source, "ci_method": BREAK_EVEN_CI.format(boot=boot, seed=seed),
                         "ci_how": method})
    return pd.DataFrame(rows)


def _bound(value: float, smallest: float, largest: float) -> str:
    """"<=" at BN's smallest budget (BN is there already), ">=" at its largest (BN does not get there), else ""."""
    return "<=" if value <= smallest else ">=" if value >= largest else ""


def epochs_to_match(per_run: pd.DataFrame, boot: int = BOOT, seed: int = 0) -> pd.DataFrame:
    """One row per budget study × BNET variant × BN reference budget (see the module docstring)."""
    rows = []
    for keys, variant, seeds, bn_budgets, bn, budgets, bnet in paired_arms(per_run):
        draws = np.random.default_rng(seed).integers(0, len(seeds), size=(boot, len(seeds)))
        for j, reference in enumerate(bn_budgets):
            target = bn[:, j].mean()
            value, how = crossing(budgets, bnet.mean(axis=0), target)
            resampled = []
            for pick in draws:
                v, h = crossing(budgets, bnet[pick].mean(axis=0), bn[pick, j].mean())
                resampled.append(np.inf if h == "not reached" else v)
            # order statistics, no interpolation between them: "not reached" (inf) stays inf
            low, high = np.quantile(resampled, [0.025, 0.975], method="inverted_cdf")
            rows.append({**keys, "variant": variant, "n_pairs": len(seeds),
                         "seeds": ",".join(map(str, seeds)), "bn_epochs": int(reference),
                         "largest_bn_budget": reference == bn_budgets.max(), "target": target,
                         "bnet_budgets": ",".join(str(int(b)) for b in budgets), "epochs_to_match": value,
                         "match": how, "ratio_to_bn_epochs": value / reference,
                         "ci_low": low, "ci_high": high,
                         "ci_method": f"95% percentile bootstrap over seeds ({boot} resamples, seed {seed})"})
    return pd.DataFrame(rows)


_COST_KEYS = ("arch", "size", "bs", "format", "variant", "ratio_to_bn")


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value) and value > 0


def read_cost(path: str | Path) -> list[dict]:
    """The rows of a ``benchmarks/train_step.py --json`` file, each with the file's command, machine and how its
    interval was measured; ValueError in one line, naming the file and the row, when it is missing, not such a
    file, or a ratio is not a number > 0 (a ratio_low/ratio_high pair must hold the ratio between them)."""
    try:
        data = json.loads(Path(path).read_text())
        rows = data["rows"]
        if not isinstance(rows, list):
            raise TypeError("rows is not a list")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"cannot read the cost ratios in {path} ({type(e).__name__}): give the JSON that "
                         f"benchmarks/train_step.py --json writes, or --cost-ratio R") from None
    for i, row in enumerate(rows):
        where = f"{path}, row {i}"
        missing = [k for k in _COST_KEYS if not isinstance(row, dict) or k not in row]
        if missing:
            raise ValueError(f"{where} lacks {', '.join(missing)}: give the JSON benchmarks/train_step.py --json writes")
        ends = [row.get("ratio_low"), row.get("ratio_high")]
        if not _positive(row["ratio_to_bn"]) or any(e is not None and not _positive(e) for e in ends):
            raise ValueError(f"{where} ({row['variant']}): a step-time ratio must be a number > 0, got "
                             f"ratio_to_bn={row['ratio_to_bn']!r}, ratio_low={ends[0]!r}, ratio_high={ends[1]!r}")
        if (ends[0] is None) != (ends[1] is None) or (ends[0] is not None and not ends[0] <= row["ratio_to_bn"] <= ends[1]):
            raise ValueError(f"{where} ({row['variant']}): ratio_low <= ratio_to_bn <= ratio_high must hold, got "
                             f"{ends[0]!r}, {row['ratio_to_bn']!r}, {ends[1]!r}")
    return [{**row, "source": data.get("command", str(path)), "machine": data.get("machine", ""),
             "measure": data.get("measure", "")} for row in rows]


def cost_ratio(cost: list[dict] | float | None, keys: dict, variant: str) -> tuple[float, float, float, str]:
    """BNET/BN step-time ratio for this arch, size, batch and memory format, its 95% interval (the ratio itself
    at both ends where the measurement has none), and where it came from."""
    if cost is None:
        return float("nan"), float("nan"), float("nan"), "no cost measurement"
    if isinstance(cost, (int, float)):
        if not _positive(cost):
            raise ValueError(f"the cost ratio must be a number > 0, got {cost!r}")
        return float(cost), float(cost), float(cost), "given as --cost-ratio"
    settings = dict(item.split("=", 1) for item in keys["recipe"].split())
    fmt = "channels_last" if settings.get("channels_last", "True") == "True" else "nchw"
    for row in cost:
        if (row["arch"], row["size"], str(row["bs"]), row["format"], row["variant"]) == (
                keys["arch"], keys["size"], settings.get("bs"), fmt, variant):
            ratio = float(row["ratio_to_bn"])
            low, high = row.get("ratio_low"), row.get("ratio_high")  # absent or null: no interval measured
            return (ratio, ratio if low is None else float(low), ratio if high is None else float(high),
                    f"{row['source']} ({row['machine']})")
    return float("nan"), float("nan"), float("nan"), (f"no measurement for {keys['arch']} {variant} at "
                                                      f"{keys['size']} px, batch {settings.get('bs')}, {fmt}")


def _equal_cost_row(bn_budgets, bn, bnet_j, budget, ratio, n_valid: float) -> dict | str:
    """BNET at `budget` against BN interpolated per seed at ratio × budget: the paired comparison, or why not.
    Its p is computed on counts of correct test images (BN's interpolated) where the accuracies are counts of
    `n_valid` images (`stats.to_counts`)."""
    at = ratio * budget
    if not np.isfinite(at):
        return "no ratio"
    if not bn_budgets.min() <= at <= bn_budgets.max():
        return f"not computed: BN's budgets are {int(bn_budgets.min())}-{int(bn_budgets.max())} epochs"
    bn_at = np.array([np.interp(at, bn_budgets, curve) for curve in bn])
    diff = bnet_j - bn_at
    low, high = stats.bounded_t_interval(diff, -1.0, 1.0)
    bn_counts, bnet_counts = stats.to_counts(bn, n_valid), stats.to_counts(bnet_j, n_valid)
    counted = None if bn_counts is None or bnet_counts is None else \
        bnet_counts - np.array([np.interp(at, bn_budgets, curve) for curve in bn_counts])
    p, method = stats.sign_flip_p(diff if counted is None else counted)
    on = "on accuracies" if counted is None else "on counts of correct test images"
    return {"bn_accuracy_mean": bn_at.mean(), "diff_mean": diff.mean(), "diff_ci_low": low, "diff_ci_high": high,
            "p": p, "p_method": f"{method}, {on}"}


def _n_valid(per_run: pd.DataFrame, keys: dict) -> float:
    """The number of validation images of a budget study's runs (NaN when unknown or not one number)."""
    values = per_run.merge(pd.DataFrame([keys]))["n_valid"].unique() if "n_valid" in per_run else []
    return float(values[0]) if len(values) == 1 else float("nan")


def equal_cost(per_run: pd.DataFrame, cost: list[dict] | float | None, end: float | None = None) -> pd.DataFrame:
    """One row per budget study × BNET variant × BNET budget: BNET at E vs BN interpolated at ratio × E.

    `end` prices every variant at a point of its ratio's interval instead of the ratio: 0 its low end, 1 its
    high end, linear between (`price_verdicts`)."""
    rows = []
    for keys, variant, seeds, bn_budgets, bn, budgets, bnet in paired_arms(per_run):
        ratio, low, high, source = cost_ratio(cost, keys, variant)
        n_valid = _n_valid(per_run, keys)
        if end is not None:
            ratio = low + end * (high - low)
        for j, budget in enumerate(budgets):
            row = {**keys, "variant": variant, "n_pairs": len(seeds), "seeds": ",".join(map(str, seeds)),
                   "bnet_epochs": int(budget), "cost_ratio": ratio, "cost_ratio_low": low, "cost_ratio_high": high,
                   "cost_source": source, "bn_epochs_equal_cost": ratio * budget,
                   "bnet_accuracy_mean": bnet[:, j].mean()}
            compared = _equal_cost_row(bn_budgets, bn, bnet[:, j], budget, ratio, n_valid)
            rows.append({**row, "note": source if compared == "no ratio" else compared}
                        if isinstance(compared, str) else {**row, **compared, "note": ""})
    return pd.DataFrame(rows)


def _holm_verdicts(table: pd.DataFrame) -> list[str]:
    """Each row's verdict from Holm over the table's comparisons (one family), "" where none was made."""
    if table.empty or "p" not in table:
        return [""] * len(table)
    adjusted = stats.holm(table["p"])
    return ["" if note else stats.verdict(m, q) for m, q, note in zip(table["diff_mean"], adjusted, table["note"])]


def price_verdicts(table: pd.DataFrame, per_run: pd.DataFrame, cost: list[dict] | float | None,
                   steps: int = 40) -> pd.DataFrame:
    """`table` (`equal_cost` at the measured ratios, with its Holm verdicts) priced over every ratio's 95% interval:
    every variant at the same point of its interval, on a grid of `steps` + 1 points from the low end to the high
    end, each point a Holm family of its own (the comparisons made there: a point where BN's budgets do not reach
    ratio × E makes none, and the family is the smaller by it). Where every compared point agrees, that is the row's
    verdict; otherwise it is "depends on the price", ``flip_ratio`` is the first ratio at which it changes, and
    ``verdict_low`` / ``verdict_high`` are the verdicts at the lowest and highest compared points."""
    if table.empty or "verdict" not in table:  # nothing compared (no cost measurement): nothing to price
        return table.assign(verdict_low="", verdict_high="", flip_ratio=float("nan"))
    grid = [equal_cost(per_run, cost, end=t / steps) for t in range(steps + 1)]
    verdicts = np.array([_holm_verdicts(g) for g in grid])  # grid point x row
    table = table.copy()
    lows, highs, flips, final = [], [], [], []
    for i, row in enumerate(table.itertuples()):
        made = [(t, v) for t, v in enumerate(verdicts[:, i]) if v]  # the grid points where it was compared
        lows.append(made[0][1] if made else "")
        highs.append(made[-1][1] if made else "")
        if row.note or not made or all(v == made[0][1] for _, v in made):
            flips.append(float("nan"))
            final.append(row.verdict if row.note or not made else made[0][1])
            continue
        at = next(t for t, v in made if v != made[0][1])
        flips.append(float(grid[at]["cost_ratio"].iloc[i]))
        final.append("depends on the price")
    table["verdict_low"], table["verdict_high"] = lows, highs
    table["flip_ratio"], table["verdict"] = flips, final
    return table
