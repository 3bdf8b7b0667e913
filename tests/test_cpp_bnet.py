"""BNET2d's fused C++ kernels (`bnet_fastai.nn.compute.cpp_bnet`, impl "cpp"; "auto" on a CPU): the function of the
torch path to float32 rounding, more accurate than it against a float64 reference, every shape and format, one saved
map, bit-identical run to run and whatever the number of threads, and the torch path where they cannot be built."""
import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from bnet_fastai import BNET1d, BNET2d, create_model
from bnet_fastai.nn.compute import cpp_bnet
from bnet_fastai.nn.layers import impls_used, resolve_impl, set_impl, set_one_map
from bnet_fastai.speed import saved_activation_bytes

# skipped only where the machine lacks what the build needs; a failing build with a compiler there fails the tests
pytestmark = pytest.mark.skipif(cpp_bnet.missing() is not None, reason=f"the C++ kernels: {cpp_bnet.missing()}")


def test_the_kernels_build_where_a_compiler_is():
    assert cpp_bnet.load() is not None, cpp_bnet.unavailable_reason()

CL, NCHW = torch.channels_last, torch.contiguous_format
# (N, C, H, W): odd sizes, C not a multiple of the vector width (16 or 8 channels), N=1, 1x1 and 1xk maps, maps
# smaller than the kernel, a map wide enough for the NCHW kernels (>= 16 columns)
SHAPES = [(2, 19, 5, 7), (1, 17, 3, 5), (6, 16, 1, 1), (3, 8, 1, 6), (4, 33, 2, 2), (2, 5, 6, 18), (3, 24, 9, 9)]


def _pair(k: int, c: int, seed: int = 0) -> tuple[BNET2d, BNET2d]:
    """A BNET2d with random kernel, bias and running statistics on the C++ kernels, and its copy on the torch path."""
    torch.manual_seed(seed)
    layer = BNET2d(c, k=k, impl="cpp")
    with torch.no_grad():
        layer.weight.normal_()
        layer.bias.normal_()
        layer.norm.running_mean.normal_()
        layer.norm.running_var.uniform_(0.5, 2)
    return layer, set_impl(copy.deepcopy(layer), "torch")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def _step(layer: BNET2d, x: torch.Tensor, g: torch.Tensor) -> dict[str, torch.Tensor]:
    x = x.detach().clone().requires_grad_()
    layer.zero_grad()
    y = layer(x)
    y.backward(g)
    return {"y": y, "dx": x.grad, "dw": layer.weight.grad, "db": layer.bias.grad,
            "running_mean": layer.norm.running_mean.clone(), "running_var": layer.norm.running_var.clone()}


@pytest.mark.parametrize("fmt", [CL, NCHW], ids=["channels_last", "nchw"])
@pytest.mark.parametrize("k", [1, 3, 5, 7])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_training_equals_the_torch_path_in_float32(shape, k, fmt):
    ours, torch_path = _pair(k, shape[1], seed=k)
    x = (torch.randn(*shape) * 3 + 1).to(memory_format=fmt)
    g = torch.randn(*shape).to(memory_format=fmt)
    a, b = _step(ours, x, g), _step(torch_path, x, g)
    assert ours.last_impl == "cpp" and torch_path.last_impl == "torch"
    assert a["y"].is_contiguous(memory_format=fmt)  # the output keeps the input's memory format, as the conv does
    for name in a:
        # dx of a batch with 2 values per channel is x̂ = ±1 exactly: its gradient is all cancellation (~1e-7 of dy)
        tolerance = 1e-4 if name == "dx" and shape[0] * shape[2] * shape[3] <= 2 else 2e-6
        assert _rel(a[name], b[name]) < tolerance, (name, _rel(a[name], b[name]))


@pytest.mark.parametrize("fmt", [CL, NCHW], ids=["channels_last", "nchw"])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_against_a_float64_reference_the_kernels_are_as_accurate_as_the_torch_path(k, fmt):
    ours, torch_path = _pair(k, 24, seed=1)
    reference = set_one_map(set_impl(copy.deepcopy(torch_path), "torch"), False).double()  # the composed path
    x = (torch.randn(8, 24, 12, 12) * 4 + 3).to(memory_format=fmt)
    g = torch.randn(8, 24, 12, 12).to(memory_format=fmt)
    a, b, ref = _step(ours, x, g), _step(torch_path, x, g), _step(reference, x.double(), g.double())
    for name in ref:
        assert _rel(a[name], ref[name]) < max(2 * _rel(b[name], ref[name]), 1e-6), (  # a few float32 ulps
            name, _rel(a[name], ref[name]), _rel(b[name], ref[name]))


@pytest.mark.parametrize("momentum,track", [(0.1, True), (None, True), (0.1, False)])
def test_running_statistics_follow_batchnorm_for_every_momentum(momentum, track):
    torch.manual_seed(0)
    ours = BNET2d(12, momentum=momentum, track_running_stats=track, impl="cpp")
    bn = torch.nn.BatchNorm2d(12, momentum=momentum, track_running_stats=track)
    exact = torch.nn.BatchNorm2d(12, momentum=momentum, track_running_stats=track).double()
    for _ in range(3):
        x = (torch.randn(4, 12, 5, 5) * 2 + 1).to(memory_format=CL)
        ours(x), bn(x), exact(x.double())
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        a, b, c = getattr(ours.norm, name), getattr(bn, name), getattr(exact, name)
        assert (a is None) == (b is None) == (not track)
        if a is not None:  # BN updates in float32, the kernels in double: both within a few ulps of float64
            assert _rel(a.double(), c.double()) < 5e-7 and _rel(a.double(), b.double()) < 2e-6, name
    if not track:  # no running statistics: eval normalises with the batch's, as BN does
        ours.eval(), bn.eval()
        x = torch.randn(4, 12, 5, 5)
        assert _rel(ours(x), bn(x)) < 1e-6


@pytest.mark.parametrize("fmt", [CL, NCHW], ids=["channels_last", "nchw"])
@pytest.mark.parametrize("k", [1, 3, 7])
def test_eval_and_no_grad_use_the_running_statistics(k, fmt):
    ours, torch_path = _pair(k, 19, seed=2)
    x = torch.randn(3, 19, 6, 20).to(memory_format=fmt)
    with torch.no_grad():
        a, b = ours.eval()(x), torch_path.eval()(x)
    assert ours.last_impl == "cpp" and a.is_contiguous(memory_format=fmt)
    assert _rel(a, b) < 1e-6
    x.requires_grad_()  # eval with a gradient to keep: the torch path's backward
    assert ours(x).grad_fn.name() == "ConvolutionBackward0" and ours.last_impl == "torch"


def test_one_value_per_channel_is_refused_as_batchnorm_refuses_it():
    layer = BNET2d(4, impl="cpp")
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        layer(torch.randn(1, 4, 1, 1))
    assert not layer.norm.running_var.isnan().any()


def test_two_runs_and_one_or_two_threads_give_bit_identical_results():
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 2):
            torch.set_num_threads(n)
            ours, _ = _pair(3, 40, seed=3)
            torch.manual_seed(9)
            x = torch.randn(16, 40, 14, 14).to(memory_format=CL)
            results.append(_step(ours, x, torch.randn_like(x)))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert all(torch.equal(results[0][k], other[k]) for k in results[0])


def test_kernels_outside_1_3_5_7_other_dtypes_and_autocast_take_the_torch_path():
    x = torch.randn(2, 4, 6, 6)
    layer = BNET2d(4, k=9, impl="cpp")
    layer(x)
    assert layer.last_impl == "torch"
    layer = BNET2d(4, impl="cpp").double()
    layer(x.double())
    assert layer.last_impl == "torch"
    layer = BNET2d(4, impl="auto")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16
    assert layer.last_impl == "torch"
    layer(x)
    assert layer.last_impl == "cpp"


def test_double_backward_is_refused_in_one_line_and_the_other_dims_are_refused_at_construction():
    layer = BNET2d(4, impl="cpp")
    x = torch.randn(2, 4, 5, 5, requires_grad=True)
    (dx,) = torch.autograd.grad(layer(x).square().sum(), x, create_graph=False)
    with pytest.raises(RuntimeError) as error:
        torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
    assert "BNET's C++ backward is not differentiable twice" in str(error.value)
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="impl='cpp' is BNET2d's"):
        BNET1d(4, impl="cpp")


@pytest.mark.parametrize("arch", ["xmininet", "mininest"])
def test_a_model_keeps_one_saved_map_per_layer_and_trains_as_the_torch_path(arch):
    torch.manual_seed(0)
    x = torch.randn(8, 3, 32, 32).to(memory_format=CL)
    y = torch.randint(0, 10, (8,))
    bn = saved_activation_bytes(create_model(arch, "bn").to(memory_format=CL), x, y)
    model = create_model(arch, "bnet").to(memory_format=CL)
    assert saved_activation_bytes(model, x, y) <= bn  # x and two per-channel vectors, as BN keeps
    assert impls_used(model) == ["cpp"]
    reference = set_impl(copy.deepcopy(model), "torch")
    for m in (model, reference):
        m.zero_grad()
        F.cross_entropy(m(x), y).backward()
    scale = max(float(p.grad.abs().max()) for p in reference.parameters())
    worst = max(float((a.grad - b.grad).abs().max()) for a, b in zip(model.parameters(), reference.parameters()))
    assert worst < 1e-5 * scale, worst / scale


def test_auto_resolves_to_cpp_on_a_cpu_and_to_torch_elsewhere():
    assert resolve_impl("auto", "cpu") == "cpp"
    assert resolve_impl("auto", "cpu", fp16=True) == "torch"
    assert resolve_impl("auto", "cuda") == "torch"
    assert resolve_impl("torch", "cpu") == "torch"


_FALLBACK = textwrap.dedent("""
    import torch
    from bnet_fastai import BNET2d
    from bnet_fastai.nn.layers import set_impl
    layer = BNET2d(4)
    x = torch.randn(2, 4, 5, 5)
    y = layer(x)
    torch.testing.assert_close(y, set_impl(layer, "torch")(x))
    print(layer.last_impl)
    try:
        BNET2d(4, impl="cpp")(x)
    except ValueError as e:
        print(e)
""")


@pytest.mark.parametrize("compiler,why", [("/nonexistent/c++", "no C++ compiler ('/nonexistent/c++' not found"),
                                          ("false", "the build failed")])
def test_where_the_kernels_cannot_be_built_one_line_says_why_and_the_torch_path_computes(tmp_path, compiler, why):
    env = {**os.environ, "CXX": compiler, "TORCH_EXTENSIONS_DIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", _FALLBACK], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.splitlines()
    assert out[0] == "torch"
    assert out[1].startswith("BNET2d(4, k=3, init='identity', impl='cpp'): ") and why in out[1]
    notices = [line for line in proc.stderr.splitlines() if line.startswith("BNET: the C++ kernels cannot be built")]
    assert len(notices) == 1 and why in notices[0] and notices[0].endswith("BNET2d computes through the torch path")


@pytest.mark.slow
def test_a_fastai_run_trains_through_the_kernels_and_records_it(tmp_path, monkeypatch):
    from bnet_fastai.runs.config import RunConfig
    from bnet_fastai.runs.train import run

    monkeypatch.setenv("BNET_FASTAI_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("BNET_FASTAI_CACHE", str(tmp_path / "cache"))
    config = RunConfig(arch="xmininet", norm="bnet", dataset="sample", size=16, bs=64, epochs=1, lr=3e-3,
                       fraction=0.5, workers=0)
    result = run(config, tmp_path / "runs")
    assert result["status"] == "finished" and result["bnet_impls_used"] == ["cpp"]
    folder = tmp_path / "runs" / config.run_id
    assert json.loads((folder / "config.json").read_text())["training"]["bnet_impl"] == "cpp"
    assert json.loads((folder / "status.json").read_text())["bnet_impls_used"] == ["cpp"]
    assert abs(result["accuracy"] - result["fused_accuracy"]) < 0.02


def test_empty_maps_tracing_and_vmap_take_the_torch_path():
    layer = BNET2d(4, impl="auto").eval()
    with torch.no_grad():
        assert layer(torch.randn(0, 4, 8, 8)).shape == (0, 4, 8, 8) and layer.last_impl == "torch"
        x = torch.randn(3, 4, 6, 6)
        # the tracer records no raw-memory kernel: the torch path's ops (its own check re-runs the layer untraced)
        traced = torch.jit.trace(layer, (x,), check_trace=False)
        assert layer.last_impl == "torch"
        torch.testing.assert_close(traced(x), layer(x))
        assert layer.last_impl == "cpp"
        batched = torch.vmap(layer)(x.unsqueeze(1))
    torch.testing.assert_close(batched.squeeze(1), torch.cat([layer(x[i:i + 1]) for i in range(3)]))
