"""The tuner compiles its Triton candidates on a pool of threads before timing them
(``fastres.kernels._direct.compile_in_threads``, Triton's ``AsyncCompileMode``).

The compile path is checked for real on the CPU: a subprocess without ``TRITON_INTERPRET``
gives Triton a stand-in driver that names an H100 (sm_90) as the current target
(``fastres.compile_report.use_sm90_driver``), so that
``kernel.warmup`` binds CPU tensors and compiles the conv kernel for sm_90 as it would on a
GPU (nothing is launched). It runs under the installed Triton and, when
``FASTRES_COMPILE_REPORT_TRITON`` names another one (CI installs 3.6, the GPU machine's), under
that one too.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastres import tuning
from fastres.kernels import _direct

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import json, os, sys, threading
os.environ.pop("TRITON_INTERPRET", None)
import torch, triton, triton.compiler
from fastres.compile_report import use_sm90_driver

use_sm90_driver()
threads = []
real_compile = triton.compiler.compile


def spy(*args, **kwargs):  # (the JIT's binder takes triton.compiler.compile when first made)
    threads.append(threading.current_thread().name)
    return real_compile(*args, **kwargs)


triton.compiler.compile = spy
from fastres.kernels import conv

torch.manual_seed(int(os.environ["SEED"]))
cl = torch.channels_last
dt = torch.bfloat16
x = torch.randn(4, 512, 5, 5, dtype=dt).contiguous(memory_format=cl)
w = torch.randn(128, 512, 1, 1, dtype=dt).contiguous(memory_format=cl)
b = torch.randn(128)
res = torch.randn(4, 128, 5, 5, dtype=dt).contiguous(memory_format=cl)
prob = conv.ConvProblem.from_tensors(x, w, (1, 1), (0, 0), (1, 1), 1, res, True, None)
cands = conv.problem_configs(prob)
conv.conv_bias_act_triton(x, w, b, (1, 1), (0, 0), (1, 1), 1, res, True, compile_only=True)
cache = conv.conv_bias_act_kernel.device_caches[0][0]
kernels = list(cache.values())
epilogues = len(conv.split_k_epilogue_kernel.device_caches[0][0])
before = len(threads)
# a single configuration: compiled at once in this thread (here: already compiled, a hit)
conv.conv_bias_act_triton(x, w, b, (1, 1), (0, 0), (1, 1), 1, res, True, config=cands[0],
                          compile_only=True)
# the head's warm-up: its linear layer's GEMM for one configuration, nothing launched
from fastres.kernels import head

xh = torch.randn(2, 256, 3, 3, dtype=dt).contiguous(memory_format=cl)
wh, bh = torch.randn(100, 256, dtype=dt), torch.randn(100, dtype=dt)
n_before = len(cache)
head_cfg = head.head_configs(xh, wh, bh)[0]
head_out = head.avgpool_linear_triton(xh, wh, bh, config=head_cfg, compile_only=True)
print(json.dumps({
    "head": [head_out is None, len(cache) - n_before],
    "triton": triton.__version__,
    "candidates": [str(c) for c in cands],
    "split": sum(c.split_k > 1 for c in cands),
    "epilogues": epilogues,
    "threads": threads[:before],
    "recompiled": threads[before:],
    "cached": n_before,
    "types": sorted({type(k).__name__ for k in kernels}),
    "wgmma": sum("wgmma" in k.asm["ptx"] for k in kernels),
}))
"""


def _compile_in_subprocess(tmp_path, triton_dir=None, threads=None):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # (nothing compiled before)
    env["SEED"] = str(int.from_bytes(os.urandom(4), "little"))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (triton_dir, str(ROOT)) if p)
    if threads is not None:
        env["FASTRES_COMPILE_THREADS"] = str(threads)
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                          text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _triton_dirs():
    dirs = [pytest.param(None, id="installed")]
    other = os.environ.get("FASTRES_COMPILE_REPORT_TRITON")
    dirs.append(pytest.param(other, id="other", marks=pytest.mark.skipif(
        not other, reason="FASTRES_COMPILE_REPORT_TRITON names no other Triton")))
    return dirs


@pytest.mark.parametrize("triton_dir", _triton_dirs())
def test_candidates_compile_on_the_pool_once_each(tmp_path, triton_dir):
    got = _compile_in_subprocess(tmp_path, triton_dir, threads=2)
    if triton_dir:
        assert not got["triton"].startswith(__import__("triton").__version__), got["triton"]
    n = len(got["candidates"])
    # (a 1x1 bf16 layer with a residual: several rows, one of them split-K, whose epilogue
    # kernel is compiled too)
    assert n >= 4 and got["split"] == 1 and got["epilogues"] == 1, got
    # every candidate compiled exactly once, each on a pool thread, none in the caller's
    assert len(got["threads"]) == n + 1, got
    assert all(t.startswith("fastres-compile") for t in got["threads"]), got["threads"]
    assert got["cached"] == n and got["types"] == ["CompiledKernel"], got
    assert got["wgmma"] == n  # (sm_90 code: what the GPU would run)
    # the launcher's next request is a cache hit; the head's warm-up compiles its GEMM once
    assert got["recompiled"] == ["MainThread"] and got["head"] == [True, 1], got


def test_one_compile_thread_compiles_in_the_callers_thread(tmp_path):
    got = _compile_in_subprocess(tmp_path, threads=1)
    assert len(got["threads"]) == len(got["candidates"]) + got["epilogues"]
    assert set(got["threads"]) == {"MainThread"}


def test_compile_threads_setting(monkeypatch):
    monkeypatch.delenv("FASTRES_COMPILE_THREADS", raising=False)
    assert 1 <= _direct.compile_threads() <= 16
    monkeypatch.setenv("FASTRES_COMPILE_THREADS", " 3 ")
    assert _direct.compile_threads() == 3
    for bad in ("0", "-2", "two", "1.5"):
        monkeypatch.setenv("FASTRES_COMPILE_THREADS", bad)
        with pytest.raises(ValueError, match=f"FASTRES_COMPILE_THREADS must be a positive "
                                             f"integer.*got {bad!r}"):
            _direct.compile_threads()


class _Mode:
    """Stands in for triton.AsyncCompileMode: records the warmups run while it is active."""

    active = None
    entered = 0

    def __init__(self, executor, ignore_errors=False):
        assert ignore_errors and executor is not None

    def __enter__(self):
        if _Mode.active is not None:
            raise RuntimeError("Another AsyncCompileMode is already active")
        _Mode.active = self
        _Mode.entered += 1
        return self

    def __exit__(self, *exc):
        _Mode.active = None


def test_compile_in_threads_skips_failures_and_declines_when_it_cannot(monkeypatch):
    monkeypatch.setattr(_direct._backend, "kernels_interpreted", lambda: False)
    monkeypatch.setattr(_direct.triton, "AsyncCompileMode", _Mode, raising=False)
    monkeypatch.setenv("FASTRES_COMPILE_THREADS", "4")
    seen = []

    def warm(i):
        assert _Mode.active is not None  # (run while the async mode is on)
        seen.append(i)
        if i == 1:
            raise RuntimeError("compile error, raised again at the launch")

    calls = [lambda i=i: warm(i) for i in range(3)]
    assert _direct.compile_in_threads(calls) == 3 and seen == [0, 1, 2]
    assert _Mode.active is None  # left even though a warmup raised
    # declines: one warmup; one thread; interpreted kernels; the caller's mode active
    assert _direct.compile_in_threads(calls[:1]) == 0
    monkeypatch.setenv("FASTRES_COMPILE_THREADS", "1")
    assert _direct.compile_in_threads(calls) == 0
    monkeypatch.setenv("FASTRES_COMPILE_THREADS", "4")
    _Mode.active = object()
    try:
        assert _direct.compile_in_threads(calls) == 0
    finally:
        _Mode.active = None
    monkeypatch.setattr(_direct._backend, "kernels_interpreted", lambda: True)
    assert _direct.compile_in_threads(calls) == 0
    assert seen == [0, 1, 2]


def test_tuner_compiles_every_candidate_before_timing_any(monkeypatch):
    """``tuning._measure``: the candidates' warmups (with the call's arguments) all run, in
    one pool, before the first candidate runs; a candidate without one is left to compile
    at its first run."""
    events = []
    monkeypatch.setattr(_direct, "compile_in_threads",
                        lambda warmups: events.append(("pool", [w() for w in warmups])))
    monkeypatch.setattr(tuning._settings, "timer", lambda run, cand: (run(), 1.0)[1])
    monkeypatch.setattr(tuning._settings, "check", False)
    monkeypatch.setattr(tuning._settings, "progress", False)

    def cand(label, warm=True):
        def fn(a, k=None):
            events.append(("run", label))
            return a

        def warmup(a, k=None):
            return ("warm", label, a, k)

        return tuning.Candidate("triton", label, {"l": label}, fn, warmup if warm else None)

    cands = [cand("a"), cand("b"), cand("c", warm=False)]
    best, record = tuning._measure("conv_bias_act", "key", cands, {}, (7,), {"k": 1})
    assert events[0] == ("pool", [("warm", "a", 7, 1), ("warm", "b", 7, 1)])
    # then each candidate's checked first run and its timed run, in order
    assert events[1:] == [("run", lab) for lab in "aabbcc"]
    assert record["timings"] == {"triton:a": 1.0, "triton:b": 1.0, "triton:c": 1.0}
    events.clear()
    tuning._compile_ahead(cands[1:], (7,), {"k": 1})  # one warmup: nothing to share a pool
    assert events == []


def test_launchers_own_tuner_compiles_before_timing(monkeypatch):
    """``conv._choose_config`` (the launcher called with ``config=None``): every candidate's
    warm-up in one pool, then each candidate checked and timed; the fastest is kept."""
    import torch

    from fastres.kernels import conv

    prob = conv.ConvProblem(64, 64, 14, 14, 256, 1, 1, (1, 1), (0, 0), (1, 1), 1,
                            torch.bfloat16, has_res=True, relu=True, tf32=False)
    monkeypatch.setattr(conv, "_interpreted", lambda: False)  # the GPU's candidate list
    monkeypatch.setattr(tuning, "mode", lambda: "tune")
    cands = conv.problem_configs(prob)
    assert len(cands) > 2
    events = []
    monkeypatch.setattr(_direct, "compile_in_threads",
                        lambda warmups: events.append(("pool", [w() for w in warmups])))
    ms = {c: 1.0 + i for i, c in enumerate(cands)}
    ms[cands[2]] = 0.5
    monkeypatch.setattr(conv, "_time_ms", lambda fn: ms[fn()])
    monkeypatch.setattr(conv, "_TUNED", {})
    monkeypatch.setattr(conv, "_TIMINGS", {})

    def run(cfg):
        events.append(("run", cfg))
        return cfg

    best = conv._choose_config(prob, run, lambda y: (0.0, 1.0), lambda cfg: ("warm", cfg))
    assert best == cands[2]
    assert events[0] == ("pool", [("warm", c) for c in cands])
    assert events[1:] == [("run", c) for c in cands for _ in range(2)]


FAILURES = r"""
import json, os, sys
os.environ.pop("TRITON_INTERPRET", None)
os.environ["FASTRES_COMPILE_THREADS"] = "2"
import torch, triton, triton.language as tl
from triton import knobs
from triton.runtime import _async_compile
from fastres.compile_report import use_sm90_driver
from fastres.kernels import _direct

use_sm90_driver()


@triton.jit
def k(x_ptr, X: tl.constexpr):
    tl.static_assert(X > 0)  # X = 0: a compile error
    tl.store(x_ptr, X)


_direct.pooled_kernels(k)
x = torch.zeros(4)
out = {"triton": triton.__version__}
out["ran"] = _direct.compile_in_threads([lambda: k.warmup(x, 0, grid=(1,)),
                                         lambda: k.warmup(x, 1, grid=(1,))])
out["cached"] = sorted(type(v).__name__ for v in k.device_caches[0][0].values())
try:  # compiled again, so its error is raised again (not a stored failure, nor nothing)
    k.warmup(x, 0, grid=(1,))
    out["again"] = "no error"
except triton.compiler.errors.CompilationError:
    out["again"] = "compile error"


def interrupt(*args, **kwargs):  # a Ctrl-C while the pool's compiles are finished
    raise KeyboardInterrupt


knobs.runtime.jit_post_compile_hook = interrupt
try:
    _direct.compile_in_threads([lambda: k.warmup(x, 2, grid=(1,)),
                                lambda: k.warmup(x, 3, grid=(1,))])
    out["interrupted"] = False
except KeyboardInterrupt:
    out["interrupted"] = True
knobs.runtime.jit_post_compile_hook = None
out["mode_left_active"] = _async_compile.active_mode.get() is not None
k.warmup(x, 4, grid=(1,))  # an ordinary compile afterwards (it raised under a stale mode)
out["later_pool"] = _direct.compile_in_threads([lambda: k.warmup(x, 5, grid=(1,)),
                                                lambda: k.warmup(x, 6, grid=(1,))])
print(json.dumps(out))
"""


@pytest.mark.parametrize("triton_dir", _triton_dirs())
def test_failed_and_interrupted_pools_leave_nothing_behind(tmp_path, triton_dir):
    """A compile that failed in the pool is compiled again at the next request (Triton 3.8
    kept the failed future in the kernel's cache, and every later launch raised its stored
    error), and an interrupt while the pool finishes leaves no async-compile mode active in
    the caller's context (Triton 3.6 cleared it only after every compile: every later compile
    then failed on the shut-down pool)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (triton_dir, str(ROOT)) if p)
    script = tmp_path / "failures.py"  # (a file: triton.jit reads its kernel's source)
    script.write_text(FAILURES)
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True,
                          text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["ran"] == 2 and got["cached"] == ["CompiledKernel"], got  # the good one only
    assert got["again"] == "compile error", got
    assert got["interrupted"] and not got["mode_left_active"], got
    assert got["later_pool"] == 2, got
