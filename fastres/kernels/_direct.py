"""Launching a compiled Triton kernel again without Triton's per-call dispatch.

``kernel[grid](*args, **constexprs)`` (``JITFunction.run``) binds every argument, computes
each one's specialization (type, 16-byte alignment, divisibility by 16, equality to 1),
builds the compile-cache key, looks it up, checks the kernel's globals and builds launch
metadata, every call, before the C launcher runs. At batch 1 fastres's forward is bound by
that host work (one launch per layer). :func:`launch` does it once per launch description
and device: the first call goes through ``kernel[grid]`` and keeps the ``CompiledKernel``
it returns; later calls with the same description hand the arguments straight to that
kernel's C launcher (``CompiledKernel.run``, the call ``JITFunction.run`` ends with; the
same in Triton 3.6 and 3.8).

It is only valid while nothing that chooses the compiled kernel differs, so the caller's
description must fix everything but the tensors: the constexprs, the grid, every integer
argument (their specialization depends on their values), the tensors' dtypes. Per call,
:func:`launch` itself checks what may still differ: the device (the kernel was loaded on
one), every tensor argument's 16-byte alignment (kept only from a call where all were
aligned, used only for such calls), and Triton's launch hooks (a profiler's hook set:
Triton's own path, which calls it). Anything else goes through ``kernel[grid]``.

Interpreted kernels (``TRITON_INTERPRET=1``) have no compiled kernel: :func:`launch` runs
them through ``kernel[grid]``, one at a time (``_backend.launching``).
``FASTRES_DIRECT_LAUNCH=0`` (or ``false``/``off``/``no``; read when this module is first
imported, at fastres's first use of its Triton kernels) turns the direct path off: every
launch goes through Triton's dispatch.

:func:`compile_in_threads` is the tuner's other use of Triton's launch machinery: it compiles
a layer's candidates (``kernel.warmup``) on a pool of threads before any is timed.
"""

from __future__ import annotations

import contextvars
import inspect
import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import triton

from fastres._env import switched_off
from fastres.ops import _backend

ENABLED = not switched_off("FASTRES_DIRECT_LAUNCH")
# compile_in_threads's default pool: the CPUs this process may use, at most this many
_COMPILE_THREADS_MAX = 16
# the JIT kernels compile_in_threads compiles (pooled_kernels): their caches are cleared of
# failed compiles after each pool
_POOLED: list = []

_stats = {"direct": 0, "dispatched": 0}
# Triton's own device and stream getters (``driver.active``), looked up on first use
_getters: list = []
_runtime: list = []  # triton.knobs.runtime, once imported
_SIGNATURES: dict = {}  # kernel -> (its parameter names, their defaults)
_CACHES: dict[tuple, dict] = {}  # cache_for's launch descriptions
_CACHES_MAX = 4096


def cache_for(key: tuple) -> dict:
    """The cache of the launch description ``key`` (hashable; it must fix everything that
    selects the compiled kernel but the tensors' data: the kernel, the dtypes, every integer
    argument and constexpr), for callers that keep no description object of their own. At
    most 4096 are kept (then all are dropped: each refills on its next launch)."""
    cache = _CACHES.get(key)
    if cache is None:
        if len(_CACHES) >= _CACHES_MAX:
            _CACHES.clear()
        cache = _CACHES[key] = {}
    return cache


def stats() -> dict[str, int]:
    """Launches that went straight to a compiled kernel (``direct``) and through
    ``kernel[grid]`` (``dispatched``), in this process (for tests and reports)."""
    return dict(_stats)


def _device_and_stream() -> tuple[int, Any]:
    if not _getters:
        from triton.runtime import driver

        active = driver.active
        _getters.extend((active.get_current_device, active.get_current_stream))
    device = _getters[0]()
    return device, _getters[1](device)


def _hooks_idle() -> bool:
    """No launch hook is set: Triton's hooks are chains (3.6, 3.8; empty: ``calls == []``)
    or ``None``; anything else is a hook to call, which Triton's own launch does."""
    if not _runtime:
        from triton import knobs

        _runtime.append(knobs.runtime)
    rt = _runtime[0]
    for hook in (rt.launch_enter_hook, rt.launch_exit_hook):
        if hook is not None and getattr(hook, "calls", None) != []:
            return False
    return True


def aligned(tensors) -> bool:
    """Every tensor's data is 16-byte aligned (what Triton specializes pointers on)."""
    for t in tensors:
        if t.data_ptr() % 16:
            return False
    return True


def _signature(kernel) -> tuple[tuple[str, ...], dict[str, Any]]:
    """``kernel``'s parameter names in order, and the defaults of those that have one."""
    sig = _SIGNATURES.get(kernel)
    if sig is None:
        params = inspect.signature(getattr(kernel, "fn", kernel)).parameters
        sig = _SIGNATURES[kernel] = (tuple(params), {
            n: p.default for n, p in params.items() if p.default is not inspect.Parameter.empty})
    return sig


def constexpr_tail(kernel, n_args: int, params: Mapping[str, Any]) -> tuple:
    """The values of ``kernel``'s parameters after the first ``n_args`` (its constexprs), in
    its signature's order, from ``params`` or the defaults: what Triton's binder appends to
    the positional arguments (the C launcher skips them, but takes them)."""
    names, defaults = _signature(kernel)
    return tuple(params[n] if n in params else defaults[n] for n in names[n_args:])


def launch(kernel, grid: tuple, args: tuple, params: Mapping[str, Any], cache: dict,
           n_tensors: int) -> None:
    """``kernel[grid](*args, **params)``, straight to the compiled kernel when ``cache``
    holds it for the current device (see the module's docstring).

    ``cache``: a dict owned by the caller's launch description (``{device: (compiled
    kernel, constexpr values)}``); it must be a new one whenever anything but the tensors'
    data may differ. ``params``: the constexprs and the launch options (``num_warps``,
    ``num_stages``), as for ``kernel[grid]``; ``n_tensors``: the leading arguments that are
    tensors (the rest are not).
    """
    if _backend.kernels_interpreted():  # no compiled kernel, no device: Triton's path
        with _backend.launching():  # (one interpreted launch at a time)
            kernel[grid](*args, **params)
        return
    if not ENABLED:
        kernel[grid](*args, **params)
        return
    device, stream = _device_and_stream()
    hit = cache.get(device)
    tensors = args[:n_tensors]
    if hit is not None and aligned(tensors) and _hooks_idle():
        compiled, tail = hit
        compiled.run(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1,
                     stream, compiled.function, compiled.packed_metadata, None, None, None,
                     *args, *tail)
        _stats["direct"] += 1
        return
    compiled = kernel[grid](*args, **params)
    _stats["dispatched"] += 1
    if hit is None and aligned(tensors) and all(
            hasattr(compiled, a) for a in ("run", "function", "packed_metadata")):
        names = _signature(kernel)[0]
        if {k for k in params if k not in names} <= {"num_warps", "num_stages"}:
            # (other options change the compile)
            cache[device] = (compiled, constexpr_tail(kernel, len(args), params))


def compile_threads() -> int:
    """Threads :func:`compile_in_threads` compiles on: ``FASTRES_COMPILE_THREADS`` (a
    positive integer; 1 compiles each kernel at its first launch, one after another), else
    the CPUs this process may use, at most 16."""
    raw = os.environ.get("FASTRES_COMPILE_THREADS", "").strip()
    if raw:
        try:
            n = int(raw)
        except ValueError:
            n = 0
        if n < 1:
            raise ValueError("FASTRES_COMPILE_THREADS must be a positive integer (1: no "
                             f"compile threads), got {raw!r}")
        return n
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # (not on every platform)
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, _COMPILE_THREADS_MAX))


def pooled_kernels(*kernels) -> None:
    """Register JIT kernels that :func:`compile_in_threads`'s warmups compile: after each
    pool, a compile of theirs that failed is dropped from their caches, so that the launch
    compiles it again (Triton 3.8 keeps the failed compile in the kernel's cache, and every
    later launch would raise its stored error, a passing failure such as an out-of-memory
    ``ptxas`` included; 3.6 keeps nothing)."""
    for k in kernels:
        if k not in _POOLED:
            _POOLED.append(k)


def _drop_failed_compiles() -> None:
    for kernel in _POOLED:
        for caches in list(getattr(kernel, "device_caches", {}).values()):
            cache = caches[0]
            for key, entry in list(cache.items()):
                future = getattr(entry, "future", None)  # (a FutureKernel: 3.8)
                if (future is not None and future.done() and not future.cancelled()
                        and future.exception() is not None):
                    cache.pop(key, None)


def compile_in_threads(warmups: Sequence[Callable[[], object]]) -> int:
    """Run ``warmups`` (each a ``kernel.warmup(...)``: Triton binds the arguments and
    compiles the kernel they select without launching it) with Triton's
    ``AsyncCompileMode`` on a pool of :func:`compile_threads` threads, and wait for every
    compile: the tuner's candidates, which would otherwise compile one after another at
    their first launches. Triton releases the GIL for most of a compile: ResNet-50's
    candidates at batch 256 in bf16 (310 over its 24 distinct convolutions, 110 distinct
    kernels) compiled for sm_90 in 24.2 s on 2 threads against 43.0 s on one, on a 2-core CPU
    (``benchmarks/compile_time.py``, Triton 3.8, commit a4bda94).

    Best effort, returns how many warmups ran in the pool (0: none did): with interpreted
    kernels, one thread, fewer than two warmups, a Triton without ``AsyncCompileMode``, or
    one of the caller's own already active, nothing is done. A warmup that raises, or a
    compile that fails, is skipped: the launch compiles it again (for the kernels registered
    with :func:`pooled_kernels`) and raises there, where the tuner records why the candidate
    did not run. A ``FASTRES_COMPILE_THREADS`` that is not a positive integer raises
    ``ValueError`` (as a bad ``FASTRES_TUNE`` does). The async mode is entered in a copy of
    the caller's context, so that an interrupt while it waits for the compiles cannot leave
    it active in the caller's (Triton 3.6 clears it only after every compile returned)."""
    if len(warmups) < 2 or _backend.kernels_interpreted():
        return 0
    workers = min(compile_threads(), len(warmups))
    mode_type = getattr(triton, "AsyncCompileMode", None)
    if workers < 2 or mode_type is None:
        return 0
    try:
        return contextvars.copy_context().run(_compile_in_pool, warmups, workers, mode_type)
    finally:
        _drop_failed_compiles()


def _compile_in_pool(warmups, workers: int, mode_type) -> int:
    with ThreadPoolExecutor(workers, thread_name_prefix="fastres-compile") as pool:
        mode = mode_type(pool, ignore_errors=True)
        try:
            mode.__enter__()
        except RuntimeError:  # the caller's own AsyncCompileMode is active in this context
            return 0
        try:
            for warmup in warmups:
                try:
                    warmup()
                except Exception:  # (raised again where the candidate is launched)
                    pass
        finally:
            mode.__exit__(None, None, None)  # waits for every compile, keeps those that built
    return len(warmups)
