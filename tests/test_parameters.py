"""Notebook parameters are checked where they enter: papermill's `-p` strings run the same study as the
values written in the cell, and a bad value stops the notebook at its first code cell with one line."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import papermill
import pytest

from bnet_fastai._checks import parse_parameter
from bnet_fastai.app.cli import main
from bnet_fastai.app.notebooks import execute
from bnet_fastai.sweeps.study import resolve

ROOT = Path(__file__).resolve().parents[1]


TINY = dict(epochs=2, size=16, fraction=0.2, workers=0)


@pytest.mark.parametrize("value, many, kind, expected", [
    ("[0, 1]", True, int, [0, 1]), ("0,1", True, int, [0, 1]), (" 3 ", True, int, [3]), ([3, 5], True, int, [3, 5]),
    ('["xmininet"]', True, str, ["xmininet"]), ("xmininet, mininest", True, str, ["xmininet", "mininest"]),
    ("2", False, int, 2), (2.0, False, int, 2), ("1e-2", False, float, 0.01), ("true", False, bool, True),
    (None, True, int, None),
])
def test_parameters_are_read_as_papermill_or_a_user_gives_them(value, many, kind, expected):
    assert parse_parameter("X", value, kind, many=many) == expected


@pytest.mark.parametrize("value, many, kind, message", [
    ("[0, x]", True, int, "X='[0, x]' is not a list"), ("two", False, int, "X takes whole numbers, got 'two'"),
    (2.5, False, int, "takes whole numbers"), (True, False, int, "takes whole numbers"),
    ("nan", False, float, "X takes numbers"), ("[]", True, int, "empty list"), (3, False, str, "X takes names"),
])
def test_a_bad_parameter_is_one_line_naming_it(value, many, kind, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[")) as caught:
        parse_parameter("X", value, kind, many=many)
    assert "\n" not in str(caught.value)


def test_papermill_strings_resolve_to_the_same_runs_as_the_cells_values():
    written = resolve("sample", "quick", archs=["xmininet"], seeds=[0, 1], k=[3, 5], placement="all", **TINY)
    passed = resolve("sample", "quick", archs='["xmininet"]', seeds="[0, 1]", k="3,5", placement="all",
                     **{name: str(value) for name, value in TINY.items()})
    assert [c.run_id for c in passed.configs()] == [c.run_id for c in written.configs()]
    assert len(written.configs()) == 6  # 2 seeds x (bn + bnet-k3 + bnet-k5)


@pytest.mark.parametrize("bad, message", [(dict(seeds=[2 ** 32]), "SEEDS must be in 0 .. 4294967295"),
                                          (dict(lr="-1"), "lr must be a finite number > 0")])
def test_out_of_range_values_are_rejected(bad, message):
    with pytest.raises(ValueError, match=message):
        resolve("sample", "quick", **bad)


def test_a_bad_notebook_parameter_stops_the_first_code_cell_before_any_run_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("BNET_FASTAI_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("BNET_FASTAI_RESULTS", str(tmp_path / "results"))
    with pytest.raises(papermill.PapermillExecutionError, match="unknown arch 'nope'") as caught:
        execute("experiments", dict(DATASET="sample", PROFILE="quick", ARCHS='["nope"]', EXPERIMENT="bad"),
                tmp_path / "results")
    assert "study = resolve(" in caught.value.source  # the first code cell after the parameters
    assert not (tmp_path / "results" / "bad").exists() and not (tmp_path / "data").exists()


def test_basics_parameters_as_papermill_passes_them_equal_the_written_ones():
    from bnet_fastai.app import basics

    written = basics.resolve("sample", 400, None, 2, 1, 64, 1e-2, 3)
    assert basics.resolve("sample", "400", "None", "2", "1", "64", "1e-2", "3") == written
    assert written == ("sample", 400, None, 2, 1, 64, 0.01, 3)


@pytest.mark.parametrize("bad, message", [
    (dict(seed=-1), "SEED must be in 0 .. 4294967295, got -1"), (dict(bs=1), "BS must be a whole number >= 2"),
    (dict(max_train=100, bs=128), "MAX_TRAIN=100 is smaller than BS=128"), (dict(lr="fast"), "LR takes numbers"),
    (dict(epochs=0), "EPOCHS must be a whole number >= 1"), (dict(dataset="imagenet"), "unknown DATASET 'imagenet'"),
    (dict(max_valid="0"), "MAX_VALID must be a whole number >= 1 or None"),
])
def test_bad_basics_parameters_are_one_line(bad, message):
    from bnet_fastai.app import basics

    with pytest.raises(ValueError, match=message) as caught:
        basics.resolve(**{"dataset": "sample", **bad})
    assert "\n" not in str(caught.value)


def test_a_bad_basics_parameter_stops_its_first_code_cell_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.setenv("BNET_FASTAI_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("BNET_FASTAI_RESULTS", str(tmp_path / "results"))
    with pytest.raises(papermill.PapermillExecutionError, match="SEED must be in 0 .. 4294967295") as caught:
        execute("batchnorm_basics", dict(DATASET="sample", SEED="-5"), tmp_path / "results")
    assert "basics.resolve(" in caught.value.source
    assert not (tmp_path / "results" / "batchnorm_basics").exists() and not (tmp_path / "data").exists()


def test_the_convergence_profile_is_a_budget_study_with_bn_alone_at_the_extra_budgets():
    study = resolve(profile="convergence")
    configs = study.configs()
    variants = ["bnet-k3-all", "bnet-k3-last", "bnet-k5-last", "bnet-k1-all"]
    assert study.dataset == "fashion-mnist" and study.norms == ["bn", *variants]
    assert len(configs) == 20 * (5 + 4 * 3)
    budgets = {name: sorted({c.epochs for c in configs if c.run_id.split("_")[1] == name}) for name in ("bn", *variants)}
    assert budgets == {"bn": [2, 3, 4, 5, 6], **{name: [2, 3, 4] for name in variants}}
    assert {(c.k, c.placement) for c in configs if c.norm == "bnet"} == {(3, "all"), (3, "last"), (5, "last"),
                                                                         (1, "all")}
    assert [c.seed for c in configs[:17]] == [0] * 17  # seed by seed: a study cut short leaves whole seeds
    cpu = resolve(profile="cpu", archs=["xmininet"], seeds=[0])  # the same recipe as the published study
    bn5 = next(c for c in configs if c.norm == "bn" and c.epochs == 5 and c.seed == 0)
    assert bn5.run_id in {c.run_id for c in cpu.configs()}
    # the variants added later train beside the published runs: every committed run is one of the study's
    published = {p.name for p in (ROOT / "docs" / "fashion-mnist-convergence").glob("xmininet_*")}
    assert len(published) >= 96 and published <= {c.run_id for c in configs}
    assert {c.epochs for c in resolve(profile="convergence", epochs="3,4", seeds=[0]).configs()} == {3, 4}


def test_the_gpu_profiles_can_reach_a_verdict_and_keep_their_dataset():
    full = resolve("auto", "full")  # whatever this machine has, full is Imagenette-160
    assert full.dataset == "imagenette-160" and full.seeds == list(range(10))
    assert full.axes["placement"] == ["all", "last"] and len(full.configs()) == 4 * 3 * 10
    # the smallest exact sign-flip p of n pairs, 2/2^n, passes Holm's first step over the 8 comparisons
    assert 2 / 2 ** len(full.seeds) <= 0.05 / (len(full.archs) * 2)
    board = resolve("auto", "leaderboard")
    assert board.dataset == "imagenette-320" and 2 / 2 ** len(board.seeds) <= 0.05


def test_study_full_without_imagenette_stops_in_one_line_before_any_run(tmp_path):
    with socket.socket() as s:  # a loopback port nothing listens on: the mirror does not answer
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "BNET_FASTAI_DATA": str(tmp_path / "data"), "BNET_FASTAI_MIRROR": f"http://127.0.0.1:{port}"}
    done = subprocess.run([sys.executable, "-m", "bnet_fastai", "study", "full", "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.splitlines() == [
        f"bnet-fastai study: error: cannot download 'imagenette-160' from http://127.0.0.1:{port}/imagenette2-160.tgz "
        f"([Errno 111] Connection refused); offline, use --dataset sample, or set BNET_FASTAI_MIRROR=<base url> "
        f"serving imagenette2-160.tgz"]
    assert "dataset: imagenette-160 | profile: full" in done.stdout and not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, message", [(["--seeds", "0,x"], "SEEDS takes whole numbers, got 'x'"),
                                           (["--k", "4"], "k must be a positive odd integer"),
                                           (["--placement", "first"], "unknown placement 'first'"),
                                           (["--archs", "nope"], "unknown arch 'nope'")])
def test_study_options_are_checked_as_the_notebook_s_parameters(args, message, tmp_path, capsys):
    assert main(["study", "quick", "--dataset", "sample", "--out", str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bnet-fastai study: error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_study_takes_the_notebook_s_parameters_on_the_command_line(tmp_path, monkeypatch, capsys):
    from .test_report import _write_run

    monkeypatch.setenv("BNET_FASTAI_DATA", str(tmp_path / "data"))
    (tmp_path / "out").mkdir()
    other = _write_run(tmp_path / "out", [0.5, 0.6], seed=7, norm="bn", epochs=2)  # another study's run, same folder
    args = dict(archs="xmininet", norms="bn,bnet-k5-last", seeds="0", epochs="1")
    assert main(["study", "quick", "--dataset", "sample", "--out", str(tmp_path / "out"),
                 *[x for name, value in args.items() for x in (f"--{name}", value)]]) == 0
    expected = resolve("sample", "quick", archs=["xmininet"], norms=["bn", "bnet-k5-last"], seeds=[0], epochs=1)
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.is_dir()) == sorted(
        [other.name, *(c.run_id for c in expected.configs())])
    # the report covers every run in the folder, and says so: not "study done: 2 runs"
    assert (f"study done: 2 runs (2 trained, 0 reused); the report covers 3 finished run(s) in {tmp_path / 'out'}, "
            f"1 of them from outside this study; summary.csv") in capsys.readouterr().out
