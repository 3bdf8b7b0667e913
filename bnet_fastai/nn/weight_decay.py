"""Which parameters are weight-decayed, for BN and for BNET alike.

The rule (both arms of every comparison): a norm layer's affine parameters follow fastai's
``Learner(wd_bn_bias=...)``. With fastai's default ``wd_bn_bias=False`` neither BN's gamma/beta nor
BNET's depthwise kernel/bias is decayed; every other weight is, and (fastai's rule) no bias is.

fastai applies the rule through ``norm_bias_params``, which knows the classes in ``fastai.torch_core.norm_types``
and any ``.bias``. BNET is deliberately not a ``_BatchNorm`` (see `bnet_fastai.nn.layers`), so `import bnet_fastai`
adds it to ``norm_types`` (`bnet_fastai.nn.registration`): any fastai ``Learner`` then treats a BNET's kernel and
bias as BN's gamma and beta, with no code of the user's. `BNETWeightDecay` states the same rule explicitly (the
project's runs use it; it changes nothing once fastai knows BNET).
"""
from __future__ import annotations

from fastai.callback.core import Callback
from fastai.torch_core import norm_bias_params
from torch import nn

from bnet_fastai.nn.layers import _BNETNd


def bnet_params(model: nn.Module) -> list[nn.Parameter]:
    """BNET kernels and biases: the parameters that play the role of BN's gamma and beta."""
    return [p for m in model.modules() if isinstance(m, _BNETNd) for p in (m.weight, m.bias)]


def no_decay_params(model: nn.Module) -> list[nn.Parameter]:
    """Parameters excluded from weight decay under fastai's default: BN, BNET and every bias."""
    found = {id(p): p for p in norm_bias_params(model, with_bias=True)}
    found.update({id(p): p for p in bnet_params(model)})
    return list(found.values())


class BNETWeightDecay(Callback):
    """Give BNET's kernel and bias fastai's BatchNorm treatment: no weight decay unless `wd_bn_bias`."""

    order = 0  # after the optimizer exists (fit creates it before `before_fit`), before any step

    def before_fit(self) -> None:
        if self.learn.wd_bn_bias or self.learn.opt is None:  # no optimizer: `learn.validate()` before any fit
            return
        for p in bnet_params(self.learn.model):
            self.learn.opt.state[p]["do_wd"] = False
