"""The tables of `bnet_fastai.analysis.report` as Markdown, as the README (the answers) and docs/results.md publish them.

`results_markdown` renders one study's summary and paired tables; `budget_markdown` a budget study's
accuracy at every budget, epochs to match and equal cost; `answers_markdown` the three answers the Results
open with. `tests/test_published.py` checks that those pages hold exactly what these give for the committed runs.
"""
from __future__ import annotations

import pandas as pd


def _number(value: float) -> str:
    return "—" if pd.isna(value) else f"{value:.2f}"


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


def results_markdown(tables: dict[str, pd.DataFrame]) -> str:
    """The summary and paired tables of `report` as Markdown."""
    s, p = tables["summary"], tables["paired"]
    lines = [_methods(tables) + f" Target for \"epochs to target\": {s['target'].iloc[0]:.2f}.", "",
             "| dataset | arch | variant | seeds | final accuracy, mean [95% interval] | test SE "
             "| epochs to target (reached) | AUC | valid-loss spread |", "|---|---|---|---|---|---|---|---|---|"]
    for r in s.itertuples():
        lines.append(f"| {r.dataset} | {r.arch} | {r.variant} | {r.n_seeds} | {_accuracy(r)} | "
                     f"{_se(r.test_se)} | "
                     f"{_number(r.epochs_to_target_mean)} ({r.n_reached}/{r.n_seeds}) | {r.auc_mean:.4f} | "
                     f"{r.valid_loss_spread:.4f} |")
    family = p["family"].iloc[0] if len(p) else ""
    lines += ["", f"| arch | variant − bn | pairs | final accuracy difference [95% interval] | p | Holm p "
                  f"({family}, {len(p)} comparisons) | AUC difference [95% interval] | AUC p | verdict |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in p.itertuples():
        lines.append(f"| {r.arch} | {r.variant} | {r.n_pairs} | {_difference(r)} | {_p(r.final_accuracy_p)} | "
                     f"{_p(r.p_holm)} | "
                     f"{_mean_interval(r.auc_diff_mean, r.auc_diff_ci_low, r.auc_diff_ci_high, True)} | "
                     f"{_p(r.auc_p)} | {r.verdict} |")
    return "\n".join(lines)


def budget_markdown(tables: dict[str, pd.DataFrame]) -> str:
    """A budget study's three tables: accuracy and the paired difference at every budget, epochs to match,
    equal cost."""
    s, p = tables["summary"], tables["paired"]
    match, cost = tables["epochs_to_match"], tables["equal_cost"]
    lines = [_methods(tables), "",
             f"**At every budget** (each a complete schedule; Holm over the {len(p)} equal-epoch comparisons):", "",
             "| arch | epochs | BN, mean [95% interval] | BNET variant | BNET, mean [95% interval] | test SE | "
             "BNET − BN [95% interval] | p | Holm p | verdict |", "|---|---|---|---|---|---|---|---|---|---|"]
    bn = s[s["variant"] == "bn"].set_index(["arch", "epochs"])
    for (arch, epochs), row in bn.sort_index().iterrows():
        pair = p[(p["arch"] == arch) & (p["epochs"] == epochs)]
        bn_cell = _accuracy(row)
        if pair.empty:
            lines.append(f"| {arch} | {epochs} | {bn_cell} | — (BN only) | — | {_se(row.test_se)} | "
                         f"— | — | — | — |")
        for r in pair.itertuples():
            other = s[(s["arch"] == arch) & (s["epochs"] == epochs) & (s["variant"] == r.variant)].iloc[0]
            lines.append(f"| {arch} | {epochs} | {bn_cell} | {r.variant} | {_accuracy(other)} | "
                         f"{_se(other.test_se)} | {_difference(r)} | {_p(r.final_accuracy_p)} | {_p(r.p_holm)} | "
                         f"{r.verdict} |")
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
        lines += ["", f"**Equal cost**: BNET at E epochs against BN at ratio × E epochs, BN's per-seed "
                      f"accuracy interpolated linearly between its budgets (ratio: BNET/BN training-step time, "
                      f"`{cost['cost_source'].iloc[0]}`; Holm over the {len(done)} equal-cost comparisons):", "",
                  "| arch | variant | BNET epochs | ratio | BN epochs at equal cost | BNET | BN (interpolated) | "
                  "BNET − BN [95% interval] | p | Holm p | verdict |", "|---" * 11 + "|"]
        for r in cost.itertuples():
            if r.note:
                lines.append(f"| {r.arch} | {r.variant} | {r.bnet_epochs} | {r.cost_ratio:.3f} | "
                             f"{r.bn_epochs_equal_cost:.2f} | {r.bnet_accuracy_mean:.4f} | {r.note} | — | — | "
                             f"— | — |")
                continue
            lines.append(f"| {r.arch} | {r.variant} | {r.bnet_epochs} | {r.cost_ratio:.3f} | "
                         f"{r.bn_epochs_equal_cost:.2f} | {r.bnet_accuracy_mean:.4f} | {r.bn_accuracy_mean:.4f} | "
                         f"{_mean_interval(r.diff_mean, r.diff_ci_low, r.diff_ci_high, True)} | {_p(r.p)} | "
                         f"{_p(r.p_holm)} | {r.verdict} |")
    return "\n".join(lines)


def _match(r) -> str:
    """Epochs to match with its interval: "3.41 [3.12, 3.80]", "≤ 2 [≤ 2, 2.40]", "not reached by 4 [3.60, > 4]"
    (the smallest budget reads "≤": BNET is there already; above the largest, "> ": not reached)."""
    first, last = r.bnet_budgets.split(",")[0], r.bnet_budgets.split(",")[-1]

    def one(v: float) -> str:
        return f"> {last}" if v == float("inf") else f"≤ {first}" if v == float(first) else f"{v:.2f}"

    value = f"not reached by {last}" if r.match == "not reached" else one(r.epochs_to_match)
    return f"{value} [{one(r.ci_low)}, {one(r.ci_high)}]"


def answers_markdown(budget_tables: dict[str, pd.DataFrame], accuracy_tables: dict[str, pd.DataFrame],
                     commands: tuple[str, str]) -> str:
    """The Results' three opening lines: (a) more accurate at equal epochs, (b) the same accuracy in fewer
    epochs, (c) better at equal training time; each with its number, interval, adjusted p and command.
    `budget_tables` is the report of the budget study, `accuracy_tables` of the published accuracy study (its
    rows for the budget study's arch and variant are quoted too); `commands` the two commands behind them."""
    budget_cmd, accuracy_cmd = commands
    p, match, cost = budget_tables["paired"], budget_tables["epochs_to_match"], budget_tables["equal_cost"]
    a = [f"{r.arch} {r.variant} at {r.epochs} epochs (the largest budget both arms trained, {r.n_pairs} seeds): "
         f"{_difference(r)}, Holm p {_p(r.p_holm)} over {len(p)} budgets — **{r.verdict}**"
         for r in p[p["epochs"] == p["epochs"].max()].itertuples()]
    shown = set(zip(p["arch"], p["variant"]))
    accuracy = accuracy_tables["paired"]
    a += [f"the published {r.epochs}-epoch study ({r.n_pairs} seeds): {_difference(r)}, Holm p {_p(r.p_holm)} over "
          f"{len(accuracy)} comparisons — **{r.verdict}** (`{accuracy_cmd}`)"
          for r in accuracy.itertuples() if (r.arch, r.variant) in shown]
    b = []
    for r in match.itertuples():
        largest_bnet = int(r.bnet_budgets.split(",")[-1])
        if not (r.largest_bn_budget or r.bn_epochs == largest_bnet):
            continue
        goal = f"BN's {r.bn_epochs}-epoch accuracy ({r.target:.4f})"
        if r.match == "not reached":
            b.append(f"{r.arch} {r.variant} does not reach {goal} within its {largest_bnet} epochs "
                     f"(95% interval {_match(r).split(' [', 1)[1].rstrip(']')})")
        else:
            b.append(f"{r.arch} {r.variant} reaches {goal} in {_match(r)} epochs, {r.ratio_to_bn_epochs:.2f}× BN's")
    done = cost[cost["note"] == ""]
    c = [f"{r.arch} {r.variant} at {r.bnet_epochs} epochs against BN at {r.bn_epochs_equal_cost:.2f} epochs (the "
         f"same training time at the measured step-time ratio {r.cost_ratio:.2f}): {r.diff_mean:+.4f} "
         f"[{r.diff_ci_low:+.4f}, {r.diff_ci_high:+.4f}], Holm p {_p(r.p_holm)} over {len(done)} budgets — "
         f"**{r.verdict}**" for r in done[done["bnet_epochs"] == done["bnet_epochs"].max()].itertuples()]
    return "\n".join([
        f"- **(a) More accurate at the same number of epochs?** {'; '.join(a)}. (`{budget_cmd}`)",
        f"- **(b) The same accuracy in fewer epochs?** {'; '.join(b)}. (`{budget_cmd}`)",
        f"- **(c) Better at equal training time?** {'; '.join(c) or 'no equal-cost comparison could be made'}. "
        f"(`{budget_cmd}`)"])
