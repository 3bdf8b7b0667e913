"""swap_norm's conversions (norm+act layers, refusals, registration), placement="last" by tracing, timm's route."""
import copy
import warnings
from functools import partial

import pytest
import timm
import torch
import torchvision
from timm.layers import BatchNormAct2d, SplitBatchNorm2d, convert_splitbn_model, convert_sync_batchnorm
from torch import nn

from bnet_fastai import (BNET2d, BNETAct2d, count_norms, create_model, get_norm_layer, register_conversion,
                         select_norms, swap_norm)
from bnet_fastai.nn.layers import _BNETNd
from bnet_fastai.nn.norms import NORM_CONVERSIONS, RESIDUAL_BLOCKS, _registered_block_last

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _leaf_types(model):
    return [type(m).__name__ for m in model.modules() if not list(m.children())]


# -- norm + activation layers ---------------------------------------------------------------------------------

def test_batchnormact_becomes_bnetact_with_the_same_drop_and_act_modules():
    bn = BatchNormAct2d(6, act_layer="silu", drop_layer=lambda: nn.Dropout(0.3)).eval()
    bnet = swap_norm(nn.Sequential(bn), "bnet", init="copy")[0]
    assert type(bnet) is BNETAct2d and bnet.act is bn.act and bnet.drop is bn.drop
    x = torch.randn(4, 6, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(bnet.eval()(x), bn(x), atol=1e-6, rtol=0)
        # BNET, then drop (identity in eval), then SiLU
        assert torch.equal(bnet(x), torch.nn.functional.silu(BNET2d.forward(bnet, x)))


def test_bnetact_takes_batchnormact_arguments():
    assert isinstance(BNETAct2d(4, apply_act=False).act, nn.Identity)
    assert isinstance(BNETAct2d(4, act_layer="hard_swish").act, nn.Hardswish)
    assert BNETAct2d(4, act_layer=nn.SiLU, inplace=False).act.inplace is False
    assert isinstance(BNETAct2d(4, drop_layer=nn.Dropout).drop, nn.Dropout)
    assert BNETAct2d(4, k=5).weight.shape == (4, 1, 5, 5)


def test_timm_sync_batchnorm_act_keeps_act_and_synchronises_the_normaliser():
    model = convert_sync_batchnorm(timm.create_model("mobilenetv3_small_050")).eval()
    with torch.no_grad():
        expected = model(X)
    acts = [m.act for m in model.modules() if hasattr(m, "act") and isinstance(m, nn.SyncBatchNorm)]
    swapped = swap_norm(model, "bnet", init="copy").eval()
    bnets = [m for m in swapped.modules() if isinstance(m, BNETAct2d)]
    assert len(bnets) == len(acts) > 0 and all(b.act is a for b, a in zip(bnets, acts))
    assert all(isinstance(m.norm, nn.SyncBatchNorm) for m in swapped.modules() if isinstance(m, _BNETNd))
    with torch.no_grad():
        torch.testing.assert_close(swapped(X), expected, atol=1e-5, rtol=1e-5)


def test_a_batchnorm_subclass_without_a_forward_of_its_own_is_converted_as_its_base():
    class MyBN(nn.BatchNorm2d):
        pass

    assert type(swap_norm(nn.Sequential(MyBN(3)), "bnet")[0]) is BNET2d


def test_a_batchnorm_subclass_with_its_own_forward_is_refused_in_one_line_until_registered(monkeypatch):
    model = convert_splitbn_model(create_model("xmininet"), num_splits=2)  # timm's AugMix split BN
    n_split = sum(isinstance(m, SplitBatchNorm2d) for m in model.modules())
    with pytest.raises(ValueError) as err:
        swap_norm(model, "bnet")
    message = str(err.value)
    assert "\n" not in message and "(timm.layers.split_batchnorm.SplitBatchNorm2d)" in message
    assert "its forward does more than BatchNorm" in message and "register_conversion(SplitBatchNorm2d" in message
    assert sum(isinstance(m, SplitBatchNorm2d) for m in model.modules()) == n_split  # nothing was replaced

    monkeypatch.setitem(NORM_CONVERSIONS, SplitBatchNorm2d, NORM_CONVERSIONS[nn.BatchNorm2d])
    register_conversion(SplitBatchNorm2d, lambda bn, k, init: BNET2d.from_bn(bn, k=k, init=init))
    assert count_norms(swap_norm(model, "bnet")) == {"bn": 0, "bnet": n_split}


def test_a_subclass_of_batchnormact_that_overrides_forward_is_refused():
    class Twice(BatchNormAct2d):
        def forward(self, x):
            return 2 * super().forward(x)

    with pytest.raises(ValueError, match=r"'0' \(.*Twice\): its forward does more than BatchNorm"):
        swap_norm(nn.Sequential(Twice(3)), "bnet")


def test_register_conversion_takes_batchnorm_classes_only():
    with pytest.raises(TypeError, match="takes a BatchNorm class"):
        register_conversion(nn.LayerNorm, BNET2d.from_bn)


# -- the timm norm_layer route ---------------------------------------------------------------------------------

@pytest.mark.parametrize("norm_layer", [BNET2d, "bnet", BNETAct2d, get_norm_layer("bnet", k=5)],
                         ids=["class", "name", "norm-act-class", "partial-k5"])
def test_timm_norm_act_families_build_bnet_with_every_activation(norm_layer):
    bn = timm.create_model("efficientnet_b0")
    bnet = timm.create_model("efficientnet_b0", norm_layer=norm_layer)
    assert count_norms(bnet) == {"bn": 0, "bnet": count_norms(bn)["bn"]}
    assert sum(isinstance(m, BNETAct2d) for m in bnet.modules()) == sum(
        isinstance(m, BatchNormAct2d) for m in bn.modules()) > 0
    # the same convs, drops and activations in the same order; BNET's normaliser is the one leaf added
    assert [t for t in _leaf_types(bnet) if t != "BNETNorm2d"] == [t for t in _leaf_types(bn) if t != "BatchNorm2d"]
    assert {m.k for m in bnet.modules() if isinstance(m, _BNETNd)} == {5 if isinstance(norm_layer, partial) else 3}


def test_torchvision_builders_take_bnet_as_norm_layer_despite_their_init_loops():
    # torchvision's init loop does `nn.init.constant_(m.weight, 1)` for every nn.BatchNorm2d it finds
    model = torchvision.models.resnet18(weights=None, norm_layer=BNET2d)
    assert count_norms(model) == {"bn": 0, "bnet": 20}
    assert all(isinstance(m, BNET2d) and m.weight.shape == (m.num_features, 1, 3, 3)
               for m in model.modules() if isinstance(m, _BNETNd))


# -- placement="last" -------------------------------------------------------------------------------------------

def test_placement_last_on_torchvision_resnets_is_the_released_codes_choice():
    r50 = [n for n, _ in select_norms(torchvision.models.resnet50(weights=None), "last")]
    assert r50 == [f"layer{i}.{j}.bn3" for i, blocks in enumerate([3, 4, 6, 3], 1) for j in range(blocks)]
    r18 = [n for n, _ in select_norms(torchvision.models.resnet18(weights=None), "last")]
    assert r18 == [f"layer{i}.{j}.bn2" for i in range(1, 5) for j in range(2)]


@pytest.mark.parametrize("build", [lambda: create_model("xresnet50"), lambda: create_model("xse_resnext50"),
                                   lambda: create_model("resnest50d"), lambda: timm.create_model("resnet26d")],
                         ids=["xresnet50", "xse_resnext50", "resnest50d", "timm-resnet26d"])
def test_the_traced_rule_agrees_with_the_block_registry(build):
    model = build()
    registry = [_registered_block_last(n, m) for n, m in model.named_modules()
                if isinstance(m, tuple(RESIDUAL_BLOCKS))]
    assert registry and [n for n, _ in select_norms(model, "last")] == registry


class Gated(nn.Module):
    """A residual block fx cannot trace (control flow on a tensor's value)."""

    def __init__(self, c: int = 4):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)

    def forward(self, x):
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        if x.mean() > -1e9:
            y = y * 1.0
        return torch.relu(x + y)


def test_untraceable_blocks_are_named_then_read_from_the_registry(monkeypatch):
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4),
                          torchvision.models.resnet.BasicBlock(4, 4), Gated())
    with pytest.warns(UserWarning, match=r"torch.fx cannot trace Gated, so 2 norm\(s\) inside \(3.bn1 ...\)"):
        assert [n for n, _ in select_norms(model, "last")] == ["2.bn2"]
    monkeypatch.setitem(RESIDUAL_BLOCKS, Gated, "shortcut")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [n for n, _ in select_norms(model, "last")] == ["2.bn2", "3.bn2"]
    model = swap_norm(model, "bnet", placement="last")
    assert [type(model[i].bn2).__name__ for i in (2, 3)] == ["BNET2d", "BNET2d"]


def test_a_model_without_residual_additions_is_refused_for_last():
    with pytest.raises(ValueError, match="found no residual block in DenseNet: no addition of a shortcut"):
        select_norms(timm.create_model("densenet121"), "last")


def test_a_model_without_batchnorm_is_refused_and_left_alone():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.LayerNorm(4))
    before = copy.deepcopy(model)
    with pytest.raises(ValueError, match="^no BatchNorm layer in Sequential: it uses GroupNorm, LayerNorm; BNET"):
        swap_norm(model, "bnet")
    assert str(model) == str(before)
    with pytest.raises(ValueError, match="no BatchNorm layer in Sequential: it has no normalisation layer"):
        swap_norm(nn.Sequential(nn.Linear(2, 2)), "bnet")


class _Blk(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.c2, self.b2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        return x + self.b2(self.c2(self.b1(self.c1(x))))


class _Looped(nn.Module):
    """Untraceable as a whole (control flow on a value); its blocks, in a ModuleList, are traceable."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([_Blk(), _Blk()])

    def forward(self, x):
        for block in self.blocks:
            x = block(x) if x.sum() > 0 else block(-x)
        return x


def test_blocks_held_in_a_module_list_of_an_untraceable_model_are_found():
    assert [n for n, _ in select_norms(_Looped(), "last")] == ["blocks.0.b2", "blocks.1.b2"]
