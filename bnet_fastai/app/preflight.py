"""`bnet-fastai check`: a preflight of the real training path on this machine, before a long study.

Run it first on a machine you rent for a study: in 25 s on this project's 2-core CPU (`MEASURED`) it trains
through the same `run()` a study uses, with that device's real settings (mixed precision on a GPU,
channels_last, the cached pipeline, the default DataLoader workers), on the embedded `sample` digits in a
temporary folder, and prints one line per check: its name, pass / fail / skip, and what it measured.

- ``device``: the device, a matrix product on it against float64 on the CPU, and the versions of torch,
  CUDA, cuDNN, fastai and timm.
- ``run-bn``, ``run-bnet``: a short BN and BNET run: finite losses, a history row per epoch, ``status.json``
  finished, ``model.pth`` written, and accuracy well above chance (`MIN_ACCURACY`; 10 classes).
- ``resume``: the BNET run again, interrupted after its first epoch (as Ctrl-C interrupts it), then run
  again: it resumes from its checkpoint and ends with every epoch; its history is compared with the
  uninterrupted run's (equal on a CPU; on a GPU nondeterministic kernels may differ slightly).
- ``reload``: `load_model` of the BNET run, on the device in the run's memory format and precision,
  reproduces the logged accuracy (within one validation image).
- ``fuse-fp32``, ``fuse-fp16``, ``fuse-bf16``: `fuse_bnet` of the trained model against the model on the
  device, in float32 and under autocast in float16 and bfloat16: max |fused - model| / max |model| of the
  logits within `FUSE_TOLERANCE` (float32 on a GPU: cuDNN's TF32 convolutions round to 10 mantissa bits).
- ``speed``: BNET/BN training-step time and images/second, timed side by side (`bnet_fastai.speed`) with
  the runs' settings: xresnet50 at 128 px, batch 64, mixed precision on a GPU; xmininet at 64 px, batch 32,
  float32 on a CPU.
- ``ddp``: with two GPUs or more, a 2-process run launched by ``torch.distributed.run`` (NCCL): finished,
  world size 2 in its config.json; a failed launch is named by its cause (`bnet_fastai.app.ddp_check`).
  Skipped with fewer.

`preflight` returns the results; the command exits 0 when none failed, 1 naming the failed ones.
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from fastai.callback.core import Callback
from fastai.torch_core import defaults

from bnet_fastai.runs.checkpoint import EpochCheckpoint, load_model, one_line
from bnet_fastai.runs.config import RunConfig
from bnet_fastai.nn.fuse import fuse_bnet
from bnet_fastai.nn.layers import impls_used
from bnet_fastai.nn.models import create_model
from bnet_fastai.speed import amp_dtype, interleaved, training_step
from bnet_fastai.runs.learner import build_learner, validation_accuracy
from bnet_fastai.runs.train import run
from bnet_fastai.app.check_result import RUN, Result
from bnet_fastai.app.ddp_check import check_ddp

CHECKS = ("device", "run-bn", "run-bnet", "resume", "reload", "fuse-fp32", "fuse-fp16", "fuse-bf16", "speed",
          "ddp")
MIN_ACCURACY = 0.5  # 10 classes: chance is 0.1; a CPU run reaches about 0.9
FUSE_TOLERANCE = {"fp32": 1e-3, "fp16": 1e-2, "bf16": 5e-2}  # relative to the logits' largest magnitude
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SPEED = {"cuda": ("xresnet50", 128, 64, 20), "cpu": ("xmininet", 64, 32, 5)}  # arch, size, batch, rounds


def resolve_device(spec: str = "auto") -> torch.device:
    """`auto` (the GPU when torch sees one), `cpu`, `cuda` or `cuda:N`; ValueError, one line, otherwise or
    when torch sees no such GPU."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ValueError(f"--device {spec!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {spec!r}: expected auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"--device {spec}: torch {torch.__version__} sees no CUDA device (built for CUDA "
                             f"{torch.version.cuda}); check nvidia-smi and CUDA_VISIBLE_DEVICES, or use --device cpu")
        if (device.index or 0) >= count:
            raise ValueError(f"--device {spec}: torch sees {count} CUDA device(s), cuda:0 .. cuda:{count - 1}")
        device = torch.device("cuda", device.index or 0)
    return device


@contextlib.contextmanager
def _environ(**values: str) -> Iterator[None]:
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def on_device(device: torch.device, folder: Path) -> Iterator[None]:
    """Runs in this block train on `device` (fastai's default device) with their data and its cache in
    `folder`: nothing outside it is written."""
    use_cuda = defaults.use_cuda
    defaults.use_cuda = device.type == "cuda"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    try:
        with _environ(BNET_FASTAI_DATA=str(folder / "data"), BNET_FASTAI_CACHE=str(folder / "cache")):
            yield
    finally:
        defaults.use_cuda = use_cuda


def _versions() -> dict:
    import fastai
    import timm

    return {"torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
            "fastai": fastai.__version__, "timm": timm.__version__, "python": platform.python_version()}


def check_device(device: torch.device) -> Result:
    x = torch.randn(512, 512, generator=torch.Generator().manual_seed(0))
    error = float(((x.to(device) @ x.to(device)).cpu().double() - x.double() @ x.double()).abs().max()
                  / (x.double() @ x.double()).abs().max())
    versions = _versions()
    name = (f"{device} {torch.cuda.get_device_name(device)} ({torch.cuda.device_count()} visible)"
            if device.type == "cuda" else f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)")
    measured = (f"{name}; torch {versions['torch']}, CUDA {versions['cuda']}, cuDNN {versions['cudnn']}, "
                f"fastai {versions['fastai']}, timm {versions['timm']}; matmul rel. error {error:.1e}")
    return Result("device", "pass" if error < 1e-3 else "fail", measured,
                  {"device": name, **versions, "matmul_relative_error": error})


def _history(run_dir: Path) -> pd.DataFrame:
    return pd.read_csv(run_dir / "history.csv")


def check_run(norm: str, out: Path) -> Result:
    config = RunConfig(norm=norm, **RUN)
    result = run(config, out)
    run_dir = Path(result["run_dir"])
    history, saved = _history(run_dir), json.loads((run_dir / "config.json").read_text())
    finite = bool(np.isfinite(history[["train_loss", "valid_loss", "accuracy"]].to_numpy(float)).all())
    accuracy, training, workers = float(history["accuracy"].iloc[-1]), saved["training"], _workers()
    problems = [what for what, bad in (
        (f"status {result['status']}", result["status"] != "finished"),
        (f"{len(history)} history rows for {config.epochs} epochs", len(history) != config.epochs),
        ("a loss is not finite", not finite), ("no model.pth", not (run_dir / "model.pth").is_file()),
        (f"accuracy {accuracy:.3f} < {MIN_ACCURACY}", accuracy < MIN_ACCURACY)) if bad]
    measured = (f"{config.epochs} epochs in {result['seconds']:.1f} s on {training['device']}, accuracy "
                f"{accuracy:.3f}, fp16 {'on' if training['fp16'] else 'off'}, channels_last, "
                f"{saved['config']['pipeline']} pipeline, {workers} workers")
    return Result(f"run-{norm}", "fail" if problems else "pass", "; ".join(problems) or measured,
                  {"run_dir": str(run_dir), "seconds": result["seconds"], "accuracy": accuracy,
                   "fp16": training["fp16"], "device": training["device"], "workers": workers})


def _workers() -> int:
    from bnet_fastai.data.cache import default_workers

    return default_workers()


class _Interrupt(KeyboardInterrupt):
    """What `_InterruptAfter` raises: a Ctrl-C of the check's own, told apart from the user's."""


class _InterruptAfter(Callback):
    order = EpochCheckpoint.order + 1  # after the epoch's checkpoint is written

    def __init__(self, epochs: int):
        self.epochs = epochs

    def after_epoch(self) -> None:
        if self.epoch + 1 == self.epochs:
            raise _Interrupt


def check_resume(out: Path, uninterrupted: Path) -> Result:
    config = RunConfig(norm="bnet", **RUN)
    try:
        run(config, out, cbs=[_InterruptAfter(1)])
        return Result("resume", "fail", "the run was not interrupted after epoch 1")
    except _Interrupt:
        pass
    result = run(config, out)
    run_dir = Path(result["run_dir"])
    history, whole = _history(run_dir), _history(uninterrupted)
    columns = ["train_loss", "valid_loss", "accuracy"]
    difference = (float(np.abs(history[columns].to_numpy(float) - whole[columns].to_numpy(float)).max())
                  if len(history) == len(whole) else float("nan"))
    ok = (result["status"] == "finished" and result.get("resumed_from_epoch") == 1
          and result["epochs_done"] == config.epochs and len(history) == config.epochs)
    measured = (f"resumed from epoch {result.get('resumed_from_epoch')}, {result['epochs_done']} of "
                f"{config.epochs} epochs, {len(history)} history rows; vs the uninterrupted run: max |diff| "
                f"{difference:.1e}")
    return Result("resume", "pass" if ok else "fail", measured,
                  {"resumed_from_epoch": result.get("resumed_from_epoch"), "epochs_done": result["epochs_done"],
                   "history_rows": len(history), "max_difference_from_uninterrupted": difference})


def _trained(run_dir: Path, device: torch.device) -> tuple[torch.nn.Module, object, bool]:
    """The finished BNET run's model reloaded on `device` as it trained (channels_last), its validation
    loader (the run's data on the device) and whether it trained in mixed precision."""
    saved = json.loads((run_dir / "config.json").read_text())
    model = load_model(run_dir).to(device, memory_format=torch.channels_last)
    learn, _ = build_learner(RunConfig(**saved["config"]))
    return model, learn.dls.valid, saved["training"]["fp16"]


def check_reload(run_dir: Path, device: torch.device) -> Result:
    model, valid, fp16 = _trained(run_dir, device)
    logged = json.loads((run_dir / "status.json").read_text())["final_accuracy"]
    accuracy = validation_accuracy(model, valid, fp16)
    one_image = 1 / len(valid.dataset)
    ok = abs(accuracy - logged) <= one_image + 1e-9
    return Result("reload", "pass" if ok else "fail",
                  f"load_model accuracy {accuracy:.4f}, logged {logged:.4f} (within one image, {one_image:.4f})",
                  {"accuracy": accuracy, "logged": logged})


def check_fuse(run_dir: Path, device: torch.device) -> list[Result]:
    model, valid, _ = _trained(run_dir, device)
    x = valid.one_batch()[0].float()
    fused = fuse_bnet(model)
    results = []
    for name, dtype in DTYPES.items():
        check = f"fuse-{name}"
        try:
            with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not torch.float32):
                ref, got = model(x).float(), fused(x).float()
        except RuntimeError as e:  # this device has no autocast in that dtype
            results.append(Result(check, "skip", f"no {name} autocast on {device}: {one_line(e)}"))
            continue
        error = float((got - ref).abs().max() / ref.abs().max())
        agree = float((got.argmax(1) == ref.argmax(1)).float().mean())
        ok = bool(torch.isfinite(got).all()) and error <= FUSE_TOLERANCE[name]
        results.append(Result(check, "pass" if ok else "fail",
                              f"rel. max diff {error:.1e} (tolerance {FUSE_TOLERANCE[name]:.0e}), same class for "
                              f"{agree:.1%} of {len(x)} images", {"relative_max_difference": error,
                                                                  "tolerance": FUSE_TOLERANCE[name],
                                                                  "same_class": agree}))
    return results


def check_speed(device: torch.device) -> Result:
    arch, size, bs, rounds = SPEED[device.type]
    dtype = amp_dtype(device)
    torch.manual_seed(0)
    x = torch.randn(bs, 3, size, size, device=device).to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (bs,), device=device)
    models = {norm: create_model(arch, norm).to(device, memory_format=torch.channels_last).train()
              for norm in ("bn", "bnet")}
    steps = {norm: training_step(model, x, y, dtype) for norm, model in models.items()}
    losses = {norm: float(step()) for norm, step in steps.items()}
    impl = "+".join(impls_used(models["bnet"]))  # what BNET's layers computed through ("auto" resolved)
    times = interleaved(steps, rounds=rounds, warmup=2, device=device)
    ratio = times["bnet"] / times["bn"]
    speed = {norm: bs / seconds for norm, seconds in times.items()}
    finite = all(np.isfinite(v) for v in losses.values())
    precision = "fp16 autocast" if dtype is torch.float16 else "float32"
    return Result("speed", "pass" if finite else "fail",
                  f"{arch} {size} px, batch {bs}, {precision}, channels_last, BNET through {impl}: BNET/BN step "
                  f"{ratio:.3f}; "
                  f"BN {speed['bn']:.0f} img/s, BNET {speed['bnet']:.0f} img/s (median of {rounds})",
                  {"arch": arch, "size": size, "bs": bs, "precision": precision, "ratio": ratio, "bnet_impl": impl,
                   "ms_per_step": {k: v * 1e3 for k, v in times.items()}, "images_per_second": speed})


def _attempt(name: str, func: Callable, *args) -> list[Result]:
    """`func`'s result(s), or one failed check naming the exception in one line."""
    started = time.time()
    try:
        found = func(*args)
    except Exception as e:  # noqa: BLE001  (a check that raises has failed; the next ones still run; Ctrl-C,
        # a KeyboardInterrupt, is not caught)
        found = Result(name, "fail", f"{type(e).__name__}: {one_line(e)}")
    found = found if isinstance(found, list) else [found]
    for result in found:
        result.numbers.setdefault("seconds", round(time.time() - started, 2))
    return found


# The steps `preflight` runs, in order, with what each does (its progress line).
STEPS = {"device": "the device and versions", "run-bn": "a BN run through run()", "run-bnet": "a BNET run",
         "resume": "a run interrupted and resumed", "reload": "model.pth reloaded", "fuse": "fuse_bnet in fp32, "
         "fp16 and bf16", "speed": "BNET/BN step time", "ddp": "a 2-process DDP run (two GPUs)"}
# What `bnet-fastai check --device cpu` took, measured: the banner says it (a loaded machine takes longer).
MEASURED = "18 s of checks, 25 s in all, on this project's 2-core CPU with nothing else running, 2026-12-07"


def preflight(device: str = "auto", out: str | Path | None = None,
              report: Callable[[str], None] = print) -> list[Result]:
    """Every check on `device`, in a temporary folder removed afterwards (or in `out`, kept); `report` gets
    each result's line as it is known."""
    where = resolve_device(device)
    folder = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="bnet-fastai-check-"))
    folder.mkdir(parents=True, exist_ok=True)
    results: list[Result] = []
    started, steps = time.time(), iter(range(1, len(STEPS) + 1))

    def attempt(name: str, func: Callable, *args) -> list[Result]:
        if name in STEPS:  # progress: which check runs now, and the time so far (a loaded machine is slow)
            report(f"[{next(steps)}/{len(STEPS)}] {name}: {STEPS[name]} ... ({time.time() - started:.0f} s so far)")
        found = _attempt(name, func, *args)
        for result in found:
            report(result.line())
        results.extend(found)
        return found

    try:
        with on_device(where, folder):
            attempt("device", check_device, where)
            attempt("run-bn", check_run, "bn", folder / "runs")
            bnet = attempt("run-bnet", check_run, "bnet", folder / "runs")[0]
            trained = Path(bnet.numbers["run_dir"]) if bnet.status == "pass" else None
            if trained is None:
                for name in ("resume", "reload", "fuse-fp32", "fuse-fp16", "fuse-bf16"):
                    attempt(name, Result, name, "fail", "needs the BNET run, which failed")
            else:
                attempt("resume", check_resume, folder / "resumed", trained)
                attempt("reload", check_reload, trained, where)
                attempt("fuse", check_fuse, trained, where)
            attempt("speed", check_speed, where)
            attempt("ddp", check_ddp, folder / "ddp", where)
    finally:
        if out is None:
            shutil.rmtree(folder, ignore_errors=True)
    return results


def write_json(results: list[Result], path: str | Path, device: str, seconds: float) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"check": "bnet-fastai check", "device": device, "seconds": round(seconds, 1),
                                "passed": not any(r.status == "fail" for r in results),
                                "results": [asdict(r) for r in results]}, indent=1) + "\n")
