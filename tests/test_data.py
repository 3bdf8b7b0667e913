"""Datasets: the real untar_data download through a local mirror, the offline sample, bad data."""
import json
import os
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from bnet_fastai.data import record
from bnet_fastai.data.datasets import EXTRACTED_FILE, VERIFIED_FILE, DatasetError, dataloaders, prepare

from .archives import WNIDS, serve, write_archive

CLI = str(Path(sys.executable).with_name("bnet-fastai"))


@pytest.fixture
def data_root(tmp_path, monkeypatch):
    root = tmp_path / "data"
    monkeypatch.setenv("BNET_FASTAI_DATA", str(root))
    return root


def _cli(*args, env=None, cwd=None):
    return subprocess.run([CLI, *args], capture_output=True, text=True, env={**os.environ, **(env or {})}, cwd=cwd)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_run_downloads_imagenette_from_the_mirror_and_trains_one_epoch(tmp_path):
    write_archive(tmp_path / "mirror" / "imagenette2-160.tgz", broken=True)
    with serve(tmp_path / "mirror") as url:
        env = {"BNET_FASTAI_MIRROR": url, "BNET_FASTAI_DATA": str(tmp_path / "data")}
        done = _cli("run", "--dataset", "imagenette-160", "--arch", "xmininet", "--norm", "bnet", "--epochs", "1",
                    "--size", "32", "--bs", "4", "--workers", "0", "--out", str(tmp_path / "res"), env=env)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("skipping 1 unreadable image(s)") == 1 and "_broken.JPEG" in done.stderr  # named once
    run_dir = next(p for p in (tmp_path / "res").iterdir() if p.is_dir())
    history = pd.read_csv(run_dir / "history.csv")
    assert list(history.columns) == ["epoch", "train_loss", "valid_loss", "accuracy", "time"]
    assert len(history) == 1 and history[["train_loss", "valid_loss", "accuracy"]].notna().all().all()
    assert all(abs(v) < 1e6 for v in history[["train_loss", "valid_loss"]].iloc[0])
    config = json.loads((run_dir / "config.json").read_text())
    assert config["dataset"] | {"path": None} == {"name": "imagenette-160", "path": None, "n_train": 12,
                                                   "n_valid": 6, "classes": list(WNIDS)}
    assert json.loads((run_dir / "status.json").read_text())["status"] == "finished"
    extracted = tmp_path / "data" / "imagenette2-160"
    assert (extracted / EXTRACTED_FILE).exists() and (tmp_path / "data" / "archive" / "imagenette2-160.tgz").exists()
    assert json.loads((extracted / VERIFIED_FILE).read_text())["unreadable"] == [f"train/{WNIDS[2]}/{WNIDS[2]}_broken.JPEG"]
    # the record of what the archive held, counted once it was extracted: every file, the unreadable one too
    kept = json.loads((extracted / record.RECORD_FILE).read_text())
    assert kept["origin"] == f"extracted from {url}/imagenette2-160.tgz"
    assert kept["counts"] == {"train": {w: 4 + (w == WNIDS[2]) for w in WNIDS}, "val": {w: 2 for w in WNIDS}}


def test_grayscale_and_cmyk_images_load_as_rgb(tmp_path, data_root, monkeypatch):
    write_archive(tmp_path / "mirror" / "imagenette2-160.tgz")
    with serve(tmp_path / "mirror") as url:
        monkeypatch.setenv("BNET_FASTAI_MIRROR", url)
        dls = dataloaders("imagenette-160", size=24, bs=12, workers=0)
    modes = {p.name: Image.open(p).mode for p in dls.train_ds.items}
    assert {"L", "CMYK", "RGB"} <= set(modes.values())
    xb, yb = dls.train.one_batch()
    assert xb.shape == (12, 3, 24, 24) and sorted(yb.tolist()) == sorted([0, 1, 2] * 4)


def test_unreachable_mirror_exits_2_naming_sample_and_the_mirror_setting(tmp_path):
    done = _cli("data", "imagenette-160", env={"BNET_FASTAI_MIRROR": f"http://127.0.0.1:{_free_port()}",
                                               "BNET_FASTAI_DATA": str(tmp_path / "data")})
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert "cannot download 'imagenette-160'" in done.stderr and "--dataset sample" in done.stderr
    assert "BNET_FASTAI_MIRROR" in done.stderr


def test_missing_archive_on_the_mirror_is_a_clear_error(tmp_path, data_root, monkeypatch):
    (tmp_path / "empty").mkdir()
    with serve(tmp_path / "empty") as url:
        monkeypatch.setenv("BNET_FASTAI_MIRROR", url)
        with pytest.raises(DatasetError) as caught:
            prepare("imagewoof-320")
    message = str(caught.value)
    assert message == (f"cannot download 'imagewoof-320': HTTP 404 from {url}/imagewoof2-320.tgz; "
                       f"check BNET_FASTAI_MIRROR: it must serve imagewoof2-320.tgz")


def test_a_mirror_without_a_scheme_names_the_setting(data_root, monkeypatch):
    monkeypatch.setenv("BNET_FASTAI_MIRROR", "127.0.0.1:8000/archives")
    with pytest.raises(DatasetError, match="BNET_FASTAI_MIRROR='127.0.0.1:8000/archives' is not a URL"):
        prepare("imagenette-160")
    assert not data_root.exists()


def test_corrupt_archive_is_deleted_and_a_retry_works(tmp_path, data_root, monkeypatch):
    good = write_archive(tmp_path / "good" / "imagenette2-160.tgz").read_bytes()
    (tmp_path / "mirror").mkdir()
    (tmp_path / "mirror" / "imagenette2-160.tgz").write_bytes(good[: len(good) // 2])
    with serve(tmp_path / "mirror") as url:
        monkeypatch.setenv("BNET_FASTAI_MIRROR", url)
        with pytest.raises(DatasetError, match="corrupt or truncated; it was deleted, run again"):
            prepare("imagenette-160")
        assert not (data_root / "archive" / "imagenette2-160.tgz").exists()
        (tmp_path / "mirror" / "imagenette2-160.tgz").write_bytes(good)
        path = prepare("imagenette-160")
    assert sorted(p.name for p in (path / "train").iterdir()) == list(WNIDS)


def test_partial_extraction_is_redone_and_incomplete_layout_is_reported(tmp_path, data_root, monkeypatch):
    write_archive(tmp_path / "mirror" / "imagenette2-160.tgz")
    partial = data_root / "imagenette2-160" / "train"
    partial.mkdir(parents=True)  # as left by a kill during extraction: no completion marker
    with serve(tmp_path / "mirror") as url:
        monkeypatch.setenv("BNET_FASTAI_MIRROR", url)
        path = prepare("imagenette-160")
    assert len(list((path / "val").rglob("*.JPEG"))) == 6
    for f in (path / "val").rglob("*"):
        if f.is_file():
            f.unlink()
    with pytest.raises(DatasetError, match="has no images in val/: it is incomplete; it was deleted with its archive"):
        prepare("imagenette-160")
    assert not path.exists() and not (data_root / "archive" / "imagenette2-160.tgz").exists()
    with serve(tmp_path / "mirror") as url:  # "run again" downloads and extracts it anew
        monkeypatch.setenv("BNET_FASTAI_MIRROR", url)
        assert len(list((prepare("imagenette-160") / "val").rglob("*.JPEG"))) == 6


def test_sample_is_the_digits_in_the_imagenette_layout(data_root):
    path = prepare("sample")
    counts = {split: Counter(p.parent.name for p in (path / split).rglob("*.png")) for split in ("train", "val")}
    assert sum(counts["train"].values()) == 1437 and sum(counts["val"].values()) == 360  # 1,797 digits
    assert sorted(counts["train"]) == sorted(counts["val"]) == [str(d) for d in range(10)]
    assert min(counts["val"].values()) >= 35  # stratified split
    mtime = (path / "train").stat().st_mtime_ns
    assert prepare("sample") == path and (path / "train").stat().st_mtime_ns == mtime  # written once


def test_fraction_subsamples_each_training_class_and_keeps_validation_whole(data_root):
    full = dataloaders("sample", size=16, bs=32, workers=0)
    part = dataloaders("sample", size=16, bs=32, workers=0, fraction=0.25, seed=3)
    count = lambda ds: Counter(str(p.parent.name) for p in ds.items)  # noqa: E731
    full_counts, part_counts = count(full.train_ds), count(part.train_ds)
    assert all(part_counts[c] == round(full_counts[c] * 0.25) for c in full_counts)
    assert len(part.valid_ds) == len(full.valid_ds) == 360
    again = dataloaders("sample", size=16, bs=32, workers=0, fraction=0.25, seed=3)
    assert list(again.train_ds.items) == list(part.train_ds.items)  # seeded


def test_a_complete_dataset_extracted_without_us_is_kept_offline(tmp_path, data_root, monkeypatch):
    folder = data_root / "imagenette2-160"
    for rel in ("train/n01440764/a.JPEG", "val/n01440764/b.JPEG"):
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(b"jpeg")
    monkeypatch.setenv("BNET_FASTAI_MIRROR", f"http://127.0.0.1:{_free_port()}")  # unreachable
    assert prepare("imagenette-160") == folder
    assert (folder / "train/n01440764/a.JPEG").exists() and (folder / EXTRACTED_FILE).exists()


def test_an_unreachable_mirror_leaves_no_progress_glyph_and_no_archive_folder(data_root, monkeypatch, capsys):
    monkeypatch.setenv("BNET_FASTAI_MIRROR", f"http://127.0.0.1:{_free_port()}")  # nothing listens there
    with pytest.raises(DatasetError, match="cannot download 'imagenette-160' from http://127.0.0.1:.*refused"):
        prepare("imagenette-160")
    assert capsys.readouterr().out == ""
    assert not (data_root / "archive").exists() and not (data_root / "imagenette2-160").exists()
