"""Report figures: curves with seed bands, final accuracy with intervals, and the learned BNET kernels.

Every title names the dataset, image size, epochs and seeds. Figures are built with matplotlib's
object API (no pyplot state, no backend switch): they save anywhere and display in a notebook. Layouts are
constrained and saved with a tight bounding box, so a long title makes the figure grow rather than be cut.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

COLOURS = {"bn": "#4c72b0"}  # BN always blue; BNET variants take the next colours
_CYCLE = ["#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860"]


def _colour(variant: str, variants: list[str]) -> str:
    others = [v for v in variants if v != "bn"]
    return COLOURS.get(variant) or _CYCLE[others.index(variant) % len(_CYCLE)]


def _save(fig: Figure, path: Path) -> Figure:
    fig.savefig(path, dpi=130, bbox_inches="tight", pad_inches=0.15)  # the canvas grows to fit every title
    return fig


def log_scale_if_wide(ax: Axes, values) -> None:
    """A logarithmic y axis when the positive `values` span more than 10x (an early loss spike would
    otherwise flatten the rest of the curve)."""
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values) & (values > 0)]
    if len(values) and values.max() > 10 * values.min():
        ax.set_yscale("log")


def integer_epochs(ax: Axes) -> None:
    """Epoch ticks at whole numbers only."""
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def plot_curves(history: pd.DataFrame, title: str, path: Path) -> Figure:
    """Validation accuracy and loss per epoch of every arm, mean over seeds with a ±1 std band, per arch; the title
    names the arms drawn (one arm alone says so: a budget only BN trained)."""
    archs, variants = sorted(history["arch"].unique()), sorted(history["variant"].unique())
    fig = Figure(figsize=(max(4.2 * len(archs), 6.5), 6.4), layout="constrained")
    axes = fig.subplots(2, len(archs), squeeze=False, sharex=True)
    for col, arch in enumerate(archs):
        for variant, group in history[history["arch"] == arch].groupby("variant"):
            for row, metric in enumerate(("accuracy", "valid_loss")):
                stats = group.groupby("epoch")[metric].agg(["mean", "std", "count"]).fillna(0)
                ax, colour = axes[row, col], _colour(variant, variants)
                ax.plot(stats.index, stats["mean"], marker="o", ms=3, color=colour,
                        label=f"{variant} (n={int(stats['count'].max())})")
                lower = stats["mean"] - stats["std"]
                if metric == "valid_loss":  # on a log axis a band reaching 0 would vanish: keep it positive
                    lower = lower.clip(lower=stats["mean"].min() / 10)
                ax.fill_between(stats.index, lower, stats["mean"] + stats["std"], color=colour, alpha=0.2, lw=0)
        axes[0, col].set_title(arch)
        axes[0, col].set_ylabel("validation accuracy")
        axes[1, col].set_ylabel("validation loss")
        axes[1, col].set_xlabel("epoch")
        log_scale_if_wide(axes[1, col], history.loc[history["arch"] == arch, "valid_loss"])
        for ax in axes[:, col]:
            ax.grid(alpha=0.3)
            integer_epochs(ax)
        axes[0, col].legend(fontsize=8)
    shown = (" vs ".join(variants) if len(variants) > 1
             else f"{variants[0]} only (no other arm trained this budget)")
    fig.suptitle(f"{shown}: validation accuracy and loss per epoch, mean ± 1 std over seeds — {title}", fontsize=9)
    return _save(fig, path)


def plot_final_accuracy(summary: pd.DataFrame, title: str, path: Path) -> Figure:
    """Final validation accuracy per arch and variant: mean over seeds with its 95% t interval."""
    archs, variants = sorted(summary["arch"].unique()), sorted(summary["variant"].unique())
    width = 0.8 / len(variants)
    fig = Figure(figsize=(max(5.5, 1.6 * len(archs) * len(variants) ** 0.5 + 2), 3.8), layout="constrained")
    ax = fig.subplots()
    for i, variant in enumerate(variants):
        rows = summary[summary["variant"] == variant].set_index("arch").reindex(archs)
        x = np.arange(len(archs)) + (i - (len(variants) - 1) / 2) * width
        # The logit-scale interval need not be centred on the plain mean (skewed seeds): never a negative bar
        low = (rows["final_accuracy_mean"] - rows["final_accuracy_ci_low"]).fillna(0).clip(lower=0)
        high = (rows["final_accuracy_ci_high"] - rows["final_accuracy_mean"]).fillna(0).clip(lower=0)
        ax.errorbar(x, rows["final_accuracy_mean"], yerr=[low, high], fmt="o", capsize=4,
                    color=_colour(variant, variants), label=variant)
    ax.set_xticks(np.arange(len(archs)), archs)
    ax.set_ylabel("final validation accuracy")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    method = summary["ci_method"].iloc[0] if "ci_method" in summary else "95% interval"
    ax.set_title(f"Final accuracy, mean over seeds and interval ({method})\n{title}", fontsize=9)
    return _save(fig, path)


def plot_kernels(kernels: pd.DataFrame, title: str, path: Path) -> Figure | None:
    """Mean |weight| per tap of the learned BNET kernels, per stage; one row per arch × variant, each named.

    Layers that only ever see 1x1 maps (ResNeSt's split attention) are left out, and named under the title:
    their outer taps never meet data. Each panel is averaged over layers of the stage, channels and seeds,
    and normalised so the taps sum to 1, which makes the share of the centre tap (BN's gamma) comparable;
    every panel uses one colour scale, 0 to 1, shown by a colour bar per row.
    """
    one_by_one = kernels["spatial"].map(lambda s: s is not None and max(s) <= 1) if "spatial" in kernels else False
    left_out = kernels[one_by_one & (kernels["k"] > 1)]
    kernels = kernels[~one_by_one & (kernels["k"] > 1)]
    if kernels.empty:
        return None
    rows = sorted(kernels.groupby(["arch", "variant"]).groups)
    stages = sorted(kernels["stage"].unique(), key=lambda s: (s != "stem", s))
    fig = Figure(figsize=(max(2.2 * len(stages) + 1, 6.5), 2.7 * len(rows) + 1.2), layout="constrained")
    for subfig, (arch, variant) in zip(np.atleast_1d(fig.subfigures(len(rows), 1)), rows):
        subfig.suptitle(f"{arch} — {variant}", fontsize=9, fontweight="bold")
        for ax, stage in zip(np.atleast_1d(subfig.subplots(1, len(stages))), stages):
            ax.set_xticks([])
            ax.set_yticks([])
            layers = kernels[(kernels["arch"] == arch) & (kernels["variant"] == variant) & (kernels["stage"] == stage)]
            if layers.empty:
                ax.set_title(f"{stage}: no BNET", fontsize=8)
                ax.set_axis_off()
                continue
            taps = np.mean([np.asarray(m) for m in layers["mean_abs"]], axis=0)
            taps = taps / taps.sum()
            image = ax.imshow(taps, cmap="viridis", vmin=0, vmax=1)  # one scale for every panel
            for (i, j), v in np.ndenumerate(taps):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if v < 0.5 else "black")
            ax.set_title(f"{stage} ({layers['layer'].nunique()} layers)", fontsize=8)
        subfig.colorbar(image, ax=subfig.axes, shrink=0.8, label="share of |weight|")
    note = ""
    if len(left_out):
        named = ", ".join(f"{a} {v}: {n} layer(s) in {', '.join(sorted(g['stage'].unique()))}"
                          for (a, v), g in left_out.groupby(["arch", "variant"]) for n in [g["layer"].nunique()])
        note = f"\nleft out, they only see 1×1 maps: {named}"
    fig.suptitle(f"Learned BNET kernels: share of mean |weight| per tap\n{title}{note}", fontsize=9)
    return _save(fig, path)


def plot_budgets(per_run: pd.DataFrame, equal_cost: pd.DataFrame, path: Path, paired: pd.DataFrame | None = None,
                 break_even: pd.DataFrame | None = None) -> Figure:
    """Per arch, four panels: final accuracy against budget in epochs and against training cost in BN-epoch
    equivalents (BNET's budgets times its measured cost ratio), mean over seeds with a 95% t band (bounded, each
    arm's own: unpaired); the paired view, BNET − BN per budget with its paired 95% interval (what the verdicts
    test); and the break-even ratio per BNET budget with its interval against the measured ratio with its own."""
    from bnet_fastai.analysis.budget import budget_studies, is_placebo
    from bnet_fastai.analysis.stats import CI_METHOD, bounded_t_interval

    studies = budget_studies(per_run)
    fig = Figure(figsize=(11, 7.4 * len(studies) + 0.6), layout="constrained")
    axes = fig.subplots(2 * len(studies), 2, squeeze=False)
    for number, (keys, runs) in enumerate(studies):
        row = 2 * number
        variants = sorted(runs["variant"].unique())
        for variant, group in runs.groupby("variant"):
            by_budget = group.groupby("epochs")["final_accuracy"]
            mean = by_budget.mean()
            bands = np.array([bounded_t_interval(v) for _, v in by_budget])
            ratios = equal_cost[(equal_cost["arch"] == keys["arch"]) & (equal_cost["variant"] == variant)] \
                if len(equal_cost) else equal_cost
            ratio = 1.0 if variant == "bn" else (ratios["cost_ratio"].iloc[0] if len(ratios) else np.nan)
            for col, scale in enumerate((1.0, ratio)):
                if not np.isfinite(scale):
                    continue
                ax, colour = axes[row, col], _colour(variant, variants)
                x = mean.index.to_numpy(dtype=float) * scale
                label = f"{variant}{' (placebo)' if is_placebo(variant) else ''} (n={group['seed'].nunique()})" + (
                    "" if col == 0 or variant == "bn" else f", ×{scale:.3f}")
                ax.plot(x, mean.to_numpy(), marker="o", ms=4, color=colour, label=label,
                        ls=":" if is_placebo(variant) else "-")
                ax.fill_between(x, bands[:, 0], bands[:, 1], color=colour, alpha=0.2, lw=0)
        axes[row, 0].set_xlabel("budget: epochs of a complete schedule")
        axes[row, 1].set_xlabel("training cost: BN-epoch equivalents (budget × BNET/BN step-time ratio)")
        title = f"{keys['arch']} — {keys['dataset']}, {keys['size']} px"
        for ax in axes[row]:
            ax.set_ylabel("final validation accuracy")
            ax.set_title(f"{title}: each arm's mean, unpaired band", fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        integer_epochs(axes[row, 0])
        _paired_panel(axes[row + 1, 0], paired, keys, variants)
        _break_even_panel(axes[row + 1, 1], break_even, keys, variants)
    seeds = ",".join(map(str, sorted(per_run["seed"].unique())))
    fig.suptitle(f"Final accuracy against budget and training cost, BNET − BN paired by seed, and the break-even "
                 f"step-cost ratio; seeds {seeds}; bands: {CI_METHOD} interval", fontsize=9)
    return _save(fig, path)


def _study_rows(table: pd.DataFrame | None, keys: dict) -> pd.DataFrame:
    if table is None or table.empty:
        return pd.DataFrame()
    return table.merge(pd.DataFrame([{k: keys[k] for k in ("dataset", "size", "recipe", "arch")}]))


def _errorbars(ax, rows: pd.DataFrame, variants: list[str], columns: tuple[str, str, str, str], scale: float,
               label) -> None:
    """One point per row and budget with its interval (`columns`: budget, value, low, high; values × `scale`),
    each variant in its colour, a little apart from the others so that the intervals stay readable."""
    from bnet_fastai.analysis.budget import is_placebo

    at, value, low, high = columns
    offsets = np.linspace(-0.15, 0.15, max(len(variants) - 1, 1))
    for offset, (variant, group) in zip(offsets, rows.groupby("variant") if len(rows) else []):
        group = group.sort_values(at)
        centre = group[value].to_numpy()
        errors = scale * np.abs(group[[low, high]].to_numpy().T - centre)
        ax.errorbar(group[at].to_numpy(dtype=float) + offset, scale * centre, yerr=errors, marker="o", ms=4,
                    capsize=3, color=_colour(variant, variants), ls=":" if is_placebo(variant) else "-",
                    label=label(variant, group))


def _finish(ax, rows: pd.DataFrame, xlabel: str, ylabel: str, title: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    if len(rows):
        ax.legend(fontsize=8)
    integer_epochs(ax)


def _paired_panel(ax, paired: pd.DataFrame | None, keys: dict, variants: list[str]) -> None:
    """BNET − BN in accuracy points per budget, with the paired 95% interval: above 0 where BNET is higher."""
    from bnet_fastai.analysis.budget import is_placebo

    rows = _study_rows(paired, keys)
    ax.axhline(0, color="black", lw=0.8)
    _errorbars(ax, rows, variants, ("epochs", "final_accuracy_diff_mean", "final_accuracy_diff_ci_low",
                                    "final_accuracy_diff_ci_high"), 100,
               lambda v, g: f"{v}{' (placebo)' if is_placebo(v) else ''} (pairs {g['n_pairs'].min()})")
    _finish(ax, rows, "budget: epochs of a complete schedule", "BNET − BN, accuracy points",
            "BNET − BN paired by seed (95% interval)")


def _break_even_panel(ax, even: pd.DataFrame | None, keys: dict, variants: list[str]) -> None:
    """The break-even ratio per BNET budget with its interval (BNET pays off below it), and the measured
    step-cost ratio with its interval as a band: where the band lies below the interval, BNET pays off here."""
    rows = _study_rows(even, keys)
    ax.axhline(1, color="black", lw=0.8)
    _errorbars(ax, rows, variants, ("bnet_epochs", "break_even", "ci_low", "ci_high"), 1.0,
               lambda v, g: f"{v}: break-even")
    for variant, group in rows.groupby("variant") if len(rows) else []:
        measured, colour = group.iloc[0], _colour(variant, variants)
        if np.isfinite(measured["cost_ratio"]):
            span = [group["bnet_epochs"].min() - 0.3, group["bnet_epochs"].max() + 0.3]
            ax.plot(span, [measured["cost_ratio"]] * 2, color=colour, lw=1, ls="--")
            ax.fill_between(span, measured["cost_ratio_low"], measured["cost_ratio_high"], color=colour, alpha=0.15,
                            lw=0)
    _finish(ax, rows, "BNET budget: epochs", "BNET/BN step-time ratio (BNET pays off below its point)",
            "break-even ratio (points, BCa interval) vs measured ratio (dashed, 95% band)")
