"""One BNET2d layer against one BatchNorm2d, per map size, measured side by side in one process.

    python benchmarks/bnet_layer.py                       # the maps of xmininet at 28 px and xresnet18 at 128 px
    python benchmarks/bnet_layer.py --maps 128x64x28x28,32x512x4x4 --k 3,5 --threads 1

For each map (N x C x H x W, channels_last unless --format nchw) it times, in interleaved rounds: a training
forward + backward of `nn.BatchNorm2d`, of BNET2d through the torch path (`impl="torch"`: BN's normalisation, then
mkldnn's depthwise conv, one saved map) and through the C++ kernels (`impl="cpp"`), and an eval forward of each.
Ratios are to BN's. Where the C++ kernels cannot be built the script says so and times the torch path alone.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import interleaved, machine, write_json  # noqa: E402

from bnet_fastai import BNET2d  # noqa: E402
from bnet_fastai.nn.compute import cpp_bnet  # noqa: E402

# xmininet at 28 px, batch 128 (the budget study's network), then xresnet18 at 128 px, batch 32
DEFAULT_MAPS = ("128x32x14x14,128x64x14x14,128x32x7x7,128x64x4x4,128x128x2x2,128x256x1x1,"
                "32x32x64x64,32x64x32x32,32x128x16x16,32x256x8x8,32x512x4x4")


def _map(text: str) -> tuple[int, int, int, int]:
    parts = tuple(int(v) for v in text.lower().split("x"))
    if len(parts) != 4 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"a map is NxCxHxW, e.g. 128x64x14x14; got {text!r}")
    return parts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--maps", default=DEFAULT_MAPS, help="comma-separated NxCxHxW (default: xmininet's maps at "
                        "28 px, batch 128, and xresnet18's at 128 px, batch 32)")
    parser.add_argument("--k", default="3", help="BNET kernel sizes, comma-separated (default: 3)")
    parser.add_argument("--format", default="channels_last", choices=("channels_last", "nchw"))
    parser.add_argument("--rounds", type=int, default=30, help="interleaved rounds (default: 30)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, the cores)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the table as JSON to PATH")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    memory_format = torch.channels_last if args.format == "channels_last" else torch.contiguous_format
    cpp = cpp_bnet.load() is not None
    impls = ("torch", "cpp") if cpp else ("torch",)
    print(f"# {machine()}")
    print(f"# one layer on cpu, float32, {args.format}, median of {args.rounds} interleaved rounds"
          + ("" if cpp else f"; the C++ kernels: {cpp_bnet.unavailable_reason()}"))
    print(f"{'map':<16} {'k':>2} {'BN train ms':>11} " + " ".join(f"{i + ' train':>11} {'vs BN':>6}" for i in impls)
          + f" {'BN eval ms':>10} " + " ".join(f"{i + ' eval':>10} {'vs BN':>6}" for i in impls))
    rows = []
    for text in args.maps.split(","):
        shape = _map(text)
        for k in (int(v) for v in args.k.split(",")):
            torch.manual_seed(0)
            x = torch.randn(*shape).to(memory_format=memory_format).requires_grad_()
            g = torch.randn(*shape).to(memory_format=memory_format)
            layers = {"bn": nn.BatchNorm2d(shape[1]), **{i: BNET2d(shape[1], k=k, impl=i) for i in impls}}

            def train(layer=None):
                return lambda: layer(x).backward(g)

            def infer(layer=None):
                def step():
                    with torch.no_grad():
                        layer(x)
                return step

            for layer in layers.values():
                layer.eval()
            evals = interleaved({name: infer(layer) for name, layer in layers.items()}, rounds=args.rounds,
                                device="cpu")
            for layer in layers.values():
                layer.train()
            trains = interleaved({name: train(layer) for name, layer in layers.items()}, rounds=args.rounds,
                                 device="cpu")
            row = {"map": text, "k": k, "format": args.format,
                   **{f"{n}_train_ms": t * 1e3 for n, t in trains.items()},
                   **{f"{n}_eval_ms": t * 1e3 for n, t in evals.items()},
                   **{f"{i}_train_ratio": trains[i] / trains["bn"] for i in impls},
                   **{f"{i}_eval_ratio": evals[i] / evals["bn"] for i in impls}}
            rows.append(row)
            print(f"{text:<16} {k:>2} {trains['bn'] * 1e3:11.3f} "
                  + " ".join(f"{trains[i] * 1e3:11.3f} {trains[i] / trains['bn']:6.2f}" for i in impls)
                  + f" {evals['bn'] * 1e3:10.3f} "
                  + " ".join(f"{evals[i] * 1e3:10.3f} {evals[i] / evals['bn']:6.2f}" for i in impls), flush=True)
    write_json(args.json, "bnet_layer", argv, f"median of {args.rounds} interleaved rounds, one layer's training "
               f"forward + backward and eval forward on cpu, float32, {args.format}, {torch.get_num_threads()} "
               f"torch threads", rows, threads=torch.get_num_threads())


if __name__ == "__main__":
    main()
