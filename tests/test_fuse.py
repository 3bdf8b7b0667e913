"""fuse_bnet: an eval-only copy, BNET's normalisation folded into its conv, outputs unchanged."""
import pytest
import torch
from torch.testing import assert_close

from bnet_fastai import BNET1d, BNET2d, BNET3d, FusedBNET, count_norms, create_model, fuse_bnet
from bnet_fastai.nn.fuse import FusedDepthwise

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


def _bias_map_model():
    """A BNET after a ReLU: it keeps its own normalisation, a FusedBNET with a per-size bias map."""
    model = perturb_bnets(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), BNET2d(4, k=5)), 0.5)
    return warm_running_stats(model, shape=(4, 3, 12, 12)).eval()


def test_a_fused_model_exports_with_a_dynamic_image_size_and_caches_nothing_while_exporting():
    model = _bias_map_model()
    fused = fuse_bnet(model)
    size = {2: torch.export.Dim("h", min=6, max=64), 3: torch.export.Dim("w", min=6, max=64)}
    exported = torch.export.export(fused, (torch.randn(2, 3, 12, 12),), dynamic_shapes=(size,)).module()
    assert fused[2]._bias_maps == {}  # no symbolic or fake map was kept for later eager calls
    with torch.no_grad():
        for shape in [(2, 3, 12, 12), (2, 3, 17, 9), (2, 3, 40, 33)]:
            x = torch.randn(shape)
            assert_close(exported(x), model(x), atol=1e-5, rtol=1e-5)
            assert_close(fused(x), model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("build", [_bias_map_model, lambda: warm_running_stats(
    perturb_bnets(create_model("xmininet", "bnet", k=3), 0.1)).eval()], ids=["bias-map", "xmininet"])
def test_a_fused_model_runs_in_onnxruntime_at_other_sizes(tmp_path, build):
    ort = pytest.importorskip("onnxruntime", reason="the dev extra installs onnxruntime")
    model = build()
    fused = fuse_bnet(model)
    dims = {0: torch.export.Dim("n", min=1, max=16), 2: torch.export.Dim("h", min=16, max=96),
            3: torch.export.Dim("w", min=16, max=96)}
    torch.onnx.export(fused, (torch.randn(2, 3, 32, 32),), tmp_path / "fused.onnx", dynamo=True,
                      dynamic_shapes=(dims,)).save(tmp_path / "fused.onnx")
    session = ort.InferenceSession(tmp_path / "fused.onnx", providers=["CPUExecutionProvider"])
    for shape in [(2, 3, 32, 32), (1, 3, 40, 24)]:
        x = torch.randn(shape)
        (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        with torch.no_grad():
            assert_close(torch.from_numpy(out), model(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("size", [1, 7])
def test_fused_layers_return_the_autocast_dtype(size):
    model = _bias_map_model()
    fused = fuse_bnet(model)
    x = torch.randn(2, 3, size + 2, size + 2)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        y, y_model = fused(x), model(x)
    assert y.dtype == y_model.dtype == torch.bfloat16
    with torch.no_grad():
        assert_close(y.float(), model(x), atol=0.05, rtol=0.02)
    assert {key[2] for key in fused[2]._bias_maps} == {torch.bfloat16}


def test_fused_norm_act_layers_keep_their_activation():
    from bnet_fastai import BNETAct2d
    bnet = perturb_bnets(BNETAct2d(4, act_layer="silu"), 0.5)
    seq = warm_running_stats(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), bnet), shape=(4, 3, 9, 9)).eval()
    fused = fuse_bnet(seq)
    assert isinstance(fused[1], FusedDepthwise) and isinstance(fused[1].act, torch.nn.SiLU)
    alone = fuse_bnet(bnet)
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        assert_close(fused(x), seq(x), atol=1e-5, rtol=1e-5)
        assert_close(alone(seq[0](x)), seq(x), atol=1e-5, rtol=1e-5)


def test_fusing_a_lone_norm_act_layer_leaves_the_original_alone():
    from bnet_fastai import BNETAct2d
    bnet = BNETAct2d(4, drop_layer=lambda: torch.nn.Dropout(0.5)).train()
    fused = fuse_bnet(bnet)
    assert bnet.training and bnet.drop.training and fused.drop is not bnet.drop and not fused.drop.training


@pytest.mark.parametrize("arch", ["xresnet18", "resnest14d", "mininest"])
def test_fuse_bn_folds_every_batchnorm_after_a_conv_and_keeps_the_output(arch):
    from bnet_fastai import fuse_bn

    model = warm_running_stats(create_model(arch, "bn"), shape=(4, 3, 64, 64)).eval()
    folded = fuse_bn(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref, got = model(x), folded(x)
    assert float((got - ref).abs().max() / ref.abs().max()) < 1e-5
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) in (22, 23)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())  # each followed a conv
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # the model is untouched
