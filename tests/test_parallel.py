"""A grid across processes and a Ray cluster (issue 11 parts 4-5): `--parallel N`, `--ray`, concurrent sweeps on one
folder. Real processes, real Ray; each run is 1 epoch on 20% of the sample digits at 16 px. Whatever trains them,
every run is finished and trained exactly once; bad input exits 2 in one line, quickly, writing nothing."""
import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bnet_fastai.runs.config import RunConfig, expand_grid
from bnet_fastai.runs.runstate import read_status, run_lock

CLI = str(Path(sys.executable).with_name("bnet-fastai"))
SAMPLE = ["--dataset", "sample", "--size", "16", "--epochs", "1", "--fraction", "0.2", "--workers", "0"]
GRID = ["--arch", "xmininet", "--norm", "bn,bnet", "--seed", "0,1", *SAMPLE]  # 4 runs of ~1 s (plus start-up)
BASE = RunConfig(arch="xmininet", dataset="sample", size=16, epochs=1, fraction=0.2, workers=0)
RUN_IDS = [c.run_id for c in expand_grid(BASE, {"norm": ["bn", "bnet"], "seed": [0, 1]})]
OUTCOME = re.compile(r"^\[\d+/\d+\] (\S+): (\w+)(?: \((reused|trained by another process)\))?")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """The sample digits, written once before any sweep starts (so concurrent sweeps do not time the writing)."""
    root = tmp_path_factory.mktemp("data")
    with pytest.MonkeyPatch.context() as m:
        m.setenv("BNET_FASTAI_DATA", str(root))
        from bnet_fastai.data.datasets import prepare

        prepare("sample")
    return root


@pytest.fixture
def env(data_root):
    return {**os.environ, "BNET_FASTAI_DATA": str(data_root)}


def _outcomes(stdout: str) -> dict[str, str]:
    """run_id -> "trained", "reused" or "trained by another process", from a sweep's one line per run."""
    found = {}
    for line in stdout.splitlines():
        match = OUTCOME.match(line)
        if match and match.group(2) != "damaged":
            assert match.group(1) not in found, f"two outcome lines for {match.group(1)}"
            assert match.group(2) == "finished", line
            found[match.group(1)] = match.group(3) or "trained"
    return found


def _status(out: Path, run_id: str) -> dict:
    return json.loads((out / run_id / "status.json").read_text())


def _check_trained_once(out: Path, *stdouts: str) -> None:
    """Every run finished, and exactly one outcome line across all the sweeps says it was trained there."""
    outcomes = [_outcomes(s) for s in stdouts]
    for run_id in RUN_IDS:
        assert read_status(out / run_id)["status"] == "finished"
        assert all(run_id in o for o in outcomes), f"{run_id} has no outcome line"
        assert sum(o[run_id] == "trained" for o in outcomes) == 1, (run_id, outcomes)
        assert len(list((out / run_id).glob("events.out.tfevents.*"))) == 1


def test_parallel_2_trains_a_4_run_grid_two_at_a_time(tmp_path, env):
    out = tmp_path / "exp"
    done = subprocess.run([CLI, "sweep", *GRID, "--parallel", "2", "--out", str(out)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "sweep done: 4 finished" in done.stdout
    _check_trained_once(out, done.stdout)
    statuses = [_status(out, r) for r in RUN_IDS]
    pids = {s["pid"] for s in statuses}
    assert len(pids) == 2  # two worker processes trained them
    # fit intervals [end - seconds, end] of runs in different workers overlap: they trained at the same time
    spans = [(s["pid"], s["time"] - s["seconds"], s["time"]) for s in statuses]
    assert any(p != q and a < d and c < b for p, a, b in spans for q, c, d in spans)


def test_two_sweeps_on_one_folder_share_the_work(tmp_path, env):
    out = tmp_path / "exp"
    procs = [subprocess.Popen([CLI, "sweep", *GRID, "--out", str(out)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    for proc, (stdout, stderr) in zip(procs, results):
        assert proc.returncode == 0, stderr
        assert "sweep done: 4 finished" in stdout
    _check_trained_once(out, *(stdout for stdout, _ in results))
    for run_id in RUN_IDS:  # the process whose line says "trained" is the one that wrote the run
        trainer = next(p for p, (stdout, _) in zip(procs, results) if _outcomes(stdout)[run_id] == "trained")
        assert _status(out, run_id)["pid"] == trainer.pid


def test_a_run_another_process_holds_is_waited_for_not_failed(tmp_path, env, monkeypatch):
    """The other process holds the run's lock until its run is finished: the sweep trains the rest, waits, and
    reports the run as trained by another process."""
    out, elsewhere = tmp_path / "exp", tmp_path / "elsewhere"
    monkeypatch.setenv("BNET_FASTAI_DATA", env["BNET_FASTAI_DATA"])
    from bnet_fastai.runs.train import run

    held = expand_grid(BASE, {"norm": ["bn"], "seed": [0]})[0]
    run(held, elsewhere)  # what the "other process" will have trained
    with run_lock(out / held.run_id), open(tmp_path / "stderr.txt", "w") as log:
        proc = subprocess.Popen([CLI, "sweep", *GRID, "--out", str(out)], env=env, stdout=subprocess.PIPE,
                                stderr=log, text=True)
        lines = []
        for line in proc.stdout:  # until the sweep has done the other runs and waits for this one
            lines.append(line)
            if line.startswith("waiting for"):
                break
        assert line == f"waiting for 1 run(s) that another process is training: {held.run_id}\n", "".join(lines)
        assert not (out / held.run_id / "status.json").exists()
        shutil.copytree(elsewhere / held.run_id, out / held.run_id)  # the other process finishes its run
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, (tmp_path / "stderr.txt").read_text()
    outcomes = _outcomes("".join(lines) + stdout)
    assert outcomes == {**{r: "trained" for r in RUN_IDS}, held.run_id: "trained by another process"}
    assert [line.split(":")[0] for line in stdout.splitlines()][-2:] == ["[1/4] " + held.run_id, "sweep done"]


def test_sigterm_stops_a_parallel_sweep_and_marks_its_runs_interrupted(tmp_path, env):
    out, log = tmp_path / "exp", tmp_path / "stderr.txt"
    with open(log, "w") as stderr:  # the last --epochs counts: runs long enough to be stopped
        proc = subprocess.Popen([CLI, "sweep", *GRID, "--epochs", "50", "--parallel", "2", "--out", str(out)],
                                env=env, stdout=subprocess.PIPE, stderr=stderr, text=True)
    seen = set()
    for line in proc.stdout:  # until both workers are training (each has logged an epoch)
        if " epoch " in line:
            seen.add(line.split()[0])
        if len(seen) == 2:
            break
    workers = _descendants(proc.pid)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode == 130 and log.read_text().strip().splitlines()[-1] == (
        "bnet-fastai sweep: interrupted; run the same command again to resume")
    assert all(_status(out, r)["status"] == "interrupted" for r in seen)  # written by the runs themselves
    assert len(seen) == 2 and workers and not _still_running(workers)


@pytest.mark.slow
def test_ctrl_c_to_a_parallel_sweep_prints_no_traceback_and_the_rerun_finishes_every_run(tmp_path, env):
    out, log = tmp_path / "exp", tmp_path / "stderr.txt"
    args = [CLI, "sweep", *GRID, "--epochs", "8", "--parallel", "2", "--out", str(out)]
    with open(log, "w") as stderr:  # its own session: Ctrl-C at a terminal signals the whole process group
        proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True,
                                start_new_session=True)
    seen = set()
    for line in proc.stdout:
        if " epoch " in line:
            seen.add(line.split()[0])
        if len(seen) == 2:
            break
    os.killpg(proc.pid, signal.SIGINT)
    proc.communicate(timeout=60)
    err = log.read_text()
    assert proc.returncode == 130 and "Traceback" not in err and "Error" not in err, err
    assert err.strip().splitlines()[-1] == "bnet-fastai sweep: interrupted; run the same command again to resume"
    again = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)  # the same command
    assert again.returncode == 0 and "sweep done: 4 finished" in again.stdout, again.stderr
    eight = [c.run_id for c in expand_grid(dataclasses.replace(BASE, epochs=8), {"norm": ["bn", "bnet"],
                                                                                  "seed": [0, 1]})]
    assert all(_status(out, r)["epochs_done"] == 8 for r in eight)


@pytest.mark.slow
def test_ray_local_trains_every_run_once_on_loopback_only(tmp_path, env):
    out, stdout_log, stderr_log = tmp_path / "exp", tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with open(stdout_log, "w") as stdout, open(stderr_log, "w") as stderr:
        proc = subprocess.Popen([CLI, "sweep", *GRID, "--ray", "local", "--out", str(out)], env=env,
                                stdout=stdout, stderr=stderr)
        seen, exposed = set(), set()
        while proc.poll() is None:  # every process Ray starts, and every TCP port they listen on
            family = _descendants(proc.pid) | {proc.pid}
            seen |= family
            exposed |= {a for a in _listening(family) if not _loopback(a)}
            time.sleep(0.2)
    assert proc.returncode == 0, stderr_log.read_text()
    assert "sweep done: 4 finished" in stdout_log.read_text()
    _check_trained_once(out, stdout_log.read_text())
    assert not exposed, f"Ray listened beyond loopback: {exposed}"
    assert proc.pid not in {_status(out, r)["pid"] for r in RUN_IDS}  # trained in Ray's worker processes
    assert len(seen) > 3 and not _still_running(seen), "Ray processes left running"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


BAD = [
    (["--parallel", "0"], ("argument --parallel: must be an integer >= 1 (the number of runs trained at a time), "
                           "got '0'")),
    (["--parallel", "-1"], "got '-1'"),
    (["--parallel", "2", "--ray", "local"], "--parallel and --ray do not go together"),
    (["--ray", "ray://127.0.0.1:{port}"], ("no Ray cluster answers at ray://127.0.0.1:{port} (Connection refused): "
                                           "check the address")),
    (["--ray", "127.0.0.1:{port}"], "no Ray cluster answers at 127.0.0.1:{port} (Connection refused)"),
    (["--ray", "nowhere"], "ray address must be one of local, auto, ray://HOST:PORT or HOST:PORT, got 'nowhere'"),
]


@pytest.mark.parametrize("options,message", BAD, ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_bad_parallel_or_ray_exits_2_in_one_line_before_torch(options, message, tmp_path):
    port = _free_port()  # nothing listens there
    options = [o.format(port=port) for o in options]
    code, stderr, heavy, seconds = _probe(["sweep", *GRID, *options, "--out", str(tmp_path / "exp")])
    assert code == 2 and len(stderr.splitlines()) == 1 and message.format(port=port) in stderr, stderr
    assert heavy == [] and seconds < 5  # measured ~1.6 s with Ray's import; torch was never imported
    assert not (tmp_path / "exp").exists()


def test_ray_missing_exits_2_and_names_the_extra(tmp_path):
    code, stderr, heavy, seconds = _probe(["sweep", *GRID, "--ray", "local", "--out", str(tmp_path / "exp")],
                                          hide_ray=True)
    assert code == 2 and stderr == ("bnet-fastai sweep: error: sweep --ray (runs on a Ray cluster) needs ray, which is "
                                    "not installed: pip install 'bnet-fastai[ray]' (from a checkout: pip install "
                                    "'.[ray]')")
    assert heavy == [] and seconds < 5 and not (tmp_path / "exp").exists()
    code, stderr, _, _ = _probe(["study", "quick", "--ray", "auto"], hide_ray=True)
    assert code == 2 and "pip install 'bnet-fastai[ray]'" in stderr


def _probe(argv: list[str], hide_ray: bool = False) -> tuple[int, str, list[str], float]:
    """Run the CLI's main in a fresh interpreter: exit code, stderr, heavy modules imported, seconds taken."""
    code = ("import json, sys, time\nt = time.perf_counter()\n" + ("sys.modules['ray'] = None\n" if hide_ray else "")
            + f"from bnet_fastai.app.cli import main\ntry:\n    code = main({argv!r})\nexcept SystemExit as e:\n"
            "    code = e.code\nprint('RESULT', code, time.perf_counter() - t, "
            "json.dumps([m for m in ('torch', 'fastai') if m in sys.modules]), file=sys.stderr)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    stderr, result = done.stderr.split("RESULT ")
    exit_code, seconds, heavy = result.split(" ", 2)
    return int(exit_code), stderr.strip(), json.loads(heavy), float(seconds)


def _descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _still_running(pids: set[int], seconds: float = 15) -> list[int]:
    """Those of `pids` still running after up to `seconds` (zombies count as gone)."""
    deadline = time.time() + seconds
    while True:
        alive = []
        for pid in pids:
            try:
                if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                    alive.append(pid)
            except OSError:
                pass
        if not alive or time.time() > deadline:
            return alive
        time.sleep(0.2)


def _listening(pids: set[int]) -> set[str]:
    """The local addresses of the TCP sockets in LISTEN state that `pids` hold, from /proc/net/tcp{,6}."""
    inodes = set()
    for pid in pids:
        try:
            links = [os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()]
        except OSError:
            continue
        inodes |= {link[8:-1] for link in links if link.startswith("socket:[")}
    addresses = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                host, port = fields[1].split(":")
                raw = b"".join(bytes.fromhex(host[i:i + 8])[::-1] for i in range(0, len(host), 8))
                family = socket.AF_INET if len(raw) == 4 else socket.AF_INET6
                addresses.add(f"{socket.inet_ntop(family, raw)}:{int(port, 16)}")
    return addresses


def _loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0]
    return host.startswith(("127.", "::ffff:127.")) or host == "::1"


def _workers(pid: int) -> list[int]:
    """The pool's worker processes among the children of `pid` (not multiprocessing's resource tracker)."""
    children = [int(c) for t in Path(f"/proc/{pid}/task").iterdir()
                for c in (t / "children").read_text().split()]
    return [c for c in children if b"resource_tracker" not in Path(f"/proc/{c}/cmdline").read_bytes()]


def test_a_worker_killed_mid_run_is_replaced_and_its_run_resumes(env, tmp_path):
    out = tmp_path / "exp"
    argv = [CLI, "sweep", "--arch", "xmininet", "--norm", "bn,bnet", "--dataset", "sample", "--size", "16",
            "--epochs", "4", "--fraction", "0.5", "--workers", "0", "--parallel", "2", "--out", str(out)]
    sweep = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 180
    while not list(out.glob("*/checkpoint.pth")) and time.time() < deadline:  # an epoch of a run is saved
        time.sleep(0.05)
    victim = next(iter(out.glob("*/checkpoint.pth"))).parent
    pid = json.loads((victim / "status.json").read_text())["pid"]  # the worker training that run
    assert pid in _workers(sweep.pid)
    os.kill(pid, signal.SIGKILL)  # as the OOM killer would
    stdout, stderr = sweep.communicate(timeout=300)
    assert sweep.returncode == 0, stderr
    assert "a worker process died: " in stderr
    statuses = {p.name: _status(out, p.name) for p in out.iterdir() if p.is_dir()}
    assert len(statuses) == 2 and all(s["status"] == "finished" for s in statuses.values())
    assert statuses[victim.name].get("resumed_from_epoch", 0) >= 1  # the killed run lost only its epoch in flight
    assert len((victim / "history.csv").read_text().splitlines()) == 1 + 4
