"""Progress of runs and sweeps: plain lines off a terminal, TensorBoard scalars per run, the live grid view."""
import io
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from fastai.callback.progress import ProgressCallback
from fastai.test_utils import synth_learner

from bnet_fastai.runs import progress
from bnet_fastai.app.live import LiveMonitor
from bnet_fastai.runs.progress import EpochLines, show_progress
from bnet_fastai.sweeps.sweep import expand_grid, sweep
from bnet_fastai.runs.config import RunConfig

CLI = str(Path(sys.executable).with_name("bnet-fastai"))
QUICK = dict(dataset="sample", size=16, bs=64, epochs=2, fraction=0.3, workers=0, arch="xmininet")
EPOCH_LINE = re.compile(r"(\S+) epoch (\d+)/2 train_loss (\d+\.\d{4}) valid_loss (\d+\.\d{4}) "
                        r"accuracy (\d\.\d{4}) time \d\d:\d\d")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return tmp_path_factory.getbasetemp() / "shared-data"


@pytest.fixture(autouse=True)
def _data_root(data_root, monkeypatch):
    monkeypatch.setenv("BNET_FASTAI_DATA", str(data_root))


@pytest.fixture(scope="module")
def cli_sweep(tmp_path_factory, data_root):
    """A 2-run sweep (bn, bnet) through the real command line, its stdout written to a file: (out, stdout)."""
    tmp = tmp_path_factory.mktemp("cli")
    args = [f"--{k}={v}" for k, v in QUICK.items()]
    with open(tmp / "stdout.txt", "w") as stdout:
        done = subprocess.run([CLI, "sweep", *args, "--norm", "bn,bnet", "--out", str(tmp / "exp")], stdout=stdout,
                              stderr=subprocess.PIPE, text=True, env={**os.environ, "BNET_FASTAI_DATA": str(data_root)})
    assert done.returncode == 0, done.stderr[-2000:]
    return tmp / "exp", (tmp / "stdout.txt").read_bytes()


def _configs(**grid) -> list[RunConfig]:
    return expand_grid(RunConfig(**QUICK), {"norm": ["bn", "bnet"], **grid})


def test_off_a_terminal_a_sweep_prints_one_plain_line_per_epoch_and_per_run(cli_sweep):
    out, stdout = cli_sweep
    assert b"\r" not in stdout and len(stdout) < 8 * 1024
    lines = stdout.decode().splitlines()
    configs = _configs()
    for i, config in enumerate(configs, 1):
        epochs = [m for m in map(EPOCH_LINE.fullmatch, lines) if m and m[1] == config.run_id]
        assert [int(m[2]) for m in epochs] == [1, 2]
        history = pd.read_csv(out / config.run_id / "history.csv")
        for m, (_, row) in zip(epochs, history.iterrows()):  # the printed numbers are history.csv's
            assert [float(m[3]), float(m[4]), float(m[5])] == pytest.approx(
                [row.train_loss, row.valid_loss, row.accuracy], abs=5e-5)
        assert sum(line.startswith(f"[{i}/2] {config.run_id}: finished, accuracy") for line in lines) == 1
    assert sum(bool(EPOCH_LINE.fullmatch(line)) for line in lines) == 4
    assert len(lines) == 4 + 2 + 1  # epochs, one line per run, the sweep's summary


def test_every_run_writes_tensorboard_scalars_one_point_per_epoch(cli_sweep):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = cli_sweep
    for config in _configs():
        events = EventAccumulator(str(out / config.run_id))
        events.Reload()
        assert set(events.Tags()["scalars"]) == {"train_loss", "valid_loss", "accuracy", "lr"}
        history = pd.read_csv(out / config.run_id / "history.csv")
        for tag in ("valid_loss", "accuracy", "train_loss"):
            points = events.Scalars(tag)
            assert [p.step for p in points] == [1, 2]  # step = epoch number
            assert [p.value for p in points] == pytest.approx(history[tag].tolist(), abs=1e-6)
        lrs = [p.value for p in events.Scalars("lr")]
        assert len(lrs) == 2 and 0 < lrs[1] < lrs[0] <= config.lr  # one-cycle: annealing in the last epoch


class _FakeHandle:
    """Stands in for an IPython display handle: keeps everything shown through it."""

    def __init__(self, obj):
        self.shown = [obj]

    def update(self, obj):
        self.shown.append(obj)

    @property
    def updates(self) -> int:
        return len(self.shown) - 1


def test_live_view_updates_the_figure_each_epoch_and_once_per_reused_run(cli_sweep, tmp_path):
    out, _ = cli_sweep
    bn, bnet = _configs()
    shutil.copytree(out / bn.run_id, tmp_path / bn.run_id)  # finished before: reused, drawn from history.csv
    monitor = LiveMonitor(display=_FakeHandle)
    results = sweep(RunConfig(**QUICK), {"norm": ["bn", "bnet"]}, tmp_path, live=monitor)

    assert [(r["status"], r["reused"]) for r in results] == [("finished", True), ("finished", False)]
    bar, figure = monitor.bar, monitor.figure
    assert figure.updates == 2 + 1  # one per trained epoch, one per reused run
    assert all(shown.data.startswith(b"\x89PNG") for shown in figure.shown)
    assert bar.updates == 2 + 2 + 2  # one per trained epoch, one as each run starts, one as each ends
    assert 'max="2" value="2"' in str(bar.shown[-1]) and "2/2 runs" in str(bar.shown[-1])
    assert 'value="0"' in str(bar.shown[0]) and "0/2 runs" in str(bar.shown[0])
    for config in (bn, bnet):  # each curve is the run's validation accuracy, epoch by epoch
        history = pd.read_csv(tmp_path / config.run_id / "history.csv")
        assert monitor.curves[config.run_id] == pytest.approx(history["accuracy"].tolist(), abs=1e-6)
    assert monitor.colours == {"bn": "C0", "bnet-k3-all": "C1"}  # bn is blue


@pytest.mark.parametrize("notebook, tty, main_process, bars, lines", [
    (False, False, True, False, True),  # a pipe, nohup, a cluster job: plain lines
    (False, False, False, False, False),  # another rank of a distributed run: silent
    (False, True, True, True, False),  # a terminal: fastai's bars
    (True, False, True, True, False),  # a notebook: fastai's HTML bars
])
def test_fastai_bars_stay_on_a_terminal_and_in_a_notebook(notebook, tty, main_process, bars, lines, monkeypatch):
    stdout = io.StringIO()
    stdout.isatty = lambda: tty
    monkeypatch.setattr(sys, "stdout", stdout)
    monkeypatch.setattr(progress, "IN_NOTEBOOK", notebook)
    learn = synth_learner()
    show_progress(learn, "some_run", main_process)
    assert isinstance(getattr(learn, "progress", None), ProgressCallback) == bars
    assert any(isinstance(cb, EpochLines) for cb in learn.cbs) == lines


def test_plain_lines_replace_fastais_table_and_history_csv_is_still_written(tmp_path, monkeypatch):
    from fastai.callback.progress import CSVLogger

    monkeypatch.setattr(sys, "stdout", io.StringIO())
    learn = synth_learner(path=tmp_path, cbs=CSVLogger())
    show_progress(learn, "some_run")
    learn.fit(3)
    lines = sys.stdout.getvalue().splitlines()
    assert len(lines) == 3 and all(re.fullmatch(rf"some_run epoch {i}/3 train_loss \d+\.\d{{4}} valid_loss "
                                                rf"\d+\.\d{{4}} time \d\d:\d\d", line)
                                   for i, line in enumerate(lines, 1))
    assert len(pd.read_csv(tmp_path / "history.csv")) == 3


def test_in_a_notebook_a_finished_run_leaves_one_line_below_the_grid_bar_and_the_figure(tmp_path, data_root):
    """A real kernel (nbclient, as papermill and JupyterLab run it): after a 4-run sweep the training cell holds
    the grid bar, the figure and one line per run, where each run showed fastai's bar and epoch table."""
    import nbformat
    from nbclient import NotebookClient

    code = (f"import os\nos.environ['BNET_FASTAI_DATA'] = {str(data_root)!r}\n"
            "from bnet_fastai.app.live import LiveMonitor\nfrom bnet_fastai.runs.config import RunConfig\n"
            "from bnet_fastai.sweeps.sweep import sweep\n"
            f"results = sweep(RunConfig(**{QUICK!r}), {{'norm': ['bn', 'bnet'], 'seed': [0, 1]}}, "
            f"{str(tmp_path / 'out')!r}, live=LiveMonitor())")
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(code)])
    NotebookClient(nb, kernel_name="python3", timeout=600, resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for o in nb.cells[0].outputs if not (o.output_type == "stream" and o.name == "stderr")]
    html = [o.get("data", {}).get("text/html", "") for o in outputs]
    bar = next(i for i, h in enumerate(html) if "4/4 runs" in h)
    figure = next(i for i, o in enumerate(outputs) if "image/png" in o.get("data", {}))
    runs = [h for h in html if "finished, accuracy" in h]
    assert bar < figure < min(html.index(h) for h in runs)  # the bar and the figure stay on top
    assert len(runs) == 4 and all(h.count("\n") == 0 and "<table" not in h for h in runs)
    assert [h.split("]")[0] for h in runs] == [f"<div>[{i}/4" for i in range(1, 5)]
    assert not [o for o in outputs if o.output_type == "stream"]  # no printed lines either
    assert not any("<table" in h for h in html)  # no epoch table is left
