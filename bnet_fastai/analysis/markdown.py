"""The tables of `bnet_fastai.analysis.report` as Markdown, as the README (the answers) and docs/results.md publish them.

`results_markdown` renders one study's summary and paired tables; `budget_markdown` a budget study's
accuracy at every budget, epochs to match, equal cost and the break-even ratio; `answers_markdown` the README's
answers (a)-(d) and the placebo's line. `tests/test_published.py` checks that those pages hold exactly what these give for the committed runs.
"""
from __future__ import annotations

import pandas as pd

from bnet_fastai.analysis.budget import is_placebo


def _number(value: float) -> str:
    return "—" if pd.isna(value) else f"{value:.2f}"


def _price(r) -> str:
    """A measured step-cost ratio with its 95% interval where it has one: "1.025 [1.011, 1.040]"."""
    if pd.isna(r.cost_ratio):
        return "—"
    low, high = getattr(r, "cost_ratio_low", r.cost_ratio), getattr(r, "cost_ratio_high", r.cost_ratio)
    if pd.isna(low) or low == high:
        return f"{r.cost_ratio:.3f}"
    return f"{r.cost_ratio:.3f} [{low:.3f}, {high:.3f}]"


def _priced_verdict(r) -> str:
    """An equal-cost verdict; one that changes inside the ratio's interval says where."""
    if r.verdict != "depends on the price":
        return r.verdict
    return f"depends on the price: {r.verdict_low} below ratio {r.flip_ratio:.3f}, {r.verdict_high} at {r.cost_ratio_high:.3f}"


def _se(value: float) -> str:
    return "—" if pd.isna(value) else f"{value:.4f}"


def _p(value: float) -> str:
    """A p-value: 4 decimals, or "<0.0001"."""
    return "—" if pd.isna(value) else "<0.0001" if value < 1e-4 else f"{value:.4f}"


def _accuracy(r) -> str:
    """A summary row's final accuracy with its interval."""
    return _mean_interval(r.final_accuracy_mean, r.final_accuracy_ci_low, r.final_accuracy_ci_high)


def _difference(r) -> str:
    """A paired row's final-accuracy difference with its interval."""
    return _mean_interval(r.final_accuracy_diff_mean, r.final_accuracy_diff_ci_low, r.final_accuracy_diff_ci_high, True)


def _mean_interval(mean: float, low: float, high: float, signed: bool = False) -> str:
    if pd.isna(mean):
        return "—"
    f = "+.4f" if signed else ".4f"
    return f"{mean:{f}} [—]" if pd.isna(low) else f"{mean:{f}} [{low:{f}}, {high:{f}}]"


def _methods(tables: dict[str, pd.DataFrame]) -> str:
    s, p = tables["summary"], tables["paired"]
    method = p["p_method"].iloc[0] if len(p) else ""
    return (f"Intervals: {s['ci_method'].iloc[0]} over seeds (mapped back, so they stay inside [0, 1], and "
            f"[−1, 1] for differences); they cover seed-to-seed variation on one fixed test set, and \"test SE\" "
            f"is that test set's own binomial standard error. p: {method}; Holm p: Holm's adjustment over the "
            f"family named; verdict from the Holm p at 0.05.")


def _kept(r) -> str:
    """How often a verdict survives dropping one seed: "12/12", or "—" where no comparison was made."""
    kept, drops = getattr(r, "kept_dropping_one", float("nan")), getattr(r, "n_drops", float("nan"))
    return "—" if pd.isna(kept) or pd.isna(drops) else f"{int(kept)}/{int(drops)}"


def _family(table: pd.DataFrame, question: str) -> str:
    """ "Holm over the 12 equal-epoch comparisons", naming every dataset the family spans when it spans more
    than the rows shown (`by_dataset` shows one dataset's rows of a family computed over all)."""
    size = int(table["family_size"].iloc[0]) if "family_size" in table and len(table) else len(table)
    shown = int(table["p" if "p" in table else "final_accuracy_p"].notna().sum())
    spans = "" if size == shown else f", every dataset of this report ({shown} of them in this section)"
    return f"Holm over the {size} {question} comparisons{spans}"


DROP_ONE = ("kept dropping one seed: of the n ways to drop one seed from every comparison (the family recomputed), "
            "in how many the verdict stays the same")


def left_out_markdown(tables: dict[str, pd.DataFrame]) -> str:
    """The runs a report did not compute from, one per line with why; "" when none."""
    skipped = tables.get("skipped", pd.DataFrame())
    if skipped is None or skipped.empty:
        return ""
    lines = [f"**Left out** ({len(skipped)} run{'s' if len(skipped) > 1 else ''}, in no number above):", ""]
    lines += [f"- {r.run_id}: {r.status}{': ' + r.reason if r.reason else ''}" for r in skipped.itertuples()]
    return "\n".join(lines)


def pooled_note(history: pd.DataFrame) -> str:
    """What the runs were trained with where it varies (commits, torch threads, BNET's implementation): "" when
    all alike. Such runs are pooled (none of these changes the recipe), so a reader should know."""
    if history.empty:
        return ""
    runs = history.drop_duplicates("run_id")
    parts = []
    for column, what in (("git_commit", "commits"), ("torch_threads", "torch thread counts"),
                         ("bnet_impl", "BNET implementations")):
        if column not in runs:
            continue
        values = runs[column] if column != "bnet_impl" else runs.loc[runs[column] != "", column]
        counts = values.fillna("not recorded").astype(str).replace("", "not recorded").value_counts()
        if len(counts) > 1:
            parts.append(f"{len(counts)} {what} ({', '.join(f'{v}: {n} runs' for v, n in counts.sort_index().items())})")
    return f"Pooled: runs from {'; '.join(parts)}." if parts else ""


def results_markdown(tables: dict[str, pd.DataFrame]) -> str:
    """The summary and paired tables of `report` as Markdown."""
    s, p = tables["summary"], tables["paired"]
    targets = s.groupby("dataset")["target"].first()
    target = (f"{targets.iloc[0]:.2f}" if targets.nunique() == 1 else
              ", ".join(f"{dataset} {value:.2f}" for dataset, value in targets.items()))
    lines = [_methods(tables) + f" Target for \"epochs to target\": {target}.", "",
             "| dataset | arch | variant | seeds | final accuracy, mean [95% interval] | test SE "
             "| epochs to target (reached) | AUC | valid-loss spread |", "|---|---|---|---|---|---|---|---|---|"]
    for r in s.itertuples():
        lines.append(f"| {r.dataset} | {r.arch} | {r.variant} | {r.n_seeds} | {_accuracy(r)} | "
                     f"{_se(r.test_se)} | "
                     f"{_number(r.epochs_to_target_mean)} ({r.n_reached}/{r.n_seeds}) | {r.auc_mean:.4f} | "
                     f"{r.valid_loss_spread:.4f} |")
    extra = [t for t in (left_out_markdown(tables), pooled_note(tables.get("history", pd.DataFrame()))) if t]
    if p.empty:
        return "\n\n".join(["\n".join(lines + ["", "No BNET arm paired with BN by seed: no paired comparison."]), *extra])
    lines += ["", f"{_family(p, p['family'].iloc[0])}; {DROP_ONE}.", "",
              "| dataset | arch | variant − bn | pairs | final accuracy difference [95% interval] | p | Holm p "
              "| AUC difference [95% interval] | AUC p | verdict | kept dropping one seed |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in p.itertuples():
        lines.append(f"| {r.dataset} | {r.arch} | {r.variant} | {r.n_pairs} | {_difference(r)} | {_p(r.final_accuracy_p)} | "
                     f"{_p(r.p_holm)} | "
                     f"{_mean_interval(r.auc_diff_mean, r.auc_diff_ci_low, r.auc_diff_ci_high, True)} | "
                     f"{_p(r.auc_p)} | {r.verdict} | {_kept(r)} |")
    return "\n\n".join(["\n".join(lines), *extra])


def by_dataset(tables: dict[str, pd.DataFrame]) -> dict[str, dict[str, pd.DataFrame]]:
    """`report`'s tables split by dataset (tables without a dataset column go whole to each): a budget
    study's tables and answers are read per dataset."""
    datasets = sorted(tables["summary"]["dataset"].unique())
    return {d: {name: t[t["dataset"] == d] if "dataset" in t else t for name, t in tables.items()} for d in datasets}


def budget_markdown(tables: dict[str, pd.DataFrame]) -> str:
    """A budget study's three tables: accuracy and the paired difference at every budget, epochs to match,
    equal cost."""
    s, p = tables["summary"], tables["paired"]
    match, cost = tables["epochs_to_match"], tables["equal_cost"]
    lines = [_methods(tables), "",
             f"**At every budget** (each a complete schedule; {_family(p, 'equal-epoch')}; {DROP_ONE}):", "",
             "| arch | epochs | BN, mean [95% interval] | BNET variant | BNET, mean [95% interval] | test SE | "
             "BNET − BN [95% interval] | p | Holm p | verdict | kept dropping one seed |", "|---" * 11 + "|"]
    bn = s[s["variant"] == "bn"].set_index(["arch", "epochs"])
    for (arch, epochs), row in bn.sort_index().iterrows():
        pair = p[(p["arch"] == arch) & (p["epochs"] == epochs)]
        bn_cell = _accuracy(row)
        trained = s[(s["arch"] == arch) & (s["epochs"] == epochs) & (s["variant"] != "bn")]
        if pair.empty and trained.empty:
            lines.append(f"| {arch} | {epochs} | {bn_cell} | — (BN only) | — | {_se(row.test_se)} | "
                         f"— | — | — | — | — |")
        for r in pair.itertuples():
            other = s[(s["arch"] == arch) & (s["epochs"] == epochs) & (s["variant"] == r.variant)].iloc[0]
            lines.append(f"| {arch} | {epochs} | {bn_cell} | {r.variant} | {_accuracy(other)} | "
                         f"{_se(other.test_se)} | {_difference(r)} | {_p(r.final_accuracy_p)} | {_p(r.p_holm)} | "
                         f"{r.verdict} | {_kept(r)} |")
        for other in trained[~trained["variant"].isin(pair["variant"])].itertuples():  # runs, but no seed paired
            lines.append(f"| {arch} | {epochs} | {bn_cell} | {other.variant} | {_accuracy(other)} | "
                         f"{_se(other.test_se)} | not compared: no seed with both arms | — | — | — | — |")
    if len(match):
        lines += ["", f"**Epochs to match** BN's mean final accuracy at each BN budget (BNET's budgets "
                      f"{match['bnet_budgets'].iloc[0]}, linear between them; interval: "
                      f"{match['ci_method'].iloc[0]}):",
                  "", "| arch | variant | BN budget | BN accuracy (target) | BNET epochs to match [95% interval] | "
                  "× BN's epochs |", "|---|---|---|---|---|---|"]
        for r in match.itertuples():
            largest = " (largest)" if r.largest_bn_budget else ""
            lines.append(f"| {r.arch} | {r.variant} | {r.bn_epochs}{largest} | {r.target:.4f} | {_match(r)} | "
                         f"{_number(r.ratio_to_bn_epochs)} |")
    if len(cost):
        done = cost[cost["note"] == ""]
        family = _family(done, "equal-cost") if len(done) else "no comparison made"
        lines += ["", f"**Equal cost**: BNET at E epochs against BN at ratio × E epochs, BN's per-seed "
                      f"accuracy interpolated linearly between its budgets (ratio: BNET/BN training-step time "
                      f"[95% interval], `{cost['cost_source'].iloc[0]}`; {family} at the measured ratios; a "
                      f"verdict stands only where it holds across the ratio's interval, each point of it a Holm "
                      f"family of its own; {DROP_ONE}):", "",
                  "| arch | variant | BNET epochs | ratio [95% interval] | BN epochs at equal cost | BNET | "
                  "BN (interpolated) | BNET − BN [95% interval] | p | Holm p | verdict | kept dropping one seed |",
                  "|---" * 12 + "|"]
        for r in cost.itertuples():
            if r.note:
                lines.append(f"| {r.arch} | {r.variant} | {r.bnet_epochs} | {_price(r)} | "
                             f"{r.bn_epochs_equal_cost:.2f} | {r.bnet_accuracy_mean:.4f} | {r.note} | — | — | "
                             f"— | — | — |")
                continue
            lines.append(f"| {r.arch} | {r.variant} | {r.bnet_epochs} | {_price(r)} | "
                         f"{r.bn_epochs_equal_cost:.2f} | {r.bnet_accuracy_mean:.4f} | {r.bn_accuracy_mean:.4f} | "
                         f"{_mean_interval(r.diff_mean, r.diff_ci_low, r.diff_ci_high, True)} | {_p(r.p)} | "
                         f"{_p(r.p_holm)} | {_priced_verdict(r)} | {_kept(r)} |")
    if len(tables.get("break_even", [])):
        lines += ["", break_even_markdown(tables["break_even"])]
    extra = [t for t in (left_out_markdown(tables), pooled_note(tables.get("history", pd.DataFrame()))) if t]
    return "\n\n".join(["\n".join(lines), *extra])


def _match(r) -> str:
    """Epochs to match with its interval: "3.41 [3.12, 3.80]", "≤ 2 [≤ 2, 2.40]", "not reached by 4 [3.60, > 4]"
    (the smallest budget reads "≤": BNET is there already; above the largest, "> ": not reached)."""
    first, last = r.bnet_budgets.split(",")[0], r.bnet_budgets.split(",")[-1]

    def one(v: float) -> str:
        return f"> {last}" if v == float("inf") else f"≤ {first}" if v == float(first) else f"{v:.2f}"

    value = f"not reached by {last}" if r.match == "not reached" else one(r.epochs_to_match)
    return f"{value} [{one(r.ci_low)}, {one(r.ci_high)}]"


def _ratio(value: float, bound: str) -> str:
    """A break-even ratio: "1.21", "≥ 1.50" (BN's largest budget does not get there), "≤ 0.50"."""
    return {"": "", "<=": "≤ ", ">=": "≥ "}[bound] + f"{value:.2f}"


def _break_even(r) -> str:
    """A break-even row's ratio with its interval: "1.21 [1.16, 1.26]", "≥ 1.50 [1.38, ≥ 1.50]"; a * where
    the interval is the percentile one (BCa undefined at a bound)."""
    mark = "*" if str(getattr(r, "ci_how", "")).startswith("percentile") else ""
    return (f"{_ratio(r.break_even, r.bound)} [{_ratio(r.ci_low, r.ci_low_bound)}, "
            f"{_ratio(r.ci_high, r.ci_high_bound)}]{mark}")


def _variant(name: str) -> str:
    return f"{name} (placebo)" if is_placebo(name) else name


def break_even_markdown(even: pd.DataFrame) -> str:
    """The break-even table of a budget study: per variant and BNET budget, the ratio below which it pays off."""
    if even.empty:
        return ""
    lines = [f"**Break-even step-cost ratio**: BNET at E epochs beats BN given the same training time when one "
             f"BNET step costs less than this many BN steps: the BN budget whose mean accuracy equals BNET's at E "
             f"(BN's budgets {even['bn_budgets'].iloc[0]}, linear between them, never extrapolated: ≥ and ≤ are "
             f"bounds at BN's largest and smallest budget), divided by E. Interval: {even['ci_method'].iloc[0]} "
             f"(* the percentile interval, where BCa is undefined at a bound). "
             f"Beside it, the ratio measured on this machine (`cost.json`, with its 95% interval):", "",
             "| arch | variant | BNET epochs | BNET accuracy | BN epochs to match it | break-even ratio [95% interval] "
             "| measured ratio here |", "|---|---|---|---|---|---|---|"]
    for r in even.itertuples():
        lines.append(f"| {r.arch} | {_variant(r.variant)} | {r.bnet_epochs} | {r.bnet_accuracy_mean:.4f} | "
                     f"{_ratio(r.bn_epochs_to_match, r.bound)} | {_break_even(r)} | {_price(r)} |")
    return "\n".join(lines)


def _points(mean: float, low: float, high: float) -> str:
    """An accuracy difference in percentage points with its interval: "+0.76 pt [+0.53, +0.98]" ("+0.00", never
    "-0.00", for a difference that rounds to zero)."""
    mean, low, high = (0.0 if round(100 * v, 2) == 0 else v for v in (mean, low, high))
    return f"{100 * mean:+.2f} pt [{100 * low:+.2f}, {100 * high:+.2f}]"


def timing_command(r) -> str:
    """The command that times `r`'s network, image size, batch and optimizer (its recipe) on another machine, BN
    against `r`'s variant, with an interval: the ratio the break-even is to be compared with."""
    recipe = dict(part.split("=", 1) for part in str(r.recipe).split() if "=" in part)
    return (f"python benchmarks/train_step.py --archs {r.arch} --size {int(r.size)} --bs {recipe.get('bs', 64)} "
            f"--opt {recipe.get('opt', 'adam')} --formats channels_last --variants {r.variant} --blocks 5")


def _advice(gain, even) -> str:
    """One sentence a GPU user can act on, from the equal-epoch verdict and the break-even ratio: for this network,
    data and recipe only, with the command that times this network on their GPU."""
    if gain.verdict == "BN higher":
        return "BN is more accurate even at equal epochs: keep BN."
    if gain.verdict != "BNET higher":
        return "No gain shown at equal epochs: it cannot pay for any extra cost; keep BN."
    if even.bound == "<=":
        return f"Pays off only where its step costs at most {even.break_even:.2f}× BN's: keep BN."
    at_least = "at least " if even.bound == ">=" else ""
    return (f"For this network and recipe: worth it where its step costs less than {at_least}{even.break_even:.2f}× "
            f"BN's ({_ratio(even.ci_low, even.ci_low_bound)} to be safe); time it there with `{timing_command(even)}`.")


def short_answer_markdown(tables: dict[str, pd.DataFrame], command: str) -> str:
    """The front page's first answer, three lines from a budget study's report: the gain at equal epochs at the
    largest budget every arm trained, the break-even ratio against the measured one, the verdict at equal time
    here, and the placebo."""
    p, cost, even, s = tables["paired"], tables["equal_cost"], tables["break_even"], tables["summary"]
    budget = int(s.groupby(["arch", "variant"])["epochs"].max().min())
    at = p[(p["epochs"] == budget) & (p["n_pairs"] >= 2)]
    real, placebo = at[~at["variant"].map(is_placebo)], at[at["variant"].map(is_placebo)]

    def row(table: pd.DataFrame, r, column: str):
        rows = table[(table["arch"] == r.arch) & (table["variant"] == r.variant) & (table[column] == budget)]
        return next(rows.itertuples(), None)

    seeds = int(at["n_pairs"].min()) if len(at) else 0

    def pt(value: float) -> str:  # "+0.00", never "-0.00"
        return f"{0.0 if round(100 * value, 2) == 0 else 100 * value:+.2f} pt"

    gains = "; ".join(f"{r.variant} {pt(r.final_accuracy_diff_mean)} ({r.verdict})" for r in real.itertuples())
    evens = "; ".join(f"{r.variant} {_ratio(x.break_even, x.bound)}× vs {_price(x)}" for r in real.itertuples()
                      if (x := row(even, r, "bnet_epochs")) is not None)
    times = "; ".join(f"{r.variant} {_priced_verdict(e)}" for r in real.itertuples()
                      if (e := row(cost, r, "bnet_epochs")) is not None and not e.note)
    lines = [f"- **Same epochs** ({budget}, {seeds} paired seeds): {gains}."
             + "".join(f" Placebo (BN through BNET's code): {pt(r.final_accuracy_diff_mean)} ({r.verdict})."
                       for r in placebo.itertuples()),
             f"- **Break-even step cost** (BNET wins at equal time below it) vs the one measured here: {evens}.",
             f"- **Same training time on this CPU**: {times}."]
    return "\n".join(lines) + f"\n\n(the first lines of `{command}`; the detail, and what it means on your GPU, below)"


def _one_family_of_all(p: pd.DataFrame, cost: pd.DataFrame) -> int:
    """How many verdicts (equal epochs, and equal cost at the measured ratios) would change were both questions
    one Holm family."""
    from bnet_fastai.analysis import stats

    done = cost[cost["note"] == ""] if "note" in cost else cost
    pvalues = [*p["final_accuracy_p"], *done["p"]] if len(done) else list(p["final_accuracy_p"])
    means = [*p["final_accuracy_diff_mean"], *done["diff_mean"]] if len(done) else list(p["final_accuracy_diff_mean"])
    apart = [*p["p_holm"], *done["p_holm"]] if len(done) else list(p["p_holm"])
    joint = stats.holm(pvalues)
    return sum(stats.verdict(m, a) != stats.verdict(m, j) for m, a, j in zip(means, apart, joint))


def answers_markdown(tables: dict[str, pd.DataFrame], command: str) -> str:
    """The README's answers to (a) more accurate at equal epochs, (b) the same accuracy in fewer epochs, (c)
    better at equal training time here, (d) which BNET pays off at what price, and the placebo's result: one
    short line each at the largest budget every arm trained (an arm without a paired seed there says so), then
    the (d) table, the Holm families as computed, and the runs left out. `tables` is a budget study's report;
    `command` the command that prints it (``bnet-fastai report DIR --markdown``)."""
    p, match, cost, even = tables["paired"], tables["epochs_to_match"], tables["equal_cost"], tables["break_even"]
    s = tables["summary"]
    budget = int(s.groupby(["arch", "variant"])["epochs"].max().min())  # every arm, BN included, trained it
    arms = s[(s["variant"] != "bn")][["arch", "variant"]].drop_duplicates().sort_values(["arch", "variant"])
    at = p[p["epochs"] == budget]
    several = s["arch"].nunique() > 1

    def name(r) -> str:  # the arm: its variant, and its arch when the study has several
        return f"{r.arch} {r.variant}" if several else r.variant

    def one(table: pd.DataFrame, r, column: str):
        """The row of `table` for `r`'s arch and variant at the answers' budget (in `column`), or None."""
        if table.empty:
            return None
        rows = table[(table["arch"] == r.arch) & (table["variant"] == r.variant) & (table[column] == budget)]
        return next(rows.itertuples(), None)

    paired = {(r.arch, r.variant): r for r in at.itertuples() if r.n_pairs >= 2}
    real = [paired[(a.arch, a.variant)] for a in arms.itertuples() if (a.arch, a.variant) in paired
            and not is_placebo(a.variant)]
    placebos = [paired[(a.arch, a.variant)] for a in arms.itertuples() if (a.arch, a.variant) in paired
                and is_placebo(a.variant)]
    unpaired = [a for a in arms.itertuples() if (a.arch, a.variant) not in paired]
    counts = sorted({int(r.n_pairs) for r in paired.values()})
    seeds = "no" if not counts else f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"

    a = [f"{name(r)} {100 * r.final_accuracy_diff_mean:+.2f} pt ({r.verdict}, kept in {_kept(r)} drop-one-seed "
         f"checks)" for r in real]
    b = []
    for r in real:
        m = one(match, r, "bn_epochs")
        b.append(f"{name(r)} not within {budget}" if m is None or m.match == "not reached"
                 else f"{name(r)} in {m.ratio_to_bn_epochs:.2f}× the epochs")
    c = []
    for r in real:
        e = one(cost, r, "bnet_epochs")
        c.append(f"{name(r)} " + ("not compared" if e is None or e.note else
                                    f"{100 * e.diff_mean:+.2f} pt at ratio {_price(e)} ({_priced_verdict(e)})"))
    d = [f"{name(r)} {_ratio(x.break_even, x.bound)}×" for r in real if (x := one(even, r, "bnet_epochs")) is not None]
    n_cost = int((cost["note"] == "").sum()) if "note" in cost else 0
    lines = [f"At {budget} epochs, the largest budget every arm trained, {seeds} paired seeds, BNET − BN in "
             f"accuracy points, verdicts from the Holm-adjusted exact sign-flip p (families below):", "",
             f"- **(a) More accurate at the same number of epochs?** {'; '.join(a) or 'no arm compared'}.",
             f"- **(b) The same accuracy in fewer epochs?** BN's {budget}-epoch accuracy reached by "
             f"{'; '.join(b) or 'no arm compared'}.",
             f"- **(c) Better at equal training time, on this CPU?** {'; '.join(c) or 'no arm compared'}.",
             f"- **(d) Which BNET, and at what price does it pay off?** It beats BN in the same time where one "
             f"of its steps costs less than this many BN steps (its break-even ratio): "
             f"{'; '.join(d) or 'none computed'} (table below)."]
    for r in placebos:
        verdicts = sorted(set(p[(p["arch"] == r.arch) & (p["variant"] == r.variant)]["verdict"]))
        lines.append(f"- **Placebo** ({name(r)}: BN computed through BNET's code): {_points(r.final_accuracy_diff_mean, r.final_accuracy_diff_ci_low, r.final_accuracy_diff_ci_high)} at {budget} epochs; "
                     f"verdict at every budget: {', '.join(verdicts)}.")
    for r in unpaired:
        trained = sorted(int(e) for e in s[(s["arch"] == r.arch) & (s["variant"] == r.variant)]["epochs"])
        lines.append(f"- **Not compared**: {name(r)} has fewer than 2 seeds paired with BN at {budget} epochs "
                     f"(its runs: {', '.join(map(str, trained))} epochs).")
    lines += ["", f"| variant | gain at {budget} epochs [95% interval] | break-even ratio [95% interval] | "
                  f"measured ratio on this CPU | at equal time here | on your GPU, for this network |",
              "|---|---|---|---|---|---|"]
    for r in real:
        x, e = one(even, r, "bnet_epochs"), one(cost, r, "bnet_epochs")
        here = "—" if e is None or e.note else _priced_verdict(e)
        lines.append(f"| {name(r)} | {_points(r.final_accuracy_diff_mean, r.final_accuracy_diff_ci_low, r.final_accuracy_diff_ci_high)} {r.verdict} | "
                     f"{'—' if x is None else _break_even(x)} | {'—' if x is None else _price(x)} | {here} | "
                     f"{'—' if x is None else _advice(r, x)} |")
    changed = _one_family_of_all(p, cost)
    lines += ["", f"Holm families, as computed: (a) over the {int(p['final_accuracy_p'].notna().sum())} equal-epoch "
                  f"comparisons (every BNET variant, placebo included, × budget), (c) over the {n_cost} equal-cost "
                  f"ones; each question is answered on its own, so each is its own family ((b) and (d) are "
                  f"estimates with intervals, not tests). Taken as one family of "
                  f"{int(p['final_accuracy_p'].notna().sum()) + n_cost}, {changed} verdict"
                  f"{'' if changed == 1 else 's'} at the measured ratios would change."]
    if len(tables.get("skipped", [])):
        lines += ["", f"{len(tables['skipped'])} run(s) left out, listed below the tables."]
    lines += ["", f"(`{command}`)"]
    return "\n".join(lines)
