"""A dataset prepared once is trained on from a read-only root; what runs write goes to BNET_FASTAI_CACHE."""
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from bnet_fastai.data.datasets import DATASETS, VERIFIED_FILE, prepare
from bnet_fastai.paths import state_folder
from bnet_fastai.runs.config import RunConfig
from bnet_fastai.runs.train import run

CLI = str(Path(sys.executable).with_name("bnet-fastai"))
CONFIG = dict(arch="xmininet", dataset="sample", size=16, bs=32, epochs=1, fraction=0.2, workers=0)


@pytest.fixture
def read_only_root(tmp_path, monkeypatch, read_only_bind):
    """A data root holding the prepared `sample` dataset, bind-mounted read-only (root and mount(8) needed)."""
    writable = tmp_path / "data"
    monkeypatch.setenv("BNET_FASTAI_DATA", str(writable))
    prepare("sample")  # prepared by whoever owns the share: no cache, no record of unreadable images yet
    ro = read_only_bind(writable)
    monkeypatch.setenv("BNET_FASTAI_DATA", str(ro))
    return ro


def test_a_prepared_dataset_trains_from_a_read_only_root(read_only_root, tmp_path, monkeypatch):
    monkeypatch.setenv("BNET_FASTAI_CACHE", str(tmp_path / "cache"))
    dataset = read_only_root / DATASETS["sample"].folder
    before = sorted(p.name for p in dataset.iterdir())
    result = run(RunConfig(**CONFIG), tmp_path / "out")
    assert result["status"] == "finished"
    assert sorted(p.name for p in dataset.iterdir()) == before  # nothing could be written there, nothing was
    (mine,) = (tmp_path / "cache").iterdir()
    assert mine == state_folder(dataset) and mine.name.startswith("sample-")
    assert (mine / VERIFIED_FILE).is_file() and any(p.name.startswith(".bnet_fastai_cache_s16") for p in mine.iterdir())
    config = json.loads((Path(result["run_dir"]) / "config.json").read_text())
    assert config["dataset"]["path"] == str(dataset)  # the dataset's folder, not the cache's
    assert run(RunConfig(**{**CONFIG, "seed": 1}), tmp_path / "out")["status"] == "finished"  # and reuses them


def test_fraction_picks_the_same_images_whatever_the_cache_location(read_only_root, tmp_path, monkeypatch):
    import pandas as pd

    monkeypatch.setenv("BNET_FASTAI_CACHE", str(tmp_path / "cache"))
    config = RunConfig(**{**CONFIG, "fraction": 0.1})
    read_only = run(config, tmp_path / "from-read-only")  # the decode cache in BNET_FASTAI_CACHE
    monkeypatch.setenv("BNET_FASTAI_DATA", str(tmp_path / "data"))  # the same folder, writable: cache beside it
    writable = run(config, tmp_path / "from-writable")
    assert any(p.name.startswith(".bnet_fastai_cache_s16") for p in (tmp_path / "data" / "sample").iterdir())
    counts = [json.loads((Path(r["run_dir"]) / "config.json").read_text())["dataset"]["n_train"]
              for r in (read_only, writable)]
    train = tmp_path / "data" / "sample" / "train"
    assert counts == [sum(max(1, round(len(list(d.iterdir())) * 0.1)) for d in train.iterdir())] * 2  # 142 of 1437
    histories = [pd.read_csv(Path(r["run_dir"]) / "history.csv") for r in (read_only, writable)]
    pd.testing.assert_frame_equal(histories[0].drop(columns="time"), histories[1].drop(columns="time"))


def test_a_read_only_root_with_no_writable_cache_stops_in_one_line_naming_the_setting(read_only_root, tmp_path):
    blocked = tmp_path / "file-not-folder"
    blocked.write_text("")
    env = {**os.environ, "BNET_FASTAI_CACHE": str(blocked / "cache")}
    done = subprocess.run([CLI, "run", "--arch", "xmininet", "--dataset", "sample", "--size", "16", "--epochs", "1",
                           "--fraction", "0.2", "--workers", "0", "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, env=env)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "is read-only and the cache folder" in done.stderr and "set BNET_FASTAI_CACHE" in done.stderr


def test_dataset_folders_are_readable_by_the_other_users_of_a_shared_root(tmp_path, monkeypatch):
    monkeypatch.setenv("BNET_FASTAI_DATA", str(tmp_path / "data"))
    umask = os.umask(0o022)
    try:
        path = prepare("sample")
    finally:
        os.umask(umask)
    mode = stat.S_IMODE(path.stat().st_mode)
    assert mode == 0o755, oct(mode)
