"""Weight decay: BNET's kernel and bias get fastai's BatchNorm treatment, measured on a real fit."""
import subprocess
import sys

import fastai.callback.progress  # noqa: F401  (adds Learner.no_bar)
import fastai.torch_core
import pytest
import torch
from fastai.data.core import DataLoaders
from fastai.learner import Learner
from fastai.optimizer import SGD
from torch import nn
from torch.testing import assert_close
from torch.utils.data import TensorDataset

from bnet_fastai import BNET2d, BNETWeightDecay, bnet_params, no_decay_params
from bnet_fastai.nn.layers import _BNETNd

LR, WD = 0.1, 0.5


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), BNET2d(4, k=3), nn.ReLU(),
                         nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))


def _fit_one_step(cbs, wd_bn_bias=False):
    torch.manual_seed(0)
    ds = TensorDataset(torch.randn(8, 3, 6, 6), torch.randint(0, 2, (8,)))
    dls = DataLoaders.from_dsets(ds, ds, bs=8, shuffle=False, device="cpu")
    learn = Learner(dls, _model(), loss_func=nn.CrossEntropyLoss(), opt_func=SGD, cbs=cbs,
                    wd_bn_bias=wd_bn_bias)
    with learn.no_logging(), learn.no_bar():
        learn.fit(1, lr=LR, wd=WD)
    return learn


def test_bnet_params_are_kernel_and_bias_and_counted_as_no_decay():
    model = _model()
    assert [p.shape for p in bnet_params(model)] == [(4, 1, 3, 3), (4,)]
    no_wd = {id(p) for p in no_decay_params(model)}
    assert {id(p) for p in bnet_params(model)} <= no_wd
    assert {id(model[4].weight), id(model[4].bias), id(model[7].bias)} <= no_wd
    assert id(model[0].weight) not in no_wd and id(model[7].weight) not in no_wd


def test_a_plain_fastai_learner_spares_the_kernel_like_bn_gamma(monkeypatch):
    """`import bnet_fastai` put BNET in fastai's norm_types: no callback needed. Without it (fastai's own tuple),
    fastai takes the kernel for a conv weight and decays it."""
    plain, with_cb = _fit_one_step([]), _fit_one_step([BNETWeightDecay()])
    for learn in (plain, with_cb):
        assert learn.opt.state[learn.model[1].weight]["do_wd"] is False
        assert learn.opt.state[learn.model[1].bias]["do_wd"] is False
    assert all(torch.equal(a, b) for a, b in zip(plain.model.parameters(), with_cb.model.parameters()))
    monkeypatch.setattr(fastai.torch_core, "norm_types",
                        tuple(t for t in fastai.torch_core.norm_types if t is not _BNETNd))
    unaware = _fit_one_step([])
    assert unaware.opt.state[unaware.model[1].weight].get("do_wd", True) is True
    # Same data, same init, one SGD step: decoupled decay shrinks the kernel by lr*wd*w0 when fastai does not
    # know BNET; otherwise the kernel differs by exactly that, and every other parameter is identical.
    w0 = _model()[1].weight.detach()
    assert_close(plain.model[1].weight - unaware.model[1].weight, LR * WD * w0)
    for (name, a), b in zip(plain.model.named_parameters(), unaware.model.parameters()):
        if name != "1.weight":
            assert torch.equal(a, b), name


@pytest.mark.parametrize("order", ["import fastai.learner, bnet_fastai", "import bnet_fastai, fastai.learner"])
def test_importing_bnet_fastai_teaches_fastai_bnet_in_either_order(order):
    code = (f"{order}\nfrom fastai.torch_core import norm_bias_params\nfrom bnet_fastai import BNET2d\n"
            "print(len(norm_bias_params(BNET2d(4), with_bias=False)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["2"]  # the kernel and the bias, as BN's gamma and beta


def test_wd_bn_bias_true_decays_kernel_like_everything_else():
    learn = _fit_one_step([BNETWeightDecay()], wd_bn_bias=True)
    assert learn.opt.state[learn.model[1].weight].get("do_wd", True) is True
