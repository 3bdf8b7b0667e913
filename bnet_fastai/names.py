"""The names every registry accepts, importable without torch, fastai or timm.

The command line checks its arguments against these before anything heavy is imported, so ``--help``,
``--version``, ``archs`` and a bad choice answer in a fraction of a second. The registries themselves
(`models.ARCHS`, `norms.NORM_LAYERS`, `data.DATASETS`, `runs.learner.OPTIMIZERS`, `study.PROFILES`, ...) are built
from or checked against these names; ``tests/test_names.py`` asserts they are equal.
"""
from __future__ import annotations

# models.ARCHS: fastai's xresnet family, timm's ResNeSt, then the mini models that train on a CPU in minutes
XRESNETS = ("xresnet18", "xresnet34", "xresnet50", "xresnet101", "xse_resnet18", "xse_resnet34", "xse_resnet50",
            "xresnext18", "xresnext34", "xresnext50", "xse_resnext18", "xse_resnext50")
RESNESTS = ("resnest14d", "resnest26d", "resnest50d")
MINIS = ("xmininet", "xsemininet", "mininest")  # xresnet, xse_resnet and ResNeSt, one block per stage
ARCHS = XRESNETS + RESNESTS + MINIS
FASTAI_ARCHS = XRESNETS + ("xmininet", "xsemininet")  # built by fastai: `sa` and `pool` apply to these only

NORMS = ("bn", "bnet")  # norms.NORM_LAYERS
PLACEMENTS = ("all", "last")  # which norms `swap_norm` replaces
SWAP_INITS = ("auto", "copy", "identity", "zero", "official")  # how `swap_norm` initialises BNET
BNET_IMPLS = ("auto", "torch", "cpp", "triton")  # how a BNET2d computes (`bnet_fastai.nn.layers`)
ACTIVATIONS = ("relu", "mish", "silu")  # models.ACTIVATIONS
POOLS = ("avg", "max", "maxblur")  # xresnet shortcut pooling: fastai AvgPool, fastai MaxPool, kornia MaxBlurPool2D
DATASETS = ("imagenette-160", "imagenette-320", "imagenette", "imagewoof-160", "imagewoof-320", "imagewoof",
            "mnist", "fashion-mnist", "sample")  # data.DATASETS
OPTIMIZERS = ("adam", "ranger", "sgd")  # runs.learner.OPTIMIZERS: fastai's optimizers
PIPELINES = ("cached", "fastai")  # runs.learner.PIPELINES
PROFILES = ("full", "leaderboard", "cpu", "convergence", "budget", "quick")  # study.PROFILES
