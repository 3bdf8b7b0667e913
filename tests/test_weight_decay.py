"""Weight decay: BNET's kernel and bias get fastai's BatchNorm treatment, measured on a real fit."""
import fastai.callback.progress  # noqa: F401  (adds Learner.no_bar)
import torch
from fastai.data.core import DataLoaders
from fastai.learner import Learner
from fastai.optimizer import SGD
from torch import nn
from torch.testing import assert_close
from torch.utils.data import TensorDataset

from bnet_fastai import BNET2d, BNETWeightDecay, bnet_params, no_decay_params

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


def test_callback_excludes_the_kernel_from_decay_like_bn_gamma():
    plain, with_cb = _fit_one_step([]), _fit_one_step([BNETWeightDecay()])
    # fastai alone decays BNET's kernel (it looks like a conv weight) and spares the bias and BN.
    assert plain.opt.state[plain.model[1].weight].get("do_wd", True) is True
    assert with_cb.opt.state[with_cb.model[1].weight]["do_wd"] is False
    assert with_cb.opt.state[with_cb.model[1].bias]["do_wd"] is False
    # Same data, same init, one SGD step: decoupled decay shrinks the kernel by lr*wd*w0 without the
    # callback; with it the kernel differs by exactly that, and every other parameter is identical.
    w0 = _model()[1].weight.detach()
    assert_close(with_cb.model[1].weight - plain.model[1].weight, LR * WD * w0)
    for (name, a), b in zip(with_cb.model.named_parameters(), plain.model.parameters()):
        if name != "1.weight":
            assert torch.equal(a, b), name


def test_wd_bn_bias_true_decays_kernel_like_everything_else():
    learn = _fit_one_step([BNETWeightDecay()], wd_bn_bias=True)
    assert learn.opt.state[learn.model[1].weight].get("do_wd", True) is True
