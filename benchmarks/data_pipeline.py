"""Training-data throughput on this machine: fastai's default ImageDataLoaders pipeline vs our cached one.

    python benchmarks/data_pipeline.py              # 1,000 generated 160 px JPEGs, 10 classes, 128 px crops

Both apply the same augmentation (RandomResizedCrop(128, min_scale=0.35), horizontal flip, ImageNet-stats
normalisation). The JPEGs are written by this script in the Imagenette layout (shorter side 160, as
imagenette2-160). Each pipeline iterates its training loader for `--epochs` epochs with `--workers`
workers after one warm-up epoch; images/second is the median epoch's. The cache is built before timing;
its one-time build cost is printed separately.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, write_json  # noqa: E402


def write_images(root: Path, n: int, classes: int = 10) -> Path:
    """`n` JPEGs (160 x 213, smooth random content) in imagenette2-160/{train,val}/<class>/."""
    folder = root / "imagenette2-160"
    rng = np.random.default_rng(0)
    for i in range(n):
        split = "val" if i % 5 == 0 else "train"
        target = folder / split / f"n{i % classes:08d}" / f"{i:05d}.JPEG"
        target.parent.mkdir(parents=True, exist_ok=True)
        small = rng.integers(0, 256, (20, 27, 3), dtype=np.uint8)
        Image.fromarray(small).resize((213, 160), Image.BICUBIC).save(target, quality=90)
    (folder / ".bnet_fastai_extracted").touch()  # laid out as an extracted download
    return folder


def images_per_second(dl, epochs: int) -> float:
    for _ in dl:  # warm-up: workers start, caches fill
        pass
    rates = []
    for _ in range(epochs):
        start, n = time.perf_counter(), 0
        for xb, _ in dl:
            n += len(xb)
        rates.append(n / (time.perf_counter() - start))
    return statistics.median(rates)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--bs", type=int, default=64)
    parser.add_argument("--workers", type=int, default=None,
                        help="loader workers for both (default: each pipeline's own default)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the table as JSON to PATH")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="bnet-bench-"))
    os.environ["BNET_FASTAI_DATA"] = str(root)
    folder = write_images(root, args.images)

    from fastai.torch_core import defaults
    from fastai.vision.all import (
        FlipItem,
        ImageDataLoaders,
        Normalize,
        RandomResizedCrop,
        imagenet_stats,
    )

    from bnet_fastai.data.cache import build_cache, cached_dataloaders, default_workers

    fastai_workers = defaults.cpus if args.workers is None else args.workers
    our_workers = default_workers() if args.workers is None else args.workers
    print(f"# {machine()}")
    print(f"# {args.images} JPEGs 160x213, {args.size} px crops, batch {args.bs}, median of {args.epochs} epochs")
    fastai_dls = ImageDataLoaders.from_folder(
        folder, train="train", valid="val", bs=args.bs, num_workers=fastai_workers,
        item_tfms=[RandomResizedCrop(args.size, min_scale=0.35), FlipItem(0.5)],
        batch_tfms=Normalize.from_stats(*imagenet_stats))
    start = time.perf_counter()
    build_cache("imagenette-160", args.size)
    build_seconds = time.perf_counter() - start
    cached = cached_dataloaders("imagenette-160", size=args.size, bs=args.bs, workers=our_workers)
    base = images_per_second(fastai_dls.train, args.epochs)
    ours = images_per_second(cached.train, args.epochs)
    print(f"{'pipeline':<34} {'workers':>7} {'images/s':>9} {'vs fastai':>9}")
    print(f"{'fastai ImageDataLoaders (PIL)':<34} {fastai_workers:7d} {base:9.0f} {1:9.2f}")
    print(f"{'bnet_fastai cached (uint8 tensors)':<34} {our_workers:7d} {ours:9.0f} {ours / base:9.2f}")
    print(f"# cache built once in {build_seconds:.1f} s ({args.images} images)")
    rows = [{"pipeline": "fastai", "workers": fastai_workers, "images_per_second": base, "ratio_to_fastai": 1.0},
            {"pipeline": "cached", "workers": our_workers, "images_per_second": ours, "ratio_to_fastai": ours / base}]
    write_json(args.json, "data_pipeline", argv, f"training images/second, median of {args.epochs} epochs, "
               f"{args.images} JPEGs 160x213, {args.size} px crops, batch {args.bs}", rows,
               cache_build_seconds=build_seconds)


if __name__ == "__main__":
    main()
