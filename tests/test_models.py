"""fastres models against torchvision: structure, state_dict, eval outputs, constructors."""

from __future__ import annotations

import copy
import functools
import os
import warnings

import pytest
import torch
import torchvision
from _models import (ARCHS, DEVICE, assert_matches_torchvision, realistic_bn, stage_references,
                     torchvision_stages, twin)
from conftest import assert_close_rel, rel_err
from hypothesis import given, settings
from hypothesis import strategies as st

import fastres
from fastres import plan as _plan


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
    with pytest.raises(TypeError, match="checkpoint path, a state_dict mapping or torchvision"):
        fastres.resnet18(weights=1000)


def test_weights_from_a_safetensors_file(tmp_path, monkeypatch):
    """A safetensors checkpoint (what the Hugging Face hub serves) loads as torch.save's does,
    recognised by its header whatever the file is called; a truncated one, or one read
    without the safetensors package, is a ValueError that says so."""
    st = pytest.importorskip("safetensors.torch")
    import sys

    from fastres.models import load_weights

    tv = realistic_bn(torchvision.models.resnet18(weights=None, num_classes=7), steps=2,
                      size=32, device="cpu").eval()
    path = tmp_path / "model.bin"  # not named .safetensors: the header says what it is
    st.save_file(tv.state_dict(), str(path))
    fr = fastres.resnet18(weights=path).eval()
    assert fr.fc.out_features == 7
    for (k, a), b in zip(fr.state_dict().items(), tv.state_dict().values()):
        assert torch.equal(a, b), k
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert_close_rel(fr(x), tv(x), 1e-5, "model from a safetensors file")

    for cut in (-100, 300):  # the tensor data cut short, and the header too
        truncated = tmp_path / "truncated"
        truncated.write_bytes(path.read_bytes()[:cut])
        with pytest.raises(ValueError, match="could not read .* as a safetensors file"):
            load_weights(truncated)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)  # the package not installed
    with pytest.raises(ValueError, match=r"is a safetensors file, and reading it needs the "
                                         r"safetensors package \(pip install safetensors\)"):
        load_weights(path)


def test_weights_path_that_is_not_a_checkpoint_file_says_what_it_is(tmp_path, monkeypatch):
    """A directory was reported as "weights file ... does not exist"; so was a FIFO (which
    torch.load would have blocked on) and an empty path. A file that exists but cannot be
    opened was "could not read ... as a PyTorch checkpoint", as if its contents were bad."""
    from fastres.models import load_weights

    with pytest.raises(FileNotFoundError, match="is a directory, expected a checkpoint file"):
        load_weights(tmp_path)
    with pytest.raises(FileNotFoundError, match="is a directory, expected a checkpoint file"):
        fastres.resnet18(weights=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="empty path, expected a checkpoint file"):
        load_weights("")
    if hasattr(os, "mkfifo"):
        fifo = tmp_path / "fifo"
        os.mkfifo(fifo)
        with pytest.raises(FileNotFoundError, match="not a regular file, expected a checkpoint"):
            load_weights(fifo)
    locked = tmp_path / "locked.pth"
    torch.save(fastres.resnet18(num_classes=2).state_dict(), locked)

    def denied(*args, **kwargs):  # (chmod 000 does not stop root, who runs CI here)
        raise PermissionError(13, "Permission denied", str(locked))

    monkeypatch.setattr(torch, "load", denied)
    with pytest.raises(ValueError, match=r"cannot open weights file .*locked\.pth.*"
                                         r"Permission denied") as info:
        load_weights(locked)
    assert "as a PyTorch checkpoint" not in str(info.value)


def test_a_file_torch_save_did_not_write_says_so(tmp_path):
    """A few bytes of text were "could not read ... as a PyTorch checkpoint: 101" (or "pop
    from empty list"): the unpickler's words. Now the message says what the file is not and
    shows its first bytes."""
    text, short = tmp_path / "text.pth", tmp_path / "abc.pth"
    text.write_bytes(b"hello world, no checkpoint here")
    short.write_bytes(b"abc")
    for path in (text, short):
        with pytest.raises(ValueError) as info:
            fastres.resnet18(weights=str(path))
        said = str(info.value)
        assert ("as a PyTorch checkpoint: it is neither the zip archive torch.save writes nor "
                "a legacy torch.save pickle") in said, said
        assert repr(path.read_bytes()[:16]) in said, said
    # a legacy (non-zip) torch.save file the weights-only unpickler refuses is one: its
    # message stays the unpickler's
    legacy = tmp_path / "legacy.pth"
    torch.save({"model": {}, "extra": _NotAllowed()}, legacy,
               _use_new_zipfile_serialization=False)
    with pytest.raises(ValueError) as info:
        fastres.resnet18(weights=str(legacy))
    assert "Weights only load failed" in str(info.value), info.value
    assert "neither the zip archive" not in str(info.value), info.value


class _NotAllowed:
    """A class the weights-only unpickler refuses."""


def test_weights_from_training_checkpoints(tmp_path):
    """The Python API takes what training code saves, as the CLI does: DDP's "module." keys
    inside torchvision's reference-script checkpoint ({"model", "args": Namespace}), the
    tutorial's {"model_state_dict", "optimizer_state_dict"} with torch.compile's "_orig_mod.",
    and pytorch/examples' ImageNet checkpoint (a tensor beside "state_dict")."""
    import argparse

    tv = torchvision.models.resnet18(weights=None, num_classes=5)
    sd = tv.state_dict()
    ddp = {"model": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3,
           "args": argparse.Namespace(model="resnet18")}
    tutorial = {"model_state_dict": {f"_orig_mod.{k}": v for k, v in sd.items()},
                "optimizer_state_dict": {"state": {}, "param_groups": []}}
    # pytorch/examples' ImageNet script: a tensor (best_acc1) beside the nested state
    examples = {"epoch": 90, "arch": "resnet18", "best_acc1": torch.tensor(69.7),
                "state_dict": {f"module.{k}": v for k, v in sd.items()},
                "optimizer": {"state": {}, "param_groups": []}}
    for name, ckpt in (("ddp", ddp), ("tutorial", tutorial), ("examples", examples)):
        path = tmp_path / f"{name}.pth"
        torch.save(ckpt, path)
        if name == "ddp" and not hasattr(torch.serialization, "safe_globals"):
            continue  # torch < 2.5: its weights-only loader refuses the Namespace
        for weights in (path, ckpt):
            fr = fastres.resnet18(weights=weights)
            assert list(fr.state_dict()) == list(sd), name
            for k, v in fr.state_dict().items():
                assert torch.equal(v, sd[k]), (name, k)


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


def test_legacy_positional_and_bool_weights_as_torchvision():
    """torchvision's deprecated forms: ``weights``/``progress`` given positionally, and
    ``weights=True/False`` read as ``pretrained=`` (they raised TypeError)."""
    for call in (lambda f: f(False), lambda f: f(None, True), lambda f: f(weights=False)):
        with pytest.warns(UserWarning, match="deprecated"):
            fr = call(fastres.resnet18)
        with pytest.warns(UserWarning, match="deprecated"):
            tv = call(torchvision.models.resnet18)
        assert fr.fc.out_features == tv.fc.out_features == 1000
        assert list(fr.state_dict()) == list(tv.state_dict())
    with pytest.raises(TypeError, match="at most 2 positional"):
        fastres.resnet18(None, True, 3)
    with pytest.raises(TypeError, match="multiple values"):
        fastres.resnet18(None, weights="x.pth")
    with pytest.raises(TypeError, match="not both"):
        fastres.resnet18(weights=False, pretrained=False)


def test_torchvision_registry_api():
    """``list_models``, ``get_model_weights``, ``get_weight`` and the ``*_Weights`` enums, as
    torchvision.models has them, for the models fastres builds."""
    names = fastres.list_models()
    assert names == sorted(fastres.models.MODEL_NAMES)
    assert names == torchvision.models.list_models(include=names)
    assert fastres.list_models(include="resnext*") == torchvision.models.list_models(
        include="resnext*")
    assert fastres.list_models(include=["resnet*"], exclude="resnet1*") == [
        "resnet34", "resnet50"]
    for name in names:
        enum = torchvision.models.get_model_weights(name)
        assert fastres.get_model_weights(name) is enum
        assert getattr(fastres, enum.__name__) is enum
        assert getattr(fastres.models, enum.__name__) is enum
    assert fastres.get_model_weights(fastres.resnet50) is torchvision.models.ResNet50_Weights
    assert (fastres.get_weight("ResNet50_Weights.IMAGENET1K_V2")
            is torchvision.models.ResNet50_Weights.IMAGENET1K_V2)
    with pytest.raises(ValueError, match="Unknown model"):
        fastres.get_model_weights("vgg16")
    with pytest.raises(AttributeError):
        fastres.VGG16_Weights  # noqa: B018


def test_from_torchvision_of_a_compiled_model():
    """``from_torchvision(torch.compile(tv))`` converts the module it wraps (it copied the
    wrapper's ``_orig_mod`` tree in as an extra submodule, then failed its strict load)."""
    tv = realistic_bn(torchvision.models.resnet18(num_classes=10), size=32, device="cpu")
    fr = fastres.from_torchvision(torch.compile(tv))
    assert type(fr) is fastres.ResNet and "_orig_mod" not in dict(fr.named_children())
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert_close_rel(fr(x), tv(x), 1e-5, "from a compiled model")


def _fused_layout(t) -> bool:
    """The fused path's output layout (channels-last); torchvision's eager CPU/GPU code gives
    NCHW-contiguous maps for an NCHW input, so this tells which path ran."""
    return (t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
            and t.shape[1] > 1)


@pytest.mark.parametrize("arch,kwargs", [
    ("resnet18", {}),
    ("resnet50", {"replace_stride_with_dilation": [False, True, True]}),  # DeepLab's backbone
    ("resnext50_32x4d", {}),
])
def test_forward_intermediates(arch, kwargs):
    """forward_intermediates (timm's API) runs the fused stages and returns torchvision's
    stage outputs, for every form of ``indices``, with stop_early and intermediates_only."""
    tv, fr = twin(arch, **kwargs)
    x = torch.randn(2, 3, 45, 39, device=DEVICE)
    ref, tol = stage_references(tv, x)  # (float64, and each stage's bound)
    with torch.no_grad():
        final, feats = fr.forward_intermediates(x)
        assert len(feats) == 5
        for i, (a, b) in enumerate(zip(feats, ref)):
            assert a.shape == b.shape and a.dtype == x.dtype, (i, a.shape, b.shape)
            assert _fused_layout(a), f"stage {i} did not run fused"
            assert_close_rel(a, b, tol[i], f"{arch} stage {i}")
        assert_close_rel(final, ref[4], tol[4], "final")
        # an int n: the last n; a sequence: those stages (negatives from the end), each once,
        # in stage order
        for indices, stages in [(1, [4]), (3, [2, 3, 4]), ([2], [2]), ((4, 0, -1), [0, 4]),
                                ([-5, 1, 1], [0, 1]), (range(1, 4), [1, 2, 3])]:
            got = fr.forward_intermediates(x, indices, intermediates_only=True)
            assert isinstance(got, list) and len(got) == len(stages), (indices, len(got))
            for a, s in zip(got, stages):
                assert_close_rel(a, ref[s], tol[s], f"indices={indices!r} stage {s}")
        # stop_early: nothing after the last chosen stage runs, and it is the final output
        final, feats = fr.forward_intermediates(x, [1, 2], stop_early=True)
        assert_close_rel(final, ref[2], tol[2], "stop_early final")
        assert len(feats) == 2
        final, feats = fr.forward_intermediates(x, [0], stop_early=True)  # only the stem ran
        assert_close_rel(final, tv.maxpool(ref[0]), tol[0], "stop_early after the stem")
        assert_close_rel(feats[0], ref[0], tol[0], "stem activation")
        # the logits still agree afterwards (each kind of forward runs its own steps)
        assert_matches_torchvision(fr(x), tv, x, "forward after forward_intermediates")


def test_forward_intermediates_paths_do_not_mix():
    """The plan remembers its implementation choices per input signature and kind of
    forward: a forward, forward_features and forward_intermediates on the same input each
    run their own steps (one kind replaying another's would call the head where the stem's
    max-pool belongs)."""
    tv, fr = _small_twin()
    x = torch.randn(1, 3, 33, 31)
    ref, tol = stage_references(tv, x)
    with torch.no_grad():
        for _ in range(2):
            for indices in ([0, 3], [1], None):
                feats = fr.forward_intermediates(x, indices, intermediates_only=True)
                want = [0, 1, 2, 3, 4] if indices is None else indices
                for a, s in zip(feats, want, strict=True):
                    assert_close_rel(a, ref[s], tol[s], f"stage {s} of {indices}")
            assert_matches_torchvision(fr(x), tv, x, "forward")
            assert_close_rel(fr.forward_features(x), ref[4], tol[4], "forward_features")


def test_backbone_without_a_classifier_runs_fused_features():
    """A backbone whose fc is replaced by nn.Identity() (or whose avgpool is edited) runs
    forward_features and forward_intermediates fused, without a warning; its forward runs
    eagerly, warned, as torchvision's."""
    tv, fr = _small_twin()
    x = torch.randn(2, 3, 32, 36)
    fr.fc = torch.nn.Identity()
    ref, tol = stage_references(tv, x)
    with torch.no_grad():
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            feats = fr.forward_intermediates(x, [2, 3, 4], intermediates_only=True)
            whole = fr.forward_features(x)
        for a, s in zip(feats, [2, 3, 4]):
            assert _fused_layout(a), f"stage {s} did not run fused"
            assert_close_rel(a, ref[s], tol[s], f"backbone stage {s}")
        assert _fused_layout(whole)
        assert_close_rel(whole, ref[4], tol[4], "backbone forward_features")
        _plan._said.clear()
        with pytest.warns(RuntimeWarning, match="fc is a Identity"):
            pooled = fr(x)
        assert_close_rel(pooled, ref[4].mean((2, 3)), tol[4], "pooled")
        # nothing the head holds keeps the features from running fused: a hook on it, modules
        # the plan could not run, a forward set on it, its own dtype (a bf16 trunk)
        fr.fc = torch.nn.Sequential(
            torch.nn.Conv2d(512, 8, 3, padding="same"),
            torch.nn.BatchNorm2d(8, track_running_stats=False)).train()
        fr.fc.register_forward_hook(lambda *args: None)
        fr.avgpool.forward = lambda t: t
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            feats = fr.forward_intermediates(x, [1, 4], intermediates_only=True)
            assert all(map(_fused_layout, feats))
            assert_close_rel(feats[1], ref[4], tol[4], "features with an odd head")
            fr.fc = torch.nn.Linear(512, 3)
            fr.to(torch.bfloat16).fc.float()
            whole = fr.forward_features(x.to(torch.bfloat16))
        assert _fused_layout(whole) and whole.dtype == torch.bfloat16
        # DESIGN.md's bf16 bound against float64, or twice eager bf16's own error there
        ref16, tol16 = stage_references(tv, x, torch.bfloat16)
        assert_close_rel(whole, ref16[4], tol16[4], "bf16 trunk with an fp32 head")


@pytest.mark.filterwarnings("ignore:fastres. eval-mode forward with autograd recording")
def test_forward_intermediates_eagerly_where_the_forward_is_eager():
    """With autograd recording (and in train mode) forward_intermediates runs torchvision's
    modules: exact gradients flow to the parameters and train mode updates BatchNorm."""
    tv, fr = _small_twin()
    x = torch.randn(2, 3, 32, 32)
    ref = torchvision_stages(tv, x)
    final, feats = fr.forward_intermediates(x, [0, 1, 3])
    assert not _fused_layout(feats[1])
    assert_close_rel(feats[0], ref[0], 1e-5, "eager stage 0 (the stem, before its max-pool)")
    assert_close_rel(feats[1], ref[1], 1e-5, "eager stage 1")
    assert_close_rel(feats[2], ref[3], 1e-5, "eager stage 3")
    (feats[1].sum() + final.sum()).backward()
    assert fr.layer4[0].conv1.weight.grad is not None  # final (layer4) was reached
    assert fr.conv1.weight.grad.abs().sum() > 0
    fr.train()
    before = fr.bn1.running_mean.clone()
    fr.forward_intermediates(x, 1)
    assert not torch.equal(before, fr.bn1.running_mean)


def test_forward_intermediates_index_containers():
    """A one-element array or tensor is a sequence of one stage (operator.index takes it as an
    int, which read torch.tensor([2]) as "the last two"); 0-d ones are ints."""
    import numpy as np

    _, fr = _small_twin()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ref = fr.forward_intermediates(x, intermediates_only=True)
        for indices, stages in [(torch.tensor([2]), [2]), (torch.tensor([0]), [0]),
                                (np.array([3]), [3]), (torch.tensor(2), [3, 4]),
                                (np.int64(1), [4]), ([torch.tensor(1), np.int32(-1)], [1, 4]),
                                (torch.tensor([4, 1]), [1, 4])]:
            got = fr.forward_intermediates(x, indices, intermediates_only=True)
            assert [t.shape for t in got] == [ref[s].shape for s in stages], indices
            for a, s in zip(got, stages):
                assert torch.equal(a, ref[s]), (indices, s)


def test_forward_intermediates_bad_arguments():
    _, fr = _small_twin()
    x = torch.randn(1, 3, 32, 32)
    for bad, err in [([], ValueError), ([5], ValueError), ([-6], ValueError), (0, ValueError),
                     (6, ValueError), ("1", TypeError), ([True], TypeError), (1.0, TypeError),
                     (True, TypeError), ([1.5], TypeError)]:
        with pytest.raises(err, match="indices must be None, an int n"):
            fr.forward_intermediates(x, bad)
    with pytest.raises(ValueError, match="output_fmt must be 'NCHW'.*'NHWC'"):
        fr.forward_intermediates(x, output_fmt="NHWC")
    with pytest.raises(TypeError, match="stop_early must be a bool"):
        fr.forward_intermediates(x, stop_early="yes")
    with pytest.raises(ValueError, match="expects a 4-D"):  # the input is checked as forward's
        fr.forward_intermediates(torch.randn(1, 1, 3, 32, 32))


def test_forward_features_and_head(twins):
    tv, fr = twins("resnet50")
    x = torch.randn(2, 3, 64, 64, device=DEVICE)
    with torch.no_grad():
        feats = fr.forward_features(x)
        logits = fr.forward_head(feats)
    ref, tol = stage_references(tv, x)  # (float64: the features are ref[4])
    assert_close_rel(feats, ref[4], tol[4], "features")
    assert_matches_torchvision(logits, tv, x, "head")
    pooled = fr.forward_head(feats, pre_logits=True)  # timm's pre_logits: before fc
    exact_pooled = ref[4].mean((2, 3))
    assert_close_rel(pooled, exact_pooled, tol[4], "pre_logits")
    fr2 = fastres.from_torchvision(tv)
    fr2.reset_classifier(5)
    assert fr2.fc.out_features == 5
    with torch.no_grad():
        assert fr2(x).shape == (2, 5)
    # timm's reset_classifier(0): no classifier, the forward returns the pooled features
    # (it made a Linear with 0 outputs, and the forward an empty [N, 0] tensor)
    fr2.reset_classifier(0, "avg")
    assert isinstance(fr2.fc, torch.nn.Identity)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an fc that is not a Linear runs eagerly, warned
        assert_close_rel(fr2(x), exact_pooled, tol[4], "reset_classifier(0)")
    fr2.reset_classifier(7)  # back from Identity: the features' width is still known
    assert (fr2.fc.in_features, fr2.fc.out_features) == (2048, 7)
    for bad, match in (((-1,), "num_classes"), ((2.5,), "num_classes"),
                       ((5, "max"), "global_pool")):
        with pytest.raises(ValueError, match=match):
            fr2.reset_classifier(*bad)


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


# -- drop-in behaviours: hooks, tracing, scripting, from_torchvision, weights forms ------------

def _small_twin(arch="resnet18", **kwargs):
    """(torchvision, fastres) with equal weights and realistic BN statistics, eval mode."""
    tv = realistic_bn(getattr(torchvision.models, arch)(weights=None, **kwargs), steps=2,
                      size=32, device="cpu")
    return tv, fastres.from_torchvision(tv)


@pytest.mark.filterwarnings("ignore:fastres. eval-mode forward runs eagerly")
def test_eval_forward_runs_submodule_hooks():
    """Forward hooks and pre-hooks on submodules run in eval mode, as in torchvision (the plan
    runs no submodule, so a hooked model runs eagerly): feature capture, output-editing hooks,
    global hooks, and torch.nn.utils.prune (a pre-hook recomputes the pruned weight)."""
    tv, fr = _small_twin()
    x = torch.randn(2, 3, 32, 32)
    for m in (tv, fr):
        m.feats = []
        m.layer4.register_forward_hook(lambda mod, i, o, m=m: m.feats.append(o.clone()))
        m.layer2[0].conv1.register_forward_pre_hook(lambda mod, i: (i[0] * 0.5,))
        m.fc.register_forward_hook(lambda mod, i, o: o + 1.0)
    with torch.no_grad():
        ref, out = tv(x), fr(x)
        feats_fr = fr.forward_features(x)
    assert len(fr.feats) == 2 and len(tv.feats) == 1  # forward and forward_features
    assert_close_rel(fr.feats[0], tv.feats[0], 1e-5, "hooked layer4 output")
    assert_close_rel(feats_fr, tv.feats[0], 1e-5, "forward_features with hooks")
    assert_close_rel(out, ref, 1e-5, "output with input/output-editing hooks")

    calls = []
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda mod, i, o: calls.append(type(mod).__name__))
    try:
        with torch.no_grad():
            fr(x)
    finally:
        handle.remove()
    assert "Conv2d" in calls and "BasicBlock" in calls

    import torch.nn.utils.prune as prune

    tv, fr = _small_twin()
    for m in (tv, fr):
        prune.l1_unstructured(m.layer1[0].conv1, "weight", amount=0.5)
        with torch.no_grad():
            m.layer1[0].conv1.weight_orig.mul_(3.0)  # the pre-hook re-applies the mask
    with torch.no_grad():
        assert_close_rel(fr(x), tv(x), 1e-5, "pruned model")


@pytest.mark.filterwarnings("ignore:fastres. eval-mode forward runs eagerly")
def test_each_kind_of_hook_alone_is_run():
    """Each hook alone, with no other hook to make the forward eager: a forward hook on the
    head's linear layer (which the fused head would skip), and a global forward pre-hook."""
    tv, fr = _small_twin()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = tv(x)
    handle = fr.fc.register_forward_hook(lambda mod, i, o: o + 1.0)
    with torch.no_grad():
        assert_close_rel(fr(x), ref + 1.0, 1e-5, "output of a hooked fc")
    handle.remove()
    calls = []
    handle = torch.nn.modules.module.register_module_forward_pre_hook(
        lambda mod, i: calls.append(type(mod).__name__))
    try:
        with torch.no_grad():
            out = fr(x)
    finally:
        handle.remove()
    assert "Conv2d" in calls and "Linear" in calls and "BasicBlock" in calls
    assert_close_rel(out, ref, 1e-5, "output with a global pre-hook")


def test_eval_hooks_removed_plan_runs_again(monkeypatch):
    import fastres.plan as plan_mod

    monkeypatch.setattr(plan_mod, "_said", set())  # the warning is said once per process
    tv, fr = _small_twin()
    x = torch.randn(1, 3, 32, 32)
    handle = fr.layer3.register_forward_hook(lambda *a: None)
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="layer3 has forward hooks"):
        fr(x)
    assert fr.__dict__["_plan_cache"] is None  # ran eagerly
    handle.remove()
    with torch.no_grad():
        out = fr(x)
    assert fr.__dict__["_plan_cache"] is not None  # the fused plan again
    with torch.no_grad():
        assert_close_rel(out, tv(x), 1e-5, "after the hook was removed")


def test_eval_forward_under_torch_func_and_forward_ad_like_torchvision(monkeypatch):
    """torch.func transforms (vmap per sample, model ensembling with stack_module_state +
    functional_call + vmap, jvp) and forward-mode AD dual tensors run the eval forward
    eagerly, warned once, and give torchvision's outputs and tangents: the fused ops have no
    batching or forward-mode rules (vmap failed in them, jvp and forward_ad dropped the
    tangent silently). The plan runs again outside the transform."""
    import copy

    import torch.autograd.forward_ad as fwAD
    from torch.func import functional_call, jvp, stack_module_state, vmap

    import fastres.plan as plan_mod

    monkeypatch.setattr(plan_mod, "_said", set())
    pairs = [_small_twin() for _ in range(2)]
    (tv, fr), x, t = pairs[0], torch.randn(3, 3, 32, 32), torch.randn(3, 3, 32, 32)
    for pair in pairs:
        for m in pair:
            m.requires_grad_(False)

    def ensemble(models):
        params, buffers = stack_module_state(models)
        base = copy.deepcopy(models[0]).to("meta")
        return vmap(lambda p, b: functional_call(base, (p, b), (x,)))(params, buffers)

    def dual_tangent(m):
        with fwAD.dual_level():
            return fwAD.unpack_dual(m(fwAD.make_dual(x, t))).tangent

    with torch.no_grad():
        with pytest.warns(RuntimeWarning, match="under a torch.func transform"):
            out = vmap(fr)(x[:, None])
        assert_close_rel(out, vmap(tv)(x[:, None]), 1e-5, "vmap per sample")
        assert_close_rel(ensemble([f for _, f in pairs]), ensemble([v for v, _ in pairs]),
                         1e-5, "ensemble")
        with pytest.warns(RuntimeWarning, match="forward-mode AD dual tensors"):
            tangent = dual_tangent(fr)
        assert tangent is not None
        assert_close_rel(tangent, dual_tangent(tv), 1e-5, "forward_ad tangent")
        fr.invalidate_plan()
        assert_close_rel(fr(x), tv(x), 1e-5, "plain forward after the transforms")
        assert fr.__dict__["_plan_cache"] is not None  # the fused plan again
    (out, tan), (ref, ref_tan) = jvp(fr, (x,), (t,)), jvp(tv, (x,), (t,))
    assert_close_rel(out, ref, 1e-5, "jvp output")
    assert_close_rel(tan, ref_tan, 1e-5, "jvp tangent")


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without "
                    "MKL-DNN (oneDNN)")
def test_mkldnn_input_runs_eagerly_like_torchvision(monkeypatch):
    """torchvision's ResNet takes an MKL-DNN input (and returns an MKL-DNN output); the plan
    takes strided tensors, so that forward runs eagerly, warned once (before: a
    'memory_format' error inside the plan)."""
    import fastres.plan as plan_mod

    monkeypatch.setattr(plan_mod, "_said", set())
    tv, fr = _small_twin()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        with pytest.warns(RuntimeWarning, match="input layout torch._mkldnn"):
            out = fr(x.to_mkldnn())
        ref = tv(x.to_mkldnn())
    assert out.layout == ref.layout == torch._mkldnn
    assert_close_rel(out.to_dense(), ref.to_dense(), 1e-5, "MKL-DNN input")


def test_parametrized_weights_are_tracked():
    """A weight under torch.nn.utils.parametrize (weight_norm, spectral_norm) is computed when
    the plan is built, and the plan is rebuilt when the parametrization's tensors change (the
    README's rule: only non-tensor state needs invalidate_plan())."""
    from torch.nn.utils.parametrizations import spectral_norm, weight_norm

    tv, fr = _small_twin()
    for m in (tv, fr):
        weight_norm(m.layer1[0].conv1)
        spectral_norm(m.layer2[0].conv1)
    fr.load_state_dict(tv.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert_close_rel(fr(x), tv(x), 1e-5, "parametrized weights")
        for m in (tv, fr):
            m.layer1[0].conv1.parametrizations.weight.original0.mul_(2.0)
            m.layer2[0].conv1.parametrizations.weight.original.mul_(0.5)
        assert_close_rel(fr(x), tv(x), 1e-5, "after editing the parametrizations' tensors")


def test_fx_feature_extraction_like_torchvision():
    from torchvision.models.feature_extraction import (
        create_feature_extractor,
        get_graph_node_names,
    )

    tv, fr = _small_twin("resnet50")
    assert get_graph_node_names(fr) == get_graph_node_names(tv)
    nodes = {"layer1.0.relu_1": "a", "layer3": "b", "flatten": "c"}
    fe_tv, fe_fr = create_feature_extractor(tv, nodes), create_feature_extractor(fr, nodes)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref, out = fe_tv(x), fe_fr(x)
    for k in ref:
        assert_close_rel(out[k], ref[k], 1e-6, f"feature {k}")
    gm = torch.fx.symbolic_trace(fr)
    with torch.no_grad():
        assert_close_rel(gm(x), tv(x), 1e-5, "fx.symbolic_trace")


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_jit_script_like_torchvision(tmp_path):
    """torch.jit.script records torchvision's forward: the saved file loads and runs in a
    process that never imports fastres (the portable TorchScript the README points to)."""
    import subprocess
    import sys

    tv, fr = _small_twin()
    scripted = torch.jit.script(fr)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ref = tv(x)
        assert_close_rel(scripted(x), ref, 1e-6, "torch.jit.script")
    scripted.save(str(tmp_path / "scripted.pt"))
    torch.save({"x": x}, tmp_path / "x.pt")
    code = ("import sys, warnings, torch; warnings.simplefilter('ignore'); "
            f"m = torch.jit.load({str(tmp_path / 'scripted.pt')!r}); "
            f"x = torch.load({str(tmp_path / 'x.pt')!r})['x']; "
            "assert 'fastres' not in sys.modules, 'fastres was imported'; "
            f"torch.save(m(x).detach(), {str(tmp_path / 'y.pt')!r})")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, check=False, cwd=tmp_path,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_close_rel(torch.load(tmp_path / "y.pt"), ref, 1e-6, "jit.load without fastres")


@pytest.mark.filterwarnings("ignore:fastres. eval-mode forward runs eagerly")
def test_subclass_overriding_forward_impl_is_honoured():
    class Features(fastres.ResNet):  # the torchvision pattern: override _forward_impl
        def _forward_impl(self, x):
            return self.layer1(self.maxpool(self.relu(self.bn1(self.conv1(x)))))

    m = Features(fastres.BasicBlock, [1, 1, 1, 1]).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert m(x).shape == (1, 64, 8, 8)
    m.train()
    assert m(x).shape == (1, 64, 8, 8)


def test_from_torchvision_keeps_norm_layers_fc_and_flags():
    import functools

    from torchvision.ops.misc import FrozenBatchNorm2d

    x = torch.randn(2, 3, 32, 32)
    for norm_layer in (functools.partial(torch.nn.BatchNorm2d, eps=1e-3, momentum=0.3),
                       lambda c: torch.nn.GroupNorm(8, c), FrozenBatchNorm2d,
                       functools.partial(torch.nn.BatchNorm2d, track_running_stats=False)):
        tv, fr = _small_twin(norm_layer=norm_layer)
        assert type(fr.layer1[0].bn2) is type(tv.layer1[0].bn2)
        assert repr(fr) == repr(tv)  # eps, momentum, num_groups, ... included
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            assert_close_rel(fr(x), tv(x), 1e-5, f"from_torchvision, {repr(tv.bn1)}")
    tv = torchvision.models.resnet18(weights=None)
    tv.fc = torch.nn.Sequential(torch.nn.Dropout(0.2), torch.nn.Linear(512, 3))
    tv.layer1.requires_grad_(False)
    tv.train()
    tv.layer1.eval()  # frozen BatchNorm statistics while fine-tuning
    fr = fastres.from_torchvision(tv)
    assert repr(fr.fc) == repr(tv.fc)
    assert [p.requires_grad for p in fr.parameters()] == [p.requires_grad for p in tv.parameters()]
    assert [m.training for m in fr.modules()] == [m.training for m in tv.modules()]
    seed = int(torch.randint(2**31 - 1, ()))  # the same dropout mask for both (a fresh one)
    torch.manual_seed(seed)
    ref = tv(x)
    torch.manual_seed(seed)
    assert_close_rel(fr(x), ref, 1e-6, "train mode, frozen layer1, dropout head")


def test_frozen_batchnorm_folds():
    """torchvision's FrozenBatchNorm2d (the norm_layer of its detection backbones) folds as
    BatchNorm2d does: the eval forward, forward_features and forward_intermediates run fused
    and match torchvision; editing an eps rebuilds the plan; a frozen norm ignores the mode, so
    train mode (eager) gives the same output; buffers wider than a 16-bit compute dtype run
    torchvision's code (and its error)."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    tv = torchvision.models.resnet50(norm_layer=FrozenBatchNorm2d)
    with torch.no_grad():
        for m in tv.modules():
            if isinstance(m, FrozenBatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.2)
                m.running_mean.normal_(0.0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    tv.eval()
    fr = fastres.resnet50(norm_layer=FrozenBatchNorm2d)
    fr.load_state_dict(tv.state_dict())
    fr.eval()
    x = torch.randn(2, 3, 45, 39)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")  # an eager fallback would warn
        ref = torchvision_stages(tv, x)
        assert_close_rel(fr(x), tv(x), 1e-5, "frozen BN forward")
        feats = fr.forward_features(x)
        assert _fused_layout(feats)
        assert_close_rel(feats, ref[4], 1e-5, "frozen BN features")
        for i, a in enumerate(fr.forward_intermediates(x, intermediates_only=True)):
            assert _fused_layout(a)
            assert_close_rel(a, ref[i], 1e-5, f"frozen BN stage {i}")
        for m in (tv, fr):
            m.layer3[1].bn2.eps = 0.5  # a plain attribute: the plan notices it changed
        assert_close_rel(fr(x), tv(x), 1e-5, "after an eps edit")
    fr.train()
    tv.train()
    with torch.no_grad():
        assert_close_rel(fr(x), tv(x), 1e-5, "train mode")
    fr.eval()
    tv.eval()
    # the whole model cast: fused in bf16, within DESIGN.md's bound or twice eager bf16's error
    with torch.no_grad():
        want = tv(x)
        eager_err = rel_err(copy.deepcopy(tv).to(torch.bfloat16)(x.to(torch.bfloat16)), want)
        got = fr.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert got.dtype == torch.bfloat16
    assert_close_rel(got, want, max(2e-2, 2 * eager_err), "bf16")
    # fp32 buffers with a bf16 forward: torchvision promotes to fp32 and then fails
    for m in (tv, fr):
        m.to(torch.bfloat16)
        for bn in m.modules():
            if isinstance(bn, FrozenBatchNorm2d):
                bn.running_var = bn.running_var.float()
    _plan._said.clear()
    with torch.no_grad():
        with pytest.raises(RuntimeError) as want:
            tv(x.to(torch.bfloat16))
        with pytest.warns(RuntimeWarning, match="float32 buffers for a torch.bfloat16 forward"), \
                pytest.raises(RuntimeError) as got:
            fr(x.to(torch.bfloat16))
    assert str(got.value) == str(want.value)


def test_torchvision_weights_forms(tmp_path, monkeypatch):
    """torchvision's weights (an enum member, its name, pretrained=True) load from the file
    torchvision keeps in torch.hub's checkpoint directory, giving torchvision's model; with the
    file missing, a FileNotFoundError names where torchvision would download it (fastres
    downloads nothing); another model's enum is torchvision's TypeError."""
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))  # torch.hub.set_dir's
    with pytest.warns(UserWarning, match="pretrained"):
        m = fastres.resnet18(pretrained=False)
    assert isinstance(m, fastres.ResNet)
    with pytest.warns(UserWarning, match="pretrained"), \
            pytest.raises(FileNotFoundError, match="downloads nothing.*hub.checkpoints."
                                                   "resnet18-f37072fd.pth"):
        fastres.resnet18(pretrained=True)
    for name in ("IMAGENET1K_V2", "DEFAULT", "ResNet50_Weights.IMAGENET1K_V1"):
        with pytest.raises(FileNotFoundError, match="not in torchvision's cache.*resnet50-"):
            fastres.resnet50(weights=name)
    with pytest.raises(FileNotFoundError, match="downloads nothing.*resnet50-11ad3fa6.pth"):
        fastres.resnet50(weights=torchvision.models.ResNet50_Weights.IMAGENET1K_V2)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        fastres.resnet50(weights=str(tmp_path / "IMAGENET1K_V1.pth"))

    enum = torchvision.models.ResNet18_Weights.IMAGENET1K_V1  # DEFAULT too
    tv0, _ = _small_twin(num_classes=1000)
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(tv0.state_dict(), tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth")
    tv = torchvision.models.resnet18(weights=enum).eval()  # reads the file (no download)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = tv(x)
    with pytest.warns(UserWarning, match="pretrained=True is weights=ResNet18_Weights"):
        legacy = fastres.resnet18(pretrained=True)
    for fr in (fastres.resnet18(weights=enum), fastres.resnet18(weights="DEFAULT"),
               fastres.resnet18(weights="ResNet18_Weights.IMAGENET1K_V1"), legacy,
               fastres.models.get_model("resnet18", weights="IMAGENET1K_V1")):
        for (k, a), b in zip(fr.state_dict().items(), tv.state_dict().values()):
            assert torch.equal(a, b), k
        with torch.no_grad():
            assert_close_rel(fr.eval()(x), ref, 1e-5, "torchvision's cached weights")
    for build in (torchvision.models.resnet50, fastres.resnet50):
        with pytest.raises(TypeError, match="expected ResNet50_Weights but received "
                                            "ResNet18_Weights"):
            build(weights=enum)


# -- parity review: mixed train/eval, ONNX export, edited models, builders ----------------------

@pytest.mark.filterwarnings("ignore:fastres. eval-mode forward runs eagerly")
def test_eval_model_with_train_mode_batchnorm_like_torchvision():
    """model.eval() then bn.train() (test-time BatchNorm adaptation): torchvision normalizes
    with the batch's statistics there and updates the running ones; so must fastres (its plan
    folds the running statistics, so it must not run)."""
    tv, fr = _small_twin("resnet18")
    x = torch.randn(4, 3, 32, 32) * 1.5 + 0.3
    with torch.no_grad():
        fr(x)  # a plan exists before the mode change
    for m in (tv, fr):
        m.layer2[0].bn1.train()  # one BatchNorm, then all of them
    # plan.eager_reason says so, as graphs.optimize and fastres bench ask it before capturing
    with torch.no_grad():
        reason = _plan.eager_reason(fr, x)
    assert reason is not None and "layer2.0.bn1" in reason, reason
    with torch.no_grad():
        assert_close_rel(fr(x), tv(x), 1e-5, "eval model, one BatchNorm in train mode")
    for m in (tv, fr):
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.train()
    with torch.no_grad():
        assert_close_rel(fr(x), tv(x), 1e-5, "eval model, BatchNorms in train mode")
        ref_feats = tv.layer4(tv.layer3(tv.layer2(tv.layer1(tv.maxpool(tv.relu(tv.bn1(
            tv.conv1(x))))))))
        assert_close_rel(fr.forward_features(x), ref_feats, 1e-5, "forward_features")
    for (k, a), b in zip(fr.state_dict().items(), tv.state_dict().values()):
        assert torch.allclose(a.double(), b.double(), rtol=1e-5, atol=1e-6), k  # running stats
    for m in (tv, fr):
        m.eval()
    with torch.no_grad():  # all in eval mode again: the (re-folded) plan
        assert_close_rel(fr(x), tv(x), 1e-5, "eval again")


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning",
                            "ignore::UserWarning")
def test_onnx_export_like_torchvision():
    """torch.onnx.export (the TorchScript-based exporter, which traces the forward) gives what
    it gives for torchvision's model: ONNX has no fastres ops, so the export records the eager
    graph. Without the onnx package both raise the exporter's 'onnx is not installed' error."""
    import inspect
    import io

    tv, fr = _small_twin("resnet18")
    x = torch.randn(1, 3, 32, 32)
    kwargs = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters \
        else {}

    def export(m):
        buf = io.BytesIO()
        try:
            torch.onnx.export(m, (x,), buf, **kwargs)
        except Exception as exc:  # noqa: BLE001 - compared with torchvision's outcome
            return type(exc).__name__, str(exc).splitlines()[0]
        try:
            import onnx
        except ImportError:
            return "exported", None
        graph = onnx.load_from_string(buf.getvalue()).graph
        return "exported", [(n.domain, n.op_type) for n in graph.node]

    ref = export(tv)
    with torch.no_grad():
        fr(x)  # a plan exists
    assert export(fr) == ref
    with torch.no_grad():  # and the plan runs again afterwards
        assert_close_rel(fr(x), tv(x), 1e-5, "after the export")


@pytest.mark.filterwarnings("ignore:fastres. eval-mode forward runs eagerly")
def test_from_torchvision_keeps_edited_modules():
    """A torchvision ResNet edited away from the stock layout converts to a model computing
    the same thing: an fc Linear without bias, a 1-channel stem, a CIFAR stem (3x3/1 conv1,
    Identity maxpool), another activation in a block, a replaced block, a block subclass
    named like torchvision's with its own forward."""
    def gray(tv):
        tv.conv1 = torch.nn.Conv2d(1, 64, 7, 2, 3, bias=False)

    def cifar(tv):
        tv.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        tv.maxpool = torch.nn.Identity()

    class BasicBlock(torchvision.models.resnet.BasicBlock):  # the name, not the class
        def forward(self, x):
            return super().forward(x) * 0.5

    def own_block(tv):
        tv.layer2[1].__class__ = BasicBlock

    edits = {
        "block class with its own forward": own_block,
        "fc without bias": lambda tv: setattr(tv, "fc", torch.nn.Linear(512, 10, bias=False)),
        "1-channel stem": gray,
        "CIFAR stem": cifar,
        "SiLU in a block": lambda tv: setattr(tv.layer1[0], "relu", torch.nn.SiLU()),
        "replaced block": lambda tv: tv.layer4.__setitem__(1, torch.nn.Identity()),
    }
    for what, edit in edits.items():
        tv = torchvision.models.resnet18(weights=None)
        edit(tv)
        cin = tv.conv1.in_channels
        realistic_bn(tv, size=32, device="cpu", channels=cin)
        fr = fastres.from_torchvision(tv)
        assert repr(fr) == repr(tv), what
        assert list(fr.state_dict()) == list(tv.state_dict()), what
        x = torch.randn(2, cin, 32, 32)
        with torch.no_grad():
            # the README's split: the plan fuses the first two edits, the others run eagerly
            fused = what in ("fc without bias", "1-channel stem")
            assert (_plan.eager_reason(fr, x) is None) == fused, what
            assert_close_rel(fr(x), tv(x), 1e-5, what)


def test_weights_assigned_with_other_shapes_convert_and_run_fused():
    """Weights replaced by assignment leave the modules' settings (and repr) as they were:
    a grayscale stem (conv1's weight summed over RGB: conv1.in_channels still says 3), an
    RGB-D stem, a class subset of fc (fc.out_features still 1000). torchvision runs them on
    the weights' shapes, and so does fastres, built directly or by from_torchvision, through
    its plan (it refused the stem's input as "expects 3 input channels", and from_torchvision
    failed in load_state_dict with a size mismatch). A wrong channel count is still refused,
    naming the weight's."""
    cin = int(torch.randint(1, 5, ()))
    if cin == 3:
        cin = 1
    keep = torch.randperm(1000)[:int(torch.randint(2, 20, ()))]
    tv = torchvision.models.resnet18(weights=None)
    realistic_bn(tv, size=32, device="cpu")
    direct = fastres.resnet18().eval()
    direct.load_state_dict(tv.state_dict())
    stem = torch.randn(64, cin, 7, 7) * (2 / (cin * 49)) ** 0.5
    fc_w, fc_b = tv.fc.weight.detach()[keep], tv.fc.bias.detach()[keep]
    for m in (tv, direct):
        m.conv1.weight = torch.nn.Parameter(stem.clone())
        m.fc.weight = torch.nn.Parameter(fc_w.clone())
        m.fc.bias = torch.nn.Parameter(fc_b.clone())
    converted = fastres.from_torchvision(tv)
    assert converted.conv1.weight.shape == (64, cin, 7, 7)
    x = torch.randn(2, cin, 35, 33)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")  # (no eager fallback warning: the plan runs)
        want = tv(x)
        for fr, what in ((direct, "built directly"), (converted, "from_torchvision")):
            assert _plan.eager_reason(fr, x) is None, what
            out = fr(x)
            assert out.shape == (2, len(keep)), what
            assert_close_rel(out, want, 1e-5, what)
        with pytest.raises(_plan.InputValueError, match=f"expects {cin} input channels, got 3"):
            converted(torch.randn(1, 3, 32, 32))


@pytest.mark.filterwarnings("ignore:fastres. eval-mode forward runs eagerly")
def test_from_torchvision_of_a_setting_torch_cannot_print():
    """A convolution given an int padding (torchvision's forward takes it; Conv2d's repr
    raises on it) is copied as it is: from_torchvision raised from repr."""
    tv = torchvision.models.resnet18(weights=None)
    realistic_bn(tv, size=32, device="cpu")
    tv.layer1[0].conv1.padding = 1
    fr = fastres.from_torchvision(tv)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert_close_rel(fr(x), tv(x), 1e-5, "int padding")


def test_from_torchvision_refuses_a_subclass_with_its_own_forward():
    """A ResNet subclass with its own _forward_impl or forward (logits post-processed, say)
    is refused, naming it: the converted model would silently drop that code. A subclass
    that only adds attributes converts."""
    from torchvision.models.resnet import BasicBlock, ResNet

    class MultiLabel(ResNet):
        def _forward_impl(self, x):
            return torch.sigmoid(super()._forward_impl(x))

    class Wrapped(ResNet):
        def forward(self, x):
            return super().forward(x) * 2

    class Tagged(ResNet):
        tag = "mine"

    for cls, own in ((MultiLabel, "_forward_impl"), (Wrapped, "forward")):
        with pytest.raises(TypeError, match=f"{cls.__name__} has its own {own}, which"):
            fastres.from_torchvision(cls(BasicBlock, [1, 1, 1, 1], num_classes=3))
    patched = torchvision.models.resnet18(weights=None)
    patched.forward = lambda x: x
    with pytest.raises(TypeError, match="has its own forward"):
        fastres.from_torchvision(patched)
    tv = Tagged(BasicBlock, [1, 1, 1, 1], num_classes=3).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert_close_rel(fastres.from_torchvision(tv)(x), tv(x), 1e-5, "a subclass")

    # a wrapper set on the instance around torchvision's own forward (accelerate's hooks
    # wrap it so, with functools.wraps; an autocast decorator; a partial of the class's)
    # converts: like the source's hooks, it stays with the source
    def wrapped(m):
        inner = m.forward

        @functools.wraps(inner)
        def forward(*args, **kwargs):
            return inner(*args, **kwargs)
        return forward

    for what, wrap in (("functools.wraps", wrapped),
                       ("autocast", lambda m: torch.autocast("cpu", enabled=False)(m.forward)),
                       ("partial", lambda m: functools.partial(type(m).forward, m))):
        tv = torchvision.models.resnet18(weights=None, num_classes=3).eval()
        tv.forward = wrap(tv)
        with torch.no_grad():
            assert_close_rel(fastres.from_torchvision(tv)(x), tv(x), 1e-5, what)


@pytest.mark.filterwarnings("ignore:fastres. eval-mode forward runs eagerly")
def test_from_torchvision_of_edited_stages():
    """Backbone edits to the stages convert (they raised TypeError, IndexError or
    AttributeError from reading the architecture off layer1[0] and each stage's first
    block): the last stage dropped, a stage emptied, a stage's first block replaced, and a
    BasicBlock model whose layer1 is gone. The copy has the source's tree and state_dict and
    gives its output, or its error (an emptied middle stage leaves channels that do not
    fit)."""
    edits = {
        "layer4 = Identity()": lambda tv: setattr(tv, "layer4", torch.nn.Identity()),
        "layer3 emptied": lambda tv: setattr(tv, "layer3", torch.nn.Sequential()),
        "layer4 emptied": lambda tv: setattr(tv, "layer4", torch.nn.Sequential()),
        "layer2[0] = Identity()": lambda tv: tv.layer2.__setitem__(0, torch.nn.Identity()),
        "layer1 = Identity()": lambda tv: setattr(tv, "layer1", torch.nn.Identity()),
    }
    for what, edit in edits.items():
        for arch in ("resnet18", "resnet50"):
            tv = getattr(torchvision.models, arch)(weights=None, num_classes=10)
            realistic_bn(tv, steps=1, size=32, device="cpu")  # (before the edit: it may not run)
            edit(tv)
            if what == "layer4 = Identity()" or what == "layer4 emptied":
                tv.fc = torch.nn.Linear(tv.layer3[-1].conv1.in_channels, 10)
            fr = fastres.from_torchvision(tv)
            assert repr(fr) == repr(tv), (what, arch)
            assert list(fr.state_dict()) == list(tv.state_dict()), (what, arch)
            x = torch.randn(1, 3, 32, 32)
            with torch.no_grad():
                try:
                    want, err = tv(x), None
                except RuntimeError as exc:
                    want, err = None, exc
                if err is None:
                    assert_close_rel(fr(x), want, 1e-5, f"{what} {arch}")
                else:
                    with pytest.raises(type(err)) as raised:
                        fr(x)
                    assert str(raised.value) == str(err), (what, arch)
    # the width per group read off a later stage's first block (planes 128, not 64)
    tv = torchvision.models.resnext50_32x4d()
    tv.layer1 = torch.nn.Identity()
    fr = fastres.from_torchvision(tv)
    assert (fr.base_width, fr.groups) == (tv.base_width, tv.groups) == (4, 32)
    tv = torchvision.models.resnet18()
    for i in range(1, 5):
        setattr(tv, f"layer{i}", torch.nn.Identity())
    with pytest.raises(TypeError, match="no torchvision BasicBlock or Bottleneck begins"):
        fastres.from_torchvision(tv)


def test_builders_and_get_model_like_torchvision():
    """torchvision's messages for a conflicting groups/width_per_group, get_model's
    case-insensitive names, zero_init_residual on torchvision's own blocks."""
    from torchvision.models import resnet as tv_resnet

    from fastres import models

    for build, kwargs in (("resnext50_32x4d", {"groups": 4}),
                          ("wide_resnet50_2", {"width_per_group": 64}),
                          ("resnext101_64x4d", {"width_per_group": 8})):
        with pytest.raises(ValueError) as tv_err:
            getattr(torchvision.models, build)(**kwargs)
        with pytest.raises(ValueError) as fr_err:
            getattr(fastres, build)(**kwargs)
        assert str(fr_err.value) == str(tv_err.value)
    assert type(torchvision.models.get_model("ResNet18")).__name__ == "ResNet"
    assert fastres.get_model is models.get_model  # fastres.get_model, as documented
    m = fastres.get_model("ResNet18", num_classes=3)
    assert isinstance(m, fastres.ResNet) and m.fc.out_features == 3
    with pytest.raises(ValueError, match="^Unknown model vgg16"):
        models.get_model("VGG16")
    for block, bn in ((tv_resnet.Bottleneck, "bn3"), (tv_resnet.BasicBlock, "bn2")):
        tv = tv_resnet.ResNet(block, [1, 1, 1, 1], zero_init_residual=True)
        fr = fastres.ResNet(block, [1, 1, 1, 1], zero_init_residual=True)
        assert float(getattr(tv.layer1[0], bn).weight.detach().abs().sum()) == 0
        assert float(getattr(fr.layer1[0], bn).weight.detach().abs().sum()) == 0


@st.composite
def _architectures(draw):
    """torchvision ResNet constructor arguments: block, depth per stage, groups and width
    (Bottleneck only, as torchvision's BasicBlock refuses them), dilation flags, classes."""
    bottleneck = draw(st.booleans())
    kw = {"layers": draw(st.lists(st.integers(1, 2), min_size=4, max_size=4)),
          "num_classes": draw(st.integers(1, 17))}
    if bottleneck:
        kw["groups"] = draw(st.sampled_from([1, 2, 4, 8]))
        kw["width_per_group"] = draw(st.sampled_from([4, 8, 16, 64]))
        kw["replace_stride_with_dilation"] = draw(
            st.lists(st.booleans(), min_size=3, max_size=3))
    return bottleneck, kw


@settings(max_examples=12, deadline=None)
@given(arch=_architectures(), n=st.integers(1, 2), h=st.integers(1, 40),
       w=st.integers(1, 40), channels_last=st.booleans(), through=st.sampled_from(
           ["from_torchvision", "constructor"]), seed=st.integers(0, 2**31 - 1))
def test_any_architecture_matches_torchvision(arch, n, h, w, channels_last, through, seed):
    """Any ResNet torchvision's constructor builds (depths, groups, width, dilation, class
    count), on any input size down to 1x1, through from_torchvision or fastres.ResNet
    loaded with the same state_dict: the fused eval forward matches torchvision. Weights
    and inputs come from ``seed``, so a falsifying example replays."""
    torch.manual_seed(seed)
    bottleneck, kw = arch
    tv_block = (torchvision.models.resnet.Bottleneck if bottleneck
                else torchvision.models.resnet.BasicBlock)
    tv = realistic_bn(torchvision.models.ResNet(tv_block, **kw).to(DEVICE), size=24)
    if through == "from_torchvision":
        fr = fastres.from_torchvision(tv)
    else:
        block = fastres.models.Bottleneck if bottleneck else fastres.models.BasicBlock
        fr = fastres.ResNet(block, **kw).to(DEVICE)
        fr.load_state_dict(tv.state_dict(), strict=True)
        fr.eval()
    x = torch.randn(n, 3, h, w, device=DEVICE)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert _plan.eager_reason(fr, x) is None  # the plan runs, not torchvision's code
        out = fr(x)
        feats = fr.forward_features(x)
    assert out.shape == (n, kw["num_classes"])
    what = f"{tv_block.__name__} {kw} on {tuple(x.shape)}"
    # The features (hundreds of values per image) against torchvision's, norm-wise. The
    # logits are too few (1-17 per image) for a norm-wise bound drawn from eager's own
    # error: one logit's cancellation makes it a coin toss (with 1 class, fastres's error
    # over eager's ranges 0.1-16 across weight draws, either way round). They are checked
    # as the head on those features instead, in float64, against the head's summands.
    tv_features = torch.nn.Sequential(*list(tv.children())[:-2])
    assert_matches_torchvision(feats, tv_features, x, f"features of {what}")
    pooled = feats.double().mean((2, 3))
    w, b = fr.fc.weight.double(), fr.fc.bias.double()
    err = (out.double() - (pooled @ w.T + b)).abs()
    assert bool((err <= 1e-5 * (pooled.abs() @ w.abs().T + b.abs())).all()), (
        f"head of {what}: |logits - fc(features)| {err.max().item():.2e}")


def _outcome(f):
    """``("ok", output)`` or ``("raises", exception type name)``."""
    try:
        return "ok", f()
    except Exception as exc:  # noqa: BLE001 - compared with torchvision's outcome
        return "raises", type(exc).__name__


@pytest.mark.filterwarnings("ignore:fastres. eval-mode forward runs eagerly")
def test_autocast_float64_and_mixed_dtypes_like_torchvision():
    """Autocast leaves float64 alone, and torchvision's layers refuse parameters of mixed
    dtypes (a model cast in part) unless autocast casts them: fastres computes in float64, or
    raises, where torchvision does, instead of folding everything into one dtype silently (a
    float64 model under bf16 autocast returned bf16; fc.half() ran in fp32)."""
    import copy

    tv0, _ = _small_twin()
    x = torch.randn(2, 3, 32, 32)
    bf16, fp16 = torch.bfloat16, torch.float16

    def cast(edit):
        tv = copy.deepcopy(tv0)
        edit(tv)
        fr = fastres.from_torchvision(tv)
        assert [(k, v.dtype) for k, v in fr.state_dict().items()] == \
            [(k, v.dtype) for k, v in tv.state_dict().items()]  # from_torchvision keeps them
        return tv, fr

    cases = [  # (edit of the model, input, autocast dtype or None, tolerance if both compute)
        (lambda m: m.double(), x.double(), bf16, 1e-12),
        (lambda m: m.double(), x, bf16, None),            # float64 weights, bf16 input
        (lambda m: None, x.double(), bf16, None),         # float64 input, bf16 weights
        (lambda m: m.half(), x.half(), bf16, None),       # fp16 BatchNorm, bf16 input
        (lambda m: m.layer4.half(), x, None, None),
        (lambda m: m.layer4.half(), x, fp16, 3e-2),
        (lambda m: m.fc.half(), x, None, None),
        (lambda m: m.conv1.half(), x.half(), None, None),
        (lambda m: m.conv1.half(), x, bf16, 3e-2),
    ]
    for i, (edit, inp, autocast, tol) in enumerate(cases):
        tv, fr = cast(edit)
        with torch.no_grad(), torch.autocast("cpu", dtype=autocast or bf16,
                                             enabled=autocast is not None):
            ref, got = _outcome(lambda: tv(inp)), _outcome(lambda: fr(inp))
        assert got[0] == ref[0], (i, ref, got)
        if ref[0] == "ok":
            assert got[1].dtype == ref[1].dtype, (i, ref[1].dtype, got[1].dtype)
            if got[1].dtype == torch.float64:
                assert_close_rel(got[1], ref[1], tol, f"case {i}")
                continue
            # 16-bit: both against float64, fastres within max(tol, 2 x torchvision's own
            # error) (compared with each other, two roundings of 16-bit arithmetic went
            # past a fixed 3e-2 for some draws: 3.001e-2 with FASTRES_TEST_SEED=860636598)
            with torch.no_grad():
                exact = copy.deepcopy(tv).double()(inp.double())
            own = rel_err(ref[1], exact)
            assert_close_rel(got[1], exact, max(tol, 2 * own), f"case {i} (eager's {own:.1e})")


def test_empty_images_and_inference_mode_with_enable_grad():
    """An empty batch of empty images is refused as a batch of them is (torchvision's stem
    convolution raises; fastres returned a [0, 1000] output), and inference mode records
    nothing even under enable_grad: the fused plan runs there (it ran eagerly, warning about
    autograd)."""
    tv, fr = _small_twin()
    for shape in ((0, 3, 0, 0), (0, 3, 0, 32), (0, 3, 32, 0)):
        with torch.no_grad():
            assert _outcome(lambda: tv(torch.randn(shape)))[0] == "raises"
            with pytest.raises(ValueError, match="expects H, W >= 1"):
                fr(torch.randn(shape))
    x = torch.randn(2, 3, 32, 32)
    fr.invalidate_plan()
    with torch.inference_mode(), torch.enable_grad():
        out, ref = fr(x), tv(x)
    assert fr.__dict__["_plan_cache"] is not None  # the fused plan ran
    assert not out.requires_grad and out.grad_fn is None and out.is_inference()
    assert_close_rel(out, ref, 1e-5, "inference_mode + enable_grad")
