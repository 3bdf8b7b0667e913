"""Fashion-MNIST (Zalando Research): the four original IDX files, checked, decoded, written once as PNGs.

Sources, the first that has all four files: a folder named by ``BNET_FASTAI_FASHION_MNIST``, Debian's
``dataset-fashion-mnist`` folder (``/usr/share/datasets/fashion-mnist``), then
``BNET_FASTAI_MIRROR/<file name>`` when the mirror is set, else the dataset's official location. Downloaded
files are kept in ``<data root>/archive/fashion-mnist/``. Every file is checked before use: gzip's CRC, the
IDX magic number, 28x28 images, a payload of exactly the size the header announces, labels in 0..9, and
as many labels as images, and each file's content against the published dataset's SHA-256: other files (a
well-formed label file with other labels would silently change every accuracy) stop with one line naming
the file, unless ``BNET_FASTAI_FASHION_MNIST_UNPUBLISHED=1`` says to use them as given; the dataset's record
(``.bnet_fastai_fashion_mnist.json``) and every run's ``config.json`` then say the files are not the published
ones. The images are then written once, atomically, into the Imagenette layout, with their counts per class
(from the label files) as the dataset's image record (`data.record`)
(``train/<class>/<index>.png``, ``val/<class>/<index>.png``; the 10,000 test images are the validation
set) so the same loaders, cache and report run unchanged.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import numpy as np

from bnet_fastai._checks import DatasetError
from bnet_fastai._files import shared_tempdir, writer_lock
from bnet_fastai.data import record
from bnet_fastai.paths import mirror

OFFICIAL_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com"
DEBIAN_FOLDER = Path("/usr/share/datasets/fashion-mnist")
FILES = {  # split -> (images, labels)
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "val": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
# SHA-256 of the decompressed published files (Debian recompresses them, so the .gz bytes differ).
PUBLISHED_SHA256 = {
    "train-images-idx3-ubyte.gz": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte.gz": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte.gz": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte.gz": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}
CLASSES = ("tshirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle_boot")
IMAGE_MAGIC, LABEL_MAGIC, SIDE = 2051, 2049, 28
INFO_FILE = ".bnet_fastai_fashion_mnist.json"  # written last: the folder is complete
UNPUBLISHED_ENV = "BNET_FASTAI_FASHION_MNIST_UNPUBLISHED"  # "1": train on files that are not the published ones


class FashionMNISTError(DatasetError):
    """A Fashion-MNIST file is missing, truncated or corrupt; the message names the file and the fix."""


def local_folder() -> Path | None:
    """The first local folder holding all four files: `BNET_FASTAI_FASHION_MNIST`, then Debian's."""
    names = [n for pair in FILES.values() for n in pair]
    named = os.environ.get("BNET_FASTAI_FASHION_MNIST")
    if named and not all((Path(named) / n).is_file() for n in names):
        missing = [n for n in names if not (Path(named) / n).is_file()]
        raise FashionMNISTError(f"BNET_FASTAI_FASHION_MNIST={named} lacks {', '.join(missing)}: put the four "
                                f"Fashion-MNIST files there or unset the variable")
    for folder in ([Path(named)] if named else []) + [DEBIAN_FOLDER]:
        if all((folder / n).is_file() for n in names):
            return folder
    return None


def is_written(dest: Path) -> bool:
    """True when `dest` holds a complete Fashion-MNIST written by `write`."""
    return (dest / INFO_FILE).is_file()


def available_offline(dest: Path) -> bool:
    """True when Fashion-MNIST can be had without a network: written already, or its files on disk."""
    try:
        return is_written(dest) or local_folder() is not None
    except FashionMNISTError:
        return False


def _download(name: str, archive: Path) -> Path:
    """`name` from the mirror (or the official host) into `archive`, once; the partial file never stays."""
    path = archive / name
    if path.is_file():
        return path
    try:
        base = mirror()
    except ValueError as e:  # before the archive folder exists
        raise FashionMNISTError(str(e)) from None
    url = f"{base or OFFICIAL_URL}/{name}"
    setting = "BNET_FASTAI_MIRROR" if base else "BNET_FASTAI_MIRROR (or install Debian's dataset-fashion-mnist)"
    archive.mkdir(parents=True, exist_ok=True)
    tmp = archive / f".{name}.{os.getpid()}.part"
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as out:
            shutil.copyfileobj(response, out)
        os.replace(tmp, path)
    except urllib.error.HTTPError as e:
        raise FashionMNISTError(f"cannot download {name}: HTTP {e.code} from {url}; check {setting}") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise FashionMNISTError(f"cannot download {name} from {url} ({reason}); set {setting}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_idx(path: Path, magic: int, fix: str = "replace it and run again") -> tuple[np.ndarray, str]:
    """Decode one gzipped IDX file into uint8 (n,) labels or (n, 28, 28) images, checking it whole; also
    returns the SHA-256 of its decompressed bytes. `fix` ends every error message."""
    try:
        with gzip.open(path) as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise FashionMNISTError(f"{path} is truncated or corrupt ({e}); {fix}") from None
    found = int.from_bytes(data[:4], "big") if len(data) >= 4 else None
    if found != magic:
        raise FashionMNISTError(f"{path} is not an IDX {'image' if magic == IMAGE_MAGIC else 'label'} file "
                                f"(magic number {found}, expected {magic}); {fix}")
    dims = 3 if magic == IMAGE_MAGIC else 1
    header = 4 + 4 * dims
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(dims))
    if len(data) < header or (dims == 3 and shape[1:] != (SIDE, SIDE)):
        raise FashionMNISTError(f"{path} has a bad header {shape}, expected (n, {SIDE}, {SIDE}); {fix}")
    expected = header + int(np.prod(shape))
    if len(data) != expected:
        raise FashionMNISTError(f"{path} holds {len(data)} bytes, its header announces {expected}: "
                                f"truncated or corrupt; {fix}")
    values = np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)
    if magic == LABEL_MAGIC and values.max(initial=0) >= len(CLASSES):
        raise FashionMNISTError(f"{path} has labels outside 0..9; {fix}")
    return values, hashlib.sha256(data).hexdigest()


def load(folder: Path, fix: str = "replace it and run again"
         ) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict[str, str]]:
    """The checked (images, labels) of each split from `folder`, and each file's SHA-256."""
    splits, digests = {}, {}
    for split, (image_name, label_name) in FILES.items():
        (images, digests[image_name]), (labels, digests[label_name]) = (
            read_idx(folder / image_name, IMAGE_MAGIC, fix), read_idx(folder / label_name, LABEL_MAGIC, fix))
        if len(images) != len(labels):
            raise FashionMNISTError(f"{folder / label_name} has {len(labels)} labels for {len(images)} images in "
                                    f"{image_name}: the files do not belong together; {fix}")
        splits[split] = images, labels
    return splits, digests


def _fix_for(folder: Path, archive: Path) -> str:
    """What to do about a damaged file, by where it came from."""
    if folder == archive:
        return "the downloaded files were deleted: run again to download them anew"
    if folder == DEBIAN_FOLDER:
        return "reinstall Debian's package: apt-get install --reinstall dataset-fashion-mnist"
    return "replace it in the folder BNET_FASTAI_FASHION_MNIST names, or unset the variable"


def unpublished_allowed() -> bool:
    """Whether the user said to train on Fashion-MNIST files that are not the published ones."""
    return os.environ.get(UNPUBLISHED_ENV, "").strip().lower() in ("1", "true", "yes")


def provenance(path: Path) -> dict:
    """What a written Fashion-MNIST folder was made from (source, published files or not); {} for others."""
    info_file = Path(path) / INFO_FILE
    if not info_file.is_file():
        return {}
    info = json.loads(info_file.read_text())
    return {"source": info["source"], "published_files": info["published"]}


def published_counts(dest: Path) -> dict[str, dict[str, int]] | None:
    """The images per split and class of the published dataset when `dest` was written from the published
    files (6,000 per class in train, 1,000 in val): what a folder written before records existed must hold."""
    if not provenance(dest).get("published_files"):
        return None
    return {split: {name: n for name in CLASSES} for split, n in (("train", 6000), ("val", 1000))}


def _check_written(dest: Path) -> Path:
    """`dest`, refused if it was written from files that are not the published ones and nobody said so."""
    info = provenance(dest)
    if not info["published_files"] and not unpublished_allowed():
        raise FashionMNISTError(f"{dest} was written from Fashion-MNIST files that are not the published ones "
                                f"(from {info['source']}): delete {dest} to rebuild it from the published files, "
                                f"or set {UNPUBLISHED_ENV}=1 to train on it as it is")
    return dest


def write(dest: Path, archive: Path) -> Path:
    """Fashion-MNIST as PNGs in the Imagenette layout at `dest`, written once; returns `dest`."""
    if is_written(dest):
        return _check_written(dest)
    with writer_lock(dest):
        if is_written(dest):  # written by another process while this one waited
            return _check_written(dest)
        folder = local_folder()
        if folder is None:
            for name in (n for pair in FILES.values() for n in pair):
                _download(name, archive)
            folder = archive
        try:
            splits, digests = load(folder, _fix_for(folder, archive))
        except FashionMNISTError:
            if folder == archive:  # a damaged download is never reused: the next run fetches it again
                shutil.rmtree(archive, ignore_errors=True)
            raise
        others = [n for n, d in digests.items() if PUBLISHED_SHA256[n] != d]
        if others and not unpublished_allowed():
            if folder == archive:  # never reused: the next run fetches the files again
                shutil.rmtree(archive, ignore_errors=True)
            name = others[0]
            where, fix = ((f"{folder / name}", _fix_for(folder, archive)) if folder != archive else
                          (f"{name} from {mirror() or OFFICIAL_URL}",
                           "the download was deleted; serve the published files there"))
            raise FashionMNISTError(
                f"{where} is not the published Fashion-MNIST file (SHA-256 {digests[name][:12]}..., published "
                f"{PUBLISHED_SHA256[name][:12]}...; {len(others)} of 4 files differ): {fix}, or set "
                f"{UNPUBLISHED_ENV}=1 to train on these files as given")
        info = {"source": str(folder), "sha256": digests, "published": not others, "not_published": others,
                "counts": {s: len(v[1]) for s, v in splits.items()}}
        _write_pngs(dest, splits, info)
    if others:
        print(f"note: training on Fashion-MNIST files that are not the published ones ({', '.join(others)} in "
              f"{folder}), as {UNPUBLISHED_ENV}=1 says; the dataset's record and each run's config.json say so",
              flush=True)
    return dest


def _write_pngs(dest: Path, splits: dict[str, tuple[np.ndarray, np.ndarray]], info: dict) -> None:
    """Write every image into a hidden temporary folder, then rename it to `dest`: a crash leaves no `dest`."""
    from PIL import Image

    tmp = shared_tempdir(".fashion-mnist-", dest.parent)
    try:
        for split, (images, labels) in splits.items():
            for name in CLASSES:
                (tmp / split / name).mkdir(parents=True)
            for i, (pixels, label) in enumerate(zip(images, labels)):
                Image.fromarray(pixels, mode="L").save(tmp / split / CLASSES[label] / f"{i:05d}.png")
        counts = {split: {CLASSES[c]: int(n) for c, n in enumerate(np.bincount(labels, minlength=len(CLASSES)))
                          if n} for split, (_, labels) in splits.items()}
        record.write(tmp, "fashion-mnist", counts, f"written from {info['source']}")  # from the labels
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=1))
        if dest.exists():  # an earlier attempt without INFO_FILE (incomplete, or not ours): replaced whole
            shutil.rmtree(dest)
        tmp.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone after the rename; removes a partial one otherwise
