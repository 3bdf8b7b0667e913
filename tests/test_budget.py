"""Budget studies from generated run folders with known curves: epochs to match and equal cost by hand."""
import json

import numpy as np
import pytest

from bnet_fastai.app.cli import main
from bnet_fastai.analysis.budget import read_cost
from bnet_fastai.analysis.markdown import budget_markdown
from bnet_fastai.analysis.report import report

from .test_report import _write_run

# final accuracy per seed and budget; seed 1 is seed 0 + 0.02 and seed 2 is seed 0 - 0.02 in both arms
BN = {2: [0.70, 0.72, 0.68], 3: [0.76, 0.78, 0.74], 4: [0.80, 0.82, 0.78]}
BNET = {2: [0.75, 0.77, 0.73], 3: [0.79, 0.81, 0.77]}


def _runs(out, arm, norm, **config):
    for epochs, finals in arm.items():
        for seed, final in enumerate(finals):
            _write_run(out, list(np.linspace(0.3, final, epochs)), seed=seed, norm=norm, epochs=epochs, **config)


def _cost(path, ratio, arch="xmininet"):
    rows = [{"arch": arch, "size": 32, "bs": 64, "format": "channels_last", "variant": v,
             "ratio_to_bn": r, "ms_per_step": 10 * r} for v, r in (("bn", 1.0), ("bnet-k3-all", ratio))]
    path.write_text(json.dumps({"command": "python benchmarks/train_step.py --archs xmininet", "rows": rows,
                                "machine": "test"}))
    return path


@pytest.fixture
def study(tmp_path):
    _runs(tmp_path, BN, "bn")
    _runs(tmp_path, BNET, "bnet")
    _write_run(tmp_path, [0.5, 0.9], seed=0, norm="bn", epochs=2, lr=0.1)  # another recipe, never pooled
    _write_run(tmp_path, [0.5, 0.6, 0.7, 0.8, 0.95], seed=0, norm="bn", epochs=5, lr=0.1)
    _cost(tmp_path / "cost.json", 1.25)
    return tmp_path


def test_epochs_to_match_interpolates_between_budgets_and_says_not_reached(study):
    match = report(study, target=0.7)["epochs_to_match"].set_index("bn_epochs")
    assert list(match.index) == [2, 3, 4] and (match["recipe"].str.contains("lr=0.003")).all()
    assert match.loc[2, "match"] == "at or below" and match.loc[2, "epochs_to_match"] == 2.0
    # BN at 3 epochs: 0.76; BNET 0.75 at 2, 0.79 at 3: 2 + (0.76 - 0.75) / 0.04 = 2.25
    assert match.loc[3, "match"] == "reached" and match.loc[3, "epochs_to_match"] == pytest.approx(2.25)
    assert match.loc[3, "ratio_to_bn_epochs"] == pytest.approx(0.75) and match.loc[3, "target"] == pytest.approx(0.76)
    # every resample of seeds moves target and curve alike: the interval is the point
    assert (match.loc[3, "ci_low"], match.loc[3, "ci_high"]) == pytest.approx((2.25, 2.25))
    assert match.loc[4, "match"] == "not reached" and np.isnan(match.loc[4, "epochs_to_match"])
    assert match.loc[4, "largest_bn_budget"] and match.loc[4, "ci_high"] == np.inf
    assert match.loc[4, "n_pairs"] == 3 and match.loc[4, "bnet_budgets"] == "2,3"


def test_equal_cost_sets_bnet_against_bn_interpolated_at_the_measured_ratio(study):
    cost = report(study, target=0.7)["equal_cost"].set_index("bnet_epochs")
    assert cost.loc[2, "cost_ratio"] == 1.25 and "train_step.py" in cost.loc[2, "cost_source"]
    # BNET at 2 epochs vs BN at 2.5: BN 0.73, 0.75, 0.71; BNET 0.75, 0.77, 0.73: +0.02 each
    assert cost.loc[2, "bn_epochs_equal_cost"] == 2.5 and cost.loc[2, "bn_accuracy_mean"] == pytest.approx(0.73)
    assert cost.loc[2, "diff_mean"] == pytest.approx(0.02) and cost.loc[2, "p"] == 2 / 8
    # BNET at 3 vs BN at 3.75: 0.76 + 0.75 x 0.04 = 0.79, BNET's own: a difference of 0, p 1
    assert cost.loc[3, "diff_mean"] == pytest.approx(0.0, abs=1e-12) and cost.loc[3, "p"] == 1.0
    assert list(cost["family"]) == ["equal cost"] * 2
    assert list(cost["p_holm"]) == pytest.approx([0.5, 1.0]) and list(cost["verdict"]) == ["cannot tell"] * 2


def test_equal_cost_never_extrapolates_past_bns_budgets(study):
    cost = report(study, target=0.7, cost=1.5)["equal_cost"].set_index("bnet_epochs")
    assert cost.loc[2, "bn_epochs_equal_cost"] == 3.0 and cost.loc[2, "diff_mean"] == pytest.approx(-0.01)
    assert cost.loc[3, "note"] == "not computed: BN's budgets are 2-4 epochs" and np.isnan(cost.loc[3, "p"])
    assert cost.loc[2, "p_holm"] == cost.loc[2, "p"] == 2 / 8  # a family of one: the other was no test


def test_budgets_keep_their_rows_and_the_figure_is_written(study):
    tables = report(study, target=0.7)
    paired = tables["paired"]
    main_recipe = paired[paired["recipe"].str.contains("lr=0.003")]
    assert sorted(main_recipe["epochs"]) == [2, 3] and (paired["family"] == "equal epochs").all()
    summary = tables["summary"]
    assert len(summary[summary["recipe"].str.contains("lr=0.1")]) == 2  # its own rows, 2 and 5 epochs
    assert (study / "budget.png").read_bytes()[:4] == b"\x89PNG"
    text = budget_markdown(tables)
    assert "| xmininet | bnet-k3-all | 4 (largest) | 0.8000 | not reached by 3 [> 3, > 3] | — |" in text
    assert "| xmininet | bnet-k3-all | 3 | 0.7600 | 2.25 [2.25, 2.25] | 0.75 |" in text


def test_a_study_of_one_budget_is_no_budget_study(tmp_path):
    _runs(tmp_path, {3: BN[3]}, "bn")
    _runs(tmp_path, {3: BNET[3]}, "bnet")
    tables = report(tmp_path, target=0.7)
    assert "equal_cost" not in tables and not (tmp_path / "budget.png").exists()


def test_cli_reads_a_named_cost_file_and_rejects_a_bad_one(study, tmp_path, capsys):
    assert main(["report", str(study), "--markdown", "--cost", str(_cost(tmp_path / "c.json", 1.5))]) == 0
    assert "not computed: BN's budgets are 2-4 epochs" in capsys.readouterr().out
    assert main(["report", str(study), "--cost", str(tmp_path / "missing.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bnet-fastai report: error: cannot read the cost ratios in") and "\n" not in err
    assert main(["report", str(study), "--cost-ratio", "-1"]) == 2
    assert "the cost ratio must be a number > 0" in capsys.readouterr().err


# three more variants of the same recipe: above BN's largest budget, below its smallest (the placebo's name)
LAST5 = {2: [0.81, 0.83, 0.79], 3: [0.83, 0.85, 0.81]}
PLACEBO = {2: [0.69, 0.71, 0.67], 3: [0.70, 0.72, 0.68]}


@pytest.fixture
def variants(study):
    _runs(study, LAST5, "bnet", k=5, placement="last")
    _runs(study, PLACEBO, "bnet", k=1, placement="all")
    rows = [{"arch": "xmininet", "size": 32, "bs": 64, "format": "channels_last", "variant": v, "ratio_to_bn": r}
            for v, r in (("bn", 1.0), ("bnet-k3-all", 1.3), ("bnet-k5-last", 1.05), ("bnet-k1-all", 1.1))]
    (study / "cost.json").write_text(json.dumps({"command": "python benchmarks/train_step.py --opt adam",
                                                 "machine": "test", "rows": rows}))
    return study


def test_break_even_ratio_is_the_bn_budget_that_matches_bnet_over_bnets_budget(variants):
    even = report(variants, target=0.7)["break_even"].set_index(["variant", "bnet_epochs"])
    # BN 0.70, 0.76, 0.80 at 2, 3, 4 epochs. BNET k3 all at 2: 0.75 = BN at 2 + 0.05 / 0.06 -> 2.8333 / 2
    row = even.loc[("bnet-k3-all", 2)]
    assert row["match"] == "reached" and row["bound"] == ""
    assert row["bn_epochs_to_match"] == pytest.approx(2 + 5 / 6) and row["break_even"] == pytest.approx((2 + 5 / 6) / 2)
    # every resample moves both arms alike: the interval is the point
    assert (row["ci_low"], row["ci_high"]) == pytest.approx((row["break_even"],) * 2)
    # at 3 epochs: 0.79 = BN at 3 + 0.03 / 0.04 -> 3.75 / 3 = 1.25
    assert even.loc[("bnet-k3-all", 3), "break_even"] == pytest.approx(1.25)
    # 0.81 and 0.83 lie above BN's largest budget (0.80 at 4): bounds >= 4/2 and >= 4/3, never extrapolated
    above = even.loc["bnet-k5-last"]
    assert list(above["match"]) == ["not reached"] * 2 and list(above["bound"]) == [">=", ">="]
    assert list(above["break_even"]) == pytest.approx([2.0, 4 / 3]) and list(above["ci_high_bound"]) == [">=", ">="]
    # 0.69 and 0.70 are at or below BN's smallest budget (0.70 at 2): bounds <= 2/2 and <= 2/3
    below = even.loc["bnet-k1-all"]
    assert list(below["bound"]) == ["<=", "<="] and list(below["break_even"]) == pytest.approx([1.0, 2 / 3])
    assert below["is_placebo"].all() and not even.loc["bnet-k3-all", "is_placebo"].any()


def test_each_variant_is_costed_at_its_own_measured_ratio(variants):
    tables = report(variants, target=0.7)
    ratios = tables["equal_cost"].groupby("variant")["cost_ratio"].unique()
    assert {v: list(r) for v, r in ratios.items()} == {"bnet-k1-all": [1.1], "bnet-k3-all": [1.3],
                                                       "bnet-k5-last": [1.05]}
    even = tables["break_even"].groupby("variant")["cost_ratio"].first()
    assert even.to_dict() == {"bnet-k1-all": 1.1, "bnet-k3-all": 1.3, "bnet-k5-last": 1.05}
    # BNET k5 last at 2 epochs against BN at 2.1: 0.70 + 0.1 x 0.06 = 0.706 per seed mean
    cost = tables["equal_cost"].set_index(["variant", "bnet_epochs"])
    assert cost.loc[("bnet-k5-last", 2), "bn_accuracy_mean"] == pytest.approx(0.706)
    assert (cost["note"] == "").all()  # k3 all at 3 epochs needs BN at 3.9: inside BN's budgets
    # Holm runs over every variant x budget of the report
    assert (tables["paired"]["family"] == "equal epochs").all() and len(tables["paired"]) == 6


def test_a_variant_with_no_measured_ratio_is_named_not_guessed(variants):
    rows = json.loads((variants / "cost.json").read_text())
    rows["rows"] = [r for r in rows["rows"] if r["variant"] != "bnet-k5-last"]
    (variants / "cost.json").write_text(json.dumps(rows))
    cost = report(variants, target=0.7)["equal_cost"].set_index("variant").loc["bnet-k5-last"]
    assert cost["cost_ratio"].isna().all()
    assert (cost["note"] == "no measurement for xmininet bnet-k5-last at 32 px, batch 64, channels_last").all()


def test_answers_name_every_variant_the_placebo_and_the_break_even_ratio(variants):
    from bnet_fastai.analysis.markdown import answers_markdown

    text = answers_markdown(report(variants, target=0.7), "bnet-fastai report DIR --markdown")
    lines = text.splitlines()
    assert lines[0].startswith("At 3 epochs, the largest budget every arm trained, 3 paired seeds")
    a = next(line for line in lines if line.startswith("- **(a)"))
    assert "bnet-k3-all +3.00 pt (cannot tell, kept in 3/3 drop-one-seed checks)" in a
    assert "bnet-k5-last +7.00 pt (cannot tell, kept in 3/3 drop-one-seed checks)" in a
    assert "bnet-k1-all" not in a  # the placebo has its own line
    d = next(line for line in lines if line.startswith("- **(d)"))
    assert "bnet-k3-all 1.25×; bnet-k5-last ≥ 1.33× (table below)." in d
    placebo = next(line for line in lines if line.startswith("- **Placebo**"))
    assert placebo.startswith("- **Placebo** (bnet-k1-all: BN computed through BNET's code): -6.00 pt")
    assert "| bnet-k3-all | +3.00 pt [" in text and "| 1.25 [1.25, 1.25] | 1.300 |" in text  # no interval measured
    # with 3 seeds no verdict is possible: the advice says so instead of a price
    assert "No gain shown at equal epochs" in text


def test_answers_of_a_study_of_two_archs_keep_each_archs_numbers(variants):
    from bnet_fastai.analysis.markdown import answers_markdown

    # mininest: BN as xmininet's, BNET k3 all 0.05 lower at every budget (so no gain, not xmininet's +3 pt)
    _runs(variants, BN, "bn", arch="mininest")
    _runs(variants, {e: [a - 0.05 for a in accs] for e, accs in BNET.items()}, "bnet", arch="mininest")
    text = answers_markdown(report(variants, target=0.7), "bnet-fastai report DIR --markdown")
    a = next(line for line in text.splitlines() if line.startswith("- **(a)"))
    assert "mininest bnet-k3-all -2.00 pt" in a and "xmininet bnet-k3-all +3.00 pt" in a
    assert "| xmininet bnet-k3-all | +3.00 pt [" in text and "| mininest bnet-k3-all | -2.00 pt [" in text


# seven seeds (an exact sign-flip p can reach 2/128) whose BNET - BN differences at equal cost change sign inside
# the price's interval: BN 0.70, 0.76, 0.82 at 2, 3, 4 epochs; BNET 0.73 and 0.77 at 2 and 3 (plus a little noise)
OFFSETS = [0.00, 0.01, -0.01, 0.02, -0.02, 0.005, -0.005]
NOISE = [0.001, -0.001, 0.002, -0.002, 0.0, 0.001, -0.001]


def _priced_study(tmp_path, low, ratio, high):
    bn = {e: [a + o for o in OFFSETS] for e, a in ((2, 0.70), (3, 0.76), (4, 0.82))}
    bnet = {e: [a + o + n for o, n in zip(OFFSETS, NOISE)] for e, a in ((2, 0.73), (3, 0.77))}
    _runs(tmp_path, bn, "bn")
    _runs(tmp_path, bnet, "bnet")
    rows = [{"arch": "xmininet", "size": 32, "bs": 64, "format": "channels_last", "variant": "bnet-k3-all",
             "ratio_to_bn": ratio, "ratio_low": low, "ratio_high": high}]
    (tmp_path / "cost.json").write_text(json.dumps({"command": "python benchmarks/train_step.py --blocks 10",
                                                    "machine": "test", "rows": rows}))
    return report(tmp_path, target=0.7)


def test_an_equal_cost_verdict_stands_only_where_it_holds_at_both_ends_of_the_prices_interval(tmp_path):
    cost = _priced_study(tmp_path, 1.0, 1.1, 1.3)["equal_cost"].set_index("bnet_epochs")
    assert list(cost["cost_ratio_low"]) == [1.0, 1.0] and list(cost["cost_ratio_high"]) == [1.3, 1.3]
    # at ratio 1.0 every seed's BNET is above BN at both budgets; at 1.3 below: BN at 2.6 epochs is 0.736,
    # at 3.9 epochs 0.814 (p 2/128 each, Holm over the two: 0.031)
    assert list(cost["verdict_low"]) == ["BNET higher"] * 2 and list(cost["verdict_high"]) == ["BN higher"] * 2
    assert list(cost["verdict"]) == ["depends on the price"] * 2
    # where the verdict changes: at 2 epochs past 1.2 (mean difference 0.03 - 0.12 (r - 1), the noisiest seed
    # crosses zero at 1.233), at 3 epochs past 1.03 (0.01 - 0.18 (r - 1), 1.044); found on a grid of 0.0075
    assert 1.20 <= cost.loc[2, "flip_ratio"] <= 1.26 and 1.02 <= cost.loc[3, "flip_ratio"] <= 1.10
    text = budget_markdown(report(tmp_path, target=0.7))
    assert "| 1.100 [1.000, 1.300] |" in text and "depends on the price: BNET higher below ratio" in text


def test_a_verdict_that_holds_across_the_interval_stands(tmp_path):
    cost = _priced_study(tmp_path, 0.98, 1.0, 1.02)["equal_cost"].set_index("bnet_epochs")
    assert list(cost["verdict"]) == ["BNET higher"] * 2 and cost["flip_ratio"].isna().all()


@pytest.mark.parametrize("row,message", [
    ({"ratio_to_bn": -1.2}, "row 0 (bnet-k3-all): a step-time ratio must be a number > 0, got ratio_to_bn=-1.2"),
    ({"ratio_to_bn": "1.2"}, "a step-time ratio must be a number > 0, got ratio_to_bn='1.2'"),
    ({"ratio_to_bn": float("nan")}, "a step-time ratio must be a number > 0"),
    ({"ratio_low": 1.3, "ratio_high": 1.4}, "ratio_low <= ratio_to_bn <= ratio_high must hold, got 1.3, 1.2, 1.4"),
    ({"ratio_low": 1.1}, "ratio_low <= ratio_to_bn <= ratio_high must hold"),
    ({"variant": None, "arch": None}, "lacks"),
])
def test_a_malformed_cost_file_is_refused_in_one_line_naming_the_file_and_row(tmp_path, row, message):
    good = {"arch": "xmininet", "size": 32, "bs": 64, "format": "channels_last", "variant": "bnet-k3-all",
            "ratio_to_bn": 1.2}
    bad = {k: v for k, v in {**good, **row}.items() if v is not None}
    path = tmp_path / "cost.json"
    path.write_text(json.dumps({"rows": [bad]}))
    with pytest.raises(ValueError) as error:
        read_cost(path)
    assert str(error.value).startswith(f"{path}, row 0") and message in str(error.value)
    assert "\n" not in str(error.value)


def test_a_budget_study_without_a_cost_measurement_compares_nothing_at_equal_cost(study):
    (study / "cost.json").unlink()
    tables = report(study, target=0.7)
    cost = tables["equal_cost"]
    assert len(cost) == 2 and (cost["note"] == "no cost measurement").all() and "p" not in cost
    assert cost["flip_ratio"].isna().all()
    assert "| no cost measurement |" in budget_markdown(tables)


def test_null_interval_ends_read_as_no_interval(tmp_path):
    tables = _priced_study(tmp_path, None, 1.1, None)
    cost = tables["equal_cost"]
    assert (cost["cost_ratio_low"] == 1.1).all() and (cost["cost_ratio_high"] == 1.1).all()
    assert cost["flip_ratio"].isna().all()
