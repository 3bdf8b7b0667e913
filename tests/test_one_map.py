"""BNET trains through `OneMapBNET` on the torch path (``impl="torch"``; "auto" takes the C++ kernels on a CPU, see
tests/test_cpp_bnet.py), keeping one map for its backward as BN does: gradients exact (gradcheck), equal to the
composed path it replaces, and the saved activations of real models at BN's, counted exactly."""
import copy
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from bnet_fastai import BNET1d, BNET2d, BNET3d, create_model
from bnet_fastai.nn.layers import set_impl, set_one_map
from bnet_fastai.nn.compute.one_map import OneMapBNET
from bnet_fastai.speed import saved_activation_bytes

SHAPES = [(BNET2d, (2, 4, 5, 7)), (BNET2d, (1, 4, 3, 5)), (BNET2d, (5, 4, 1, 1)), (BNET1d, (3, 4, 9)),
          (BNET1d, (6, 4)), (BNET3d, (2, 4, 3, 5, 3))]  # odd sizes, N=1 with H·W>1, 1x1 maps, 1-D and 3-D


def _composed(model):
    return set_one_map(model, False)


@pytest.mark.parametrize("k", [1, 3, 5, 7])
@pytest.mark.parametrize("cls,shape", SHAPES[:4] + SHAPES[5:])
def test_gradcheck_in_float64(cls, shape, k):
    torch.manual_seed(k)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, 1, *(k,) * (len(shape) - 2), dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: OneMapBNET.apply(*a, None, None, 0.0, 1e-5, "layer"),
                                    (x, weight, bias))


@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("cls,shape", SHAPES)
@pytest.mark.parametrize("momentum,track", [(0.1, True), (None, True), (0.1, False)])
def test_the_one_map_layer_equals_the_composed_layer_in_float64(cls, shape, k, momentum, track):
    torch.manual_seed(0)
    composed = cls(4, k=k, init="official", momentum=momentum, track_running_stats=track).double()
    composed.one_map = False
    with torch.no_grad():
        composed.bias.normal_()
    one_map = copy.deepcopy(composed)
    one_map.one_map = True
    for step in range(3):  # running statistics (a cumulative average with momentum=None) over steps
        x = torch.randn(*shape, dtype=torch.float64) * (step + 1) + step
        xs = [x.clone().requires_grad_() for _ in range(2)]
        ys = [layer(xi) for layer, xi in zip((one_map, composed), xs)]
        grad = torch.randn_like(ys[0])
        for y in ys:
            (y * grad).sum().backward()
        assert (ys[0].grad_fn.name() == "OneMapBNETBackward") == (len(shape) > 2)  # (N, C): a squeeze after it
        torch.testing.assert_close(ys[0], ys[1], rtol=0, atol=1e-13)
        torch.testing.assert_close(xs[0].grad, xs[1].grad, rtol=0, atol=1e-13)
    for a, b in zip(list(one_map.parameters()) + list(one_map.buffers()),
                    list(composed.parameters()) + list(composed.buffers())):
        torch.testing.assert_close(a.grad if a.grad is not None else a, b.grad if b.grad is not None else b,
                                   rtol=0, atol=1e-12)
    assert one_map.state_dict().keys() == composed.state_dict().keys()


def test_eval_no_grad_and_a_frozen_layer_keep_the_composed_path():
    layer = BNET2d(4, impl="torch")
    x = torch.randn(2, 4, 5, 5, requires_grad=True)
    assert layer(x).grad_fn.name() == "OneMapBNETBackward"
    assert layer.eval()(x).grad_fn.name() == "ConvolutionBackward0"  # running statistics: nothing to save twice
    with torch.no_grad():
        assert layer.train()(x).grad_fn is None
    layer.requires_grad_(False)
    assert layer(x.detach()).grad_fn is None


def test_a_real_model_trains_to_the_same_weights_in_float32_channels_last():
    torch.manual_seed(0)
    one_map = set_impl(create_model("xmininet", "bnet", n_out=10), "torch").to(memory_format=torch.channels_last)
    composed = _composed(copy.deepcopy(one_map))
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (one_map, composed)]
    for _ in range(4):
        x = torch.randn(16, 3, 28, 28).to(memory_format=torch.channels_last)
        y = torch.randint(0, 10, (16,))
        for model, opt in zip((one_map, composed), optimizers):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    worst = max((a - b).abs().max().item() for a, b in zip(one_map.state_dict().values(),
                                                           composed.state_dict().values()) if a.is_floating_point())
    assert worst < 1e-5, worst
    out = one_map(torch.randn(2, 3, 28, 28).to(memory_format=torch.channels_last))
    assert out.shape == (2, 10)


def test_under_autocast_the_output_dtype_and_gradients_are_the_composed_paths():
    torch.manual_seed(0)
    one_map = BNET2d(8, impl="torch")
    with torch.no_grad():
        one_map.weight.normal_()
    composed = _composed(copy.deepcopy(one_map))
    x = torch.randn(4, 8, 6, 6)
    grads, outs = [], []
    for layer in (one_map, composed):
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(xi)
        y.float().square().sum().backward()
        outs.append(y)
        grads.append((xi.grad, layer.weight.grad))
    assert outs[0].dtype == outs[1].dtype == torch.bfloat16
    torch.testing.assert_close(outs[0], outs[1])
    for a, b in zip(grads[0], grads[1]):
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)  # bfloat16 convolutions on both sides


def test_double_backward_is_refused_in_one_line_naming_the_layer_and_the_composed_path_supports_it():
    layer = BNET2d(4, k=3, impl="torch")
    x = torch.randn(2, 4, 5, 5, requires_grad=True)
    with pytest.raises(RuntimeError) as caught:  # refused when the graph of the gradient is asked for
        torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
    message = str(caught.value).splitlines()[0]
    assert message.startswith("BNET2d(4, k=3, init='identity', impl='torch'): BNET's one-map backward is not "
                              "differentiable twice")
    assert message.endswith("train it through the composed path, `bnet_fastai.nn.layers.set_one_map(model, False)`")
    set_one_map(layer, False)
    (grad,) = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
    grad.square().sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("arch", ["xresnet18", "resnest14d"])
def test_saved_activations_with_bnet_in_every_norm_are_at_most_bn_s(arch):
    torch.manual_seed(0)
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))
    bn = saved_activation_bytes(create_model(arch, "bn"), x, y)
    one_map = saved_activation_bytes(set_impl(create_model(arch, "bnet"), "torch"), x, y)
    composed = saved_activation_bytes(_composed(create_model(arch, "bnet")), x, y)
    assert one_map <= 1.05 * bn  # measured 0.95 (BN also keeps its batch means)
    assert composed >= 1.4 * bn  # the composed path keeps the input and x̂: measured 1.42 and 1.44


SYNC_SCRIPT = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    from torch import nn
    from bnet_fastai import BNET2d
    rank, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    said = []
    for one_map in (True, False):
        layer = BNET2d.from_bn(nn.SyncBatchNorm(4), k=3)
        layer.one_map = one_map
        try:
            layer(torch.randn(2, 4, 5, 5, requires_grad=True)).sum().backward()
            said.append("trained")
        except ValueError as e:
            said.append(str(e))
    torch.save(said, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()
""")


def test_a_syncbatchnorm_normaliser_keeps_todays_path_under_gloo_and_alone():
    """SyncBatchNorm synchronises on GPUs only: under a gloo group on CPUs both paths stop with its own error,
    as today; alone (no group) it is a BatchNorm and the layer equals the one-map layer of a plain normaliser."""
    torch.manual_seed(0)
    synced = BNET2d.from_bn(torch.nn.SyncBatchNorm(4), k=3)
    with torch.no_grad():
        synced.weight.normal_()
    plain = BNET2d(4, k=3, impl="torch")
    plain.load_state_dict(synced.state_dict())
    xs = [torch.randn(4, 4, 5, 5).requires_grad_() for _ in range(2)]
    with torch.no_grad():
        xs[1].copy_(xs[0])
    ys = [layer(x) for layer, x in zip((synced, plain), xs)]
    for y in ys:
        y.square().sum().backward()
    assert [y.grad_fn.name() for y in ys] == ["ConvolutionBackward0", "OneMapBNETBackward"]
    torch.testing.assert_close(ys[0], ys[1], rtol=0, atol=1e-5)
    torch.testing.assert_close(xs[0].grad, xs[1].grad, rtol=0, atol=1e-5)
    torch.testing.assert_close(synced.weight.grad, plain.weight.grad, rtol=0, atol=1e-4)
    torch.testing.assert_close(synced.norm.running_var, plain.norm.running_var, rtol=0, atol=1e-6)


def test_under_a_gloo_group_a_syncbatchnorm_normaliser_behaves_as_today(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", SYNC_SCRIPT, str(r), str(port), str(tmp_path)], env=env)
             for r in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    for r in range(2):
        one_map, composed = torch.load(tmp_path / f"rank{r}.pt")
        assert one_map == composed and composed.startswith("SyncBatchNorm expected input tensor to be on GPU")
