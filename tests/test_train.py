"""One run on the offline sample: it learns, it is reproducible, its files tell its state."""
import json
from pathlib import Path

import pandas as pd
import pytest

from bnet_fastai.runs.runstate import read_status, run_lock, write_status
from bnet_fastai.runs.config import RunConfig
from bnet_fastai.runs.train import run

from .helpers import CPU_IMPL

QUICK = dict(dataset="sample", size=16, bs=64, epochs=2, fraction=0.3, workers=0, arch="xmininet")


@pytest.fixture(autouse=True)
def _data_root(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("BNET_FASTAI_DATA", str(tmp_path_factory.getbasetemp() / "shared-data"))


def _files(run_dir):
    return {p.name: p.read_bytes() for p in sorted(run_dir.iterdir())}


def test_sample_trains_a_mini_model_well_above_chance(tmp_path):
    result = run(RunConfig(arch="xmininet", norm="bnet", dataset="sample", size=32, epochs=2, lr=1e-2, workers=0),
                 tmp_path)
    history = pd.read_csv(f"{result['run_dir']}/history.csv")
    assert result["status"] == "finished" and len(history) == 2
    assert history["accuracy"].iloc[-1] > 0.6  # 10 classes: chance is 0.1
    assert history["train_loss"].iloc[-1] < history["train_loss"].iloc[0]


def test_same_seed_on_cpu_gives_the_same_history(tmp_path):
    first = run(RunConfig(norm="bnet", seed=5, **QUICK), tmp_path / "a")
    second = run(RunConfig(norm="bnet", seed=5, **QUICK), tmp_path / "b")
    other = run(RunConfig(norm="bnet", seed=6, **QUICK), tmp_path / "c")
    cols = ["epoch", "train_loss", "valid_loss", "accuracy"]
    h1, h2, h3 = (pd.read_csv(f"{r['run_dir']}/history.csv")[cols] for r in (first, second, other))
    pd.testing.assert_frame_equal(h1, h2)
    assert not h1.equals(h3)


def test_config_json_records_everything(tmp_path):
    config = RunConfig(norm="bnet", k=5, placement="last", channels_last=True, **QUICK)
    result = run(config, tmp_path)
    written = json.loads(open(f"{result['run_dir']}/config.json").read())
    assert written["run_id"] == config.run_id and written["config"] == config.__dict__
    train = Path(written["dataset"]["path"]) / "train"
    assert written["dataset"]["n_train"] == sum(round(len(list(d.iterdir())) * 0.3) for d in train.iterdir())
    assert written["dataset"]["n_valid"] == 360
    assert written["model"]["parameters"] > written["model"]["parameters_not_decayed"] > 0
    assert written["weight_decay_rule"].startswith("no decay for BN gamma/beta, BNET kernel/bias")
    env = written["environment"]
    assert {"torch", "fastai", "timm", "python", "git_commit", "device"} <= set(env) and env["device"].startswith("cpu")
    assert written["training"] == {"schedule": "fit_one_cycle", "fp16": False, "world_size": 1, "device": "cpu",
                                   "bnet_impl": CPU_IMPL}  # "auto" resolved: the C++ kernels on this CPU
    assert json.loads(open(f"{result['run_dir']}/status.json").read())["bnet_impls_used"] == [CPU_IMPL]


def test_the_commit_recorded_is_the_one_the_process_imported_not_a_later_head(monkeypatch):
    import subprocess

    from bnet_fastai.runs import train

    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                          cwd=Path(train.__file__).parent).stdout.strip()
    assert train._COMMIT == (head or None)
    # a sweep's checkout moving on under it (a commit made while it trains) is not asked again
    monkeypatch.setattr(train, "_git_commit", lambda: "a later HEAD")
    assert train._environment()["git_commit"] == train._COMMIT


def test_a_finished_run_is_reused_byte_for_byte(tmp_path):
    config = RunConfig(norm="bn", **QUICK)
    first = run(config, tmp_path)
    before = _files(tmp_path / config.run_id)
    again = run(config, tmp_path)
    assert again["reused"] and not first["reused"] and _files(tmp_path / config.run_id) == before


def test_nan_loss_stops_the_run_as_diverged(tmp_path):
    result = run(RunConfig(norm="bn", opt="sgd", lr=1e8, **QUICK), tmp_path)
    assert result["status"] == "diverged" and result["epochs_done"] < 2


def test_running_reads_as_interrupted_once_nobody_holds_the_run_lock(tmp_path):
    run_dir = tmp_path / "exp" / "some_run"
    run_dir.mkdir(parents=True)
    write_status(run_dir, "running")
    assert read_status(run_dir)["status"] == "interrupted"  # no process holds its lock
    with run_lock(run_dir):
        assert read_status(run_dir)["status"] == "running"
        with pytest.raises(RuntimeError, match="is being trained by another process"):
            _second_lock(run_dir)
    assert read_status(run_dir)["status"] == "interrupted"


def _second_lock(run_dir):
    with run_lock(run_dir):
        pass


def test_force_keeps_the_finished_run_when_the_data_cannot_be_had(tmp_path, monkeypatch):
    config = RunConfig(norm="bn", **QUICK)
    finished = run(config, tmp_path / "exp")
    before = _files(tmp_path / "exp" / config.run_id)
    (tmp_path / "not-a-folder").write_text("")
    monkeypatch.setenv("BNET_FASTAI_DATA", str(tmp_path / "not-a-folder"))  # the data cannot be written
    with pytest.raises(OSError):
        run(config, tmp_path / "exp", force=True)
    assert finished["status"] == "finished" and _files(tmp_path / "exp" / config.run_id) == before


def test_compile_option_hands_fastai_a_compiled_model():
    from bnet_fastai.runs.learner import build_learner

    learn, _ = build_learner(RunConfig(norm="bnet", compile=True, **QUICK))
    assert hasattr(learn.model, "_orig_mod") and learn.model._orig_mod.__class__.__name__ == "XResNet"
