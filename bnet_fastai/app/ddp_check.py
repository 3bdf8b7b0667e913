"""The preflight's ``ddp`` check: a 2-process run launched by ``torch.distributed.run`` on a loopback
rendezvous (NCCL on two GPUs; gloo on the CPU in the tests), and the cause of a failed launch in one line."""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from bnet_fastai.app.check_result import RUN, Result
from bnet_fastai.runs.config import RunConfig


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# how a `bnet-fastai` command starts its one-line errors: "bnet-fastai run: error: ..."
OUR_LINE = r"bnet-fastai [a-z]+: "


def launch_failure(stderr: str) -> str:
    """The cause of a failed ``torch.distributed.run`` launch, in one line, from its stderr: a rank's own
    ``bnet-fastai ...`` error line; else the exception a rank raised (its traceback passes through, while
    torch elastic's summary only says "To enable traceback see ..."); else the rank the summary names as the
    root cause, with the signal that killed it or its exit code; else the last line that is not a rule."""
    # the ranks share one stderr: two ranks' lines can run together, so a line ends at the next one's start
    ours = re.search(rf"{OUR_LINE}.*?(?={OUR_LINE}|$)", stderr, re.MULTILINE)
    if ours:
        return ours.group().strip()
    raised = re.search(r"^(?!torch\.distributed\.elastic\.)[A-Za-z_][\w.]*(?:Error|Exception): .+$", stderr,
                       re.MULTILINE)
    if raised:
        return raised.group().strip()
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    fields = {}
    if "Root Cause (first observed failure):" in lines:
        for line in lines[lines.index("Root Cause (first observed failure):") + 1:]:
            key, colon, value = line.partition(":")
            if colon and key.strip() in ("rank", "exitcode", "traceback"):
                fields.setdefault(key.strip(), value.strip())
    if "rank" in fields:
        signal = fields.get("traceback", "").startswith("Signal ")
        cause = fields["traceback"] if signal else f"exit code {fields.get('exitcode', '?')}"
        return f"rank {fields['rank']}: {cause}"
    return next((line for line in reversed(lines) if line.strip("=-*")), "no output")


def ddp_run(out: Path, gpus: bool = True, timeout: float = 600) -> Result:
    """A 2-process BNET run (``python -m torch.distributed.run``, loopback rendezvous) into `out`: NCCL on
    two GPUs, or gloo on the CPU with ``gpus=False`` (the path the tests take)."""
    config = RunConfig(norm="bnet", **{**RUN, "epochs": 1})
    argv = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
            "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "bnet_fastai", "run",
            "--out", str(out), *[f"--{k}={v}" for k, v in asdict(config).items()
                                 if k in RUN or k == "norm"]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **({} if gpus else {"CUDA_VISIBLE_DEVICES": ""})}
    started = time.time()
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
    run_dir = out / config.run_id
    if proc.returncode != 0 or not (run_dir / "config.json").is_file():
        return Result("ddp", "fail", f"2-process run exited {proc.returncode}: {launch_failure(proc.stderr)}")
    saved = json.loads((run_dir / "config.json").read_text())
    status = json.loads((run_dir / "status.json").read_text())["status"]
    world = saved["training"]["world_size"]
    ok = status == "finished" and world == 2
    return Result("ddp", "pass" if ok else "fail",
                  f"2 processes ({'NCCL' if gpus else 'gloo'}): {status}, world size {world}, "
                  f"{time.time() - started:.1f} s", {"status": status, "world_size": world})


def check_ddp(out: Path, device: torch.device) -> Result:
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    if gpus < 2:
        return Result("ddp", "skip", f"{gpus} GPU(s) on {device}: a 2-process run needs 2 GPUs")
    return ddp_run(out)
