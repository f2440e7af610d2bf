"""Parity checks written from mutants that test_models.py and test_plan.py let through:
constructor validation and initialization as torchvision's, dilation in the constructor path,
legacy pretrained=True, from_torchvision, and the conditions that must make the eval forward
fall back to eager."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from _models import realistic_bn
from conftest import assert_close_rel

import fastres


def _seeded(build, seed, **kwargs):
    torch.manual_seed(seed)
    return build(**kwargs)


@pytest.mark.parametrize("arch, kwargs", [
    ("resnet18", {"num_classes": 5}),
    ("resnext50_32x4d", {"zero_init_residual": True, "num_classes": 3}),
    ("resnet50", {"replace_stride_with_dilation": [False, True, True], "num_classes": 4}),
])
def test_constructor_initialization_and_modules_equal_torchvisions(arch, kwargs):
    """Same seed, same constructor arguments: the same module tree (reprs, so strides and
    dilations) and bit-identical initial weights as torchvision's (kaiming fan_out init,
    zero_init_residual on every Bottleneck, the first block of a dilated stage keeping the
    previous dilation); the constructor-built dilated model computes torchvision's output."""
    seed = int(torch.randint(0, 2**31 - 1, ()))
    tv = _seeded(getattr(torchvision.models, arch), seed, **kwargs)
    fr = _seeded(getattr(fastres, arch), seed, **kwargs)
    assert [(n, repr(m)) for n, m in tv.named_modules() if n] == \
        [(n, repr(m)) for n, m in fr.named_modules() if n]
    for (k, a), b in zip(fr.state_dict().items(), tv.state_dict().values()):
        assert torch.equal(a, b), k
    if kwargs.get("replace_stride_with_dilation"):
        realistic_bn(tv, steps=1, size=32, device="cpu")
        fr.load_state_dict(tv.state_dict())
        fr.eval()
        x = torch.randn(1, 3, 37, 29)
        with torch.no_grad():
            assert_close_rel(fr(x), tv(x), 1e-5, "constructor-built dilated resnet50")


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"groups": 2}, ValueError, "BasicBlock only supports groups=1 and base_width=64"),
    ({"width_per_group": 32}, ValueError, "BasicBlock only supports groups=1"),
    ({"replace_stride_with_dilation": [False, False, True]}, NotImplementedError,
     "Dilation > 1 not supported in BasicBlock"),
    ({"replace_stride_with_dilation": [False, False, True, True]}, ValueError,
     "replace_stride_with_dilation should be None or a 3-element"),
])
def test_constructor_refuses_what_torchvision_refuses(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        torchvision.models.resnet18(**kwargs)
    with pytest.raises(exc, match=match):
        fastres.resnet18(**kwargs)


def test_pretrained_true_is_imagenet1k_v1_not_default(tmp_path, monkeypatch):
    """torchvision's pretrained=True is IMAGENET1K_V1 (resnet50's DEFAULT is V2)."""
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    v1 = torchvision.models.ResNet50_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[-1]
    with pytest.warns(UserWarning, match="pretrained=True is weights=ResNet50_Weights"), \
            pytest.raises(FileNotFoundError, match=v1.replace(".", r"\.")):
        fastres.resnet50(pretrained=True)


def test_weights_without_fc_are_a_clear_value_error():
    """A backbone state_dict (no fc.*) is 'do not fit', not a KeyError."""
    sd = {k: v for k, v in torchvision.models.resnet18().state_dict().items()
          if not k.startswith("fc.")}
    with pytest.raises(ValueError, match="do not fit resnet18"):
        fastres.resnet18(weights=sd)


def test_weights_whose_fc_weight_is_not_a_matrix_are_a_clear_value_error():
    """The class count is read off ``fc.weight`` before ``load_state_dict`` checks anything: a
    list or a 0-d tensor there gave AttributeError / IndexError."""
    sd = dict(torchvision.models.resnet18().state_dict())
    for bad, said in (([[0.0] * 512] * 1000, "a list"), (torch.tensor(1.0), r"shape \(\)"),
                      (torch.zeros(1000), r"shape \(1000,\)")):
        sd["fc.weight"] = bad
        with pytest.raises(ValueError, match=f"do not fit resnet18: fc.weight must be a 2-D "
                                             f"tensor .*got {said}"):
            fastres.resnet18(weights=sd)


def test_reset_classifier_refuses_a_bool():
    m = fastres.resnet18()
    with pytest.raises(ValueError, match="num_classes must be an int >= 0"):
        m.reset_classifier(True)


def test_from_torchvision_refuses_a_model_with_fc_but_no_resnet_layers():
    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 2)

    with pytest.raises(TypeError, match="torchvision ResNet"):
        fastres.from_torchvision(Head())


def test_from_torchvision_leaves_the_sources_hooks_behind():
    """Hooks on torchvision's norm modules stay with torchvision's model: the copy has none,
    so its eval forward runs fused and never calls them."""
    tv = realistic_bn(torchvision.models.resnet18(), steps=1, size=32, device="cpu")
    calls = []
    tv.layer1[0].bn1.register_forward_hook(lambda *a: calls.append("post"))
    tv.bn1.register_forward_pre_hook(lambda *a: calls.append("pre"))
    fr = fastres.from_torchvision(tv)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in fr.modules())
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        out = fr(x)
        assert fastres.plan.eager_reason(fr, x) is None
    assert calls == []
    with torch.no_grad():
        assert_close_rel(out, tv(x), 1e-5, "converted model")


@pytest.mark.filterwarnings("ignore:fastres. eval-mode forward")
def test_eval_input_requiring_grad_on_a_frozen_model_gets_input_gradients():
    """Saliency maps / adversarial attacks: every parameter frozen, the input requires grad.
    The forward must record autograd (eager), and x.grad equal torchvision's."""
    tv = realistic_bn(torchvision.models.resnet18(num_classes=7), steps=1, size=32,
                      device="cpu")
    fr = fastres.from_torchvision(tv)
    tv.requires_grad_(False)
    fr.requires_grad_(False)
    x = torch.randn(2, 3, 33, 31)
    grads = []
    for m in (tv, fr):
        xi = x.clone().requires_grad_()
        out = m(xi)
        assert out.requires_grad
        out.square().sum().backward()
        grads.append(xi.grad)
    assert_close_rel(grads[1], grads[0], 1e-5, "input gradient")


class _ClampedReLU(torch.nn.ReLU):
    def forward(self, x):
        return x.clamp(0.0, 0.5)


class _ScaledLinear(torch.nn.Linear):
    def forward(self, x):
        return super().forward(x) * 3.0 - 1.0


_EDITS = {
    # a downsample with a module after its BatchNorm: the plan knows only (conv, bn)
    "downsample extra relu": lambda m: m.layer2[0].downsample.append(torch.nn.ReLU()),
    # no norm in the downsample (bn1/bn2/bn3 are still BatchNorm2d)
    "downsample identity norm": lambda m: m.layer3[0].downsample.__setitem__(
        1, torch.nn.Identity()),
    # a ReLU subclass with its own forward
    "relu subclass": lambda m: setattr(m, "relu", _ClampedReLU()),
    "block relu subclass": lambda m: setattr(m.layer1[1], "relu", _ClampedReLU()),
    # an nn.Linear subclass with its own forward as fc
    "fc linear subclass": lambda m: setattr(m, "fc", _ScaledLinear(512, 6)),
}


@pytest.mark.filterwarnings("ignore:fastres. eval-mode forward runs eagerly")
@pytest.mark.parametrize("edit", list(_EDITS))
def test_edited_modules_the_plan_cannot_fuse_give_torchvisions_output(edit):
    tv = realistic_bn(torchvision.models.resnet18(), steps=1, size=32, device="cpu")
    _EDITS[edit](tv)
    for m in tv.modules():  # (the new fc's weights)
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.normal_(m.weight, std=0.05)
    tv.eval()
    fr = fastres.from_torchvision(copy.deepcopy(tv))
    fr2 = fastres.from_torchvision(torchvision.models.resnet18())
    fr2.eval()
    with torch.no_grad():
        fr2(torch.randn(1, 3, 32, 32))  # a plan exists before the edit
    _EDITS[edit](fr2)
    fr2.load_state_dict(tv.state_dict())
    fr2.eval()
    x = torch.randn(2, 3, 40, 36)
    with torch.no_grad():
        ref = tv(x)
        assert_close_rel(fr(x), ref, 1e-5, f"{edit} (converted)")
        assert_close_rel(fr2(x), ref, 1e-5, f"{edit} (edited after a forward)")
