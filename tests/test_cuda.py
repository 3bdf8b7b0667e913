"""The CUDA path, on the GPU: `pytest -m cuda` (skipped, with the reason, where torch sees no GPU).

Every test runs the code a user runs (`run()`, `fuse_bnet`, the --parallel workers) on each device: on the
CPU in the default suite, on the GPU under the `cuda` mark, so the CPU run checks the tests themselves.
"""
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from fastai.callback.core import Callback

from bnet_fastai import create_model, fuse_bnet
from bnet_fastai.runs.checkpoint import CHECKPOINT, Resume
from bnet_fastai.runs.config import RunConfig, expand_grid
from bnet_fastai.sweeps import executors
from bnet_fastai.sweeps.executors import ProcessPool, visible_gpus
from bnet_fastai.app.preflight import FUSE_TOLERANCE, _Interrupt, _InterruptAfter, on_device
from bnet_fastai.runs.train import run
from tests.helpers import perturb_bnets, warm_running_stats

NO_GPU = (f"needs a CUDA GPU: torch {torch.__version__} (CUDA {torch.version.cuda}) sees none; "
          f"run `pytest -m cuda` on a GPU machine")
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda,
                                              pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU)])]
RUN = dict(arch="xmininet", norm="bnet", dataset="sample", size=32, bs=64, epochs=2, lr=1e-2, fraction=0.5)


@pytest.fixture
def on(tmp_path):
    """Train on the test's device, with the data and its cache under tmp_path."""
    def enter(device: str):
        return on_device(torch.device(device), tmp_path)
    return enter


@pytest.mark.parametrize("device", DEVICES)
def test_a_bnet_run_trains_on_the_device_in_mixed_precision_there(device, tmp_path, on):
    with on(device):
        result = run(RunConfig(**RUN), tmp_path / "runs")
    run_dir = Path(result["run_dir"])
    saved = json.loads((run_dir / "config.json").read_text())
    history = pd.read_csv(run_dir / "history.csv")
    assert result["status"] == "finished" and len(history) == 2
    assert saved["training"]["device"].startswith(device)  # the loaders, and so the model, were there
    assert saved["training"]["fp16"] is (device == "cuda")  # fp16 "auto": on a GPU only
    assert np.isfinite(history[["train_loss", "valid_loss", "accuracy"]].to_numpy(float)).all()
    assert history["accuracy"].iloc[-1] > 0.3  # 10 classes
    weights = torch.load(run_dir / "model.pth")
    assert all(torch.isfinite(v.float()).all() for v in weights.values())


class _Probe(Callback):
    """Where the resumed optimizer state lives and the GradScaler's scale, as the first resumed epoch trains."""

    order = Resume.order + 1

    def before_train(self) -> None:
        if hasattr(self, "scale"):
            return
        states = [(p.device, v.device) for p, *_ in self.opt.all_params() for v in self.opt.state[p].values()
                  if torch.is_tensor(v)]
        self.n_states, self.misplaced = len(states), [s for s in states if s[0] != s[1]]
        self.param_device = next(self.model.parameters()).device
        scaler = getattr(self.learn, "scaler", None)
        self.scale = scaler.get_scale() if scaler is not None else None


@pytest.mark.parametrize("device", DEVICES)
def test_a_run_resumed_on_the_device_keeps_its_optimizer_state_scaler_and_history(device, tmp_path, on):
    config = RunConfig(**{**RUN, "epochs": 3})
    with on(device):
        with pytest.raises(_Interrupt):
            run(config, tmp_path / "runs", cbs=[_InterruptAfter(1)])
        run_dir = tmp_path / "runs" / config.run_id
        first = (run_dir / "history.csv").read_text()
        saved = torch.load(run_dir / CHECKPOINT, weights_only=False)
        probe = _Probe()
        result = run(config, tmp_path / "runs", cbs=[probe])
    assert result["status"] == "finished" and result["resumed_from_epoch"] == 1 and result["epochs_done"] == 3
    assert probe.param_device.type == device
    assert probe.n_states > 0 and probe.misplaced == []  # Adam's moments moved to the parameters' device
    if device == "cuda":
        assert saved["scaler"] is not None and probe.scale == saved["scaler"]["scale"]
    else:
        assert saved["scaler"] is None and probe.scale is None  # float32 on a CPU: no scaler
    history = (run_dir / "history.csv").read_text()
    assert history.startswith(first) and len(history.splitlines()) == 4  # header + the kept row + 2 new


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("arch", ["xmininet", "mininest"])  # conv->BNET folding; ResNeSt's 1x1 attention maps
def test_fused_bnet_equals_the_model_on_the_device(device, dtype, arch):
    model = warm_running_stats(perturb_bnets(create_model(arch, "bnet"))).eval()
    model = model.to(device, memory_format=torch.channels_last)
    fused = fuse_bnet(model)
    x = torch.randn(8, 3, 32, 32).to(device)
    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    with torch.no_grad(), torch.autocast(device, dtype=torch_dtype, enabled=dtype != "fp32"):
        ref, got = model(x), fused(x)
    assert got.dtype == ref.dtype
    error = float((got.float() - ref.float()).abs().max() / ref.float().abs().max())
    assert error <= FUSE_TOLERANCE[dtype], error


@pytest.mark.parametrize("device", DEVICES)
def test_channels_last_bnet_gradients_equal_nchw(device, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # compare the kernels, not TF32 rounding
    base = perturb_bnets(create_model("xmininet", "bnet")).to(device)
    nchw, last = base, create_model("xmininet", "bnet").to(device, memory_format=torch.channels_last)
    last.load_state_dict(base.state_dict())
    x = torch.randn(4, 3, 32, 32, device=device)
    y = torch.tensor([0, 1, 2, 3], device=device)
    for model, inputs in ((nchw, x), (last, x.to(memory_format=torch.channels_last))):
        torch.nn.functional.cross_entropy(model.train()(inputs), y).backward()
    compared = 0
    for (name, a), b in zip(nchw.named_parameters(), last.parameters()):
        assert a.grad is not None and b.grad is not None, name
        scale = float(a.grad.abs().max()) or 1.0
        assert float((a.grad - b.grad).abs().max()) <= 1e-4 * scale, name
        compared += "weight" in name and a.dim() == 4 and a.shape[1] == 1  # the BNET kernels among them
    assert compared == 15


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_each_parallel_worker_sees_its_one_gpu(device, tmp_path, on, monkeypatch):
    configs = expand_grid(RunConfig(**{**RUN, "epochs": 1, "size": 16, "fraction": 0.2}), {"seed": [0, 1]})
    if device == "cpu":  # on a GPU machine too: workers that are handed no GPU and see none
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
        monkeypatch.setattr(executors, "visible_gpus", lambda: [])
    with on(device):
        with ProcessPool(2) as pool:
            results = [result for _, result in pool.map(configs, str(tmp_path / "runs"))]
    assert [r["status"] for r in results] == ["finished", "finished"]
    seen = [json.loads((Path(r["run_dir"]) / "config.json").read_text()) for r in results]
    if device == "cuda":
        gpus = visible_gpus()
        assert [s["environment"]["gpus_visible"] for s in seen] == [1, 1]
        assert {s["environment"]["cuda_visible_devices"] for s in seen} <= set(gpus)
        assert all(s["training"]["device"] == "cuda:0" for s in seen)  # its one GPU, as cuda:0
    else:
        assert [s["environment"]["gpus_visible"] for s in seen] == [0, 0]
        assert all(s["training"]["device"] == "cpu" for s in seen)
