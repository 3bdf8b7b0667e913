"""Datasets: a registry of names, fetched with fastai's `untar_data`, and the embedded offline `sample`.

Data root: ``data/`` beside the package's project, unless ``BNET_FASTAI_DATA`` names another folder
(`bnet_fastai.paths`). When ``BNET_FASTAI_MIRROR=<base url>`` is set, every archive is fetched from
``<base url>/<archive file name>`` instead of its usual host.
"""
from __future__ import annotations

import gzip
import json
import os
import shutil
import tarfile
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

from fastai.data.block import CategoryBlock, DataBlock, TransformBlock
from fastai.data.core import DataLoaders
from fastai.data.external import URLs, untar_data
from fastai.data.load import SkipItemException
from fastai.data.transforms import GrandparentSplitter, IntToFloatTensor, Normalize, parent_label
from fastai.vision.augment import FlipItem, RandomResizedCrop
from fastai.vision.core import PILImage, imagenet_stats
from fastai.vision.utils import verify_images

from bnet_fastai.data import fashion_mnist, record
from bnet_fastai._checks import DatasetError, check_choice
from bnet_fastai._files import atomic_write, shared_tempdir, writer_lock
from bnet_fastai._notice import notice
from bnet_fastai.paths import data_root, mirror, state_folder

IMAGE_EXTENSIONS = record.IMAGE_EXTENSIONS
VERIFIED_FILE = ".bnet_fastai_verified.json"  # the unreadable images found once, so later runs skip them
EXTRACTED_FILE = ".bnet_fastai_extracted"  # written once an archive is fully extracted
UNREADABLE = (OSError, SyntaxError, ValueError)  # what PIL raises for a damaged or truncated image file
_reported: set[str] = set()  # unreadable images (and datasets holding some) already named by this process


@dataclass(frozen=True)
class DatasetSpec:
    """Where a dataset comes from and how its folders are named."""

    url: str | None  # fastai URL of the archive; None for datasets written by `writer`
    train: str = "train"
    valid: str = "val"
    flip: bool = True  # horizontal flips as augmentation; off for digits, whose mirror image is another glyph
    writer: str | None = None  # for datasets without an archive: "sample" or "fashion-mnist", see `prepare`

    @property
    def archive(self) -> str | None:
        return self.url.rsplit("/", 1)[-1] if self.url else None

    @property
    def folder(self) -> str:
        """The folder name under the data root."""
        return self.archive.removesuffix(".tgz") if self.url else self.writer


DATASETS: dict[str, DatasetSpec] = {
    "imagenette-160": DatasetSpec(URLs.IMAGENETTE_160),
    "imagenette-320": DatasetSpec(URLs.IMAGENETTE_320),
    "imagenette": DatasetSpec(URLs.IMAGENETTE),
    "imagewoof-160": DatasetSpec(URLs.IMAGEWOOF_160),
    "imagewoof-320": DatasetSpec(URLs.IMAGEWOOF_320),
    "imagewoof": DatasetSpec(URLs.IMAGEWOOF),
    "mnist": DatasetSpec(URLs.MNIST, train="training", valid="testing", flip=False),
    # Clothing photographed front-on: a mirrored shirt is still a shirt, so flips stay on.
    "fashion-mnist": DatasetSpec(None, writer="fashion-mnist"),
    "sample": DatasetSpec(None, flip=False, writer="sample"),
}


def list_datasets() -> list[str]:
    """Names accepted wherever a dataset is asked for."""
    return list(DATASETS)


def download_url(name: str) -> str:
    """The URL `name` is fetched from: its fastai URL, or the mirror's copy of the same archive."""
    spec = DATASETS[name]
    try:
        base = mirror()
    except ValueError as e:
        raise DatasetError(str(e)) from None
    return f"{base}/{spec.archive}" if base else spec.url


def prepare(name: str) -> Path:
    """Download (once) and extract dataset `name`; return the folder holding its train/valid folders."""
    check_choice("dataset", name, DATASETS)
    spec = DATASETS[name]
    if spec.writer == "sample":
        path = _write_sample(data_root() / spec.folder)
    elif spec.writer == "fashion-mnist":
        path = fashion_mnist.write(data_root() / spec.folder, data_root() / "archive" / spec.folder)
    else:
        path = _fetch(name)
    missing = _missing_splits(path, spec)
    if missing:
        where = f"dataset {name!r} at {path} has no images in {' or '.join(f'{d}/' for d in missing)}: it is incomplete"
        if spec.url:  # extracted from a bad archive: drop both, so "run again" really downloads it again
            shutil.rmtree(path, ignore_errors=True)
            (data_root() / "archive" / spec.archive).unlink(missing_ok=True)
            raise DatasetError(f"{where}; it was deleted with its archive: run again to download it anew")
        raise DatasetError(f"{where}; delete {path} and run again")
    expected = fashion_mnist.published_counts(path) if spec.writer == "fashion-mnist" else None
    record.check(name, path, (spec.train, spec.valid), expected)  # a count per class folder, not a re-hash
    return path


def _fetch(name: str) -> Path:
    """Download and extract archive dataset `name`, one process at a time (sweeps started together, Ray tasks
    on a shared data root): the others wait, then find it extracted."""
    spec, url, root = DATASETS[name], download_url(name), data_root()  # a bad mirror is named before any write
    folder = root / spec.archive.removesuffix(".tgz")
    if (folder / EXTRACTED_FILE).exists():
        return folder
    with writer_lock(folder):
        return _fetch_alone(name, url, folder)


def _ask_first(url: str) -> None:
    """Ask the server for `url` before fastai's download starts its progress bar (HEAD over http). A server
    that does not answer HEAD (405, 403, 501) is left to the download itself."""
    method = "HEAD" if url.startswith(("http://", "https://")) else None  # only http knows HEAD
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=60):
            pass
    except urllib.error.HTTPError as e:
        if not (method and e.code in (403, 405, 501)):
            raise


def _fetch_alone(name: str, url: str, folder: Path) -> Path:
    spec, root = DATASETS[name], data_root()
    archive = root / "archive" / spec.archive
    if folder.is_dir() and not (folder / EXTRACTED_FILE).exists():
        # Not extracted by us. fastcore extracts to a temp dir and then moves the tree across file
        # systems, so a kill during the move leaves a partial folder that untar_data takes as complete.
        if archive.exists() or _missing_splits(folder, spec):
            shutil.rmtree(folder)  # extract again from the archive at hand, or download: nothing is lost
        else:
            (folder / EXTRACTED_FILE).touch()  # complete, extracted by fastai itself or by hand: keep it
    try:
        if not archive.is_file() and not folder.is_dir():  # it will be downloaded: ask the server first, so
            # that a refusal leaves no progress-bar glyph on stdout and no archive folder
            _ask_first(url)
        path = Path(untar_data(url, archive=root / "archive", data=root))
    except urllib.error.HTTPError as e:  # the server answered: its page is no use in a one-line message
        fix = (f"check BNET_FASTAI_MIRROR: it must serve {spec.archive}" if os.environ.get("BNET_FASTAI_MIRROR")
               else f"check your network, or set BNET_FASTAI_MIRROR=<base url> serving {spec.archive}")
        raise DatasetError(f"cannot download {name!r}: HTTP {e.code} from {url}; {fix}") from None
    except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
        reason = getattr(e, "reason", None) or e
        raise DatasetError(f"cannot download {name!r} from {url} ({reason}); offline, use --dataset sample, "
                           f"or set BNET_FASTAI_MIRROR=<base url> serving {spec.archive}") from None
    except (tarfile.TarError, shutil.ReadError, EOFError, zlib.error, gzip.BadGzipFile):
        archive.unlink(missing_ok=True)
        raise DatasetError(f"the archive of {name!r} downloaded from {url} is corrupt or truncated; "
                           f"it was deleted, run again to download it anew") from None
    record.write(path, name, record.count_images(path, (spec.train, spec.valid)), f"extracted from {url}")
    (path / EXTRACTED_FILE).touch()
    return path


def _missing_splits(path: Path, spec: DatasetSpec) -> list[str]:
    """The train/valid folders of `path` that hold no image."""
    return [d for d in (spec.train, spec.valid)
            if not any(p.suffix.lower() in IMAGE_EXTENSIONS for p in (path / d).rglob("*"))]


def _write_sample(dest: Path) -> Path:
    """scikit-learn's 1,797 handwritten digits (8x8, 10 classes) as PNGs in the Imagenette layout, once."""
    if dest.is_dir():
        return dest
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    pixels = (digits.images * (255 / 16)).round().astype(np.uint8)  # values are 0..16
    index = np.arange(len(pixels))
    train, valid = train_test_split(index, test_size=0.2, random_state=0, stratify=digits.target)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = shared_tempdir(".sample-", dest.parent)
    try:
        for split, idxs in (("train", train), ("val", valid)):
            for i in idxs:
                folder = tmp / split / str(digits.target[i])
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels[i], mode="L").save(folder / f"{i:04d}.png")
        record.write(tmp, "sample", record.count_images(tmp, ("train", "val")), "written from scikit-learn's digits")
        tmp.rename(dest)  # atomic: a crash leaves a hidden temp folder, never a half-written sample
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if not dest.is_dir():
            raise
        # else another process (another rank, a parallel run) wrote it meanwhile: use that copy
    return dest


def image_files(path: Path, spec: DatasetSpec) -> list[Path]:
    """The readable images under the train and valid folders of `path`, in sorted order.

    Unreadable images are found once with fastai's `verify_images`, reported on stderr, remembered in
    `VERIFIED_FILE` and skipped, rather than crashing a run in epoch 3. An image damaged after that check
    is skipped when it is opened: see `open_image`.
    """
    files = sorted(p for d in (spec.train, spec.valid) for p in (path / d).rglob("*")
                   if p.suffix.lower() in IMAGE_EXTENSIONS)
    # the record made when the dataset was prepared, else this user's (`paths.state_folder`: a read-only
    # dataset folder keeps it elsewhere)
    def valid(record: Path) -> dict | None:
        known = json.loads(record.read_text()) if record.is_file() else None
        return known if known and known.get("n_files") == len(files) else None

    known = valid(path / VERIFIED_FILE) or valid(state_folder(path) / VERIFIED_FILE)
    if known is None:
        bad = sorted(str(p.relative_to(path)) for p in verify_images(files))
        known = {"n_files": len(files), "unreadable": bad}
        atomic_write(state_folder(path) / VERIFIED_FILE, json.dumps(known, indent=1))
    said = f"{path}: {known['unreadable']}"  # said once per process, however often it is asked
    if known["unreadable"] and said not in _reported:
        _reported.add(said)
        notice(f"skipping {len(known['unreadable'])} unreadable image(s) in {path}: "
               f"{', '.join(known['unreadable'][:5])}{' ...' if len(known['unreadable']) > 5 else ''}")
    bad = set(known["unreadable"])
    return [p for p in files if str(p.relative_to(path)) not in bad]


def report_unreadable(path: Path, error: BaseException) -> None:
    """Name an image that cannot be read, and why, on stderr: once per process."""
    if str(path) not in _reported:
        _reported.add(str(path))
        notice(f"skipped unreadable image {path}: {' '.join(str(error).split()) or type(error).__name__}")


class UnreadableImage(SkipItemException):
    """An image that cannot be read: fastai's `DataLoader.do_item` drops the item from its batch."""

    def __init__(self, path: Path):
        super().__init__(str(path))
        self.path = path


def open_image(fn: Path | str) -> PILImage:
    """`ImageBlock`'s `PILImage.create` (RGB); a file that cannot be read is reported and skipped."""
    try:
        return PILImage.create(fn)
    except UNREADABLE as e:
        report_unreadable(fn, e)
        raise UnreadableImage(fn) from e


def dataloaders(name: str, size: int = 128, bs: int = 64, workers: int | None = None, fraction: float = 1.0,
                seed: int = 0, device=None) -> DataLoaders:
    """fastai DataLoaders for dataset `name`, with the augmentation of fastai's Imagenette example.

    Split by the train/valid folders; items: RandomResizedCrop(size, min_scale=0.35) and a horizontal
    flip (not for digits); batches: ImageNet-stats normalisation. Images are opened as `ImageBlock` does,
    as RGB, so grayscale and CMYK JPEGs are converted; one damaged since `image_files` verified it is
    named on stderr and left out of its batch, in training and validation alike. `fraction` < 1 keeps
    that share of each training class (seeded), for quick runs; the validation set is always whole.
    """
    check_choice("dataset", name, DATASETS)
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    spec, path = DATASETS[name], prepare(name)
    items = image_files(path, spec)
    if fraction < 1:
        items = subsample_train(items, path / spec.train, fraction, seed)
    item_tfms = [RandomResizedCrop(size, min_scale=0.35)] + ([FlipItem(0.5)] if spec.flip else [])
    images = TransformBlock(type_tfms=open_image, batch_tfms=IntToFloatTensor)  # ImageBlock, skipping bad files
    block = DataBlock(blocks=(images, CategoryBlock), splitter=GrandparentSplitter(spec.train, spec.valid),
                      get_y=parent_label, item_tfms=item_tfms, batch_tfms=Normalize.from_stats(*imagenet_stats))
    workers = min(os.cpu_count() or 1, 8) if workers is None else workers
    while True:
        try:
            return block.dataloaders(items, bs=bs, num_workers=workers, device=device, path=path)
        except UnreadableImage as e:  # fastai opens the first training image to set its pipeline up
            items.remove(e.path)


def subsample_train(items: list[Path], train_dir: Path, fraction: float, seed: int) -> list[Path]:
    import random

    rng, kept = random.Random(seed), []
    by_class: dict[Path, list[Path]] = {}
    for p in items:
        (by_class.setdefault(p.parent, []) if train_dir in p.parents else kept).append(p)
    for cls_items in by_class.values():
        kept += rng.sample(cls_items, max(1, round(len(cls_items) * fraction)))
    return sorted(kept)
