"""report on a hand-made results folder: known histories give known statistics, exactly."""
import json
from dataclasses import asdict
from math import sqrt

import pandas as pd
import pytest

from bnet_fastai.report import report
from bnet_fastai.runstate import write_status
from bnet_fastai.train import RunConfig

T_975_2 = 4.302652729911275  # Student's t, 97.5% quantile, 2 degrees of freedom
BN = {0: [0.5, 0.7, 0.8], 1: [0.6, 0.8, 0.9], 2: [0.4, 0.6, 0.7]}
BNET = {0: [0.6, 0.8, 0.9], 1: [0.6, 0.9, 0.95], 2: [0.5, 0.7, 0.85]}


def _write_run(out, accuracies, status="finished", **config):
    config = RunConfig(arch="xmininet", dataset="sample", size=32, epochs=3, **config)
    run_dir = out / config.run_id
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps({"config": asdict(config)}))
    history = pd.DataFrame({"epoch": range(len(accuracies)), "train_loss": [1.5 - a for a in accuracies],
                            "valid_loss": [1 - a for a in accuracies], "accuracy": accuracies,
                            "time": ["00:10"] * len(accuracies)})
    history.to_csv(run_dir / "history.csv", index=False)
    write_status(run_dir, status, **({"error": "RuntimeError: out of memory"} if status == "failed" else {}))
    return run_dir


@pytest.fixture
def experiment(tmp_path):
    for seed in range(3):
        _write_run(tmp_path, BN[seed], seed=seed, norm="bn")
        _write_run(tmp_path, BNET[seed], seed=seed, norm="bnet")
    _write_run(tmp_path, [0.1], seed=7, norm="bn", status="failed")
    _write_run(tmp_path, [0.1, float("nan")], seed=8, norm="bn", status="diverged")
    _write_run(tmp_path, [0.2], seed=9, norm="bn", status="running")  # no process holds it: interrupted
    _write_run(tmp_path, [0.3, 0.4, 0.5], seed=0, norm="bn", lr=0.1)  # another recipe: its own row
    return tmp_path


def test_summary_has_the_known_means_intervals_epochs_to_target_and_areas(experiment):
    tables = report(experiment, target=0.8)
    summary = tables["summary"].set_index(["variant", "recipe"])
    bn = summary.loc["bn"].loc[lambda d: d.index.str.contains("lr=0.003")].iloc[0]
    bnet = summary.loc["bnet-k3-all"].iloc[0]
    half = T_975_2 * 0.1 / sqrt(3)
    assert bn["n_seeds"] == 3 and bn["seeds"] == "0,1,2" and bn["dataset"] == "sample"
    assert bn["final_accuracy_mean"] == pytest.approx(0.8)
    assert bn["final_accuracy_std"] == pytest.approx(0.1)
    assert (bn["final_accuracy_ci_low"], bn["final_accuracy_ci_high"]) == pytest.approx((0.8 - half, 0.8 + half))
    assert bn["n_reached"] == 2 and bn["epochs_to_target_mean"] == pytest.approx(2.5)  # seed 2 never reaches it
    assert bn["seconds_to_target_mean"] == pytest.approx(25.0)  # 30 s and 20 s
    assert bn["auc_mean"] == pytest.approx((0.2 / 0.3 + 2.3 / 3 + 1.7 / 3) / 3)
    assert bn["valid_loss_spread"] == pytest.approx(0.1)
    assert bnet["final_accuracy_mean"] == pytest.approx(0.9)
    assert bnet["epochs_to_target_mean"] == pytest.approx(7 / 3) and bnet["n_reached"] == 3
    assert bnet["valid_loss_spread"] == pytest.approx((sqrt(1 / 300) + 0.1 + 0.05) / 3)
    other = summary.loc["bn"].loc[lambda d: d.index.str.contains("lr=0.1")].iloc[0]
    assert other["n_seeds"] == 1 and other["final_accuracy_mean"] == pytest.approx(0.5)


def test_paired_difference_is_per_seed_with_its_interval(experiment):
    paired = report(experiment, target=0.8)["paired"]
    assert len(paired) == 1
    row = paired.iloc[0]
    half = T_975_2 * 0.05 / sqrt(3)  # differences 0.1, 0.05, 0.15
    assert row["variant"] == "bnet-k3-all" and row["n_pairs"] == 3 and row["seeds"] == "0,1,2"
    assert row["final_accuracy_diff_mean"] == pytest.approx(0.1)
    assert (row["final_accuracy_diff_ci_low"], row["final_accuracy_diff_ci_high"]) == pytest.approx(
        (0.1 - half, 0.1 + half))


def test_failed_diverged_and_interrupted_runs_are_left_out_and_named(experiment):
    tables = report(experiment, target=0.8)
    skipped = tables["skipped"].set_index("status")
    assert sorted(skipped.index) == ["diverged", "failed", "interrupted"]
    assert skipped.loc["failed", "reason"] == "RuntimeError: out of memory"
    assert "ended without writing a status" in skipped.loc["interrupted", "reason"]
    written = pd.read_csv(experiment / "summary.csv")
    assert len(written) == 3 and set(written["variant"]) == {"bn", "bnet-k3-all"}
    for png in ("curves_1.png", "curves_2.png", "final_accuracy_1.png"):
        assert (experiment / png).read_bytes()[:4] == b"\x89PNG"


def test_report_of_an_empty_folder_says_so(tmp_path):
    with pytest.raises(ValueError, match="no finished run in"):
        report(tmp_path)
