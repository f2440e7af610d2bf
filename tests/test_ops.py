"""Op contracts: the plain-torch references against eager modules, registration, checks."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close_rel
from hypothesis import given, settings
from hypothesis import strategies as st

import fastres
from fastres import ops
from fastres.ops import _backend
from fastres.ops.stem import stem


def _bn_eval(c):
    bn = torch.nn.BatchNorm2d(c)
    with torch.no_grad():
        bn.running_mean.normal_(0, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_(0, 0.3)
    return bn.eval()


@pytest.mark.parametrize("k, stride, dil, groups", [
    (1, 1, 1, 1), (1, 2, 1, 1), (3, 1, 1, 1), (3, 2, 1, 1), (3, 1, 2, 1), (3, 1, 4, 1),
    (3, 1, 1, 4), (3, 2, 1, 8), (7, 2, 1, 1),
])
@pytest.mark.parametrize("residual", [False, True])
def test_conv_bias_act_reference_matches_conv_bn_relu(k, stride, dil, groups, residual):
    """Folding BN into conv_bias_act reproduces eager conv -> BN (-> + residual) -> ReLU."""
    cin, cout = (3, 16) if k == 7 else (16, 24)
    conv = torch.nn.Conv2d(cin, cout, k, stride, padding=dil * (k // 2), dilation=dil,
                           groups=groups, bias=False)
    bn = _bn_eval(cout)
    x = torch.randn(2, cin, 13, 11, dtype=torch.float64)
    conv, bn = conv.double(), bn.double()
    with torch.no_grad():
        y = bn(conv(x))
        res = torch.randn_like(y) if residual else None
        ref = torch.relu(y + res if residual else y)
        from fastres.plan import fold_batchnorm
        step = fold_batchnorm(conv.float(), bn.float(), torch.float32)
        out = ops.conv_bias_act(x.float(), step.weight, step.bias, step.stride, step.padding,
                                step.dilation, step.groups,
                                res.float() if residual else None, True)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert_close_rel(out, ref, 1e-5, "conv_bias_act reference")


def test_max_pool_and_head_references():
    x = torch.randn(2, 8, 15, 9)
    torch.testing.assert_close(ops.max_pool2d(x, 3, 2, 1), F.max_pool2d(x, 3, 2, 1))
    w, b = torch.randn(10, 8), torch.randn(10)
    ref = F.linear(F.adaptive_avg_pool2d(x, 1).flatten(1), w, b)
    torch.testing.assert_close(ops.avgpool_linear(x, w, b), ref, rtol=1e-5, atol=1e-5)
    ws = torch.randn(16, 3, 7, 7)
    bs = torch.randn(16)
    xs = torch.randn(1, 3, 29, 31)
    ref = F.max_pool2d(torch.relu(F.conv2d(xs, ws, bs, 2, 3)), 3, 2, 1)
    torch.testing.assert_close(stem(xs, ws.contiguous(memory_format=torch.channels_last), bs),
                               ref, rtol=1e-5, atol=1e-5)


def test_ops_are_registered_custom_ops():
    for name in ("conv_bias_act", "max_pool2d", "avgpool_linear", "stem"):
        assert hasattr(torch.ops.fastres, name), name
    x = torch.randn(2, 8, 9, 9).contiguous(memory_format=torch.channels_last)
    w = torch.randn(8, 8, 3, 3).contiguous(memory_format=torch.channels_last)
    b = torch.randn(8)
    r = torch.randn(2, 8, 9, 9).contiguous(memory_format=torch.channels_last)
    with fastres.use_backend("torch"):
        torch.library.opcheck(torch.ops.fastres.conv_bias_act.default,
                              (x, w, b, [1, 1], [1, 1], [1, 1], 1, r, True))
        torch.library.opcheck(torch.ops.fastres.max_pool2d.default, (x, 3, 2, 1))
        torch.library.opcheck(torch.ops.fastres.avgpool_linear.default,
                              (x, torch.randn(5, 8), torch.randn(5)))


@pytest.mark.parametrize("call, exc, match", [
    (lambda x, w, b: ops.conv_bias_act(x[0], w, b), ValueError, "4-D"),
    (lambda x, w, b: ops.conv_bias_act(x.int(), w, b), TypeError, "float32"),
    (lambda x, w, b: ops.conv_bias_act(x, w.half(), b), TypeError, "weight dtype"),
    (lambda x, w, b: ops.conv_bias_act(x, w[:, :4], b), ValueError, "input channels"),
    (lambda x, w, b: ops.conv_bias_act(x, w, b[:3]), ValueError, "bias must have shape"),
    (lambda x, w, b: ops.conv_bias_act(x, w, b, groups=3), ValueError, "groups=3"),
    (lambda x, w, b: ops.conv_bias_act(x, w, b, stride=0), ValueError, "stride"),
    (lambda x, w, b: ops.conv_bias_act(x, w, b, stride=(1, 1, 1)), ValueError, "pair"),
    (lambda x, w, b: ops.conv_bias_act(x[:, :, :1, :1], w, b), ValueError, "too small"),
    (lambda x, w, b: ops.conv_bias_act(x, w, b, residual=torch.randn(1, 8, 2, 2)),
     ValueError, "residual must have shape"),
    (lambda x, w, b: ops.max_pool2d(x[:, :, :1, :1], 3, 2, 0), ValueError, "too small"),
    (lambda x, w, b: ops.avgpool_linear(x, torch.randn(4, 3), torch.randn(4)), ValueError,
     "weight must be"),
    (lambda x, w, b: ops.conv_bias_act(x[:, :, :0], w, b, padding=2), ValueError, "H, W >= 1"),
    (lambda x, w, b: ops.max_pool2d(x, 3, 2, -1), ValueError, "padding >= 0"),
    (lambda x, w, b: ops.max_pool2d(x, 0, 1, 0), ValueError, "kernel_size and stride"),
    (lambda x, w, b: ops.max_pool2d(x, 3, 0, 1), ValueError, "kernel_size and stride"),
    (lambda x, w, b: ops.avgpool_linear(x, torch.randn(4, 8), torch.randn(4).double()),
     TypeError, "bias dtype"),
    (lambda x, w, b: ops.stem(x[:, :3, :0], torch.randn(8, 3, 7, 7), torch.randn(8)),
     ValueError, "H, W >= 1"),
    # scalars that int()/bool() used to coerce silently (kernel 2.5 ran as 2, relu="no" as
    # True) or fail on obscurely ("'float' object is not iterable")
    (lambda x, w, b: ops.max_pool2d(x, 2.5), TypeError, "kernel_size .* must be an int"),
    (lambda x, w, b: ops.max_pool2d(x, (3, 3)), TypeError, "window is square"),
    (lambda x, w, b: ops.max_pool2d(x, 3, None), TypeError, "stride .* got None"),
    (lambda x, w, b: ops.conv_bias_act(x, w, b, relu="no"), TypeError, "relu must be True"),
    (lambda x, w, b: ops.conv_bias_act(x, w, b, stride=1.5), TypeError,
     "stride must be an int, got 1.5"),
    (lambda x, w, b: ops.conv_bias_act(x, w, b, padding=(1, 0.5)), TypeError, r"padding\[1\]"),
    (lambda x, w, b: ops.conv_bias_act(x, w, b, padding="same"), TypeError, "string paddings"),
    (lambda x, w, b: ops.conv_bias_act(x, w, b, groups=2.5), TypeError, "groups must be an int"),
    # no input channels (an obscure broadcasting error inside the op before)
    (lambda x, w, b: ops.conv_bias_act(x[:, :0], w[:, :0], b), ValueError,
     "at least one input channel"),
    (lambda x, w, b: ops.stem(x[:, :0], torch.randn(8, 0, 7, 7), torch.randn(8)),
     ValueError, "at least one input channel"),
    # the registered ops check too (they used to run the Triton kernel on a mismatched weight)
    (lambda x, w, b: torch.ops.fastres.conv_bias_act(x, w[:, :4], b, [1, 1], [0, 0], [1, 1],
                                                     1, None, True), ValueError,
     "input channels"),
    (lambda x, w, b: torch.ops.fastres.max_pool2d(x, 3, 2, -1), ValueError, "padding >= 0"),
    (lambda x, w, b: torch.ops.fastres.avgpool_linear(x, torch.randn(4, 3), torch.randn(4)),
     ValueError, "weight must be"),
    (lambda x, w, b: torch.ops.fastres.stem(x, torch.randn(8, 3, 7, 7), torch.randn(8)),
     ValueError, "weight must be"),
    # (the registered preprocess used to take any layout string as NCHW)
    (lambda x, w, b: torch.ops.fastres.preprocess(torch.zeros(1, 4, 4, 3, dtype=torch.uint8),
                                                  "NCHW", [0.5] * 3, [0.2] * 3, torch.float32),
     ValueError, "layout NCHW expects"),
    (lambda x, w, b: torch.ops.fastres.preprocess(torch.zeros(1, 4, 4, 3, dtype=torch.uint8),
                                                  "NWHC", [0.5] * 3, [0.2] * 3, torch.float32),
     ValueError, "layout must be one of"),
    # arguments that are not tensors ('list' object has no attribute 'dim' before)
    (lambda x, w, b: ops.conv_bias_act(x, [[1.0] * 8] * 8, b), TypeError,
     "weight must be a torch.Tensor, got list"),
    (lambda x, w, b: ops.conv_bias_act(x, w, 0.5), TypeError, "bias must be a torch.Tensor"),
    (lambda x, w, b: ops.conv_bias_act(x, w, b, residual=[0.0]), TypeError,
     "residual must be a torch.Tensor"),
    (lambda x, w, b: ops.stem(x[:, :3], None, None), TypeError, "weight must be a torch.Tensor"),
    (lambda x, w, b: ops.avgpool_linear(x, torch.randn(4, 8), [0.0] * 4), TypeError,
     "bias must be a torch.Tensor"),
    # empty weights (F.conv2d's or oneDNN's error, and the fakes returned a shape)
    (lambda x, w, b: ops.conv_bias_act(x, w[:0], b[:0]), ValueError, "every size >= 1"),
    (lambda x, w, b: ops.conv_bias_act(x, w[:, :, :0], b), ValueError, "every size >= 1"),
    (lambda x, w, b: ops.stem(x[:, :3], torch.randn(0, 3, 7, 7), torch.randn(0)), ValueError,
     "C_out >= 1"),
    (lambda x, w, b: ops.max_pool2d(x[:, :0], 3, 2, 1), ValueError,
     "at least one input channel"),
    # the registered op's lists (an IndexError, or a shape from the fake for 3 paddings)
    (lambda x, w, b: torch.ops.fastres.conv_bias_act(x, w, b, [2], [0, 0], [1, 1], 1, None,
                                                     True), ValueError, "stride must have 2"),
    (lambda x, w, b: torch.ops.fastres.conv_bias_act(x, w, b, [1, 1], [1, 1, 1], [1, 1], 1,
                                                     None, True), ValueError,
     "padding must have 2"),
    # a bias that is not floating point (a complex one lost its imaginary part silently)
    (lambda x, w, b: ops.conv_bias_act(x, w, torch.complex(b, b)), TypeError,
     "bias must be a floating-point tensor"),
    (lambda x, w, b: ops.stem(x[:, :3], torch.randn(8, 3, 7, 7), torch.ones(8, dtype=torch.int64)),
     TypeError, "bias must be a floating-point tensor"),
    # a bool tensor is no int (stride=torch.tensor(True) ran as stride 1)
    (lambda x, w, b: ops.conv_bias_act(x, w, b, stride=torch.tensor(True)), TypeError,
     "stride must be an int"),
    # a residual of another dtype, C_out that groups does not divide, a pool padding past
    # half its window (F.max_pool2d's own rule)
    (lambda x, w, b: ops.conv_bias_act(x, w, b, padding=1,
                                       residual=torch.randn(2, 8, 6, 6).double()),
     TypeError, "residual dtype must equal"),
    (lambda x, w, b: ops.conv_bias_act(x[:, :4], torch.randn(5, 2, 3, 3), torch.randn(5),
                                       groups=2), ValueError, "groups=2 must divide"),
    (lambda x, w, b: ops.max_pool2d(x, 2, 1, 2), ValueError, "at most half the kernel"),
])
@pytest.mark.parametrize("fake", [False, True], ids=["real", "fake"])
def test_op_argument_errors(call, exc, match, fake):
    """Each bad argument gets its error, also under FakeTensorMode (torch.compile and export
    trace the registered ops through their fakes, which returned a shape for any weight)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() if fake else contextlib.nullcontext():
        x, w, b = torch.randn(2, 8, 6, 6), torch.randn(8, 8, 3, 3), torch.randn(8)
        with pytest.raises(exc, match=match):
            call(x, w, b)


def test_backend_selection_and_fallback(monkeypatch):
    x = torch.randn(1, 4, 5, 5)
    assert _backend.choose("max_pool2d", x.device, x, 3, 2, 1).backend in ("torch", "triton")
    with fastres.use_backend("torch"):
        assert fastres.get_backend() == "torch"
        assert _backend.choose("max_pool2d", x.device, x, 3, 2, 1).backend == "torch"
    with pytest.raises(ValueError, match="backend must be one of"):
        fastres.set_backend("tpu")
    with pytest.raises(TypeError, match="must be a string"):  # (an AttributeError before)
        fastres.set_backend(1)
    with pytest.raises(TypeError, match="must be a string"):
        fastres.use_backend(None).__enter__()
    monkeypatch.setenv("FASTRES_BACKEND", "gpu")  # the error names the variable
    with pytest.raises(ValueError, match="FASTRES_BACKEND environment variable .* 'gpu'"):
        fastres.get_backend()
    monkeypatch.setenv("FASTRES_BACKEND", "cuda")
    monkeypatch.setattr(_backend, "_global_backend", None)
    _backend._warned.clear()
    with pytest.warns(RuntimeWarning, match="falling back"):
        impl = _backend.choose("max_pool2d", x.device, x, 3, 2, 1)
    # cuda -> triton -> torch: the next in the chain that runs a CPU call (Triton when it is
    # interpreted here, as the conftest sets up), not straight to the reference
    interpreted = _backend.triton_interpreted() and _backend.interpreter_problem() is None
    assert impl.backend == ("triton" if interpreted else "torch")
    assert_close_rel(impl.fn(x, 3, 2, 1), F.max_pool2d(x, 3, 2, 1), 0.0, "fallback pool")


def test_an_implementation_that_declines_a_call_is_not_chosen(monkeypatch):
    """An implementation whose ``supports`` gives a reason is passed over, in the ``auto``
    order and when named (which says why, once), and the call runs the next one."""
    x = torch.randn(1, 4, 5, 5)
    # (the conftest sets TRITON_INTERPRET=1; some Triton/numpy pairs cannot interpret)
    if not _backend.triton_interpreted() or _backend.interpreter_problem() is not None:
        pytest.skip(f"Triton cannot run on the CPU here: "
                    f"{_backend.interpreter_problem() or 'TRITON_INTERPRET is not set'}")
    calls = []

    def declined(*args):
        calls.append(1)
        raise AssertionError("a declined implementation ran")

    _backend.implementations("max_pool2d")  # (the optional backends loaded first)
    monkeypatch.setitem(_backend._IMPLS, "max_pool2d", dict(_backend._IMPLS["max_pool2d"]))
    monkeypatch.setattr(_backend, "_warned", set())
    _backend.register_impl("max_pool2d", "triton", declined,
                           lambda *a, **k: "declined by the test")
    with fastres.use_backend("auto"):  # (the test session's default is "torch")
        assert _backend.choose("max_pool2d", x.device, x, 3, 2, 1).backend == "torch"
    with fastres.use_backend("triton"), pytest.warns(RuntimeWarning,
                                                      match="declined by the test"):
        impl = _backend.choose("max_pool2d", x.device, x, 3, 2, 1)
    assert impl.backend == "torch" and not calls
    assert_close_rel(impl.fn(x, 3, 2, 1), F.max_pool2d(x, 3, 2, 1), 0.0, "the next one")


@pytest.mark.parametrize("triton_v, numpy_v, rejects, broken", [
    ("3.6.0", "2.4.6", True, True),      # seen: every kernel with a runtime loop bound fails
    ("3.6.0", "2.2.6", False, False),    # seen: the CPU suite passes
    ("3.5.1+git1234", "2.3.0", True, True),
    ("3.7.0", "2.4.6", True, False),     # 3.7 squeezes the array before int()
    ("3.8.0", "2.4.6", True, False),     # seen: the CPU suite passes
    ("3.10.0", "2.4.6", True, False),
])
def test_interpreter_problem_versions(triton_v, numpy_v, rejects, broken):
    why = _backend.interpreter_problem_for(triton_v, numpy_v, rejects)
    assert (why is not None) == broken
    if broken:
        assert triton_v in why and numpy_v in why and "numpy<2.3" in why


def test_interpreter_probe_is_quiet_under_warnings_as_errors(monkeypatch):
    """NumPy 1.25 to 2.2 deprecate ``int()`` of a 1-element array (a DeprecationWarning, which
    ``-W error`` makes an exception): the probe neither warns nor raises, and reads it as
    accepted."""
    import warnings

    import numpy

    class DeprecatedInt:  # what such a NumPy's 1-element array does on int()
        def __int__(self):
            warnings.warn("Conversion of an array with ndim > 0 to a scalar is deprecated",
                          DeprecationWarning)
            return 0

    monkeypatch.setattr(numpy, "zeros", lambda *a, **k: DeprecatedInt())
    _backend._interpreter_problem.cache_clear()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert _backend.interpreter_problem() is None
    finally:
        monkeypatch.undo()
        _backend._interpreter_problem.cache_clear()


def test_broken_interpreter_falls_back_to_torch_and_says_why(monkeypatch):
    """Under an interpreter that cannot run the kernels, CPU calls run the reference and say
    why (``TRITON_INTERPRET=1`` asked for Triton on the CPU), under ``auto`` as under a named
    ``triton`` backend, instead of failing inside the interpreter."""
    why = _backend.interpreter_problem_for("3.6.0", "2.4.6", True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(_backend, "_interpreter_problem", lambda: why)
    x = torch.randn(1, 4, 5, 5)
    _backend._warned.clear()
    with fastres.use_backend("auto"), pytest.warns(RuntimeWarning, match="numpy<2.3"):
        assert _backend.choose("max_pool2d", x.device, x, 3, 2, 1).backend == "torch"
    _backend._warned.clear()
    with fastres.use_backend("triton"), pytest.warns(RuntimeWarning, match="numpy<2.3"):
        impl = _backend.choose("max_pool2d", x.device, x, 3, 2, 1)
    assert impl.backend == "torch"
    y = impl.fn(x, 3, 2, 1)
    assert torch.equal(y, F.max_pool2d(x, 3, 2, 1))


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 3), cin_g=st.integers(1, 6), cout_g=st.integers(1, 6),
       groups=st.integers(1, 3), k=st.sampled_from([1, 3, 5, 7]),
       stride=st.integers(1, 3), dil=st.integers(1, 3), pad=st.integers(0, 3),
       h=st.integers(1, 14), w=st.integers(1, 14), relu=st.booleans(),
       residual=st.booleans())
def test_conv_bias_act_shapes_property(n, cin_g, cout_g, groups, k, stride, dil, pad, h,
                                       w, relu, residual):
    """Any valid conv geometry: same shape and values as F.conv2d + bias (+ res) (+ ReLU)."""
    from fastres.ops._checks import conv_output_size

    p, q = conv_output_size(h, w, k, k, (stride,) * 2, (pad,) * 2, (dil,) * 2)
    x = torch.randn(n, cin_g * groups, h, w)
    wt = torch.randn(cout_g * groups, cin_g, k, k)
    b = torch.randn(cout_g * groups)
    if p < 1 or q < 1:
        with pytest.raises(ValueError, match="too small"):
            ops.conv_bias_act(x, wt, b, stride, pad, dil, groups)
        return
    res = torch.randn(n, cout_g * groups, p, q) if residual else None
    with fastres.use_backend("torch"):
        out = ops.conv_bias_act(x, wt, b, stride, pad, dil, groups, res, relu)
    ref = F.conv2d(x.double(), wt.double(), b.double(), stride, pad, dil, groups)
    # fp32 rounding is relative to the size of the terms summed, not of their sum: where
    # x*w, the bias and the residual nearly cancel (a one-element output is a common
    # draw), eager F.conv2d in fp32 is itself 1e-4 off relative to the result. So the bound
    # is 1e-5 of the magnitude |x|*|w| + |b| (+ |res|); any wrong index, term or ReLU
    # still misses it by orders of magnitude.
    mag = F.conv2d(x.double().abs(), wt.double().abs(), b.double().abs(), stride, pad,
                   dil, groups)
    if residual:
        ref = ref + res.double()
        mag = mag + res.double().abs()
    if relu:
        ref = ref.relu()
    assert out.shape == ref.shape
    cond = float(torch.linalg.vector_norm(mag)
                 / torch.linalg.vector_norm(ref).clamp_min(1e-30))
    assert_close_rel(out, ref, 1e-5 * max(1.0, cond), "conv_bias_act property")


def test_conv_bias_none_means_zeros():
    x, w = torch.randn(2, 6, 9, 9), torch.randn(4, 6, 3, 3)
    y = ops.conv_bias_act(x, w, None, padding=1, relu=False)
    assert_close_rel(y, F.conv2d(x.double(), w.double(), None, 1, 1), 1e-5)
    # the stem and the head too (they failed with AttributeError on None)
    x, w = torch.randn(2, 3, 17, 15), torch.randn(8, 3, 7, 7)
    ref = F.max_pool2d(F.conv2d(x.double(), w.double(), None, 2, 3).relu(), 3, 2, 1)
    assert_close_rel(ops.stem(x, w, None), ref, 1e-5, "stem, bias None")
    w = torch.randn(5, 3)
    assert_close_rel(ops.avgpool_linear(x, w, None), x.double().mean((2, 3)) @ w.double().t(),
                     1e-5, "head, bias None")


_OPCHECK_CASES = [  # (op, dtype, N, C_in, H, W): odd sizes, batch 0 and 1, every op
    ("conv", torch.float32, 2, 4, 7, 5), ("conv", torch.bfloat16, 1, 4, 9, 9),
    ("conv", torch.float16, 0, 4, 5, 5), ("stem", torch.float32, 2, 3, 17, 15),
    ("stem", torch.bfloat16, 0, 3, 9, 9), ("stem", torch.float32, 1, 3, 16, 18),
    ("stem", torch.float16, 1, 3, 2, 3), ("pool", torch.float32, 2, 4, 9, 7),
    ("pool", torch.float16, 1, 5, 2, 2), ("head", torch.bfloat16, 2, 4, 3, 5),
    ("head", torch.float32, 0, 4, 1, 1), ("preprocess", torch.bfloat16, 2, 3, 5, 7),
    ("preprocess", torch.float32, 0, 3, 3, 3),
]


@pytest.mark.parametrize("kind, dtype, n, c, h, w", _OPCHECK_CASES)
def test_opcheck_every_op(kind, dtype, n, c, h, w):
    """``torch.library.opcheck`` (schema, fake vs real, autograd registration, dynamic shapes)
    on every ``fastres.*`` op, not only the three the model's graph uses most."""
    x = torch.randn(n, c, h, w, dtype=dtype)
    cl = torch.channels_last
    if kind == "conv":
        wt = torch.randn(6, c // 2, 3, 3, dtype=dtype).contiguous(memory_format=cl)
        p, q = (h + 4 - 4 - 1) // 2 + 1, (w + 4 - 4 - 1) // 2 + 1
        res = torch.randn(n, 6, p, q, dtype=dtype)
        op, args = torch.ops.fastres.conv_bias_act.default, (
            x, wt, torch.randn(6), [2, 2], [2, 2], [2, 2], 2, res, False)
    elif kind == "stem":
        op, args = torch.ops.fastres.stem.default, (
            x, torch.randn(5, c, 7, 7, dtype=dtype).contiguous(memory_format=cl),
            torch.randn(5))
    elif kind == "pool":
        op, args = torch.ops.fastres.max_pool2d.default, (x, 3, 2, 1)
    elif kind == "head":
        op, args = torch.ops.fastres.avgpool_linear.default, (
            x, torch.randn(7, c, dtype=dtype), torch.randn(7))
    else:
        images = torch.randint(0, 256, (n, h, w, c), dtype=torch.uint8)
        op, args = torch.ops.fastres.preprocess.default, (
            images, "NHWC", torch.rand(3).tolist(), (torch.rand(3) + 0.1).tolist(), dtype)
    with fastres.use_backend("torch"):
        torch.library.opcheck(op, args)


def test_help_shows_each_ops_contract():
    """The functions shadow their modules in fastres.ops, so help() showed only "see the
    module docstring": the contract is now part of each function's docstring."""
    import sys

    for fn in (ops.conv_bias_act, ops.stem, ops.max_pool2d, ops.avgpool_linear, ops.preprocess):
        assert sys.modules[fn.__module__].__doc__ in fn.__doc__, fn.__name__
        assert "Contract" in fn.__doc__, fn.__name__


_INTERPRET_LATE = r"""
import os, sys, warnings
import torch, torch.nn.functional as F
import fastres
from fastres.ops import _backend
x = torch.randn(1, 4, 9, 9)
w, b = torch.randn(6, 4, 3, 3), torch.randn(6)
ref = F.relu(F.conv2d(x, w, b, padding=1))
def check(tag):
    for pref in ("auto", "triton"):
        with warnings.catch_warnings(), fastres.use_backend(pref):
            warnings.simplefilter("ignore")
            y = torch.ops.fastres.conv_bias_act(x, w, b, [1, 1], [1, 1], [1, 1], 1, None, True)
        err = ((y - ref).abs().max() / ref.abs().max()).item()
        assert err < 5e-3, (tag, pref, err)
    m = fastres.resnet18(num_classes=10).eval()
    with torch.no_grad():
        assert m(torch.randn(1, 3, 32, 32)).shape == (1, 10), tag
check("first")
_backend.implementations("conv_bias_act")   # the Triton kernels are defined now
os.environ["TRITON_INTERPRET"] = sys.argv[1]
check("after")
with fastres.use_backend("auto"):
    impl = _backend.choose("conv_bias_act", x.device, x, w, b, [1, 1], [1, 1], [1, 1], 1, None,
                           True)
print("CHOSEN", impl.backend, _backend.interpreter_problem() is None)
print("OK", _backend.kernels_interpreted(), _backend.triton_interpreted())
"""


@pytest.mark.parametrize("at_start, later, interpreted", [
    ("false", "false", False),   # Triton reads false/off/no as off: compiled-mode kernels
    ("off", "1", False),         # set after the kernels were defined compiled: not used on CPU
    (None, "1", False),
    ("1", "0", True),            # interpreted kernels, unset later: CPU runs the reference
])
def test_triton_interpret_is_read_as_triton_reads_it(at_start, later, interpreted):
    """CPU calls go to the Triton kernels only when they were defined interpreted and
    ``TRITON_INTERPRET`` (read as Triton reads it) is on. ``TRITON_INTERPRET=false`` used to
    count as on, and setting it after the kernels were defined sent CPU tensors to
    compiled-mode kernels: every op and the model failed ("0 active drivers")."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET",
                                                            "FASTRES_BACKEND")}
    if at_start is not None:
        env["TRITON_INTERPRET"] = at_start
    r = subprocess.run([sys.executable, "-c", _INTERPRET_LATE, later], capture_output=True,
                       text=True, timeout=600, env=env, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"OK {interpreted} {interpreted and later == '1'}" in r.stdout
    # what "auto" picks for a CPU call now: the interpreted kernels only while the variable
    # is on (and this Triton/NumPy pair can interpret), else the reference
    chosen = r.stdout.split("CHOSEN ", 1)[1].split()
    want = "triton" if interpreted and later == "1" and chosen[1] == "True" else "torch"
    assert chosen[0] == want, (r.stdout, want)
