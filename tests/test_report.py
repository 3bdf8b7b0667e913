"""report on a hand-made results folder: known histories give known statistics, exactly."""
import json
import os
from dataclasses import asdict
from math import exp, log, sqrt

import pandas as pd
import pytest

from bnet_fastai.analysis.report import report
from bnet_fastai.runs.runstate import write_status
from bnet_fastai.runs.config import RunConfig

T_975_2 = 4.302652729911275  # Student's t, 97.5% quantile, 2 degrees of freedom
T_975_1 = 12.706204736174707  # 1 degree of freedom


def _logit_interval(values, t, low=0.0, high=1.0):
    """The expected interval, by hand: t interval of the logits of the share of the range, mapped back."""
    share = [(v - low) / (high - low) for v in values]
    logits = [log(p / (1 - p)) for p in share]
    mean = sum(logits) / len(logits)
    sd = sqrt(sum((x - mean) ** 2 for x in logits) / (len(logits) - 1))
    half = t * sd / sqrt(len(logits))
    return tuple(low + (high - low) / (1 + exp(-(mean + s * half))) for s in (-1, 1))
BN = {0: [0.5, 0.7, 0.8], 1: [0.6, 0.8, 0.9], 2: [0.4, 0.6, 0.7]}
BNET = {0: [0.6, 0.8, 0.9], 1: [0.6, 0.9, 0.95], 2: [0.5, 0.7, 0.85]}


def _write_run(out, accuracies, status="finished", **config):
    config = RunConfig(**{"arch": "xmininet", "dataset": "sample", "size": 32, "epochs": 3, **config})
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
    assert bn["n_seeds"] == 3 and bn["seeds"] == "0,1,2" and bn["dataset"] == "sample"
    assert bn["final_accuracy_mean"] == pytest.approx(0.8)
    assert bn["final_accuracy_std"] == pytest.approx(0.1)
    assert (bn["final_accuracy_ci_low"], bn["final_accuracy_ci_high"]) == pytest.approx(
        _logit_interval([0.8, 0.9, 0.7], T_975_2))
    assert bn["ci_method"] == "95% Student-t on the logit scale"
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
    assert row["variant"] == "bnet-k3-all" and row["n_pairs"] == 3 and row["seeds"] == "0,1,2"
    assert row["final_accuracy_diff_mean"] == pytest.approx(0.1)
    assert (row["final_accuracy_diff_ci_low"], row["final_accuracy_diff_ci_high"]) == pytest.approx(
        _logit_interval([0.1, 0.05, 0.15], T_975_2, -1, 1))  # differences per seed
    half = T_975_2 * 0.05 / sqrt(3)  # for differences this small it is close to the plain t interval
    assert row["final_accuracy_diff_ci_low"] == pytest.approx(0.1 - half, abs=0.005)


def test_intervals_stay_in_range_for_two_seeds_near_100_percent(tmp_path):
    """Two seeds at 0.97 and 0.999: a plain t interval (12.7 x sd) reaches far past 1.0."""
    _write_run(tmp_path, [0.9, 0.97], seed=0, norm="bn", epochs=2)
    _write_run(tmp_path, [0.95, 0.999], seed=1, norm="bn", epochs=2)
    _write_run(tmp_path, [0.1, 0.2], seed=0, norm="bnet", epochs=2)  # differences -0.77 and -0.799
    _write_run(tmp_path, [0.9, 1.0], seed=1, norm="bnet", epochs=2)  # and an accuracy of exactly 1
    tables = report(tmp_path, target=0.9)
    bn = tables["summary"].set_index("variant").loc["bn"]
    assert 0.9845 + T_975_1 * 0.0205 / sqrt(2) > 1  # mean + half-width of the plain t interval: past 1
    assert 0 <= bn["final_accuracy_ci_low"] < 0.97 and 0.999 < bn["final_accuracy_ci_high"] <= 1
    assert (bn["final_accuracy_ci_low"], bn["final_accuracy_ci_high"]) == pytest.approx(
        _logit_interval([0.97, 0.999], T_975_1))
    summary = tables["summary"]
    assert ((summary["final_accuracy_ci_low"] >= 0) & (summary["final_accuracy_ci_high"] <= 1)).all()
    paired = tables["paired"].iloc[0]
    for metric in ("final_accuracy", "auc"):
        assert -1 <= paired[f"{metric}_diff_ci_low"] <= paired[f"{metric}_diff_ci_high"] <= 1


def test_several_folders_combine_but_recipes_stay_apart(experiment, tmp_path):
    other = tmp_path / "other"
    for seed in range(2):
        _write_run(other, BN[seed], seed=seed, norm="bn", wd=0.1)  # another recipe: weight decay 0.1
    _write_run(other, BN[0], seed=0, norm="bn")  # the same run as in `experiment`: counted once
    with pytest.raises(ValueError, match="--out"):
        report([experiment, other])
    tables = report([experiment, other], target=0.8, out=tmp_path / "combined")
    summary = tables["summary"]
    bn = summary[summary["variant"] == "bn"].set_index(summary[summary["variant"] == "bn"]["recipe"])
    assert sorted(bn["n_seeds"]) == [1, 2, 3]  # lr=0.1 (1 seed), wd=0.1 (2 seeds), default recipe (3, not 4)
    assert bn.loc[lambda d: d.index.str.contains("wd=0.1 ")].iloc[0]["final_accuracy_mean"] == pytest.approx(0.85)
    assert (tmp_path / "combined" / "summary.csv").exists()
    assert len(list((tmp_path / "combined").glob("curves_*.png"))) == 3


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


@pytest.mark.parametrize("field,value", [("keep_weights", False), ("workers", 3)])
def test_a_setting_that_changes_no_result_never_splits_a_recipe(field, value, tmp_path):
    from bnet_fastai.runs.config import NO_RESULT_CHANGE

    assert field in NO_RESULT_CHANGE
    for seed in range(3):  # BN with the setting changed, BNET at its default: the same recipe, paired by seed
        _write_run(tmp_path, BN[seed], seed=seed, norm="bn", **{field: value})
        _write_run(tmp_path, BNET[seed], seed=seed, norm="bnet")
    tables = report(tmp_path, target=0.8)
    assert tables["summary"]["recipe"].nunique() == 1 and field not in tables["summary"]["recipe"].iloc[0]
    paired = tables["paired"].iloc[0]
    assert paired["n_pairs"] == 3
    # BNET - BN by seed: 0.1, 0.05, 0.15
    assert paired["final_accuracy_diff_mean"] == pytest.approx(0.1)


def _recording_run_id(run_dir):
    """What `run` writes: config.json names the run_id (the helper above writes only the config)."""
    written = json.loads((run_dir / "config.json").read_text())
    (run_dir / "config.json").write_text(json.dumps({"run_id": run_dir.name, **written}))
    return run_dir


def test_a_renamed_copy_of_a_run_is_named_and_never_counted(tmp_path, capsys):
    import shutil

    from bnet_fastai.app.cli import main

    runs = [_recording_run_id(_write_run(tmp_path, BN[seed], seed=seed, norm="bn")) for seed in range(3)]
    for seed in range(3):
        _write_run(tmp_path, BNET[seed], seed=seed, norm="bnet")
    backup = tmp_path / f"{runs[0].name}.old"  # a backup with other content: accuracy 0.1, not 0.8
    shutil.copytree(runs[0], backup)
    pd.DataFrame({"epoch": [0], "train_loss": [1.0], "valid_loss": [1.0], "accuracy": [0.1],
                  "time": ["00:10"]}).to_csv(backup / "history.csv", index=False)
    tables = report(tmp_path, target=0.8)
    bn = tables["summary"].set_index("variant").loc["bn"]
    assert bn["n_seeds"] == 3 and bn["final_accuracy_mean"] == pytest.approx((0.8 + 0.9 + 0.7) / 3)
    assert tables["paired"]["final_accuracy_diff_mean"].iloc[0] == pytest.approx(0.1)
    skipped = tables["skipped"].set_index("run_id")
    assert list(skipped.index) == [backup.name] and skipped.loc[backup.name, "status"] == "copy"
    assert skipped.loc[backup.name, "reason"] == f"{backup} is a copy of {runs[0]} (run_id {runs[0].name}), counted once"
    assert main(["report", str(tmp_path), "--target", "0.8"]) == 0
    assert f"left out {backup.name}: copy: {backup} is a copy of {runs[0]}" in capsys.readouterr().out
    # the renamed folder alone holding its run is that run
    shutil.rmtree(runs[0])
    shutil.rmtree(backup)
    shutil.copytree(runs[1], tmp_path / "seed1-renamed")
    shutil.rmtree(runs[1])
    tables = report(tmp_path, target=0.8)
    assert tables["skipped"].empty and tables["summary"].set_index("variant").loc["bn", "n_seeds"] == 2


@pytest.mark.parametrize("target", ["5", "nan", "0", "x"])
def test_report_refuses_a_target_that_is_no_accuracy(target, experiment, capsys):
    from bnet_fastai.app.cli import main

    with pytest.raises(SystemExit) as stopped:
        main(["report", str(experiment), "--target", target])
    err = capsys.readouterr().err.strip()
    assert stopped.value.code == 2 and len(err.splitlines()) == 1
    assert err.endswith(f"argument --target: must be an accuracy in (0, 1], e.g. 0.8, got {target!r}")


def test_report_names_an_output_folder_it_cannot_write_before_computing(experiment, tmp_path, capsys):
    from bnet_fastai.app.cli import main

    (tmp_path / "a-file").write_text("mine")
    for out, why in ((tmp_path / "a-file", "is a file; give a folder path (--out)"),
                     ("/sys/bnet-fastai-report", "cannot be written"),
                     (tmp_path / ("x" * 300), "cannot be used (File name too long); give another folder path (--out)")):
        assert main(["report", str(experiment), "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and why in err and err.startswith("bnet-fastai report: error: output folder")
    assert (tmp_path / "a-file").read_text() == "mine" and "x" * 300 not in os.listdir(tmp_path)


def test_report_whose_reader_went_away_exits_quietly(experiment):
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "bnet_fastai", "report", str(experiment), "--target", "0.8"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # `| head` that has read what it wanted, before the report prints its first line
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 141 and err.decode().strip() == ""
    assert (experiment / "summary.csv").is_file()  # the report was written before its table was printed


def test_a_report_of_bn_alone_writes_a_readable_empty_paired_table(tmp_path):
    from bnet_fastai.analysis.markdown import results_markdown

    for seed in range(3):
        _write_run(tmp_path, BN[seed], seed=seed, norm="bn")
    tables = report(tmp_path, target=0.8)
    paired = pd.read_csv(tmp_path / "paired.csv")
    assert paired.empty and {"variant", "n_pairs", "final_accuracy_diff_mean", "p_holm", "verdict"} <= set(paired)
    text = results_markdown(tables)
    assert text.endswith("No BNET arm paired with BN by seed: no paired comparison.") and "Holm p (" not in text


def test_a_report_of_two_datasets_times_each_against_its_own_target_and_names_the_dataset_of_each_pair(tmp_path):
    from bnet_fastai.analysis.markdown import results_markdown

    easy = {0: [0.90, 0.95, 0.97], 1: [0.92, 0.96, 0.98]}  # a dataset where 0.8 is reached at once
    for seed in range(2):
        _write_run(tmp_path, BN[seed], seed=seed, norm="bn")
        _write_run(tmp_path, BNET[seed], seed=seed, norm="bnet")
        _write_run(tmp_path, easy[seed], seed=seed, norm="bn", dataset="fashion-mnist")
        _write_run(tmp_path, [a - 0.05 for a in easy[seed]], seed=seed, norm="bnet", dataset="fashion-mnist")
    tables = report(tmp_path)
    summary = tables["summary"].set_index(["dataset", "variant"])
    # 90% of each dataset's best mean final accuracy, floored to 0.01: (0.9 + 0.95) / 2 and 0.975
    assert summary.loc[("sample", "bn"), "target"] == summary.loc[("sample", "bnet-k3-all"), "target"] == 0.83
    assert summary.loc[("fashion-mnist", "bn"), "target"] == 0.87
    # each arm timed against its dataset's own target: sample's BN reaches 0.83 at epoch 2 (seed 1 only)
    assert summary.loc[("sample", "bn"), "n_reached"] == 1
    # fashion-mnist's BNET reaches 0.87 in its 2nd epoch (seed 0) and its 1st (seed 1)
    assert summary.loc[("fashion-mnist", "bnet-k3-all"), "epochs_to_target_mean"] == 1.5
    assert sorted(tables["paired"]["dataset"]) == ["fashion-mnist", "sample"]
    text = results_markdown(tables)
    assert 'Target for "epochs to target": fashion-mnist 0.87, sample 0.83.' in text
    assert "| fashion-mnist | xmininet | bnet-k3-all | 2 | -0.0500 [" in text
    assert "| sample | xmininet | bnet-k3-all | 2 | +0.0750 [" in text  # (0.1 + 0.05) / 2
    from bnet_fastai.analysis.markdown import by_dataset  # what `report --markdown` answers per dataset
    parts = by_dataset(tables)
    assert list(parts) == ["fashion-mnist", "sample"]
    assert [len(parts[d]["summary"]) for d in parts] == [2, 2] and set(parts["sample"]["paired"]["dataset"]) == {"sample"}
    given = report(tmp_path, target=0.8)["summary"]  # a target given applies to every dataset
    assert (given["target"] == 0.8).all()
