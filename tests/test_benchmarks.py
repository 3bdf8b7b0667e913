"""The benchmark scripts and the prepared GPU script run, and write the JSON a script can read."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.stats

from .helpers import CPU_IMPL

ROOT = Path(__file__).resolve().parents[1]


def _bench(script: str, *args: str, tmp_path: Path) -> dict:
    path = tmp_path / f"{script}.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{script}.py"), *args, "--json", str(path)],
                          capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr[-2000:]
    saved = json.loads(path.read_text())
    assert saved["benchmark"] == script and saved["command"].startswith(f"python benchmarks/{script}.py")
    assert "no GPU" in saved["machine"]
    return saved


def test_train_step_json_rows_and_ratios(tmp_path):
    saved = _bench("train_step", "--archs", "xmininet", "--size", "16", "--bs", "4", "--rounds", "1",
                   "--formats", "channels_last", "--variants", "bnet-k3-all,bnet-k3-all-composed", tmp_path=tmp_path)
    rows = {r["variant"]: r for r in saved["rows"]}
    assert set(rows) == {"bn", "bnet-k3-all", "bnet-k3-all-composed"} and saved["precision"] == "float32" and saved["device"] == "cpu"
    assert rows["bn"]["ratio_to_bn"] == 1.0
    assert rows["bnet-k3-all"]["ratio_to_bn"] == pytest.approx(rows["bnet-k3-all"]["ms_per_step"]
                                                             / rows["bn"]["ms_per_step"])
    assert rows["bn"]["images_per_second"] == pytest.approx(4 / rows["bn"]["ms_per_step"] * 1e3)


def test_train_step_times_any_named_variant_with_the_runs_adam(tmp_path):
    saved = _bench("train_step", "--archs", "xmininet", "--size", "16", "--bs", "4", "--rounds", "1",
                   "--formats", "channels_last", "--opt", "adam", "--variants", "bnet-k5-last,bnet-k1-all",
                   tmp_path=tmp_path)
    assert [r["variant"] for r in saved["rows"]] == ["bn", "bnet-k5-last", "bnet-k1-all"]
    assert saved["optimizer"] == "adam" and "fastai Adam step" in saved["measure"]
    assert all(r["ratio_to_bn"] > 0 and r["format"] == "channels_last" for r in saved["rows"])


def test_training_step_adam_is_fastais_adam_with_the_runs_no_decay_rule():
    import torch

    from bnet_fastai import create_model
    from bnet_fastai.nn.weight_decay import no_decay_params
    from bnet_fastai.speed import training_step

    model = create_model("xmininet", "bnet", k=1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    no_decay = {id(p) for p in no_decay_params(model)}
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    step = training_step(model, x, y, opt="adam", no_decay=no_decay_params(model))
    assert torch.isfinite(step())
    # a zero-initialised last kernel cuts its block's gradient: there a decayed conv only shrinks by 1 - lr x wd
    # (lr 1e-3, wd 1e-2) and an undecayed norm parameter stays as it was
    still = [(n, p) for n, p in model.named_parameters() if not p.grad.any()]
    assert still and len(still) < len(before)
    for name, p in still:
        expected = before[name] if id(p) in no_decay else before[name] * (1 - 1e-3 * 1e-2)
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-9)
    assert {id(p) for _, p in still} & no_decay and {id(p) for _, p in still} - no_decay
    # every parameter with a gradient moved
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters() if p.grad.any())
    with pytest.raises(ValueError, match="unknown optimizer 'lamb'; valid choices: sgd, adam"):
        training_step(model, x, y, opt="lamb")


def test_inference_json_has_the_deploy_vs_deploy_row(tmp_path):
    saved = _bench("eval_and_memory", "--archs", "xmininet", "--size", "16", "--bs", "4", "--rounds", "1",
                   tmp_path=tmp_path)
    rows = {r["model"]: r for r in saved["rows"]}
    cpp = ["bnet cpp"] if CPU_IMPL == "cpp" else []  # the C++ kernels' row where they run
    assert list(rows) == ["bn", "bn folded", "bnet unfused", "bnet fused", *cpp]
    fused, folded, bn = rows["bnet fused"], rows["bn folded"], rows["bn"]
    for name in cpp:
        assert rows[name]["ratio_to_bn"] == pytest.approx(rows[name]["ms_per_batch"] / bn["ms_per_batch"])
    assert fused["ratio_to_bn_folded"] == pytest.approx(fused["ms_per_batch"] / folded["ms_per_batch"])
    assert fused["ratio_to_bn"] == pytest.approx(fused["ms_per_batch"] / bn["ms_per_batch"])
    assert [m["model"] for m in saved["memory"]] == ["bn", "bnet composed", "bnet one-map", *cpp]
    (base, composed, one_map, *kernels) = saved["memory"]
    assert all(k["saved_ratio_to_bn"] <= 1.05 for k in kernels)  # the C++ kernels keep x and two vectors, as BN
    # a step this small may fit in what the process holds: then no ratio, never a division by zero
    assert one_map["ratio_to_bn"] == (pytest.approx(one_map["mib"] / base["mib"]) if base["mib"] >= 1.0 else None)
    # the saved activations are exact: the composed path keeps two maps per BNET, one-map one, as BN
    assert one_map["saved_ratio_to_bn"] == pytest.approx(one_map["saved_mib"] / base["saved_mib"])
    assert one_map["saved_ratio_to_bn"] <= 1.05 and composed["saved_ratio_to_bn"] >= 1.3


def test_layer_json_times_bn_the_torch_path_and_the_kernels_per_map(tmp_path):
    saved = _bench("bnet_layer", "--maps", "4x8x5x5,2x16x1x1", "--k", "1,3", "--rounds", "1", tmp_path=tmp_path)
    assert [(r["map"], r["k"]) for r in saved["rows"]] == [("4x8x5x5", 1), ("4x8x5x5", 3), ("2x16x1x1", 1),
                                                            ("2x16x1x1", 3)]
    for r in saved["rows"]:
        for impl in ("torch", "cpp") if CPU_IMPL == "cpp" else ("torch",):
            assert r[f"{impl}_train_ratio"] == pytest.approx(r[f"{impl}_train_ms"] / r["bn_train_ms"])
            assert r[f"{impl}_eval_ratio"] == pytest.approx(r[f"{impl}_eval_ms"] / r["bn_eval_ms"])


def test_train_step_blocks_give_each_ratio_its_interval(tmp_path):
    saved = _bench("train_step", "--archs", "xmininet", "--size", "16", "--bs", "4", "--rounds", "1", "--blocks",
                   "3", "--formats", "channels_last", "--opt", "adam", "--variants", "bnet-k3-all,bnet-k3-all-torch",
                   tmp_path=tmp_path)
    assert saved["blocks"] == 3 and "geometric mean of the blocks' ratios" in saved["measure"]
    for row in saved["rows"][1:]:
        ratios = np.asarray(row["block_ratios"])
        assert len(ratios) == 3
        assert row["ratio_to_bn"] == pytest.approx(float(np.exp(np.log(ratios).mean())))
        half = scipy.stats.t.ppf(0.975, 2) * np.log(ratios).std(ddof=1) / np.sqrt(3)
        assert row["ratio_low"] == pytest.approx(row["ratio_to_bn"] * np.exp(-half))
        assert row["ratio_high"] == pytest.approx(row["ratio_to_bn"] * np.exp(half))


@pytest.mark.slow
def test_data_pipeline_and_cli_latency_json(tmp_path):
    saved = _bench("data_pipeline", "--images", "40", "--size", "32", "--bs", "8", "--epochs", "1",
                   "--workers", "0", tmp_path=tmp_path)
    assert [r["pipeline"] for r in saved["rows"]] == ["fastai", "cached"]
    assert saved["rows"][1]["ratio_to_fastai"] == pytest.approx(saved["rows"][1]["images_per_second"]
                                                               / saved["rows"][0]["images_per_second"])
    saved = _bench("cli_latency", "--rounds", "1", tmp_path=tmp_path)
    assert {r["command"] for r in saved["rows"]} >= {"bnet-fastai --help", "import torch + fastai"}


@pytest.mark.slow
def test_gpu_check_dry_run_checks_every_step_and_installs_nothing(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "out"), "WORK": str(tmp_path / "work"), "PYTHON": sys.executable,
           "GPU_KIT": str(tmp_path / "no-kit")}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run"], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "run `python benchmarks/gpu_kit.py prepare`" in proc.stderr  # no kit here: the install is skipped
    rows = [line.split("\t") for line in (tmp_path / "out" / "steps.tsv").read_text().splitlines()]
    assert rows[0] == ["step", "status", "seconds", "cap"]
    assert [r[:2] for r in rows[1:]] == [[s, "dry-run ok"] for s in
                                         ("check", "cuda-tests", "train-step", "inference", "data", "study", "report")]
    assert sum(int(r[3]) for r in rows[1:]) <= 480  # the caps: at most 8 minutes
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["gpu_check.log", "steps.tsv"]
    assert not (tmp_path / "work" / "site").exists()


def test_gpu_check_refuses_without_its_repository_and_unknown_options(tmp_path):
    (tmp_path / "benchmarks").mkdir()
    script = shutil.copy(ROOT / "benchmarks" / "gpu_check.sh", tmp_path / "benchmarks")
    env = {**os.environ, "OUT": str(tmp_path / "out"), "WORK": str(tmp_path / "work")}
    proc = subprocess.run(["bash", script, "--dry-run"], capture_output=True, text=True, env=env)
    assert proc.returncode == 2 and proc.stderr.strip() == f"gpu_check.sh: {tmp_path}/bnet_fastai/app/cli.py is missing"
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--fast"], capture_output=True,
                          text=True, env=env)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "gpu_check.sh: unknown option --fast (valid: --dry-run, --help)"


def test_gpu_kit_lists_what_fastai_and_kornia_need_beyond_a_gpu_image():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_kit
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    wanted = gpu_kit.closure()
    assert {"fastai", "fastcore", "fastprogress", "fasttransform", "kornia", "kornia-rs"} <= set(wanted)
    assert not set(wanted) & (gpu_kit.PRESENT | {"torch", "spacy"})  # what the GPU image has, or fastai.text
    assert gpu_kit.wheel_distribution(Path("kornia_rs-0.2.0-cp312-cp312-manylinux2014_x86_64.whl")) == "kornia-rs"


@pytest.mark.parametrize("load,spreads,warns", [
    (0.2, [0.01, 0.08], False), (1.0, [0.25], False),  # at the thresholds: 0.5 per core, rounds 25% apart
    (1.01, [0.01], True), (0.2, [0.02, 0.26], True), (4.6, [0.9], True), (0.0, [], False)])
def test_a_loaded_machine_is_named_by_its_load_and_the_spread_of_rounds(load, spreads, warns):
    from bnet_fastai.speed import load_warning, quiet_line

    line = load_warning(load, 2, spreads)
    assert bool(line) == warns
    if warns:
        assert line.startswith("WARNING: the machine was not quiet (") and "not to be trusted" in line
        assert (f"load average {load:.2f} on 2 cores" in line) == (load > 1.0)
        assert (f"rounds {100 * max(spreads):.0f}% apart" in line) == (max(spreads) > 0.25)
    else:
        assert quiet_line(load, 2, spreads).startswith(f"machine quiet: load average {load:.2f} on 2 cores")


def test_train_step_says_whether_the_machine_was_quiet(tmp_path):
    """The 2,361 ms BN step of a loaded machine was printed without a word: the last line now says which."""
    from bnet_fastai.speed import load_warning

    before = os.getloadavg()[0]
    saved = _bench("train_step", "--archs", "xmininet", "--size", "16", "--bs", "4", "--rounds", "3",
                   "--formats", "nchw", "--variants", "bnet-k3-all", tmp_path=tmp_path)
    assert saved["load_before"] >= 0 and saved["max_round_spread"] >= 0
    assert saved["quiet"] == (load_warning(saved["load_before"], os.cpu_count(), [saved["max_round_spread"]]) == "")
    if before > 0.5 * os.cpu_count() * 1.5:  # a machine this busy before the script started stays busy in it
        assert saved["quiet"] is False
