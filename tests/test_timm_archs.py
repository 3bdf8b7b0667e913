"""Any timm classifier by name wherever an arch is taken (issue 36): built by timm with its own activation, its
BatchNorms converted as `swap_norm` converts them, refused in one line where swap_norm refuses, before a run
folder is written; a paired study of two timm families from the command line."""
import pandas as pd
import pytest
import timm
import torch
from torch import nn

from bnet_fastai import count_norms, create_model, load_model, swap_norm
from bnet_fastai.app.cli import main
from bnet_fastai.runs.config import RunConfig


@pytest.mark.parametrize("name,act", [("resnet10t", nn.ReLU), ("efficientnet_b0", nn.SiLU)])
@pytest.mark.parametrize("placement", ["all", "last"])
def test_a_timm_name_builds_as_swap_norm_converts_it(name, act, placement):
    torch.manual_seed(0)
    ours = create_model(name, "bnet", n_out=7, placement=placement, k=5)
    torch.manual_seed(0)
    theirs = swap_norm(timm.create_model(name, num_classes=7), "bnet", placement=placement, k=5)
    assert count_norms(ours) == count_norms(theirs) and count_norms(ours)["bnet"] > 0
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()))
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    assert any(isinstance(m, act) for m in ours.modules())  # the family's own activation
    assert ours(torch.randn(2, 3, 32, 32)).shape == (2, 7)


@pytest.mark.parametrize("fields,message", [
    (dict(arch="convnext_atto", norm="bnet"), "no BatchNorm layer in ConvNeXt: it uses LayerNorm2d; BNET replaces "
                                              "BatchNorm only"),
    (dict(arch="vgg11_bn", norm="bnet", placement="last"), "placement='last' found no residual block in VGG"),
    (dict(arch="resnet10t", act="mish"), "act applies to the project's archs; timm's resnet10t keeps its own"),
    (dict(arch="resnet9000"), "unknown arch 'resnet9000'; valid choices: xresnet18, "),
    (dict(arch="resnet10t", sa=True), "sa and pool apply to fastai's xresnet family only"),
])
def test_a_timm_name_is_refused_in_one_line_where_swap_norm_refuses(fields, message):
    with pytest.raises(ValueError) as err:
        RunConfig(**fields).validate()
    assert str(err.value).startswith(message) and "\n" not in str(err.value)
    RunConfig(arch=fields["arch"]).validate() if fields["arch"] != "resnet9000" else None  # BN: nothing to convert


def test_a_refused_timm_run_writes_nothing(tmp_path, capsys):
    assert main(["run", "--arch", "convnext_atto", "--norm", "bnet", "--out", str(tmp_path / "out")]) == 2
    assert "no BatchNorm layer in ConvNeXt" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_study_of_two_timm_families_pairs_and_answers(tmp_path, capsys):
    out = tmp_path / "study"
    code = main(["study", "quick", "--dataset", "sample", "--archs", "resnet10t,mobilenetv3_small_050",
                 "--norms", "bn,bnet-k3-all,bnet-k3-last", "--seeds", "0,1", "--epochs", "1", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    paired = pd.read_csv(out / "paired.csv")
    assert sorted(set(zip(paired.arch, paired.variant))) == [
        ("mobilenetv3_small_050", "bnet-k3-all"), ("mobilenetv3_small_050", "bnet-k3-last"),
        ("resnet10t", "bnet-k3-all"), ("resnet10t", "bnet-k3-last")]
    assert (paired.n_pairs == 2).all()
    assert "note: with 2 paired seeds no comparison here can reach a verdict" in printed
    assert "  resnet10t bnet-k3-last at 1 epochs: " in printed
    run = next(p for p in out.glob("mobilenetv3_small_050_bnet-k3-last_s0_*"))
    model = load_model(run)  # rebuilt from config.json by name
    assert count_norms(model)["bnet"] > 0 and count_norms(model)["bn"] > 0
