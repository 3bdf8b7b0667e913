"""The `bnet-fastai` command. The `run`, `sweep`, `report` and `data` commands land with the runs issue."""
from __future__ import annotations

import argparse
import sys

from . import __version__


def _archs(args: argparse.Namespace) -> int:
    from .models import list_archs
    from .norms import list_norms

    print("archs:", ", ".join(list_archs()))
    print("norms:", ", ".join(list_norms()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bnet-fastai", description="BatchNorm vs BNET experiments with fastai.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("archs", help="list the model and norm names").set_defaults(func=_archs)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
