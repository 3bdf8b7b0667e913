"""Inference time of `fuse_bnet(model)` against the BN and the unfused BNET model, and the peak memory of
a training step, BN vs BNET — each measured side by side in one process.

    python benchmarks/eval_and_memory.py            # xresnet18 and resnest14d, 128 px, batch 32

Peak memory: on a GPU, `torch.cuda.max_memory_allocated` around one step; on a CPU, the peak resident set
size (Linux VmHWM, reset through /proc/self/clear_refs before the step) above the size before it.
"""
from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import interleaved, machine  # noqa: E402

from bnet_fastai import create_model, fuse_bnet  # noqa: E402


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


def peak_step_mib(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Memory a training step needs beyond what is held before it, in MiB."""
    model.train()
    F.cross_entropy(model(x), y).backward()  # warm-up: allocator caches, gradients exist
    model.zero_grad(set_to_none=True)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        F.cross_entropy(model(x), y).backward()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    before = _rss_kib("VmRSS:")
    F.cross_entropy(model(x), y).backward()
    return (_rss_kib("VmHWM:") - before) / 1024


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default="xresnet18,resnest14d")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--bs", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"# {machine()}")
    print(f"# eval forward, batch {args.bs}, {args.size} px, median of {args.rounds} interleaved rounds")
    print(f"{'arch':<12} {'model':<14} {'ms/batch':>9} {'vs bn':>7}")
    memory = []
    for arch in args.archs.split(","):
        torch.manual_seed(0)
        x = torch.randn(args.bs, 3, args.size, args.size, device=device)
        y = torch.randint(0, 10, (args.bs,), device=device)
        bn, bnet = create_model(arch, "bn").to(device), create_model(arch, "bnet").to(device)
        memory += [(arch, name, peak_step_mib(m, x, y)) for name, m in (("bn", bn), ("bnet all", bnet))]
        models = {"bn": bn.eval(), "bnet unfused": bnet.eval(), "bnet fused": fuse_bnet(bnet)}
        with torch.no_grad():
            times = interleaved({name: (lambda m=m: m(x)) for name, m in models.items()}, rounds=args.rounds)
        for name, seconds in times.items():
            print(f"{arch:<12} {name:<14} {seconds * 1e3:9.1f} {seconds / times['bn']:7.3f}", flush=True)
    print(f"\n# peak memory of one training step (forward + backward), batch {args.bs}, {args.size} px")
    print(f"{'arch':<12} {'model':<14} {'MiB':>9} {'vs bn':>7}")
    for arch, name, mib in memory:
        base = next(m for a, n, m in memory if a == arch and n == "bn")
        print(f"{arch:<12} {name:<14} {mib:9.1f} {mib / base:7.3f}")


if __name__ == "__main__":
    main()
