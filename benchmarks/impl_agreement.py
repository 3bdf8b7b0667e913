"""How far BNET's implementations agree on a real model: the C++ kernels, the torch path and the composed path.

    python benchmarks/impl_agreement.py                    # xmininet, 28 px, batch 128, channels_last, k=3 and k=1

From one initialisation, each implementation (`set_impl(model, "cpp")`, `set_impl(model, "torch")`, and the torch
path's composed form, `set_one_map(model, False)`) takes the same batches of random images: the first step's logits
and gradients are compared, then the weights and running statistics after `--steps` optimizer steps (torch's Adam,
lr 1e-3, or SGD with momentum 0.9, lr 0.1). Differences are relative to each tensor's largest value; gradients
smaller than 1e-4 of the model's largest are left out of the gradient figure (they are rounding noise: a bias
followed by a normalisation has a gradient of zero). Floating-point order differs between the implementations,
and training magnifies it; the composed-vs-one-map pair shows how much for two implementations this project
already holds equal.
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, write_json  # noqa: E402

from bnet_fastai import create_model  # noqa: E402
from bnet_fastai.nn.layers import impls_used, set_impl, set_one_map  # noqa: E402


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def _largest(pairs) -> float:
    return max((_relative(a, b) for a, b in pairs), default=0.0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="xmininet")
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--bs", type=int, default=128)
    parser.add_argument("--k", default="3,1", help="BNET kernel sizes, comma-separated (default: 3,1)")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps (default: 20)")
    parser.add_argument("--opt", default="adam", choices=("adam", "sgd"))
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the table as JSON to PATH")
    args = parser.parse_args(argv)
    print(f"# {machine()}")
    print(f"# {args.arch}, {args.size} px, batch {args.bs}, channels_last, float32, {args.steps} {args.opt} steps; "
          f"largest relative difference of a tensor")
    print(f"{'k':>2} {'pair':<20} {'logits':>9} {'gradients':>10} {'after steps':>12}")
    rows = []
    for k in (int(v) for v in args.k.split(",")):
        torch.manual_seed(0)
        base = create_model(args.arch, "bnet", k=k).to(memory_format=torch.channels_last)
        models = {"cpp": set_impl(copy.deepcopy(base), "cpp"), "torch": set_impl(copy.deepcopy(base), "torch"),
                  "composed": set_one_map(set_impl(copy.deepcopy(base), "torch"), False)}
        optimizers = {name: (torch.optim.Adam(m.parameters(), 1e-3) if args.opt == "adam"
                             else torch.optim.SGD(m.parameters(), 0.1, momentum=0.9)) for name, m in models.items()}
        generator = torch.Generator().manual_seed(1)
        first = {}
        for step in range(args.steps):
            x = torch.randn(args.bs, 3, args.size, args.size, generator=generator).to(memory_format=torch.channels_last)
            y = torch.randint(0, 10, (args.bs,), generator=generator)
            for name, model in models.items():
                optimizers[name].zero_grad()
                logits = model(x)
                F.cross_entropy(logits, y).backward()
                if step == 0:
                    first[name] = (logits.detach(), [p.grad.clone() for p in model.parameters()])
                optimizers[name].step()
        assert impls_used(models["cpp"], training=True) == ["cpp"], "the C++ kernels did not run"
        scale = max(float(g.abs().max()) for g in first["torch"][1])
        for a, b in (("cpp", "torch"), ("torch", "composed")):
            grads = [(ga, gb) for ga, gb in zip(first[a][1], first[b][1]) if float(gb.abs().max()) > 1e-4 * scale]
            states = [(sa, sb) for sa, sb in zip(models[a].state_dict().values(), models[b].state_dict().values())
                      if sa.is_floating_point()]
            row = {"k": k, "pair": f"{a} vs {b}", "logits": _relative(first[a][0], first[b][0]),
                   "gradients": _largest(grads), "after_steps": _largest(states)}
            rows.append(row)
            print(f"{k:>2} {row['pair']:<20} {row['logits']:9.2e} {row['gradients']:10.2e} {row['after_steps']:12.2e}",
                  flush=True)
    write_json(args.json, "impl_agreement", argv, f"largest relative difference of a tensor: the first step's "
               f"logits and gradients, and the state after {args.steps} {args.opt} steps", rows, steps=args.steps,
               optimizer=args.opt)


if __name__ == "__main__":
    main()
