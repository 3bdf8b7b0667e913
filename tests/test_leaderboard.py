"""The leaderboard profile's wiring on tiny inputs: flat-cos schedule, ranger, Mish, self-attention, max-blur pool."""
import dataclasses
import json

import pytest
import torch
from fastai.layers import SimpleSelfAttention
from kornia.filters import MaxBlurPool2D
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from bnet_fastai import create_model
from bnet_fastai.sweeps.study import resolve
from bnet_fastai.runs.config import RunConfig
from bnet_fastai.runs.learner import build_learner
from bnet_fastai.runs.train import run


def test_the_profile_is_fastais_leaderboard_recipe():
    study = resolve("auto", "leaderboard")
    base = study.base
    assert (base.dataset, base.size, base.epochs, base.bs, base.lr) == ("imagenette-320", 128, 5, 32, 8e-3)
    assert (base.opt, base.schedule, base.act, base.sa, base.pool) == ("ranger", "flat_cos", "mish", True, "maxblur")
    assert base.label_smoothing == 0.1 and base.wd == 1e-2
    assert study.archs == ["xse_resnext50"] and study.norms == ["bn", "bnet"] and study.seeds == list(range(8))


def test_sa_and_maxblur_build_into_the_xresnet_family_and_keep_shapes():
    model = create_model("xse_resnext50", "bnet", act="mish", sa=True, pool="maxblur", placement="last")
    assert sum(isinstance(m, SimpleSelfAttention) for m in model.modules()) == 1  # fastai: last block of stage 1
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    assert sum(isinstance(m, MaxBlurPool2D) for m in model.modules()) == 4  # the stem's and 3 shortcut pools
    assert any(isinstance(m, nn.Mish) for m in model.modules())
    for size in (64, 96, 160):  # multiples of 32, as RunConfig.validate demands for maxblur
        out = model.eval()(torch.randn(2, 3, size, size))
        assert out.shape == (2, 10) and torch.isfinite(out).all()


@pytest.mark.parametrize("bad, message", [(dict(arch="mininest", sa=True), "sa and pool apply to fastai's xresnet"),
                                          (dict(arch="mininest", pool="maxblur"), "'mininest' is timm's"),
                                          (dict(arch="xmininet", pool="blur"), "valid choices: avg, max, maxblur"),
                                          (dict(arch="xmininet", pool="maxblur", size=28), "multiple of 32")])
def test_sa_and_pool_are_rejected_where_they_do_not_apply(bad, message):
    with pytest.raises(ValueError, match=message):
        RunConfig(**bad).validate()


def test_a_tiny_leaderboard_run_trains_with_flat_cos_and_ranger(tmp_path):
    base = resolve("sample", "leaderboard").base
    config = dataclasses.replace(base, arch="xmininet", size=32, epochs=2, fraction=0.5, workers=0, bs=32)
    learn, _ = build_learner(config)
    assert type(learn.opt_func(learn.model.parameters(), lr=1e-3)).__name__ == "Lookahead"  # ranger
    result = run(config, tmp_path)
    assert result["status"] == "finished"
    run_dir = tmp_path / config.run_id
    recorded = json.loads((run_dir / "config.json").read_text())
    assert recorded["training"]["schedule"] == "fit_flat_cos"
    assert recorded["config"] | {"arch": None} == {**dataclasses.asdict(config), "arch": None}
    events = EventAccumulator(str(run_dir))  # the learning rate the run really used, epoch by epoch
    events.Reload()
    lrs = [p.value for p in events.Scalars("lr")]
    assert lrs[0] == pytest.approx(8e-3) and lrs[1] < 8e-3 / 20  # flat through epoch 1, annealed by the end


def test_flat_cos_holds_the_rate_for_three_quarters_then_anneals():
    config = RunConfig(arch="xmininet", dataset="sample", size=16, bs=64, epochs=4, fraction=0.5, workers=0,
                       schedule="flat_cos", lr=8e-3)
    learn, _ = build_learner(config)
    with learn.no_bar(), learn.no_logging():
        learn.fit_flat_cos(config.epochs, config.lr)
    lrs = learn.recorder.lrs
    flat = int(len(lrs) * 0.75)
    assert lrs[:flat] == pytest.approx([8e-3] * flat)
    assert lrs[-1] < 8e-3 / 20 and all(a >= b for a, b in zip(lrs[flat:], lrs[flat + 1:]))
