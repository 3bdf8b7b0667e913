"""BNET in anyone's model, round 3 (issue 27): "last" through re-parameterisable, pre-norm and dual-path blocks,
tied and shared modules, a second conversion, the meta device, TorchScript, and `import bnet_fastai` registering
BNET with timm. The timm networks behind these cases are in tests/model_zoo.py (test_real_models.py)."""
import copy
import subprocess
import sys

import pytest
import timm
import torch
from torch import nn

from bnet_fastai import BNET2d, count_norms, create_model, create_timm_model, select_norms, swap_norm

X = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))


def _cbn(c: int = 4, k: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c, c, k, padding=k // 2), nn.BatchNorm2d(c))


class RepBlock(nn.Module):
    """RepVGG's training form: 3x3 and 1x1 conv-BN branches and an identity BN, summed."""

    def __init__(self):
        super().__init__()
        self.kxk, self.one, self.identity = _cbn(), _cbn(k=1), nn.BatchNorm2d(4)

    def forward(self, x):
        return torch.relu(self.kxk(x) + self.one(x) + self.identity(x))


class PreNorm(nn.Module):
    """A pre-norm block: its only norm normalises the block's input."""

    def __init__(self):
        super().__init__()
        self.norm, self.conv = nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return x + self.conv(self.norm(x))


class DualPath(nn.Module):
    """DPN's block: pre-activation units, the shortcut a slice of a projection, the main path's slice added."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Sequential(nn.BatchNorm2d(4), nn.Conv2d(4, 6, 1))
        self.a = nn.Sequential(nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1))
        self.c = nn.Sequential(nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 6, 1))

    def forward(self, x):
        s = self.proj(x)
        out = self.c(self.a(x))
        return torch.cat([s[:, :4] + out[:, :4], s[:, 4:], out[:, 4:]], dim=1)


class Split(nn.Module):
    """Res2Net's hierarchy: two slices of one split added, not a residual addition."""

    def __init__(self):
        super().__init__()
        self.b1, self.b2 = _cbn(2), _cbn(2)

    def forward(self, x):
        a, b = torch.split(x, 2, dim=1)
        a = self.b1(a)
        return torch.cat([a, self.b2(a + b)], dim=1)


def test_last_finds_no_norm_in_parallel_branches_or_a_pre_norm_and_says_why():
    for block in (RepBlock(), PreNorm()):
        with pytest.raises(ValueError, match=r"^placement='last' found no last norm in Sequential: all 1 additions "
                                             r"of a shortcut to a path with norms add a path that ends in a sum"):
            select_norms(nn.Sequential(_cbn(), block), "last")


def test_a_block_with_a_residual_then_a_re_parameterisable_block_gets_one_last_norm():
    class Res(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = _cbn(), _cbn()

        def forward(self, x):
            return x + self.b(torch.relu(self.a(x)))

    model = nn.Sequential(Res(), RepBlock(), PreNorm())
    assert [n for n, _ in select_norms(model, "last")] == ["0.b.1"]


def test_dpn_s_sliced_shortcut_is_a_residual_addition_and_res2net_s_split_is_not():
    assert [n for n, _ in select_norms(nn.Sequential(DualPath()), "last")] == ["0.c.0"]
    with pytest.raises(ValueError, match="found no residual block in Sequential"):
        select_norms(nn.Sequential(Split()), "last")


def test_dpn68_gets_one_last_norm_per_dual_path_block():
    model = timm.create_model("dpn68")
    blocks = [n for n, m in model.named_modules() if type(m).__name__ == "DualPathBlock"]
    last = [n for n, _ in select_norms(model, "last")]
    assert len(blocks) == 22 and last == [f"{b}.c1x1_c.bn" for b in blocks]


def test_mobileone_and_fastvit_never_get_a_parallel_branch_or_the_input_s_norm():
    with pytest.raises(ValueError, match="found no last norm in ByobNet"):
        select_norms(timm.create_model("mobileone_s0"), "last")
    model = timm.create_model("fastvit_t8")
    blocks = [n for n, m in model.named_modules() if type(m).__name__ == "RepMixerBlock"]
    assert len(blocks) == 10
    assert [n for n, _ in select_norms(model, "last")] == [f"{b}.mlp.conv.bn" for b in blocks]


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.bn_alias = self.bn  # one layer under two names

    def forward(self, x):
        return self.bn_alias(self.conv(self.bn(x)))


def test_a_tied_or_shared_batchnorm_becomes_one_bnet_under_every_name():
    tied = swap_norm(Tied(), "bnet")
    assert type(tied.bn) is BNET2d and tied.bn_alias is tied.bn
    bn = nn.BatchNorm2d(4)
    shared = nn.Sequential(nn.Sequential(nn.Conv2d(4, 4, 1), bn), nn.Sequential(nn.Conv2d(4, 4, 1), bn))
    before = sum(p.numel() for p in shared.parameters())  # 2 convs (16 + 4 each) and one BN (4 + 4): 48
    swap_norm(shared, "bnet")
    assert shared[0][1] is shared[1][1] and type(shared[0][1]) is BNET2d
    assert (before, sum(p.numel() for p in shared.parameters())) == (48, 40 + 40)  # one BNET: 4*9 + 4


def test_a_second_swap_norm_with_another_k_refuses_in_one_line_and_the_same_k_is_a_no_op():
    model = swap_norm(create_model("xmininet"), "bnet", k=3)
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"^swap_norm\(k=5\): XResNet already holds BNET layers with k=3, and "
                                         r"swap_norm converts BatchNorm only; convert the BatchNorm model with k=5"):
        swap_norm(model, "bnet", k=5)
    assert swap_norm(model, "bnet", k=3) is model
    assert all(torch.equal(v, state[n]) for n, v in model.state_dict().items())


def test_models_build_and_convert_on_the_meta_device():
    with torch.device("meta"):
        model = create_model("xmininet", "bnet")
        swapped = swap_norm(timm.create_model("resnet18"), "bnet")
    assert count_norms(model)["bn"] == 0 and count_norms(swapped) == {"bn": 0, "bnet": 20}
    assert all(p.is_meta for p in swapped.parameters())


def test_torchscript_is_refused_in_one_line_and_a_fused_model_scripts():
    with pytest.raises(RuntimeError, match=r"^BNET2d does not support TorchScript .*torch.export or ONNX"):
        torch.jit.script(nn.Sequential(nn.Conv2d(4, 4, 1), BNET2d(4)))
    with pytest.raises(TypeError, match="^swap_norm takes an eager nn.Module, not a TorchScript module"):
        swap_norm(torch.jit.script(nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))), "bnet")
    from bnet_fastai import fuse_bnet
    net = swap_norm(nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)), "bnet").eval()
    scripted = torch.jit.script(fuse_bnet(net))
    with torch.no_grad():
        torch.testing.assert_close(scripted(X), net(X), rtol=0, atol=1e-6)


def test_create_timm_model_refuses_or_converts_what_the_route_leaves():
    with pytest.raises(ValueError, match=r"^timm's skresnet18 builder kept 8 BatchNorm layer\(s\) with norm_layer="
                                         r"BNET \(layer1.0.conv1.attn.bn, .*leftover='swap' converts them"):
        create_timm_model("skresnet18", leftover="raise")
    with pytest.raises(ValueError, match="^unknown leftover .ignore.; valid choices: swap, raise, keep"):
        create_timm_model("resnet18", leftover="ignore")


def test_create_timm_model_keeps_the_family_s_eps():
    route = timm.create_model("xception41", norm_layer=BNET2d)
    assert {m.eps for m in route.modules() if isinstance(m, BNET2d)} == {1e-5}  # timm's route drops it
    model = create_timm_model("xception41")
    assert {m.eps for m in model.modules() if isinstance(m, BNET2d)} == {1e-3} and count_norms(model)["bn"] == 0


@pytest.mark.parametrize("order", ["import timm, bnet_fastai", "import bnet_fastai, timm"])
def test_importing_bnet_fastai_registers_bnet_with_timm_in_either_order(order):
    code = (f"{order}\nimport sys\nassert 'torch' in sys.modules\n"
            "m = timm.create_model('resnet18', norm_layer='bnet')\n"
            "print(sum(type(x).__name__ == 'BNET2d' for x in m.modules()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["20"]


def test_importing_bnet_fastai_alone_loads_neither_torch_nor_timm():
    code = "import sys, bnet_fastai\nprint('torch' in sys.modules, 'timm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
