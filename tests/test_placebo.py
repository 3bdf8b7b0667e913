"""The budget study's placebo arm: BNET with k=1 in every norm *is* BN. A fresh k=1 BNET model and a BN model
built from one seed start equal (kernel = gamma, bias = beta, zero wherever gamma is), are
weight-decayed by the same rule, and after one step of the real fastai Learner on the same batch are still equal:
their differences in the study can only come from floating-point order, the pipeline's own noise."""
import pytest
import torch
from fastai.callback.core import Callback, CancelFitException

from bnet_fastai.nn.layers import BNET2d, impls_used
from bnet_fastai.runs.config import RunConfig
from bnet_fastai.runs.learner import build_learner

from .helpers import CPU_IMPL

PLACEBO = dict(arch="xmininet", dataset="sample", size=16, bs=32, epochs=1, fraction=0.5, workers=0, seed=3)


class _OneStep(Callback):
    """Stop the fit after the first optimiser step, keeping the batch, loss and gradients it saw."""

    def after_backward(self) -> None:
        self.grads = {n: p.grad.detach().clone() for n, p in self.learn.model.named_parameters()}

    def after_step(self) -> None:
        self.batch, self.loss = [t.detach().clone() for t in self.learn.xb + self.learn.yb], float(self.learn.loss)
        raise CancelFitException()


def _stepped(norm: str, **kw):
    learn, _ = build_learner(RunConfig(norm=norm, **PLACEBO, **kw))
    fresh = {k: v.detach().clone() for k, v in learn.model.state_dict().items()}
    step = _OneStep()
    learn.fit(1, lr=1e-2, cbs=step)  # fastai's Adam, decoupled weight decay 1e-2, the run's no-decay rule
    return learn, fresh, step


def _as_bn(state: dict, model) -> dict:
    """A k=1 BNET model's state_dict in BN's names: kernel -> weight (gamma), norm.running_* -> running_*."""
    out = {}
    for name, value in state.items():
        name = name.replace(".norm.", ".")
        out[name] = value.flatten() if name.endswith(".weight") and value.dim() == 4 and value.shape[1:] == (1, 1, 1) \
            and isinstance(model.get_submodule(name.rsplit(".", 1)[0]), BNET2d) else value
    return out


@pytest.mark.parametrize("impl", ["torch", pytest.param("cpp", marks=pytest.mark.skipif(
    CPU_IMPL != "cpp", reason="the C++ kernels cannot be built here (tests/test_cpp_bnet.py says why)"))])
def test_a_fresh_k1_bnet_model_is_the_bn_model_and_one_learner_step_keeps_them_equal(tmp_path, monkeypatch, impl):
    monkeypatch.setenv("BNET_FASTAI_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("BNET_FASTAI_CACHE", str(tmp_path / "cache"))
    bn, bn_fresh, bn_step = _stepped("bn")
    placebo, placebo_fresh, placebo_step = _stepped("bnet", k=1, placement="all", bnet_impl=impl)
    assert impls_used(placebo.model, training=True) == [impl]
    bnets = [m for m in placebo.model.modules() if isinstance(m, BNET2d)]
    assert len(bnets) == sum(isinstance(m, torch.nn.BatchNorm2d) for m in bn.model.modules()) > 0
    # the same init: every tensor, the kernels equal to gamma (zero where fastai zero-initialises it)
    fresh = _as_bn(placebo_fresh, placebo.model)
    assert fresh.keys() == bn_fresh.keys()
    assert all(torch.equal(fresh[k], bn_fresh[k]) for k in bn_fresh)
    assert sum(not m.weight.any() for m in bnets) == sum(
        isinstance(m, torch.nn.BatchNorm2d) and not m.weight.any() for m in bn.model.modules())
    # the same weight-decay rule: the same number of parameters decayed and not
    def decayed(learn):
        return sorted(int(p.numel()) for p in learn.model.parameters() if learn.opt.state[p].get("do_wd", True))
    assert decayed(placebo) == decayed(bn)
    # the same batch, the same loss, and after one Adam step the same parameters and running statistics
    assert all(torch.equal(a, b) for a, b in zip(placebo_step.batch, bn_step.batch))
    assert abs(placebo_step.loss - bn_step.loss) < 1e-6
    after, bn_after = _as_bn(placebo.model.state_dict(), placebo.model), bn.model.state_dict()
    changed = [k for k in bn_after if not torch.equal(bn_after[k], bn_fresh[k])]
    assert len(changed) > len(bn_after) // 2  # the step moved the model
    # the same gradients, up to float order: BNET's one-map backward (a 1x1 depthwise conv's backward, then BN's
    # formula on x-hat) and BN's own backward round differently, and the C++ kernels sum in double (BN in float):
    # measured largest 1.3e-6 of a gradient's largest value (a beta's, the C++ kernels)
    grads = _as_bn(placebo_step.grads, placebo.model)
    assert grads.keys() == bn_step.grads.keys()
    for name, g in bn_step.grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=3e-6 * float(g.abs().max()),
                                   msg=lambda m: f"gradient of {name}: {m}")
    # and the same parameters after the step, where Adam's first step g / (|g| + eps) magnifies that rounding
    # wherever a gradient is near eps: 1e-4 is a hundredth of the step (lr 1e-2); measured largest 7.4e-5
    for name in bn_after:
        torch.testing.assert_close(after[name], bn_after[name], rtol=0, atol=1e-4, msg=lambda m: f"{name}: {m}")
