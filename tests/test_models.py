"""fastres models against torchvision: structure, state_dict, eval outputs, constructors."""

from __future__ import annotations

import pytest
import torch
import torchvision
from _models import ARCHS, DEVICE, assert_matches_torchvision, tol_for, twin
from conftest import assert_close_rel

import fastres


@pytest.fixture(scope="module")
def twins():
    cache = {}

    def get(arch):
        if arch not in cache:
            cache.clear()  # keep at most one big pair alive
            cache[arch] = twin(arch)
        return cache[arch]

    return get


@pytest.mark.parametrize("arch", ARCHS)
def test_state_dict_matches_torchvision(arch):
    tv = getattr(torchvision.models, arch)(weights=None)
    fr = getattr(fastres, arch)()
    tv_sd, fr_sd = tv.state_dict(), fr.state_dict()
    assert list(tv_sd) == list(fr_sd)
    assert [v.shape for v in tv_sd.values()] == [v.shape for v in fr_sd.values()]
    # both directions, strict
    fr.load_state_dict(tv_sd, strict=True)
    tv.load_state_dict(fr_sd, strict=True)
    assert [n for n, _ in tv.named_modules()] == [n for n, _ in fr.named_modules()]


@pytest.mark.parametrize("arch", ARCHS)
def test_eval_matches_torchvision(arch, twins):
    tv, fr = twins(arch)
    # odd spatial size, batch > 1, contiguous NCHW
    x = torch.randn(2, 3, 45, 39, device=DEVICE)
    with torch.no_grad():
        out = fr(x)
    assert out.dtype == torch.float32 and out.shape == (2, 1000)
    assert_matches_torchvision(out, tv, x, f"{arch} eval output")


@pytest.mark.parametrize("layout", ["channels_last", "non_contiguous", "batch1"])
@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "resnext50_32x4d"])
def test_eval_input_layouts(arch, layout, twins):
    tv, fr = twins(arch)
    if layout == "channels_last":
        x = torch.randn(3, 3, 37, 41, device=DEVICE).contiguous(memory_format=torch.channels_last)
    elif layout == "non_contiguous":
        x = torch.randn(2, 3, 80, 66, device=DEVICE)[:, :, ::2, 1::2]
        assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    else:
        x = torch.randn(1, 3, 33, 35, device=DEVICE)
    with torch.no_grad():
        out = fr(x)
    assert_matches_torchvision(out, tv, x, f"{arch} {layout}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_eval_low_precision(arch, dtype, twins):
    if DEVICE.type == "cpu" and dtype == torch.float16:
        pytest.importorskip("torch", minversion="2.1")  # CPU fp16 conv exists since 2.1
    tv, fr = twins(arch)
    x = torch.randn(2, 3, 40, 40, device=DEVICE)
    half = fastres.from_torchvision(tv).to(dtype)
    with torch.no_grad():
        out = half(x.to(dtype))
    assert out.dtype == dtype
    assert_matches_torchvision(out, tv, x, f"{arch} {dtype}", dtype)


def test_autocast_uses_autocast_dtype(twins):
    tv, fr = twins("resnet18")
    x = torch.randn(2, 3, 40, 40, device=DEVICE)
    dtype = torch.bfloat16
    with torch.no_grad(), torch.autocast(DEVICE.type, dtype=dtype):
        out = fr(x)
        eager = tv(x)
    assert out.dtype == eager.dtype == dtype
    assert_matches_torchvision(out, tv, x, "autocast output", dtype, eager=eager)


@pytest.mark.parametrize("dilation", [[False, True, True], [False, False, True]])
def test_dilated_backbone(dilation):
    tv, fr = twin("resnet50", replace_stride_with_dilation=dilation)
    assert [m.dilation for m in (fr.layer4[1].conv2,)] == [tv.layer4[1].conv2.dilation]
    x = torch.randn(1, 3, 49, 43, device=DEVICE)
    with torch.no_grad():
        out = fr(x)
        feats = fr.forward_features(x)
    assert_matches_torchvision(out, tv, x, f"dilated {dilation}")
    stride = 32 // (2 ** sum(dilation))
    assert feats.shape[-2:] == (-(-49 // stride), -(-43 // stride))


def test_constructor_options():
    m = fastres.resnet50(num_classes=10, zero_init_residual=True)
    assert m.fc.out_features == 10
    assert all(float(b.bn3.weight.detach().abs().sum()) == 0 for layer in
               (m.layer1, m.layer2, m.layer3, m.layer4) for b in layer)
    m = fastres.resnet18(zero_init_residual=True)
    assert float(m.layer1[0].bn2.weight.detach().abs().sum()) == 0
    m = fastres.resnet50(groups=2, width_per_group=32)
    assert m.layer1[0].conv2.groups == 2
    tv = torchvision.models.resnet50(groups=2, width_per_group=32)
    m.load_state_dict(tv.state_dict(), strict=True)
    with pytest.raises(ValueError, match="groups"):
        fastres.resnext50_32x4d(groups=4)
    with pytest.raises(ValueError, match="replace_stride_with_dilation"):
        fastres.resnet50(replace_stride_with_dilation=[True])


def test_weights_path_and_state_dict(tmp_path):
    tv = torchvision.models.resnet18(weights=None, num_classes=7)
    path = tmp_path / "resnet18.pth"
    torch.save(tv.state_dict(), path)
    for weights in (str(path), path, tv.state_dict()):
        fr = fastres.resnet18(weights=weights)
        assert fr.fc.out_features == 7  # taken from the checkpoint
        for (k, a), b in zip(fr.state_dict().items(), tv.state_dict().values()):
            assert torch.equal(a, b), k
    with pytest.raises(FileNotFoundError, match="does not exist"):
        fastres.resnet18(weights=str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="do not fit resnet50"):
        fastres.resnet50(weights=str(path))
    bad = tmp_path / "garbage.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="could not read"):
        fastres.resnet18(weights=str(bad))
    with pytest.raises(TypeError, match="nothing is downloaded"):
        fastres.resnet18(weights=torchvision.models.ResNet18_Weights.IMAGENET1K_V1)


@pytest.mark.parametrize("arch", ["resnet18", "resnet101", "resnext101_64x4d",
                                  "wide_resnet50_2"])
def test_from_torchvision_keeps_architecture_mode_dtype(arch):
    tv = getattr(torchvision.models, arch)(weights=None, num_classes=13).to(torch.float64)
    tv.train()
    fr = fastres.from_torchvision(tv)
    assert isinstance(fr, fastres.ResNet) and fr.training
    assert fr.fc.out_features == 13
    assert next(fr.parameters()).dtype == torch.float64
    for (k, a), (k2, b) in zip(fr.state_dict().items(), tv.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    # a copy, not shared storage
    with torch.no_grad():
        tv.conv1.weight.add_(1)
    assert not torch.equal(tv.conv1.weight, fr.conv1.weight)
    tv.eval()
    assert not fastres.from_torchvision(tv).training


def test_from_torchvision_rejects_other_models():
    with pytest.raises(TypeError, match="torchvision ResNet"):
        fastres.from_torchvision(torchvision.models.alexnet())
    with pytest.raises(TypeError, match="torchvision ResNet"):
        fastres.from_torchvision("resnet50")


def test_forward_features_and_head(twins):
    tv, fr = twins("resnet50")
    x = torch.randn(2, 3, 64, 64, device=DEVICE)
    with torch.no_grad():
        feats = fr.forward_features(x)
        logits = fr.forward_head(feats)
        ref_feats = tv.layer4(tv.layer3(tv.layer2(tv.layer1(tv.maxpool(tv.relu(tv.bn1(
            tv.conv1(x))))))))
    tol = tol_for(torch.float32, DEVICE) * 10
    assert_close_rel(feats, ref_feats, tol, "features")
    assert_close_rel(logits, tv(x), tol, "head")
    fr2 = fastres.from_torchvision(tv)
    fr2.reset_classifier(5)
    assert fr2.fc.out_features == 5
    with torch.no_grad():
        assert fr2(x).shape == (2, 5)


def test_pickle_and_deepcopy_drop_the_plan(twins, tmp_path):
    import copy

    tv, fr = twins("resnet18")
    x = torch.randn(1, 3, 32, 32, device=DEVICE)
    with torch.no_grad():
        out = fr(x)
    assert fr.__dict__["_plan_cache"] is not None
    clone = copy.deepcopy(fr)
    assert clone.__dict__["_plan_cache"] is None
    torch.save(fr, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    assert loaded.__dict__["_plan_cache"] is None
    with torch.no_grad():
        torch.testing.assert_close(clone(x), out)
        torch.testing.assert_close(loaded(x), out)


def test_comparison_catches_a_wrong_fold(monkeypatch):
    """The eval comparison can fail: a plan that forgets the BN shift is caught."""
    import dataclasses

    import fastres.plan as plan_mod

    real = plan_mod.fold_batchnorm

    def forgetful(*args, **kwargs):
        step = real(*args, **kwargs)
        return dataclasses.replace(step, bias=torch.zeros_like(step.bias))

    monkeypatch.setattr(plan_mod, "fold_batchnorm", forgetful)
    tv, fr = twin("resnet18")
    x = torch.randn(1, 3, 32, 32, device=DEVICE)
    with torch.no_grad():
        out = fr(x)
    with pytest.raises(AssertionError, match="relative error"):
        assert_matches_torchvision(out, tv, x, "forgetful fold")
