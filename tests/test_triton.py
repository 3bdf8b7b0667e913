"""The Triton BNET2d (`bnet_fastai.nn.compute.triton_bnet`) against the torch path: on a CPU under Triton's interpreter
(``TRITON_INTERPRET=1``, set by tests/conftest.py for the session before triton is first imported), on CUDA
under ``pytest -m cuda``.

Tiny shapes keep the interpreter quick: borders, odd sizes, a 1x1 map, N=1, a channel count that is not a
multiple of the kernel's block, contiguous and channels_last inputs, k = 1, 3, 5, 7, float32, float16 and
bfloat16."""
import dataclasses
import os

import pytest
import torch

from bnet_fastai import BNET2d
from bnet_fastai.nn.layers import BNET1d, set_impl
from bnet_fastai.runs.config import RunConfig
from bnet_fastai.runs.learner import build_learner

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# the CPU under the interpreter (here and in CI); CUDA compiled, under `pytest -m cuda` on a GPU machine
DEVICES = [pytest.param("cpu", marks=pytest.mark.skipif(not INTERPRETED, reason="compiled Triton kernels need "
                                                        "CUDA tensors; the CPU runs them under TRITON_INTERPRET=1")),
           pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
               not torch.cuda.is_available(), reason="needs a CUDA GPU; run `pytest -m cuda` on a GPU machine")])]
# (N, C, H, W): borders and odd sizes, N=1 with H·W > 1, a 1x1 map, C not a multiple of BLOCK_C (16)
SHAPES = [(2, 3, 5, 7), (1, 4, 6, 5), (3, 2, 1, 1), (2, 17, 3, 4)]


def _pair(k, c, device, **kw):
    torch.manual_seed(0)
    ref = BNET2d(c, k=k, impl="torch", **kw).to(device)
    with torch.no_grad():  # a kernel away from the identity, a bias away from 0
        ref.weight.normal_(0, 0.5)
        ref.bias.normal_(0, 0.5)
    tri = BNET2d(c, k=k, impl="triton", **kw).to(device)
    tri.load_state_dict(ref.state_dict())
    return ref, tri


def _run(layer, x, dy):
    x = x.detach().clone().requires_grad_()
    y = layer(x)
    y.backward(dy)
    return y, x.grad, layer.weight.grad, layer.bias.grad


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("k", [1, 3, 5, 7])
def test_training_step_equals_the_torch_path_in_float32(k, shape, channels_last, device):
    ref, tri = _pair(k, shape[1], device)
    torch.manual_seed(1)
    x = (torch.randn(shape, device=device) * 2 + 0.5)
    dy = torch.randn(shape, device=device)
    if channels_last:
        x, dy = x.contiguous(memory_format=torch.channels_last), dy.contiguous(memory_format=torch.channels_last)
    for a, b in zip(_run(ref, x, dy), _run(tri, x, dy)):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tri.norm.running_mean, ref.norm.running_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(tri.norm.running_var, ref.norm.running_var, rtol=1e-5, atol=1e-6)
    assert tri.norm.num_batches_tracked == ref.norm.num_batches_tracked == 1


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype, tol", [(torch.float16, 2e-2), (torch.bfloat16, 1e-1)])
def test_half_inputs_accumulate_in_float32_and_keep_their_dtype(dtype, tol, device):
    ref, tri = _pair(3, 5, device)
    torch.manual_seed(2)
    x, dy = torch.randn(2, 5, 6, 7, device=device), torch.randn(2, 5, 6, 7, device=device)
    y_ref, dx_ref, dw_ref, db_ref = _run(ref, x, dy)  # the float32 reference
    y, dx, dw, db = _run(tri, x.to(dtype), dy.to(dtype))
    assert y.dtype == dx.dtype == dtype and dw.dtype == db.dtype == torch.float32
    for got, want in ((y, y_ref), (dx, dx_ref), (dw, dw_ref), (db, db_ref)):
        assert ((got.float() - want).abs().max() / want.abs().max()).item() <= tol


@pytest.mark.parametrize("device", DEVICES)
def test_eval_momentum_none_and_no_running_stats_behave_as_the_torch_path(device):
    torch.manual_seed(3)
    x = torch.randn(2, 3, 5, 5, device=device)
    for kw in ({}, {"momentum": None}, {"track_running_stats": False}):
        ref, tri = _pair(3, 3, device, **kw)
        for _ in range(3):  # three batches: the cumulative average of momentum=None
            with torch.no_grad():
                torch.testing.assert_close(tri(x * 1.5 + 0.2), ref(x * 1.5 + 0.2), rtol=1e-5, atol=1e-5)
        if kw.get("track_running_stats", True):
            torch.testing.assert_close(tri.norm.running_var, ref.norm.running_var, rtol=1e-5, atol=1e-6)
        ref.eval(), tri.eval()
        with torch.no_grad():
            torch.testing.assert_close(tri(x), ref(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_reductions_are_deterministic_and_the_layer_keeps_one_map(device):
    _, tri = _pair(3, 17, device)
    x, dy = torch.randn(2, 17, 9, 9, device=device), torch.randn(2, 17, 9, 9, device=device)
    first, second = _run(tri, x, dy), _run(_pair(3, 17, device)[1], x, dy)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        tri(x.requires_grad_())
    big = [t for t in saved if t.numel() == x.numel()]
    assert len(big) == 1 and big[0].data_ptr() == x.data_ptr()  # x itself, not x̂: one map


def test_impl_is_checked_where_it_enters():
    with pytest.raises(ValueError, match="unknown BNET impl 'cuda'; valid choices: auto, torch, cpp, triton"):
        BNET2d(4, impl="cuda")
    with pytest.raises(ValueError, match="impl='triton' is BNET2d's"):
        BNET1d(4, impl="triton")
    model = set_impl(torch.nn.Sequential(BNET2d(4), BNET1d(4)), "triton")
    assert (model[0].impl, model[1].impl) == ("triton", "auto")
    assert repr(model[0]).startswith("BNET2d(\n  4, k=3, init='identity', impl='triton'")


def test_triton_on_a_cpu_tensor_without_the_interpreter_is_one_line(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=r"^BNET2d\(impl='triton'\) needs a CUDA tensor, got one on cpu: use "
                                         r"impl='torch'"):
        BNET2d(4, impl="triton")(torch.randn(2, 4, 3, 3))


@pytest.mark.parametrize("device", DEVICES)
def test_double_backward_is_refused_naming_the_layer(device):
    _, tri = _pair(3, 3, device)
    x = torch.randn(2, 3, 4, 4, device=device, requires_grad=True)
    with pytest.raises(RuntimeError, match=r"BNET2d\(3, k=3, init='identity', impl='triton'\): BNET's Triton "
                                           r"backward is not differentiable twice"):
        torch.autograd.grad(tri(x).square().sum(), x, create_graph=True)


def test_a_run_records_its_impl_and_the_default_keeps_every_run_id(tmp_path, monkeypatch):
    base = RunConfig(arch="xmininet", norm="bnet", dataset="sample", size=16, epochs=1, workers=0)
    assert dataclasses.replace(base, bnet_impl="auto").run_id == base.run_id  # published run folders keep names
    assert dataclasses.replace(base, bnet_impl="triton").run_id != base.run_id
    assert RunConfig(norm="bn", bnet_impl="triton").run_id == RunConfig(norm="bn").run_id  # BN has no BNET
    with pytest.raises(ValueError, match="unknown bnet_impl 'fast'; valid choices: auto, torch, cpp, triton"):
        dataclasses.replace(base, bnet_impl="fast").validate()
    monkeypatch.setenv("BNET_FASTAI_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="^bnet_impl='triton' runs the fused Triton kernels on CUDA tensors; this "
                                         "run trains on the CPU"):
        build_learner(dataclasses.replace(base, bnet_impl="triton"))
    learn, _ = build_learner(dataclasses.replace(base, bnet_impl="torch"))
    assert {m.impl for m in learn.model.modules() if isinstance(m, BNET2d)} == {"torch"}
