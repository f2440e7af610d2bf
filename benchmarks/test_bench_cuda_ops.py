"""Kernel benchmarks of the CUDA extension's ops against their Triton and eager counterparts.

Each benchmark first checks that the implementation agrees with the op's plain-PyTorch
reference on the same inputs (relative error within ``conv_layers.TOL``'s per-op bound for the
dtype), then times it (pytest-benchmark; each timed call ends with
``torch.cuda.synchronize()``). The ``eager`` rows time what eager PyTorch runs for the op in
the dtype, not that reference (which does its epilogue in fp32: a slower baseline than eager
torchvision): the convolution with its bias in the dtype, then an in-place residual add and
ReLU (a BatchNorm folded into the bias, as a fair eager model would); the stem's convolution,
ReLU and max-pool; the head's ``adaptive_avg_pool2d`` and ``linear``; torchvision's
``ToTensor`` + ``Normalize`` on the batch. ResNet-50 shapes; batch 32 and 256, bf16 and fp16;
only (batch 32, bf16) is in the quick set, the rest is marked ``slow``.

    pytest benchmarks/test_bench_cuda_ops.py --benchmark-enable [-m "not slow"]

Skips without CUDA or without the built extension.
"""

from __future__ import annotations

import datetime

import pytest
import torch
import torch.nn.functional as F

from conv_layers import TOL

import fastres
from fastres import _ext
from fastres.ops import _backend

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

IMPLS = ["cuda", "triton", "eager"]


@pytest.fixture(autouse=True)
def _cudnn_benchmark_mode(monkeypatch):
    """cuDNN's timed algorithm choice for the eager rows' convolutions (as in
    test_bench_conv.py and ``fastres bench``), put back after each benchmark."""
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)


def _grid():
    out = []
    for batch in (32, 256):
        for dtype in (torch.bfloat16, torch.float16):
            marks = [] if (batch == 32 and dtype == torch.bfloat16) else [pytest.mark.slow]
            out.append(pytest.param(batch, dtype, marks=marks,
                                    id=f"b{batch}-{str(dtype).split('.')[-1]}"))
    return out


GRID = _grid()

# (name, C_in, C_out, H=W, stride, residual, relu): ResNet-50's 1x1 convolutions by kind.
CONV1X1 = [
    ("layer1.conv3", 64, 256, 56, 1, True, True),
    ("layer3.conv1", 1024, 256, 14, 1, False, True),
    ("layer3.downsample", 512, 1024, 28, 2, False, False),
    ("layer4.conv3", 512, 2048, 7, 1, True, True),
]


def _need_ext():
    if not _ext.available():
        pytest.skip(f"fastres._C not built: {_ext.error()}")


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b).clamp_min(1e-30))


def backends_that_ran(call) -> list[tuple[str, str]]:
    """``call()`` once, recording ``(op, backend)`` for every fastres op it ran: a named
    backend that cannot run a call falls back (cuda -> triton -> torch, warned once per
    process), and a benchmark labelled ``cuda`` must not time the fallback."""
    seen: list[tuple[str, str]] = []
    real = _backend.choose

    def spy(op, device, *args, **kwargs):
        impl = real(op, device, *args, **kwargs)
        seen.append((op, impl.backend))
        return impl

    _backend.choose = spy
    try:
        call()
    finally:
        _backend.choose = real
    return seen


def _run(benchmark, impl: str, fn, reference, info: dict, tol: dict | None = None) -> None:
    """Check ``fn`` against ``reference`` (with the backend ``impl`` in force; relative error
    within ``tol``'s bound for the output dtype, default ``conv_layers.TOL``'s), then time it;
    the ``eager`` rows' ``fn`` is the eager baseline, checked against the reference too."""
    backend = {"cuda": "cuda", "triton": "triton", "eager": "torch"}[impl]

    def call():
        with fastres.use_backend(backend):
            return fn()

    if impl != "eager":
        ran = backends_that_ran(call)
        other = sorted({f"{op} ran on {b}" for op, b in ran if b != backend})
        if other:
            pytest.skip(f"the {backend} backend cannot run this call here: {', '.join(other)}")
    out = call()
    ref = reference()
    torch.cuda.synchronize()
    err = _rel_err(out, ref)
    bound = (tol or TOL)[out.dtype]
    assert err <= bound, (f"{impl} disagrees with the reference: relative error {err:.2e} > "
                          f"{bound}")

    def timed():
        call()
        torch.cuda.synchronize()

    benchmark.extra_info.update(info, impl=impl, rel_err_vs_reference=err,
                                gpu=torch.cuda.get_device_name(),
                                torch=torch.__version__, fastres=fastres.__version__,
                                date=datetime.date.today().isoformat())
    benchmark.group = info["op"] + " " + info["shape"]
    benchmark(timed)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("batch,dtype", GRID)
def test_bench_stem(benchmark, impl, batch, dtype):
    _need_ext()
    from fastres.ops.stem import stem

    dev = torch.device("cuda")
    x = torch.randn(batch, 3, 224, 224, device=dev).to(dtype).contiguous(
        memory_format=torch.channels_last)
    w = (torch.randn(64, 3, 7, 7, device=dev) * 0.1).to(dtype).contiguous(
        memory_format=torch.channels_last)
    b = torch.randn(64, device=dev)

    def reference():  # the epilogue in fp32, one rounding
        y = F.conv2d(x, w, None, 2, 3).float() + b.view(1, -1, 1, 1)
        return F.max_pool2d(torch.relu(y).to(dtype), 3, 2, 1)

    bias = b.to(dtype)

    def eager():
        return F.max_pool2d(F.conv2d(x, w, bias, 2, 3).relu_(), 3, 2, 1)

    fn = eager if impl == "eager" else (lambda: stem(x, w, b))
    _run(benchmark, impl, fn, reference,
         {"op": "stem", "shape": f"{batch}x3x224x224", "dtype": str(dtype)})


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layer", CONV1X1, ids=[c[0] for c in CONV1X1])
@pytest.mark.parametrize("batch,dtype", GRID)
def test_bench_conv1x1(benchmark, impl, layer, batch, dtype):
    _need_ext()
    from fastres.ops.conv_bias_act import conv_bias_act, conv_bias_act_reference

    name, cin, cout, hw, stride, residual, relu = layer
    dev = torch.device("cuda")
    cl = torch.channels_last
    x = torch.randn(batch, cin, hw, hw, device=dev).to(dtype).contiguous(memory_format=cl)
    w = (torch.randn(cout, cin, 1, 1, device=dev) / cin ** 0.5).to(dtype).contiguous(
        memory_format=cl)
    b = torch.randn(cout, device=dev)
    p = (hw - 1) // stride + 1
    res = (torch.randn(batch, cout, p, p, device=dev).to(dtype).contiguous(memory_format=cl)
           if residual else None)
    s, z, one = [stride, stride], [0, 0], [1, 1]

    def reference():
        return conv_bias_act_reference(x, w, b, s, z, one, 1, res, relu)

    bias = b.to(dtype)

    def eager():
        y = F.conv2d(x, w, bias, s)
        if res is not None:
            y.add_(res)
        return y.relu_() if relu else y

    fn = eager if impl == "eager" else (lambda: conv_bias_act(x, w, b, s, z, one, 1, res, relu))
    _run(benchmark, impl, fn, reference,
         {"op": f"conv1x1 {name}", "shape": f"{batch}x{cin}x{hw}x{hw}->{cout} s{stride}",
          "dtype": str(dtype)})


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("batch,dtype", GRID)
def test_bench_head(benchmark, impl, batch, dtype):
    _need_ext()
    from fastres.ops.head import avgpool_linear, avgpool_linear_reference

    dev = torch.device("cuda")
    x = torch.randn(batch, 2048, 7, 7, device=dev).to(dtype).contiguous(
        memory_format=torch.channels_last)
    w = (torch.randn(1000, 2048, device=dev) / 45).to(dtype)
    b = torch.randn(1000, device=dev).to(dtype)

    def reference():
        return avgpool_linear_reference(x, w, b)

    def eager():
        return F.linear(F.adaptive_avg_pool2d(x, 1).flatten(1), w, b)

    fn = eager if impl == "eager" else (lambda: avgpool_linear(x, w, b))
    _run(benchmark, impl, fn, reference,
         {"op": "avgpool_linear", "shape": f"{batch}x2048x7x7->1000", "dtype": str(dtype)})


@pytest.mark.parametrize("impl", ["cuda", "eager"])  # no Triton preprocess exists
@pytest.mark.parametrize("batch,dtype", GRID)
def test_bench_preprocess(benchmark, impl, batch, dtype):
    _need_ext()
    from fastres.ops.preprocess import IMAGENET_MEAN, IMAGENET_STD, preprocess

    dev = torch.device("cuda")
    img = torch.randint(0, 256, (batch, 224, 224, 3), dtype=torch.uint8, device=dev)
    mean, std = list(IMAGENET_MEAN), list(IMAGENET_STD)

    def reference():  # (x / 255 - mean) / std in float64, unrounded: both rows checked on it
        x = img.permute(0, 3, 1, 2).double() / 255.0
        m = torch.tensor(mean, dtype=torch.float64, device=dev).view(1, 3, 1, 1)
        s = torch.tensor(std, dtype=torch.float64, device=dev).view(1, 3, 1, 1)
        return (x - m) / s

    def eager():  # torchvision's ToTensor + Normalize on a batch, then the cast
        x = img.permute(0, 3, 1, 2).float().div(255.0)
        m = torch.tensor(mean, device=dev).view(1, 3, 1, 1)
        s = torch.tensor(std, device=dev).view(1, 3, 1, 1)
        return ((x - m) / s).to(dtype).contiguous(memory_format=torch.channels_last)

    fn = eager if impl == "eager" else (lambda: preprocess(img, "NHWC", mean, std, dtype))
    # elementwise, one rounding to the dtype (CPU: 1.7e-3 in bf16, 2.1e-4 in fp16 against the
    # float64 values): the convolutions' bf16 bound (1.6e-2) would pass a swapped std (1.45e-2)
    tol = {torch.bfloat16: 4e-3, torch.float16: 1e-3, torch.float32: 1e-5}
    _run(benchmark, impl, fn, reference,
         {"op": "preprocess", "shape": f"{batch}x224x224x3", "dtype": str(dtype)}, tol)
