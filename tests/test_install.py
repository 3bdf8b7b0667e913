"""The front door: `pip install .` (the core) holds the layers, the conversions and fastai training; the
notebooks, TensorBoard, the leaderboard's pooling, Ray and ONNX are extras, and a missing one is one line naming it.

The core's behaviour is tested in a fresh interpreter in which every extra's modules are hidden (importing one
raises ImportError, as in an environment without it): the same code paths a core install runs."""
import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from .helpers import CPU_IMPL

ROOT = Path(__file__).resolve().parents[1]
# each extra and the top-level modules its packages install
EXTRA_MODULES = {"lab": ["papermill", "nbconvert", "ipykernel", "ipywidgets", "jupyterlab"],
                 "tensorboard": ["tensorboard"], "leaderboard": ["kornia"], "ray": ["ray"],
                 "onnx": ["onnx", "onnxscript", "onnxruntime"]}


def _name(requirement: str) -> str:
    return requirement.split("[")[0].split(">")[0].split("=")[0].split("<")[0].strip().lower()


def test_the_core_holds_no_extra_and_dev_holds_them_all():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {_name(r) for r in project["dependencies"]}
    extras = project["optional-dependencies"]
    assert {"fastai", "timm"} <= core
    for extra, modules in EXTRA_MODULES.items():
        packages = {_name(r) for r in extras[extra]}
        assert packages and not packages & core, extra
    assert extras["all"] == [f"bnet-fastai[{','.join(EXTRA_MODULES)}]"] and "bnet-fastai[all]" in extras["dev"]


CORE_SESSION = '''
import sys
for name in {hidden!r}:
    sys.modules[name] = None  # as if not installed: importing it raises ImportError
import json, timm, torch
from bnet_fastai import BNET2d, count_norms, create_model, swap_norm
from bnet_fastai.runs.config import RunConfig
from bnet_fastai.runs.train import run

out = {{"layer": list(BNET2d(8)(torch.randn(2, 8, 5, 5)).shape)}}
out["converted"] = count_norms(swap_norm(timm.create_model("resnet18"), "bnet"))
config = RunConfig(arch="xmininet", norm="bnet", dataset="sample", epochs=1, size=16, fraction=0.2, workers=0)
result = run(config, sys.argv[1])
out["status"] = result["status"]
out["impls"] = result.get("bnet_impls_used")  # the C++ kernels, built from the installed package's source
out["files"] = sorted(p.name for p in (__import__("pathlib").Path(sys.argv[1]) / config.run_id).iterdir())
errors = []
try:
    from bnet_fastai.app.notebooks import execute
    execute("experiments", {{}}, sys.argv[1])
except ValueError as e:
    errors.append(str(e))
try:
    create_model("xmininet", pool="maxblur")
except ValueError as e:
    errors.append(str(e))
out["errors"] = errors
print("RESULT" + json.dumps(out))
'''


def test_without_the_extras_the_layers_convert_and_train_and_the_notebook_names_its_extra(tmp_path):
    hidden = [m for modules in EXTRA_MODULES.values() for m in modules]
    code = CORE_SESSION.format(hidden=hidden)
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "out")], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "BNET_FASTAI_DATA": str(tmp_path / "data")})
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.split("RESULT", 1)[1])
    assert out["layer"] == [2, 8, 5, 5] and out["converted"] == {"bn": 0, "bnet": 20}
    assert out["status"] == "finished" and "history.csv" in out["files"] and "model.pth" in out["files"]
    assert out["impls"] == [CPU_IMPL]
    assert not any(f.startswith("events.out.tfevents") for f in out["files"])
    assert done.stderr.count("TensorBoard is not installed: runs write no event files") == 1
    assert out["errors"] == [
        "executing the notebooks (make experiments) needs papermill, which is not installed: "
        "pip install 'bnet-fastai[lab]' (from a checkout: pip install '.[lab]')",
        "pool='maxblur' (the leaderboard recipe) needs kornia, which is not installed: "
        "pip install 'bnet-fastai[leaderboard]' (from a checkout: pip install '.[leaderboard]')"]


@pytest.mark.slow
def test_a_fresh_venv_with_the_core_install_trains_and_names_the_notebook_extra(tmp_path):
    """`pip install .` into a new virtual environment (pip resolves torch and torchvision through fastai, from
    its cache where warm: about 1.5 min and 6 GB here), then the layers, a conversion, one fastai epoch on the
    sample digits, and the notebooks' one-line refusal naming [lab]."""
    free = shutil.disk_usage(tmp_path).free / 2**30
    if free < 12:
        pytest.skip(f"a fresh environment needs about 6 GB on {tmp_path}'s disk; {free:.1f} GB free")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", str(ROOT)], check=True, timeout=1800,
                   capture_output=True)
    installed = subprocess.run([str(python), "-m", "pip", "list", "--format", "json"], check=True,
                               capture_output=True, text=True).stdout
    names = {p["name"].lower() for p in json.loads(installed)}
    assert {"bnet-fastai", "fastai", "timm", "torch"} <= names
    assert not names & {m for modules in EXTRA_MODULES.values() for m in modules}  # no extra came in
    env = {**os.environ, "BNET_FASTAI_DATA": str(tmp_path / "data")}
    done = subprocess.run([str(python), "-c", CORE_SESSION.format(hidden=[]), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.split("RESULT", 1)[1])
    assert out["converted"] == {"bn": 0, "bnet": 20} and out["status"] == "finished"
    assert out["impls"] == [CPU_IMPL]  # the installed package ships the kernels' source (package data)
    assert out["errors"][0].endswith("pip install 'bnet-fastai[lab]' (from a checkout: pip install '.[lab]')")
    # where files go outside a checkout: fastai's data folder (its config.ini, FASTAI_HOME), results where one works
    home, work = tmp_path / "fastai-home", tmp_path / "work"
    home.mkdir(), work.mkdir()
    (home / "config.ini").write_text(f"[DEFAULT]\ndata = {tmp_path / 'fastai-data'}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("BNET_FASTAI_")} | {"FASTAI_HOME": str(home)}
    cli = venv / "bin" / "bnet-fastai"
    done = subprocess.run([str(cli), "data", "sample"], capture_output=True, text=True, env=env, cwd=work, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().startswith(str(tmp_path / "fastai-data")), done.stderr
    shown = subprocess.run([str(cli), "--help"], capture_output=True, text=True, env=env, cwd=work).stdout
    assert f"results:{work / 'results'}" in "".join(shown.split())
