"""Register this environment's Jupyter kernel and start JupyterLab on the notebooks: what `make lab` runs.

``python -m bnet_fastai.app.lab [--kernel-prefix DIR] [jupyter lab options]`` registers the kernel, then replaces
itself with ``jupyter lab`` serving `notebooks/` on 127.0.0.1 (any option given here overrides those two).
The notebooks themselves name the `python3` kernel, which every Jupyter has (jupyter_client starts it with the
Python that runs Jupyter); the named kernel is for a shared JupyterLab that should offer this environment.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from bnet_fastai._checks import require
from bnet_fastai.app.notebooks import NOTEBOOKS

KERNEL_NAME = "bnet-fastai"
# Each default applies unless one of the option names after it is given (jupyter rejects a repeated option).
DEFAULTS = (
    (f"--ServerApp.root_dir={NOTEBOOKS}", ("ServerApp.root_dir", "ServerApp.notebook_dir", "notebook-dir")),
    ("--ServerApp.ip=127.0.0.1", ("ServerApp.ip", "ip")),
)


def register_kernel(prefix: str | Path | None = None, name: str = KERNEL_NAME,
                    display_name: str | None = None) -> Path:
    """Register a kernel that runs this Python under `prefix`/share/jupyter/kernels; returns its folder.

    The default prefix is the environment itself (``ipykernel install --sys-prefix``), not ``--user``:
    a JupyterLab started from the environment searches `sys.prefix`/share/jupyter, registering there needs
    no root and writes nothing into the home folder, and two checkouts' environments never overwrite each
    other's kernel of the same name.
    """
    install = require("ipykernel.kernelspec", "lab", "make lab (the notebooks' Jupyter kernel)",
                      "ipykernel").install

    prefix = Path(prefix or sys.prefix)
    display_name = display_name or f"{name} ({Path(sys.prefix).name})"
    return Path(install(kernel_name=name, display_name=display_name, prefix=str(prefix)))


def with_defaults(args: list[str]) -> list[str]:
    """`args` for ``jupyter lab`` preceded by each default (notebooks folder, 127.0.0.1) that `args` do not set."""
    given = {arg.lstrip("-").split("=", 1)[0] for arg in args if arg.startswith("--")}
    return [default for default, names in DEFAULTS if given.isdisjoint(names)] + list(args)


def main(argv: list[str] | None = None) -> None:
    """Register the kernel, then exec ``jupyter lab`` (from this environment) with the remaining arguments."""
    parser = argparse.ArgumentParser(prog="python -m bnet_fastai.app.lab", add_help=False, allow_abbrev=False)
    parser.add_argument("--kernel-prefix", help="where to register the kernel (default: this environment)")
    ours, lab_args = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    kernel = register_kernel(ours.kernel_prefix)
    print(f"kernel {KERNEL_NAME!r} ({sys.executable}) registered in {kernel}", flush=True)
    if hasattr(os, "geteuid") and os.geteuid() == 0 and "--allow-root" not in lab_args:
        lab_args = ["--allow-root", *lab_args]  # containers run as root; Jupyter refuses root without it
        print("running as root: JupyterLab started with --allow-root", flush=True)
    command = [sys.executable, "-m", "jupyterlab", *with_defaults(lab_args)]
    os.execv(command[0], command)


if __name__ == "__main__":
    main()
