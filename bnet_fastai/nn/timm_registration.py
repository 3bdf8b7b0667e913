"""`import bnet_fastai` makes timm resolve ``norm_layer="bnet"``, without importing torch or timm itself.

BNET is added to timm's norm factories by `bnet_fastai.nn.norm_act` (which imports torch and timm). Importing
the package must not load torch (the command line answers ``--help`` without it), so `install` registers at
once when ``timm.layers`` is already imported, and otherwise puts a finder on `sys.meta_path` that registers
right after ``timm.layers`` finishes loading (through ``import timm`` or any of its modules), then removes
itself. Either way ``import timm, bnet_fastai; timm.create_model("resnet18", norm_layer="bnet")`` works, in
either import order.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys

_TARGET = "timm.layers"


def _register() -> None:
    importlib.import_module("bnet_fastai.nn.norm_act")  # its import registers BNET with timm


class _AfterTimmLayers(importlib.abc.MetaPathFinder):
    """Finds ``timm.layers`` as the path finder would, and registers BNET once its module has executed."""

    def find_spec(self, name, path, target=None):
        if name != _TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader = spec.loader
        run = loader.exec_module

        def exec_module(module) -> None:
            run(module)
            _uninstall()
            _register()

        loader.exec_module = exec_module
        return spec


_FINDER = _AfterTimmLayers()


def _uninstall() -> None:
    if _FINDER in sys.meta_path:
        sys.meta_path.remove(_FINDER)


def install() -> None:
    """Register now if timm's layers are loaded, else as soon as they are."""
    if _TARGET in sys.modules:
        _register()
    elif _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)
