"""BNET1d/2d/3d: equivalence with BatchNorm, running statistics, init, gradients, library compatibility."""
import pytest
import timm
import torch
from fastai.vision.models.xresnet import init_cnn
from torch import nn
from torch.testing import assert_close

from bnet_fastai import BNET1d, BNET2d, BNET3d, bnet_extra_params, count_norms, get_norm_layer

from .helpers import perturb_bnets

LAYERS = [(BNET1d, nn.BatchNorm1d, (6, 4, 9)), (BNET2d, nn.BatchNorm2d, (6, 4, 7, 5)),
          (BNET3d, nn.BatchNorm3d, (6, 4, 5, 3, 4))]


def _batches(shape, n=5):
    return [torch.randn(shape) * (i + 1) + i for i in range(n)]


def _centre(bnet):
    return (slice(None), 0) + (bnet.k // 2,) * bnet.ndim


class TestBNET2d:
    def test_k1_with_same_affine_equals_batchnorm_train_eval_and_stats(self):
        bn, bnet = nn.BatchNorm2d(4, momentum=0.2), BNET2d(4, k=1, momentum=0.2)
        with torch.no_grad():
            bn.weight.copy_(torch.randn(4))
            bn.bias.copy_(torch.randn(4))
            bnet.weight.copy_(bn.weight.view(4, 1, 1, 1))
            bnet.bias.copy_(bn.bias)
        for x in _batches((6, 4, 7, 5)):
            assert_close(bnet(x), bn(x), atol=1e-5, rtol=1e-5)
        assert_close(bnet.running_mean, bn.running_mean)
        assert_close(bnet.running_var, bn.running_var)
        assert bnet.norm.num_batches_tracked.item() == bn.num_batches_tracked.item() == 5
        bn.eval(), bnet.eval()
        x = torch.randn(3, 4, 6, 6) * 3 + 1
        assert_close(bnet(x), bn(x), atol=1e-5, rtol=1e-5)

    @pytest.mark.parametrize("k", [1, 3, 5, 7])
    def test_output_shape_is_kept(self, k):
        assert BNET2d(4, k=k)(torch.randn(2, 4, 9, 6)).shape == (2, 4, 9, 6)

    def test_gradients_reach_kernel_and_bias(self):
        bnet = perturb_bnets(BNET2d(4, k=3))
        (bnet(torch.randn(3, 4, 6, 6)) ** 2).sum().backward()
        assert bnet.weight.grad.shape == (4, 1, 3, 3) and bnet.weight.grad.abs().sum() > 0
        assert bnet.bias.grad.shape == (4,) and bnet.bias.grad.abs().sum() > 0

    @pytest.mark.parametrize("k", [1, 3, 5])
    def test_parameter_delta_is_c_k2_plus_c_minus_2c(self, k):
        c = 12
        n_bnet = sum(p.numel() for p in BNET2d(c, k=k).parameters())
        n_bn = sum(p.numel() for p in nn.BatchNorm2d(c).parameters())
        assert n_bnet - n_bn == c * k * k + c - 2 * c == bnet_extra_params(c, k)

    def test_zero_init_outputs_zero(self):
        out = BNET2d(4, init="zero")(torch.randn(3, 4, 5, 5))
        assert torch.count_nonzero(out) == 0

    def test_official_init_is_kaiming_fan_out_with_zero_bias(self):
        c, k = 512, 3
        bnet = BNET2d(c, k=k, init="official")
        expected_std = (2 / (c * k * k)) ** 0.5  # torch's fan_out of a (C, 1, k, k) kernel is C·k²
        assert abs(bnet.weight.std().item() / expected_std - 1) < 0.05
        assert torch.count_nonzero(bnet.bias) == 0

    def test_reset_parameters_restores_init(self):
        bnet = perturb_bnets(BNET2d(4, k=3))
        bnet.reset_parameters()
        expected = torch.zeros(4, 1, 3, 3)
        expected[:, 0, 1, 1] = 1
        assert_close(bnet.weight.detach(), expected)


@pytest.mark.parametrize("bnet_cls,bn_cls,shape", LAYERS)
@pytest.mark.parametrize("k", [1, 3, 5, 7])
def test_identity_init_equals_fresh_batchnorm(bnet_cls, bn_cls, shape, k):
    bnet, bn = bnet_cls(shape[1], k=k), bn_cls(shape[1])
    for x in _batches(shape, 3):
        assert_close(bnet(x), bn(x), atol=1e-5, rtol=1e-5)
    assert_close(bnet.running_var, bn.running_var)
    bnet.eval(), bn.eval()
    x = torch.randn(shape)
    assert_close(bnet(x), bn(x), atol=1e-5, rtol=1e-5)


def test_bnet1d_accepts_flat_features():
    bnet, bn = BNET1d(5, k=3), nn.BatchNorm1d(5)
    x = torch.randn(8, 5) * 2 + 1
    assert_close(bnet(x), bn(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bnet_cls,bn_cls,shape", LAYERS)
def test_from_bn_copy_keeps_the_function_and_stats(bnet_cls, bn_cls, shape):
    bn = bn_cls(shape[1])
    for x in _batches(shape, 3):
        bn(x)
    with torch.no_grad():
        bn.weight.copy_(torch.randn(shape[1]))
        bn.bias.copy_(torch.randn(shape[1]))
    bnet = bnet_cls.from_bn(bn, k=3, init="copy")
    assert_close(bnet.running_mean, bn.running_mean)
    assert bnet.norm.num_batches_tracked == bn.num_batches_tracked == 3
    x = torch.randn(shape)
    assert_close(bnet(x), bn(x), atol=1e-5, rtol=1e-5)
    bn.eval(), bnet.eval()
    assert_close(bnet(x), bn(x), atol=1e-5, rtol=1e-5)


def test_from_bn_auto_is_zero_where_gamma_is_zero():
    zero_gamma, one_gamma = nn.BatchNorm2d(3), nn.BatchNorm2d(3)
    nn.init.zeros_(zero_gamma.weight)
    assert BNET2d.from_bn(zero_gamma).init == "zero"
    assert BNET2d.from_bn(one_gamma).init == "identity"


def test_timm_accepts_bnet_as_norm_layer_and_keeps_its_init():
    model = timm.create_model("resnest14d", num_classes=5, norm_layer=get_norm_layer("bnet", k=5))
    bnets = [m for m in model.modules() if isinstance(m, BNET2d)]
    assert len(bnets) == 23 and all(b.k == 5 for b in bnets)
    assert count_norms(model) == {"bn": 0, "bnet": 23}
    # timm's init_weights applies kaiming to every nn.Conv2d: BNET's kernel is not one, so it stays
    # the identity, except where timm's zero_init_last zeros the block's last norm weight.
    last = {id(blk.bn3) for blk in model.modules() if hasattr(blk, "zero_init_last")}
    for b in bnets:
        centre = b.weight[_centre(b)]
        assert torch.all(centre == (0.0 if id(b) in last else 1.0))
        assert b.weight.abs().sum() == centre.abs().sum()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)


def test_fastai_init_cnn_leaves_the_kernel_alone():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), BNET2d(8, k=3))
    init_cnn(model)
    assert torch.all(model[1].weight[_centre(model[1])] == 1)
    assert model[1].weight.abs().sum() == 8


def test_convert_sync_batchnorm_keeps_the_kernel_in_the_forward_path():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), BNET2d(8, k=3), nn.ReLU(), nn.Conv2d(8, 4, 1),
                          BNET2d(4, k=5))
    perturb_bnets(model, scale=0.5)
    model.train()
    for _ in range(3):
        model(torch.randn(4, 3, 8, 8))
    model.eval()
    x = torch.randn(2, 3, 8, 8)
    expected = model(x)
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert type(synced[1].norm) is nn.SyncBatchNorm and not any(type(m) is nn.BatchNorm2d for m in synced.modules())
    assert isinstance(synced[4], BNET2d) and isinstance(synced[4].norm, nn.SyncBatchNorm)
    assert_close(synced(x), expected, atol=1e-6, rtol=1e-6)
    # had the kernel been dropped, the output would differ by far more than the tolerance
    without_kernel = synced[4].norm(synced[3](synced[2](synced[1].norm(synced[0](x)))))
    assert (without_kernel - expected).abs().max() > 1e-2


@pytest.mark.parametrize("shape", [(4, 6, 1, 1), (5, 6, 3, 1)])
def test_one_by_one_maps_take_the_centre_tap_fast_path_with_the_same_values_and_gradients(shape):
    bnet = perturb_bnets(BNET2d(6, k=5), scale=1.0)
    x = torch.randn(shape) * 3
    out = bnet(x)
    out.pow(2).sum().backward()
    grads = bnet.weight.grad.clone(), bnet.bias.grad.clone()
    bnet.zero_grad()
    reference = torch.nn.functional.conv2d(bnet.norm(x), bnet.weight, bnet.bias, padding=2, groups=6)
    reference.pow(2).sum().backward()
    assert_close(out, reference, atol=1e-5, rtol=1e-5)
    assert_close(grads[0], bnet.weight.grad, atol=1e-5, rtol=1e-4)
    assert_close(grads[1], bnet.bias.grad, atol=1e-5, rtol=1e-4)


def test_the_repr_shows_the_init_used_and_copy_resets_as_a_batchnorm_resets():
    bn = nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
    bnet = BNET2d.from_bn(bn, k=3, init="copy")
    assert "init='copy'" in repr(bnet) and bnet.weight[:, 0, 1, 1].equal(bn.weight)
    bnet.reset_parameters()  # a BatchNorm resets to gamma 1, beta 0: the identity kernel
    assert "init='copy'" in repr(bnet) and torch.equal(bnet.weight, BNET2d(4).weight)
    assert "init='zero'" in repr(BNET2d.from_bn(bn, init="zero"))


def test_bnet_has_no_affine_false_form():
    assert BNET2d(4, affine=True).weight.shape == (4, 1, 3, 3)
    with pytest.raises(ValueError, match="BNET has no affine=False form"):
        BNET2d(4, affine=False)


def test_library_init_loops_over_nn_batchnorm2d_do_not_reach_bnets_normaliser():
    bnet = BNET2d(4)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in bnet.modules())
    assert isinstance(bnet.norm, torch.nn.modules.batchnorm._BatchNorm) and bnet.norm.weight is None
    with pytest.raises(ValueError, match=r"expected 4D input \(got 3D input\)"):
        bnet.norm(torch.randn(2, 4, 5))


@pytest.mark.parametrize("size", [1, 5], ids=["1x1-fast-path", "conv"])
def test_under_autocast_bnet_returns_the_autocast_dtype(size):
    bnet = perturb_bnets(BNET2d(6), scale=0.3).eval()
    x = torch.randn(2, 6, size, size)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = bnet(x)
    assert y.dtype == torch.bfloat16
    assert_close(y.float(), bnet(x), atol=0.05, rtol=0.02)
