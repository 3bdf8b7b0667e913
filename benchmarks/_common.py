"""Shared by the benchmark scripts: the machine, the timing (`bnet_fastai.speed`) and the JSON they write."""
from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

import torch

from bnet_fastai.speed import OPTIMIZERS, amp_dtype, interleaved, quiet_line, training_step  # noqa: F401  (the benchmarks' timing)


def machine() -> str:
    """One line naming the machine the figures were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = (f", GPU {torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()})"
           if torch.cuda.is_available() else ", no GPU")
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"
            f"{gpu}, Python {platform.python_version()}")


def device(spec: str = "auto") -> torch.device:
    """--device: auto (the GPU when there is one), cpu, cuda or cuda:N."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu") if spec == "auto" else torch.device(spec)


def precision(amp: str, where: torch.device) -> torch.dtype | None:
    """--amp: auto (float16 autocast on a GPU, as runs train; float32 on a CPU), on (float16) or off."""
    return {"auto": amp_dtype(where), "on": torch.float16, "off": None}[amp]


def write_json(path: str | None, benchmark: str, argv: list[str] | None, measure: str, rows: list[dict],
               **settings) -> None:
    """The table as JSON at `path` (nothing when None): the command, the machine, what was measured, rows."""
    if not path:
        return
    command = f"python benchmarks/{benchmark}.py " + " ".join(sys.argv[1:] if argv is None else argv)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({"benchmark": benchmark, "command": command.strip(), "machine": machine(),
                                      "measure": measure, **settings, "rows": rows}, indent=1) + "\n")
    print(f"# written to {path}")
