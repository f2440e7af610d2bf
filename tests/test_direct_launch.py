"""fastres.kernels._direct: a compiled Triton kernel launched again without Triton's dispatch.

On the CPU, with a stand-in for a ``JITFunction`` and its ``CompiledKernel`` (what Triton's
dispatch would hand the C launcher is the contract: the grid, the stream, the kernel's
function and metadata, no launch metadata or hooks, then every argument in the signature's
order, constexprs included); on a GPU, against Triton's own launch path and F.conv2d.
"""

import inspect

import pytest
import torch
from conftest import assert_close_rel

from fastres.kernels import _direct


def _signature_fn(a_ptr, b_ptr, n, X, Y=7, Z="ieee"):  # the stand-in kernel's parameters
    raise AssertionError("never called")


class _Compiled:
    function = "cu-function"
    packed_metadata = "packed"

    def __init__(self):
        self.calls = []

    def run(self, *args):
        self.calls.append(args)


class _Kernel:
    """``kernel[grid](*args, **params)`` records the call and returns its compiled kernel (one
    per device, as Triton's per-device caches hold)."""

    fn = staticmethod(_signature_fn)

    def __init__(self):
        self.compiled = {}
        self.dispatched = []
        self.device = [0]

    def __getitem__(self, grid):
        def go(*args, **params):
            self.dispatched.append((grid, args, params))
            return self.compiled.setdefault(self.device[0], _Compiled())
        return go


class _Hooks:
    def __init__(self):
        self.calls = []


class _Runtime:
    def __init__(self):
        self.launch_enter_hook = _Hooks()
        self.launch_exit_hook = _Hooks()


@pytest.fixture
def fake(monkeypatch):
    kernel = _Kernel()
    runtime = _Runtime()
    monkeypatch.setattr(_direct, "ENABLED", True)
    # compiled kernels (the stand-in), though this process's own kernels are interpreted
    monkeypatch.setattr(_direct._backend, "kernels_interpreted", lambda: False)
    monkeypatch.setattr(_direct, "_getters", [lambda: kernel.device[0],
                                              lambda dev: f"stream{dev}"])
    monkeypatch.setattr(_direct, "_runtime", [runtime])
    monkeypatch.setattr(_direct, "_stats", {"direct": 0, "dispatched": 0})
    return kernel, runtime


PARAMS = {"X": 3, "Z": "tf32", "num_warps": 4, "num_stages": 2}


def test_second_launch_goes_straight_to_the_compiled_kernel(fake):
    kernel, _ = fake
    a, b = torch.zeros(8), torch.ones(8)
    cache = {}
    _direct.launch(kernel, (5, 2), (a, b, 8), PARAMS, cache, 2)
    assert len(kernel.dispatched) == 1 and kernel.dispatched[0] == ((5, 2), (a, b, 8), PARAMS)
    c = torch.full((8,), 2.0)
    _direct.launch(kernel, (5, 2), (a, c, 9), PARAMS, cache, 2)
    assert len(kernel.dispatched) == 1
    (call,) = kernel.compiled[0].calls
    # what JITFunction.run passes: every parameter in order, defaults filled in
    bound = inspect.signature(_signature_fn).bind(a, c, 9, X=3, Z="tf32")
    bound.apply_defaults()
    assert call[:9] == (5, 2, 1, "stream0", "cu-function", "packed", None, None, None)
    assert call[9:] == tuple(bound.arguments.values()) == (a, c, 9, 3, 7, "tf32")
    assert _direct.stats() == {"direct": 1, "dispatched": 1}


def test_what_may_differ_goes_through_triton(fake):
    """Another device (its own compiled kernel, loaded there), an unaligned tensor (Triton
    specializes on 16-byte alignment), a launch hook (Triton's path calls it): dispatched."""
    kernel, runtime = fake
    a, b = torch.zeros(16), torch.ones(16)
    cache = {}
    _direct.launch(kernel, (1,), (a, b, 4), PARAMS, cache, 2)
    kernel.device[0] = 1
    _direct.launch(kernel, (1,), (a, b, 4), PARAMS, cache, 2)
    assert len(kernel.dispatched) == 2 and set(cache) == {0, 1}
    _direct.launch(kernel, (1,), (a, b, 4), PARAMS, cache, 2)
    assert len(kernel.compiled[1].calls) == 1 and not kernel.compiled[0].calls
    assert kernel.compiled[1].calls[0][1:3] == (1, 1)  # a 1-D grid, padded as Triton does
    unaligned = a[1:]  # 4 bytes past an aligned start
    assert unaligned.data_ptr() % 16
    _direct.launch(kernel, (1,), (unaligned, b, 4), PARAMS, cache, 2)
    assert len(kernel.dispatched) == 3
    runtime.launch_enter_hook.calls.append(print)
    _direct.launch(kernel, (1,), (a, b, 4), PARAMS, cache, 2)
    assert len(kernel.dispatched) == 4
    runtime.launch_enter_hook = print  # a plain hook, not a chain
    _direct.launch(kernel, (1,), (a, b, 4), PARAMS, cache, 2)
    assert len(kernel.dispatched) == 5 and len(kernel.compiled[1].calls) == 1


def test_a_kernel_first_seen_unaligned_or_with_other_options_is_not_kept(fake):
    kernel, _ = fake
    a, b = torch.zeros(16), torch.ones(16)
    cache = {}
    _direct.launch(kernel, (1,), (a[1:], b, 4), PARAMS, cache, 2)  # compiled unaligned
    assert cache == {}
    _direct.launch(kernel, (1,), (a, b, 4), dict(PARAMS, debug=True), cache, 2)
    assert cache == {}  # an option that changes the compile: not a launch description
    _direct.launch(kernel, (1,), (a, b, 4), PARAMS, cache, 2)
    assert set(cache) == {0}


def test_turned_off_every_launch_is_dispatched(fake, monkeypatch):
    kernel, _ = fake
    monkeypatch.setattr(_direct, "ENABLED", False)
    a = torch.zeros(4)
    cache = {}
    for _ in range(3):
        _direct.launch(kernel, (1,), (a, a, 4), PARAMS, cache, 2)
    assert len(kernel.dispatched) == 3 and cache == {} and not kernel.compiled[0].calls


def test_conv_launches_through_the_direct_path_with_its_own_arguments(monkeypatch):
    """The conv launcher hands ``_direct.launch`` the same arguments and constexprs it gives
    ``kernel[grid]``, and the launch description's cache: run here by the interpreter through
    those arguments, the output is F.conv2d's."""
    import torch.nn.functional as F

    from fastres.kernels import conv as kc

    seen = []

    def launch(kernel, grid, args, params, cache, n_tensors):
        seen.append((grid, args, cache, n_tensors))
        assert all(isinstance(t, torch.Tensor) for t in args[:n_tensors])
        assert not any(isinstance(v, torch.Tensor) for v in args[n_tensors:])
        assert len(_direct.constexpr_tail(kernel, len(args), params)) == len(
            inspect.signature(kernel.fn).parameters) - len(args)
        kernel[grid](*args, **params)

    monkeypatch.setattr(_direct, "launch", launch)
    x = torch.randn(2, 16, 6, 5).contiguous(memory_format=torch.channels_last)
    w = torch.randn(24, 16, 3, 3) * 0.1
    b = torch.randn(24)
    res = torch.randn(2, 24, 6, 5).contiguous(memory_format=torch.channels_last)
    y = kc.conv_bias_act_triton(x, w, b, 1, 1, 1, 1, res, True, tf32=False)
    ref = torch.relu(F.conv2d(x.double(), w.double(), b.double(), 1, 1) + res.double())
    assert_close_rel(y, ref, 1e-5)
    (grid, args, cache, n_tensors), = seen
    prob = kc.ConvProblem.from_tensors(x, w, 1, 1, 1, 1, res, tf32=False)
    lp = kc.launch_params(prob, kc.tuned_config(prob) or kc.problem_configs(prob)[0])
    assert cache is lp.direct and grid == lp.grid and n_tensors == 5 and args[4] is y


def test_interpreted_kernels_go_through_triton_one_at_a_time(monkeypatch):
    """An interpreted kernel has no compiled kernel to keep: ``kernel[grid]``, under the
    interpreter's lock, whatever ``ENABLED`` says; nothing is cached."""
    kernel = _Kernel()
    held = []

    class Lock:
        def __enter__(self):
            held.append(True)

        def __exit__(self, *exc):
            held.append(False)

    monkeypatch.setattr(_direct._backend, "kernels_interpreted", lambda: True)
    monkeypatch.setattr(_direct._backend, "launching", Lock)
    monkeypatch.setattr(_direct, "ENABLED", True)
    a = torch.zeros(4)
    cache = {}
    for _ in range(2):
        _direct.launch(kernel, (1,), (a, a, 4), PARAMS, cache, 2)
    assert len(kernel.dispatched) == 2 and cache == {} and held == [True, False] * 2


@pytest.mark.cuda
@pytest.mark.parametrize("shape", [
    # (N, C_in, H, W, C_out, R, stride, pad, groups, residual, split-K)
    (2, 64, 14, 14, 256, 1, 1, 0, 1, True, 0),     # gemm
    (2, 64, 15, 13, 64, 3, 2, 1, 1, False, 0),     # implicit GEMM, strided
    (2, 3, 32, 32, 64, 7, 2, 3, 1, False, 0),      # stem
    (2, 128, 9, 9, 128, 3, 1, 1, 32, True, 0),     # block-diagonal grouped
    (1, 512, 7, 7, 512, 3, 1, 1, 1, True, 8),      # split-K: two kernels, 3-D grid
], ids=["gemm", "conv", "stem", "grouped", "split-k"])
def test_gpu_direct_launch_equals_triton_dispatch(shape):
    """Launched straight to the compiled kernel, each schedule writes exactly what Triton's
    own dispatch writes (into poisoned outputs), and F.conv2d's result; an unaligned input
    goes through Triton's dispatch, and is right too. The split-K row launches its two
    kernels (the partial sums on a 3-D grid, then the epilogue) straight, both."""
    import torch.nn.functional as F

    from fastres.kernels.configs import KernelConfig
    from fastres.kernels.conv import conv_bias_act_triton

    assert _direct.ENABLED, "FASTRES_DIRECT_LAUNCH=0 in this environment"
    n, c, h, w, k, r, st, pad, g, with_res, split = shape
    config = KernelConfig(64, 64, 64, 8, 4, 4, split_k=split) if split else None
    launches = 2 if split else 1
    dev, dt, cl = "cuda", torch.bfloat16, torch.channels_last
    x = torch.randn(n, c, h, w, device=dev).to(dt).contiguous(memory_format=cl)
    wt = (torch.randn(k, c // g, r, r, device=dev) * (c // g * r * r) ** -0.5).to(dt)
    b = torch.randn(k, device=dev)
    p, q = (h + 2 * pad - r) // st + 1, (w + 2 * pad - r) // st + 1
    res = (torch.randn(n, k, p, q, device=dev).to(dt).contiguous(memory_format=cl)
           if with_res else None)

    def poisoned():
        return torch.full((n, k, p, q), float("nan"), device=dev, dtype=dt).contiguous(
            memory_format=cl)

    outs = []
    for enabled in (False, True, True):  # dispatched; kept; direct
        _direct.ENABLED = enabled
        try:
            before = _direct.stats()["direct"]
            outs.append(conv_bias_act_triton(x, wt, b, st, pad, 1, g, res, True,
                                             out=poisoned(), config=config))
            torch.cuda.synchronize()
        finally:
            _direct.ENABLED = True
    assert _direct.stats()["direct"] == before + launches  # the last call went straight
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    ref = F.conv2d(x.double(), wt.double(), b.double(), st, pad, 1, g)
    ref = torch.relu(ref + res.double() if res is not None else ref)
    assert_close_rel(outs[2], ref, 8e-3)
    # an input 2 bytes past an aligned address: Triton's path (its own specialization)
    store = torch.empty(x.numel() + 8, device=dev, dtype=dt)
    shifted = store[1:1 + x.numel()].view(n, h, w, c).permute(0, 3, 1, 2)
    shifted.copy_(x)
    assert shifted.data_ptr() % 16 and shifted.is_contiguous(memory_format=cl)
    before = _direct.stats()
    y = conv_bias_act_triton(shifted, wt, b, st, pad, 1, g, res, True, out=poisoned(),
                             config=config)
    # (split-K: the epilogue kernel reads the aligned workspace, and goes straight)
    assert _direct.stats()["dispatched"] == before["dispatched"] + 1
    assert_close_rel(y, ref, 8e-3)


def test_launch_descriptions_without_an_object_of_their_own(monkeypatch):
    """``cache_for``: one cache per key, the same one each time; past the bound all are
    dropped (each refills on its next launch), never one shared by two keys."""
    monkeypatch.setattr(_direct, "_CACHES", {})
    monkeypatch.setattr(_direct, "_CACHES_MAX", 3)
    a = _direct.cache_for(("max_pool", torch.bfloat16, 1, 2))
    assert _direct.cache_for(("max_pool", torch.bfloat16, 1, 2)) is a
    b = _direct.cache_for(("max_pool", torch.float16, 1, 2))
    assert b is not a
    _direct.cache_for(("avgpool", torch.float16, 49, 2048))
    c = _direct.cache_for(("avgpool", torch.float16, 49, 1024))  # the fourth: a fresh start
    assert set(_direct._CACHES) == {("avgpool", torch.float16, 49, 1024)}
    assert _direct.cache_for(("max_pool", torch.bfloat16, 1, 2)) is not a and c == {}


@pytest.mark.cuda
def test_gpu_direct_launch_of_the_pooling_kernels():
    """The max-pool and the global average pool, launched straight to their compiled kernels,
    write what Triton's dispatch writes (into poisoned outputs) and what torch computes."""
    import torch.nn.functional as F

    from fastres.kernels.head import global_avgpool_triton
    from fastres.kernels.pool import max_pool2d_triton

    x = torch.randn(2, 64, 23, 17, device="cuda").to(torch.bfloat16).contiguous(
        memory_format=torch.channels_last)
    pooled, means = [], []
    for enabled in (False, True, True):
        _direct.ENABLED = enabled
        try:
            before = _direct.stats()["direct"]
            out = torch.full((2, 64, 12, 9), float("nan"), device="cuda",
                             dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
            pooled.append(max_pool2d_triton(x, 3, 2, 1, out=out))
            means.append(global_avgpool_triton(x))
            torch.cuda.synchronize()
        finally:
            _direct.ENABLED = True
    assert _direct.stats()["direct"] == before + 2
    assert torch.equal(pooled[0], pooled[2]) and torch.equal(means[0], means[2])
    assert torch.equal(pooled[2], F.max_pool2d(x, 3, 2, 1))
    assert_close_rel(means[2], x.double().mean((2, 3)), 8e-3)
