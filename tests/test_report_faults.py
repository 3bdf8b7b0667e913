"""The faults an audit of `report` found, each on a study written by hand: exact p on counts with ties, an arm cut
short, Holm families that span two datasets, left-out and duplicated runs named, one-seed arms, verdicts that hang
on one seed, runs pooled across commits, and grids that would drop or split an arm without a word."""
import json

import numpy as np
import pytest

from bnet_fastai.analysis.budget import bca_interval, bn_epochs_to_match, expanded_level
from bnet_fastai.analysis.markdown import answers_markdown, budget_markdown, by_dataset, pooled_note, results_markdown
from bnet_fastai.analysis.plots import plot_budgets
from bnet_fastai.analysis.report import per_run, report
from bnet_fastai.data import record
from bnet_fastai.data.datasets import DatasetError
from bnet_fastai.runs.config import RunConfig, expand_grid
from bnet_fastai.sweeps.study import resolve

from .test_budget import BN, BNET, _cost, _runs
from .test_report import _write_run


def _with(run_dir, **written):
    """Add `written` (e.g. dataset n_valid, environment) to a run's config.json."""
    config = json.loads((run_dir / "config.json").read_text())
    (run_dir / "config.json").write_text(json.dumps({**config, **written}))
    return run_dir


def test_p_is_exact_on_counts_of_correct_images_where_float32_accuracies_missed_ties(tmp_path):
    # five seeds, one epoch, 10,000 test images; BNET - BN = -3, +3, +3, +3, +6 images. By hand: |±3 ±3 ±3 ±3 ±6|
    # >= 12 in 10 of 32 patterns (all one sign: 2; the 6 with three 3s against one: 8)
    bn = np.array([8086, 7936, 7922, 7926, 8045])
    for seed, (base, gain) in enumerate(zip(bn, [-3, 3, 3, 3, 6])):
        for norm, count in (("bn", base), ("bnet", base + gain)):
            accuracy = float(np.float32(count / 1e4))  # as history.csv stores it
            _with(_write_run(tmp_path, [accuracy], seed=seed, norm=norm, epochs=1), dataset={"n_valid": 10_000})
    paired = report(tmp_path, target=0.5)["paired"].iloc[0]
    assert paired["final_accuracy_p"] == 10 / 32 and paired["auc_p"] == 10 / 32
    assert paired["p_method"] == ("two-sided sign-flip permutation (exact, 2^5 patterns, on counts of correct test "
                                  "images)")


def test_an_arm_cut_short_is_answered_at_the_largest_budget_every_arm_trained(tmp_path):
    _runs(tmp_path, BN, "bn")  # BN at 2, 3, 4 epochs
    _runs(tmp_path, {**BNET, 4: [0.82, 0.84, 0.80]}, "bnet")  # bnet-k3-all at 2, 3, 4
    _runs(tmp_path, {2: [0.74, 0.76, 0.72], 3: [0.78, 0.80, 0.76]}, "bnet", k=5, placement="last")  # cut short
    _runs(tmp_path, {2: [0.71]}, "bnet", k=3, placement="last")  # one seed only: no pair can be tested
    tables = report(tmp_path, target=0.7)
    text = answers_markdown(tables, "bnet-fastai report DIR --markdown")
    assert text.startswith("At 2 epochs, the largest budget every arm trained, 3 paired seeds")
    a = next(line for line in text.splitlines() if line.startswith("- **(a)"))
    assert "bnet-k3-all +5.00 pt" in a and "bnet-k5-last +4.00 pt" in a
    assert ("- **Not compared**: bnet-k3-last has fewer than 2 seeds paired with BN at 2 epochs (its runs: 2 "
            "epochs).") in text
    tables_at_4 = budget_markdown(tables)
    assert "| xmininet | 4 | 0.8000 [" in tables_at_4 and "bnet-k3-all | 0.8200 [" in tables_at_4


def test_an_arm_with_runs_but_no_seed_paired_is_a_row_that_says_so(tmp_path):
    _runs(tmp_path, BN, "bn")  # seeds 0, 1, 2
    _runs(tmp_path, BNET, "bnet")
    for epochs in (2, 3):
        _write_run(tmp_path, list(np.linspace(0.3, 0.7, epochs)), seed=9, norm="bnet", k=5, placement="last", epochs=epochs)
    text = budget_markdown(report(tmp_path, target=0.7))
    assert "| bnet-k5-last | 0.7000 [—] | " in text and "not compared: no seed with both arms" in text


def test_a_family_spanning_two_datasets_is_stated_as_computed(tmp_path):
    for dataset in ("sample", "fashion-mnist"):
        _runs(tmp_path, BN, "bn", dataset=dataset)
        _runs(tmp_path, BNET, "bnet", dataset=dataset)
    tables = report(tmp_path, target=0.7)
    assert (tables["paired"]["family_size"] == 4).all()  # 2 datasets x 2 budgets, adjusted together
    part = by_dataset(tables)["sample"]
    assert len(part["paired"]) == 2
    text = budget_markdown(part)
    assert ("Holm over the 4 equal-epoch comparisons, every dataset of this report (2 of them in this section)"
            in text)


def test_markdown_names_left_out_runs_and_duplicates_and_survives_a_one_seed_variant(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    _runs(a, BN, "bn")
    _runs(a, BNET, "bnet")
    _write_run(a, [0.1], seed=5, norm="bnet", epochs=3, status="failed")  # a BNET run that did not finish
    _write_run(b, [0.70, 0.76], seed=0, norm="bn", epochs=2)  # the same run as a's, in another folder
    _runs(a, {2: [0.7], 3: [0.8]}, "bnet", k=5, placement="last")  # one seed
    tables = report([a, b], target=0.7, out=tmp_path / "both")
    skipped = tables["skipped"].set_index("status")
    assert skipped.loc["failed", "reason"] == "RuntimeError: out of memory"
    assert skipped.loc["copy", "reason"].startswith(f"the same run as {a / skipped.loc['copy', 'run_id']}")
    text = budget_markdown(tables)
    assert "**Left out** (2 runs, in no number above):" in text
    assert f"- {skipped.loc['failed', 'run_id']}: failed: RuntimeError: out of memory" in text
    answers = answers_markdown(tables, "bnet-fastai report a b --markdown")
    assert "2 run(s) left out, listed below the tables." in answers
    assert "- **Not compared**: bnet-k5-last has fewer than 2 seeds" in answers
    assert "**Left out** (2 runs" in results_markdown(tables)


def _seeds(out, n, gains):
    for seed in range(n):
        _write_run(out, [0.70 + 0.01 * seed], seed=seed, norm="bn", epochs=1)
        _write_run(out, [0.70 + 0.01 * seed + gains[seed]], seed=seed, norm="bnet", epochs=1)


@pytest.mark.parametrize("n,kept", [(6, 0), (7, 7)])
def test_a_verdict_is_checked_against_dropping_each_seed(tmp_path, n, kept):
    # every difference positive: n = 6 gives p = 2/64 < 0.05 (BNET higher), but 5 seeds can reach only 2/32 = 0.0625:
    # the verdict holds under none of the 6 drops; n = 7 gives 2/128, and 6 seeds still 2/64: kept under all 7
    _seeds(tmp_path, n, [0.01 + 0.001 * s for s in range(n)])
    row = report(tmp_path, target=0.5)["paired"].iloc[0]
    assert row["final_accuracy_p"] == 2 / 2 ** n and row["verdict"] == "BNET higher"
    assert (row["kept_dropping_one"], row["n_drops"]) == (kept, n)
    assert f"| BNET higher | {kept}/{n} |" in results_markdown(report(tmp_path, target=0.5))


def test_runs_pooled_from_several_commits_and_thread_counts_are_named(tmp_path):
    _seeds(tmp_path, 3, [0.01, 0.02, 0.03])
    for i, run_dir in enumerate(sorted(tmp_path.iterdir())):
        _with(run_dir, environment={"git_commit": "abcdef0123" if i < 4 else "1234567890", "torch_threads": 1 + (i % 2)})
    note = pooled_note(report(tmp_path, target=0.5)["history"])
    assert note == ("Pooled: runs from 2 commits (1234567: 2 runs, abcdef0: 4 runs); 2 torch thread counts (1: 3 runs, "
                    "2: 3 runs).")
    assert note in results_markdown(report(tmp_path, target=0.5))


def test_a_grid_over_bnet_impl_is_refused_it_is_no_arm():
    with pytest.raises(ValueError, match=r"^bnet_impl takes one value per grid, got auto, torch: it is how BNET is "
                                         r"computed, not an arm"):
        expand_grid(RunConfig(), {"norm": ["bn", "bnet"], "bnet_impl": ["auto", "torch"]})
    assert len(expand_grid(RunConfig(), {"norm": ["bn", "bnet"], "bnet_impl": ["torch"]})) == 2


def test_k_or_placement_beside_variant_names_only_is_refused_not_dropped():
    with pytest.raises(ValueError, match=r"^k applies to norm 'bnet' only, and the norms are BNET variants that fix "
                                         r"their own \(bnet-k5-last\)"):
        expand_grid(RunConfig(), {"norm": ["bn", "bnet-k5-last"], "k": [3, 5]})
    with pytest.raises(ValueError, match="^placement applies to norm 'bnet' only"):
        resolve("fashion-mnist", "cpu", norms="bn,bnet-k5-last", placement="all")
    # the profile's own placement axis does not apply to variant names, and is not an error
    assert {c.placement for c in resolve("fashion-mnist", "cpu", norms="bn,bnet-k5-last").configs()} == {"last", "all"}
    assert len(expand_grid(RunConfig(), {"norm": ["bn", "bnet", "bnet-k5-last"], "k": [3, 5]})) == 4


@pytest.mark.parametrize("text,what", [("{", "not valid JSON"), ('{"dataset": "x"}', "KeyError: 'counts'"),
                                       ('{"counts": {"train": {"0": "many"}}}', "TypeError: a count is not a whole number")])
def test_a_damaged_dataset_record_is_one_line_naming_the_file(tmp_path, text, what):
    (tmp_path / record.RECORD_FILE).write_text(text)
    with pytest.raises(DatasetError) as error:
        record.read(tmp_path)
    assert str(error.value) == (f"the dataset record {tmp_path / record.RECORD_FILE} is damaged ({what}): delete it, "
                                f"and the next run records the dataset's image counts again")


def test_the_break_even_interval_covers_95_percent_with_12_seeds_where_the_percentile_interval_did_not():
    # a known truth: BN's mean accuracy 0.800, 0.820, 0.835, 0.845, 0.850 at 2-6 epochs, BNET's 0.840 at 4, so BN
    # needs 4.5 epochs for BNET's 4 (break-even 1.125). Each seed moves both arms alike (sd 0.006) plus run noise
    # (sd 0.003); 12 seeds, 1000 simulated studies, 1000 resamples each
    budgets, mean = np.array([2.0, 3, 4, 5, 6]), np.array([0.800, 0.820, 0.835, 0.845, 0.850])
    rng, n, covered, percentile = np.random.default_rng(1), 12, 0, 0
    for study in range(1000):
        shared = rng.normal(0, 0.006, n)
        bn = mean + shared[:, None] + rng.normal(0, 0.003, (n, 5))
        bnet = 0.840 + shared + rng.normal(0, 0.003, n)

        def statistic(pick):
            return bn_epochs_to_match(budgets, bn, bnet, pick)

        low, high, _ = bca_interval(statistic, n, boot=1000, seed=study)
        covered += low <= 4.5 <= high
        draws = statistic(np.random.default_rng(study).integers(0, n, (1000, n)))
        low, high = np.quantile(draws, [0.025, 0.975])
        percentile += low <= 4.5 <= high
    assert expanded_level(12) == pytest.approx(0.9785, abs=1e-4) and expanded_level(20) == pytest.approx(0.9682, abs=1e-4)
    assert 0.94 <= covered / 1000 <= 0.97 and percentile / 1000 <= 0.935  # binomial SE of either: 0.007


def test_the_budget_figure_shows_the_paired_difference_and_the_break_even_against_the_measured_ratio(tmp_path):
    _runs(tmp_path, BN, "bn")
    _runs(tmp_path, BNET, "bnet")
    _cost(tmp_path / "cost.json", 1.25)
    tables = report(tmp_path, target=0.7)
    figure = plot_budgets(per_run(tables["history"], 0.7), tables["equal_cost"], tmp_path / "b.png", tables["paired"],
                          tables["break_even"])
    paired_axes, even_axes = figure.axes[2], figure.axes[3]
    # BNET - BN: +5 and +3 points at 2 and 3 epochs (every seed alike), drawn in points
    assert list(paired_axes.lines[1].get_ydata()) == pytest.approx([5.0, 3.0])
    # break-even (2 + 5/6) / 2 and 3.75 / 3; the measured ratio 1.25 as a dashed line
    assert list(even_axes.lines[1].get_ydata()) == pytest.approx([(2 + 5 / 6) / 2, 1.25])
    assert [list(line.get_ydata()) for line in even_axes.lines if line.get_linestyle() == "--"] == [[1.25, 1.25]]


def test_a_bound_prints_as_a_bound_in_the_advice_never_as_a_value():
    from types import SimpleNamespace

    from bnet_fastai.analysis.markdown import _advice

    gain = SimpleNamespace(verdict="BNET higher")
    study = dict(arch="xmininet", size=28, variant="bnet-k3-all", recipe="bs=128 opt=adam")  # a break_even row's
    even = SimpleNamespace(bound="", break_even=1.2, ci_low=1.0, ci_low_bound="<=", **study)
    assert "(≤ 1.00 to be safe)" in _advice(gain, even)
    assert "(1.16 to be safe)" in _advice(gain, SimpleNamespace(bound="", break_even=1.2, ci_low=1.16, ci_low_bound="",
                                                                **study))


def test_the_answers_state_both_holm_families_and_what_one_family_would_change(tmp_path):
    _runs(tmp_path, BN, "bn")
    _runs(tmp_path, BNET, "bnet")
    _cost(tmp_path / "cost.json", 1.25)
    text = answers_markdown(report(tmp_path, target=0.7), "bnet-fastai report DIR --markdown")
    assert ("Holm families, as computed: (a) over the 2 equal-epoch comparisons (every BNET variant, placebo "
            "included, × budget), (c) over the 2 equal-cost ones; each question is answered on its own, so each is "
            "its own family ((b) and (d) are estimates with intervals, not tests). Taken as one family of 4, 0 "
            "verdicts at the measured ratios would change.") in text
