"""Per-epoch checkpoints (issue 11): a killed run resumes at its first unfinished epoch and ends exactly where
an uninterrupted run ends; a finished run keeps loadable weights and drops its checkpoint."""
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from fastai.callback.core import Callback

from bnet_fastai.runs.checkpoint import EpochCheckpoint, load_checkpoint, load_model
from bnet_fastai.runs.runstate import RunFailed
from bnet_fastai.runs.config import RunConfig
from bnet_fastai.runs.learner import build_learner
from bnet_fastai.runs.train import run

CONFIG = dict(arch="xmininet", norm="bnet", dataset="sample", size=16, bs=32, epochs=4, fraction=0.5, workers=0,
              lr=1e-2)
DIE = textwrap.dedent("""
    import os, signal, sys
    import torch
    from fastai.callback.core import Callback
    from bnet_fastai.runs.config import RunConfig
    from bnet_fastai.runs.train import run

    out, mode, epoch, config = sys.argv[1], sys.argv[2], int(sys.argv[3]), eval(sys.argv[4])

    class KillAfterEpoch(Callback):  # after the epoch's checkpoint is saved (order > EpochCheckpoint's)
        order = 100
        def after_epoch(self):
            if mode == "after" and self.epoch + 1 == epoch:
                os.kill(os.getpid(), signal.SIGKILL)
        def after_fit(self):  # every epoch trained and saved; weights and final status not yet written
            if mode == "after_fit":
                os.kill(os.getpid(), signal.SIGKILL)

    save = torch.save
    def save_then_die(obj, f, *args, **kw):  # the checkpoint of `epoch`: half written, then SIGKILL
        if mode == "during" and isinstance(obj, dict) and obj.get("epochs_done") == epoch:
            f.write(b"PK\\x03\\x04 half a checkpoint")
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return save(obj, f, *args, **kw)
    torch.save = save_then_die

    run(RunConfig(**config), out, cbs=[KillAfterEpoch()])
""")
# the leaderboard's schedule and optimizer: fit_flat_cos (resumed through SkipToEpoch) and ranger (Lookahead state)
FLAT_COS = {**CONFIG, "schedule": "flat_cos", "opt": "ranger", "epochs": 3, "norm": "bn"}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BNET_FASTAI_DATA", str(root / "data"))
        result = run(RunConfig(**CONFIG), root / "whole")
    return root, Path(result["run_dir"])


def _killed_then_resumed(root: Path, mode: str, epoch: int, monkeypatch, config: dict = CONFIG) -> tuple[Path, bytes]:
    monkeypatch.setenv("BNET_FASTAI_DATA", str(root / "data"))
    out = root / f"killed-{mode}-{config['schedule'] if 'schedule' in config else 'one_cycle'}"
    script = root / "die.py"
    script.write_text(DIE)
    died = subprocess.run([sys.executable, str(script), str(out), mode, str(epoch), repr(config)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "BNET_FASTAI_DATA": str(root / "data")})
    assert died.returncode == -9, died.stderr[-2000:]
    run_dir = out / RunConfig(**config).run_id
    before = (run_dir / "history.csv").read_bytes()
    assert json.loads((run_dir / "status.json").read_text())["status"] == "running"  # as a SIGKILL leaves it
    result = run(RunConfig(**config), out)
    assert result["status"] == "finished" and not result["reused"]
    return run_dir, before


def _same_end(run_dir: Path, whole: Path) -> None:
    resumed, reference = torch.load(run_dir / "model.pth"), torch.load(whole / "model.pth")
    assert resumed.keys() == reference.keys()
    for name in reference:  # exact: every random state, the optimizer and the smoothed loss were restored
        assert torch.equal(resumed[name], reference[name]), name
    columns = ["epoch", "train_loss", "valid_loss", "accuracy"]
    pd.testing.assert_frame_equal(pd.read_csv(run_dir / "history.csv")[columns],
                                  pd.read_csv(whole / "history.csv")[columns], check_exact=True)


def test_sigkill_after_two_of_four_epochs_resumes_at_epoch_two_and_ends_as_if_never_killed(uninterrupted, monkeypatch):
    root, whole = uninterrupted
    run_dir, before = _killed_then_resumed(root, "after", 2, monkeypatch)
    history = (run_dir / "history.csv").read_bytes()
    assert len(before.splitlines()) == 1 + 2 and history.startswith(before)  # the first 2 rows keep their bytes
    assert len(history.splitlines()) == 1 + 4
    status = json.loads((run_dir / "status.json").read_text())
    assert status["resumed_from_epoch"] == 2 and status["epochs_done"] == 4
    _same_end(run_dir, whole)
    assert not (run_dir / "checkpoint.pth").exists() and not list(run_dir.glob(".*.tmp"))


def test_a_kill_during_the_checkpoint_write_falls_back_to_the_previous_checkpoint(uninterrupted, monkeypatch):
    root, whole = uninterrupted
    run_dir, before = _killed_then_resumed(root, "during", 3, monkeypatch)
    # epoch 3's row was written, its checkpoint was not: the run resumes from epoch 2's checkpoint
    assert len(before.splitlines()) == 1 + 3
    history = (run_dir / "history.csv").read_bytes()
    assert history.startswith(b"".join(before.splitlines(keepends=True)[:3]))
    assert json.loads((run_dir / "status.json").read_text())["resumed_from_epoch"] == 2
    _same_end(run_dir, whole)


def test_the_flat_cos_schedule_with_ranger_resumes_exactly_too(uninterrupted, monkeypatch):
    root, _ = uninterrupted
    whole = Path(run(RunConfig(**FLAT_COS), root / "whole-flat-cos")["run_dir"])
    run_dir, _ = _killed_then_resumed(root, "after", 1, monkeypatch, FLAT_COS)
    assert json.loads((run_dir / "status.json").read_text())["resumed_from_epoch"] == 1
    _same_end(run_dir, whole)


def test_a_kill_after_the_last_epoch_but_before_the_final_status_just_finishes_the_run(uninterrupted, monkeypatch):
    root, whole = uninterrupted
    run_dir, before = _killed_then_resumed(root, "after_fit", 0, monkeypatch)
    assert len(before.splitlines()) == 1 + 4 and (run_dir / "history.csv").read_bytes() == before
    assert json.loads((run_dir / "status.json").read_text())["resumed_from_epoch"] == 4
    _same_end(run_dir, whole)
    assert not (run_dir / "checkpoint.pth").exists()


@pytest.fixture(scope="module")
def other_runs_checkpoint(uninterrupted):
    """checkpoint.pth of another run (seed 1) killed after 2 of its 4 epochs."""
    root, _ = uninterrupted
    other = {**CONFIG, "seed": 1}
    script = root / "die-other.py"
    script.write_text(DIE)
    died = subprocess.run([sys.executable, str(script), str(root / "other"), "after", "2", repr(other)],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "BNET_FASTAI_DATA": str(root / "data")})
    assert died.returncode == -9, died.stderr[-2000:]
    return (root / "other" / RunConfig(**other).run_id / "checkpoint.pth").read_bytes(), RunConfig(**other).run_id


def _trained_with_this_checkpoint(root: Path, name: str, data: bytes, monkeypatch, capsys) -> tuple[Path, str]:
    """This run (CONFIG) into a folder holding `data` as its checkpoint (and the killed run's history): the
    result, and its one stderr line about the checkpoint."""
    monkeypatch.setenv("BNET_FASTAI_DATA", str(root / "data"))
    run_dir = root / name / RunConfig(**CONFIG).run_id
    run_dir.mkdir(parents=True)
    (run_dir / "checkpoint.pth").write_bytes(data)
    (run_dir / "history.csv").write_bytes(next((root / "other").glob("*/history.csv")).read_bytes())
    capsys.readouterr()
    result = run(RunConfig(**CONFIG), root / name)
    err = capsys.readouterr().err
    assert result["status"] == "finished" and "resumed_from_epoch" not in result
    lines = [line for line in err.splitlines() if "checkpoint.pth" in line]
    assert len(lines) == 1, err
    return Path(result["run_dir"]), lines[0]


def test_another_runs_checkpoint_is_set_aside_and_the_run_trains_from_the_start(
        uninterrupted, other_runs_checkpoint, monkeypatch, capsys):
    root, whole = uninterrupted
    data, other_id = other_runs_checkpoint
    run_dir, line = _trained_with_this_checkpoint(root, "foreign", data, monkeypatch, capsys)
    assert line.startswith(f"{run_dir.name}: not resuming from checkpoint.pth: it belongs to run {other_id}; "
                           f"moved to {root / 'foreign' / '.set-aside'}")
    _same_end(run_dir, whole)  # the history of an uninterrupted run, none of the other run's
    (kept,) = (root / "foreign" / ".set-aside").iterdir()
    assert kept.read_bytes() == data


@pytest.mark.parametrize("damage", ["truncated", "random"])
def test_a_damaged_checkpoint_is_named_in_one_line_and_the_run_trains_from_the_start(
        uninterrupted, other_runs_checkpoint, monkeypatch, capsys, damage):
    root, whole = uninterrupted
    data = other_runs_checkpoint[0][:1000] if damage == "truncated" else os.urandom(4096)
    run_dir, line = _trained_with_this_checkpoint(root, f"damaged-{damage}", data, monkeypatch, capsys)
    assert f"{run_dir.name}: not resuming from checkpoint.pth: it cannot be read (" in line
    assert line.endswith("training from the start")
    _same_end(run_dir, whole)


def test_a_checkpoint_of_an_incompatible_model_is_one_line_not_a_state_dict_dump(
        uninterrupted, other_runs_checkpoint, monkeypatch, capsys, tmp_path):
    root, whole = uninterrupted
    state = torch.load(io.BytesIO(other_runs_checkpoint[0]), weights_only=False)
    state["run"]["run_id"] = RunConfig(**CONFIG).run_id  # claims to be this run's, holds another model
    state["model"] = {f"{k}.extra": v for k, v in state["model"].items()}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    run_dir, line = _trained_with_this_checkpoint(root, "incompatible", buffer.getvalue(), monkeypatch, capsys)
    assert "it does not fit this run's model or optimizer (RuntimeError: Error(s) in loading state_dict" in line
    assert len(line) < 400
    _same_end(run_dir, whole)


@contextlib.contextmanager
def _small_tmpfs(path: Path, size: str = "64m"):
    """A tmpfs at `path`, where this process may mount one (root with CAP_SYS_ADMIN); else the test skips."""
    path.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs to fill needs root and mount(8)")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_full_disk_is_named_in_one_line_and_the_rerun_after_freeing_space_resumes(
        uninterrupted, monkeypatch, tmp_path):
    root, whole = uninterrupted
    monkeypatch.setenv("BNET_FASTAI_DATA", str(root / "data"))

    class FillTheDisk(Callback):  # after epoch 2's history row, before its checkpoint: leave 64 KiB free
        order = EpochCheckpoint.order - 1

        def after_epoch(self):
            if self.epoch == 1:
                free = shutil.disk_usage(out).free
                (out / "filler").write_bytes(b"\0" * max(free - 64 * 1024, 0))

    with _small_tmpfs(tmp_path / "small") as out:
        with pytest.raises(RunFailed) as err:
            run(RunConfig(**CONFIG), out, cbs=[FillTheDisk()])
        run_dir = out / RunConfig(**CONFIG).run_id
        message = str(err.value)
        assert message == (f"cannot write {run_dir}: no space left on its device; free some space, then run the "
                           f"same command again (it resumes from its last finished epoch)")
        status = json.loads((run_dir / "status.json").read_text())
        assert status["status"] == "failed" and status["error"] == message
        assert not list(run_dir.glob(".*.tmp"))  # the checkpoint write left nothing half written
        (out / "filler").unlink()
        result = run(RunConfig(**CONFIG), out)
        assert result["status"] == "finished" and result["resumed_from_epoch"] == 1
        _same_end(run_dir, whole)


def test_model_pth_reproduces_the_logged_accuracy_and_the_fused_model_agrees(uninterrupted, monkeypatch):
    root, whole = uninterrupted
    monkeypatch.setenv("BNET_FASTAI_DATA", str(root / "data"))
    status = json.loads((whole / "status.json").read_text())
    logged = pd.read_csv(whole / "history.csv")["accuracy"].iloc[-1]
    assert status["final_accuracy"] == pytest.approx(logged, abs=1e-6)
    assert status["accuracy"] == pytest.approx(logged, abs=1e-6)
    n_valid = json.loads((whole / "config.json").read_text())["dataset"]["n_valid"]
    assert abs(status["fused_accuracy"] - status["accuracy"]) <= 1 / n_valid  # fused BNET: same predictions
    learn, _ = build_learner(RunConfig(**CONFIG))
    learn.model = load_model(whole)  # create_model(...) from config.json, weights from model.pth
    assert float(learn.validate()[1]) == pytest.approx(logged, abs=1e-6)
    assert "model.pth" in status["files"] and not (whole / "checkpoint.pth").exists()


def test_keep_weights_false_keeps_no_model(tmp_path, monkeypatch):
    monkeypatch.setenv("BNET_FASTAI_DATA", str(tmp_path / "data"))
    config = RunConfig(**{**CONFIG, "epochs": 1, "norm": "bn", "keep_weights": False})
    assert config.run_id == RunConfig(**{**CONFIG, "epochs": 1, "norm": "bn"}).run_id  # results do not change
    run_dir = Path(run(config, tmp_path / "exp")["run_dir"])
    assert sorted(p.name for p in run_dir.iterdir() if not p.name.startswith("events")) == [
        "config.json", "history.csv", "status.json"]


def test_sigterm_mid_run_then_the_same_command_resumes_it(tmp_path):
    import signal

    cli = str(Path(sys.executable).with_name("bnet-fastai"))
    argv = [cli, "run", "--arch", "xmininet", "--dataset", "sample", "--size", "16", "--epochs", "3", "--bs", "32",
            "--fraction", "0.5", "--workers", "0", "--out", str(tmp_path / "exp")]
    env = {**os.environ, "BNET_FASTAI_DATA": str(tmp_path / "data")}
    first = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    run_dir = tmp_path / "exp" / RunConfig(arch="xmininet", dataset="sample", size=16, epochs=3, bs=32,
                                           fraction=0.5, workers=0).run_id
    deadline = time.time() + 120
    while not (run_dir / "checkpoint.pth").exists() and time.time() < deadline:  # epoch 1 is saved
        time.sleep(0.05)
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=120) == 130
    assert "interrupted; run the same command again to resume" in first.stderr.read()
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "interrupted" and (run_dir / "checkpoint.pth").is_file()
    again = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0, again.stderr
    resumed = json.loads((run_dir / "status.json").read_text())["resumed_from_epoch"]
    assert resumed in (1, 2)  # the SIGTERM landed in epoch 2, or (on a slow machine) after its checkpoint
    assert f"finished (resumed from epoch {resumed}): {run_dir}" in again.stdout
    assert f"{run_dir.name}: resuming from its checkpoint after epoch {resumed} of 3" in again.stdout
    assert len((run_dir / "history.csv").read_text().splitlines()) == 1 + 3


def test_sigterm_waits_until_the_checkpoint_write_is_done():
    import signal

    from bnet_fastai.runs.checkpoint import signals_held

    seen = []
    old = signal.signal(signal.SIGTERM, lambda *_: seen.append("delivered"))
    try:
        with signals_held():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
            seen.append("write done")
        time.sleep(0.05)
    finally:
        signal.signal(signal.SIGTERM, old)
    assert seen == ["write done", "delivered"]


@pytest.mark.parametrize("opt", ["adam", "ranger"])
def test_a_loaded_optimizer_state_follows_its_parameters_to_their_device(opt):
    # a checkpoint is loaded on the CPU while a GPU run's parameters are on the GPU. The "meta" device stands
    # in for the GPU: the CPU state loaded into an optimizer of meta parameters must move to "meta".
    from fastai.optimizer import Adam, ranger

    from bnet_fastai.runs.checkpoint import _state_to_params_device

    def stepped(device: str):
        model = torch.nn.Linear(3, 2, device=device)
        optimizer = {"adam": Adam, "ranger": ranger}[opt](model.parameters(), lr=1e-2)
        model(torch.randn(4, 3, device=device)).sum().backward()
        optimizer.step()
        return optimizer

    optimizer = stepped("meta")
    optimizer.load_state_dict(stepped("cpu").state_dict())  # as `restore` does, from a checkpoint on the CPU
    _state_to_params_device(optimizer)
    tensors = [v for p, *_ in optimizer.all_params() for v in optimizer.state[p].values() if torch.is_tensor(v)]
    tensors += [w for ws in getattr(optimizer, "slow_weights", None) or [] for w in ws]
    assert len(tensors) >= 4 and all(t.device.type == "meta" for t in tensors)


def test_load_model_given_an_experiment_folder_says_to_pass_a_run_folder(uninterrupted, tmp_path):
    root, whole = uninterrupted
    with pytest.raises(ValueError, match=rf"^{whole.parent} is an experiment folder \(1 runs\), not a run: pass one "
                                         rf"run folder, e\.g\. load_model\('{whole}'\)$"):
        load_model(whole.parent)
    with pytest.raises(ValueError, match=r"is not a run folder \(it has no config.json\): pass <out>/<run_id>$"):
        load_model(tmp_path)


def test_a_checkpoint_of_another_norm_is_not_this_runs(tmp_path):
    bnet, bn = RunConfig(**CONFIG), RunConfig(**{**CONFIG, "norm": "bn"})
    state = {"run": {"run_id": bn.run_id}, "epochs_done": 2, "model": {}, "opt": {}, "random": {}}
    torch.save(state, tmp_path / "checkpoint.pth")
    assert load_checkpoint(tmp_path, bnet.run_id) == (None, f"it belongs to run {bn.run_id}")
    assert load_checkpoint(tmp_path, bn.run_id)[0]["epochs_done"] == 2
    del state["run"]
    torch.save(state, tmp_path / "checkpoint.pth")
    assert load_checkpoint(tmp_path, bn.run_id) == (None, "it records no run (written before checkpoints named "
                                                          "their run)")


def test_load_model_loads_only_the_weights_its_run_wrote(uninterrupted, tmp_path):
    import shutil

    from bnet_fastai.runs.runstate import read_status, write_status

    root, whole = uninterrupted
    reference = load_model(whole)
    run_dir = tmp_path / whole.name
    shutil.copytree(whole, run_dir)
    torch.testing.assert_close(load_model(run_dir).state_dict(), reference.state_dict())
    # another run's weights copied in (same architecture, other values): the recorded sha256 refuses them
    other = {k: v + 1 if v.is_floating_point() else v for k, v in reference.state_dict().items()}
    torch.save(other, run_dir / "model.pth")
    with pytest.raises(ValueError, match=rf"^{run_dir.name}: model.pth: (size \d+, expected \d+|sha256 differs from "
                                         r"the one recorded when the run finished): it is not the file this run "
                                         r"wrote; put the run's own back or train it again with --force$"):
        load_model(run_dir)
    # cut short: the size differs (before torch's "failed finding central directory")
    (run_dir / "model.pth").write_bytes((whole / "model.pth").read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"model.pth: size 1000, expected \d+"):
        load_model(run_dir)
    # no record to check (a run written before the record): an unreadable file is still named in one line
    status = read_status(run_dir)
    write_status(run_dir, "finished", **{k: v for k, v in status.items()
                                         if k not in ("status", "files", "pid", "host", "time")})
    with pytest.raises(ValueError, match=rf"^{run_dir.name}: model.pth cannot be read \(.+\); train the run again "
                                         r"with --force$"):
        load_model(run_dir)
    (run_dir / "model.pth").unlink()
    with pytest.raises(ValueError, match=rf"^{run_dir.name} finished without model.pth \(trained with "
                                         r"keep_weights=False, or the file was removed\)"):
        load_model(run_dir)
    write_status(run_dir, "diverged", error="loss became NaN at epoch 2")
    with pytest.raises(ValueError, match=rf"^{run_dir.name} is diverged \(loss became NaN at epoch 2\): it has no "
                                         r"trained weights to load; run it again"):
        load_model(run_dir)
