"""fuse_bnet: an eval-only copy, BNET's normalisation folded into its conv, outputs unchanged."""
import pytest
import torch
from torch.testing import assert_close

from bnet_fastai import BNET1d, BNET2d, BNET3d, FusedBNET, count_norms, create_model, fuse_bnet
from bnet_fastai.fuse import FusedDepthwise

from .helpers import perturb_bnets, warm_running_stats


@pytest.mark.parametrize("arch", ["xmininet", "xsemininet", "mininest", "xresnet18"])
@pytest.mark.parametrize("k", [1, 3, 5, 7])
def test_fused_model_equals_the_original_in_eval(arch, k):
    # kernels far from the identity, scaled so that outputs stay O(1): atol 1e-5 is then fp32 territory
    model = perturb_bnets(create_model(arch, "bnet", k=k), scale=0.5 / k**2)
    warm_running_stats(model).eval()
    x = torch.randn(3, 3, 40, 36)  # odd map sizes later on: borders of every parity
    with torch.no_grad():
        expected = model(x)
        fused = fuse_bnet(model)
        assert expected.abs().max() > 0.01
        assert_close(fused(x), expected, atol=1e-5, rtol=0)
    n_bnet = count_norms(model)["bnet"]  # the original is untouched
    folded = sum(isinstance(m, FusedDepthwise) for m in fused.modules())
    assert count_norms(fused)["bnet"] == 0 and n_bnet > 0
    # every BNET of these models directly follows a conv: its normalisation goes into that conv
    assert folded == n_bnet and not any(isinstance(m, FusedBNET) for m in fused.modules())


@pytest.mark.parametrize("cls,shape", [(BNET1d, (4, 6, 11)), (BNET1d, (4, 6)), (BNET2d, (4, 6, 9, 7)),
                                       (BNET3d, (4, 6, 5, 4, 3))])
@pytest.mark.parametrize("k", [1, 3, 5, 7])
def test_fused_layer_is_exact_at_the_border(cls, shape, k):
    bnet = perturb_bnets(cls(shape[1], k=k), scale=1.0)
    bnet.train()
    for _ in range(3):
        bnet(torch.randn(shape) * 3 + 2)
    bnet.eval()
    x = torch.randn(shape) * 3 + 2
    with torch.no_grad():
        assert_close(fuse_bnet(bnet)(x), bnet(x), atol=1e-5, rtol=1e-5)


def test_fused_model_refuses_training_mode():
    fused = fuse_bnet(create_model("xmininet", "bnet")).train()
    with pytest.raises(RuntimeError, match="eval-only"):
        fused(torch.randn(2, 3, 32, 32))


def test_loading_new_buffers_refreshes_the_cached_bias_map():
    a, b = (perturb_bnets(BNET2d(4, k=3), scale=1.0) for _ in range(2))
    for bnet in (a, b):
        bnet.train()
        bnet(torch.randn(8, 4, 6, 6) * 3 + torch.randn(1))
        bnet.eval()
    x = torch.randn(2, 4, 6, 6)
    fused = fuse_bnet(a)
    fused(x)  # caches the bias map for 6x6 inputs
    fused.load_state_dict(fuse_bnet(b).state_dict())
    with torch.no_grad():
        assert_close(fused(x), b(x), atol=1e-5, rtol=1e-5)


def test_a_bnet_after_a_non_conv_is_fused_into_its_own_kernel(tmp_path):
    model = perturb_bnets(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), BNET2d(4, k=5)), 0.5)
    warm_running_stats(model, shape=(4, 3, 12, 12)).eval()
    fused = fuse_bnet(model)
    assert isinstance(fused[2], FusedBNET) and torch.equal(fused[0].weight, model[0].weight)
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        assert_close(fused(x), model(x), atol=1e-5, rtol=1e-5)
