"""Inference time of `fuse_bnet(model)` against the BN model, deployed (`fuse_bn`: each BN folded into its
conv) and not, and the peak memory of a training step, BN vs BNET — each measured side by side in one process.

    python benchmarks/eval_and_memory.py            # CPU: xresnet18 and resnest14d, 128 px, batch 32
                                                    # GPU: xresnet50 and resnest26d, 128 px, batch 64, fp16

Rows: ``bn`` (the BN model as trained), ``bn folded`` (BN's deployed form: `fuse_bn`, i.e.
`fuse_conv_bn_eval` on every conv->BN pair), ``bnet unfused`` and ``bnet fused`` (`fuse_bnet`). The
deploy-vs-deploy ratio is ``bnet fused`` over ``bn folded``; "vs bn" is each over the unfused BN model.
On a GPU inference runs under float16 autocast (``--amp``), each forward timed with CUDA events.

Memory of a training step, for BN, BNET through the composed path (BN then the conv through autograd: two saved
maps per layer) and BNET one-map (the default, `bnet_fastai.nn.compute.one_map`): the peak, on a GPU
`torch.cuda.max_memory_allocated` around one step, on a CPU the peak resident set size (Linux VmHWM, reset
through /proc/self/clear_refs before the step) above the size before it; and the activations saved for the
backward, exact (`bnet_fastai.speed.saved_activation_bytes`). ``bnet unfused`` and ``bnet one-map`` are the torch
path (`impl="torch"`); on a CPU also BNET through the fused C++ kernels (`impl="cpp"`, what "auto" runs there) and
on a GPU through the fused Triton kernels (`impl="triton"`): ``bnet cpp`` and ``bnet triton`` rows in both tables
(eval forward unfused, and the training step).
"""
from __future__ import annotations

import argparse
import copy
import ctypes
import ctypes.util
import gc
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import device, interleaved, machine, precision, write_json  # noqa: E402

from bnet_fastai import create_model, fuse_bn, fuse_bnet  # noqa: E402
from bnet_fastai.nn.compute import cpp_bnet  # noqa: E402
from bnet_fastai.nn.layers import set_impl, set_one_map  # noqa: E402
from bnet_fastai.speed import saved_activation_bytes  # noqa: E402


_LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


def peak_step_mib(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype | None) -> float:
    """Memory a training step needs beyond what is held before it, in MiB."""
    model.train()

    def step() -> None:
        with torch.autocast(x.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = F.cross_entropy(model(x), y)
        loss.backward()

    step()  # warm-up: allocator caches, gradients exist
    model.zero_grad(set_to_none=True)
    gc.collect()
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
        torch.cuda.reset_peak_memory_stats(x.device)
        before = torch.cuda.memory_allocated(x.device)
        step()
        torch.cuda.synchronize(x.device)
        return (torch.cuda.max_memory_allocated(x.device) - before) / 2**20
    _LIBC.malloc_trim(0)  # free heap memory back to the system, so the RSS before is what is held
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    before = _rss_kib("VmRSS:")
    step()
    return (_rss_kib("VmHWM:") - before) / 1024


MIN_MIB = 1.0  # below this a memory ratio is noise (or a division by zero)
GPU_DEFAULTS = {"archs": "xresnet50,resnest26d", "bs": 64}
CPU_DEFAULTS = {"archs": "xresnet18,resnest14d", "bs": 32}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default=None, help=f"default: {GPU_DEFAULTS['archs']} on a GPU, "
                        f"{CPU_DEFAULTS['archs']} on a CPU")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--bs", type=int, default=None, help="default: 64 on a GPU, 32 on a CPU")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--device", default="auto", help="auto (the GPU when there is one), cpu, cuda or cuda:N")
    parser.add_argument("--amp", default="auto", choices=("auto", "on", "off"),
                        help="float16 autocast: auto = on a GPU only")
    parser.add_argument("--format", default=None, choices=("nchw", "channels_last"),
                        help="memory format: default channels_last on a GPU, nchw on a CPU (faster there for eval)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the tables as JSON to PATH")
    args = parser.parse_args(argv)
    where = device(args.device)
    defaults = GPU_DEFAULTS if where.type == "cuda" else CPU_DEFAULTS
    archs, bs = args.archs or defaults["archs"], args.bs or defaults["bs"]
    dtype = precision(args.amp, where)
    amp = "float16 autocast" if dtype is torch.float16 else "float32"
    fmt = args.format or ("channels_last" if where.type == "cuda" else "nchw")
    memory_format = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
    print(f"# {machine()}")
    print(f"# eval forward on {where}, {amp}, {fmt}, batch {bs}, {args.size} px, median of "
          f"{args.rounds} interleaved rounds")
    print(f"{'arch':<12} {'model':<14} {'ms/batch':>9} {'vs bn':>7} {'vs bn folded':>13}")
    rows, memory = [], []
    for arch in archs.split(","):
        torch.manual_seed(0)
        x = torch.randn(bs, 3, args.size, args.size, device=where).to(memory_format=memory_format)
        y = torch.randint(0, 10, (bs,), device=where)
        bn, bnet = (create_model(arch, norm).to(where, memory_format=memory_format) for norm in ("bn", "bnet"))
        torch_path = set_impl(copy.deepcopy(bnet), "torch")
        composed = set_one_map(copy.deepcopy(torch_path), False)
        # the fused Triton kernels (`bnet_fastai.nn.compute.triton_bnet`): compiled for CUDA tensors, so on a GPU only
        triton = set_impl(copy.deepcopy(bnet), "triton") if where.type == "cuda" else None
        # the fused C++ kernels (`bnet_fastai.nn.compute.cpp_bnet`, "auto" on a CPU): float32 CPU maps
        cpp = set_impl(copy.deepcopy(bnet), "cpp") if where.type == "cpu" and cpp_bnet.load() is not None else None
        trained = (("bn", bn), ("bnet composed", composed), ("bnet one-map", torch_path), ("bnet cpp", cpp),
                   ("bnet triton", triton))
        for name, m in trained:
            if m is not None:
                memory.append((arch, name, peak_step_mib(m, x, y, dtype),
                               saved_activation_bytes(m, x, y, dtype) / 2**20))
        models = {"bn": bn.eval(), "bn folded": fuse_bn(bn), "bnet unfused": torch_path.eval(),
                  "bnet fused": fuse_bnet(bnet), **({"bnet cpp": cpp.eval()} if cpp is not None else {}),
                  **({"bnet triton": triton.eval()} if triton is not None else {})}
        with torch.no_grad(), torch.autocast(where.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            times = interleaved({name: (lambda m=m: m(x)) for name, m in models.items()}, rounds=args.rounds,
                                device=where)
        for name, seconds in times.items():
            ratio, deployed = seconds / times["bn"], seconds / times["bn folded"]
            print(f"{arch:<12} {name:<14} {seconds * 1e3:9.2f} {ratio:7.3f} {deployed:13.3f}", flush=True)
            rows.append({"arch": arch, "size": args.size, "bs": bs, "model": name, "ms_per_batch": seconds * 1e3,
                         "images_per_second": bs / seconds, "ratio_to_bn": ratio, "ratio_to_bn_folded": deployed})
    what = "max_memory_allocated" if where.type == "cuda" else "peak RSS rise"
    print(f"\n# memory of one training step ({amp}), batch {bs}, {args.size} px: peak ({what}, forward + "
          f"backward) and the activations saved for the backward (exact: saved-tensor hooks, each storage once)")
    print(f"{'arch':<12} {'model':<14} {'peak MiB':>9} {'vs bn':>7} {'saved MiB':>10} {'vs bn':>7}")
    memory_rows = []
    for arch, name, mib, saved in memory:
        base, saved_bn = next((m, s) for a, n, m, s in memory if a == arch and n == "bn")
        # a tiny step can fit in memory the process already holds (a CPU RSS rise of 0): no ratio then
        ratio = mib / base if base >= MIN_MIB else None
        print(f"{arch:<12} {name:<14} {mib:9.1f} {'n/a' if ratio is None else f'{ratio:.3f}':>7} {saved:10.2f} "
              f"{saved / saved_bn:7.3f}")
        memory_rows.append({"arch": arch, "model": name, "mib": mib, "ratio_to_bn": ratio, "saved_mib": saved,
                            "saved_ratio_to_bn": saved / saved_bn})
    if any(r["ratio_to_bn"] is None for r in memory_rows):
        print(f"# n/a: BN's step needed under {MIN_MIB} MiB beyond what was held; raise --bs or --size to compare")
    write_json(args.json, "eval_and_memory", argv, f"median of {args.rounds} interleaved rounds of an eval "
               f"forward on {where}, {amp}, {fmt}; peak memory of one training step ({what})", rows,
               device=str(where), precision=amp, format=fmt, memory=memory_rows)


if __name__ == "__main__":
    main()
