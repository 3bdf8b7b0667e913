"""The command line: every bad input of the contract exits 2 with one line and loses nothing."""
import subprocess
import sys
from pathlib import Path

import pytest

from bnet_fastai.app.cli import main
from bnet_fastai.runs.config import RunConfig
from bnet_fastai.runs.train import run

CLI = str(Path(sys.executable).with_name("bnet-fastai"))
SAMPLE = ["--dataset", "sample", "--size", "16", "--epochs", "1", "--fraction", "0.2", "--workers", "0"]

BAD = [
    (["run", "--arch", "resnet9000"], "unknown arch 'resnet9000'; valid choices: xresnet18,"),
    (["run", "--norm", "groupnorm"], "unknown norm 'groupnorm'; valid choices: bn, bnet"),
    (["run", "--dataset", "imagenet"], "unknown dataset 'imagenet'; valid choices: imagenette-160,"),
    (["run", "--placement", "first"], "unknown placement 'first'; valid choices: all, last"),
    (["run", "--k", "4"], "k must be a positive odd integer (1, 3, 5, 7, ...), got 4"),
    (["run", "--k", "three"], "argument --k: invalid int value: 'three'"),
    (["run", "--opt", "lamb"], "unknown opt 'lamb'; valid choices: adam, ranger, sgd"),
    (["run", "--fraction", "0"], "fraction must be in (0, 1], got 0.0"),
    (["run", "--lr", "nan"], "lr must be a finite number > 0, got nan"),
    (["run", "--lr", "-0.01"], "lr must be a finite number > 0, got -0.01"),
    (["run", "--wd", "-1"], "wd must be a finite number >= 0, got -1.0"),
    (["run", "--label-smoothing", "3"], "label_smoothing must be in [0, 1), got 3.0"),
    (["run", "--workers", "-2"], "workers must be >= 0 (or None for automatic), got -2"),
    (["run", "--bs", "1"], "bs must be an integer >= 2, got 1"),
    (["sweep", "--arch", "xmininet,nope"], "unknown arch 'nope'; valid choices:"),
    (["sweep", "--k", "3,6"], "got 6"),
    (["sweep", "--norm", "bn,bnet", "--channels-last", "maybe"], "argument --channels-last: expected true or false, got 'maybe'"),
    (["data", "imagenet"], "unknown dataset 'imagenet'; valid choices:"),
    (["report", "/nonexistent/experiment"], "no experiment folder at /nonexistent/experiment"),
    (["fly"], "invalid choice: 'fly'"),
]


@pytest.mark.parametrize("argv,message", BAD)
def test_bad_input_exits_2_with_one_line(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "results").exists()  # nothing written


def test_incomplete_dataset_exits_2_and_finished_runs_are_kept(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("BNET_FASTAI_DATA", str(tmp_path / "data"))
    finished = run(RunConfig(arch="xmininet", dataset="sample", size=16, epochs=1, fraction=0.2, workers=0),
                   tmp_path / "exp")
    before = {p.name: p.read_bytes() for p in Path(finished["run_dir"]).iterdir()}
    broken = tmp_path / "data" / "imagewoof2-160"
    (broken / "train" / "n02086240").mkdir(parents=True)
    (broken / ".bnet_fastai_extracted").touch()
    assert main(["run", "--dataset", "imagewoof-160", "--out", str(tmp_path / "exp")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("has no images in train/ or val/: it is incomplete; it was deleted with its archive: "
                        "run again to download it anew")
    assert len(err.splitlines()) == 1 and not broken.exists()
    assert {p.name: p.read_bytes() for p in Path(finished["run_dir"]).iterdir()} == before


def test_console_script_runs_lists_and_reports(tmp_path):
    env_args = dict(capture_output=True, text=True, env={"BNET_FASTAI_DATA": str(tmp_path / "data"),
                                                          "PATH": "/usr/bin:/bin"})
    listed = subprocess.run([CLI, "archs"], **env_args)
    assert listed.returncode == 0 and "xresnet50" in listed.stdout and "norms: bn, bnet" in listed.stdout
    out = tmp_path / "exp"
    swept = subprocess.run([CLI, "sweep", "--arch", "xmininet", "--norm", "bn,bnet", *SAMPLE, "--out", str(out)],
                           **env_args)
    assert swept.returncode == 0, swept.stderr
    assert "sweep done: 2 finished" in swept.stdout
    reported = subprocess.run([CLI, "report", str(out)], **env_args)
    assert reported.returncode == 0, reported.stderr
    summary = (out / "summary.csv").read_text().splitlines()
    assert len(summary) == 3 and summary[0].startswith("dataset,size,epochs,arch,variant,n_seeds")
    for png in ("curves.png", "final_accuracy.png", "kernels.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
