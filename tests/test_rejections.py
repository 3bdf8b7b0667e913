"""Rejected before anything is written (issue 10 part 2): bad input exits 2 in one line, leaves the output
folder as it was, and the argument checks answer without importing torch."""
import subprocess
import sys
from pathlib import Path

import pytest

from bnet_fastai import names
from bnet_fastai.app.cli import main
from bnet_fastai.runs.config import RunConfig
from bnet_fastai.runs.train import run

SAMPLE = ["--dataset", "sample", "--size", "16", "--epochs", "1", "--fraction", "0.2", "--workers", "0"]
UNWRITABLE = "/sys/bnet-fastai-results"  # sysfs refuses new files, even to root


def test_the_light_names_equal_the_real_registries():
    from bnet_fastai.runs import config, learner
    from bnet_fastai.data import datasets as data
    from bnet_fastai.nn import models, norms
    from bnet_fastai.sweeps import study

    assert names.ARCHS == tuple(models.ARCHS) and names.NORMS == tuple(norms.NORM_LAYERS)
    assert names.ACTIVATIONS == tuple(models.ACTIVATIONS) and names.DATASETS == tuple(data.DATASETS)
    assert names.OPTIMIZERS == tuple(learner.OPTIMIZERS) and names.PIPELINES == tuple(learner.PIPELINES)
    assert names.PROFILES == tuple(study.PROFILES) and set(config.SCHEDULES) == {"one_cycle", "flat_cos"}
    assert set(names.FASTAI_ARCHS) == {n for n, a in models.ARCHS.items() if a.library == "fastai"}
    assert set(names.RESNESTS) | {"mininest"} == {n for n, a in models.ARCHS.items() if a.library == "timm"}


# (an arch name the project does not know is looked up in timm's registry, which imports torch: tests/test_timm_archs.py)
LIGHT = [["--version"], ["--help"], ["run", "--help"], ["archs"], ["run", "--arch", "xmininet", "--act", "tanh"],
         ["run", "--seed", "4294967296"], ["sweep", "--k", "3,4"], ["run", "--out", "/etc/hostname"],
         ["sweep", "--bs", "8,x"], ["study", "nope"], ["study", "quick", "--dataset", "imagenet"],
         ["study", "quick", "--out", "/etc/hostname"], ["data", "nope"]]


@pytest.mark.parametrize("argv", LIGHT, ids=" ".join)
def test_arguments_help_version_and_archs_answer_without_torch(argv):
    probe = ("import sys, time\nt = time.perf_counter()\nfrom bnet_fastai.app.cli import main\n"
             f"try:\n    code = main({argv!r})\nexcept SystemExit as e:\n    code = e.code\n"
             "print('RESULT', code, time.perf_counter() - t, sorted(m for m in ('torch', 'fastai', 'pandas') "
             "if m in sys.modules), file=sys.stderr)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    code, seconds, heavy = done.stderr.split("RESULT ")[-1].split(" ", 2)
    assert heavy.strip() == "[]", done.stderr  # torch, fastai and pandas were never imported
    assert float(seconds) < 1.5  # measured ~0.05 s; the bound is generous for a loaded 2-core machine
    if argv[0].startswith("--") or argv[-1] in ("--help", "archs"):
        assert code == "0" and done.stdout
    else:
        message = done.stderr.split("RESULT ")[0].strip()
        assert code == "2" and len(message.splitlines()) == 1 and "error" in message


def _tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


@pytest.fixture
def experiment(tmp_path, monkeypatch):
    """An experiment folder holding one finished run, and a data root with the sample digits."""
    monkeypatch.setenv("BNET_FASTAI_DATA", str(tmp_path / "data"))
    out = tmp_path / "exp"
    run(RunConfig(arch="xmininet", dataset="sample", size=16, epochs=1, fraction=0.2, workers=0), out)
    return out


REJECTED = [
    (["run", "--bs", "100000"], "bs=100000 is larger than the 287 training images of 'sample' (fraction=0.2); "
                                "use a smaller --bs"),
    (["sweep", "--bs", "32,100000"], "bs=100000 is larger than the 287 training images"),
    (["run", "--seed", "-1"], "seed must be a whole number in 0 .. 4294967295"),
    (["sweep", "--seed", "0,4294967296"], "seed must be a whole number in 0 .. 4294967295"),
    (["sweep", "--arch", "xmininet,mininest", "--pool", "max"], "sa and pool apply to fastai's xresnet family"),
    (["sweep", "--norm", "bn,bnet-k4-last"], "k must be a positive odd integer (1, 3, 5, 7, ...), got 4"),
    (["sweep", "--norm", "bn,batchnorm"], "unknown norm 'batchnorm'; valid: bn, bnet, or a BNET variant "
                                          "bnet-k<odd k>-<all|last>"),
    (["sweep", "--norm", "bnet-k3-first"], "unknown placement 'first'; valid choices: all, last"),
]


@pytest.mark.parametrize("argv,message", REJECTED, ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_a_rejected_command_leaves_the_output_folder_as_it_was(argv, message, experiment, capsys):
    before = _tree(experiment)
    assert main([*argv[:1], "--arch", "xmininet", *SAMPLE, *argv[1:], "--out", str(experiment)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert _tree(experiment) == before


@pytest.mark.parametrize("command", ["run", "sweep"])
@pytest.mark.parametrize("where", ["a file", "inside a file", "unwritable"])
def test_out_that_is_not_a_writable_folder_exits_2_and_writes_nothing(command, where, tmp_path, capsys):
    (tmp_path / "file").write_text("mine")
    out = {"a file": tmp_path / "file", "inside a file": tmp_path / "file" / "exp", "unwritable": UNWRITABLE}[where]
    before = _tree(tmp_path)
    assert main([command, *SAMPLE, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"output folder '{out}'" in err and "(--out)" in err
    assert _tree(tmp_path) == before and not Path(UNWRITABLE).exists()


def test_api_rejects_a_seed_the_rngs_cannot_take_before_writing(tmp_path):
    with pytest.raises(ValueError, match=r"seed must be a whole number in 0 \.\. 4294967295"):
        run(RunConfig(dataset="sample", seed=2 ** 32), tmp_path / "exp")
    assert not (tmp_path / "exp").exists()


def test_a_sweep_checks_its_whole_grid_before_the_first_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("BNET_FASTAI_DATA", str(tmp_path / "data"))
    # the first run is fine, the last cannot train: nothing may be trained or written
    assert main(["sweep", "--arch", "xmininet", "--norm", "bn,bnet", *SAMPLE, "--bs", "32,100000",
                 "--out", str(tmp_path / "exp")]) == 2
    assert "bs=100000" in capsys.readouterr().err and not (tmp_path / "exp").exists()

