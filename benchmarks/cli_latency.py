"""How long the command line takes to answer or reject, beside the cost of importing torch and fastai.

Each command runs as its own process (as a user would start it); medians of interleaved rounds. The
rejections never import torch (`bnet_fastai.names`, `bnet_fastai.runs.config`), so they cost about what starting
Python costs; `import torch + fastai` is what every rejection cost before.

    python benchmarks/cli_latency.py [--json PATH]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import interleaved, machine, write_json  # noqa: E402

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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the table as JSON to PATH")
    args = parser.parse_args(argv)
    steps = {name: (lambda argv=argv: subprocess.run(argv, capture_output=True)) for name, argv in COMMANDS.items()}
    seconds = interleaved(steps, rounds=args.rounds, warmup=1, device="cpu")
    print(f"# {machine()}")
    print(f"# wall time of each command as a new process, median of {args.rounds} interleaved rounds")
    print(f"{'command':<26}{'seconds':>9}{'vs import torch':>17}")
    for name, s in seconds.items():
        print(f"{name:<26}{s:>9.3f}{s / seconds['import torch + fastai']:>17.3f}")
    write_json(args.json, "cli_latency", argv, f"wall time of each command as a new process, median of "
               f"{args.rounds} interleaved rounds", [{"command": name, "seconds": s, "ratio_to_import_torch":
                                                       s / seconds["import torch + fastai"]}
                                                      for name, s in seconds.items()])


if __name__ == "__main__":
    main()
