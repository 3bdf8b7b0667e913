"""Sweeps: the grid, resuming after SIGKILL without touching finished runs, and failures that don't stop it."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bnet_fastai.runs import learner
from bnet_fastai.runs.runstate import read_status
from bnet_fastai.sweeps.sweep import expand_grid, sweep
from bnet_fastai.runs.config import RunConfig

CLI = str(Path(sys.executable).with_name("bnet-fastai"))
ARGS = ["--arch", "xmininet", "--norm", "bnet", "--seed", "0,1,2", "--dataset", "sample", "--size", "16",
        "--epochs", "4", "--fraction", "0.3", "--workers", "0"]


def test_a_grid_may_list_bnet_variants_instead_of_a_product_of_k_and_placement():
    base = RunConfig(arch="xmininet", dataset="sample")
    grid = {"seed": [0, 1], "norm": ["bn", "bnet-k3-all", "bnet-k5-last", "bnet-k1-all", "bnet"], "k": [3, 7]}
    configs = expand_grid(base, grid)
    # a variant fixes k and placement (the k axis cannot change it: one run each); plain "bnet" takes the axis
    arms = [(c.seed, c.norm, c.k if c.norm == "bnet" else None, c.placement if c.norm == "bnet" else None)
            for c in configs]
    assert arms == [(s, n, k, p) for s in (0, 1) for n, k, p in (("bn", None, None), ("bnet", 3, "all"),
                                                                 ("bnet", 5, "last"), ("bnet", 1, "all"),
                                                                 ("bnet", 7, "all"))]
    assert [c.run_id.split("_")[1] for c in configs[:5]] == ["bn", "bnet-k3-all", "bnet-k5-last", "bnet-k1-all",
                                                             "bnet-k7-all"]
    # a variant's run is the run its fields name: "bnet-k3-all" and norm="bnet", k=3 are one run_id
    assert configs[1].run_id == RunConfig(arch="xmininet", dataset="sample", norm="bnet", k=3).run_id
    with pytest.raises(ValueError, match="k must be a positive odd integer"):
        expand_grid(base, {"norm": ["bnet-k2-all"]})


def _snapshot(run_dir: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(run_dir.iterdir())}


def test_expand_grid_is_the_product_without_duplicates():
    configs = expand_grid(RunConfig(), {"arch": ["xmininet", "mininest"], "norm": ["bn", "bnet"], "k": [3, 5]})
    # bn ignores k, so its run is the same for both k: 2 archs x (bn + bnet k3 + bnet k5)
    assert len(configs) == 6 and len({c.run_id for c in configs}) == 6
    assert sorted(c.norm for c in configs) == ["bn", "bn", "bnet", "bnet", "bnet", "bnet"]
    with pytest.raises(ValueError, match="unknown RunConfig field.*colour; valid fields: act, arch"):
        expand_grid(RunConfig(), {"colour": ["red"]})


def test_sweep_killed_mid_run_resumes_and_keeps_finished_runs_untouched(tmp_path):
    env = {**os.environ, "BNET_FASTAI_DATA": str(tmp_path / "data")}
    out = tmp_path / "exp"
    run_dirs = [out / c.run_id for c in expand_grid(RunConfig(dataset="sample", size=16, epochs=4, fraction=0.3,
                                                              workers=0, arch="xmininet", norm="bnet"),
                                                    {"seed": [0, 1, 2]})]
    proc = subprocess.Popen([CLI, "sweep", *ARGS, "--out", str(out)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    # kill once run 1 is finished and run 2 has logged at least one epoch of four
    while not (read_status(run_dirs[0])["status"] == "finished" and (run_dirs[1] / "history.csv").exists()
               and len((run_dirs[1] / "history.csv").read_text().splitlines()) >= 2):
        assert proc.poll() is None and time.time() < deadline, "sweep ended or stalled before the kill point"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished_before = _snapshot(run_dirs[0])
    assert read_status(run_dirs[1])["status"] == "interrupted"
    assert json.loads((run_dirs[1] / "status.json").read_text())["status"] == "running"  # as the kill left it

    resumed = subprocess.run([CLI, "sweep", *ARGS, "--out", str(out)], env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "xmininet_bnet-k3-all_s0" in resumed.stdout and "finished (reused)" in resumed.stdout
    assert _snapshot(run_dirs[0]) == finished_before
    for run_dir in run_dirs[1:]:
        assert read_status(run_dir)["status"] == "finished"
        assert len((run_dir / "history.csv").read_text().splitlines()) == 1 + 4


def test_a_failing_run_is_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch):
    monkeypatch.setenv("BNET_FASTAI_DATA", str(tmp_path / "data"))
    base = RunConfig(dataset="sample", size=16, epochs=1, fraction=0.2, workers=0, arch="xmininet")
    build = learner.create_model

    def fail_for_bnet(arch, norm, **kw):  # a fault inside training, not bad input
        if norm == "bnet":
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return build(arch, norm, **kw)

    monkeypatch.setattr(learner, "create_model", fail_for_bnet)
    results = sweep(base, {"norm": ["bnet", "bn"]}, tmp_path / "exp")
    assert [r["status"] for r in results] == ["failed", "finished"]
    failed = json.loads((Path(results[0]["run_dir"]) / "status.json").read_text())
    assert failed["status"] == "failed" and "illegal memory access" in failed["error"]
