"""Execute the notebooks headless with papermill: what `make experiments` runs.

``python -m bnet_fastai.app.notebooks`` executes `notebooks/experiments.ipynb` and
`notebooks/batchnorm_basics.ipynb` top to bottom and leaves the executed copies, with the CSVs and PNGs
the notebooks write, in the results folder, each also as HTML for reading without Jupyter.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from bnet_fastai._checks import require
from bnet_fastai._files import atomic_write
from bnet_fastai.paths import results_root

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"
NAMES = ("experiments", "batchnorm_basics")


def execute(name: str, parameters: dict | None = None, out_dir: Path | None = None) -> Path:
    """Run notebook `name` with `parameters` injected after its `parameters` cell; returns the executed copy.

    An HTML rendering of the executed copy is written next to it (`export_html`).
    """
    papermill = require("papermill", "lab", "executing the notebooks (make experiments)")

    out_dir = Path(out_dir or results_root())
    out_dir.mkdir(parents=True, exist_ok=True)
    executed = out_dir / f"{name}.ipynb"
    papermill.execute_notebook(str(NOTEBOOKS / f"{name}.ipynb"), str(executed), parameters=parameters or {},
                               cwd=str(NOTEBOOKS), progress_bar=False)  # the notebook names python3
    export_html(executed)
    return executed


def export_html(notebook: Path) -> Path:
    """Write `notebook` as an HTML page (plots embedded) next to it, to read without Jupyter; returns its path."""
    HTMLExporter = require("nbconvert", "lab", "the HTML copies of executed notebooks").HTMLExporter
    import nbformat  # comes with nbconvert

    body, _ = HTMLExporter().from_notebook_node(nbformat.read(notebook, as_version=4))
    page = Path(notebook).with_suffix(".html")
    atomic_write(page, body)
    return page


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bnet_fastai.app.notebooks", description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", default=list(NAMES), help=f"notebooks to run (default: {' '.join(NAMES)})")
    args = parser.parse_args(argv)
    for name in args.names:
        start = time.time()
        try:
            executed = execute(name)
        except ValueError as e:  # a missing extra (the notebooks need [lab]), a bad parameter
            print(f"{parser.prog}: error: {e}", file=sys.stderr)
            return 2
        print(f"{name}: executed in {time.time() - start:.0f} s -> {executed}", flush=True)
    print(f"results (executed notebooks and their HTML, CSVs, PNGs): {results_root()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
