"""Tiny datasets in the real Imagenette layout, and a local HTTP server to serve them as a mirror."""
from __future__ import annotations

import contextlib
import functools
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
    def log_message(self, *args) -> None:
        pass


@contextlib.contextmanager
def serve(folder: Path):
    """Serve `folder` on 127.0.0.1 (a free port) for the duration of the block; yields the base URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
