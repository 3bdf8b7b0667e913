"""A dataset is what its record says: image counts per split and class, checked before a run trains; the
decode cache is keyed by the record, so a dataset written anew gets a new cache even where the cache lives apart."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bnet_fastai.data import fashion_mnist, record
from bnet_fastai.data.datasets import DatasetError, prepare
from bnet_fastai.paths import state_folder
from bnet_fastai.runs.config import RunConfig
from bnet_fastai.runs.train import run

from .archives import write_idx

CLI = str(Path(sys.executable).with_name("bnet-fastai"))
SAMPLE_RUN = ["--arch", "xmininet", "--dataset", "sample", "--size", "16", "--epochs", "1", "--fraction", "0.2",
              "--workers", "0"]


@pytest.fixture
def data_root(tmp_path, monkeypatch):
    monkeypatch.setenv("BNET_FASTAI_DATA", str(tmp_path / "data"))
    return tmp_path / "data"


def _empty_class(path):
    moved = path.parent / "moved-away"
    shutil.move(str(path / "train" / "3"), str(moved))
    (path / "train" / "3").mkdir()
    return "train/3 holds 0 images, 146 recorded", lambda: (shutil.rmtree(path / "train" / "3"),
                                                          shutil.move(str(moved), str(path / "train" / "3")))


def _delete_one(path):
    victim = sorted((path / "val" / "7").iterdir())[0]
    data = victim.read_bytes()
    victim.unlink()
    return "val/7 holds 35 images, 36 recorded", lambda: victim.write_bytes(data)


def _add_one(path):
    extra = path / "train" / "0" / "extra.png"
    shutil.copy(sorted((path / "train" / "1").iterdir())[0], extra)  # a "1" among the zeros
    return "train/0 holds 143 images, 142 recorded", extra.unlink


@pytest.mark.parametrize("fault", [_empty_class, _delete_one, _add_one])
def test_a_dataset_that_differs_from_its_record_stops_the_run_with_exit_2_naming_the_folder_and_the_fix(
        tmp_path, data_root, fault):
    path = prepare("sample")
    assert json.loads((path / record.RECORD_FILE).read_text())["counts"] == record.count_images(path, ("train", "val"))
    what, undo = fault(path)
    env = {**os.environ, "BNET_FASTAI_DATA": str(data_root)}
    done = subprocess.run([CLI, "run", *SAMPLE_RUN, "--out", str(tmp_path / "out")], capture_output=True, text=True,
                          env=env)
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [f"bnet-fastai run: error: dataset 'sample' at {path} does not match its record: {what}; "
                                        f"delete {path} and run `bnet-fastai data sample` again"]
    assert not any((tmp_path / "out").rglob("model.pth"))  # nothing trained
    undo()
    result = run(RunConfig(arch="xmininet", dataset="sample", size=16, bs=32, epochs=1, fraction=0.2, workers=0),
                 tmp_path / "out")
    n_train = json.loads((Path(result["run_dir"]) / "config.json").read_text())["dataset"]["n_train"]
    assert result["status"] == "finished" and n_train == 287  # round(0.2 x each class's 142..152) summed


def test_two_class_folders_wrong_are_named_with_a_count_of_the_rest(data_root):
    path = prepare("sample")
    for cls in ("2", "5"):
        next((path / "train" / cls).iterdir()).unlink()
    with pytest.raises(DatasetError) as caught:
        prepare("sample")
    assert str(caught.value) == (f"dataset 'sample' at {path} does not match its record: train/2 holds 141 images, "
                                 f"142 recorded (and 1 more class folder(s)); delete {path} and run "
                                 f"`bnet-fastai data sample` again")


def _written_fashion_mnist(tmp_path, monkeypatch, n_train=20, n_valid=10):
    """A small Fashion-MNIST (not the published files: said so) written from a local folder."""
    source = tmp_path / f"idx-{n_train}"
    write_idx(source, n_train=n_train, n_valid=n_valid)
    monkeypatch.setenv("BNET_FASTAI_FASHION_MNIST", str(source))
    monkeypatch.setenv(fashion_mnist.UNPUBLISHED_ENV, "1")
    return prepare("fashion-mnist")


def test_fashion_mnist_without_its_val_trousers_is_refused_and_its_record_comes_from_the_label_files(
        tmp_path, data_root, monkeypatch):
    path = _written_fashion_mnist(tmp_path, monkeypatch)
    kept = json.loads((path / record.RECORD_FILE).read_text())
    assert kept["counts"] == {"train": {c: 2 for c in sorted(fashion_mnist.CLASSES)},
                              "val": {c: 1 for c in sorted(fashion_mnist.CLASSES)}}
    assert kept["origin"] == f"written from {tmp_path / 'idx-20'}"
    for png in (path / "val" / "trouser").iterdir():
        png.unlink()
    config = RunConfig(arch="xmininet", dataset="fashion-mnist", size=16, bs=4, epochs=1, workers=0)
    with pytest.raises(ValueError, match=r"^dataset 'fashion-mnist' at .* does not match its record: val/trouser "
                                         r"holds 0 images, 1 recorded; delete .* and run `bnet-fastai data "
                                         r"fashion-mnist` again$"):
        run(config, tmp_path / "out")
    assert not any((tmp_path / "out").rglob("model.pth"))


def test_a_fashion_mnist_written_from_the_published_files_before_records_is_held_to_the_published_counts(
        tmp_path, data_root, monkeypatch):
    path = _written_fashion_mnist(tmp_path, monkeypatch)
    (path / record.RECORD_FILE).unlink()  # as an older bnet-fastai wrote it
    info = json.loads((path / fashion_mnist.INFO_FILE).read_text())
    (path / fashion_mnist.INFO_FILE).write_text(json.dumps({**info, "published": True}))
    with pytest.raises(DatasetError) as caught:  # 2 and 1 images per class, not 6,000 and 1,000
        prepare("fashion-mnist")
    assert str(caught.value).startswith(f"dataset 'fashion-mnist' at {path} does not match the published counts: "
                                        f"train/ankle_boot holds 2 images, 6000 recorded (and 19 more class folder(s))")
    assert not (path / record.RECORD_FILE).exists()


def test_a_dataset_from_before_records_is_recorded_once_in_one_line_then_held_to_it(data_root, capfd):
    path = prepare("sample")
    (path / record.RECORD_FILE).unlink()  # as an older bnet-fastai, or fastai's own untar_data, left it
    capfd.readouterr()
    prepare("sample")
    assert capfd.readouterr().err.splitlines() == [
        f"recorded the image counts of dataset 'sample' at {path} (1437 train, 360 val images in 10 classes): "
        f"later runs check them"]
    assert json.loads((path / record.RECORD_FILE).read_text())["origin"] == "counted on first use"
    prepare("sample")
    assert capfd.readouterr().err == ""  # recorded once
    next((path / "val" / "4").iterdir()).unlink()
    with pytest.raises(DatasetError, match="val/4 holds 35 images, 36 recorded"):
        prepare("sample")


def test_a_dataset_written_anew_gets_a_new_decode_cache_where_the_cache_lives_apart(
        tmp_path, data_root, monkeypatch, read_only_bind, capfd):
    """The owner of a read-only share replaces Fashion-MNIST with another copy: the cache in BNET_FASTAI_CACHE,
    built from the first copy, is rebuilt with one line, and the run trains on the new copy's images."""
    _written_fashion_mnist(tmp_path, monkeypatch, n_train=20)
    shared = read_only_bind(data_root)
    monkeypatch.setenv("BNET_FASTAI_DATA", str(shared))
    monkeypatch.setenv("BNET_FASTAI_CACHE", str(tmp_path / "cache"))
    config = RunConfig(arch="xmininet", dataset="fashion-mnist", size=16, bs=4, epochs=1, workers=0)

    def n_train(out):
        result = run(config, tmp_path / out)
        return json.loads((Path(result["run_dir"]) / "config.json").read_text())["dataset"]["n_train"]

    assert n_train("first") == 20
    cache = state_folder(shared / "fashion-mnist") / ".bnet_fastai_cache_s16_c20_v2"
    assert cache.is_dir()
    monkeypatch.setenv("BNET_FASTAI_DATA", str(data_root))  # the owner, on the writable side
    shutil.rmtree(data_root / "fashion-mnist")
    _written_fashion_mnist(tmp_path, monkeypatch, n_train=30)
    monkeypatch.setenv("BNET_FASTAI_DATA", str(shared))
    capfd.readouterr()
    assert n_train("second") == 30  # a cache keyed by its folder alone gave 20: the first copy's images
    assert [line for line in capfd.readouterr().err.splitlines() if "decode cache" in line] == [
        f"decode cache {cache} was built from another copy of the dataset (its record of image counts differs): "
        f"rebuilding it"]
    index = json.loads((cache / "index.json").read_text())
    assert index["source"] == record.key(record.read(shared / "fashion-mnist")) and len(index["train"]) == 30
