"""BNET in anyone's model, round 4 (issue 35): one value per channel, folds into parametrized and shared convs,
SSDlite, residual branches hidden in modules timm does not trace, non-BatchNorm norms in create_timm_model,
torch.fx, the "bnet" name, wrong types, and timm builders that refuse norm_layer. The networks of the zoo
(tests/model_zoo.py) go through tests/test_real_models.py."""
import copy
import re
import warnings
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from timm.layers import register_notrace_module
from torch import nn
from torch.nn.utils import parametrizations, parametrize, spectral_norm, weight_norm
from torchvision.models.feature_extraction import create_feature_extractor

from bnet_fastai import (BNET1d, BNET2d, FusedBNET, count_norms, create_model, create_timm_model, fuse_bnet,
                         load_model, select_norms, swap_norm)
from bnet_fastai.nn.fuse import FusedDepthwise
from bnet_fastai.nn.layers import _BNETNd, set_impl, set_one_map
from bnet_fastai.nn.norms import HIDDEN_LAST

from .helpers import perturb_bnets

X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _stats(model: nn.Module, seed: int = 0) -> nn.Module:
    """Running statistics far from a fresh layer's, kernels away from the identity; eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BNETNd):
                m.norm.running_mean.normal_(0, 0.5, generator=g)
                m.norm.running_var.uniform_(0.5, 2.0, generator=g)
    return perturb_bnets(model, 0.2).eval()


# -- 1. one value per channel ---------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", ["torch", "auto"])
@pytest.mark.parametrize("one_map", [True, False])
@pytest.mark.parametrize("layer,shape", [(BNET2d, (1, 4, 1, 1)), (BNET1d, (1, 4)), (BNET1d, (1, 4, 1))])
def test_one_value_per_channel_is_refused_as_batchnorm_refuses_it(layer, shape, impl, one_map):
    bnet = set_one_map(set_impl(layer(4), impl) if layer is BNET2d else layer(4), one_map).train()
    bn = nn.BatchNorm2d(4) if layer is BNET2d else nn.BatchNorm1d(4)
    x = torch.randn(shape, requires_grad=True)
    with pytest.raises(ValueError) as theirs:
        bn(x)
    with pytest.raises(ValueError) as ours:
        bnet(x)
    prefix = "Expected more than 1 value per channel when training, got input size"
    assert str(theirs.value).startswith(prefix) and str(ours.value).startswith(prefix)
    assert torch.equal(bnet.norm.running_var, torch.ones(4)) and torch.equal(bnet.norm.running_mean, torch.zeros(4))
    bnet(torch.randn(2, *shape[1:]))  # two values per channel: trains
    assert torch.isfinite(bnet.norm.running_var).all() and not torch.equal(bnet.norm.running_var, torch.ones(4))


def test_a_resnest_trained_on_one_image_stops_and_keeps_finite_statistics():
    """ResNeSt's split attention normalises 1x1 maps: one image is one value per channel there."""
    model = create_model("mininest", "bnet").train()
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        model(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        create_model("mininest", "bn").train()(torch.randn(1, 3, 32, 32))  # as the BN network does
    bnets = [m for m in model.modules() if isinstance(m, _BNETNd)]
    assert all(torch.isfinite(m.norm.running_var).all() for m in bnets)
    with torch.no_grad():
        assert torch.isfinite(model.eval()(torch.randn(1, 3, 32, 32))).all()


# -- 2, 3, 6. fuse_bnet into parametrized and shared convs, and SSDlite ----------------------------------------

@pytest.mark.parametrize("wrap", [parametrizations.weight_norm, parametrizations.spectral_norm, spectral_norm],
                         ids=["weight_norm", "spectral_norm", "spectral_norm-hook"])
def test_fuse_bnet_folds_into_a_conv_with_a_computed_weight(wrap):
    torch.manual_seed(0)
    model = _stats(nn.Sequential(wrap(nn.Conv2d(3, 4, 3, padding=1)), BNET2d(4), nn.ReLU()))
    with torch.no_grad():
        expected = model(X)
        fused = fuse_bnet(model)
        assert _rel(fused(X), expected) <= 1e-6
        assert _rel(model(X), expected) == 0  # the original keeps its parametrization and its function
    assert type(fused[1]) is FusedDepthwise and type(fused[0]) is nn.Conv2d  # folded into a plain conv
    if wrap is not spectral_norm:
        assert parametrize.is_parametrized(model[0], "weight")


def test_fuse_bnet_refuses_a_model_torch_cannot_copy_in_one_line():
    model = _stats(nn.Sequential(weight_norm(nn.Conv2d(3, 4, 3, padding=1)), BNET2d(4)))
    with pytest.raises(ValueError, match=r"^fuse_bnet copies the model, and torch cannot copy one holding "
                                         r"torch.nn.utils.weight_norm .*parametrizations.weight_norm") as err:
        fuse_bnet(model)
    assert "\n" not in str(err.value)


class Trident(nn.Module):
    """TridentNet's branches: one weight Parameter in three convs of different dilation, each with its own norm;
    and a conv module called twice, each call normalised on its own."""

    def __init__(self, norm=BNET2d):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(3, 4, 3, padding=d, dilation=d, bias=False) for d in (1, 2, 3))
        for conv in self.convs[1:]:
            conv.weight = self.convs[0].weight
        self.norms = nn.ModuleList(norm(4) for _ in range(3))
        self.twice, self.first, self.second = nn.Conv2d(4, 4, 1), norm(4), norm(4)

    def forward(self, x):
        y = sum(n(c(x)) for c, n in zip(self.convs, self.norms))
        return self.first(self.twice(y)) + self.second(self.twice(y * 2))


def test_fuse_bnet_keeps_convs_that_share_one_weight_apart():
    torch.manual_seed(0)
    model = _stats(Trident())
    shared = model.convs[0].weight.detach().clone()
    with torch.no_grad():
        expected = model(X)
        fused = fuse_bnet(model)
        assert _rel(fused(X), expected) <= 1e-6
    assert all(type(n) is FusedDepthwise for n in fused.norms)  # each branch folded into its own copy
    assert len({id(c.weight) for c in fused.convs}) == 3
    assert type(fused.first) is type(fused.second) is FusedBNET  # the conv called twice is folded into by none
    assert torch.equal(model.convs[0].weight, shared) and model.convs[2].weight is model.convs[0].weight


def test_fuse_bn_keeps_a_conv_called_twice_as_it_is():
    from bnet_fastai.nn.fuse import fuse_bn

    torch.manual_seed(0)
    model = Trident(nn.BatchNorm2d)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.5), m.running_var.uniform_(0.5, 2.0), m.weight.uniform_(0.5, 1.5)
        model.eval()
        assert _rel(fuse_bn(model)(X), model(X)) <= 1e-6


@pytest.mark.slow
def test_fuse_bnet_on_torchvisions_ssdlite_matches_its_backbone_and_head():
    torch.manual_seed(0)
    model = torchvision.models.detection.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None)
    model = _stats(swap_norm(model, "bnet"))
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        fused = fuse_bnet(model)
        assert count_norms(fused)["bnet"] == 0
        assert sum(isinstance(m, FusedDepthwise) for m in fused.modules()) > 0
        ours, theirs = fused.backbone(x), model.backbone(x)
        assert max(_rel(ours[k], theirs[k]) for k in theirs) <= 1e-5
        ours, theirs = fused.head(list(ours.values())), model.head(list(theirs.values()))
        assert max(_rel(ours[k], theirs[k]) for k in theirs) <= 1e-5


# -- 4. residual branches inside modules timm does not trace --------------------------------------------------

@pytest.mark.parametrize("name,cls,count", [("efficientvit_b0", "LiteMLA", 4),
                                            ("efficientvit_m0", "LocalWindowAttention", 6)])
def test_last_looks_inside_the_attention_timm_does_not_trace(name, cls, count):
    model = timm.create_model(name)
    hidden = [n for n, m in model.named_modules() if type(m).__name__ == cls]
    inner = next(p for c, p in HIDDEN_LAST.items() if c.__name__ == cls)
    assert len(hidden) == count
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        chosen = {n for n, _ in select_norms(model, "last")}
    assert {f"{h}.{inner}" for h in hidden} <= chosen
    # the registered path is the last norm the module calls, in an eager forward
    calls = []
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: calls.append(n))
             for n, m in model.get_submodule(hidden[0]).named_modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        model.eval()(torch.randn(1, 3, 224, 224))
    for h in hooks:
        h.remove()
    assert calls[-1] == inner and len(calls) == len(hooks)


class OpaqueMixer(nn.Module):
    """A module timm is told not to trace, holding the branch's norms."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)) if x.shape[1] == 4 else x


register_notrace_module(OpaqueMixer)


class HiddenBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.mix, self.ffn = OpaqueMixer(), nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))

    def forward(self, x):
        x = self.bn(self.stem(x))
        x = x + self.mix(x)
        return x + self.ffn(x)


def test_a_branch_ending_in_an_unknown_untraced_module_is_named_and_keeps_batchnorm():
    model = HiddenBlocks()
    with pytest.warns(UserWarning, match=r"^placement='last': 1 residual branch\(es\) end in OpaqueMixer, which "
                                         r"torch.fx does not trace, .* keep BatchNorm \(mix \.\.\.\); add the class "
                                         r"and the path of its last norm to bnet_fastai.nn.norms.HIDDEN_LAST"):
        swap_norm(model, "bnet", placement="last")
    assert [n for n, m in model.named_modules() if isinstance(m, _BNETNd)] == ["ffn.1"]
    model = HiddenBlocks()
    HIDDEN_LAST[OpaqueMixer] = "bn"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            swap_norm(model, "bnet", placement="last")
    finally:
        del HIDDEN_LAST[OpaqueMixer]
    assert [n for n, m in model.named_modules() if isinstance(m, _BNETNd)] == ["mix.bn", "ffn.1"]


# -- 5, 8, 10. create_timm_model: BatchNorm only, the name "bnet", builders that refuse norm_layer -------------

def test_create_timm_model_keeps_groupnorm_and_loads_a_swap_norm_state_dict():
    model = create_timm_model("shvit_s1")
    family = timm.create_model("shvit_s1")
    n_bn = count_norms(family)["bn"]
    n_gn = sum(isinstance(m, nn.GroupNorm) for m in family.modules())
    assert (n_bn, n_gn) == (74, 9)
    assert count_norms(model) == {"bn": 0, "bnet": n_bn}
    assert sum(isinstance(m, nn.GroupNorm) for m in model.modules()) == n_gn
    model.load_state_dict(swap_norm(family, "bnet").state_dict())  # strict: the same modules, the same names


@pytest.mark.parametrize("name,uses", [("resnetv2_50x1_bit", "GroupNormAct"), ("convnext_atto", "LayerNorm2d")])
def test_create_timm_model_refuses_a_network_without_batchnorm_as_swap_norm_does(name, uses):
    with pytest.raises(ValueError) as err:
        create_timm_model(name)
    assert str(err.value) == f"no BatchNorm layer in {type(timm.create_model(name)).__name__}: it uses {uses}; " \
                             f"BNET replaces BatchNorm only"


@pytest.mark.parametrize("name,eps", [("mobilenetv4_conv_small", 1e-5), ("tf_efficientnet_b0", 1e-3)])
def test_create_timm_model_converts_families_whose_builder_refuses_norm_layer(name, eps):
    with pytest.raises(TypeError):  # what timm's builder says to norm_layer=
        timm.create_model(name, norm_layer=BNET2d)
    model = create_timm_model(name, k=5)
    family = timm.create_model(name)
    assert count_norms(model) == {"bn": 0, "bnet": count_norms(family)["bn"]}
    assert {(m.k, m.eps) for m in model.modules() if isinstance(m, _BNETNd)} == {(5, eps)}
    assert model.state_dict().keys() == swap_norm(family, "bnet", k=5).state_dict().keys()


NO_NAME = ["visformer_tiny", "efficientvit_b0", "inception_next_tiny", "shvit_s1", "fasternet_t0"]


@pytest.mark.parametrize("name", NO_NAME)
def test_builders_that_call_norm_layer_take_the_class_as_the_readme_says(name):
    with pytest.raises(TypeError, match="'str' object is not callable"):
        timm.create_model(name, norm_layer="bnet")  # timm's builder calls norm_layer(...) itself
    model = create_timm_model(name)
    assert count_norms(model) == {"bn": 0, "bnet": count_norms(timm.create_model(name))["bn"]}
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    stated = re.search(r"the name \"bnet\" only where .*? need the class", readme, re.S).group(0)
    assert name.split("_")[0] in stated.replace("\n# ", " ")


# -- 7. torch.fx ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_symbolic_trace_computes_what_the_bnet_model_computes(mode, momentum):
    torch.manual_seed(0)
    model = swap_norm(torchvision.models.resnet18(num_classes=3), "bnet")
    for m in model.modules():
        if isinstance(m, _BNETNd):
            m.norm.momentum = momentum
    model = getattr(_stats(model), mode)()
    traced = torch.fx.symbolic_trace(copy.deepcopy(model))
    x = torch.randn(4, 3, 64, 64)
    ours, theirs = traced(x), model(x)
    assert _rel(ours, theirs) <= 1e-5
    for (name, a), b in zip(model.state_dict().items(), traced.state_dict().values()):  # running stats updated alike
        assert torch.allclose(a.float(), b.float(), rtol=1e-5, atol=1e-6), name
    if mode == "train":
        assert model.bn1.norm.num_batches_tracked.item() == traced.state_dict()["bn1.norm.num_batches_tracked"] == 1
    ours.pow(2).mean().backward()
    theirs.pow(2).mean().backward()
    for (name, a), b in zip(model.named_parameters(), traced.parameters()):
        assert _rel(b.grad, a.grad) <= 1e-4, name


def test_bnet1d_traces_on_both_of_its_ranks():
    torch.manual_seed(0)
    model = _stats(nn.Sequential(nn.Linear(5, 6), BNET1d(6), nn.Unflatten(1, (6, 1)), nn.Upsample(scale_factor=3.0),
                                 BNET1d(6)))
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(4, 5)
    assert traced(x).shape == (4, 6, 3) and _rel(traced(x), model(x)) <= 1e-6


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_feature_extraction_works_on_bnet_models(mode):
    torch.manual_seed(0)
    model = getattr(_stats(swap_norm(torchvision.models.resnet18(), "bnet")), mode)()
    x = torch.randn(4, 3, 64, 64)
    extractor = create_feature_extractor(copy.deepcopy(model), ["layer2", "layer4"])
    feats = extractor(x)
    hooked = {}
    for name in ("layer2", "layer4"):
        model.get_submodule(name).register_forward_hook(lambda m, i, o, n=name: hooked.setdefault(n, o))
    model(x)
    assert all(_rel(feats[n], hooked[n]) <= 1e-5 for n in hooked)
    # timm's fx feature extraction (BNET registered as a leaf) equals its hook-based one
    torch.manual_seed(0)
    timm_fx = create_timm_model("resnet18", features_only=True, feature_cls="fx")
    torch.manual_seed(0)
    timm_hooks = create_timm_model("resnet18", features_only=True)
    with torch.no_grad():
        assert all(_rel(a, b) <= 1e-6 for a, b in zip(timm_fx.eval()(x), timm_hooks.eval()(x)))


# -- 9. wrong types -------------------------------------------------------------------------------------------

WRONG_TYPES = [
    (lambda: swap_norm("resnet18"), "swap_norm takes a model (a torch nn.Module), got str 'resnet18'"),
    (lambda: create_timm_model(timm.create_model("resnet18")), "create_timm_model takes a timm model name"),
    (lambda: fuse_bnet("model.pth"), "fuse_bnet takes a model (a torch nn.Module), got str"),
    (lambda: load_model(3), "load_model takes a run folder (a path), got int 3"),
    (lambda: set_one_map(BNET2d(4), "false"), "set_one_map takes enabled as a bool, got str 'false'"),
    (lambda: set_one_map("model", False), "set_one_map takes a model"),
    (lambda: set_impl(None, "torch"), "set_impl takes a model (a torch nn.Module), got NoneType"),
]


@pytest.mark.parametrize("call,message", WRONG_TYPES)
def test_a_wrong_type_is_one_line_naming_what_to_pass(call, message):
    with pytest.raises(TypeError) as err:
        call()
    assert str(err.value).startswith(message) and "\n" not in str(err.value) and "; " in str(err.value)


def test_set_one_map_false_still_switches_the_path():
    layer = set_one_map(BNET2d(4), False)
    assert layer.one_map is False
