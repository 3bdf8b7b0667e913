"""The answer first: what the plain `bnet-fastai report` and the end of `bnet-fastai study` print before any table.

One line per comparison, BNET − BN with its interval and verdict (equal epochs; for a budget study also equal
training time at the measured step-cost ratio, and the break-even ratio against it), from the report's own tables.
Before them, where it applies, the one thing that no amount of reading can fix: with n paired seeds the exact
sign-flip p is never below 2/2ⁿ, so a Holm family of m comparisons needs 2m/2ⁿ < 0.05 before any verdict is
possible (`seeds_needed`); a study with fewer seeds is told so, with the number it needs.
"""
from __future__ import annotations

import pandas as pd

from bnet_fastai.analysis.budget import is_placebo
from bnet_fastai.analysis.markdown import _break_even, _kept, _points, _price, _priced_verdict
from bnet_fastai.analysis.stats import ALPHA, seeds_needed


def undecidable_note(paired: pd.DataFrame, alpha: float = ALPHA) -> str:
    """One line where some comparison has too few paired seeds ever to reach a verdict in its family; else ""."""
    if paired.empty:
        return ""
    size = int(paired["family_size"].max()) if "family_size" in paired else len(paired)
    need = seeds_needed(size, alpha)
    few = paired[paired["n_pairs"] < need]
    if few.empty:
        return ""
    n = int(few["n_pairs"].min())
    which = ("no comparison here can" if len(few) == len(paired)
             else f"{len(few)} of the {len(paired)} comparisons here cannot")
    return (f"note: with {n} paired seed{'s' if n > 1 else ''} {which} reach a verdict: the smallest "
            f"exact p is 2/2^{n} = {2 / 2 ** n:.3g}, and Holm over the {size} comparisons needs it below "
            f"{alpha}/{size}; {need} seeds at least (more to detect a small gain: docs/gpu.md, power)")


def _arm(r, datasets: bool = False) -> str:
    """The arm a line is about; `datasets`: the report spans several datasets, so each line names its own."""
    placebo = " (placebo)" if is_placebo(r.variant) else ""
    return f"{f'{r.dataset} ' if datasets else ''}{r.arch} {r.variant}{placebo}"


def answer_lines(tables: dict[str, pd.DataFrame]) -> list[str]:
    """The answer, one line per comparison (see the module docstring); [] when nothing is paired."""
    paired = tables["paired"]
    lines = [line for line in (undecidable_note(paired),) if line]
    if paired.empty:
        return lines + ["no comparison: no seed has both BN and BNET finished in one recipe"]
    several = paired["dataset"].nunique() > 1
    lines.append("BNET - BN, final test accuracy, same epochs (95% interval; Holm p; verdict, kept dropping one seed):")
    for r in paired.itertuples():
        lines.append(f"  {_arm(r, several)} at {r.epochs} epochs: "
                     f"{_points(r.final_accuracy_diff_mean, r.final_accuracy_diff_ci_low, r.final_accuracy_diff_ci_high)}"
                     f", p {r.final_accuracy_p:.2g} (Holm {r.p_holm:.2g}): {r.verdict}, kept {_kept(r)}"
                     f" [{r.n_pairs} seeds]")
    cost = tables.get("equal_cost")
    if cost is not None and not cost.empty:
        lines.append("Same training time, BN given the epochs BNET's step cost buys (cost ratio [95% interval]):")
        for r in cost.itertuples():
            said = (f"{_points(r.diff_mean, r.diff_ci_low, r.diff_ci_high)}, Holm p {r.p_holm:.2g}: "
                    f"{_priced_verdict(r)}") if not r.note else r.note
            lines.append(f"  {_arm(r, several)} at {r.bnet_epochs} epochs, cost {_price(r)}: {said}")
    even = tables.get("break_even")
    if even is not None and not even.empty:
        lines.append("Break-even step-cost ratio (BNET pays off at equal time below it) vs the measured one:")
        for r in even.itertuples():
            lines.append(f"  {_arm(r, several)} at {r.bnet_epochs} epochs: {_break_even(r)} vs {_price(r)}")
    return lines
