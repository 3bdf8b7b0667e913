"""The torchvision and timm networks that tests/test_real_models.py converts, and the README table they give.

Chosen to cover the layer kinds, not to be easy: plain BatchNorm2d and timm's BatchNormAct2d; basic,
bottleneck, Res2Net, split-attention, selective-kernel, dual-path, inverted-residual, CSP, OSA and DLA-tree
blocks; re-parameterisable blocks (RepVGG, FastViT's RepMixer); SE/ESE attention, depthwise convs, stochastic
depth; dense (concatenating) networks with no residual addition at all.

    python -m tests.model_zoo            # prints the README's "What works where" table from this list
    python -m tests.model_zoo --numbers  # the measured differences behind it, one row per network (~2 min)
"""
from __future__ import annotations

from dataclasses import dataclass

import timm
import torchvision
from torch import nn


@dataclass(frozen=True)
class Zoo:
    library: str  # "torchvision" or "timm"
    name: str
    kinds: str  # what the network is made of, for the table
    residual: bool = True  # has residual additions, so placement="last" applies
    route: bool = True  # the builder takes norm_layer= (torchvision: a class; timm: a class, partial or name)
    slow: bool = False  # more than a few seconds per test on 2 CPU cores
    route_keeps: int = 0  # BatchNorms the norm_layer= route leaves in place (the builder makes its own)
    reparam: bool = False  # re-parameterisable blocks: reparameterize_model refuses once they hold BNET
    last_norm: bool = True  # placement="last" finds a last norm (not where every main path sums branches)
    kwargs: tuple[tuple[str, object], ...] = ()  # passed to the builder (features_only=True ...)
    input: tuple[int, ...] = (2, 3, 64, 64)  # the test input's shape: (N, C, T, H, W) for a 3-D network
    any_size: bool = True  # the network takes any image size (export with a dynamic one); False: its own size

    @property
    def id(self) -> str:
        flags = "".join(f"-{k}" for k, v in self.kwargs if v is True)
        return f"{'tv' if self.library == 'torchvision' else 'timm'}-{self.name}{flags}"

    @property
    def label(self) -> str:
        """The network as the README's table names it: its name, and what the builder was given that counts."""
        given = ", ".join(f"{k}={v}" for k, v in self.kwargs if v is not None)
        return f"`{self.name}`" + (f" ({given})" if given else "")

    def build(self, **kw) -> nn.Module:
        kw = {**dict(self.kwargs), **kw}
        if self.library == "torchvision":
            return torchvision.models.get_model(self.name, weights=None, **kw)
        return timm.create_model(self.name, pretrained=False, **kw)


ZOO = [
    Zoo("torchvision", "resnet18", "BasicBlock"),
    Zoo("torchvision", "resnet50", "Bottleneck (the released code's network)", slow=True),
    Zoo("torchvision", "mobilenet_v3_small", "inverted residual, SE, hardswish, Conv2dNormActivation"),
    Zoo("torchvision", "efficientnet_b0", "MBConv, SE, stochastic depth", slow=True),
    Zoo("torchvision", "regnet_x_400mf", "RegNet bottleneck, grouped convs"),
    Zoo("torchvision", "densenet121", "dense blocks (concatenation)", residual=False, route=False, slow=True),
    Zoo("timm", "resnet18", "BasicBlock"),
    Zoo("timm", "resnet50d", "Bottleneck, deep stem, avg-pool shortcut", slow=True),
    Zoo("timm", "res2net50_26w_4s", "Res2Net hierarchical bottleneck", slow=True),
    Zoo("timm", "resnest14d", "split attention (1x1 maps), avg-pool shortcut"),
    Zoo("timm", "efficientnet_b0", "BatchNormAct2d, inverted residual, SE"),
    Zoo("timm", "mobilenetv3_small_050", "BatchNormAct2d, hard-swish, SE", route=False),
    Zoo("timm", "regnetx_002", "BatchNormAct2d, RegNet bottleneck"),
    Zoo("timm", "cspresnet50", "BatchNormAct2d, cross-stage partial", slow=True),
    Zoo("timm", "ese_vovnet19b_dw", "BatchNormAct2d, one-shot aggregation (no residual in 19b), ESE, depthwise",
        residual=False),
    Zoo("timm", "dla34", "DLA tree with residual roots", route=False),
    Zoo("timm", "densenet121", "BatchNormAct2d, dense blocks (concatenation)", residual=False, slow=True),
    Zoo("timm", "skresnet18", "selective-kernel attention with its own BN", route_keeps=8, slow=True),
    Zoo("timm", "dpn68", "dual-path blocks (a sliced shortcut), pre-activation", route_keeps=70, slow=True),
    Zoo("timm", "fastvit_t8", "RepMixer (re-parameterisable branches), ConvMlp", route_keeps=70,
        reparam=True, slow=True),
    Zoo("timm", "repvgg_a0", "RepVGG blocks: 3x3, 1x1 and identity-BN branches summed", reparam=True,
        last_norm=False, slow=True),
    Zoo("timm", "efficientvit_b0", "EfficientViT (MIT): LiteMLA attention that timm marks not to trace, MBConv",
        route_keeps=1),
    Zoo("timm", "efficientvit_m0", "EfficientViT (MSRA): cascaded group attention not to trace, ConvNorm; "
        "attention biases fix the image size", route=False, any_size=False, slow=True),
    Zoo("timm", "resnet18", "a `features_only` backbone: five feature maps out", kwargs=(("features_only", True),)),
    Zoo("torchvision", "lraspp_mobilenet_v3_large", "segmentation: MobileNetV3 backbone, LR-ASPP head",
        route=False, kwargs=(("weights_backbone", None),)),
    Zoo("torchvision", "r3d_18", "3-D video ResNet: Conv3d, BatchNorm3d", route=False, slow=True,
        input=(2, 3, 4, 64, 64)),
]
# No BatchNorm at all: swap_norm refuses them, naming the norm they use.
NO_BATCHNORM = [Zoo("timm", "convnext_atto", "LayerNorm2d"), Zoo("torchvision", "vit_b_16", "LayerNorm",
                                                                  slow=True)]


def table() -> str:
    """The README's table: one row per network, from `ZOO` and `NO_BATCHNORM`, every cell a test."""
    rows = ["| library | network | made of | `swap_norm` all | `swap_norm` last | `norm_layer=` | "
            "`fuse_bnet` | `torch.export` / ONNX |",
            "|---|---|---|---|---|---|---|---|"]
    for z in ZOO:
        last = ("refused: no residual addition" if not z.residual else
                "refused: every main path ends in a sum of branches" if not z.last_norm else "yes")
        route = ("the builder takes no `norm_layer`: use `swap_norm`" if not z.route else
                 f"keeps {z.route_keeps} BN: `create_timm_model` converts them" if z.route_keeps else "yes")
        fuse = "yes (`reparameterize_model` refused)" if z.reparam else "yes"
        export = "yes" if z.any_size else "yes, at its image size"
        rows.append(f"| {z.library} | {z.label} | {z.kinds} | yes | {last} | {route} | {fuse} | {export} |")
    for z in NO_BATCHNORM:
        rows.append(f"| {z.library} | {z.label} | {z.kinds} | refused: no BatchNorm | refused | n/a | n/a | n/a |")
    return "\n".join(rows)


def numbers() -> None:
    """Per network: BN layers; relative output difference of swap_norm(init="copy") for placement all and last
    (with the BNET count); of fuse_bnet for k = 1, 3, 5. The comparisons tests/test_real_models.py bounds by 1e-5."""
    import copy

    import torch

    from bnet_fastai import count_norms, fuse_bnet, swap_norm

    from .helpers import perturb_bnets
    from .test_real_models import _input, _rel, _trained_like

    print("network | BN layers | copy, all | copy, last (BNETs) | fuse k=1 | k=3 | k=5")
    for z in ZOO:
        torch.manual_seed(0)
        model = _trained_like(z.build())
        X = _input(z)
        with torch.no_grad():
            expected, row = model(X), [z.id, str(count_norms(model)["bn"])]
            for placement in ("all", "last") if z.residual and z.last_norm else ("all",):
                swapped = swap_norm(copy.deepcopy(model), "bnet", placement=placement, init="copy").eval()
                n = f" ({count_norms(swapped)['bnet']})" if placement == "last" else ""
                row.append(f"{_rel(swapped(X), expected):.1e}{n}")
            if not (z.residual and z.last_norm):
                row.append("-")
            for k in (1, 3, 5):
                torch.manual_seed(k)
                swapped = perturb_bnets(swap_norm(copy.deepcopy(model), "bnet", k=k, init="copy"), 0.1 / k**2).eval()
                row.append(f"{_rel(fuse_bnet(swapped)(X), swapped(X)):.1e}")
        print(" | ".join(row), flush=True)


if __name__ == "__main__":
    import sys

    numbers() if "--numbers" in sys.argv[1:] else print(table())
