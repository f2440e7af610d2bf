"""The compiled extension ``fastres._C`` (``torch.ops.fastres_C.*``) against the op references.

CPU (runs wherever the extension is built, GPU or not): every op's CPU implementation, which
runs the same per-element bodies (csrc/bodies.h) over the same grid as the CUDA kernels (for the
1x1 convolution: the same operand views, with a host GEMM in place of cuBLASLt), against a
float64 reference; fresh random inputs, odd sizes, every dtype and memory format; hypothesis
property tests over every batch, size, channel count, dtype, memory layout (strided views,
stride-0 batches) and argument each op accepts; opcheck; registration with the backend
registry.

GPU (``@pytest.mark.cuda``): every CUDA implementation (fused stem, preprocess, head, cuBLASLt
1x1 convolution with/without residual and ReLU, strided, fp16/bf16/tf32/fp32) against the
reference, through the ``fastres`` ops with ``use_backend("cuda")``, and ResNet-50 end to end
against torchvision.
"""

from __future__ import annotations

import itertools
import re
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import HAS_CUDA, assert_close_rel, in_layout, rel_err
from hypothesis import given, settings
from hypothesis import strategies as st

import fastres
from fastres import _ext
from fastres.ops import _backend
from fastres.ops.preprocess import IMAGENET_MEAN, IMAGENET_STD, preprocess, preprocess_reference

needs_ext = pytest.mark.skipif(not _ext.available(),
                               reason=f"fastres._C not built: {_ext.error()}")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Relative error against a float64 reference of the same (dtype-rounded) inputs; the output
# rounding alone is ~2^-9 (bf16) / 2^-12 (fp16) relative per element.
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
MEAN, STD = list(IMAGENET_MEAN), list(IMAGENET_STD)


def _fmt(t: torch.Tensor, fmt: str) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last) if fmt == "cl" else t.contiguous()


def stem_f64(x, w, b):
    """The stem in float64: conv 7x7/2 pad 3 + bias + ReLU + max-pool 3x3/2 pad 1."""
    y = F.conv2d(x.double(), w.double(), b.double(), 2, 3)
    return F.max_pool2d(torch.relu(y), 3, 2, 1)


def head_f64(x, w, b):
    """Contract of avgpool_linear: fp32 mean rounded to x's dtype, then the linear layer."""
    pooled = x.float().mean(dim=(2, 3)).to(x.dtype).double()
    return pooled @ w.double().t() + b.to(x.dtype).double()


def conv1x1_f64(x, w, b, stride, residual, relu):
    y = F.conv2d(x.double(), w.double(), b.double(), stride)
    if residual is not None:
        y = y + residual.double()
    return torch.relu(y) if relu else y


# -- registration and import ------------------------------------------------------------------

def test_import_never_crashes():
    # available() and error() agree, and neither raises whether or not _C is built.
    assert _ext.available() == (_ext.error() is None)
    assert _ext.load() is _ext.load()


@needs_ext
def test_ops_registered():
    for op in _ext.OPS:
        assert hasattr(torch.ops.fastres_C, op), op
    impls = {op: _backend.implementations(op) for op in
             ("stem", "conv_bias_act", "avgpool_linear", "preprocess")}
    for op, by_backend in impls.items():
        assert "cuda" in by_backend and "torch" in by_backend, (op, sorted(by_backend))


@needs_ext
def test_tensor_state_reads_each_version_and_data_pointer():
    """``fastres._C.tensor_state`` (the plan cache's per-forward check of the parameters and
    buffers): each tensor's version counter (-1 for an inference tensor) and data pointer, as
    native int64 pairs, equal to the values read in Python; an in-place edit, a ``.data`` swap
    and a view's edit of its base change it; what it cannot read raises."""
    state = _ext.load().tensor_state
    p = torch.nn.Parameter(torch.randn(3, 4))
    b = torch.randn(5, dtype=torch.float16)
    b.add_(1)
    with torch.inference_mode():
        inf = torch.randn(2)
    ts = [p, b, inf, p, b[1:]]

    def read():
        return np.array([[-1 if t.is_inference() else t._version, t.data_ptr()] for t in ts],
                        dtype=np.int64).tobytes()

    assert state(ts) == read() and state([]) == b""
    seen = {state(ts)}
    with torch.no_grad():
        p.mul_(2)
    seen.add(state(ts))
    p.data = torch.randn(3, 4)  # new storage, same version
    seen.add(state(ts))
    ts[-1].add_(1)  # a view shares its base's version counter
    seen.add(state(ts))
    assert len(seen) == 4 and state(ts) == read()
    with pytest.raises(TypeError, match="expects a list of tensors, got tuple"):
        state(tuple(ts))
    with pytest.raises(TypeError, match="element 1 is a int, not a tensor"):
        state([p, 3])
    with pytest.raises(RuntimeError):  # no storage
        state([torch.zeros(2, 2).to_sparse()])


@needs_ext
def test_slots_hold_checks_each_slot_by_identity():
    """``fastres._C.slots_hold`` (the plan cache's per-forward check that each module slot
    still holds the tensor the plan was folded from): ``dicts[i].get(names[i]) is held[i]``
    for every i, as Python's ``dict.get`` reads it; a swap that registers nothing (a tensor
    put straight into ``_buffers``) is seen; bad arguments raise."""
    hold = _ext.load().slots_hold
    conv, bn = torch.nn.Conv2d(2, 3, 1, bias=False), torch.nn.BatchNorm2d(3)
    dicts = [conv._parameters, conv._parameters, bn._buffers]
    names = ["weight", "bias", "running_mean"]
    held = [conv.weight, None, bn.running_mean]

    def python(held):
        return all(dict.get(d, n) is t for d, n, t in zip(dicts, names, held))

    assert hold(dicts, names, held) is True is python(held) and hold([], [], []) is True
    other = [conv.weight, None, bn.running_var]
    assert hold(dicts, names, other) is False is python(other)
    bn._buffers["running_mean"] = bn.running_mean.clone()
    assert hold(dicts, names, held) is False is python(held)
    now = [conv.weight, None, bn.running_mean]
    assert hold(dicts, names, now) is True is python(now)
    assert hold([{}], ["gone"], [None]) is True  # a missing name reads as None

    class Remapped(dict):  # dict.get does not call a subclass's __getitem__: nor does this
        def __getitem__(self, key):
            return None

    assert hold([Remapped(w=conv.weight)], ["w"], [conv.weight]) is True
    with pytest.raises(TypeError, match="element 0 of dicts is a list, not a dict"):
        hold([[]], ["w"], [None])
    with pytest.raises(ValueError, match="lists of 2, 1 and 1 elements"):
        hold([{}, {}], ["w"], [None])
    with pytest.raises(TypeError):
        hold(tuple(dicts), names, held)
    with pytest.raises(TypeError):  # an unhashable name
        hold([{}], [[1]], [None])


@needs_ext
def test_slots_hold_survives_a_lookup_that_changes_its_lists():
    """A lookup runs Python code for a key that is not a plain str (its ``__eq__`` on a hash
    collision): code that empties the lists there made ``slots_hold`` read past their ends
    (it kept their first length). Now the answer is False (not held: the plan rebuilds),
    and a raising ``__eq__`` raises."""
    hold = _ext.load().slots_hold
    w = torch.nn.Parameter(torch.randn(3))
    n = int(torch.randint(2, 9, ()))

    lists = []  # (filled once the dicts are built: building them compares keys too)

    class Meddling(str):
        def __hash__(self):
            return hash("weight")

        def __eq__(self, other):
            for each in lists:
                each.clear()
            return False

    # the name hashes like the dict's other key, so the lookup compares the two
    dicts = [{Meddling("odd"): 1, "weight": w} for _ in range(n)]
    names, held = [Meddling("odd")] * n, [1] * n
    lists += [dicts, names, held]
    assert hold(dicts, names, held) is False and dicts == names == held == []

    class Raising(Meddling):
        __hash__ = Meddling.__hash__  # (a class that defines __eq__ alone is unhashable)

        def __eq__(self, other):
            raise KeyError("from __eq__")

    with pytest.raises(KeyError, match="from __eq__"):
        hold([{Raising("a"): 1, "weight": w}], ["weight"], [w])


def test_supports_conv1x1_reasons():
    from fastres._ext_impls import supports_conv1x1

    x = torch.randn(1, 8, 5, 5)
    b = torch.zeros(4)
    w1 = torch.randn(4, 8, 1, 1)
    assert supports_conv1x1(x, w1, b, [1, 1], [0, 0], [1, 1], 1) is None
    assert supports_conv1x1(x, w1, b, [2, 2], [0, 0], [1, 1], 1) is None
    assert "1x1" in supports_conv1x1(x, torch.randn(4, 8, 3, 3), b, [1, 1], [1, 1], [1, 1], 1)
    assert "groups" in supports_conv1x1(x, torch.randn(4, 4, 1, 1), b, [1, 1], [0, 0], [1, 1], 2)
    assert "padding" in supports_conv1x1(x, w1, b, [1, 1], [1, 1], [1, 1], 1)
    assert "bias" in supports_conv1x1(x, w1, b.half(), [1, 1], [0, 0], [1, 1], 1)
    assert "16-byte" in supports_conv1x1(torch.randn(1, 3, 5, 5), torch.randn(4, 3, 1, 1), b,
                                         [1, 1], [0, 0], [1, 1], 1)
    # each dimension on its own: the CUDA op takes one stride and no padding, so a call it
    # accepted here would run with stride [1, 1] and padding [0, 0], silently wrong
    assert "square" in supports_conv1x1(x, w1, b, [1, 2], [0, 0], [1, 1], 1)
    assert "padding" in supports_conv1x1(x, w1, b, [1, 1], [0, 1], [1, 1], 1)
    assert "padding" in supports_conv1x1(x, w1, b, [1, 1], [1, 0], [1, 1], 1)
    assert "dtype" in supports_conv1x1(x.double(), w1.double(), b, [1, 1], [0, 0], [1, 1], 1)
    # C_in fits 16-byte rows, C_out does not
    assert "16-byte" in supports_conv1x1(x, torch.randn(3, 8, 1, 1), torch.zeros(3), [1, 1],
                                         [0, 0], [1, 1], 1)
    assert supports_conv1x1(x.half(), torch.randn(8, 8, 1, 1).half(), torch.zeros(8), [1, 1],
                            [0, 0], [1, 1], 1) is None


# -- preprocess: contract wrapper ---------------------------------------------------------------

def _images(n, h, w, layout):
    img = torch.randint(0, 256, (n, h, w, 3), dtype=torch.uint8)
    return img if layout == "NHWC" else img.permute(0, 3, 1, 2).contiguous()


@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_preprocess_reference_matches_torchvision_recipe(layout, dtype):
    img = _images(2, 5, 7, layout)
    nchw = img.permute(0, 3, 1, 2) if layout == "NHWC" else img
    x = nchw.double() / 255.0
    m = torch.tensor(MEAN, dtype=torch.float64).view(1, 3, 1, 1)
    s = torch.tensor(STD, dtype=torch.float64).view(1, 3, 1, 1)
    out = preprocess(img, layout, MEAN, STD, dtype)
    assert out.shape == (2, 3, 5, 7) and out.dtype == dtype
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert_close_rel(out, (x - m) / s, TOL[dtype] if dtype != torch.float32 else 1e-6)


@pytest.mark.parametrize("bad,exc,msg", [
    (lambda: preprocess(torch.zeros(1, 4, 4, 3)), TypeError, "uint8"),
    (lambda: preprocess(torch.zeros(1, 4, 4, 3, dtype=torch.uint8), "HWC"), ValueError, "layout"),
    (lambda: preprocess(torch.zeros(1, 4, 4, 4, dtype=torch.uint8)), ValueError, "[N, H, W, 3]"),
    (lambda: preprocess(torch.zeros(1, 4, 4, dtype=torch.uint8)), ValueError, "4-D"),
    (lambda: preprocess(torch.zeros(1, 2, 2, 3, dtype=torch.uint8), std=(1, 0, 1)), ValueError,
     "non-zero"),
    (lambda: preprocess(torch.zeros(1, 2, 2, 3, dtype=torch.uint8), mean=(1, 2)), ValueError,
     "3 values"),
    # non-zero and finite as doubles, but 0 and inf in float32, where the division runs
    # (they gave -inf/inf silently; torchvision's Normalize refuses them)
    (lambda: preprocess(torch.zeros(1, 2, 2, 3, dtype=torch.uint8), std=(1e-50, 0.2, 0.2)),
     ValueError, "non-zero in float32"),
    (lambda: preprocess(torch.zeros(1, 2, 2, 3, dtype=torch.uint8), std=(0.2, 1e39, 0.2)),
     ValueError, "finite and non-zero in float32"),
    (lambda: preprocess(torch.zeros(1, 2, 2, 3, dtype=torch.uint8).to_sparse()), TypeError,
     "images must be a dense .strided. tensor, got layout torch.sparse_coo"),
    (lambda: preprocess(torch.zeros(1, 2, 2, 3, dtype=torch.uint8), dtype=torch.int32),
     TypeError, "dtype"),
    # mean/std that are not numbers ("'float' object is not iterable", or strings and bools
    # taken as numbers)
    (lambda: preprocess(torch.zeros(1, 2, 2, 3, dtype=torch.uint8), mean=0.5), TypeError,
     "mean must be a sequence of 3 numbers"),
    (lambda: preprocess(torch.zeros(1, 2, 2, 3, dtype=torch.uint8), std=None), TypeError,
     "std must be a sequence of 3 numbers"),
    (lambda: preprocess(torch.zeros(1, 2, 2, 3, dtype=torch.uint8), mean=("0.1", "0.2", "0.3")),
     TypeError, "mean must be a sequence of 3 numbers"),
    (lambda: preprocess(torch.zeros(1, 2, 2, 3, dtype=torch.uint8), std=(True, True, True)),
     TypeError, "std must be a sequence of 3 numbers"),
    # 0-d tensors and arrays ("iteration over a 0-d tensor"), an int beyond float's range
    # (OverflowError), a 2-D tensor
    (lambda: preprocess(torch.zeros(1, 2, 2, 3, dtype=torch.uint8), mean=torch.tensor(0.5)),
     TypeError, "mean must be a sequence of 3 numbers, got tensor.0.5000."),
    (lambda: preprocess(torch.zeros(1, 2, 2, 3, dtype=torch.uint8), std=np.array(0.5)),
     TypeError, "std must be a sequence of 3 numbers, got array.0.5."),
    (lambda: preprocess(torch.zeros(1, 2, 2, 3, dtype=torch.uint8), mean=[10**400, 0, 0]),
     ValueError, "mean must hold numbers within float range, got [1000"),
    (lambda: preprocess(torch.zeros(1, 2, 2, 3, dtype=torch.uint8), mean=torch.zeros(1, 3)),
     TypeError, "mean must be a sequence of 3 numbers"),
])
def test_preprocess_argument_errors(bad, exc, msg):
    with pytest.raises(exc, match=msg.replace("[", r"\[").replace("]", r"\]")):
        bad()


def test_preprocess_compiles_and_exports():
    img = _images(2, 6, 5, "NHWC")
    ref = preprocess_reference(img, "NHWC", MEAN, STD, torch.float16)
    fn = torch.compile(lambda t: preprocess(t, "NHWC", MEAN, STD, torch.float16),
                       backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(fn(img), ref, rtol=0, atol=0)

    class Pre(torch.nn.Module):  # (the name promised an export, which was never made)
        def forward(self, t):
            return preprocess(t, "NHWC", MEAN, STD, torch.float16)

    ep = torch.export.export(Pre(), (img,))
    assert any("fastres.preprocess" in str(n.target) for n in ep.graph.nodes)
    other = _images(2, 6, 5, "NHWC")
    out = ep.module()(other)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, preprocess_reference(other, "NHWC", MEAN, STD,
                                                         torch.float16), rtol=0, atol=0)


# -- CPU implementations of the compiled ops -------------------------------------------------------

@needs_ext
@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,h,w", [(2, 5, 7), (1, 13, 3), (3, 1, 1)])
def test_preprocess_cpu_exact(layout, dtype, n, h, w):
    img = _images(n, h, w, layout)
    mean = torch.rand(3).tolist()
    std = (torch.rand(3) + 0.1).tolist()
    out = torch.ops.fastres_C.preprocess(img, layout, mean, std, dtype)
    ref = preprocess_reference(img, layout, mean, std, dtype)
    assert out.is_contiguous(memory_format=torch.channels_last)
    # Same fp32 operations in the same order, one rounding: bit-identical.
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


@needs_ext
def test_preprocess_cpu_strided_input():
    big = torch.randint(0, 256, (3, 9, 11, 4), dtype=torch.uint8)
    img = big[::2, 1::2, ::3, :3]  # non-contiguous NHWC view
    out = torch.ops.fastres_C.preprocess(img, "NHWC", MEAN, STD, torch.float32)
    torch.testing.assert_close(out, preprocess_reference(img.contiguous(), "NHWC", MEAN, STD,
                                                         torch.float32), rtol=0, atol=0)


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("xfmt", ["contig", "cl"])
@pytest.mark.parametrize("n,h,w,cout", [
    (2, 37, 45, 64),   # several tiles, partial last tile in both directions
    (1, 1, 1, 64),     # 1x1 input: one conv pixel, one pooled pixel
    (3, 8, 9, 70),     # two channel chunks, the second partial
    (1, 2, 66, 5),     # one row, many columns; C_out < chunk
    (1, 35, 30, 64),   # odd/even mix
])
def test_stem_cpu(dtype, xfmt, n, h, w, cout):
    x = _fmt(torch.randn(n, 3, h, w), xfmt).to(dtype)
    wt = (torch.randn(cout, 3, 7, 7) * 0.2).to(dtype).contiguous(memory_format=torch.channels_last)
    b = torch.randn(cout)
    out = torch.ops.fastres_C.stem(x, wt, b)
    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)
    assert_close_rel(out, stem_f64(x, wt, b), TOL[dtype], f"stem {dtype} {tuple(x.shape)}")


@needs_ext
def test_stem_cpu_general_cin_and_weight_layout():
    x = torch.randn(2, 5, 19, 23)  # C_in != 3 (the CPU path takes any C_in)
    wt = torch.randn(7, 7, 5, 16).permute(3, 2, 0, 1)  # weirdly strided weight
    b = torch.randn(16)
    assert_close_rel(torch.ops.fastres_C.stem(x, wt, b), stem_f64(x, wt, b), 1e-5)


@needs_ext
def test_stem_cpu_nan_propagates_like_pytorch():
    x = torch.randn(1, 3, 29, 31)
    x[0, 1, 10, 12] = float("nan")
    wt = torch.randn(8, 3, 7, 7) * 0.2
    b = torch.randn(8)
    out = torch.ops.fastres_C.stem(x, wt, b)
    ref = stem_f64(x, wt, b)
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    assert torch.isnan(out).any()
    assert rel_err(out, ref) <= 1e-5


@needs_ext
def test_stem_shared_memory_limit_is_checked_before_choosing_it():
    """The fused stem keeps C_in*7*7*64 fp32 weights and a patch in shared memory: 87824 bytes
    for C_in=3 (in the limit of H100, A100 and consumer GPUs, not of a T4's 64 KiB) and
    168480 for C_in=8 (over an A100's 166912). Over the limit the op is not chosen (it
    used to raise there)."""
    from fastres import _ext_impls

    need3, need8 = (torch.ops.fastres_C.stem_smem_bytes(c) for c in (3, 8))
    assert need3 == 4 * (64 * 3 * 49 + 64 + 4 * -(-897 * 3 // 4) + 9792) == 87824
    assert need8 == 168480
    assert _ext_impls.stem_smem_reason(3, 232448) is None        # H100
    assert _ext_impls.stem_smem_reason(8, 232448) is None
    assert "166912" in _ext_impls.stem_smem_reason(8, 166912)     # A100
    assert _ext_impls.stem_smem_reason(3, 166912) is None
    assert "65536" in _ext_impls.stem_smem_reason(3, 65536)       # T4
    assert _ext_impls.stem_smem_reason(3, None) is None           # limit unknown: the op checks
    with pytest.raises(RuntimeError, match="cin must be >= 1"):
        torch.ops.fastres_C.stem_smem_bytes(0)


@needs_ext
def test_stem_declines_what_the_cuda_op_refuses():
    """csrc's hard limits (every input dimension below 2^30, C_out at most 65535 x 64) are
    checked before the fused stem is chosen: past them the op raised instead of another
    implementation running. (Meta tensors: nothing is allocated.)"""
    from fastres import _ext_impls

    w, b = torch.empty(64, 3, 7, 7, device="meta"), torch.empty(64, device="meta")
    big = int(torch.randint(2**30, 2**31, ()))
    assert _ext_impls.supports_stem(torch.empty(1, 3, 64, 64, device="meta"), w, b) is None
    why = _ext_impls.supports_stem(torch.empty(1, 3, big, 8, device="meta"), w, b)
    assert why is not None and "2^30" in why, why
    cout = 65535 * 64 + int(torch.randint(1, 100, ()))
    why = _ext_impls.supports_stem(torch.empty(1, 3, 64, 64, device="meta"),
                                   torch.empty(cout, 3, 7, 7, device="meta"),
                                   torch.empty(cout, device="meta"))
    assert why is not None and f"C_out={cout}" in why, why
    # at the limits: 2^30 itself, the widest C_in the kernel holds and the next, an fp16 bias
    why = _ext_impls.supports_stem(torch.empty(1, 3, 8, 2**30, device="meta"), w, b)
    assert why is not None and "2^30" in why, why
    for cin, ok in ((_ext_impls.STEM_MAX_CIN, True), (_ext_impls.STEM_MAX_CIN + 1, False)):
        why = _ext_impls.supports_stem(torch.empty(1, cin, 64, 64, device="meta"),
                                       torch.empty(64, cin, 7, 7, device="meta"), b)
        assert (why is None) == ok and (ok or f"C_in={cin}" in why), (cin, why)
    why = _ext_impls.supports_stem(torch.empty(1, 3, 64, 64, device="meta"), w,
                                   torch.empty(64, device="meta", dtype=torch.float16))
    assert why is not None and "bias dtype" in why, why


@needs_ext
@pytest.mark.parametrize("op", ["stem", "conv1x1", "avgpool_linear"])
def test_compiled_ops_refuse_backward(op):
    """The compiled ops are inference-only. An input that requires grad used to get torch's
    warning fallback: ``backward()`` ran, warned, and left that input's ``.grad`` unset (a
    silently missing gradient). Now backward raises, naming the op; without grad (and for
    inputs that do not require it) the op is what it was."""
    c = int(torch.randint(2, 6, ()))
    if op == "stem":
        x, w, b = torch.randn(1, 3, 11, 11), torch.randn(c, 3, 7, 7), torch.randn(c)
        call = lambda x, w: torch.ops.fastres_C.stem(x, w, b)  # noqa: E731
    elif op == "conv1x1":
        x, w, b = torch.randn(2, c, 5, 5), torch.randn(3, c, 1, 1), torch.randn(3)
        call = lambda x, w: torch.ops.fastres_C.conv1x1(x, w, b, 1, None, True,  # noqa: E731
                                                         False)
    else:
        x, w, b = torch.randn(2, c, 3, 3), torch.randn(4, c), torch.randn(4)
        call = lambda x, w: torch.ops.fastres_C.avgpool_linear(x, w, b, False)  # noqa: E731
    want = call(x, w)
    assert not want.requires_grad
    for grad_x in (True, False):
        xi, wi = x.clone().requires_grad_(grad_x), w.clone().requires_grad_(not grad_x)
        y = call(xi, wi)
        torch.testing.assert_close(y.detach(), want, rtol=0, atol=0)
        with pytest.raises(RuntimeError, match=f"derivative for fastres_C::{op} is not "
                                               "implemented"):
            y.sum().backward()
        assert xi.grad is None and wi.grad is None
        with torch.no_grad():
            assert not call(xi, wi).requires_grad


@needs_ext
def test_a_gpu_the_build_has_no_kernels_for_is_declined(monkeypatch):
    """On a GPU the extension holds no code for (a Volta or Turing card against the default
    sm_80/sm_90 build), its stem, head and preprocessing raised "no kernel image" on every
    call where nothing else was measured (FASTRES_TUNE=0, a named backend). They are now
    declined, saying why, and the next implementation runs. (No GPU here: a CUDA-like
    tensor stands in, and the extension's answer and the device's description are faked.)"""
    from types import SimpleNamespace

    from fastres import _ext_impls

    asked = []

    def available(index):
        asked.append(index)
        return index == 0

    monkeypatch.setattr(torch.ops.fastres_C, "kernels_available", available)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: "Tesla T4")
    _ext_impls.kernels_reason.cache_clear()
    try:
        assert _ext_impls.kernels_reason(0) is None
        why = _ext_impls.kernels_reason(1)
        assert "Tesla T4" in why and "7.5" in why and 'TORCH_CUDA_ARCH_LIST="7.5"' in why, why
        assert _ext_impls.kernels_reason(1) == why and asked == [0, 1]  # asked once per device
        on = {i: SimpleNamespace(is_cuda=True, device=torch.device("cuda", i)) for i in (0, 1)}
        assert _ext_impls.supports_own_kernels(on[0], None, None) is None
        assert _ext_impls.supports_own_kernels(on[1], "NHWC", [0.5], [0.5], None) == why
        monkeypatch.setattr(_ext_impls, "_smem_optin", lambda index: 232448)
        w, b = torch.empty(64, 3, 7, 7), torch.empty(64)
        x = SimpleNamespace(is_cuda=True, device=torch.device("cuda", 1), shape=(1, 3, 64, 64))
        assert _ext_impls.supports_stem(x, w, b) == why
        x.device = torch.device("cuda", 0)
        assert _ext_impls.supports_stem(x, w, b) is None
        assert _ext_impls.supports_own_kernels(torch.empty(1, 2048, 7, 7), None, None) is None
        assert asked == [0, 1]  # (a CPU tensor asks nothing)
    finally:
        _ext_impls.kernels_reason.cache_clear()


@pytest.mark.cuda
@needs_ext
def test_the_build_has_kernels_for_this_gpu():
    from fastres import _ext_impls

    index = torch.cuda.current_device()
    assert torch.ops.fastres_C.kernels_available(index) is True
    assert _ext_impls.kernels_reason(index) is None
    with pytest.raises(RuntimeError, match="no CUDA device"):
        torch.ops.fastres_C.kernels_available(torch.cuda.device_count())


@needs_ext
def test_stem_rejects_c_in_past_32bit_tile_indices():
    """The stem indexes its 49 * C_in * 64 weight floats with 32-bit ints: from C_in = 684785
    on they overflowed (stem_smem_bytes came out negative or far too small, and the kernels
    sized their weight buffer from the wrapped count). Such C_in is refused, before any work."""
    limit = (2**31 - 1) // (49 * 64)
    assert torch.ops.fastres_C.stem_smem_bytes(limit) >= 4 * 49 * 64 * limit
    for cin in (limit + 1, 1369569):  # negative, resp. a wrapped weight count of 1088 floats
        with pytest.raises(RuntimeError, match="cin must be >= 1 and <= 684784"):
            torch.ops.fastres_C.stem_smem_bytes(cin)
    x = torch.randn(1, limit + 1, 1, 1)
    w = torch.zeros(1, 1, 1, 1).expand(1, limit + 1, 7, 7)  # never materialized
    with pytest.raises(RuntimeError, match="C_in = 684785 is too large"):
        torch.ops.fastres_C.stem(x, w, torch.zeros(1))
    assert _ext.STEM_MAX_CIN_INDEX == limit  # the fake's copy of csrc's limit


@needs_ext
def test_stem_cpu_empty_batch():
    out = torch.ops.fastres_C.stem(torch.randn(0, 3, 9, 9), torch.randn(4, 3, 7, 7),
                                   torch.randn(4))
    assert out.shape == (0, 4, 3, 3)


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias_fp32", [True, False])
@pytest.mark.parametrize("n,c,h,w,k", [(3, 40, 5, 3, 13), (2, 64, 7, 7, 10), (1, 5, 1, 1, 3)])
def test_head_cpu(dtype, bias_fp32, n, c, h, w, k):
    x = _fmt(torch.randn(n, c, h, w) + 0.3, "cl").to(dtype)
    wt = (torch.randn(k, c) / c ** 0.5).to(dtype)
    b = torch.randn(k) if bias_fp32 else torch.randn(k).to(dtype)
    out = torch.ops.fastres_C.avgpool_linear(x, wt, b, False)
    assert out.shape == (n, k) and out.dtype == dtype
    assert_close_rel(out, head_f64(x, wt, b), TOL[dtype], f"head {dtype}")


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("xfmt", ["contig", "cl"])
@pytest.mark.parametrize("residual", [None, "contig", "cl"])
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("n,cin,cout,h,w,stride", [
    (2, 16, 24, 7, 9, 1),   # odd spatial size
    (3, 8, 40, 9, 6, 2),    # strided (the downsample), odd H
    (1, 5, 3, 1, 1, 3),     # 1x1 input, stride larger than the input
    (2, 32, 16, 4, 11, 2),  # P != Q
])
def test_conv1x1_cpu(dtype, xfmt, residual, relu, n, cin, cout, h, w, stride):
    """The operands the CUDA path hands cuBLASLt (NHWC views, the strided gather, the residual
    as C), fed to a host GEMM: the layout handling is checked here, the GEMM on a GPU."""
    x = _fmt(torch.randn(n, cin, h, w), xfmt).to(dtype)
    wt = (torch.randn(cout, cin, 1, 1) / cin ** 0.5).to(dtype)
    b = torch.randn(cout)
    p, q = (h - 1) // stride + 1, (w - 1) // stride + 1
    res = None if residual is None else _fmt(torch.randn(n, cout, p, q), residual).to(dtype)
    out = torch.ops.fastres_C.conv1x1(x, wt, b, stride, res, relu, False)
    assert out.shape == (n, cout, p, q) and out.dtype == dtype
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert_close_rel(out, conv1x1_f64(x, wt, b, stride, res, relu), TOL[dtype],
                     f"conv1x1 cpu {dtype}")


@needs_ext
def test_conv1x1_cpu_strided_views_and_empty_batch():
    big = torch.randn(2, 24, 10, 12)
    x = big[:, 4:20, 1:, ::2]  # non-contiguous in every dimension
    wt = torch.randn(12, 32, 1, 1).permute(0, 1, 3, 2)[:, ::2]  # strided weight
    b = torch.randn(12)
    out = torch.ops.fastres_C.conv1x1(x, wt, b, 2, None, False, False)
    assert_close_rel(out, conv1x1_f64(x, wt, b, 2, None, False), 1e-5)
    empty = torch.ops.fastres_C.conv1x1(torch.randn(0, 8, 5, 5), torch.randn(4, 8, 1, 1),
                                        torch.randn(4), 2, torch.randn(0, 4, 3, 3), True, False)
    assert empty.shape == (0, 4, 3, 3)


@needs_ext
def test_conv1x1_cpu_relu_keeps_nan():
    x = torch.randn(1, 8, 3, 3)
    x[0, 2, 1, 1] = float("nan")
    out = torch.ops.fastres_C.conv1x1(x, torch.randn(4, 8, 1, 1), torch.randn(4), 1, None,
                                      True, False)
    assert torch.isnan(out[0, :, 1, 1]).all() and not torch.isnan(out[0, :, 0, 0]).any()


@needs_ext
@pytest.mark.parametrize("call,msg", [
    (lambda: torch.ops.fastres_C.stem(torch.randn(1, 3, 9, 9), torch.randn(4, 3, 7, 7),
                                      torch.randn(4).half()), "bias must be float32"),
    (lambda: torch.ops.fastres_C.stem(torch.randn(1, 3, 9, 9), torch.randn(4, 3, 5, 5),
                                      torch.randn(4)),
     r"weight must be \[C_out >= 1, 3, 7, 7\], got \[4, 3, 5, 5\]$"),
    (lambda: torch.ops.fastres_C.stem(torch.randn(1, 3, 9, 9), torch.randn(4, 3, 7, 7).half(),
                                      torch.randn(4)), "weight dtype must equal"),
    (lambda: torch.ops.fastres_C.stem(torch.randn(3, 9, 9), torch.randn(4, 3, 7, 7),
                                      torch.randn(4)), "4-D"),
    (lambda: torch.ops.fastres_C.preprocess(torch.zeros(1, 2, 2, 3), "NHWC", MEAN, STD,
                                            torch.float32), "uint8"),
    (lambda: torch.ops.fastres_C.preprocess(torch.zeros(1, 2, 2, 3, dtype=torch.uint8), "CHW",
                                            MEAN, STD, torch.float32), "layout"),
    (lambda: torch.ops.fastres_C.preprocess(torch.zeros(1, 2, 2, 3, dtype=torch.uint8), "NHWC",
                                            MEAN, [0.2, 1e-50, 0.2], torch.float32),
     "non-zero in float32"),
    # an empty weight (C_out = 0) is refused as the Python contract and the fakes refuse it
    (lambda: torch.ops.fastres_C.stem(torch.randn(1, 3, 9, 9), torch.randn(0, 3, 7, 7),
                                      torch.randn(0)), r"weight must be \[C_out >= 1, 3, 7, 7\]"),
    (lambda: torch.ops.fastres_C.conv1x1(torch.randn(1, 4, 3, 3), torch.randn(0, 4, 1, 1),
                                         torch.randn(0), 1, None, True, False),
     r"weight must be \[C_out >= 1, 4, 1, 1\]"),
    (lambda: torch.ops.fastres_C.avgpool_linear(torch.randn(1, 4, 2, 2), torch.randn(3, 5),
                                                torch.randn(3), False),
     r"num_classes, 4\], got \[3, 5\]$"),
    (lambda: torch.ops.fastres_C.conv1x1(torch.randn(1, 4, 3, 3), torch.randn(2, 4, 3, 3),
                                         torch.randn(2), 1, None, True, False),
     r"weight must be \[C_out >= 1, 4, 1, 1\], got \[2, 4, 3, 3\]$"),
    (lambda: torch.ops.fastres_C.conv1x1(torch.randn(1, 4, 3, 3), torch.randn(2, 4, 1, 1),
                                         torch.randn(2).half(), 1, None, True, False),
     "bias must be float32"),
    (lambda: torch.ops.fastres_C.conv1x1(torch.randn(1, 4, 3, 3), torch.randn(2, 4, 1, 1),
                                         torch.randn(2), 0, None, True, False),
     "stride must be >= 1, got 0"),
    (lambda: torch.ops.fastres_C.conv1x1(torch.randn(1, 4, 5, 5), torch.randn(2, 4, 1, 1),
                                         torch.randn(2), 2, torch.randn(1, 2, 5, 5), True, False),
     r"residual must be \[1, 2, 3, 3\], got \[1, 2, 5, 5\]$"),
    (lambda: torch.ops.fastres_C.conv1x1(torch.randn(1, 4, 3, 3), torch.randn(2, 4, 1, 1).half(),
                                         torch.randn(2), 1, None, True, False),
     "weight dtype must equal"),
])
def test_cpu_argument_errors(call, msg):
    with pytest.raises(RuntimeError, match=msg):
        call()


@needs_ext
@pytest.mark.parametrize("n", [1, 0], ids=["batch1", "empty_batch"])
@pytest.mark.parametrize("w_cin", [0, 3], ids=["weight_cin0", "weight_cin3"])
@pytest.mark.parametrize("op,name,r", [("stem", "fastres_C::stem", 7),
                                       ("conv1x1", "fastres_C::conv1x1 (CPU)", 1)],
                         ids=["stem", "conv1x1"])
def test_cpu_refuses_zero_input_channels(op, name, r, w_cin, n):
    """C_in = 0 (with a weight that matches it, [C_out, 0, R, S], or not): a convolution over
    no input channels. With a matching weight the ops returned ReLU(bias) at every pixel (an
    empty batch: an empty output), where the Python ops' contract (fastres/ops/_checks.py)
    refuses any x without a channel; they refuse it too, before checking the weight."""
    x, w, b = torch.randn(n, 0, 9, 9), torch.randn(4, w_cin, r, r), torch.randn(4)
    args = (x, w, b) if op == "stem" else (x, w, b, 2, None, True, False)
    msg = f"{name}: x must have at least one input channel (C_in >= 1), got shape [{n}, 0, 9, 9]"
    with pytest.raises(RuntimeError, match=f"^{re.escape(msg)}$"):
        getattr(torch.ops.fastres_C, op)(*args)


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("h,w", [(64, 64), (16, 8)])
def test_head_cpu_mean_of_a_constant_is_exact(dtype, h, w):
    """Each channel constant at a random value with few mantissa bits, over a power-of-two
    window: the sum and the division by H * W are exact, so the pooled feature (read through an
    identity weight, zero bias) is that value exactly. A window count off by one (4095 or 4097
    for 64x64) is a relative error of 2.4e-4, inside the fp16/bf16 tolerances of the tests
    above."""
    c = 6
    vals = torch.randint(-64, 65, (c,)).to(torch.float32) / 16
    x = _fmt(vals.view(1, c, 1, 1).expand(2, c, h, w).contiguous(), "cl").to(dtype)
    out = torch.ops.fastres_C.avgpool_linear(x, torch.eye(c, dtype=dtype), torch.zeros(c),
                                             False)
    torch.testing.assert_close(out, vals.to(dtype).expand(2, c), rtol=0, atol=0)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_head_cpu_rounds_the_bias_to_the_input_dtype(dtype):
    """The head adds its bias rounded to x's dtype, as ``F.linear(pooled, w, b.to(dtype))``
    does. With pooled = w = 1 and b = eps/2 * (1 + eps/4) (exact in float32), b rounds to
    eps/2 and 1 + eps/2 is a tie that rounds to 1; the float32 bias itself, a hair over the
    tie, would round 1 + b up to 1 + eps."""
    eps = torch.finfo(dtype).eps
    b = torch.tensor([eps / 2 * (1 + eps / 4)], dtype=torch.float32)
    x = torch.ones(1, 1, 3, 3, dtype=dtype)
    w = torch.ones(1, 1, dtype=dtype)
    out = torch.ops.fastres_C.avgpool_linear(x, w, b, False)
    ref = F.linear(torch.ones(1, 1, dtype=dtype), w, b.to(dtype))
    assert ref.item() == 1.0
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


@needs_ext
def test_head_cpu_zero_features_is_the_bias():
    """avgpool_linear over C = 0 features is well defined and kept: the pooled [N, 0] features
    times a [K, 0] weight is 0, so the output is the bias (as F.linear with in_features = 0;
    the Python op's contract, check_head_args, accepts it too)."""
    x = torch.randn(3, 0, 4, 5)
    w = torch.randn(6, 0)
    b = torch.randn(6)
    out = torch.ops.fastres_C.avgpool_linear(x, w, b, False)
    torch.testing.assert_close(out, F.linear(x.mean(dim=(2, 3)), w, b), rtol=0, atol=0)
    torch.testing.assert_close(out, b.expand(3, 6), rtol=0, atol=0)


_BAD_EXT_CALLS = {  # name: (op, args, a phrase of both the op's and its fake's message)
    "stem_no_channels": ("stem", lambda: (torch.randn(2, 0, 9, 9), torch.randn(4, 0, 7, 7),
                                          torch.randn(4)), "at least one input channel"),
    "stem_3x3_weight": ("stem", lambda: (torch.randn(2, 3, 9, 9), torch.randn(4, 3, 3, 3),
                                         torch.randn(4)), "weight must be"),
    "conv1x1_3x3_weight": ("conv1x1", lambda: (torch.randn(2, 8, 5, 5), torch.randn(4, 8, 3, 3),
                                               torch.randn(4), 1, None, True, False),
                           "weight must be"),
    "conv1x1_no_channels": ("conv1x1", lambda: (torch.randn(2, 0, 5, 5),
                                                torch.randn(4, 0, 1, 1), torch.randn(4), 1,
                                                None, True, False),
                            "at least one input channel"),
    "conv1x1_residual": ("conv1x1", lambda: (torch.randn(2, 8, 5, 5), torch.randn(4, 8, 1, 1),
                                             torch.randn(4), 2, torch.randn(2, 4, 5, 5), True,
                                             False), "residual must"),
    "head_weight": ("avgpool_linear", lambda: (torch.randn(2, 6, 3, 3), torch.randn(5, 4),
                                               torch.randn(5), False), "weight must be"),
    "preprocess_layout": ("preprocess", lambda: (_images(1, 4, 4, "NHWC"), "NWHC", MEAN, STD,
                                                 torch.float32), "layout must be"),
    # the other way round: the op refused these while its fake returned a shape (a compiled
    # call failed only when it ran), or returned an empty output the fake refused
    "stem_fp16_bias": ("stem", lambda: (torch.randn(2, 3, 9, 9), torch.randn(4, 3, 7, 7),
                                        torch.randn(4).half()), "bias must be float32"),
    "conv1x1_fp64_bias": ("conv1x1", lambda: (torch.randn(2, 8, 5, 5), torch.randn(4, 8, 1, 1),
                                              torch.randn(4).double(), 1, None, True, False),
                          "bias must be float32"),
    "stem_no_output_channels": ("stem", lambda: (torch.randn(2, 3, 9, 9),
                                                 torch.randn(0, 3, 7, 7), torch.randn(0)),
                                "C_out >= 1"),
    "conv1x1_no_output_channels": ("conv1x1", lambda: (torch.randn(2, 8, 5, 5),
                                                       torch.randn(0, 8, 1, 1), torch.randn(0),
                                                       1, None, True, False),
                                   r"weight must be .*>= 1"),
    "stem_7x5_weight": ("stem", lambda: (torch.randn(2, 3, 9, 9), torch.randn(4, 3, 7, 5),
                                         torch.randn(4)),
                        r"weight must be \[C_out >= 1, 3, 7, 7\], got .4, 3, 7, 5."),
    "conv1x1_1x3_weight": ("conv1x1", lambda: (torch.randn(2, 4, 5, 5), torch.randn(2, 4, 1, 3),
                                               torch.randn(2), 1, None, True, False),
                           r"weight must be \[C_.*, 1, 1\], got .2, 4, 1, 3."),
    "head_fp64_bias": ("avgpool_linear", lambda: (torch.randn(2, 6, 3, 3), torch.randn(5, 6),
                                                  torch.randn(5).double(), False),
                       r"bias (dtype )?must be .*float32.*got (Double|torch.float64)"),
    "conv1x1_fp64_residual": ("conv1x1", lambda: (torch.randn(2, 8, 5, 5),
                                                  torch.randn(4, 8, 1, 1), torch.randn(4), 1,
                                                  torch.randn(2, 4, 5, 5).double(), True,
                                                  False), "residual dtype must equal x's"),
    # csrc's 32-bit tile indices (the fake returned a shape for these; the op refused them).
    # 2^30 itself is refused: the message said "too large (max 2^30)" and gave no shape
    "stem_2pow30_wide": ("stem", lambda: (torch.zeros(1, 3, 9, 1).expand(1, 3, 9, 2**30),
                                          torch.randn(4, 3, 7, 7), torch.randn(4)),
                         r"every dimension of x must be below 2\^30 \(32-bit tile indices\), "
                         r"got shape \[1, 3, 9, 1073741824\]"),
    "stem_2pow32_wide": ("stem", lambda: (torch.zeros(1, 3, 9, 1).expand(1, 3, 9, 2**32),
                                          torch.randn(4, 3, 7, 7), torch.randn(4)),
                         r"must be below 2\^30 .*got shape \[1, 3, 9, 4294967296\]"),
    "stem_c_in_past_int32": ("stem", lambda: (torch.randn(1, 684785, 1, 1),
                                              torch.zeros(1, 1, 1, 1).expand(1, 684785, 7, 7),
                                              torch.zeros(1)), "C_in = 684785 is too large"),
}


@needs_ext
@pytest.mark.parametrize("case", sorted(_BAD_EXT_CALLS))
def test_fakes_refuse_what_the_ops_refuse(case):
    """The extension's fake kernels (what torch.compile and FakeTensorMode run) returned a
    shape for arguments the op refuses (a C_in = 0 input, a 3x3 weight for conv1x1); they
    check them as the Python ops' contract does."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    name, make, phrase = _BAD_EXT_CALLS[case]
    op = getattr(torch.ops.fastres_C, name)
    with pytest.raises(RuntimeError, match=phrase):
        op(*make())
    with FakeTensorMode() as mode:
        args = tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in make())
        with pytest.raises((ValueError, TypeError), match=phrase):
            op(*args)


@needs_ext
@pytest.mark.parametrize("case", ["stem", "preprocess", "avgpool_linear", "conv1x1"])
def test_opcheck_cpu(case):
    if case == "stem":
        args = (torch.randn(2, 3, 13, 11), torch.randn(8, 3, 7, 7), torch.randn(8))
    elif case == "preprocess":
        args = (_images(2, 5, 4, "NHWC"), "NHWC", MEAN, STD, torch.bfloat16)
    elif case == "avgpool_linear":
        args = (torch.randn(2, 6, 3, 3), torch.randn(5, 6), torch.randn(5), False)
    else:
        args = (torch.randn(2, 16, 5, 5), torch.randn(8, 16, 1, 1), torch.randn(8), 2,
                torch.randn(2, 8, 3, 3), True, False)
    torch.library.opcheck(getattr(torch.ops.fastres_C, case).default, args)


# -- property tests (hypothesis): any geometry, dtype and memory layout the CPU ops accept ---------

# Memory layouts of a 4-D tensor (conftest's in_layout): dense in its logical order ("contig")
# or with dim 1 last ("cl"); every dimension strided by 2 at an offset, in either order
# ("strided", "strided_cl"; the gaps hold NaN, or random bytes for uint8, so a read outside the
# view shows); a stride-0 batch ("expand": every image the same, as from ``x[:1].expand``).
LAYOUTS4 = ["contig", "cl", "strided", "strided_cl", "expand"]


def _cond_tol(tol: float, ref: torch.Tensor, mag: torch.Tensor, dtype: torch.dtype) -> float:
    """``tol`` for ``rel_err(out, ref)`` where the rounding errors are relative to ``mag`` (the
    same computation on absolute values: every term summed), not to ``ref`` (where terms may
    cancel): ``tol * max(1, ||mag|| / ||ref||)``, plus ``sqrt(numel)`` times the smallest
    subnormal of ``dtype`` over ``||ref||`` for values that underflow in a 16-bit output.
    Norms over the elements where ``ref`` is not NaN, as in ``rel_err``."""
    keep = ~torch.isnan(ref)
    nref = float(torch.linalg.vector_norm(ref.double()[keep]).clamp_min(1e-30))
    cond = float(torch.linalg.vector_norm(mag.double()[keep])) / nref
    tiny = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps  # smallest subnormal
    return tol * max(1.0, cond) + int(keep.sum()) ** 0.5 * tiny / nref


def _with_nan(t: torch.Tensor, nan: bool, gen: torch.Generator) -> torch.Tensor:
    """``t`` (dense), with one NaN at a random element when ``nan`` (and ``t`` has any)."""
    if nan and t.numel():
        t.view(-1)[int(torch.randint(t.numel(), (1,), generator=gen))] = float("nan")
    return t


_seed = st.integers(0, 2**32 - 1)
# mostly small; sometimes large enough (up to 3 * 80 * 80 * 3 elements) that the CPU
# implementation's parallel_for (grain 4096) splits the work
_pre_size = st.one_of(st.integers(0, 19), st.integers(20, 80))


@needs_ext
@settings(max_examples=100, deadline=None)
@given(n=st.integers(0, 3), h=_pre_size, w=_pre_size,
       layout=st.sampled_from(["NHWC", "NCHW"]), mem=st.sampled_from(LAYOUTS4),
       mean=st.lists(st.floats(-3, 3), min_size=3, max_size=3),
       std=st.lists(st.tuples(st.floats(1e-3, 1e3), st.booleans()).map(
           lambda t: -t[0] if t[1] else t[0]), min_size=3, max_size=3),
       dtype=st.sampled_from(DTYPES), seed=_seed)
def test_preprocess_cpu_property(n, h, w, layout, mem, mean, std, dtype, seed):
    """Any batch (0 too), any H, W (0 and 1 too, up to 80), either layout in any memory
    layout, any mean and std (negative std too) and output dtype: bit-identical to the
    contract's fp32 reference, and within rounding of ((x / 255) - mean) / std in
    float64."""
    gen = torch.Generator().manual_seed(seed)
    shape = (n, h, w, 3) if layout == "NHWC" else (n, 3, h, w)
    img = in_layout(torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen), mem,
                    gen)
    out = torch.ops.fastres_C.preprocess(img, layout, mean, std, dtype)
    assert out.shape == (n, 3, h, w) and out.dtype == dtype
    assert out.is_contiguous(memory_format=torch.channels_last)
    # The contract: these fp32 operations in this order, one rounding (so bit-identical).
    torch.testing.assert_close(out, preprocess_reference(img, layout, mean, std, dtype),
                               rtol=0, atol=0)
    # float64, with mean and std as the fp32 values the contract computes with: the fp32
    # error (a few 2^-24 of |x/255| + |mean|, over |std|) scales with the cancellation in
    # x/255 - mean, then one rounding to dtype.
    nchw = (img.permute(0, 3, 1, 2) if layout == "NHWC" else img).double() / 255
    m = torch.tensor(mean, dtype=torch.float32).double().view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).double().view(1, 3, 1, 1)
    ref = (nchw - m) / s
    mag = (nchw + m.abs()) / s.abs()
    assert_close_rel(out, ref, _cond_tol(TOL[dtype], ref, mag, dtype),
                     f"preprocess {layout} {mem} {dtype}")


@needs_ext
@settings(max_examples=100, deadline=None)
@given(n=st.integers(0, 3), cin=st.one_of(st.just(3), st.integers(1, 12)),
       cout=st.one_of(st.sampled_from([64, 128]), st.integers(1, 140)),
       h=st.integers(1, 40), w=st.integers(1, 72), xmem=st.sampled_from(LAYOUTS4),
       wmem=st.sampled_from(["contig", "cl", "strided"]),
       bias_shift=st.sampled_from([0.0, 4.0, -4.0]), nan=st.booleans(),
       dtype=st.sampled_from(DTYPES), seed=_seed)
def test_stem_cpu_property(n, cin, cout, h, w, xmem, wmem, bias_shift, nan, dtype, seed):
    """Any batch (0 too), C_in (the C_in = 3 specialization and the generic kernel), C_out
    (one to three channel chunks, partial ones), H, W (pooled outputs from 1x1 up to three
    tiles each way, partial tiles), x and weight in any memory layout, any dtype: the float64
    conv 7x7/2 + bias + ReLU + max-pool 3x3/2. A bias shifted up makes (nearly) every output
    positive (an output the kernel never wrote shows), shifted down tests the ReLU. A NaN
    in x makes NaN exactly where PyTorch's outputs are NaN (every pooled output whose
    window's receptive field holds it, through the ReLU)."""
    gen = torch.Generator().manual_seed(seed)
    x = in_layout(_with_nan(torch.randn(n, cin, h, w, generator=gen), nan, gen).to(dtype),
                  xmem, gen)
    wt = (torch.randn(cout, cin, 7, 7, generator=gen) * (49 * cin) ** -0.5).to(dtype)
    wt = in_layout(wt, wmem, gen)
    b = torch.randn(cout, generator=gen) + bias_shift
    out = torch.ops.fastres_C.stem(x, wt, b)
    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)
    ref = stem_f64(x, wt, b)
    # fp32 accumulation of 49 * C_in products and the bias: the error scales with the
    # conv of |x|, |w| and |b| (max-pool and ReLU do not increase it), then one rounding.
    mag = stem_f64(x.abs(), wt.abs(), b.abs())
    assert_close_rel(out, ref, _cond_tol(TOL[dtype], ref, mag, dtype),
                     f"stem {dtype} x {tuple(x.shape)} {xmem} w {wmem}")


@needs_ext
@settings(max_examples=100, deadline=None)
@given(n=st.integers(0, 4), c=st.integers(0, 80), h=st.integers(0, 9), w=st.integers(0, 9),
       k=st.integers(0, 24), xmem=st.sampled_from(LAYOUTS4),
       wmem=st.sampled_from(["contig", "transposed", "strided"]), bias_fp32=st.booleans(),
       x_shift=st.sampled_from([0.0, 0.3, 3.0]), nan=st.booleans(),
       dtype=st.sampled_from(DTYPES), seed=_seed)
def test_head_cpu_property(n, c, h, w, k, xmem, wmem, bias_fp32, x_shift, nan, dtype,
                           seed):
    """Any batch (0 too), channels and classes (0 too: the output is the bias), H, W (1x1,
    odd; 0, where the mean and so every output is NaN when C > 0, as in PyTorch), x in any
    memory layout, weight in any strides, bias fp32 or x's dtype, any dtype: the float64
    linear layer of the fp32 mean rounded to x's dtype (the contract). A NaN in x makes
    its image's outputs NaN."""
    gen = torch.Generator().manual_seed(seed)
    x = _with_nan(torch.randn(n, c, h, w, generator=gen) + x_shift, nan, gen)
    x = in_layout(x.to(dtype), xmem, gen)
    wt = (torch.randn(k, c, generator=gen) / max(c, 1) ** 0.5).to(dtype)
    if wmem == "transposed":
        wt = wt.t().contiguous().t()
    elif wmem == "strided":
        big = torch.full((2 * k + 1, 2 * c + 1), float("nan"), dtype=dtype)
        big[1::2, 1::2] = wt
        wt = big[1::2, 1::2]
    b = torch.randn(k, generator=gen)
    b = b if bias_fp32 else b.to(dtype)
    out = torch.ops.fastres_C.avgpool_linear(x, wt, b, False)
    assert out.shape == (n, k) and out.dtype == dtype
    ref = head_f64(x, wt, b)
    # The pooled mean's fp32 sum (its order differs from torch's, so a 16-bit pooled value
    # may round to the neighbour of torch's: one ulp) and the fp32 dot product: the error
    # scales with mean(|x|) @ |w|.T + |b|, then one rounding. (rel_err requires NaN exactly
    # where ref has NaN, and compares the other elements.)
    mag = x.abs().double().mean(dim=(2, 3)) @ wt.abs().double().t() + b.abs().double()
    assert_close_rel(out, ref, _cond_tol(TOL[dtype], ref, mag, dtype),
                     f"head {dtype} x {tuple(x.shape)} {xmem} w {wmem}")


@needs_ext
@settings(max_examples=100, deadline=None)
@given(n=st.integers(0, 3), cin=st.integers(1, 40), cout=st.integers(1, 40),
       h=st.integers(1, 12), w=st.integers(1, 12), stride=st.integers(1, 4),
       xmem=st.sampled_from(LAYOUTS4), wmem=st.sampled_from(["contig", "cl", "strided"]),
       residual=st.sampled_from([None, *LAYOUTS4]), relu=st.booleans(),
       allow_tf32=st.booleans(), nan=st.booleans(), dtype=st.sampled_from(DTYPES),
       seed=_seed)
def test_conv1x1_cpu_property(n, cin, cout, h, w, stride, xmem, wmem, residual, relu,
                              allow_tf32, nan, dtype, seed):
    """Any batch (0 too), C_in, C_out, H, W (outputs down to 1x1, strides past the input),
    x, weight and residual in any memory layout, with or without residual and ReLU, any
    dtype: the float64 1x1 convolution. (The host GEMM is fp32 whatever allow_tf32 says.)
    A NaN in x stays NaN through the ReLU in its pixel's outputs, if the stride reads it."""
    gen = torch.Generator().manual_seed(seed)
    x = _with_nan(torch.randn(n, cin, h, w, generator=gen), nan, gen)
    x = in_layout(x.to(dtype), xmem, gen)
    wt = in_layout((torch.randn(cout, cin, 1, 1, generator=gen) / cin ** 0.5).to(dtype),
                   wmem, gen)
    b = torch.randn(cout, generator=gen)
    p, q = (h - 1) // stride + 1, (w - 1) // stride + 1
    res = None if residual is None else in_layout(
        torch.randn(n, cout, p, q, generator=gen).to(dtype), residual, gen)
    out = torch.ops.fastres_C.conv1x1(x, wt, b, stride, res, relu, allow_tf32)
    assert out.shape == (n, cout, p, q) and out.dtype == dtype
    assert out.is_contiguous(memory_format=torch.channels_last)
    ref = conv1x1_f64(x, wt, b, stride, res, relu)
    # fp32 accumulation of C_in products, the bias and the residual, then one rounding.
    mag = conv1x1_f64(x.abs(), wt.abs(), b.abs(), stride,
                      None if res is None else res.abs(), False)
    assert_close_rel(out, ref, _cond_tol(TOL[dtype], ref, mag, dtype),
                     f"conv1x1 {dtype} x {tuple(x.shape)} {xmem} w {wmem} res {residual}")


# -- GPU: CUDA implementations -------------------------------------------------------------------

DEV = torch.device("cuda") if HAS_CUDA else None


def _poison_allocator(nbytes: int = 64 << 20) -> None:
    """Fill a block of the caching allocator with NaN and free it, so an output the kernel
    forgets to write shows up as NaN instead of a lucky zero."""
    torch.full((nbytes // 4,), float("nan"), device=DEV).data_ptr()  # freed at once


@pytest.mark.cuda
@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("xfmt", ["contig", "cl"])
@pytest.mark.parametrize("n,h,w,cout", [(2, 224, 224, 64), (3, 37, 45, 64), (1, 1, 1, 64),
                                        (2, 33, 64, 70), (1, 2, 66, 5)])
def test_stem_cuda(dtype, xfmt, n, h, w, cout):
    x = _fmt(torch.randn(n, 3, h, w, device=DEV), xfmt).to(dtype)
    wt = (torch.randn(cout, 3, 7, 7, device=DEV) * 0.2).to(dtype).contiguous(
        memory_format=torch.channels_last)
    _check_stem_cuda(x, wt, torch.randn(cout, device=DEV), dtype, f"stem cuda {dtype}")


def _check_stem_cuda(x, wt, b, dtype, what):
    """The CUDA stem into poisoned memory, against float64 and against the CPU implementation:
    the same bodies, so the two agree to fp32 rounding (FMA contraction)."""
    _poison_allocator()
    out = torch.ops.fastres_C.stem(x, wt, b)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert_close_rel(out, stem_f64(x, wt, b), TOL[dtype], what)
    cpu = torch.ops.fastres_C.stem(x.cpu(), wt.cpu(), b.cpu())
    assert_close_rel(out, cpu, 1e-6 if dtype == torch.float32 else TOL[dtype] / 4, "cuda vs cpu")


def _stem_general_cin_case(cin, dtype, device):
    x = torch.randn(2, cin, 37, 45, device=device).to(dtype)
    wt = (torch.randn(70, cin, 7, 7, device=device) * (49 * cin) ** -0.5).to(dtype)
    return x, wt, torch.randn(70, device=device)


@pytest.mark.cuda
@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cin", [1, 4, 5, 8])
def test_stem_cuda_general_cin(dtype, cin):
    """C_in != 3 runs the generic kernel (stem_kernel<T, 0>: C_in read at run time, the patch
    rounded up to a multiple of 4 floats so that the conv tile's float4 stores stay 16-byte
    aligned for odd C_in), which every build compiles and no other GPU test launched. Two
    channel chunks (70 = 64 + 6), partial tiles in both directions."""
    from fastres import _ext_impls

    # C_in = 8 needs 168,480 bytes: more than an A100 allows per block (the op's dispatch,
    # supports_stem, declines it there); every C_in here fits on an H100/H200 (227 KiB)
    reason = _ext_impls.stem_smem_reason(cin, _ext_impls._smem_optin(torch.cuda.current_device()))
    if reason is not None:
        pytest.skip(reason)
    x, wt, b = _stem_general_cin_case(cin, dtype, DEV)
    _check_stem_cuda(x, wt, b, dtype, f"stem cuda C_in={cin} {dtype}")


@pytest.mark.cuda
@needs_ext
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stem_through_op_uses_cuda(dtype, monkeypatch):
    from fastres.ops.stem import stem

    calls = _count_cuda_calls(monkeypatch, "stem")
    x = torch.randn(4, 3, 64, 48, device=DEV).to(dtype)
    wt = (torch.randn(64, 3, 7, 7, device=DEV) * 0.2).to(dtype)
    b = torch.randn(64, device=DEV)
    with fastres.use_backend("cuda"):
        out = stem(x, wt, b)
    assert calls["stem"] == 1
    assert_close_rel(out, stem_f64(x, wt, b), TOL[dtype])


@pytest.mark.cuda
@needs_ext
@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,h,w", [(4, 224, 224), (3, 17, 5)])
def test_preprocess_cuda(layout, dtype, n, h, w, monkeypatch):
    calls = _count_cuda_calls(monkeypatch, "preprocess")
    img = _images(n, h, w, layout).to(DEV)
    _poison_allocator()
    with fastres.use_backend("cuda"):
        out = preprocess(img, layout, MEAN, STD, dtype)
    assert calls["preprocess"] == 1  # a fallback to the reference would match it trivially
    ref = preprocess_reference(img.cpu(), layout, MEAN, STD, dtype)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out.cpu(), ref, rtol=0, atol=0)


@pytest.mark.cuda
@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias_fp32", [True, False])
@pytest.mark.parametrize("n,c,h,w,k", [(32, 2048, 7, 7, 1000), (5, 40, 3, 5, 13),
                                       (1, 512, 1, 1, 10)])
def test_head_cuda(dtype, bias_fp32, n, c, h, w, k, monkeypatch):
    from fastres.ops.head import avgpool_linear

    calls = _count_cuda_calls(monkeypatch, "avgpool_linear")
    x = _fmt(torch.randn(n, c, h, w, device=DEV) + 0.3, "cl").to(dtype)
    wt = (torch.randn(k, c, device=DEV) / c ** 0.5).to(dtype)
    b = torch.randn(k, device=DEV) if bias_fp32 else torch.randn(k, device=DEV).to(dtype)
    _poison_allocator()
    with fastres.use_backend("cuda"):
        out = avgpool_linear(x, wt, b)
    assert calls["avgpool_linear"] == 1
    tol = TOL[dtype] if dtype != torch.float32 else (
        2e-3 if torch.backends.cuda.matmul.allow_tf32 else 1e-5)
    assert_close_rel(out, head_f64(x, wt, b), tol, f"head cuda {dtype}")


CONV_PRECISIONS = [("fp16", torch.float16, False), ("bf16", torch.bfloat16, False),
                   ("tf32", torch.float32, True), ("fp32", torch.float32, False)]


@pytest.mark.cuda
@needs_ext
@pytest.mark.parametrize("prec,dtype,tf32", CONV_PRECISIONS, ids=[p[0] for p in CONV_PRECISIONS])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("n,cin,cout,h,w,stride", [
    (2, 64, 256, 56, 56, 1),    # layer1 expand
    (4, 1024, 256, 14, 14, 1),  # layer3 reduce
    (2, 512, 1024, 28, 28, 2),  # layer3 downsample (strided)
    (3, 24, 40, 7, 9, 1),       # odd spatial size, small channels
    (1, 3, 8, 5, 3, 2),         # tiny, unaligned C_in: falls back (not 16-byte rows), strided
])
def test_conv1x1_cuda(prec, dtype, tf32, residual, relu, n, cin, cout, h, w, stride,
                      monkeypatch):
    from fastres.ops.conv_bias_act import conv_bias_act

    calls = _count_cuda_calls(monkeypatch, "conv_bias_act")
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", tf32)
    x = _fmt(torch.randn(n, cin, h, w, device=DEV), "cl").to(dtype)
    wt = (torch.randn(cout, cin, 1, 1, device=DEV) / cin ** 0.5).to(dtype).contiguous(
        memory_format=torch.channels_last)
    b = torch.randn(cout, device=DEV)
    p, q = (h - 1) // stride + 1, (w - 1) // stride + 1
    res = _fmt(torch.randn(n, cout, p, q, device=DEV), "cl").to(dtype) if residual else None
    _poison_allocator()
    aligned = (cin * x.element_size()) % 16 == 0 and (cout * x.element_size()) % 16 == 0
    with fastres.use_backend("cuda"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the fallback message, if unaligned
        out = conv_bias_act(x, wt, b, stride, 0, 1, 1, res, relu)
    assert calls["conv_bias_act"] == (1 if aligned else 0)
    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)
    tol = {"fp16": 2e-3, "bf16": 1e-2, "tf32": 2e-3, "fp32": 1e-5}[prec]
    assert_close_rel(out, conv1x1_f64(x, wt, b, stride, res, relu), tol, f"conv1x1 {prec}")


@pytest.mark.cuda
@needs_ext
def test_conv1x1_cuda_non_channels_last_residual_and_input():
    x = torch.randn(2, 32, 9, 9, device=DEV, dtype=torch.float16)  # NCHW-contiguous
    wt = torch.randn(48, 32, 1, 1, device=DEV, dtype=torch.float16) / 6
    b = torch.randn(48, device=DEV)
    res = torch.randn(2, 48, 9, 9, device=DEV, dtype=torch.float16)
    out = torch.ops.fastres_C.conv1x1(x, wt, b, 1, res, True, False)
    assert_close_rel(out, conv1x1_f64(x, wt, b, 1, res, True), 2e-3)


@pytest.mark.cuda
@needs_ext
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("residual", [False, True])
def test_conv1x1_cuda_relu_keeps_nan(dtype, residual):
    """cuBLASLt's ReLU epilogue turns NaN into 0; the op must keep it, as torch.relu and the
    CPU implementation do (NaN where the reference has NaN, nowhere else)."""
    x = _fmt(torch.randn(2, 32, 5, 5, device=DEV), "cl").to(dtype)
    x[1, 3, 2, 4] = float("nan")
    wt = (torch.randn(16, 32, 1, 1, device=DEV) / 6).to(dtype)
    b = torch.randn(16, device=DEV)
    res = _fmt(torch.randn(2, 16, 5, 5, device=DEV), "cl").to(dtype) if residual else None
    out = torch.ops.fastres_C.conv1x1(x, wt, b, 1, res, True, False)
    ref = conv1x1_f64(x, wt, b, 1, res, True)
    assert torch.isnan(out[1, :, 2, 4]).all()
    assert torch.equal(torch.isnan(out).cpu(), torch.isnan(ref).cpu())
    cpu = torch.ops.fastres_C.conv1x1(x.cpu(), wt.cpu(), b.cpu(), 1,
                                      None if res is None else res.cpu(), True, False)
    assert torch.equal(torch.isnan(out).cpu(), torch.isnan(cpu))


@pytest.mark.cuda
@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
def test_cublaslt_misaligned_bias_after_aligned_one(dtype):
    """cuBLASLt picks its algorithm from the bias pointer's alignment: a cached choice made
    for an aligned bias must not be reused with a 4-byte-aligned view (misaligned address)."""
    x = _fmt(torch.randn(3, 64, 6, 6, device=DEV), "cl").to(dtype)
    wt = (torch.randn(48, 64, 1, 1, device=DEV) / 8).to(dtype)
    aligned = torch.randn(48, device=DEV)
    offset = torch.randn(49, device=DEV)[1:]  # 4 bytes past a 512-byte boundary
    for b in (aligned, offset, aligned):
        out = torch.ops.fastres_C.conv1x1(x, wt, b, 1, None, True, False)
        torch.cuda.synchronize()
        assert_close_rel(out, conv1x1_f64(x, wt, b, 1, None, True), TOL[dtype])
    hx = torch.randn(4, 128, 3, 3, device=DEV).to(dtype)
    hw = (torch.randn(40, 128, device=DEV) / 11).to(dtype)
    for hb in (torch.randn(40, device=DEV), torch.randn(41, device=DEV)[1:]):
        out = torch.ops.fastres_C.avgpool_linear(hx, hw, hb, False)
        torch.cuda.synchronize()
        assert_close_rel(out, head_f64(hx, hw, hb), TOL[dtype])


def _offset_nhwc(n, c, h, w, dtype, device):
    """A channels-last [N, C, H, W] tensor whose data starts one element into its buffer: dense
    and contiguous, so the cuBLASLt path uses its memory as is, but only element-aligned."""
    buf = torch.randn(n * h * w * c + 1, device=device).to(dtype)
    return buf[1:].view(n, h, w, c).permute(0, 3, 1, 2)


def _offset_rows(rows, cols, dtype, device):
    buf = (torch.randn(rows * cols + 1, device=device) / cols ** 0.5).to(dtype)
    return buf[1:].view(rows, cols)


@pytest.mark.cuda
@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
def test_cublaslt_element_aligned_operands(dtype):
    """A (x), B (weight) and C (residual) at an odd element offset, between calls with
    16-byte-aligned operands of the same shapes. cuBLASLt picks kernels by the pointers'
    alignment (CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_*): a cached algorithm chosen for aligned
    operands and reused for these would fault ("misaligned address") or read wrong data, and
    cuBLASLt must have an algorithm for them at all (otherwise the op raises "no algorithm").
    Only the bias had such a test."""
    n, cin, cout, h, w = 2, 64, 48, 5, 7
    b = torch.randn(cout, device=DEV)
    aligned = (_fmt(torch.randn(n, cin, h, w, device=DEV), "cl").to(dtype),
               (torch.randn(cout, cin, 1, 1, device=DEV) / 8).to(dtype),
               _fmt(torch.randn(n, cout, h, w, device=DEV), "cl").to(dtype))
    offset = (_offset_nhwc(n, cin, h, w, dtype, DEV),
              _offset_rows(cout, cin, dtype, DEV).view(cout, cin, 1, 1),
              _offset_nhwc(n, cout, h, w, dtype, DEV))
    assert offset[0].data_ptr() % 16 and offset[1].data_ptr() % 16 and offset[2].data_ptr() % 16
    tol = TOL[dtype]
    for x, wt, res in (aligned, offset, aligned, (offset[0], aligned[1], aligned[2])):
        out = torch.ops.fastres_C.conv1x1(x, wt, b, 1, res, True, False)
        torch.cuda.synchronize()
        assert_close_rel(out, conv1x1_f64(x, wt, b, 1, res, True), tol,
                         f"conv1x1 {dtype} alignments {[t.data_ptr() % 16 for t in (x, wt, res)]}")
    hb = torch.randn(40, device=DEV)
    for hw in ((torch.randn(40, cin, device=DEV) / 8).to(dtype), _offset_rows(40, cin, dtype, DEV)):
        out = torch.ops.fastres_C.avgpool_linear(offset[0], hw, hb, False)
        torch.cuda.synchronize()
        assert_close_rel(out, head_f64(offset[0], hw, hb), tol, f"head {dtype}")


@pytest.mark.cuda
@needs_ext
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cublaslt_16bit_accumulates_in_fp32(dtype):
    """Small M, long K (layer4's reduce at batch 1; the head): shapes where cuBLASLt splits K.
    Its partial sums must stay fp32 (no INPLACE/OUTPUT_TYPE split-K reduction): the error is
    then that of the one final rounding, within a little of rounding the exact result. (Small
    biases: a bias rounded to the output dtype, where cuBLASLt has no fp32-bias kernel, would
    add an error of its own.)"""
    x = _fmt(torch.randn(1, 2048, 7, 7, device=DEV), "cl").to(dtype)
    wt = (torch.randn(512, 2048, 1, 1, device=DEV) / 45).to(dtype)
    b = torch.randn(512, device=DEV) * 1e-3
    out = torch.ops.fastres_C.conv1x1(x, wt, b, 1, None, False, False)
    ref = conv1x1_f64(x, wt, b, 1, None, False)
    floor = rel_err(ref.to(dtype), ref)  # one rounding of the exact result
    assert rel_err(out, ref) <= 1.3 * floor + 1e-6, (rel_err(out, ref), floor)
    hx = torch.randn(2, 2048, 7, 7, device=DEV).to(dtype)
    hw = (torch.randn(1000, 2048, device=DEV) / 45).to(dtype)
    hb = torch.randn(1000, device=DEV) * 1e-3
    out = torch.ops.fastres_C.avgpool_linear(hx, hw, hb, False)
    ref = head_f64(hx, hw, hb)
    floor = rel_err(ref.to(dtype), ref)
    assert rel_err(out, ref) <= 1.3 * floor + 1e-6, (rel_err(out, ref), floor)


@pytest.mark.cuda
@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
def test_conv1x1_cuda_single_row(dtype):
    """M = N*P*Q = 1 (batch 1, 1x1 spatial: layer4 of a 32x32 input) and a one-image head."""
    x = _fmt(torch.randn(1, 64, 1, 1, device=DEV), "cl").to(dtype)
    wt = (torch.randn(32, 64, 1, 1, device=DEV) / 8).to(dtype)
    b = torch.randn(32, device=DEV)
    res = _fmt(torch.randn(1, 32, 1, 1, device=DEV), "cl").to(dtype)
    out = torch.ops.fastres_C.conv1x1(x, wt, b, 1, res, True, False)
    tol = TOL[dtype] if dtype != torch.float32 else 1e-5
    assert_close_rel(out, conv1x1_f64(x, wt, b, 1, res, True), tol)
    out = torch.ops.fastres_C.avgpool_linear(x, wt.view(32, 64), b, False)
    assert_close_rel(out, head_f64(x, wt.view(32, 64), b), tol)


@pytest.mark.cuda
@needs_ext
def test_conv_bias_act_falls_back_for_3x3(monkeypatch):
    from fastres.ops.conv_bias_act import conv_bias_act, conv_bias_act_reference

    calls = _count_cuda_calls(monkeypatch, "conv_bias_act")
    monkeypatch.setattr(_backend, "_warned", set())  # the fallback message is said once
    x = torch.randn(1, 16, 8, 8, device=DEV, dtype=torch.float16)
    wt = torch.randn(16, 16, 3, 3, device=DEV, dtype=torch.float16) / 12
    b = torch.randn(16, device=DEV)
    with fastres.use_backend("cuda"), pytest.warns(RuntimeWarning, match="not 1x1"):
        out = conv_bias_act(x, wt, b, 1, 1, 1, 1, None, True)
    assert calls["conv_bias_act"] == 0
    ref = conv_bias_act_reference(x, wt, b, [1, 1], [1, 1], [1, 1], 1, None, True)
    assert_close_rel(out, ref, 2e-3)


@pytest.mark.cuda
@needs_ext
@pytest.mark.parametrize("case", ["stem", "preprocess", "avgpool_linear", "conv1x1"])
def test_opcheck_cuda(case):
    if case == "stem":
        args = (torch.randn(2, 3, 13, 11, device=DEV), torch.randn(8, 3, 7, 7, device=DEV),
                torch.randn(8, device=DEV))
    elif case == "preprocess":
        args = (_images(2, 5, 4, "NHWC").to(DEV), "NHWC", MEAN, STD, torch.bfloat16)
    elif case == "avgpool_linear":
        args = (torch.randn(2, 6, 3, 3, device=DEV), torch.randn(5, 6, device=DEV),
                torch.randn(5, device=DEV), False)
    else:
        args = (torch.randn(2, 16, 5, 5, device=DEV, dtype=torch.half),
                torch.randn(8, 16, 1, 1, device=DEV, dtype=torch.half),
                torch.randn(8, device=DEV), 2, None, True, False)
    torch.library.opcheck(getattr(torch.ops.fastres_C, case).default, args)


def _count_cuda_calls(monkeypatch, *ops):
    """Wrap the registered ``cuda`` implementations of ``ops`` to count their calls."""
    counts = {op: 0 for op in ops}
    for op in ops:
        impl = _backend.implementations(op)["cuda"]

        def counting(*args, _fn=impl.fn, _op=op, **kwargs):
            counts[_op] += 1
            return _fn(*args, **kwargs)

        monkeypatch.setitem(_backend._IMPLS[op], "cuda",
                            _backend.Impl(op, "cuda", counting, impl.supports))
    # a new registry generation: choices remembered for the unpatched registry are dropped
    # (the tuner's by generation; the plans' by the choice epoch, which is never put back).
    # One never used before: G + 1 in two tests in a row kept the first test's counting
    # wrappers in the tuner's memo for the second (its generation matched).
    monkeypatch.setattr(_backend, "_generation", next(_UNUSED_GENERATIONS))
    _backend.invalidate_choices()
    return counts


_UNUSED_GENERATIONS = itertools.count(10**9)


@pytest.mark.cuda
@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
def test_resnet50_end_to_end_cuda_backend(dtype, monkeypatch):
    """fastres.resnet50 with realistic BN stats, under use_backend("cuda"), against torchvision
    with the same state_dict; convolutions the extension does not cover (3x3, the max-pool-free
    rest) fall back to Triton."""
    import torchvision
    from _models import assert_matches_torchvision, realistic_bn

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    calls = _count_cuda_calls(monkeypatch, "stem", "conv_bias_act", "avgpool_linear")
    fr = realistic_bn(fastres.resnet50().to(DEV), device=DEV)
    tv = torchvision.models.resnet50().to(DEV).eval()
    tv.load_state_dict(fr.state_dict())
    x = torch.randn(2, 3, 224, 224, device=DEV)
    model = fr.to(dtype)
    with fastres.use_backend("cuda"), torch.no_grad():
        out = model(x.to(dtype))
    assert calls["stem"] == 1 and calls["avgpool_linear"] == 1
    assert calls["conv_bias_act"] >= 30  # ResNet-50 has 36 1x1 convolutions (incl. downsample)
    assert out.dtype == dtype and out.shape == (2, 1000)
    assert_matches_torchvision(out, tv, x, "resnet50 cuda backend", dtype)
