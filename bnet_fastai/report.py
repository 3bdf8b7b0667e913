"""Reports: every run of an experiment folder in one tidy DataFrame, a summary table and plots."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from ._files import atomic_write
from .train import read_status

SUMMARY_KEYS = ["dataset", "size", "epochs", "arch", "variant"]


def _variant(config: dict) -> str:
    return f"bnet-k{config['k']}-{config['placement']}" if config["norm"] == "bnet" else config["norm"]


def load_runs(experiment: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(history, skipped): one row per run × epoch of every finished run, and the runs left out, with why."""
    rows, skipped = [], []
    for run_dir in sorted(p for p in Path(experiment).iterdir() if p.is_dir()):
        status = read_status(run_dir)["status"]
        if status != "finished":
            skipped.append({"run_id": run_dir.name, "status": status})
            continue
        config = json.loads((run_dir / "config.json").read_text())["config"]
        history = pd.read_csv(run_dir / "history.csv")
        history["epoch"] = history["epoch"] + 1  # 1-based: "after epoch 1"
        for key in ("arch", "norm", "k", "placement", "seed", "dataset", "size", "epochs"):
            history[key] = config[key]
        history["variant"], history["run_id"] = _variant(config), run_dir.name
        rows.append(history)
    history = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame()
    return history, pd.DataFrame(skipped, columns=["run_id", "status"])


def summarize(history: pd.DataFrame, target: float = 0.8) -> pd.DataFrame:
    """One row per dataset × arch × variant: seeds, final accuracy mean ± std, epochs to `target`, AUC.

    `auc` is the area under the validation-accuracy curve with one unit per epoch, divided by the number
    of epochs (the mean accuracy over epochs): higher means faster convergence.
    """
    per_run = history.groupby(SUMMARY_KEYS + ["seed"]).agg(
        final_accuracy=("accuracy", "last"), auc=("accuracy", "mean"),
        epochs_to_target=("accuracy", lambda a: next((i + 1 for i, v in enumerate(a) if v >= target), float("nan"))),
    ).reset_index()
    summary = per_run.groupby(SUMMARY_KEYS).agg(
        n_seeds=("seed", "nunique"), seeds=("seed", lambda s: ",".join(map(str, sorted(s)))),
        final_accuracy_mean=("final_accuracy", "mean"), final_accuracy_std=("final_accuracy", "std"),
        epochs_to_target_mean=("epochs_to_target", "mean"), auc_mean=("auc", "mean"),
    ).reset_index()
    summary["target"] = target
    return summary


def plot_curves(history: pd.DataFrame, path: Path) -> None:
    """Validation accuracy per epoch, BN vs BNET variants, one panel per arch (mean and seed range)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    archs = sorted(history["arch"].unique())
    fig, axes = plt.subplots(1, len(archs), figsize=(4.5 * len(archs), 3.6), squeeze=False)
    for ax, arch in zip(axes[0], archs):
        for variant, group in history[history["arch"] == arch].groupby("variant"):
            stats = group.groupby("epoch")["accuracy"].agg(["mean", "min", "max"])
            ax.plot(stats.index, stats["mean"], marker="o", label=variant)
            ax.fill_between(stats.index, stats["min"], stats["max"], alpha=0.2)
        ax.set(title=arch, xlabel="epoch", ylabel="validation accuracy")
        ax.grid(alpha=0.3)
        ax.legend()
    first = history.iloc[0]
    fig.suptitle(f"{first['dataset']}, {first['size']} px, {first['epochs']} epochs, "
                 f"seeds {','.join(map(str, sorted(history['seed'].unique())))}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(experiment: str | Path, target: float = 0.8) -> pd.DataFrame:
    """Write ``summary.csv`` and ``accuracy.png`` into `experiment`; returns the summary."""
    experiment = Path(experiment)
    if not experiment.is_dir():
        raise ValueError(f"no experiment folder at {experiment}: give the --out folder of a run or sweep")
    history, skipped = load_runs(experiment)
    for row in skipped.itertuples():
        print(f"left out {row.run_id}: {row.status}")
    if history.empty:
        raise ValueError(f"no finished run in {experiment}")
    summary = summarize(history, target)
    atomic_write(experiment / "summary.csv", summary.to_csv(index=False))
    plot_curves(history, experiment / "accuracy.png")
    return summary
