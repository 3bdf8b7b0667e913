"""Where data and results go (issue 36): a checkout keeps its data/ and results/; an installed package follows
fastai's data folder (its config.ini under FASTAI_HOME) and writes results where the command runs. The installed
case end to end is in tests/test_install.py (a fresh venv)."""
import os
import subprocess
import sys
from pathlib import Path

from bnet_fastai import paths
from bnet_fastai.app.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]


def test_fastai_data_folder_reads_fastais_config_as_fastai_does(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTAI_HOME", str(tmp_path / "home"))
    assert paths.fastai_data_folder() == tmp_path / "home" / "data"  # no config.ini: fastai's default
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "config.ini").write_text("[DEFAULT]\ndata = elsewhere\narchive = archive\n")
    assert paths.fastai_data_folder() == tmp_path / "home" / "elsewhere"  # relative to FASTAI_HOME, as fastcore's
    # what fastai itself says, in a fresh interpreter (fastai's state in this one is the earlier tests')
    theirs = subprocess.run([sys.executable, "-c", "from fastai.data.external import fastai_path; "
                             "print(fastai_path('data'))"], capture_output=True, text=True, check=True,
                            env={**os.environ, "FASTAI_HOME": str(tmp_path / "home")}).stdout.strip()
    assert Path(theirs) == paths.fastai_data_folder()


def test_a_checkout_and_an_install_put_files_in_their_places(tmp_path, monkeypatch):
    for name in ("BNET_FASTAI_DATA", "BNET_FASTAI_RESULTS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("FASTAI_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert paths.data_root() == ROOT / "data" and paths.results_root() == ROOT / "results"  # this checkout
    monkeypatch.setattr(paths, "_checkout", lambda: None)  # as a package installed in site-packages
    assert paths.data_root() == tmp_path / "home" / "data" and paths.results_root() == tmp_path / "results"
    monkeypatch.setenv("BNET_FASTAI_DATA", str(tmp_path / "d"))
    assert paths.data_root() == tmp_path / "d"
    help_text = "".join(build_parser().format_help().split())  # argparse wraps lines, at hyphens too
    assert f"data:{tmp_path / 'd'}(BNET_FASTAI_DATA" in help_text and f"results:{tmp_path / 'results'}" in help_text
