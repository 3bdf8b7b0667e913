"""Bad input: a ValueError naming the valid choices, raised before any model is built."""
import pytest
from torch import nn

from bnet_fastai import BNET2d, create_model, get_norm_layer, swap_norm
from bnet_fastai.nn.models import ARCHS, Arch

BAD_CREATE = [
    (dict(arch="resnet9000"), "unknown arch 'resnet9000'; valid choices: xresnet18, xresnet34"),
    (dict(norm="layernorm"), "unknown norm 'layernorm'; valid choices: bn, bnet"),
    (dict(placement="first"), "unknown placement 'first'; valid choices: all, last"),
    (dict(k=4), "k must be a positive odd integer (1, 3, 5, 7, ...), got 4"),
    (dict(k=0), "got 0"),
    (dict(k=-3), "got -3"),
    (dict(k=3.0), "got 3.0"),
    (dict(act="tanh"), "unknown act 'tanh'; valid choices: relu, mish, silu"),
    (dict(bnet_init="random"), "unknown bnet_init 'random'; valid choices: auto, copy, identity, zero, official"),
]


@pytest.mark.parametrize("bad,message", BAD_CREATE)
def test_create_model_rejects_bad_input_before_building(monkeypatch, bad, message):
    built = []
    monkeypatch.setitem(ARCHS, "xmininet", Arch("fastai", lambda **kw: built.append(kw) or nn.Identity()))
    args = dict(arch="xmininet", norm="bnet") | bad
    with pytest.raises(ValueError) as err:
        create_model(args.pop("arch"), **args)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert built == []


@pytest.mark.parametrize("kw,message", [
    (dict(k=2), "positive odd integer"), (dict(k=-1), "positive odd integer"),
    (dict(init="kaiming"), "unknown BNET init 'kaiming'; valid choices: identity, zero, official")])
def test_bnet_layer_rejects_bad_input(kw, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        BNET2d(8, **kw)


def test_swap_norm_and_get_norm_layer_reject_bad_input_and_leave_the_model_alone():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    with pytest.raises(ValueError, match="valid choices: bn, bnet"):
        swap_norm(model, "gn")
    with pytest.raises(ValueError, match="got 6"):
        swap_norm(model, "bnet", k=6)
    assert type(model[1]) is nn.BatchNorm2d
    with pytest.raises(ValueError, match="placement='last' found no residual block in Sequential"):
        swap_norm(model, "bnet", placement="last")
    with pytest.raises(ValueError, match="valid choices: 1, 2, 3"):
        get_norm_layer("bnet", ndim=4)
