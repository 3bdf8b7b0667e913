"""Fashion-MNIST: IDX files decoded into the Imagenette layout, from a local folder or a loopback mirror;
damaged files are rejected in one line naming them; the automatic dataset choices."""
import gzip
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bnet_fastai.data import available as availability
from bnet_fastai.data import fashion_mnist
from bnet_fastai.sweeps import study
from bnet_fastai.app.basics import BASICS_DATASETS
from bnet_fastai.data.datasets import prepare

from .archives import serve, write_idx

CLI = str(Path(sys.executable).with_name("bnet-fastai"))
TRAIN_IMAGES, TRAIN_LABELS = fashion_mnist.FILES["train"]
DEBIAN = fashion_mnist.DEBIAN_FOLDER  # the data_root fixture hides it; a test that needs the real files reads it here


@pytest.fixture
def data_root(tmp_path, monkeypatch):
    """An empty data root; Debian's folder (installed on our machines) hidden so each test picks its source.
    The tests' small IDX files are not the published ones: they say so (`UNPUBLISHED_ENV`)."""
    monkeypatch.setenv("BNET_FASTAI_DATA", str(tmp_path / "data"))
    monkeypatch.setenv(fashion_mnist.UNPUBLISHED_ENV, "1")
    monkeypatch.delenv("BNET_FASTAI_FASHION_MNIST", raising=False)
    monkeypatch.delenv("BNET_FASTAI_MIRROR", raising=False)
    monkeypatch.setattr(fashion_mnist, "DEBIAN_FOLDER", tmp_path / "no-debian-package")
    return tmp_path / "data"


def _cli(*args, env):
    return subprocess.run([CLI, *args], capture_output=True, text=True, env={**os.environ, **env})


def test_files_from_the_mirror_are_decoded_into_the_imagenette_layout(tmp_path, data_root, monkeypatch):
    arrays = write_idx(tmp_path / "mirror", n_train=20, n_valid=10)
    requests = []
    with serve(tmp_path / "mirror", requests) as url:
        monkeypatch.setenv("BNET_FASTAI_MIRROR", url)
        path = prepare("fashion-mnist")
    assert sorted(requests) == sorted(f"/{n}" for pair in fashion_mnist.FILES.values() for n in pair)
    assert path == data_root / "fashion-mnist"
    for split, n in (("train", 20), ("val", 10)):
        files = sorted((path / split).rglob("*.png"))
        assert Counter(p.parent.name for p in files) == {c: n // 10 for c in fashion_mnist.CLASSES}
        for p in files:  # every pixel and label round-trips
            i = int(p.stem)
            assert p.parent.name == fashion_mnist.CLASSES[arrays[f"{split}_labels"][i]]
            np.testing.assert_array_equal(np.asarray(Image.open(p)), arrays[f"{split}_images"][i])
    info = json.loads((path / fashion_mnist.INFO_FILE).read_text())
    assert info["counts"] == {"train": 20, "val": 10} and info["published"] is False
    assert (data_root / "archive" / "fashion-mnist" / TRAIN_IMAGES).is_file()  # downloaded once, kept
    assert not list(data_root.glob(".fashion-mnist-*"))  # no temporary folder left
    with serve(tmp_path / "mirror", requests) as url:  # written once: a second prepare asks nothing
        monkeypatch.setenv("BNET_FASTAI_MIRROR", url)
        before = len(requests)
        assert prepare("fashion-mnist") == path and len(requests) == before


def test_a_local_folder_is_used_without_any_network_request(tmp_path, data_root, monkeypatch):
    write_idx(tmp_path / "local")
    write_idx(tmp_path / "mirror")
    requests = []

    def no_network(*args, **kw):
        raise AssertionError(f"a network request: {args}")

    with serve(tmp_path / "mirror", requests) as url:
        monkeypatch.setenv("BNET_FASTAI_MIRROR", url)
        monkeypatch.setenv("BNET_FASTAI_FASHION_MNIST", str(tmp_path / "local"))
        monkeypatch.setattr(fashion_mnist.urllib.request, "urlopen", no_network)
        path = prepare("fashion-mnist")
    assert requests == []
    assert json.loads((path / fashion_mnist.INFO_FILE).read_text())["source"] == str(tmp_path / "local")
    assert not (data_root / "archive").exists()


@pytest.mark.parametrize("damage, named, words", [
    (dict(truncate=TRAIN_IMAGES), TRAIN_IMAGES, "truncated or corrupt"),
    (dict(magic=TRAIN_LABELS), TRAIN_LABELS, "magic number 1234, expected 2049"),
    (dict(extra_label=True), TRAIN_LABELS, "21 labels for 20 images"),
])
def test_a_damaged_file_exits_2_in_one_line_naming_it_and_a_retry_after_the_fix_works(tmp_path, damage, named,
                                                                                        words):
    local, root = tmp_path / "local", tmp_path / "data"
    write_idx(local, **damage)
    env = {"BNET_FASTAI_DATA": str(root), "BNET_FASTAI_FASHION_MNIST": str(local), fashion_mnist.UNPUBLISHED_ENV: "1"}
    done = _cli("data", "fashion-mnist", env=env)
    assert done.returncode == 2 and done.stdout == ""
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    assert str(local / named) in done.stderr and words in done.stderr
    assert done.stderr.rstrip().endswith("replace it in the folder BNET_FASTAI_FASHION_MNIST names, "
                                         "or unset the variable")
    assert not (root / "fashion-mnist").exists()  # nothing half-written looks complete
    write_idx(local)  # the fix
    fixed = _cli("data", "fashion-mnist", env=env)
    assert fixed.returncode == 0, fixed.stderr
    assert fixed.stdout.strip().splitlines()[-1] == str(root / "fashion-mnist")


def test_a_damaged_download_is_deleted_and_a_retry_from_the_fixed_mirror_works(tmp_path, data_root, monkeypatch):
    write_idx(tmp_path / "mirror", truncate=TRAIN_IMAGES)
    with serve(tmp_path / "mirror") as url:
        monkeypatch.setenv("BNET_FASTAI_MIRROR", url)
        with pytest.raises(fashion_mnist.FashionMNISTError, match="downloaded files were deleted: run again"):
            prepare("fashion-mnist")
        assert not (data_root / "archive" / "fashion-mnist").exists() and not (data_root / "fashion-mnist").exists()
        write_idx(tmp_path / "mirror")  # the mirror is fixed
        assert prepare("fashion-mnist") == data_root / "fashion-mnist"


def test_a_write_killed_partway_leaves_nothing_that_looks_complete(tmp_path, data_root, monkeypatch):
    write_idx(tmp_path / "local")
    monkeypatch.setenv("BNET_FASTAI_FASHION_MNIST", str(tmp_path / "local"))
    saved = []

    def save_then_die(self, path, *args, **kw):
        if len(saved) == 5:
            raise KeyboardInterrupt  # as Ctrl-C or SIGTERM mid-write
        saved.append(path)
        return original(self, path, *args, **kw)

    original = Image.Image.save
    monkeypatch.setattr(Image.Image, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        prepare("fashion-mnist")
    assert len(saved) == 5 and not (data_root / "fashion-mnist").exists()
    assert not list(data_root.glob(".fashion-mnist-*"))
    monkeypatch.setattr(Image.Image, "save", original)
    assert fashion_mnist.is_written(prepare("fashion-mnist"))


def test_a_mirror_without_the_files_names_the_file_the_status_and_the_setting(tmp_path, data_root, monkeypatch):
    (tmp_path / "empty").mkdir()
    with serve(tmp_path / "empty") as url:
        monkeypatch.setenv("BNET_FASTAI_MIRROR", url)
        with pytest.raises(fashion_mnist.FashionMNISTError) as caught:
            prepare("fashion-mnist")
    message = str(caught.value)
    assert "\n" not in message and "<html" not in message.lower()
    assert message.startswith(f"cannot download {TRAIN_IMAGES}: HTTP 404 from {url}/{TRAIN_IMAGES}")
    assert "BNET_FASTAI_MIRROR" in message
    assert not list((data_root / "archive" / "fashion-mnist").iterdir())  # no partial download left


@pytest.mark.slow
@pytest.mark.skipif(not fashion_mnist.DEBIAN_FOLDER.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_debians_files_are_the_published_dataset(tmp_path, monkeypatch):
    monkeypatch.setenv("BNET_FASTAI_DATA", str(tmp_path / "data"))
    monkeypatch.delenv("BNET_FASTAI_FASHION_MNIST", raising=False)
    path = prepare("fashion-mnist")
    info = json.loads((path / fashion_mnist.INFO_FILE).read_text())
    assert info["published"] is True and info["counts"] == {"train": 60000, "val": 10000}
    assert Counter(p.parent.name for p in (path / "val").rglob("*.png")) == {c: 1000 for c in fashion_mnist.CLASSES}


def _available(names):
    return lambda name, timeout=5.0: name in names


@pytest.mark.parametrize("available, experiments, basics", [
    ({"imagenette-160", "mnist", "fashion-mnist"}, "imagenette-160", "mnist"),
    ({"fashion-mnist"}, "fashion-mnist", "fashion-mnist"),
    (set(), "sample", "sample"),
])
def test_auto_dataset_takes_the_first_that_can_be_had(monkeypatch, available, experiments, basics):
    monkeypatch.setattr(availability, "dataset_available", _available(available | {"sample"}))
    assert availability.auto_dataset(study.EXPERIMENT_DATASETS)[0] == experiments
    assert availability.auto_dataset(BASICS_DATASETS)[0] == basics
    resolved = study.resolve("auto", "quick")
    assert resolved.dataset == experiments and any(experiments in r for r in resolved.reasons)
    expected = study.QUICK_ON_DATASET.get(experiments, study.QUICK_ON_IMAGES)
    assert all(getattr(resolved.base, k) == v for k, v in expected.items())


def test_fashion_mnist_is_available_offline_only_with_its_files(tmp_path, data_root, monkeypatch):
    assert not availability.dataset_available("fashion-mnist")
    write_idx(tmp_path / "local")
    monkeypatch.setenv("BNET_FASTAI_FASHION_MNIST", str(tmp_path / "local"))
    assert availability.dataset_available("fashion-mnist")


def test_well_formed_files_that_are_not_the_published_ones_stop_unless_said(tmp_path, data_root, monkeypatch):
    arrays = write_idx(tmp_path / "local")
    monkeypatch.setenv("BNET_FASTAI_FASHION_MNIST", str(tmp_path / "local"))
    monkeypatch.delenv(fashion_mnist.UNPUBLISHED_ENV)
    bad = _cli("run", "--dataset", "fashion-mnist", "--arch", "xmininet", "--epochs", "1", "--out",
               str(tmp_path / "out"), env={"BNET_FASTAI_DATA": str(data_root)})
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert f"{tmp_path / 'local' / TRAIN_IMAGES} is not the published Fashion-MNIST file" in bad.stderr
    assert "4 of 4 files differ" in bad.stderr and f"{fashion_mnist.UNPUBLISHED_ENV}=1" in bad.stderr
    assert not (data_root / "fashion-mnist").exists() and not (tmp_path / "out").exists()

    monkeypatch.setenv(fashion_mnist.UNPUBLISHED_ENV, "1")  # said: used as given, and recorded
    path = prepare("fashion-mnist")
    info = json.loads((path / fashion_mnist.INFO_FILE).read_text())
    assert info["published"] is False and sorted(info["not_published"]) == sorted(fashion_mnist.PUBLISHED_SHA256)
    assert fashion_mnist.provenance(path) == {"source": str(tmp_path / "local"), "published_files": False}
    from bnet_fastai.runs.config import RunConfig
    from bnet_fastai.runs.train import run
    result = run(RunConfig(arch="xmininet", dataset="fashion-mnist", size=16, bs=8, epochs=1, workers=0),
                 tmp_path / "runs")
    dataset = json.loads((Path(result["run_dir"]) / "config.json").read_text())["dataset"]
    assert dataset["published_files"] is False and dataset["source"] == str(tmp_path / "local")
    monkeypatch.delenv(fashion_mnist.UNPUBLISHED_ENV)  # a folder written so is not used later without it
    with pytest.raises(fashion_mnist.FashionMNISTError, match="was written from Fashion-MNIST files that are not"):
        prepare("fashion-mnist")
    assert len(arrays["train_labels"]) == 20


def test_a_mirror_with_a_scheme_urllib_does_not_fetch_is_refused_before_anything_is_written(data_root, monkeypatch,
                                                                                            capsys):
    monkeypatch.setenv("BNET_FASTAI_MIRROR", "gopher://127.0.0.1/fashion")
    with pytest.raises(fashion_mnist.FashionMNISTError, match=r"^BNET_FASTAI_MIRROR='gopher://127.0.0.1/fashion' "
                                                             r"is not a URL with a scheme urllib fetches"):
        prepare("fashion-mnist")
    assert capsys.readouterr().out == "" and not (data_root / "archive").exists()


def test_the_published_files_with_one_label_file_changed_stop_naming_that_file(tmp_path, data_root, monkeypatch):
    if not all((DEBIAN / n).is_file() for n in fashion_mnist.PUBLISHED_SHA256):
        pytest.skip("needs Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist)")
    local = tmp_path / "local"
    shutil.copytree(DEBIAN, local)
    name = "t10k-labels-idx1-ubyte.gz"
    data = bytearray(gzip.decompress((local / name).read_bytes()))
    data[8:] = bytes((b + 1) % 10 for b in data[8:])  # the same header and count, other labels
    (local / name).write_bytes(gzip.compress(bytes(data)))
    monkeypatch.setenv("BNET_FASTAI_FASHION_MNIST", str(local))
    monkeypatch.delenv(fashion_mnist.UNPUBLISHED_ENV)
    done = _cli("data", "fashion-mnist", env={"BNET_FASTAI_DATA": str(data_root)})
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert f"{local / name} is not the published Fashion-MNIST file" in done.stderr
    assert "1 of 4 files differ" in done.stderr and not (data_root / "fashion-mnist").exists()
