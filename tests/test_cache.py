"""The cached pipeline gives fastai's pipeline's items, labels, split and augmentation, from decoded pixels."""
import random
from collections import Counter

import pytest
import torch

from bnet_fastai.data.cache import build_cache, cached_dataloaders
from bnet_fastai.data.datasets import dataloaders

from .archives import WNIDS, serve, write_archive


@pytest.fixture
def data_root(tmp_path, monkeypatch):
    monkeypatch.setenv("BNET_FASTAI_DATA", str(tmp_path / "data"))
    return tmp_path / "data"


def test_same_items_labels_and_class_balance_as_the_fastai_pipeline(data_root):
    ours, theirs = (f("sample", size=24, bs=64, workers=0, fraction=0.4, seed=2)
                    for f in (cached_dataloaders, dataloaders))
    assert list(ours.vocab) == list(theirs.vocab)
    assert list(ours.train_ds.items) == list(theirs.train_ds.items)  # same order, same subsample
    assert [ours.vocab[y] for y in ours.train_ds.labels] == [p.parent.name for p in theirs.train_ds.items]
    assert Counter(ours.train_ds.labels) == Counter(int(y) for _, y in theirs.train_ds)
    assert list(ours.valid_ds.items) == list(theirs.valid_ds.items)


def test_validation_batches_equal_fastais_pixel_for_pixel(data_root):
    ours, theirs = (f("sample", size=32, bs=100, workers=0) for f in (cached_dataloaders, dataloaders))
    (xo, yo), (xt, yt) = ours.valid.one_batch(), theirs.valid.one_batch()
    assert xo.shape == xt.shape == (100, 3, 32, 32) and xo.dtype == torch.float32
    torch.testing.assert_close(xo, xt, atol=1e-6, rtol=0)
    assert torch.equal(yo, yt)


def test_training_batches_are_random_crops_seeded_and_normalised(data_root):
    def batch(seed):
        torch.manual_seed(seed)
        random.seed(seed)
        return cached_dataloaders("sample", size=32, bs=256, workers=0).train.one_batch()[0]

    first, again, other = batch(0), batch(0), batch(1)
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert abs(first.mean().item()) < 1.0 and 0.5 < first.std().item() < 2.0  # ImageNet-stats normalised


def test_grayscale_and_cmyk_are_cached_as_rgb_and_the_cache_is_built_once(tmp_path, data_root, monkeypatch):
    write_archive(tmp_path / "mirror" / "imagenette2-160.tgz", broken=True)
    with serve(tmp_path / "mirror") as url:
        monkeypatch.setenv("BNET_FASTAI_MIRROR", url)
        dls = cached_dataloaders("imagenette-160", size=24, bs=12, workers=0)
    folder = build_cache("imagenette-160", 24)
    stamp = (folder / "train.bin").stat().st_mtime_ns
    assert build_cache("imagenette-160", 24) == folder and (folder / "train.bin").stat().st_mtime_ns == stamp
    assert list(dls.vocab) == list(WNIDS) and len(dls.train_ds) == 12 and len(dls.valid_ds) == 6
    xb, yb = dls.train.one_batch()
    assert xb.shape == (12, 3, 24, 24) and sorted(yb.tolist()) == sorted([0, 1, 2] * 4)
