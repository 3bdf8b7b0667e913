"""The model zoo: every arch x norm x placement builds, runs, trains; placement and init are right."""
import pytest
import torch
from torch import nn
from torch.testing import assert_close

from bnet_fastai import BNET2d, bnet_extra_params, count_norms, create_model, list_archs, select_norms, swap_norm

from .helpers import perturb_bnets

VARIANTS = [("bn", "all"), ("bnet", "all"), ("bnet", "last")]
BLOCKS = {"xresnet18": 8, "xresnet50": 16, "xse_resnext50": 16, "resnest14d": 4, "resnest50d": 16,
          "xmininet": 4, "mininest": 4}


def _params(model):
    return sum(p.numel() for p in model.parameters())


def _bnets(model):
    return [m for m in model.modules() if isinstance(m, BNET2d)]


@pytest.mark.parametrize("norm,placement", VARIANTS)
@pytest.mark.parametrize("arch", list_archs())
def test_forward_backward_every_parameter_gets_a_gradient(arch, norm, placement):
    model = create_model(arch, norm, n_out=7, placement=placement).train()
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    out.logsumexp(1).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    if norm == "bnet":
        # Kernels that start at zero (a block's last norm) still learn. Norms upstream of them inside
        # the same branch get exactly zero gradient at step 0: that is the library's zero-init design.
        starts_at_zero = [b for b in _bnets(model) if b.init == "zero"]
        assert starts_at_zero and all(b.weight.grad.abs().sum() > 0 for b in starts_at_zero)


def test_list_archs_names_the_contract_archs():
    assert {"xresnet18", "xresnet34", "xresnet50", "xresnet101", "xse_resnet18", "xse_resnet34",
            "xse_resnet50", "xresnext18", "xresnext34", "xresnext50", "xse_resnext18", "xse_resnext50",
            "resnest14d", "resnest26d", "resnest50d", "xmininet", "xsemininet", "mininest"} <= set(list_archs())


@pytest.mark.parametrize("arch,blocks", BLOCKS.items())
def test_placement_last_is_one_bnet_per_residual_block_all_is_every_bn(arch, blocks):
    n_bn = count_norms(create_model(arch, "bn"))["bn"]
    assert count_norms(create_model(arch, "bnet", placement="last")) == {"bn": n_bn - blocks, "bnet": blocks}
    assert count_norms(create_model(arch, "bnet", placement="all")) == {"bn": 0, "bnet": n_bn}


def test_placement_last_picks_the_main_path_not_the_shortcut():
    fastai_names = [n for n, _ in select_norms(create_model("xresnet50"), "last")]
    assert fastai_names[0] == "4.0.convpath.2.1" and all(".convpath.2.1" in n for n in fastai_names)
    timm_names = [n for n, _ in select_norms(create_model("resnest50d"), "last")]
    assert timm_names[0] == "layer1.0.bn3" and all(n.endswith(".bn3") for n in timm_names)


@pytest.mark.parametrize("arch", ["xresnet50", "xse_resnet18", "resnest26d", "mininest"])
@pytest.mark.parametrize("k", [3, 5])
def test_whole_model_parameter_delta_matches_the_formula(arch, k):
    bn, bnet = create_model(arch, "bn"), create_model(arch, "bnet", k=k)
    expected = sum(bnet_extra_params(b.num_features, k) for b in _bnets(bnet))
    assert _params(bnet) - _params(bn) == expected > 0


@pytest.mark.parametrize("arch,blocks", [("xresnet50", 16), ("resnest50d", 16), ("xsemininet", 4)])
def test_bnet_starts_zero_where_the_library_zero_inits_gamma_identity_elsewhere(arch, blocks):
    bnets = _bnets(create_model(arch, "bnet", k=3))
    zero = [b for b in bnets if b.weight.abs().sum() == 0 and b.bias.abs().sum() == 0]
    identity = [b for b in bnets if torch.all(b.weight[:, 0, 1, 1] == 1) and b.weight.abs().sum() == b.num_features]
    assert len(zero) == blocks and len(identity) == len(bnets) - blocks
    assert {b.init for b in zero} == {"zero"}


@pytest.mark.parametrize("arch,init", [("xresnet18", "copy"), ("resnest14d", "copy"), ("resnest14d", "auto")])
def test_fresh_bnet_model_computes_what_the_fresh_bn_model_computes(arch, init):
    # timm starts BN's beta at 0, so "auto" is exact there; fastai starts it at 1e-3, which "copy" keeps.
    torch.manual_seed(1)
    bn = create_model(arch, "bn")
    torch.manual_seed(1)
    bnet = create_model(arch, "bnet", k=5, bnet_init=init)
    x = torch.randn(3, 3, 32, 32)
    assert_close(bnet(x), bn(x), atol=1e-5, rtol=1e-4)
    bn.eval(), bnet.eval()
    assert_close(bnet(x), bn(x), atol=1e-5, rtol=1e-4)


def test_swap_norm_on_a_built_model_equals_create_model():
    torch.manual_seed(2)
    swapped = swap_norm(create_model("xmininet", "bn"), "bnet", placement="last", k=5)
    torch.manual_seed(2)
    built = create_model("xmininet", "bnet", placement="last", k=5)
    assert swapped.state_dict().keys() == built.state_dict().keys()
    for (name, a), b in zip(swapped.state_dict().items(), built.state_dict().values()):
        assert torch.equal(a, b), name


def test_swap_norm_norm_bn_leaves_the_model_alone():
    model = create_model("xmininet", "bn")
    before = {n: p.clone() for n, p in model.state_dict().items()}
    assert swap_norm(model, "bn") is model
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())


def test_swap_norm_keeps_a_trained_models_function_with_copy():
    model = create_model("mininest", "bn").train()
    for _ in range(2):
        model(torch.randn(4, 3, 32, 32))
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    expected = model(x)
    assert_close(swap_norm(model, "bnet", k=3, init="copy")(x), expected, atol=1e-5, rtol=1e-4)


def test_act_and_library_kwargs_reach_the_builder():
    model = create_model("xmininet", "bnet", act="mish", c_in=1)
    assert any(isinstance(m, nn.Mish) for m in model.modules())
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    assert any(isinstance(m, nn.SiLU) for m in create_model("mininest", act="silu").modules())


@pytest.mark.parametrize("arch", ["xse_resnet18", "resnest14d"])
def test_sync_batchnorm_conversion_keeps_a_bnet_models_outputs(arch):
    model = perturb_bnets(create_model(arch, "bnet", k=3), scale=0.2).train()
    for _ in range(2):
        model(torch.randn(4, 3, 32, 32))
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    expected = model(x)
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert not any(type(m) is nn.BatchNorm2d for m in synced.modules())
    assert all(isinstance(b.norm, nn.SyncBatchNorm) for b in _bnets(synced))
    assert_close(synced(x), expected, atol=1e-5, rtol=1e-4)
