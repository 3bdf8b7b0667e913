"""Bad data at training time: damaged images are skipped and named on stderr, a damaged decode cache is rebuilt."""
import itertools
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from bnet_fastai.data import cache
from bnet_fastai.data.cache import build_cache, cached_dataloaders
from bnet_fastai.data.datasets import DATASETS, VERIFIED_FILE, dataloaders, image_files, prepare

N_TRAIN, N_VALID = 1437, 360  # the sample's digits


@pytest.fixture
def sample(tmp_path, monkeypatch):
    """The sample dataset, verified: its images as `image_files` lists them once the record is written."""
    monkeypatch.setenv("BNET_FASTAI_DATA", str(tmp_path / "data"))
    path = prepare("sample")
    files = image_files(path, DATASETS["sample"])
    assert (path / VERIFIED_FILE).exists() and len(files) == N_TRAIN + N_VALID
    return files


def _damage(files):
    """Damage, after verification, the first training image (opened by fastai while it sets the pipeline
    up), another one (replaced by junk) and a validation image (truncated); returns the three paths."""
    train = [f for f in files if f.parts[-3] == "train"]
    first, other, valid = train[0], train[100], next(f for f in files if f.parts[-3] == "val")
    first.write_bytes(b"not a PNG")
    other.write_bytes(b"not a PNG either")
    valid.write_bytes(valid.read_bytes()[:60])
    return first, other, valid


def _assert_named_once(err, paths):
    for p in paths:
        lines = [line for line in err.splitlines() if str(p) in line]
        assert len(lines) == 1 and lines[0].startswith(f"skipped unreadable image {p}: "), err


@pytest.mark.parametrize("workers", [0, 2])
def test_images_damaged_after_verification_are_skipped_and_named_by_the_fastai_pipeline(sample, capfd, workers):
    first, other, valid = _damage(sample)
    dls = dataloaders("sample", size=16, bs=4, workers=workers)
    assert len(dls.train_ds) == N_TRAIN - 1 and first not in dls.train_ds.items  # dropped while setting up
    train = [len(y) for _, y in dls.train]
    valid_batches = [(x.shape, len(y)) for x, y in dls.valid]
    # 1,435 readable of 1,436: the last incomplete batch is dropped (drop_last), so 358 batches of 4, not 359
    assert train == [4] * 358
    assert len(valid_batches) == 90 and sum(n for _, n in valid_batches) == N_VALID - 1
    assert {shape[1:] for shape, _ in valid_batches} == {(3, 16, 16)}
    out, err = capfd.readouterr()
    _assert_named_once(err, [first, other, valid])
    assert "skipped" not in out


def test_images_damaged_after_verification_are_left_out_of_the_decode_cache(sample, capfd):
    first, other, valid = _damage(sample)
    dls = cached_dataloaders("sample", size=16, bs=400, workers=0)
    _assert_named_once(capfd.readouterr().err, [first, other, valid])
    assert len(dls.train_ds) == N_TRAIN - 2 and len(dls.valid_ds) == N_VALID - 1
    assert not {first, other, valid} & set(dls.train_ds.items + dls.valid_ds.items)
    for ds in (dls.train_ds, dls.valid_ds):  # labels stay aligned with their images
        assert [dls.vocab[y] for y in ds.labels] == [p.parent.name for p in ds.items]
    # pixels too: the cached validation set equals fastai's, which skips the same image when it is loaded
    ours = torch.cat([x for x, _ in dls.valid])
    theirs = torch.cat([x for x, _ in dataloaders("sample", size=16, bs=400, workers=0).valid])
    assert ours.shape == theirs.shape == (N_VALID - 1, 3, 16, 16)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)


def _truncate(folder):
    data = (folder / "train.bin").read_bytes()
    (folder / "train.bin").write_bytes(data[: len(data) - 100])
    return f"train.bin has {len(data) - 100} bytes, {len(data)} expected"


def _delete(folder):
    (folder / "valid.bin").unlink()
    return "valid.bin is missing"


def _garble(folder):
    (folder / "index.json").write_bytes(b"\x00\xff garbage")
    return "index.json is not valid JSON"


def _relabel(folder):
    index = json.loads((folder / "index.json").read_text())
    index["train_labels"][0] = (index["train_labels"][0] + 1) % 10
    (folder / "index.json").write_text(json.dumps(index))
    return "index.json does not match its checksum"


@pytest.mark.parametrize("damage", [_truncate, _delete, _garble, _relabel])
def test_a_damaged_decode_cache_is_named_in_one_line_and_rebuilt_as_new(sample, capfd, damage):
    folder = build_cache("sample", 16)
    fresh = {name: (folder / name).read_bytes() for name in ("train.bin", "valid.bin", "index.json")}
    fresh_valid = cached_dataloaders("sample", size=16, bs=N_VALID, workers=0).valid.one_batch()
    what = damage(folder)
    capfd.readouterr()
    dls = cached_dataloaders("sample", size=16, bs=N_VALID, workers=0)
    out, err = capfd.readouterr()
    assert err.splitlines() == [f"decode cache {folder} is damaged ({what}): rebuilding it"] and out == ""
    assert {name: (folder / name).read_bytes() for name in fresh} == fresh
    assert len(dls.train_ds) == N_TRAIN
    xb, yb = dls.valid.one_batch()
    assert torch.equal(xb, fresh_valid[0]) and torch.equal(yb, fresh_valid[1])
    assert [p.name for p in folder.parent.iterdir() if p.name.startswith((".cache-", ".trash-"))] == []
    build_cache("sample", 16)
    assert capfd.readouterr().err == ""  # sound again: opened without a word


def test_two_openers_of_a_damaged_cache_rebuild_it_once(sample, capfd, monkeypatch):
    folder = build_cache("sample", 16)
    fresh = (folder / "train.bin").read_bytes()
    what = _truncate(folder)
    both_checked, calls, check = threading.Barrier(2), itertools.count(), cache.cache_damage

    def check_together(folder):  # both find the damage before either takes the lock
        damage = check(folder)
        if next(calls) < 2:
            both_checked.wait(timeout=30)
        return damage

    monkeypatch.setattr(cache, "cache_damage", check_together)
    with ThreadPoolExecutor(2) as pool:  # flock locks separate open files, so threads exclude each other too
        assert list(pool.map(lambda _: build_cache("sample", 16), range(2))) == [folder, folder]
    assert capfd.readouterr().err.splitlines() == [f"decode cache {folder} is damaged ({what}): rebuilding it"]
    assert next(calls) == 4  # 2 checks without the lock, then one each under it: the waiter found it rebuilt
    assert check(folder) is None and (folder / "train.bin").read_bytes() == fresh


def test_the_unreadable_images_notice_goes_to_stderr_on_its_own_line(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("BNET_FASTAI_DATA", str(tmp_path / "data"))
    path = prepare("sample")
    (path / "train" / "3" / "bad.png").write_bytes(b"not a PNG")
    files = image_files(path, DATASETS["sample"])
    out, err = capfd.readouterr()
    assert len(files) == N_TRAIN + N_VALID and path / "train" / "3" / "bad.png" not in files
    assert out == "" and err == f"skipping 1 unreadable image(s) in {path}: train/3/bad.png\n"
