"""`bnet-fastai check`, the preflight: every check on this machine's CPU, a failing check named, DDP over gloo."""
import json
import re
import subprocess
import sys

import pytest
import torch

from bnet_fastai.app import cli, ddp_check, preflight
from bnet_fastai.speed import amp_dtype, interleaved, training_step

from .helpers import CPU_IMPL


@pytest.mark.slow
def test_check_passes_on_this_cpu_and_writes_its_table(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))  # its temporary folder: removed afterwards
    (tmp_path / "tmp").mkdir()
    monkeypatch.chdir(tmp_path)
    assert cli.main(["check", "--device", "cpu", "--json", str(tmp_path / "check.json")]) == 0
    lines = capsys.readouterr().out.splitlines()
    table = {line.split()[0]: line.split()[1] for line in lines if line.split()[:1] and line.split()[0] in
             preflight.CHECKS}
    assert table == {**{name: "PASS" for name in preflight.CHECKS}, "ddp": "SKIP"}
    # progress: before each step a line naming it and the seconds so far, in order, each before its result
    progress = [i for i, line in enumerate(lines) if line.startswith("[")]
    assert [lines[i].split(":")[0] for i in progress] == [f"[{n}/8] {name}" for n, name in
                                                          enumerate(preflight.STEPS, 1)]
    seconds = [int(lines[i].rsplit("(", 1)[1].split()[0]) for i in progress]
    assert seconds == sorted(seconds)
    for i, name in zip(progress, preflight.STEPS):
        assert next(line for line in lines[i + 1:] if line.split()[:1] and line.split()[0] in preflight.CHECKS
                    ).split()[0].startswith(name)
    assert lines[0].startswith("bnet-fastai check: the training path on cpu (18 s of checks, 25 s in all, on this "
                               "project's 2-core CPU")
    saved = json.loads((tmp_path / "check.json").read_text())
    assert saved["passed"] is True and [r["name"] for r in saved["results"]] == list(preflight.CHECKS)
    results = {r["name"]: r for r in saved["results"]}
    assert results["resume"]["numbers"]["resumed_from_epoch"] == 1
    assert results["resume"]["numbers"]["epochs_done"] == preflight.RUN["epochs"]
    assert results["resume"]["numbers"]["max_difference_from_uninterrupted"] == 0.0  # on a CPU: exactly
    reload = results["reload"]["numbers"]  # the same images right (the logged value is a float32)
    assert reload["accuracy"] == pytest.approx(reload["logged"], abs=1e-6)
    assert results["run-bnet"]["numbers"]["accuracy"] >= preflight.MIN_ACCURACY
    assert results["run-bnet"]["numbers"]["fp16"] is False and results["run-bnet"]["numbers"]["device"] == "cpu"
    assert results["fuse-fp32"]["numbers"]["relative_max_difference"] < 1e-5
    speed = results["speed"]["numbers"]
    assert speed["ratio"] == pytest.approx(speed["ms_per_step"]["bnet"] / speed["ms_per_step"]["bn"])
    assert speed["images_per_second"]["bn"] == pytest.approx(speed["bs"] / speed["ms_per_step"]["bn"] * 1e3)
    assert speed["bnet_impl"] == CPU_IMPL and f"BNET through {CPU_IMPL}" in results["speed"]["measured"]  # timed
    assert "needs 2 GPUs" in results["ddp"]["measured"]
    assert list((tmp_path / "tmp").iterdir()) == []  # the runs, data and cache went with the folder
    assert not (tmp_path / "data").exists() and not (tmp_path / "results").exists()


@pytest.mark.slow
def test_a_failing_check_is_named_and_exits_1_and_out_keeps_the_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(preflight.FUSE_TOLERANCE, "bf16", 0.0)  # bfloat16 rounding cannot meet it
    assert cli.main(["check", "--device", "cpu", "--out", str(tmp_path / "kept")]) == 1
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines()[-1] == "bnet-fastai check: failed: fuse-bf16"
    assert any(line.startswith("fuse-bf16  FAIL  rel. max diff") for line in captured.out.splitlines())
    ddp = "0 skipped" if torch.cuda.device_count() >= 2 else "1 skipped"
    assert f"{8 + (ddp == '0 skipped')} passed, 1 failed, {ddp}" in captured.out
    runs = sorted(p.name for p in (tmp_path / "kept" / "runs").iterdir() if p.is_dir())
    assert [r.split("_")[1] for r in runs] == ["bn", "bnet-k3-all"]
    assert (tmp_path / "kept" / "data" / "sample").is_dir()


def test_a_gpu_asked_for_where_torch_sees_none_is_one_line_exit_2(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = subprocess.run([sys.executable, "-m", "bnet_fastai", "check", "--device", "cuda:1"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "sees no CUDA device" in proc.stderr and "--device cpu" in proc.stderr


def test_a_malformed_device_is_rejected_before_torch(tmp_path):
    code = ("import sys\nfrom bnet_fastai.app import cli\ntry:\n    cli.main(['check', '--device', 'gpu0'])\n"
            "except SystemExit as e:\n    print(e.code, 'torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert proc.stdout.split() == ["2", "False"]
    assert proc.stderr.strip() == ("bnet-fastai check: error: argument --device: expected auto, cpu, cuda or "
                                   "cuda:N, got 'gpu0'")


def test_resolve_device():
    assert preflight.resolve_device("cpu") == torch.device("cpu")
    assert preflight.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="expected auto, cpu, cuda or cuda:N"):
        preflight.resolve_device("mps")


@pytest.mark.slow
def test_a_2_process_run_through_torch_distributed_run_on_gloo(tmp_path, monkeypatch):
    monkeypatch.setenv("BNET_FASTAI_DATA", str(tmp_path / "data"))
    result = ddp_check.ddp_run(tmp_path / "ddp", gpus=False)
    assert result.status == "pass", result.measured
    assert result.numbers == {"status": "finished", "world_size": 2}
    run_dir = next((tmp_path / "ddp").glob("xmininet_*"))
    assert len((run_dir / "history.csv").read_text().splitlines()) == 2  # header + 1 epoch, written once


ABORTING_RANKS = """
import os, sys
if os.environ["RANK"] == "1":
    os.abort()  # a rank killed by a signal, as a gloo group left to the interpreter's shutdown can end one
"""
RAISING_RANKS = """
import os
if os.environ["RANK"] == "1":
    raise FileNotFoundError("no such file: /data/imagenette2-160")
"""
EXITING_RANKS = """
import os, sys
sys.exit(3 if os.environ["RANK"] == "1" else 0)
"""
FAILING_RANKS = """
import sys
print("bnet-fastai run: error: norm: expected bn or bnet, got 'gn'", file=sys.stderr)
sys.exit(2)
"""


@pytest.mark.parametrize("script, cause", [
    (ABORTING_RANKS, r"rank 1 \(local_rank: 1\): Signal 6 \(SIGABRT\) received by PID \d+"),
    (FAILING_RANKS, r"bnet-fastai run: error: norm: expected bn or bnet, got 'gn'"),
    (RAISING_RANKS, r"FileNotFoundError: no such file: /data/imagenette2-160"),
    (EXITING_RANKS, r"rank 1 \(local_rank: 1\): exit code 3 \(pid: \d+\)"),
])
def test_a_failed_launch_is_named_by_its_cause_not_by_torch_elastics_rule(tmp_path, script, cause):
    (tmp_path / "ranks.py").write_text(script)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node",
                           "2", "--master_addr", "127.0.0.1", "--master_port", str(ddp_check._free_port()),
                           str(tmp_path / "ranks.py")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].strip("=") == ""  # the line the check used to report
    assert re.fullmatch(cause, ddp_check.launch_failure(proc.stderr))


def test_two_ranks_error_lines_run_together_in_one_stderr_line_give_the_first():
    stderr = ("bnet-fastai run: error: bad `bnet-fastai data x`bnet-fastai run: error: bad `bnet-fastai data x`\n"
              "====\n")
    assert ddp_check.launch_failure(stderr) == "bnet-fastai run: error: bad `bnet-fastai data x`"


def test_launch_failure_without_torch_elastics_summary():
    assert ddp_check.launch_failure("one\ntwo\n=====\n") == "two"
    assert ddp_check.launch_failure("") == "no output"


def test_training_step_and_interleaved_timing():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(10))
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    step = training_step(model, x, y, amp_dtype("cpu"))
    first = float(step())
    before = [p.detach().clone() for p in model.parameters()]
    losses = [float(step()) for _ in range(20)]
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))  # it updates every weight
    assert losses[-1] < first  # and learns the four examples
    calls = {"a": 0, "b": 0}
    times = interleaved({k: (lambda k=k: calls.__setitem__(k, calls[k] + 1)) for k in calls}, rounds=3,
                        warmup=1, device="cpu")
    assert calls == {"a": 4, "b": 4} and set(times) == {"a", "b"} and all(t >= 0 for t in times.values())
    assert amp_dtype("cpu") is None and amp_dtype("cuda") is torch.float16
