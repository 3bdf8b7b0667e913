"""BNET in real torchvision and timm networks (tests/model_zoo.py): function kept, gradients, fusion, export.

Every network is built untrained and given running statistics and gamma/beta far from a fresh BN's
(`_trained_like`), so that "the converted model computes the original function" is a real claim.
"""
import copy
from pathlib import Path
import functools

import pytest
import torch
from torch.export import Dim
from torch.nn.modules.batchnorm import _BatchNorm

from bnet_fastai import (BNET2d, count_norms, create_timm_model, fuse_bnet, get_norm_layer,
                         reparameterize_model, swap_norm)
from bnet_fastai.nn.layers import _BNETNd

from .helpers import perturb_bnets
from .model_zoo import NO_BATCHNORM, ZOO, table



def _params(zoo, where=lambda z: True):
    return [pytest.param(z, id=z.id, marks=[pytest.mark.slow] if z.slow else []) for z in zoo if where(z)]


def _trained_like(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Running statistics and gamma/beta far from a fresh BN's, as a trained model has; eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                m.running_mean.normal_(0, 0.2, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
                if m.weight is not None:
                    m.weight.uniform_(0.5, 1.5, generator=g)
                    m.bias.normal_(0, 0.2, generator=g)
    return model.eval()


def _bnets(model: torch.nn.Module) -> list[_BNETNd]:
    return [m for m in model.modules() if isinstance(m, _BNETNd)]


def _flat(y) -> torch.Tensor:
    """A network's output as one tensor: a tensor, or every tensor of a list (features_only) or dict (segmentation)."""
    if isinstance(y, torch.Tensor):
        return y
    parts = y.values() if isinstance(y, dict) else y
    return torch.cat([_flat(p).flatten() for p in parts])


def _rel(a, b) -> float:
    a, b = _flat(a), _flat(b)
    return ((a - b).abs().max() / b.abs().max()).item()


@functools.cache
def _input(z) -> torch.Tensor:
    """The test input of network `z` (its `input` shape), the same on every call."""
    return torch.randn(z.input, generator=torch.Generator().manual_seed(0))


@functools.cache
def _original(z):
    """The BN network and its eval output on its input (built once per network for all tests here)."""
    torch.manual_seed(0)
    model = _trained_like(z.build())
    with torch.no_grad():
        return model, model(_input(z))


@pytest.mark.parametrize("z", _params(ZOO))
def test_init_copy_keeps_the_function_in_both_placements(z):
    model, expected = _original(z)
    n_bn = count_norms(model)["bn"]
    for placement in ("all", "last"):
        if placement == "last" and not (z.residual and z.last_norm):
            refusal = "found no residual block" if not z.residual else "found no last norm"
            with pytest.raises(ValueError, match=f"{refusal} in {type(model).__name__}"):
                swap_norm(copy.deepcopy(model), "bnet", placement="last", init="copy")
            continue
        swapped = swap_norm(copy.deepcopy(model), "bnet", placement=placement, k=3, init="copy").eval()
        counts = count_norms(swapped)
        assert counts["bn"] + counts["bnet"] == n_bn
        assert counts["bn"] == 0 if placement == "all" else 0 < counts["bnet"] < n_bn
        with torch.no_grad():
            assert _rel(swapped(_input(z)), expected) <= 1e-5, placement


@pytest.mark.parametrize("z", _params(ZOO))
def test_a_train_step_gives_every_bnet_kernel_a_gradient(z):
    torch.manual_seed(0)
    # kernels away from the identity and from zero: a zero-initialised last kernel (timm's zero_init_last)
    # rightly blocks the first step's gradient to the rest of its branch
    model = perturb_bnets(swap_norm(z.build(), "bnet", k=3), scale=0.1).train()
    _flat(model(_input(z))).float().pow(2).mean().backward()
    bnets = [m for m in model.modules() if isinstance(m, _BNETNd)]
    assert bnets and count_norms(model)["bn"] == 0
    for m in bnets:
        assert m.weight.grad is not None and torch.isfinite(m.weight.grad).all()
        assert m.weight.grad.abs().sum() > 0 and m.bias.grad.abs().sum() > 0


@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("z", _params(ZOO))
def test_fuse_bnet_matches_the_unfused_network(z, k):
    model, _ = _original(z)
    torch.manual_seed(k)
    swapped = perturb_bnets(swap_norm(copy.deepcopy(model), "bnet", k=k, init="copy"), scale=0.1 / k**2).eval()
    with torch.no_grad():
        expected = swapped(_input(z))
        fused = fuse_bnet(swapped)
        assert count_norms(fused)["bnet"] == 0
        assert _rel(fused(_input(z)), expected) <= 1e-5


@pytest.mark.parametrize("z", _params(ZOO, lambda z: z.route))
def test_the_norm_layer_route_builds_bnet_and_keeps_every_activation(z):
    """Built with norm_layer=BNET and given the weights of the copied model, it computes the BN network."""
    model, expected = _original(z)
    swapped = swap_norm(copy.deepcopy(model), "bnet", init="copy")
    torch.manual_seed(0)
    layer = get_norm_layer("bnet") if z.library == "timm" else BNET2d
    routed = z.build(norm_layer=layer)
    assert count_norms(routed)["bn"] == z.route_keeps  # what the builder makes without its norm_layer
    if z.library == "timm":
        if z.route_keeps:
            with pytest.warns(UserWarning, match=f"^timm's {z.name} builder kept {z.route_keeps} BatchNorm layer"):
                create_timm_model(z.name, leftover="keep", **dict(z.kwargs))
        routed = create_timm_model(z.name, **dict(z.kwargs))  # the route, the family's eps and momentum, swap_norm on what it left
    else:  # eps is a constructor argument, not state: torchvision binds its own (MobileNetV3: 1e-3) in its default
        for mine, theirs in zip(_bnets(routed), _bnets(swapped)):
            mine.norm.eps, mine.norm.momentum = theirs.norm.eps, theirs.norm.momentum
    assert count_norms(routed) == count_norms(swapped)
    assert [(m.eps, m.momentum) for m in _bnets(routed)] == [(m.eps, m.momentum) for m in _bnets(swapped)]
    routed.load_state_dict(swapped.state_dict())  # strict: the same modules under the same names
    acts = [type(m) for m in swapped.modules() if not list(m.children())]
    assert [type(m) for m in routed.modules() if not list(m.children())] == acts
    with torch.no_grad():
        assert _rel(routed.eval()(_input(z)), expected) <= 1e-5


@pytest.mark.parametrize("z", _params(ZOO))
def test_the_fused_network_exports_at_a_dynamic_image_size(z):
    model, _ = _original(z)
    swapped = perturb_bnets(swap_norm(copy.deepcopy(model), "bnet", k=3, init="copy"), scale=0.05).eval()
    fused = fuse_bnet(swapped)
    # multiples of 32 from 64 px: the strides divide them, and no map shrinks to the 1 that export specialises
    h, w = len(z.input) - 2, len(z.input) - 1  # the image's height and width (after a 3-D net's time)
    size = {h: 32 * Dim("h32", min=2, max=8), w: 32 * Dim("w32", min=2, max=8)} if z.any_size else None
    exported = torch.export.export(fused, (_input(z),), dynamic_shapes=(size,)).module()
    x = torch.randn(*z.input[:-2], 96, 128) if z.any_size else torch.randn(z.input)
    with torch.no_grad():
        assert _rel(exported(x), swapped(x)) <= 1e-5


@pytest.mark.parametrize("z", _params(ZOO, lambda z: z.reparam))
def test_reparameterize_model_folds_the_bn_network_and_refuses_bnet_in_one_line(z):
    model, expected = _original(z)
    with torch.no_grad():
        assert _rel(reparameterize_model(model)(_input(z)), expected) <= 1e-5  # timm's folding, BN unchanged
    swapped = swap_norm(copy.deepcopy(model), "bnet", init="copy").eval()
    with pytest.raises(ValueError, match=r"^reparameterize_model: \S+ \(\w+\) holds BNET .*fuse_bnet\(model\)"):
        reparameterize_model(swapped)


@pytest.mark.parametrize("z", _params(NO_BATCHNORM))
def test_a_network_without_batchnorm_is_refused_naming_its_norm(z):
    model = z.build()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=f"^no BatchNorm layer in {type(model).__name__}: it uses {z.kinds};"):
        swap_norm(model, "bnet")
    assert all(torch.equal(v, before[n]) for n, v in model.state_dict().items())


README = Path(__file__).parents[1] / "README.md"


@pytest.mark.slow
def test_the_readme_use_bnet_snippet_runs():
    section = README.read_text().split("## Use BNET", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    scope = {}
    exec(compile(code, "README.md (Use BNET)", "exec"), scope)
    for x in (torch.randn(1, 3, 160, 96), torch.randn(3, 3, 128, 128)):  # batch and image size are dynamic
        with torch.no_grad():
            assert _rel(scope["exported"].module()(x), scope["model"].eval()(x)) <= 1e-5
    assert count_norms(scope["net"]) == {"bn": 0, "bnet": 20}


def test_the_readme_table_is_the_test_list():
    readme = README.read_text()
    start = readme.index("<!-- models -->") + len("<!-- models -->\n")
    assert readme[start:readme.index("<!-- /models -->", start)].strip() == table()
