"""Tiny datasets in the real Imagenette layout, and a local HTTP server to serve them as a mirror."""
from __future__ import annotations

import contextlib
import functools
import gzip
import http.server
import io
import tarfile
import threading
from pathlib import Path

import numpy as np
from PIL import Image

WNIDS = ("n01440764", "n02102040", "n02979186")  # tench, English springer, cassette player
COLOURS = ((200, 40, 40), (40, 200, 40), (40, 40, 200))


def _jpeg(colour, seed: int, mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(colour) + rng.normal(0, 25, (40, 48, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB").convert(mode)
    buf = io.BytesIO()
    image.save(buf, format="JPEG")
    return buf.getvalue()


def imagenette_files(n_train: int = 4, n_valid: int = 2, broken: bool = False) -> dict[str, bytes]:
    """Relative path -> bytes: JPEGs per wnid in train/ and val/, one grayscale and one CMYK image,
    noisy_imagenette.csv, and (if `broken`) one file with a .JPEG name that is not an image."""
    files, seed = {}, 0
    for split, n in (("train", n_train), ("val", n_valid)):
        for wnid, colour in zip(WNIDS, COLOURS):
            for i in range(n):
                seed += 1
                mode = "L" if (split, wnid, i) == ("train", WNIDS[0], 0) else \
                    "CMYK" if (split, wnid, i) == ("train", WNIDS[1], 0) else "RGB"
                files[f"{split}/{wnid}/{wnid}_{i}.JPEG"] = _jpeg(colour, seed, mode)
    if broken:
        files[f"train/{WNIDS[2]}/{WNIDS[2]}_broken.JPEG"] = b"this is not a JPEG"
    rows = ["path,noisy_labels_0,noisy_labels_1,noisy_labels_5,noisy_labels_25,noisy_labels_50,is_valid"]
    rows += [f"{p},{p.split('/')[1]},{p.split('/')[1]},{p.split('/')[1]},{p.split('/')[1]},{p.split('/')[1]},"
             f"{p.startswith('val')}" for p in files if p.endswith(".JPEG")]
    files["noisy_imagenette.csv"] = "\n".join(rows).encode()
    return files


def write_archive(dest: Path, top: str = "imagenette2-160", **kw) -> Path:
    """`dest` as a .tgz holding `top/` with the files of `imagenette_files(**kw)`."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(dest, "w:gz") as tar:
        for rel, data in imagenette_files(**kw).items():
            info = tarfile.TarInfo(f"{top}/{rel}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return dest


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    requests: list | None = None  # when a list, the path of every download (GET) is appended to it

    def log_message(self, *args) -> None:
        if self.requests is not None and self.command == "GET":  # not the HEAD asked before a download
            self.requests.append(self.path)


@contextlib.contextmanager
def serve(folder: Path, requests: list | None = None):
    """Serve `folder` on 127.0.0.1 (a free port) for the duration of the block; yields the base URL.
    With `requests`, every download's path (GET: not the HEAD that asks first) is appended to that list."""
    handler = type("Handler", (_QuietHandler,), {"requests": requests})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def write_idx(folder: Path, n_train: int = 20, n_valid: int = 10, **damage) -> dict[str, np.ndarray]:
    """Small Fashion-MNIST files in the real IDX format, gzipped, with the official names; returns the
    arrays written (train/val images and labels). Labels cycle through the 10 classes.

    `damage`: ``truncate=<file name>`` cuts that file's gzip stream in half; ``magic=<file name>`` writes a
    wrong magic number; ``extra_label=True`` writes one training label too many.
    """
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n, prefix in (("train", n_train, "train"), ("val", n_valid, "t10k")):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n + (1 if split == "train" and damage.get("extra_label") else 0)) % 10).astype(np.uint8)
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels[:n]
        for name, magic, values in ((f"{prefix}-images-idx3-ubyte.gz", 2051, images),
                                    (f"{prefix}-labels-idx1-ubyte.gz", 2049, labels)):
            magic = 1234 if damage.get("magic") == name else magic
            header = b"".join(int(v).to_bytes(4, "big") for v in (magic, *values.shape))
            data = gzip.compress(header + values.tobytes())
            if damage.get("truncate") == name:
                data = data[:len(data) // 2]
            (folder / name).write_bytes(data)
    return arrays
