"""`import bnet_fastai` teaches timm and fastai about BNET, without importing torch, timm or fastai itself.

- **timm**: BNET joins timm's norm factories (``norm_layer="bnet"``, and `BNETAct2d` for its norm+act
  families): `bnet_fastai.nn.norm_act` does it when imported.
- **fastai**: BNET joins ``fastai.torch_core.norm_types``, the tuple fastai's ``norm_bias_params`` and
  ``cond_init`` read at call time. So any fastai ``Learner`` treats a BNET's kernel and bias as BatchNorm's
  gamma and beta: no weight decay under fastai's default ``wd_bn_bias=False``, trained when a model is frozen
  (``train_bn``), left alone by fastai's init. The same rule `BNETWeightDecay` applies in this project's runs.

Importing the package must not load torch (the command line answers ``--help`` without it), so `install`
registers at once with a library whose module is already imported, and otherwise puts a finder on
`sys.meta_path` that registers right after that module finishes loading, then removes itself. Either way
``import timm, bnet_fastai`` and ``import bnet_fastai, timm`` (fastai likewise) both work.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys


def _register_timm() -> None:
    importlib.import_module("bnet_fastai.nn.norm_act")  # its import registers BNET with timm


def _register_fastai() -> None:
    layers = importlib.import_module("bnet_fastai.nn.layers")
    torch_core = sys.modules["fastai.torch_core"]
    if layers._BNETNd not in torch_core.norm_types:
        torch_core.norm_types = (*torch_core.norm_types, layers._BNETNd)


_TARGETS = {"timm.layers": _register_timm, "fastai.torch_core": _register_fastai}


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds a target module as the path finder would, and registers BNET once the module has executed."""

    def find_spec(self, name, path, target=None):
        if name not in _TARGETS or name not in _pending:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run = spec.loader.exec_module

        def exec_module(module) -> None:
            run(module)
            _pending.discard(name)
            if not _pending:
                _uninstall()
            _TARGETS[name]()

        spec.loader.exec_module = exec_module
        return spec


_FINDER = _AfterImport()
_pending: set[str] = set()


def _uninstall() -> None:
    if _FINDER in sys.meta_path:
        sys.meta_path.remove(_FINDER)


def install() -> None:
    """Register with each library now if its module is loaded, else as soon as it is."""
    for name, register in _TARGETS.items():
        if name in sys.modules:
            register()
        else:
            _pending.add(name)
    if _pending and _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)
