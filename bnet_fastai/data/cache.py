"""A faster pipeline with the augmentation of `data.dataloaders`: images decoded once, augmented as tensors.

fastai's default pipeline decodes every JPEG in every epoch and crops and resizes each item with PIL. Here
each training image is decoded once, resized so that its shorter side is `cache_side` (default 1.25 × size:
160 px for 128 px training, Imagenette-160's own resolution), and stored as uint8 in a file on disk that
the loader workers map into memory. Each epoch then samples fastai's RandomResizedCrop (same area and
aspect sampling, ``min_scale=0.35``, same centre-crop fallback) on the cached pixels, resizes with
torchvision's antialiased bilinear resize (PIL's bilinear, which fastai uses, also antialiases), and flips
with probability 0.5 where the dataset allows it. Validation images are stored in their final form: fastai
squishes the whole image to size + extra (extra = ceil(0.14 · size / 8) · 8) and centre-crops `size`.
Batches go through fastai's IntToFloatTensor and ImageNet-stats Normalize, as in `data.dataloaders`.

An image that cannot be decoded while the cache is built is named on stderr and left out of the cache. A
damaged cache is found when it is opened, named on stderr in one line and rebuilt: see `cache_damage`. So is a
stale one: the cache is keyed by the dataset's record (`data.record`: its image counts and when they were
recorded), so a dataset written or extracted anew, even where the cache lives apart from it, gets a new cache.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from fastai.data.core import DataLoaders
from fastai.data.transforms import IntToFloatTensor, Normalize
from fastai.torch_core import TensorCategory, TensorImage, default_device
from fastai.vision.core import imagenet_stats
from PIL import Image

from bnet_fastai._files import shared_tempdir, writer_lock
from bnet_fastai._notice import notice
from bnet_fastai.paths import state_folder
from bnet_fastai.data import record
from bnet_fastai.data.datasets import DATASETS, UNREADABLE, DatasetSpec, image_files, prepare, report_unreadable, subsample_train

CACHE_VERSION = 2  # 2: raw valid.bin, byte sizes and a checksum in index.json
MIN_SCALE, RATIO, VAL_XTRA = 0.35, (3 / 4, 4 / 3), 0.14


def _decode(path: Path, side: int | None = None, square: int | None = None) -> np.ndarray:
    """RGB uint8 (3, H, W): shorter side resized to `side` (never enlarged), or squished to `square`."""
    with Image.open(path) as image:
        image = image.convert("RGB")
        w, h = image.size
        if square:
            image = image.resize((square, square), Image.BILINEAR)
        elif side and min(w, h) > side:
            scale = side / min(w, h)
            image = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR)
        return np.asarray(image).transpose(2, 0, 1).copy()


def _decode_or_skip(path: Path, **kw) -> np.ndarray | None:
    """`_decode`, or None after naming `path` on stderr if it cannot be read."""
    try:
        return _decode(path, **kw)
    except UNREADABLE as e:
        report_unreadable(path, e)
        return None


def _rrc_params(w: int, h: int) -> tuple[int, int, int, int]:
    """fastai's RandomResizedCrop sampling (left, top, width, height), with python's `random` as fastai."""
    for _ in range(10):
        area = random.uniform(MIN_SCALE, 1.0) * w * h
        ratio = math.exp(random.uniform(math.log(RATIO[0]), math.log(RATIO[1])))
        nw, nh = int(round(math.sqrt(area * ratio))), int(round(math.sqrt(area / ratio)))
        if nw <= w and nh <= h:
            return random.randint(0, w - nw), random.randint(0, h - nh), nw, nh
    if w / h < RATIO[0]:
        nw, nh = w, int(w / RATIO[0])
    elif w / h > RATIO[1]:
        nw, nh = int(h * RATIO[1]), h
    else:
        nw, nh = w, h
    return (w - nw) // 2, (h - nh) // 2, nw, nh


def _digest(index: dict) -> str:
    return hashlib.sha256(json.dumps(index, sort_keys=True).encode()).hexdigest()


def cache_damage(folder: Path) -> str | None:
    """What is wrong with the cache in `folder`, or None if nothing that is cheap to find.

    Checked: index.json parses and matches the SHA-256 of its content written with it (file names, labels,
    shapes, vocab), and train.bin and valid.bin exist with the byte sizes those shapes give. Not checked, as
    it would mean reading gigabytes on every open: pixel bytes altered in place without changing a file's size.
    """
    try:
        index = json.loads((folder / "index.json").read_text())
        if not isinstance(index, dict) or index.pop("sha256", None) != _digest(index):
            return "index.json does not match its checksum"
    except FileNotFoundError:
        return "index.json is missing"
    except (OSError, ValueError):  # ValueError: not JSON, or not text
        return "index.json is not valid JSON"
    for name, expected in index["bytes"].items():
        if not (folder / name).is_file():
            return f"{name} is missing"
        if (size := (folder / name).stat().st_size) != expected:
            return f"{name} has {size} bytes, {expected} expected"
    return None


def _fault(folder: Path, source: str) -> str | None:
    """Why the cache in `folder` cannot be used for the dataset copy `source`, or None."""
    if damage := cache_damage(folder):
        return f"is damaged ({damage})"
    if json.loads((folder / "index.json").read_text()).get("source") != source:
        return "was built from another copy of the dataset (its record of image counts differs)"
    return None


def build_cache(name: str, size: int, cache_side: int | None = None, threads: int | None = None) -> Path:
    """Decode dataset `name` once for training at `size`; returns the cache folder.

    One process builds it (parallel runs, ranks: the others wait, then use it), in a temporary folder renamed
    into place. A damaged cache (`cache_damage`) is named on stderr and rebuilt; images that cannot be
    decoded are named on stderr and left out.
    """
    spec, path = DATASETS[name], prepare(name)  # prepare checks the folder against its record
    source = record.key(record.read(path))  # the copy of the dataset the cache is built from
    cache_side = cache_side or round(size * 1.25)
    # beside the dataset, or where `paths.state_folder` says when the dataset's folder is read-only
    folder = state_folder(path) / f".bnet_fastai_cache_s{size}_c{cache_side}_v{CACHE_VERSION}"
    if folder.is_dir() and _fault(folder, source) is None:
        return folder
    with writer_lock(folder):
        if folder.is_dir():
            if (fault := _fault(folder, source)) is None:
                return folder  # built by another process while this one waited
            notice(f"decode cache {folder} {fault}: rebuilding it")
            shutil.rmtree(folder)
        tmp = shared_tempdir(".cache-", folder.parent)
        try:
            _write(tmp, path, spec, size, cache_side, threads, source)
            tmp.rename(folder)  # a kill leaves a hidden temp folder, never a half-written cache
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _write(tmp: Path, path: Path, spec: DatasetSpec, size: int, cache_side: int, threads: int | None,
           source: str) -> None:
    """The cache of the dataset at `path`, in folder `tmp`: train.bin, valid.bin (raw uint8 pixels), index.json."""
    files = image_files(path, spec)
    split = [f.relative_to(path).parts[0] for f in files]
    vocab = sorted({f.parent.name for f in files})
    train = [f for f, s in zip(files, split) if s == spec.train]
    valid = [f for f, s in zip(files, split) if s == spec.valid]
    valid_square = size + math.ceil(size * VAL_XTRA / 8) * 8
    crop = (valid_square - size) // 2
    kept, shapes, offset = {spec.train: [], spec.valid: []}, [], 0  # unreadable images are left out
    with ThreadPoolExecutor(threads or os.cpu_count()) as pool:  # PIL releases the GIL while decoding
        with open(tmp / "train.bin", "wb") as out:
            for f, pixels in zip(train, pool.map(partial(_decode_or_skip, side=cache_side), train)):
                if pixels is not None:
                    out.write(pixels.tobytes())
                    kept[spec.train].append(f)
                    shapes.append((offset, pixels.shape[1], pixels.shape[2]))
                    offset += pixels.size
        with open(tmp / "valid.bin", "wb") as out:
            for f, pixels in zip(valid, pool.map(partial(_decode_or_skip, square=valid_square), valid)):
                if pixels is not None:
                    out.write(pixels[:, crop:crop + size, crop:crop + size].tobytes())
                    kept[spec.valid].append(f)
    train, valid = kept[spec.train], kept[spec.valid]
    index = {"vocab": vocab, "train": [str(f.relative_to(path)) for f in train], "train_shapes": shapes,
             "train_labels": [vocab.index(f.parent.name) for f in train],
             "valid": [str(f.relative_to(path)) for f in valid],
             "valid_labels": [vocab.index(f.parent.name) for f in valid], "size": size, "cache_side": cache_side, "source": source,
             "bytes": {"train.bin": offset, "valid.bin": len(valid) * 3 * size * size}}
    (tmp / "index.json").write_text(json.dumps({"sha256": _digest(index), **index}))


class CachedTrain(torch.utils.data.Dataset):
    """Training items from the cache: fastai's RandomResizedCrop and flip, on uint8 tensors."""

    def __init__(self, folder: Path, dataset: Path, keep: list[int] | None = None, flip: bool = True):
        index = json.loads((folder / "index.json").read_text())
        self.folder, self.size, self.flip, self.vocab = folder, index["size"], flip, index["vocab"]
        self.dataset = dataset
        keep = range(len(index["train"])) if keep is None else keep
        self.shapes = [index["train_shapes"][i] for i in keep]
        self.labels = [index["train_labels"][i] for i in keep]
        # the image files under the dataset's folder, wherever the cache lives (beside it, or in
        # BNET_FASTAI_CACHE for a read-only root): `subsample_train` picks a fraction by these paths
        self.items = [dataset / index["train"][i] for i in keep]
        self._data = None  # mapped lazily, in each loader worker

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        if self._data is None:
            self._data = np.memmap(self.folder / "train.bin", dtype=np.uint8, mode="r")
        offset, h, w = self.shapes[i]
        pixels = self._data[offset:offset + 3 * h * w].reshape(3, h, w)
        left, top, cw, ch = _rrc_params(w, h)
        crop = torch.from_numpy(np.array(pixels[:, top:top + ch, left:left + cw]))  # a writable copy
        image = TF.resize(crop, [self.size, self.size], antialias=True)
        if self.flip and random.random() < 0.5:
            image = image.flip(-1)
        return TensorImage(image), TensorCategory(self.labels[i])


class CachedValid(torch.utils.data.Dataset):
    """Validation items from the cache, already in their final (squished, centre-cropped) form."""

    def __init__(self, folder: Path, dataset: Path):
        index = json.loads((folder / "index.json").read_text())
        size = index["size"]
        self.pixels = torch.from_numpy(np.fromfile(folder / "valid.bin", dtype=np.uint8).reshape(-1, 3, size, size))
        self.labels, self.vocab = index["valid_labels"], index["vocab"]
        self.items = [dataset / p for p in index["valid"]]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return TensorImage(self.pixels[i]), TensorCategory(self.labels[i])


def default_workers() -> int:
    """Loader workers for the cached pipeline: none on machines of up to 4 cores, else up to 8.

    Cached items cost ~0.4 ms each, less than handing batches between processes: on 2 cores the main
    process alone reached 3,215 images/s and 2 workers 1,967 (benchmarks/data_pipeline.py). With more
    cores, workers let loading overlap training.
    """
    cores = os.cpu_count() or 1
    return 0 if cores <= 4 else min(cores, 8)


def cached_dataloaders(name: str, size: int = 128, bs: int = 64, workers: int | None = None, fraction: float = 1.0,
                       seed: int = 0, device=None) -> DataLoaders:
    """Like `data.dataloaders` (same items, labels, split, augmentation), from the decoded cache."""
    folder, dataset = build_cache(name, size), prepare(name)  # the cache may live apart from the dataset
    train, valid = CachedTrain(folder, dataset, flip=DATASETS[name].flip), CachedValid(folder, dataset)
    if fraction < 1:
        kept = set(subsample_train(train.items, dataset / DATASETS[name].train, fraction, seed))
        train = CachedTrain(folder, dataset, keep=[i for i, p in enumerate(train.items) if p in kept],
                            flip=train.flip)
    workers = default_workers() if workers is None else workers
    # fastai's DataBlock puts its loaders on default_device(); from_dsets leaves them (and so the model, which
    # fastai moves to the loaders' device) on the CPU unless told: on a GPU machine runs would train on the CPU
    device = default_device() if device is None else device
    dls = DataLoaders.from_dsets(train, valid, bs=bs, num_workers=workers, device=device, path=dataset,
                                 after_batch=[IntToFloatTensor(), Normalize.from_stats(*imagenet_stats)])
    dls.vocab = train.vocab
    return dls
