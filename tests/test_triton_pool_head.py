"""The Triton NHWC max-pool and avgpool+linear head against ``torch.nn.functional``.

Interpreted on CPU (small shapes), compiled on a GPU; every dtype, odd sizes, batch 1,
channel counts off the block size, NaN propagation, poisoned output buffers.
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import HAS_CUDA, assert_close_rel, in_layout
from hypothesis import given, settings
from hypothesis import strategies as st

import fastres
from fastres.kernels.head import avgpool_linear_triton, global_avgpool_triton
from fastres.kernels.pool import max_pool2d_triton
from fastres.ops import _backend
from fastres.ops.head import avgpool_linear, avgpool_linear_reference
from fastres.ops.max_pool import max_pool2d

pytestmark = pytest.mark.triton

DEV = "cuda" if HAS_CUDA else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# One op against a float64 reference of the same (dtype-rounded) inputs: the error is the
# output's rounding (measured ~2e-4 fp16, ~1.8e-3 bf16). DESIGN.md's 2e-2 is the end-to-end
# bound of a whole network; per op it would accept a 1% error in every element.
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 8e-3}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 16, 9, 9), (2, 24, 10, 7), (1, 70, 5, 6), (3, 8, 2, 3)],
                         ids=str)
def test_max_pool_exact(shape, dtype):
    x = torch.randn(*shape, device=DEV).to(dtype).contiguous(memory_format=torch.channels_last)
    ref = F.max_pool2d(x.float(), 3, 2, 1).to(dtype)
    out = torch.full(ref.shape, float("nan"), dtype=dtype, device=DEV).contiguous(
        memory_format=torch.channels_last)
    y = max_pool2d_triton(x, 3, 2, 1, out=out)
    assert y.data_ptr() == out.data_ptr() and y.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(y, ref)  # max is exact


def test_max_pool_nchw_input_and_other_windows():
    x = torch.randn(2, 12, 11, 8, device=DEV)  # NCHW contiguous
    for k, s, p in ((3, 2, 1), (2, 2, 0), (3, 1, 1), (5, 2, 2)):
        assert torch.equal(max_pool2d_triton(x, k, s, p), F.max_pool2d(x, k, s, p))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_max_pool_nan_propagates(dtype):
    x = torch.randn(1, 20, 8, 8, device=DEV).to(dtype).contiguous(
        memory_format=torch.channels_last)
    x[0, 3, 4, 4] = float("nan")
    x[0, 19, 0, 0] = float("nan")
    x[0, 5, 7, 7] = float("inf")
    y = max_pool2d_triton(x)
    ref = F.max_pool2d(x, 3, 2, 1)
    assert torch.equal(torch.isnan(y), torch.isnan(ref))
    assert torch.isnan(y).sum() > 0
    mask = ~torch.isnan(ref)
    assert torch.equal(y[mask], ref[mask])


def test_max_pool_op_through_triton_backend(triton_calls):
    x = torch.randn(1, 16, 7, 7, device=DEV).contiguous(memory_format=torch.channels_last)
    with fastres.use_backend("triton"):
        assert _backend.choose("max_pool2d", x.device, x, 3, 2, 1).backend == "triton"
        y = max_pool2d(x, 3, 2, 1)
    assert triton_calls["pool"] >= 1  # the op ran the kernel (the reference would match too)
    assert torch.equal(y, F.max_pool2d(x, 3, 2, 1))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 64, 7, 7), (3, 40, 3, 5), (2, 130, 1, 1)], ids=str)
def test_global_avgpool(shape, dtype):
    x = torch.randn(*shape, device=DEV).to(dtype).contiguous(memory_format=torch.channels_last)
    ref = x.double().mean(dim=(2, 3))
    y = global_avgpool_triton(x)
    assert y.dtype == dtype and y.shape == ref.shape
    assert_close_rel(y, ref, TOL[dtype] if dtype != torch.float32 else 1e-6)


def _head_without_tf32(x, w, b):
    """The Triton head with TF32 off, and the float64 reference of its contract: the mean
    rounded to x's dtype, the bias rounded to x's dtype, then the linear layer."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        y = avgpool_linear_triton(x, w, b)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    pooled = x.double().mean(dim=(2, 3)).to(x.dtype).double()
    return y, pooled @ w.double().t() + b.to(x.dtype).double()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,c,hw,k", [(1, 64, 7, 10), (2, 48, 5, 37), (3, 130, 2, 1000)],
                         ids=str)
def test_avgpool_linear(n, c, hw, k, dtype):
    x = torch.randn(n, c, hw, hw, device=DEV).to(dtype).contiguous(
        memory_format=torch.channels_last)
    w = (torch.randn(k, c, device=DEV) * c**-0.5).to(dtype)
    b = torch.randn(k, device=DEV)
    y, ref = _head_without_tf32(x, w, b)
    assert y.shape == (n, k) and y.dtype == dtype
    assert_close_rel(y, ref, TOL[dtype])
    eager = avgpool_linear_reference(x, w, b)
    assert_close_rel(y, eager.double(), TOL[dtype])


def test_head_rounds_its_bias_to_the_input_dtype_first():
    """Every implementation adds the fp32 bias rounded to the input's dtype, as eager
    ``F.linear`` on a bf16 model does: ``1 + 2**-8 + 2**-10`` is bf16 ``1 + 2**-7``, so one
    pooled 1 times ``-2**-7`` plus it is exactly 1 (the unrounded bias gives ``1 - 2**-8``)."""
    x = torch.ones(1, 1, 2, 2, device=DEV, dtype=torch.bfloat16)
    w = torch.full((1, 1), -2.0**-7, device=DEV, dtype=torch.bfloat16)
    b = torch.tensor([1 + 2.0**-8 + 2.0**-10], device=DEV)
    ran = []
    for name, impl in _backend.implementations("avgpool_linear").items():
        if impl.supports(x, w, b) is None:
            y = impl.fn(x, w, b)
            assert y.dtype == torch.bfloat16 and float(y) == 1.0, (name, float(y))
            ran.append(name)
    assert {"torch", "triton"} <= set(ran), ran


def test_avgpool_linear_op_through_triton_backend(triton_calls):
    x = torch.randn(2, 32, 3, 3, device=DEV).contiguous(memory_format=torch.channels_last)
    w = torch.randn(10, 32, device=DEV)
    b = torch.randn(10, device=DEV)
    with fastres.use_backend("triton"):
        assert _backend.choose("avgpool_linear", x.device, x, w, b).backend == "triton"
        y = avgpool_linear(x, w, b)
    assert triton_calls["head"] >= 1  # the op ran the kernel (the reference would match too)
    assert_close_rel(y, avgpool_linear_reference(x.double(), w.double(), b.double()), 1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_pool_head_resnet_sizes(dtype):
    x = torch.randn(64, 64, 112, 112, device="cuda").to(dtype).contiguous(
        memory_format=torch.channels_last)
    assert torch.equal(max_pool2d_triton(x), F.max_pool2d(x, 3, 2, 1))
    f = torch.randn(64, 2048, 7, 7, device="cuda").to(dtype).contiguous(
        memory_format=torch.channels_last)
    w = (torch.randn(1000, 2048, device="cuda") * 2048**-0.5).to(dtype)
    b = torch.randn(1000, device="cuda")
    ref = f.double().mean(dim=(2, 3)) @ w.double().t() + b.double()
    assert_close_rel(avgpool_linear_triton(f, w, b), ref, 2e-3 if dtype == torch.float32
                     else TOL[dtype])


def test_max_pool_supports_counts_output_pixels():
    """The max-pool kernel's output pixel index is int32 even on its 64-bit offset path: a
    call with 2**31 or more output pixels (one channel, 46341**2 pixels) is declined instead
    of wrapping to negative rows that pass the bounds mask."""
    from fastres.kernels.pool import supports_max_pool

    assert supports_max_pool(torch.empty(1, 1, 8, 8, device="meta"), 3, 1, 1) is None
    assert "output pixels" in supports_max_pool(
        torch.empty(1, 1, 46341, 46341, device="meta"), 3, 1, 1)
    assert supports_max_pool(torch.empty(1, 1, 46341, 46341, device="meta"), 3, 2, 1) is None


def _equal_nan(a, b):
    """Exactly equal, NaN where the other has NaN (``torch.equal`` counts NaN != NaN)."""
    nan = torch.isnan(a)
    return (a.shape == b.shape and a.dtype == b.dtype and torch.equal(nan, torch.isnan(b))
            and torch.equal(a.masked_fill(nan, 0), b.masked_fill(nan, 0)))


# x (contiguous NCHW) as is, channels-last, or every other element of a twice-as-wide
# buffer (conftest's in_layout)
_LAYOUTS = ["contig", "cl", "strided_w"]


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 2), c=st.integers(1, 70), k=st.integers(1, 7),
       stride=st.integers(1, 4), extra_h=st.integers(0, 6), extra_w=st.integers(0, 6),
       dtype=st.sampled_from(DTYPES), layout=st.sampled_from(_LAYOUTS),
       use_out=st.booleans(), specials=st.booleans(), seed=st.integers(0, 2**31 - 1),
       data=st.data())
def test_max_pool_any_geometry_property(n, c, k, stride, extra_h, extra_w, dtype, layout,
                                        use_out, specials, seed, data):
    """Any geometry the launcher claims (square kernel 1..7, the limit of
    ``supports_max_pool``; any stride; padding up to half the kernel, the op's rule;
    outputs down to 1x1; channel counts off the 64-channel and pixel blocks) in any dtype
    and layout, NaN and +-inf included, equals ``F.max_pool2d`` on the same input exactly.
    (Windows that do not fit are refused by the op's argument check, tested in test_ops.)
    The inputs come from ``seed``, so a falsifying example reproduces."""
    pad = data.draw(st.integers(0, k // 2), label="padding")
    # the smallest input that gives a 1-pixel output, plus extra rows and columns
    h, w = max(1, k - 2 * pad) + extra_h, max(1, k - 2 * pad) + extra_w
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g).to(dtype)
    if specials:  # a few NaN, +inf and -inf (and a whole channel of -inf)
        flat = x.view(-1)
        for v in (float("nan"), float("inf"), float("-inf")):
            count = int(torch.randint(1, 4, (1,), generator=g))
            flat[torch.randint(0, flat.numel(), (count,), generator=g)] = v
        x[:, int(torch.randint(0, c, (1,), generator=g))] = float("-inf")
    x = in_layout(x.to(DEV), layout)
    ref = F.max_pool2d(x, k, stride, pad)
    assert ref.shape[2] >= 1 and ref.shape[3] >= 1
    out = None
    if use_out:
        out = torch.full(ref.shape, float("nan"), dtype=dtype, device=DEV).contiguous(
            memory_format=torch.channels_last)
    y = max_pool2d_triton(x, k, stride, pad, out=out)
    assert out is None or y.data_ptr() == out.data_ptr()
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert _equal_nan(y, ref), (
        f"max-pool differs from F.max_pool2d at "
        f"{(~((y == ref) | (torch.isnan(y) & torch.isnan(ref)))).nonzero()[:5].tolist()}")


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 3), c=st.integers(1, 140), h=st.integers(1, 9),
       w=st.integers(1, 9), num_classes=st.integers(1, 40),
       dtype=st.sampled_from(DTYPES), layout=st.sampled_from(_LAYOUTS),
       weight_t=st.booleans(), bias_fp32=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_avgpool_linear_any_shape_property(n, c, h, w, num_classes, dtype, layout,
                                           weight_t, bias_fp32, seed):
    """Any batch (1 included), channel count (off the 128-channel block and the GEMM's
    blocks), spatial size (1x1 up to more than one 16-pixel block), class count, dtype and
    layout of x, weight contiguous or a transposed view, bias fp32 or in x's dtype (the
    bias is required: ``check_head_args``): the float64 reference of the op's contract
    (the mean rounded to x's dtype, the bias rounded to x's dtype, then the linear layer)
    within the per-op tolerance. The inputs come from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    x = in_layout(torch.randn(n, c, h, w, generator=g).to(dtype).to(DEV), layout)
    wt = (torch.randn(num_classes, c, generator=g) * c**-0.5).to(dtype).to(DEV)
    if weight_t:  # the same values, read through a transposed [C, num_classes] buffer
        wt = wt.t().contiguous().t()
    b = torch.randn(num_classes, generator=g).to(DEV)
    if not bias_fp32:
        b = b.to(dtype)
    y, ref = _head_without_tf32(x, wt, b)
    # Rounding is relative to the terms summed, not to their sum: the fp32 mean's error
    # scales with mean|x| (a mean near 0 is a common draw at small H*W), the linear
    # layer's with |pooled|*|w| + |b|. So the bound scales with mean|x| @ |w|.T + |b|.
    mag = x.double().abs().mean(dim=(2, 3)) @ wt.double().abs().t() + b.double().abs()
    cond = float(torch.linalg.vector_norm(mag)
                 / torch.linalg.vector_norm(ref).clamp_min(1e-30))
    assert y.shape == (n, num_classes) and y.dtype == dtype
    assert_close_rel(y, ref, TOL[dtype] * max(1.0, cond), "avgpool_linear_triton")


def test_threads_launching_at_once_get_right_results():
    """Threads launching the convolution, max-pool and average-pool kernels at the same time
    each get their own right result (interpreted launches take turns: Triton's interpreter
    patches triton.language for the length of a launch, and two at once failed)."""
    import threading

    from fastres.kernels.conv import conv_bias_act_triton

    errors = []

    def work():
        try:
            for _ in range(3):
                x = in_layout(torch.randn(1, 16, 9, 9, device=DEV), "cl")
                w = torch.randn(16, 16, 3, 3, device=DEV)
                b = torch.randn(16, device=DEV)
                y = conv_bias_act_triton(x, w, b, (1, 1), (1, 1), (1, 1), 1, relu=True,
                                         tf32=False)
                ref = F.relu(F.conv2d(x.double(), w.double(), b.double(), padding=1))
                assert_close_rel(y, ref, TOL[torch.float32])
                assert torch.equal(max_pool2d_triton(y, 3, 2, 1), F.max_pool2d(y, 3, 2, 1))
                assert_close_rel(global_avgpool_triton(y), y.double().mean((2, 3)),
                                 TOL[torch.float32])
        except Exception as e:  # (reported below: a thread's failure is not the test's)
            errors.append(f"{type(e).__name__}: {str(e)[:300]}")

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a thread did not finish in 300 s"
    assert not errors, errors
