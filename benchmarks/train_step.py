"""Training-step time of BNET relative to BN, measured side by side in one process.

    python benchmarks/train_step.py                 # CPU: xresnet18 and resnest14d, 128 px, batch 32
                                                    # GPU: xresnet50 and resnest26d, 128 px, batch 64, fp16
    python benchmarks/train_step.py --archs xmininet --size 64 --rounds 3
    python benchmarks/train_step.py --archs xresnet18 --formats channels_last --compile   # eager vs compiled
    python benchmarks/train_step.py --archs xmininet --size 28 --bs 128 --formats channels_last \
        --variants bnet-k3-all,bnet-k3-all-composed        # one saved map (the default) vs the composed path
    python benchmarks/train_step.py --variants bnet-k3-all,bnet-k3-all-triton,bnet-k3-last,bnet-k3-last-triton
                                                    # GPU: the fused Triton kernels against the torch path
    python benchmarks/train_step.py --archs xmininet --size 28 --bs 128 --formats channels_last --rounds 100 \
        --opt adam --variants bnet-k3-all,bnet-k3-last,bnet-k5-last,bnet-k1-all \
        --json docs/fashion-mnist-convergence/cost.json   # a budget study's cost ratios, one per variant

For each arch and memory format (NCHW, channels_last) it times one training step (forward, backward, update;
torch's SGD, or fastai's Adam as runs train with ``--opt adam``) of: BN; our BNET with placement "all" and
"last" (or the variants named by ``--variants``); and the authors' formulation (a `BatchNorm2d(affine=False)`
subclass calling a depthwise `nn.Conv2d` child) in the same places as our "all". Rounds are interleaved
so machine drift hits every contender alike; the median of each is reported with its ratio to BN.
On a GPU the step runs under float16 autocast with a GradScaler, as fastai's `to_fp16` trains (``--amp``),
and each step is timed with CUDA events (`bnet_fastai.speed`); ``--device`` picks the device.
With ``--json PATH`` the table is also written as JSON (`bnet-fastai report` reads it as a budget study's
cost ratio: rows carry the arch, size, batch, memory format and the report's variant name).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import numpy as np
import scipy.stats
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (OPTIMIZERS, device, interleaved, machine, precision, quiet_line, training_step,  # noqa: E402
                     write_json)

from bnet_fastai import create_model  # noqa: E402
from bnet_fastai.nn.layers import set_impl, set_one_map  # noqa: E402
from bnet_fastai.nn.norms import select_norms  # noqa: E402
from bnet_fastai.nn.weight_decay import no_decay_params  # noqa: E402
from bnet_fastai.runs.config import variant_fields  # noqa: E402


class AuthorsBNET2d(nn.BatchNorm2d):
    """BNET as in the paper's released code: BN without affine, subclassed, then a depthwise conv child."""

    def __init__(self, width: int, k: int = 3):
        super().__init__(width, affine=False)
        self.bnconv = nn.Conv2d(width, width, k, padding=k // 2, groups=width, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bnconv(super().forward(x))


def authors_model(arch: str, k: int = 3) -> nn.Module:
    """`arch` with the authors' BNET wherever ours sits with placement "all", starting from our kernels
    (identity, zero after a library's zero-init) so that only the formulation differs."""
    ours = create_model(arch, "bnet", placement="all", k=k)
    model = create_model(arch, "bn")
    for name, bnet in select_norms(ours, "all"):
        theirs = AuthorsBNET2d(bnet.num_features, k)
        with torch.no_grad():
            theirs.bnconv.weight.copy_(bnet.weight)
            theirs.bnconv.bias.copy_(bnet.bias)
        model.set_submodule(name, theirs)
    return model


# the table's labels of the default contenders -> the names `bnet_fastai.analysis.report.variant` gives runs; any
# other BNET variant (--variants bnet-k5-last,bnet-k1-all) is labelled by its report name
REPORT_NAMES = {"bn": "bn", "bnet all": "bnet-k3-all", "bnet last": "bnet-k3-last", "authors all": "authors-k3-all",
                "bn compiled": "bn-compiled", "bnet all compiled": "bnet-k3-all-compiled"}
LABELS = {name: label for label, name in REPORT_NAMES.items()}
DEFAULT_VARIANTS = ("bnet-k3-all", "bnet-k3-last", "authors-k3-all")
COMPOSED = "-composed"  # a variant's suffix: trained through the composed path (`set_one_map(model, False)`)
# a variant's suffix naming BNET2d's computation (`set_impl`); none: "auto" (the C++ kernels on a CPU where they build)
IMPLS = {"-torch": "torch", "-cpp": "cpp", "-triton": "triton"}
SUFFIXES = (COMPOSED, *IMPLS)


def base_variant(name: str) -> str:
    """The report name of `<variant>[-composed|-torch|-cpp|-triton]`."""
    for suffix in SUFFIXES:
        name = name.removesuffix(suffix)
    return name


def _bnet_variant(arch: str, name: str) -> nn.Module:
    """`<variant>[-composed|-torch|-cpp|-triton]`: the variant's model, through the default computation ("auto"),
    the composed path (on the torch path), the torch one-map path, the C++ kernels or the Triton kernels."""
    model = create_model(arch, **variant_fields(base_variant(name)))
    if name.endswith(COMPOSED):
        return set_impl(set_one_map(model, False), "torch")
    impl = next((impl for suffix, impl in IMPLS.items() if name.endswith(suffix)), "auto")
    return set_impl(model, impl)


def variants(arch: str, compiled: bool, only: list[str] | None = None) -> dict[str, nn.Module]:
    """The models timed for `arch`, by label (BN first: the ratios' denominator); `only`: the report names to
    time besides BN (`bnet-k5-last`, ...: any BNET variant `variant_fields` reads, or `authors-k3-all`)."""
    if compiled:  # eager against torch.compile (default inductor backend), BN and BNET
        builders = {"bn": lambda: create_model(arch, "bn"),
                    "bnet-k3-all": lambda: create_model(arch, "bnet", placement="all"),
                    "bn-compiled": lambda: torch.compile(create_model(arch, "bn")),
                    "bnet-k3-all-compiled": lambda: torch.compile(create_model(arch, "bnet", placement="all"))}
        names = [n for n in builders if n == "bn" or only is None or n in only]
    else:
        builders = {"authors-k3-all": lambda: authors_model(arch)}
        names = ["bn", *[n for n in (only if only is not None else DEFAULT_VARIANTS) if n != "bn"]]
        for name in names:
            if name not in builders:  # `<variant>[-composed|-torch|-cpp|-triton]`
                variant_fields(base_variant(name))
                builders[name] = lambda n=name: _bnet_variant(arch, n)
    return {LABELS.get(name, name): builders[name]() for name in names}


def check_variants(text: str | None, compiled: bool) -> list[str] | None:
    """--variants as a list of report names; ValueError naming the valid forms."""
    if not text:
        return None
    names = [n for n in text.split(",") if n != "bn"]
    fixed = ("bn-compiled", "bnet-k3-all-compiled") if compiled else ("authors-k3-all",)
    for name in names:
        if compiled and name not in ("bnet-k3-all", *fixed):
            raise ValueError(f"with --compile the variants are bnet-k3-all, {', '.join(fixed)}; got {name!r}")
        if name not in fixed:  # bnet-k<odd>-<all|last>[-composed|-torch|-cpp|-triton], or one line naming the forms
            variant_fields(base_variant(name))
    return names


GPU_DEFAULTS = {"archs": "xresnet50,resnest26d", "bs": 64}
CPU_DEFAULTS = {"archs": "xresnet18,resnest14d", "bs": 32}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default=None, help=f"default: {GPU_DEFAULTS['archs']} on a GPU, "
                        f"{CPU_DEFAULTS['archs']} on a CPU")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--bs", type=int, default=None, help="default: 64 on a GPU, 32 on a CPU")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per block (default: 5)")
    parser.add_argument("--blocks", type=int, default=1, help="independent blocks (fresh models and batch, their "
                        "own rounds); 2 or more give each ratio a 95%% interval, as a budget study's cost.json wants "
                        "(default: 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, the cores)")
    parser.add_argument("--formats", default="nchw,channels_last")
    parser.add_argument("--device", default="auto", help="auto (the GPU when there is one), cpu, cuda or cuda:N")
    parser.add_argument("--amp", default="auto", choices=("auto", "on", "off"),
                        help="float16 autocast + GradScaler: auto = on a GPU only (as runs train)")
    parser.add_argument("--compile", action="store_true", help="eager vs torch.compile instead of the variants")
    parser.add_argument("--variants", default=None, help="comma-separated report names to time besides bn: "
                        "bnet-k<odd k>-<all|last> (bnet-k5-last, bnet-k1-all, ...), any of them with -composed (BNET "
                        "through the composed path: two saved maps) or -triton (the fused Triton kernels, CUDA), or "
                        "authors-k3-all (default: "
                        f"{', '.join(DEFAULT_VARIANTS)}; with --compile bn-compiled, bnet-k3-all, bnet-k3-all-compiled)")
    parser.add_argument("--opt", default="sgd", choices=OPTIMIZERS, help="the step's optimizer: sgd (torch's, "
                        "momentum 0.9) or adam (fastai's, as runs train; a budget study's cost ratio)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the table as JSON to PATH")
    args = parser.parse_args(argv)
    if args.blocks < 1 or args.rounds < 1:
        parser.error("--blocks and --rounds must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    where = device(args.device)
    defaults = GPU_DEFAULTS if where.type == "cuda" else CPU_DEFAULTS
    archs, bs = args.archs or defaults["archs"], args.bs or defaults["bs"]
    dtype = precision(args.amp, where)
    try:
        only = check_variants(args.variants, args.compile)
    except ValueError as e:
        parser.error(str(e))
    if where.type != "cuda" and any(n.endswith("-triton") for n in only or []):
        parser.error("the -triton variants run the fused Triton kernels on a GPU; this machine times on the CPU")
    amp = "float16 autocast + GradScaler" if dtype is torch.float16 else "float32"
    load, spreads = os.getloadavg()[0], []  # the load before this script's own work
    print(f"# {machine()}")
    print(f"# one {args.opt.upper() if args.opt == 'sgd' else 'Adam (fastai)'} training step on {where}, {amp}, batch {bs}, {args.size} px, median of {args.rounds} "
          f"interleaved rounds")
    rows = []
    interval = f", [95% interval over {args.blocks} blocks]" if args.blocks > 1 else ""
    print(f"{'arch':<12} {'format':<14} {'variant':<18} {'ms/step':>9} {'vs bn':>7}{interval}")
    for arch in archs.split(","):
        for fmt in args.formats.split(","):
            memory_format = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
            blocks = []
            for block in range(args.blocks):  # each block: fresh models and batch, its own interleaved rounds
                torch.manual_seed(block)
                x = torch.randn(bs, 3, args.size, args.size, device=where).to(memory_format=memory_format)
                y = torch.randint(0, 10, (bs,), device=where)
                steps = {name: training_step(m.to(where, memory_format=memory_format).train(), x, y, dtype,
                                             opt=args.opt, no_decay=no_decay_params(m))
                         for name, m in variants(arch, args.compile, only).items()}
                spread = {}
                blocks.append(interleaved(steps, rounds=args.rounds, device=where, spread=spread))
                spreads += spread.values()
                del steps
            for name in blocks[0]:
                ratios = [b[name] / b["bn"] for b in blocks]
                ratio, low, high = ratio_interval(ratios)
                seconds = statistics.median(b[name] for b in blocks)
                shown = f"  [{low:.3f}, {high:.3f}]" if args.blocks > 1 else ""
                print(f"{arch:<12} {fmt:<14} {name:<18} {seconds * 1e3:9.1f} {ratio:7.3f}{shown}", flush=True)
                rows.append({"arch": arch, "size": args.size, "bs": bs, "format": fmt, "label": name,
                             "variant": REPORT_NAMES.get(name, name), "ms_per_step": seconds * 1e3,
                             "images_per_second": bs / seconds, "ratio_to_bn": ratio,
                             **({"ratio_low": low, "ratio_high": high, "block_ratios": ratios}
                                if args.blocks > 1 else {})})
    optimizer = "SGD" if args.opt == "sgd" else "fastai Adam"
    measure = (f"median of {args.rounds} interleaved rounds of one {optimizer} step (forward, backward, update) on "
               f"{where}, {amp}, {torch.get_num_threads()} torch threads")
    if args.blocks > 1:
        measure += (f"; in {args.blocks} independent blocks (fresh models and batch each): ratio_to_bn is the "
                    f"geometric mean of the blocks' ratios, ratio_low/ratio_high {RATIO_INTERVAL}")
    quiet = quiet_line(load, os.cpu_count() or 1, spreads)
    print(f"# {quiet}")
    write_json(args.json, "train_step", argv, measure, rows, device=str(where), precision=amp,
               optimizer=args.opt, threads=torch.get_num_threads(), blocks=args.blocks, load_before=load,
               max_round_spread=max(spreads, default=0.0), quiet=not quiet.startswith("WARNING"))


RATIO_INTERVAL = "its 95% t interval (the mean of the log ratios ± t(0.975, blocks − 1) × their standard error)"


def ratio_interval(ratios: list[float]) -> tuple[float, float, float]:
    """The geometric mean of block ratios and its 95% t interval (on the log scale); one block: no interval."""
    logs = np.log(np.asarray(ratios, dtype=float))
    mean = float(logs.mean())
    if len(logs) < 2:
        return float(np.exp(mean)), float("nan"), float("nan")
    half = float(scipy.stats.t.ppf(0.975, len(logs) - 1) * logs.std(ddof=1) / np.sqrt(len(logs)))
    return float(np.exp(mean)), float(np.exp(mean - half)), float(np.exp(mean + half))


if __name__ == "__main__":
    main()
