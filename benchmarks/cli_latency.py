"""How long the command line takes to answer or reject, beside the cost of importing torch and fastai.

Each command runs as its own process (as a user would start it); medians of interleaved rounds. The
rejections never import torch (`bnet_fastai.names`, `bnet_fastai.config`), so they cost about what starting
Python costs; `import torch + fastai` is what every rejection cost before.

    python benchmarks/cli_latency.py
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from _common import interleaved, machine

CLI = str(Path(sys.executable).with_name("bnet-fastai"))
COMMANDS = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "bnet-fastai --version": [CLI, "--version"],
    "bnet-fastai --help": [CLI, "--help"],
    "bnet-fastai archs": [CLI, "archs"],
    "run --arch nope": [CLI, "run", "--arch", "nope"],
    "sweep --seed 0,-1": [CLI, "sweep", "--seed", "0,-1"],
    "run --out /etc/hostname": [CLI, "run", "--out", "/etc/hostname"],
    "import torch + fastai": [sys.executable, "-c", "import torch, fastai.vision.all"],
}


def main() -> None:
    steps = {name: (lambda argv=argv: subprocess.run(argv, capture_output=True)) for name, argv in COMMANDS.items()}
    seconds = interleaved(steps, rounds=5, warmup=1)
    print(f"# {machine()}")
    print("# wall time of each command as a new process, median of 5 interleaved rounds")
    print(f"{'command':<26}{'seconds':>9}{'vs import torch':>17}")
    for name, s in seconds.items():
        print(f"{name:<26}{s:>9.3f}{s / seconds['import torch + fastai']:>17.3f}")


if __name__ == "__main__":
    main()
