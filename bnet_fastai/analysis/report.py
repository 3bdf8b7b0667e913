"""Analysis of an experiment folder: one tidy DataFrame of every run, statistics across seeds, plots.

Definitions (each per run, then summarised across seeds of one dataset × size × epochs × arch × variant):
- final accuracy: validation accuracy after the last epoch; its 95% interval over seeds is Student's t
  computed on the logit scale and mapped back (`bounded_t_interval`), so it stays inside [0, 1] even with
  two seeds near 100% (a plain t interval reaches past 1);
- paired difference: BNET − BN on the same seed (same init seed, same data order), with the same interval
  on the [−1, 1] scale (the logit of (d + 1) / 2, i.e. 2·atanh(d)); for small differences it is the plain
  t interval;
- epochs (seconds) to target: the first epoch whose accuracy reaches `target` (and the training time up to
  its end); runs that never reach it count in ``n_reached`` only;
- AUC: the area under the validation-accuracy curve with one unit per epoch, divided by the number of
  epochs (the mean accuracy over epochs): higher means faster convergence;
- loss spread: the standard deviation across seeds of the validation (train) loss at each epoch, averaged
  over epochs: the run-to-run spread behind the claim that BNET trains "more stably";
- test SE: the binomial standard error of the mean final accuracy on the run's validation images, the test
  set's own sampling error, which the interval over seeds (on that one fixed set) does not include;
- p, adjusted p, verdict (`bnet_fastai.analysis.stats`): every paired comparison has an exact sign-flip p-value; Holm's
  adjustment runs over a family, and the verdict follows the adjusted p at 0.05. Families: "equal epochs"
  (every final-accuracy row of paired.csv, at every budget) and, for budget studies, "equal cost" (every row
  of equal_cost.csv). AUC differences carry an unadjusted p, as a secondary measure. An equal-cost verdict
  holds only where it holds at both ends of the step-cost ratio's 95% interval (cost.json's ratio_low and
  ratio_high; each end a Holm family of its own); otherwise it reads "depends on the price", with the ratio
  where it changes (`budget.price_verdicts`).

Runs of one recipe that differ only in `epochs` form a budget study (`bnet_fastai.analysis.budget`): each budget keeps
its rows in summary.csv and paired.csv, and epochs_to_match.csv, equal_cost.csv, break_even.csv and budget.png
compare them. Holm's families then run over every BNET variant × budget of the report, the placebo included.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from bnet_fastai.analysis import budget, stats
from bnet_fastai._files import atomic_write
from bnet_fastai.runs.config import ADDED_LATER, NO_RESULT_CHANGE
from bnet_fastai.runs.runstate import CONFIG_KEYS, check_run, read_status
from bnet_fastai.analysis.stats import CI_METHOD, bounded_t_interval

STUDY_KEYS = ["dataset", "size", "epochs", "recipe"]
GROUP_KEYS = STUDY_KEYS + ["arch", "variant"]
# Settings that are neither the study's keys nor the compared arm: runs that differ in any of them are
# different experiments, told apart by `recipe` (e.g. "lr=0.003 bs=64 ..."), never averaged together.
_NOT_RECIPE = {"arch", "norm", "k", "placement", "bnet_init", "seed", "dataset", "size", "epochs", *NO_RESULT_CHANGE}


@dataclass
class Runs:
    """An experiment folder, loaded: per-epoch history of finished runs, their kernels, and what was left out."""

    history: pd.DataFrame
    kernels: pd.DataFrame
    skipped: pd.DataFrame


def variant(config: dict) -> str:
    """`bn`, or `bnet-k3-all` / `bnet-k5-last` (`-zero`, ... for a non-default init): the norm arm of a run."""
    if config["norm"] != "bnet":
        return config["norm"]
    init = config.get("bnet_init", "auto")
    return f"bnet-k{config['k']}-{config['placement']}" + ("" if init == "auto" else f"-{init}")


def recipe(config: dict) -> str:
    """The settings shared by both arms of a comparison, as text: lr, wd, bs, optimizer, ...

    Fields added to `RunConfig` later are named only when they differ from their default, so runs written
    before them and runs written after read as the same recipe.
    """
    return " ".join(f"{k}={config[k]}" for k in sorted(config)
                    if k not in _NOT_RECIPE and not (k in ADDED_LATER and config[k] == ADDED_LATER[k]))


def _seconds(text: str) -> float:
    parts = [float(p) for p in str(text).split(":")]
    return sum(p * 60 ** i for i, p in enumerate(reversed(parts)))


def _usable(run_dir: Path) -> bool:
    """Finished and not damaged since (`check_run`): a run a report may compute from."""
    status = read_status(run_dir)
    return status["status"] == "finished" and check_run(run_dir, status) is None


def _recorded_run_id(run_dir: Path) -> str | None:
    """The run_id a run folder's config.json records; None when it cannot be read."""
    try:
        recorded = json.loads((run_dir / "config.json").read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None
    return recorded if isinstance(recorded, str) else None


def _run_dirs(experiments: list[Path]) -> tuple[list[Path], list[dict]]:
    """The run folders of `experiments`, one per run (the run_id its config.json records, else the folder's
    name), and the copies left out.

    Of the folders holding one run, the one named after its run_id wins over a renamed copy (a backup
    ``<run_id>.old`` counts nowhere, whatever it holds), then a finished, intact one over an unfinished or damaged
    one, then the first folder given; a renamed folder that is the only one holding its run is the run. A renamed
    copy that loses is named in `skipped`; the same run in two experiment folders counts once, and the copy not
    counted is named in `skipped` too."""
    groups: dict[str, list[Path]] = {}
    for experiment in experiments:
        for run_dir in sorted(p for p in experiment.iterdir() if p.is_dir() and not p.name.startswith(".")):
            groups.setdefault(_recorded_run_id(run_dir) or run_dir.name, []).append(run_dir)
    chosen, copies = [], []
    for run_id, dirs in groups.items():
        best = dirs[0] if len(dirs) == 1 else min(dirs, key=lambda d: (d.name != run_id, not _usable(d)))
        chosen.append(best)
        copies += [{"run_id": d.name, "status": "copy", "folder": str(d.parent),
                    "reason": f"{d} is a copy of {best} (run_id {run_id}), counted once"
                    if d.name != run_id else f"the same run as {best}, which is counted (the first folder given "
                                             f"wins among intact copies)"}
                   for d in dirs if d is not best]
    return chosen, copies


def load_runs(experiments: str | Path | list) -> Runs:
    """Every run folder of one experiment folder or several; runs that are not `finished`, or whose files
    were damaged since they finished (`check_run`: status ``damaged``, the reason names the file), and renamed
    copies of a run (`_run_dirs`: status ``copy``) are left out, with the reason."""
    experiments = [Path(e) for e in (experiments if isinstance(experiments, (list, tuple)) else [experiments])]
    histories, kernels = [], []
    run_dirs, skipped = _run_dirs(experiments)
    for run_dir in run_dirs:
        status = read_status(run_dir)
        damage = check_run(run_dir, status) if status["status"] == "finished" else None
        if damage:  # never computed from: a damaged file would give wrong statistics or a parser error
            status = {"status": "damaged", "reason": damage}
        if status["status"] != "finished":
            reason = status.get("error") or status.get("reason") or ""
            skipped.append({"run_id": run_dir.name, "status": status["status"], "reason": reason,
                            "folder": str(run_dir.parent)})
            continue
        written = json.loads((run_dir / "config.json").read_text())
        config = written["config"]
        keys = {k: config[k] for k in CONFIG_KEYS}
        environment = written.get("environment", {})
        keys.update(variant=variant(config), recipe=recipe(config), run_id=run_dir.name,
                    n_valid=written.get("dataset", {}).get("n_valid", np.nan),
                    git_commit=str(environment.get("git_commit", ""))[:7], torch_threads=environment.get("torch_threads"),
                    bnet_impl=written.get("training", {}).get("bnet_impl", "torch (before bnet_impl was recorded)")
                    if config["norm"] == "bnet" else "")
        history = pd.read_csv(run_dir / "history.csv")
        history["epoch"] = history["epoch"] + 1  # 1-based: the row after epoch 1 has epoch 1
        history["seconds"] = history["time"].map(_seconds).cumsum()
        histories.append(history.drop(columns="time").assign(**keys))
        if (run_dir / "kernels.json").exists():
            layers = pd.DataFrame(json.loads((run_dir / "kernels.json").read_text()))
            kernels.append(layers.assign(**keys))
    return Runs(pd.concat(histories, ignore_index=True) if histories else pd.DataFrame(),
                pd.concat(kernels, ignore_index=True) if kernels else pd.DataFrame(),
                pd.DataFrame(skipped, columns=["run_id", "status", "reason", "folder"]))


class NoFinishedRun(ValueError):
    """`report` found no run to compute from; `skipped` lists every run left out, with its reason."""

    def __init__(self, message: str, skipped: pd.DataFrame):
        super().__init__(message)
        self.skipped = skipped


def per_run(history: pd.DataFrame, target: float | dict[str, float]) -> pd.DataFrame:
    """One row per run: final accuracy, AUC, epochs and seconds to `target` (one for all, or one per
    dataset: {dataset: accuracy}), final losses."""
    keys, rows = GROUP_KEYS + ["seed"], []
    for values, run in history.groupby(keys):
        run = run.sort_values("epoch")
        reached = run[run["accuracy"] >= _target_of(target, values[0])]
        counts = stats.to_counts(run["accuracy"], run["n_valid"])  # None: not counts of n_valid images
        rows.append({**dict(zip(keys, values)), "final_accuracy": run["accuracy"].iloc[-1],
                     "correct": np.nan if counts is None else counts[-1],
                     "auc": run["accuracy"].mean(), "auc_correct": np.nan if counts is None else counts.sum(),
                     "epochs_to_target": reached["epoch"].iloc[0] if len(reached) else np.nan,
                     "seconds_to_target": reached["seconds"].iloc[0] if len(reached) else np.nan,
                     "final_valid_loss": run["valid_loss"].iloc[-1],
                     "final_train_loss": run["train_loss"].iloc[-1], "n_valid": run["n_valid"].iloc[0]})
    return pd.DataFrame(rows)


def _target_of(target: float | dict[str, float], dataset: str) -> float:
    return target[dataset] if isinstance(target, dict) else target


def _spread(history: pd.DataFrame, column: str) -> pd.Series:
    return history.groupby(GROUP_KEYS + ["epoch"])[column].std(ddof=1).groupby(GROUP_KEYS).mean()


def summarize(history: pd.DataFrame, target: float | dict[str, float] = 0.8) -> pd.DataFrame:
    """One row per dataset × size × epochs × arch × variant (see the module docstring for definitions)."""
    runs = per_run(history, target)
    rows = []
    for keys, group in runs.groupby(GROUP_KEYS):
        low, high = bounded_t_interval(group["final_accuracy"])
        rows.append({**dict(zip(GROUP_KEYS, keys)), "n_seeds": len(group),
                     "seeds": ",".join(map(str, sorted(group["seed"]))),
                     "final_accuracy_mean": group["final_accuracy"].mean(),
                     "final_accuracy_std": group["final_accuracy"].std(ddof=1),
                     "final_accuracy_ci_low": low, "final_accuracy_ci_high": high, "ci_method": CI_METHOD,
                     "test_se": stats.binomial_se(group["final_accuracy"].mean(), group["n_valid"].min()),
                     "target": _target_of(target, keys[0]), "n_reached": int(group["epochs_to_target"].notna().sum()),
                     "epochs_to_target_mean": group["epochs_to_target"].mean(),
                     "seconds_to_target_mean": group["seconds_to_target"].mean(),
                     "auc_mean": group["auc"].mean(), "auc_std": group["auc"].std(ddof=1),
                     "final_train_loss_mean": group["final_train_loss"].mean(),
                     "final_valid_loss_mean": group["final_valid_loss"].mean()})
    summary = pd.DataFrame(rows).set_index(GROUP_KEYS)
    summary["valid_loss_spread"] = _spread(history, "valid_loss")
    summary["train_loss_spread"] = _spread(history, "train_loss")
    return _recipe_last(summary.reset_index())


def _recipe_last(table: pd.DataFrame) -> pd.DataFrame:
    """The long `recipe` text as the last column, so tables read dataset, size, epochs, arch, variant, ..."""
    return table[[c for c in table.columns if c != "recipe"] + ["recipe"]] if len(table) else table


PAIRED_COLUMNS = [*GROUP_KEYS, "n_pairs", "seeds",
                  *[f"{metric}_{what}" for metric in ("final_accuracy", "auc")
                    for what in ("diff_mean", "diff_ci_low", "diff_ci_high", "p")], "ci_method", "p_method"]


def paired_differences(history: pd.DataFrame, target: float | dict[str, float] = 0.8) -> pd.DataFrame:
    """BNET − BN per seed, for each BNET variant of each arch: mean difference, its 95% t interval and its
    sign-flip p-value (adjusted over the report's family by `report`)."""
    runs = per_run(history, target).set_index(STUDY_KEYS + ["arch", "seed"])
    bn = runs[runs["variant"] == "bn"]
    rows = []
    for keys, group in runs[runs["variant"] != "bn"].groupby(GROUP_KEYS):
        pairs = group.merge(bn, left_index=True, right_index=True, suffixes=("", "_bn"))
        if pairs.empty:  # runs, but no seed with both arms: nothing to compare (the markdown says so)
            continue
        row = {**dict(zip(GROUP_KEYS, keys)), "n_pairs": len(pairs),
               "seeds": ",".join(str(i[-1]) for i in pairs.index)}
        for metric, count in (("final_accuracy", "correct"), ("auc", "auc_correct")):
            diff = pairs[metric] - pairs[f"{metric}_bn"]
            counted = pairs[count] - pairs[f"{count}_bn"]  # whole numbers: ties are found exactly
            low, high = bounded_t_interval(diff, -1.0, 1.0)
            p, method = stats.sign_flip_p(counted if counted.notna().all() else diff)
            row.update({f"{metric}_diff_mean": diff.mean(), f"{metric}_diff_ci_low": low,
                        f"{metric}_diff_ci_high": high, f"{metric}_p": p})
        on = "on counts of correct test images" if counted.notna().all() else "on accuracies"
        rows.append({**row, "ci_method": CI_METHOD, "p_method": f"{stats.P_METHOD} ({method}, {on})"})
    return _recipe_last(pd.DataFrame(rows, columns=PAIRED_COLUMNS))  # no BNET arm: the header alone


def study_title(history: pd.DataFrame) -> str:
    """Dataset, image size, epochs and seeds of `history` (one study), for every title and table."""
    first = history.iloc[0]
    seeds = ",".join(map(str, sorted(history["seed"].unique())))
    return f"{first['dataset']}, {first['size']} px, {first['epochs']} epochs, seeds {seeds}"


def study_label(history: pd.DataFrame) -> str:
    """`study_title` and, on a second line, the main settings of the shared recipe (lr, bs, optimizer, wd)."""
    settings = dict(item.split("=", 1) for item in history["recipe"].iloc[0].split())
    main = [f"{k} {settings[k]}" for k in ("opt", "lr", "bs", "wd") if k in settings]
    if settings.get("fraction", "1.0") != "1.0":
        main.append(f"train fraction {settings['fraction']}")
    return f"{study_title(history)}\n{', '.join(main)}"


def auto_target(history: pd.DataFrame) -> float:
    """90% of the best mean final accuracy, floored to 0.01: a target every arm can be timed against."""
    best = history.sort_values("epoch").groupby(GROUP_KEYS + ["seed"])["accuracy"].last().groupby(GROUP_KEYS).mean()
    return float(np.floor(0.9 * best.max() * 100) / 100)


def auto_targets(history: pd.DataFrame) -> dict[str, float]:
    """`auto_target` of each dataset's runs: a report of two datasets never times one against the other's."""
    return {dataset: auto_target(runs) for dataset, runs in history.groupby("dataset")}


def adjust(table: pd.DataFrame, p_column: str, mean_column: str, family: str) -> pd.DataFrame:
    """`table` with Holm-adjusted p over all its rows (one family, named), and the verdict from it."""
    if p_column not in table:
        return table
    if table.empty:  # the header alone, with the columns a family adds
        return table.assign(family=pd.Series(dtype=str), family_size=pd.Series(dtype=int),
                            p_holm=pd.Series(dtype=float), verdict=pd.Series(dtype=str))
    table = table.copy()
    table["family"] = family
    table["family_size"] = int(table[p_column].notna().sum())  # the comparisons Holm adjusted over
    table["p_holm"] = stats.holm(table[p_column])
    table["verdict"] = [stats.verdict(m, q) for m, q in zip(table[mean_column], table["p_holm"])]
    return table


def drop_one_seed(table: pd.DataFrame, rebuild, keys: list[str], seeds, p_column: str = "p") -> pd.DataFrame:
    """`table` with ``kept_dropping_one`` (of ``n_drops``): for how many of `seeds` the row's verdict stays the same
    when that seed is dropped from every comparison at once and the family recomputed (`rebuild(seed)` gives the
    table without it). A verdict kept under every drop does not hang on one seed."""
    table = table.copy()
    seeds = sorted(set(seeds))
    if table.empty or "verdict" not in table or len(seeds) < 2:  # one seed: dropping it leaves nothing to compare
        return table.assign(kept_dropping_one=np.nan, n_drops=np.nan) if len(table) else \
            table.assign(kept_dropping_one=pd.Series(dtype=float), n_drops=pd.Series(dtype=float))
    kept = np.zeros(len(table), dtype=int)
    rows = list(table[keys].itertuples(index=False, name=None))
    for seed in seeds:
        other = rebuild(seed)
        verdicts = dict(zip(other[keys].itertuples(index=False, name=None), other["verdict"])) if len(other) else {}
        kept += [verdicts.get(row) == v for row, v in zip(rows, table["verdict"])]
    compared = table[p_column].notna() if p_column in table else pd.Series(False, index=table.index)
    table["kept_dropping_one"] = np.where(compared, kept, np.nan)
    table["n_drops"] = np.where(compared, len(seeds), np.nan)
    return table


def report(experiments: str | Path | list, target: float | None = None,
           out: str | Path | None = None, cost: str | Path | float | None = None) -> dict[str, pd.DataFrame]:
    """Write ``summary.csv``, ``paired.csv`` and PNG plots of one experiment folder (into it) or of several
    combined (into `out`); returns the tables. For budget studies also ``epochs_to_match.csv``,
    ``equal_cost.csv``, ``break_even.csv`` and ``budget.png``.

    `target` is the accuracy for "epochs to target", for every dataset (None: each dataset's `auto_target`). `cost` is the BNET/BN step-time
    ratio for equal-cost comparisons: a ``benchmarks/train_step.py --json`` file, a number, or None for the
    first experiment folder's ``cost.json`` when there is one. Runs that are not finished, or
    are damaged, are left out and listed (``skipped``) with their status and reason; if that is every run,
    `NoFinishedRun` (a ValueError) carries the list. Runs of different recipes are
    never pooled: each recipe keeps its own rows and its own figures.
    """
    from bnet_fastai.analysis.plots import plot_budgets, plot_curves, plot_final_accuracy, plot_kernels

    folders = [Path(e) for e in (experiments if isinstance(experiments, (list, tuple)) else [experiments])]
    for folder in folders:
        if not folder.is_dir():
            raise ValueError(f"no experiment folder at {folder}: give the --out folder of a run or sweep")
    if out is None and len(folders) > 1:
        raise ValueError("several experiment folders are combined into one report: name its folder with --out")
    if cost is None and (folders[0] / budget.COST_FILE).is_file():
        cost = folders[0] / budget.COST_FILE
    if isinstance(cost, (str, Path)):
        cost = budget.read_cost(cost)
    experiment = Path(out) if out is not None else folders[0]
    experiment.mkdir(parents=True, exist_ok=True)
    runs = load_runs(folders)
    if runs.history.empty:
        reasons = "; ".join(f"{r.run_id}: {r.status}{' (' + r.reason + ')' if r.reason else ''}"
                            for r in runs.skipped.itertuples())
        raise NoFinishedRun(f"no finished run in {', '.join(map(str, folders))}"
                            + (f": {reasons}" if reasons else " (no run folder)"), runs.skipped)
    target = auto_targets(runs.history) if target is None else target  # one per dataset, or the one given
    summary = summarize(runs.history, target)
    def equal_epochs(history: pd.DataFrame) -> pd.DataFrame:
        return adjust(paired_differences(history, target), "final_accuracy_p", "final_accuracy_diff_mean",
                      "equal epochs")

    seeds = runs.history["seed"].unique()
    paired = drop_one_seed(equal_epochs(runs.history), lambda s: equal_epochs(runs.history[runs.history["seed"] != s]),
                           GROUP_KEYS, seeds, "final_accuracy_p")
    atomic_write(experiment / "summary.csv", summary.to_csv(index=False))
    atomic_write(experiment / "paired.csv", paired.to_csv(index=False))
    tables = {"summary": summary, "paired": paired, "skipped": runs.skipped, "history": runs.history}
    one_per_run = per_run(runs.history, target)
    if budget.budget_studies(one_per_run):
        tables["epochs_to_match"] = budget.epochs_to_match(one_per_run)
        def priced(runs_: pd.DataFrame) -> pd.DataFrame:
            return budget.price_verdicts(adjust(budget.equal_cost(runs_, cost), "p", "diff_mean", "equal cost"),
                                         runs_, cost)

        tables["equal_cost"] = drop_one_seed(priced(one_per_run), lambda s: priced(one_per_run[one_per_run["seed"] != s]),
                                             [*budget.BUDGET_KEYS, "variant", "bnet_epochs"], seeds)
        tables["break_even"] = budget.break_even(one_per_run, cost)
        for name in ("epochs_to_match", "equal_cost", "break_even"):
            atomic_write(experiment / f"{name}.csv", tables[name].to_csv(index=False))
        plot_budgets(one_per_run, tables["equal_cost"], experiment / "budget.png", paired, tables["break_even"])
    studies = list(runs.history.groupby(STUDY_KEYS))
    budgets = [dict(zip(STUDY_KEYS, keys))["epochs"] for keys, _ in studies]
    for number, (keys, history) in enumerate(studies, 1):
        # one figure set per study: named by its budget where that tells them apart (curves_4ep.png), else numbered
        suffix = ("" if len(studies) == 1 else f"_{budgets[number - 1]}ep" if len(set(budgets)) == len(studies)
                  else f"_{number}")
        title = study_label(history)
        plot_curves(history, title, experiment / f"curves{suffix}.png")
        plot_final_accuracy(summary.merge(pd.DataFrame([dict(zip(STUDY_KEYS, keys))])), title,
                            experiment / f"final_accuracy{suffix}.png")
        kernels = runs.kernels.merge(pd.DataFrame([dict(zip(STUDY_KEYS, keys))])) if len(runs.kernels) else runs.kernels
        if len(kernels):
            plot_kernels(kernels, title, experiment / f"kernels{suffix}.png")
    return tables
