"""More op-layer checks: argument bounds at their edges, tensors on another device, the
backend preference's precedence and parsing, and named backends' fallback. (Written from
mutants of fastres/ops that test_ops.py let through.)"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close_rel

import fastres
from fastres import ops
from fastres.ops import _backend
from fastres.ops._checks import cuda_device_problem
from fastres.ops.preprocess import preprocess, preprocess_reference


def _xwb(n=2, c=8, h=6, w=6, cout=8, k=3):
    return torch.randn(n, c, h, w), torch.randn(cout, c, k, k), torch.randn(cout)


def _interpreted():
    return _backend.triton_interpreted() and _backend.interpreter_problem() is None


# -- argument checks ----------------------------------------------------------------------------

@pytest.mark.parametrize("call, exc, match", [
    # the activation's own checks, in every op that takes one
    (lambda x, w, b: ops.conv_bias_act(x.to_sparse(), w, b), TypeError,
     "conv_bias_act: x must be a dense .strided. tensor, got layout torch.sparse_coo"),
    (lambda x, w, b: ops.max_pool2d(x.to_sparse()), TypeError,
     "max_pool2d: x must be a dense .strided. tensor"),
    (lambda x, w, b: ops.conv_bias_act(x[None], w, b), ValueError,
     r"conv_bias_act: x must be 4-D \[N, C, H, W\], got 5-D shape \(1, 2, 8, 6, 6\)"),
    (lambda x, w, b: ops.max_pool2d(x[None]), ValueError, "max_pool2d: x must be 4-D"),
    (lambda x, w, b: ops.avgpool_linear(x[0], torch.randn(4, 6), torch.randn(4)), ValueError,
     r"avgpool_linear: x must be 4-D \[N, C, H, W\], got 3-D"),
    (lambda x, w, b: ops.avgpool_linear(x.int(), torch.randn(4, 8).int(), torch.randn(4)),
     TypeError, "avgpool_linear: x must be float32, float16 or bfloat16, got torch.int32"),
    (lambda x, w, b: ops.conv_bias_act(x.double(), w.double(), b), TypeError,
     "x must be float32, float16 or bfloat16, got torch.float64"),
    (lambda x, w, b: ops.max_pool2d(x.double()), TypeError, "got torch.float64"),
    # bools are not ints, nor ints bools
    (lambda x, w, b: ops.conv_bias_act(x, w, b, stride=True), TypeError,
     "stride must be an int, got True"),
    (lambda x, w, b: ops.conv_bias_act(x, w, b, groups=True), TypeError,
     "groups must be an int, got True"),
    (lambda x, w, b: ops.max_pool2d(x, 3, True), TypeError, r"stride \(one int\) must be an int"),
    (lambda x, w, b: ops.conv_bias_act(x, w, b, relu=1), TypeError,
     "relu must be True or False, got 1"),
    (lambda x, w, b: ops.conv_bias_act(x, w, b, relu=0), TypeError,
     "relu must be True or False, got 0"),
    (lambda x, w, b: ops.conv_bias_act(x, w, b, stride=(2,)), ValueError,
     r"stride must be an int or a pair, got \(2,\)"),
    # bounds on groups, dilation, padding (ZeroDivisionError or torch's own error before)
    (lambda x, w, b: ops.conv_bias_act(x, w, b, groups=0), ValueError,
     "groups=0 must divide C_in=8"),
    (lambda x, w, b: ops.conv_bias_act(x, w, b, groups=-1), ValueError,
     "groups=-1 must divide"),
    (lambda x, w, b: ops.conv_bias_act(x, w, b, dilation=(1, 0)), ValueError,
     r"stride and dilation must be >= 1 .*dilation=\[1, 0\]"),
    (lambda x, w, b: ops.conv_bias_act(x, w, b, padding=-1), ValueError,
     r"padding >= 0, got .*padding=\[-1, -1\]"),
    (lambda x, w, b: torch.ops.fastres.conv_bias_act(x, w, b, [1, 1], [0, -1], [1, 1], 1, None,
                                                     True), ValueError, "padding >= 0"),
    # a residual that would broadcast (one image added to every image of the batch)
    (lambda x, w, b: ops.conv_bias_act(x, w, b, padding=1, residual=torch.randn(1, 8, 6, 6)),
     ValueError, r"residual must have shape \(2, 8, 6, 6\), got \(1, 8, 6, 6\)"),
    (lambda x, w, b: ops.conv_bias_act(x, w, b, padding=1, residual=torch.randn(2, 8, 1, 6)),
     ValueError, r"residual must have shape \(2, 8, 6, 6\), got \(2, 8, 1, 6\)"),
    # a bias of the right size but the wrong shape
    (lambda x, w, b: ops.conv_bias_act(x, w, b[:, None]), ValueError,
     r"bias must have shape \(8,\), got \(8, 1\)"),
    (lambda x, w, b: ops.avgpool_linear(x, torch.randn(4, 8), torch.randn(2, 2)), ValueError,
     r"bias must have shape \(4,\), got \(2, 2\)"),
    # the stem's 7x7 weight and its dtype
    (lambda x, w, b: ops.stem(x[:, :3], torch.randn(8, 3, 7, 5), b), ValueError,
     r"stem: weight must be \[C_out >= 1, 3, 7, 7\], got \(8, 3, 7, 5\)"),
    (lambda x, w, b: ops.stem(x[:, :3], torch.randn(8, 3, 5, 7), b), ValueError,
     r"got \(8, 3, 5, 7\)"),
    (lambda x, w, b: ops.stem(x[:, :3], torch.randn(8, 3, 7, 7).half(), b), TypeError,
     r"stem: weight dtype must equal x's \(torch.float32\), got torch.float16"),
    # the head's weight and bias
    (lambda x, w, b: ops.avgpool_linear(x, torch.randn(4, 2, 8), torch.randn(4)), ValueError,
     r"weight must be \[num_classes, 8\], got \(4, 2, 8\)"),
    (lambda x, w, b: ops.avgpool_linear(x.bfloat16(), torch.randn(4, 8).bfloat16(),
                                        torch.randn(4).half()), TypeError,
     r"bias dtype must be x's \(torch.bfloat16\) or float32, got torch.float16"),
    # a pool window too small in one direction only
    (lambda x, w, b: ops.max_pool2d(torch.randn(1, 2, 9, 1), 3, 1, 0), ValueError,
     r"input \(9, 1\) is too small for kernel 3"),
    (lambda x, w, b: ops.max_pool2d(torch.randn(1, 2, 1, 9), 3, 1, 0), ValueError,
     r"input \(1, 9\) is too small for kernel 3"),
])
def test_more_op_argument_errors(call, exc, match):
    x, w, b = _xwb()
    with pytest.raises(exc, match=match):
        call(x, w, b)


def test_a_broadcasting_residual_is_refused_not_added_to_every_image():
    """A residual [1, C_out, P, Q] for a batch of 2 broadcast silently before the shape check
    compared N too; a correct one gives eager's result."""
    x, w, b = _xwb(n=2)
    res = torch.randn(2, 8, 6, 6)
    with fastres.use_backend("torch"):
        with pytest.raises(ValueError, match="residual must have shape"):
            ops.conv_bias_act(x, w, b, padding=1, residual=res[:1])
        out = ops.conv_bias_act(x, w, b, padding=1, residual=res, relu=False)
    ref = F.conv2d(x.double(), w.double(), b.double(), padding=1) + res.double()
    assert_close_rel(out, ref, 1e-5, "conv + residual")


@pytest.mark.parametrize("which", ["weight", "bias", "residual"])
def test_conv_tensors_on_another_device_are_refused(which):
    x, w, b = _xwb()
    args = {"weight": w, "bias": b, "residual": torch.randn(2, 8, 4, 4)}
    args[which] = args[which].to("meta")
    with pytest.raises(ValueError, match=f"conv_bias_act: {which} is on meta, x is on cpu"):
        ops.conv_bias_act(x, args["weight"], args["bias"], residual=args["residual"])


@pytest.mark.parametrize("op", ["stem", "avgpool_linear"])
@pytest.mark.parametrize("which", ["weight", "bias"])
def test_stem_and_head_tensors_on_another_device_are_refused(op, which):
    x = torch.randn(2, 3, 9, 9)
    w = torch.randn(8, 3, 7, 7) if op == "stem" else torch.randn(8, 3)
    args = {"weight": w, "bias": torch.randn(8)}
    args[which] = args[which].to("meta")
    with pytest.raises(ValueError, match=f"{op}: {which} is on meta, x is on cpu"):
        getattr(ops, op)(x, args["weight"], args["bias"])


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("s", [1, 2])
def test_max_pool_padding_bound_is_torchs(k, s):
    """Padding up to half the window runs and equals F.max_pool2d; one more is refused with
    the op's ValueError (F.max_pool2d's own rule, which raises a RuntimeError)."""
    x = torch.randn(2, 3, 7, 6)
    p = k // 2
    assert_close_rel(ops.max_pool2d(x, k, s, p), F.max_pool2d(x, k, s, p), 0.0, "max pool")
    with pytest.raises(RuntimeError):
        F.max_pool2d(x, k, s, p + 1)
    with pytest.raises(ValueError, match=f"padding={p + 1}, kernel_size={k}"):
        ops.max_pool2d(x, k, s, p + 1)


# -- preprocess -------------------------------------------------------------------------------

_IMG = dict(size=(1, 2, 2, 3), dtype=torch.uint8)
_F32_MAX = torch.finfo(torch.float32).max
_F32_TINY = 2.0 ** -149  # the smallest float32 subnormal


@pytest.mark.parametrize("mean, std, match", [
    ((0.5, 0.5, 0.5), (0.2, 0.2), "mean and std must have 3 values, got 3 and 2"),
    ((0.5, 0.5, 0.5), (0.2, 0.2, 0.2, 0.2), "got 3 and 4"),
    # the float32 edges: 2**-150 rounds to 0, 2**128 - 2**103 to inf; NaN is not finite
    ((0.5, 0.5, 0.5), (2.0 ** -150, 0.2, 0.2), "finite and non-zero in float32"),
    ((0.5, 0.5, 0.5), (0.2, -(2.0 ** -150), 0.2), "finite and non-zero in float32"),
    ((0.5, 0.5, 0.5), (0.2, 0.2, 2.0 ** 128 - 2.0 ** 103), "finite and non-zero in float32"),
    ((0.5, 0.5, 0.5), (0.2, float("nan"), 0.2), "finite and non-zero in float32"),
    ((0.5, 0.5, 0.5), (float("-inf"), 0.2, 0.2), "finite and non-zero in float32"),
])
def test_preprocess_std_and_lengths_are_checked(mean, std, match):
    images = torch.randint(0, 256, **_IMG)
    with pytest.raises(ValueError, match=match):
        preprocess(images, "NHWC", mean, std)
    with pytest.raises(ValueError, match=match):  # the registered op too
        torch.ops.fastres.preprocess(images, "NHWC", list(mean), list(std), torch.float32)


@pytest.mark.parametrize("std", [(_F32_TINY, 1.0, 1.0), (1.0, -_F32_MAX, 1.0),
                                 (1.0, 1.0, 2.0 ** 128 - 2.0 ** 105)])
def test_preprocess_std_at_the_float32_edges_is_taken(std):
    """The smallest subnormal and the largest finite float32 are valid divisors."""
    images = torch.randint(0, 256, **_IMG)
    mean = (0.5, 0.25, 0.75)
    out = preprocess(images, "NHWC", mean, std)
    ref = preprocess_reference(images, "NHWC", list(mean), [float(s) for s in std],
                               torch.float32)
    torch.testing.assert_close(out, ref, rtol=0, atol=0, equal_nan=True)


def test_preprocess_refuses_float64_output():
    with pytest.raises(TypeError, match="dtype must be float32, float16 or bfloat16, got "
                                        "torch.float64"):
        preprocess(torch.randint(0, 256, **_IMG), dtype=torch.float64)


# -- cuda_device_problem ------------------------------------------------------------------------

def test_cuda_device_problem_names_a_missing_index(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert cuda_device_problem(torch.device("cuda:0")) is None
    assert cuda_device_problem(torch.device("cuda:1")) is None
    assert cuda_device_problem(torch.device("cuda")) is None
    assert cuda_device_problem(torch.device("cuda:2")) == "there are only 2 CUDA device(s)"
    assert cuda_device_problem(torch.device("cpu")) is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "no CUDA GPU" in cuda_device_problem(torch.device("cuda:0"))


# -- the backend preference -------------------------------------------------------------------

@pytest.fixture
def global_backend(monkeypatch):
    """set_backend's process-wide preference, put back afterwards."""
    monkeypatch.setattr(_backend, "_global_backend", None)
    yield
    _backend._global_backend = None


def test_backend_precedence(monkeypatch, global_backend):
    """use_backend over set_backend over FASTRES_BACKEND over "auto"."""
    monkeypatch.setenv("FASTRES_BACKEND", "triton")
    assert fastres.get_backend() == "triton"
    monkeypatch.delenv("FASTRES_BACKEND")
    assert fastres.get_backend() == "auto"
    for empty in ("", "  "):  # set but empty is unset, as for FASTRES_TUNE (it raised)
        monkeypatch.setenv("FASTRES_BACKEND", empty)
        assert fastres.get_backend() == "auto"
    monkeypatch.setenv("FASTRES_BACKEND", "triton")
    fastres.set_backend("torch")
    assert fastres.get_backend() == "torch"      # set_backend over the variable
    with fastres.use_backend("auto"):
        assert fastres.get_backend() == "auto"   # use_backend over set_backend
        with fastres.use_backend("cuda"):
            assert fastres.get_backend() == "cuda"
        assert fastres.get_backend() == "auto"
    assert fastres.get_backend() == "torch"
    fastres.set_backend(None)                    # back to the variable
    assert fastres.get_backend() == "triton"


def test_use_backend_is_undone_when_the_block_raises(global_backend):
    before = fastres.get_backend()
    with pytest.raises(KeyError), fastres.use_backend("cuda"):
        raise KeyError("boom")
    assert fastres.get_backend() == before


@pytest.mark.parametrize("spelled, key", [("TORCH", "torch"), (" Triton ", "triton"),
                                          ("Auto\n", "auto"), ("CUDA", "cuda")])
def test_backend_names_are_read_without_case_or_spaces(spelled, key, monkeypatch,
                                                       global_backend):
    with fastres.use_backend(spelled):
        assert fastres.get_backend() == key
        x = torch.randn(1, 2, 5, 5)
        if key == "torch":
            assert _backend.choose("max_pool2d", x.device, x, 3, 2, 1).backend == "torch"
    fastres.set_backend(spelled)
    assert fastres.get_backend() == key
    fastres.set_backend(None)
    monkeypatch.setenv("FASTRES_BACKEND", spelled)
    assert fastres.get_backend() == key


@pytest.mark.parametrize("value, on", [
    ("1", True), ("true", True), ("TRUE", True), (" on ", True), ("yes", True), ("Y", True),
    ("0", False), ("", False), ("false", False), ("off", False), ("no", False), ("n", False),
    ("2", False),
])
def test_triton_interpret_is_read_as_a_boolean(value, on, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert _backend.triton_interpret_env() is on


def test_register_impl_refuses_an_unknown_backend(monkeypatch):
    monkeypatch.setattr(_backend, "_IMPLS", dict(_backend._IMPLS))
    monkeypatch.setattr(_backend, "_CONFIGS", dict(_backend._CONFIGS))
    with pytest.raises(ValueError, match="backend must be one of .*, got 'tpu'"):
        _backend.register_impl("max_pool2d", "tpu", lambda *a: None)
    with pytest.raises(ValueError, match="got 'auto'"):
        _backend.register_impl("max_pool2d", "auto", lambda *a: None)
    with pytest.raises(ValueError, match="got 'tpu'"):
        _backend.register_configs("max_pool2d", "tpu", lambda *a: [], lambda *a: None)
    assert "tpu" not in _backend._IMPLS.get("max_pool2d", {})


# -- named backends and their fallback (CPU tensors: the fixed order, nothing timed) ----------

def _conv_call(k=3):
    x = torch.randn(1, 8, 6, 6)
    w = torch.randn(8, 8, k, k)
    b = torch.randn(8)
    return x, w, b, [1, 1], [k // 2] * 2, [1, 1], 1, None, True


@pytest.mark.skipif(not _interpreted(), reason="Triton cannot run on the CPU here")
def test_named_triton_is_used_as_is_without_trying_cuda(monkeypatch):
    """``use_backend("triton")`` starts the chain at triton: it neither tries nor mentions the
    ``cuda`` implementation (which a named ``triton`` must not pick on a GPU either)."""
    args = _conv_call()
    monkeypatch.setattr(_backend, "_warned", set())
    with fastres.use_backend("triton"), warnings.catch_warnings():
        warnings.simplefilter("error")
        impl = _backend.choose("conv_bias_act", args[0].device, *args)
    assert impl.backend == "triton"


@pytest.mark.skipif(not _interpreted(), reason="Triton cannot run on the CPU here")
def test_named_cuda_on_cpu_tensors_falls_back_and_says_why(monkeypatch):
    """The CUDA implementations take CUDA tensors only: a named ``cuda`` backend on a CPU call
    falls back to the next in the chain (interpreted Triton here) and says why once."""
    if "cuda" not in _backend.implementations("conv_bias_act"):
        pytest.skip("the CUDA extension is not built here")
    args = _conv_call(k=1)
    monkeypatch.setattr(_backend, "_warned", set())
    with fastres.use_backend("cuda"):
        with pytest.warns(RuntimeWarning, match="'cuda' backend .*tensors are on cpu, not cuda"):
            impl = _backend.choose("conv_bias_act", args[0].device, *args)
        assert impl.backend == "triton"
        with warnings.catch_warnings():  # said once
            warnings.simplefilter("error")
            _backend.choose("conv_bias_act", args[0].device, *args)
    x, w, b = args[:3]
    with _backend.tf32_off():  # (fp32 takes TF32 when cuDNN's flag allows it, as by default)
        y = impl.fn(*args)
    assert_close_rel(y, F.conv2d(x.double(), w.double(), b.double()).relu(), 1e-5,
                     "the fallback's result")


@pytest.mark.skipif(not _interpreted(), reason="Triton cannot run on the CPU here")
def test_each_fallback_reason_is_said_once(monkeypatch):
    """Once per (op, backend, reason): a second, different reason is said too."""
    _backend.implementations("max_pool2d")
    monkeypatch.setitem(_backend._IMPLS, "max_pool2d", dict(_backend._IMPLS["max_pool2d"]))
    monkeypatch.setattr(_backend, "_warned", set())
    _backend.register_impl("max_pool2d", "triton", lambda *a: None,
                           lambda x, k, s, p: f"kernel {k} declined")
    x = torch.randn(1, 2, 7, 7)
    with fastres.use_backend("triton"):
        for k in (3, 2):
            with pytest.warns(RuntimeWarning, match=f"kernel {k} declined"):
                assert _backend.choose("max_pool2d", x.device, x, k, 1, 0).backend == "torch"
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            _backend.choose("max_pool2d", x.device, x, 3, 1, 0)



@pytest.mark.parametrize("built", [True, False])
def test_a_named_backend_without_the_op_says_so(monkeypatch, built):
    """A named backend that has no implementation of an op (the CUDA extension has no max-pool)
    says that, not "not built or not installed" (which it said even with the extension
    loaded); a backend that failed to load says that."""
    x = torch.randn(1, 2, 7, 7)
    _backend.implementations("max_pool2d")
    monkeypatch.setattr(_backend, "_warned", set())
    monkeypatch.setitem(_backend._IMPLS, "max_pool2d",
                        {k: v for k, v in _backend._IMPLS["max_pool2d"].items() if k != "cuda"})
    if built:  # another op of the backend is registered: it loaded
        monkeypatch.setitem(_backend._IMPLS, "stem", dict(_backend._IMPLS["stem"]))
        _backend.register_impl("stem", "cuda", lambda *a: None)
        monkeypatch.delitem(_backend._missing, "cuda", raising=False)
        why = "the cuda backend has no max_pool2d implementation"
    else:
        monkeypatch.setitem(_backend._missing, "cuda", "the CUDA extension is not available")
        why = "not built or not installed"
    with fastres.use_backend("cuda"), warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        _backend.choose("max_pool2d", x.device, x, 3, 2, 1)
    msgs = [str(w.message) for w in said]
    assert any(f"max_pool2d cannot run on the 'cuda' backend ({why})" in m for m in msgs), msgs
