"""Both notebooks run top to bottom with their smallest parameters, and what they write holds real numbers."""
import json
import re

import nbformat
import numpy as np
import pandas as pd
import pytest

from bnet_fastai.app.notebooks import NOTEBOOKS, execute


@pytest.fixture
def roots(tmp_path, monkeypatch):
    monkeypatch.setenv("BNET_FASTAI_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("BNET_FASTAI_RESULTS", str(tmp_path / "results"))
    return tmp_path / "results"


@pytest.mark.parametrize("name", ["experiments", "batchnorm_basics"])
def test_committed_notebooks_are_thin_and_clean(name):
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert [c for c in code if "parameters" in c.metadata.get("tags", [])] == [code[0]]
    assert all(not c.outputs and c.execution_count is None for c in code)
    definitions = [line for c in code for line in c.source.splitlines() if re.match(r"\s*(def|class)\s", line)]
    assert not definitions  # logic lives in the package


def test_experiments_notebook_runs_a_tiny_budget_study_of_variants_and_reports_it(roots):
    executed = execute("experiments", dict(DATASET="sample", PROFILE="quick", ARCHS=["xmininet"], SEEDS=[0, 1],
                                           EPOCHS=[1, 2], SIZE=16, FRACTION=0.2, WORKERS=0, EXPERIMENT="tiny",
                                           NORMS=["bn", "bnet-k3-all", "bnet-k5-last"]),
                       roots)
    cells = nbformat.read(executed, 4).cells
    text = "".join(o.get("text", "") for c in cells for o in c.get("outputs", []))
    shown = "".join(o.get("data", {}).get("text/markdown", "") for c in cells for o in c.get("outputs", []))
    assert "dataset: sample | profile: quick | archs: xmininet" in text and "| 12 runs" in text
    summary = pd.read_csv(roots / "tiny" / "summary.csv")
    assert list(summary["variant"]) == ["bn", "bnet-k3-all", "bnet-k5-last"] * 2 and (summary["n_seeds"] == 2).all()
    assert list(summary["epochs"]) == [1, 1, 1, 2, 2, 2]
    assert (roots / "experiments.html").read_text().lower().startswith("<!doctype html>")
    assert np.isfinite(summary[["final_accuracy_mean", "final_accuracy_ci_low", "auc_mean"]].to_numpy()).all()
    assert (summary["final_accuracy_mean"].between(0, 1)).all()
    paired = pd.read_csv(roots / "tiny" / "paired.csv")
    assert list(paired["variant"]) == ["bnet-k3-all", "bnet-k5-last"] * 2 and (paired["n_pairs"] == 2).all()
    assert np.isfinite(paired["final_accuracy_diff_mean"]).all()
    # a budget study draws one figure set per budget, named by it (curves_1ep.png, ...), and budget.png
    for png in ("curves_1ep.png", "curves_2ep.png", "final_accuracy_1ep.png", "kernels_1ep.png", "budget.png"):
        assert (roots / "tiny" / png).stat().st_size > 10_000
    kernels = json.loads(next((roots / "tiny").glob("xmininet_bnet-k3*_s0_*/kernels.json")).read_text())
    assert len(kernels) == 15 and all(np.isfinite(k["mean_abs"]).all() for k in kernels)
    # the budget cell shows (a)-(d) and the table of variants, each variant's break-even ratio from break_even.csv
    even = pd.read_csv(roots / "tiny" / "break_even.csv")
    assert sorted(set(even["variant"])) == ["bnet-k3-all", "bnet-k5-last"] and len(even) == 4
    assert "**(d) Which BNET, and at what price does it pay off?**" in shown
    assert "| variant | gain at 2 epochs [95% interval] | break-even ratio [95% interval] |" in shown
    assert shown.count("| bnet-k3-all | ") >= 1 and shown.count("| bnet-k5-last | ") >= 1


def test_basics_notebook_runs_and_its_numbers_are_finite(roots):
    execute("batchnorm_basics", dict(DATASET="sample", MAX_TRAIN=300, MAX_VALID=100, EPOCHS=1, RNN_EPOCHS=1, BS=64),
            roots)
    out = roots / "batchnorm_basics"
    mlp = pd.read_csv(out / "mlp_history.csv")
    assert sorted(mlp["model"]) == ["with BatchNorm1d", "without BN"]
    modes = pd.read_csv(out / "modes.csv")
    assert len(modes) == 6 and modes["accuracy"].between(0, 1).all()
    rnn = pd.read_csv(out / "rnn_history.csv")
    assert sorted(rnn["model"]) == ["RNN, BN none", "RNN, BN per step", "RNN, BN shared"]
    steps = pd.read_csv(out / "rnn_step_statistics.csv")
    assert len(steps) == 28 and (steps["running_var"] > 0).all()
    for frame in (mlp, modes, rnn, steps, pd.read_csv(out / "cnn_history.csv")):
        assert np.isfinite(frame.select_dtypes("number").to_numpy()).all()
    for png in ("mlp.png", "cnn.png", "cnn_channel_stats.png", "rnn.png"):
        assert (out / png).stat().st_size > 10_000
