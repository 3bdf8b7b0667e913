"""Verified results: a run damaged after it finished is never reported and is trained again by a sweep."""
import hashlib
import json
from pathlib import Path

import pytest

from bnet_fastai.app import cli
from bnet_fastai.analysis.report import load_runs, report
from bnet_fastai.runs.runstate import check_run, file_record, raw_status, read_status, write_status
from bnet_fastai.sweeps.sweep import sweep
from bnet_fastai.runs.config import RunConfig
from bnet_fastai.runs.train import run
from tests.test_report import BN, BNET, _write_run

REAL = RunConfig(dataset="sample", size=16, bs=64, epochs=2, fraction=0.3, workers=0, arch="xmininet", norm="bnet")
KERNELS = [{"layer": "0.1", "stage": "stem", "k": 3, "spatial": [8, 8],  # as norms.kernel_stats writes it
            "mean_abs": [[0.0, 0.1, 0.0], [0.1, 1.0, 0.1], [0.0, 0.1, 0.0]]}]


def _cut(path: Path, n: int = 7) -> None:
    """Drop the last `n` bytes: the last row loses its time and part of its accuracy."""
    path.write_bytes(path.read_bytes()[:-n])


def _finish(run_dir: Path) -> Path:
    """Rewrite a hand-made run's status as a finish of today writes it: with its file record."""
    write_status(run_dir, "finished", epochs_done=3, **file_record(run_dir))
    return run_dir


def _experiment(out: Path, recorded: bool) -> Path:
    """Three BN and three BNET seeds, finished; BN seed 2 also has a kernels.json (to damage it)."""
    for seed in range(3):
        for norm, accuracies in (("bn", BN), ("bnet", BNET)):
            run_dir = _write_run(out, accuracies[seed], seed=seed, norm=norm)
            if norm == "bn" and seed == 2:
                (run_dir / "kernels.json").write_text(json.dumps(KERNELS))
            if recorded:
                _finish(run_dir)
    return out / RunConfig(arch="xmininet", dataset="sample", size=32, epochs=3, seed=2).run_id


DAMAGES = {  # how a finished run is damaged later -> the file its reason must name
    "history cut mid-row": (lambda d: _cut(d / "history.csv"), "history.csv"),
    "history emptied": (lambda d: (d / "history.csv").write_text(""), "history.csv"),
    "history deleted": (lambda d: (d / "history.csv").unlink(), "history.csv"),
    "config truncated": (lambda d: _cut(d / "config.json", 40), "config.json"),
    "kernels truncated": (lambda d: _cut(d / "kernels.json", 5), "kernels.json"),
    "status.json {}": (lambda d: (d / "status.json").write_text("{}"), "status.json"),
}


@pytest.mark.parametrize("recorded", [True, False], ids=["recorded", "old format"])
@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_run_is_left_out_with_the_file_named_and_never_counted(tmp_path, damage, recorded):
    damaged = _experiment(tmp_path, recorded)
    assert check_run(damaged) is None
    assert report(tmp_path, target=0.8)["summary"].set_index("variant").loc["bn", "n_seeds"] == 3
    change, name = DAMAGES[damage]
    change(damaged)
    reason = check_run(damaged)
    assert reason.startswith(f"{name}: ") and "\n" not in reason
    skipped = load_runs(tmp_path).skipped
    assert skipped.to_dict("records") == [{"run_id": damaged.name, "status": "damaged", "reason": reason,
                                           "folder": str(tmp_path)}]
    tables = report(tmp_path, target=0.8)  # no parser error: the damaged run is simply not there
    bn = tables["summary"].set_index("variant").loc["bn"]
    assert bn["n_seeds"] == 2 and bn["seeds"] == "0,1"
    assert bn["final_accuracy_mean"] == pytest.approx((0.8 + 0.9) / 2)  # seeds 0 and 1 only, not seed 2's 0.7
    assert tables["paired"].iloc[0]["n_pairs"] == 2
    assert tables["summary"].set_index("variant").loc["bnet-k3-all", "n_seeds"] == 3


def test_reasons_say_what_is_wrong(tmp_path):
    damaged = _experiment(tmp_path, recorded=True)
    size = (damaged / "history.csv").stat().st_size
    _cut(damaged / "history.csv")
    assert check_run(damaged) == f"history.csv: size {size - 7}, expected {size}"
    old = _experiment(tmp_path / "old", recorded=False)
    _cut(old / "history.csv")
    assert check_run(old) == "history.csv: last row cut short (no line end)"
    (old / "history.csv").write_text("epoch,train_loss,valid_loss,accuracy,time\n0,1.0,0.5,0.5,00:10\n")
    assert check_run(old) == "history.csv: 1 complete rows, expected 3"
    (old / "history.csv").write_text("epoch,train_loss,valid_loss,accuracy,time\n0,1.0,nan,0.5,00:10\n")
    assert check_run(old) == "history.csv: row 1 has a number that is not finite"
    (old / "config.json").write_text('{"config": {"arch": "xmininet"')
    assert check_run(old) == "config.json: not valid JSON"
    (old / "status.json").write_text("{}")
    assert raw_status(old) == read_status(old) == {"status": "damaged", "reason": "status.json: no status entry"}


def test_an_old_format_run_with_a_complete_history_is_reused_and_reported(tmp_path):
    _experiment(tmp_path, recorded=False)
    config = RunConfig(arch="xmininet", dataset="sample", size=32, epochs=3, seed=1, norm="bnet")
    result = run(config, tmp_path)  # no data, no training: the hand-made run is reused as it is
    assert result["reused"] is True and "files" not in result and result["status"] == "finished"
    assert load_runs(tmp_path).skipped.empty
    assert report(tmp_path, target=0.8)["summary"].set_index("variant").loc["bn", "n_seeds"] == 3


def test_a_real_finish_records_its_files_and_a_sweep_retrains_a_damaged_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("BNET_FASTAI_DATA", str(tmp_path / "data"))
    out = tmp_path / "exp"
    first = run(REAL, out)
    run_dir = Path(first["run_dir"])
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "finished" and status["history_rows"] == status["epochs_done"] == 2
    assert sorted(status["files"]) == ["config.json", "history.csv", "kernels.json", "model.pth"]
    for name, record in status["files"].items():
        data = (run_dir / name).read_bytes()
        assert record == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert check_run(run_dir) is None
    weights = (run_dir / "model.pth").read_bytes()
    (run_dir / "model.pth").write_bytes(weights[:-1] + bytes([weights[-1] ^ 1]))  # altered: not trusted
    assert check_run(run_dir) == "model.pth: sha256 differs from the one recorded when the run finished"
    (run_dir / "model.pth").unlink()  # deleted to save disk: the results stand
    assert check_run(run_dir) is None
    history = (run_dir / "history.csv").read_bytes()
    assert len(history.decode().splitlines()) == 1 + 2

    _cut(run_dir / "history.csv")
    capsys.readouterr()
    results = sweep(REAL, {}, out, live=None)
    lines = capsys.readouterr().out.splitlines()
    expected = f"[1/1] {REAL.run_id}: damaged (history.csv: size {len(history) - 7}, expected {len(history)}): " \
               "training it again"
    assert expected in lines
    again = json.loads((run_dir / "status.json").read_text())
    assert results[0]["status"] == "finished" and results[0]["reused"] is False
    assert results[0]["damaged"] == f"history.csv: size {len(history) - 7}, expected {len(history)}"
    assert again["status"] == "finished" and again["time"] > status["time"]  # trained again, not reused
    assert check_run(run_dir) is None and len((run_dir / "history.csv").read_text().splitlines()) == 1 + 2

    # the same files under a status written before the record existed: checked by parsing, reused
    old = {k: v for k, v in again.items() if k not in ("files", "history_rows")}
    (run_dir / "status.json").write_text(json.dumps(old))
    assert run(REAL, out)["reused"] is True
    assert sweep(REAL, {}, out, live=None)[0]["reused"] is True


def test_default_out_is_under_bnet_fastai_results(tmp_path, monkeypatch):
    monkeypatch.setenv("BNET_FASTAI_RESULTS", str(tmp_path / "res"))
    parser = cli.build_parser()
    for command in ("run", "sweep"):
        assert cli.output_folder(parser.parse_args([command])) == str(tmp_path / "res" / "default")
        assert cli.output_folder(parser.parse_args([command, "--out", "elsewhere"])) == "elsewhere"
    seen = {}
    monkeypatch.setattr("bnet_fastai.runs.train.run", lambda config, out, force: seen.update(out=out) or
                        {"status": "finished", "run_dir": str(Path(out) / config.run_id)})
    assert cli.main(["run", "--arch", "xmininet"]) == 0 and seen["out"] == str(tmp_path / "res" / "default")


def test_report_of_a_folder_whose_runs_all_failed_names_each_reason(tmp_path, capsys):
    _write_run(tmp_path, [0.1], seed=0, norm="bn", status="failed")
    damaged = _finish(_write_run(tmp_path, [0.5, 0.6, 0.7], seed=1, norm="bn"))
    (damaged / "history.csv").write_text("")
    assert cli.main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"bnet-fastai report: error: no finished run in {tmp_path}"
    failed = RunConfig(arch="xmininet", dataset="sample", size=32, epochs=3).run_id
    assert sorted(err[1:]) == sorted([f"  {failed}: failed: RuntimeError: out of memory",
                                      f"  {damaged.name}: damaged: {check_run(damaged)}"])
    assert check_run(damaged).startswith("history.csv: size 0, expected ")


def test_combined_folders_use_the_intact_copy_of_a_run_found_twice(tmp_path):
    damaged = _experiment(tmp_path / "a", recorded=True)
    _cut(damaged / "history.csv")
    intact = _finish(_write_run(tmp_path / "b", BN[2], seed=2, norm="bn"))
    assert intact.name == damaged.name
    tables = report([tmp_path / "a", tmp_path / "b"], target=0.8, out=tmp_path / "combined")
    # the copy not counted is named, never dropped without a word
    assert list(tables["skipped"]["status"]) == ["copy"]
    assert tables["skipped"]["reason"].iloc[0].startswith(f"the same run as {intact}, which is counted")
    bn = tables["summary"].set_index("variant").loc["bn"]
    assert bn["n_seeds"] == 3 and bn["final_accuracy_mean"] == pytest.approx(0.8)
