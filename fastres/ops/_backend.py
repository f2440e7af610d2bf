"""Which implementation of an op runs: ``torch`` (the reference), ``triton`` or ``cuda``.

Every op in :mod:`fastres.ops` has one contract and several implementations. An
implementation registers itself here with :func:`register_impl` together with a
``supports(*args)`` predicate; the op's body then asks :func:`choose` which one to run.

The preferred backend comes from, in order: :func:`use_backend` (a context manager),
:func:`set_backend`, the ``FASTRES_BACKEND`` environment variable (empty counts as unset), and
``"auto"``.

``auto`` picks, per call: ``cuda`` then ``triton`` for CUDA tensors (where registered and
supported), ``triton`` for CPU tensors only when the Triton interpreter is on
(``TRITON_INTERPRET=1``), and ``torch`` otherwise. A named backend that cannot run a call
falls back along ``cuda -> triton -> torch`` and says so once per (op, backend, reason).

Measured choice (CUDA tensors): when a call runs on a GPU, :mod:`fastres.tuning` decides
instead of the fixed order above. With ``auto`` it times every registered implementation
that supports the call (and every kernel configuration an implementation offers through
:func:`register_configs`) once per (op, shapes, dtypes, layout, GPU, versions) and remembers
the fastest on disk; with a named backend only that backend's configurations compete. With
``FASTRES_TUNE=0`` or ``torch.use_deterministic_algorithms(True)`` the choice is pinned:
``triton`` (its first configuration), else ``cuda``, else ``torch`` — see
:func:`fastres.tuning.mode`. CPU tensors keep the fixed order (nothing is timed).

Why ``torch.library.custom_op`` and not ``triton_op``: ``triton_op`` would let inductor see
(and fuse around) the Triton kernels, but it fails to compile on a machine without a GPU
(DESIGN.md), and the measured choice between ``triton``/``cuda``/``torch`` happens inside the
op body at run time, which ``triton_op`` (one fixed kernel per op) cannot express. Whether a
CUDA-only ``triton_op`` variant is worth it is to be measured on a GPU before switching.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import os
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from fastres import _warnings

log = logging.getLogger("fastres")

# Whether fp32 convolutions (cuDNN's flag) and matmuls (cuBLAS's) may use TF32, read the way
# ATen reads them for its own ops. torch's newer per-op API (``torch.backends.cudnn.conv.
# fp32_precision = "ieee"``, ``torch.backends.cuda.matmul.fp32_precision = "tf32"``,
# ``torch.backends.fp32_precision``) makes the legacy ``allow_tf32`` getters raise ("a mix of
# the legacy and new APIs") once conv and rnn differ, so the op's own precision is resolved as
# ATen does: the op's setting, else the backend's "all", else the generic one; "tf32" means on.
# (Direct calls: the property lookups cost ~1 us per read on the per-call paths.)
try:
    _fp32_precision = torch._C._get_fp32_precision_getter
    _set_fp32_precision = torch._C._set_fp32_precision_setter
    _fp32_precision("cuda", "conv"), _fp32_precision("cuda", "matmul")
except (AttributeError, RuntimeError):  # pragma: no cover - torch before the per-op API
    _fp32_precision = _set_fp32_precision = None

if _fp32_precision is not None:
    def _allows_tf32(op: str) -> bool:
        precision = _fp32_precision("cuda", op)
        if precision == "none":
            precision = _fp32_precision("cuda", "all")
            if precision == "none":
                precision = _fp32_precision("generic", "all")
        return precision == "tf32"

    def cudnn_allow_tf32() -> bool:
        """cuDNN convolutions' TF32 flag (``torch.backends.cudnn.conv.fp32_precision``)."""
        return _allows_tf32("conv")

    def matmul_allow_tf32() -> bool:
        """cuBLAS matmuls' TF32 flag (``torch.backends.cuda.matmul.fp32_precision``)."""
        return _allows_tf32("matmul")
else:  # pragma: no cover - torch before the per-op API
    try:
        cudnn_allow_tf32 = torch._C._get_cudnn_allow_tf32
        matmul_allow_tf32 = torch._C._get_cublas_allow_tf32
    except AttributeError:
        def cudnn_allow_tf32() -> bool:
            return torch.backends.cudnn.allow_tf32

        def matmul_allow_tf32() -> bool:
            return torch.backends.cuda.matmul.allow_tf32


@contextlib.contextmanager
def tf32_off() -> Iterator[None]:
    """Full fp32 convolutions and matmuls (the precise GPU reference); every TF32 setting,
    legacy or per-op, is as it was afterwards."""
    if _fp32_precision is None:  # pragma: no cover - torch before the per-op API
        saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        try:
            yield
        finally:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
        return
    keys = (("cuda", "conv"), ("cuda", "rnn"), ("cuda", "matmul"))
    saved = [(key, _fp32_precision(*key)) for key in keys]
    for key in keys:
        _set_fp32_precision(*key, "ieee")
    try:
        yield
    finally:
        for key, precision in saved:
            _set_fp32_precision(*key, precision)

BACKENDS = ("auto", "torch", "triton", "cuda")
_FALLBACK_ORDER = ("cuda", "triton", "torch")


@dataclass(frozen=True)
class Impl:
    """One implementation of one op.

    ``fn`` has the op's exact signature. ``supports(*args, **kwargs)`` returns ``None`` when
    the implementation can run the call, or a short reason why not (used in the fallback
    message). ``final`` is False for a stand-in choice that a later call with the same
    arguments may replace (an untuned layer met during CUDA graph capture): callers that
    remember choices (the inference plan) must not remember it.
    """

    op: str
    backend: str
    fn: Callable
    supports: Callable[..., str | None]
    final: bool = True


@dataclass(frozen=True)
class ConfigProvider:
    """Kernel configurations an implementation offers to the tuner.

    ``configs(*args, **kwargs)`` lists the candidate configurations for one call (first =
    the pinned default); ``run(config, *args, **kwargs)`` runs the call with one of them.
    A configuration is a JSON-able value or has ``as_dict()``; ``str(config)`` names it.
    ``warmup(config, *args, **kwargs)`` (optional) compiles what ``run`` would launch without
    launching it: the tuner calls it for every candidate before timing any, on a pool of
    compile threads (:func:`fastres.kernels._direct.compile_in_threads`).
    """

    configs: Callable[..., list]
    run: Callable[..., object]
    warmup: Callable[..., object] | None = None


_IMPLS: dict[str, dict[str, Impl]] = {}
_CONFIGS: dict[tuple[str, str], ConfigProvider] = {}
_state = threading.local()
_global_backend: str | None = None
_warned: set[tuple[str, str, str]] = set()
# Bumped whenever an implementation or provider is (re)registered: the tuner's per-process
# memo of choices is dropped then.
_generation = 0
# Device types whose calls go through the measured choice (tests may add "cpu" with a fake
# timer through fastres.tuning.configure).
_TUNED_DEVICE_TYPES: frozenset[str] = frozenset({"cuda"})
_tuned_choose: Callable | None = None  # fastres.tuning.choose, imported on first use


def _always(*args, **kwargs) -> str | None:
    return None


def register_impl(op: str, backend: str, fn: Callable, supports: Callable | None = None) -> None:
    """Register ``fn`` as the ``backend`` implementation of ``op``."""
    global _generation
    if backend not in _FALLBACK_ORDER:
        raise ValueError(f"backend must be one of {_FALLBACK_ORDER}, got {backend!r}")
    _IMPLS.setdefault(op, {})[backend] = Impl(op, backend, fn, supports or _always)
    _generation += 1
    invalidate_choices()  # (the generation can be put back by a test; the epoch never is)


def register_configs(op: str, backend: str, configs: Callable[..., list],
                     run: Callable[..., object],
                     warmup: Callable[..., object] | None = None) -> None:
    """Offer ``backend``'s kernel configurations for ``op`` to the tuner (see
    :class:`ConfigProvider`). Without a provider an implementation is one candidate."""
    global _generation
    if backend not in _FALLBACK_ORDER:
        raise ValueError(f"backend must be one of {_FALLBACK_ORDER}, got {backend!r}")
    _CONFIGS[(op, backend)] = ConfigProvider(configs, run, warmup)
    _generation += 1
    invalidate_choices()


def config_provider(op: str, backend: str) -> ConfigProvider | None:
    """The configurations ``backend`` offers for ``op``, if any."""
    return _CONFIGS.get((op, backend))


def implementations(op: str) -> dict[str, Impl]:
    """The registered implementations of ``op``, by backend name."""
    _load_optional_backends()
    return dict(_IMPLS.get(op, {}))


def _validate(name: str, source: str = "fastres backend") -> str:
    if not isinstance(name, str):
        raise TypeError(f"{source} must be a string, one of {BACKENDS}, got {name!r}")
    key = name.strip().lower()
    if key not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")
    return key


def get_backend() -> str:
    """The backend preference in force for this thread."""
    local = getattr(_state, "stack", None)
    if local:
        return local[-1]
    if _global_backend is not None:
        return _global_backend
    # (set but empty is unset, as for FASTRES_TUNE and FASTRES_DISABLE_EXTENSION)
    return _validate(os.environ.get("FASTRES_BACKEND", "").strip() or "auto",
                     "the FASTRES_BACKEND environment variable")


def set_backend(name: str | None) -> None:
    """Set the process-wide backend preference (``None`` returns to ``FASTRES_BACKEND``)."""
    global _global_backend
    _global_backend = None if name is None else _validate(name)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the enclosed code with backend preference ``name`` (this thread only)."""
    name = _validate(name)
    stack = getattr(_state, "stack", None)
    if stack is None:
        stack = _state.stack = []
    stack.append(name)
    try:
        yield
    finally:
        stack.pop()


# Whether fastres's Triton kernels were defined as interpreted functions: Triton decides
# once, when ``@triton.jit`` runs (TRITON_INTERPRET read then); set by fastres.kernels.conv.
_kernels_interpreted: bool | None = None
_TRITON_TRUE = ("1", "true", "on", "yes", "y")  # Triton's reading of a boolean variable


def triton_interpret_env() -> bool:
    """What ``TRITON_INTERPRET`` says now, read as Triton reads it (``1``/``true``/``on``/
    ``yes``/``y``, any case: on; ``0``, ``false``, ``off``, empty, unset: off)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in _TRITON_TRUE


# Triton's interpreter patches triton.language module-wide for the length of a launch, so two
# threads launching at once break each other ("Did you forget to add @triton.jit?"); compiled
# launches need no lock.
_interpreter_lock = threading.RLock()


class _Deferred(threading.local):
    def __init__(self):
        self.depth = 0
        self.pending: dict[Callable[[], None], None] = {}  # (ordered, one per write)


_deferred = _Deferred()


def defer_write(write: Callable[[], None]) -> bool:
    """Inside :func:`deferred_writes` (in this thread): keep ``write`` (a callable that does
    not raise; equal callables, such as one object's bound method, run once) for the end of
    the outermost block, and return True; outside, False (the caller writes now)."""
    if not _deferred.depth:
        return False
    _deferred.pending[write] = None
    return True


@contextlib.contextmanager
def deferred_writes():
    """The writes :func:`defer_write` is given in this block run once when the outermost
    block ends, an exception included: the plan's forward that chooses its layers writes the
    tuning cache once (:class:`fastres.tuning.TuningCache`), not once per layer."""
    _deferred.depth += 1
    try:
        yield
    finally:
        _deferred.depth -= 1
        if not _deferred.depth:
            pending, _deferred.pending = _deferred.pending, {}
            for write in pending:
                write()


def launching() -> contextlib.AbstractContextManager:
    """Hold around a Triton kernel launch: one interpreted launch at a time in this process
    (nothing when the kernels are compiled)."""
    return _interpreter_lock if kernels_interpreted() else contextlib.nullcontext()


def kernels_interpreted() -> bool:
    """True when fastres's Triton kernels are interpreted functions (they run on CPU tensors,
    and need the interpreter's workarounds): fixed when the kernels were defined. Before
    that, what ``TRITON_INTERPRET`` says now."""
    if _kernels_interpreted is not None:
        return _kernels_interpreted
    return triton_interpret_env()


def triton_interpreted() -> bool:
    """True when Triton kernels run under the CPU interpreter, so that CPU tensors may go to
    them: ``TRITON_INTERPRET`` is on (as Triton reads it) and the kernels were defined
    interpreted. Set after the kernels were compiled-mode kernels, it does not send CPU
    tensors to them (Triton: "0 active drivers"); unset afterwards, CPU calls run the
    reference again."""
    return triton_interpret_env() and kernels_interpreted()


def interpreter_problem() -> str | None:
    """Why Triton's CPU interpreter cannot run fastres's kernels in this environment, or None.

    Known case: Triton before 3.7 turns loop bounds into Python ints with ``int()`` of a
    1-element array, which NumPy 2.3 and later reject ("only 0-dimensional arrays can be
    converted to Python scalars"), so every kernel with a runtime loop bound fails (seen with
    Triton 3.6.0 and NumPy 2.4.6; Triton 3.7 and 3.8 are fixed).
    """
    return _interpreter_problem()


@functools.lru_cache(maxsize=None)
def _interpreter_problem() -> str | None:
    try:
        import numpy
        import triton
    except ImportError:  # no Triton: its implementations are not registered at all
        return None
    try:
        with warnings.catch_warnings():  # NumPy 1.25 to 2.2 deprecate it (with -W error: raise)
            warnings.simplefilter("ignore", DeprecationWarning)
            int(numpy.zeros(1))
        numpy_rejects = False
    except TypeError:
        numpy_rejects = True
    return interpreter_problem_for(triton.__version__, numpy.__version__, numpy_rejects)


def interpreter_problem_for(triton_version: str, numpy_version: str,
                            numpy_rejects_1elem_int: bool) -> str | None:
    """:func:`interpreter_problem` for given versions (and whether NumPy's ``int()`` rejects a
    1-element array)."""
    if not numpy_rejects_1elem_int or _leading_ints(triton_version) >= (3, 7):
        return None
    return (f"Triton {triton_version}'s interpreter cannot run with NumPy {numpy_version}: it "
            "calls int() on 1-element arrays, which NumPy >= 2.3 rejects; install "
            "'numpy<2.3' or Triton >= 3.7")


def _leading_ints(version: str) -> tuple[int, ...]:
    out = []
    for part in version.split("+")[0].split("."):
        digits = "".join(itertools.takewhile(str.isdigit, part))
        if not digits:
            break
        out.append(int(digits))
    return tuple(out)


def _warn_once(key: tuple, msg: str) -> None:
    """Warn ``fastres: msg`` (at the caller's line outside fastres) the first time ``key`` is
    seen."""
    if _warnings.first_time(_warned, key):
        _warnings.warn(f"fastres: {msg}")


def _say_once(op: str, backend: str, reason: str) -> None:
    _warn_once((op, backend, reason),
               f"{op} cannot run on the {backend!r} backend ({reason}); falling back")


_optional_loaded = False
_missing: dict[str, str] = {}


def note_missing(backend: str, reason: str) -> None:
    """Record that an optional backend could not be loaded (e.g. ``fastres._C`` not built).

    The first call that would have used it on a device it serves says so once.
    """
    _missing[backend] = reason


_load_lock = threading.RLock()


def _load_optional_backends() -> None:
    """Import the Triton and CUDA implementations once; each registers itself if it can.

    Another thread's first call waits until they are registered (marked loaded only then):
    it would otherwise choose among the ``torch`` implementation alone, and the tuner would
    settle its providers without the Triton configurations, for good."""
    global _optional_loaded
    if _optional_loaded:
        return
    with _load_lock:
        if _optional_loaded:  # loaded by another thread meanwhile
            return
        # (an RLock: a call made from these imports finds the modules in sys.modules)
        try:
            for module in ("fastres.kernels.triton_impls", "fastres._ext_impls"):
                try:
                    __import__(module)
                except ImportError as exc:  # a missing optional backend is not an error
                    log.info("fastres: optional backend %s not available: %s", module, exc)
            # and the tuner's configuration providers, which it would otherwise register at
            # its first call, bumping the generation: choice_state() read before a model's
            # first tuned forward would differ from the one read after it (a CUDA-graphs
            # wrapper keyed its first graph by the former and captured the same signature
            # again, seen on an H200)
            from fastres import tuning

            tuning._ensure_default_providers()
        finally:  # tried once, as before, even when an import raised something else
            _optional_loaded = True


def _device_ok(backend: str, device: torch.device) -> str | None:
    if backend == "torch":
        return None
    if backend == "cuda":
        return None if device.type == "cuda" else f"tensors are on {device.type}, not cuda"
    if backend == "triton":
        if device.type == "cuda":
            return None
        if triton_interpreted():
            return interpreter_problem()
        return f"tensors are on {device.type} and TRITON_INTERPRET is not set"
    return "unknown backend"


def choose(op: str, device: torch.device, *args, **kwargs) -> Impl:
    """The implementation of ``op`` that runs this call."""
    _load_optional_backends()
    impls = _IMPLS.get(op)
    if not impls or "torch" not in impls:
        raise RuntimeError(f"fastres: op {op!r} has no reference implementation registered")
    pref = get_backend()
    if pref == "torch":
        return impls["torch"]
    if device.type in _TUNED_DEVICE_TYPES:
        global _tuned_choose
        if _tuned_choose is None:
            from fastres.tuning import choose as _tuned_choose
        return _tuned_choose(op, device, pref, impls, args, kwargs)
    if pref == "auto":
        return auto_choice(op, device, impls, args, kwargs)
    return named_choice(op, device, pref, impls, args, kwargs)


def run(op: str, x: torch.Tensor, *args):
    """Choose the implementation of ``op`` for ``x``'s device and run it: the body of every
    fastres custom op, and what the inference plan calls directly outside tracing."""
    return choose(op, x.device, x, *args).fn(x, *args)


def off_current_device(x: torch.Tensor) -> bool:
    """True when ``x`` is a CUDA tensor on another device than the current one. Triton
    launches, CUDA graph capture and graph pools follow the current device, whatever device
    the tensors are on: the callers switch to ``x.device`` first."""
    return x.is_cuda and x.device.index != torch.cuda.current_device()


def run_op(op: str, x: torch.Tensor, *args):
    """:func:`run` on ``x``'s CUDA device (the body of the custom ops, which anyone can call;
    see :func:`off_current_device`)."""
    if off_current_device(x):
        with torch.cuda.device(x.device):
            return run(op, x, *args)
    return run(op, x, *args)


# Bumped when a choice made earlier may no longer be the one :func:`choose` would make for the
# same arguments and the same choice_state() otherwise (fastres.tuning drops its memo).
_choice_epoch = 0


def invalidate_choices() -> None:
    """Forget remembered choices (see :func:`choice_state`)."""
    global _choice_epoch
    _choice_epoch += 1


def choice_epoch() -> tuple[int, int]:
    """Changes whenever choices made earlier may be stale: an implementation or provider was
    registered, or :func:`invalidate_choices` ran."""
    return _generation, _choice_epoch


def choice_state() -> tuple:
    """Everything :func:`choose` depends on besides the op and its arguments' shapes, dtypes,
    strides and device: the backend preference of this thread, the registered
    implementations and configuration providers, the tuned device types, the tuning mode
    (``FASTRES_TUNE``, deterministic algorithms), the TF32 flags, ``TRITON_INTERPRET`` and
    whether the interpreter can run here, and an epoch that :mod:`fastres.tuning` bumps when
    it forgets its choices. Equal states and equal arguments get the same choice, unless
    :func:`choose` returned one that is not ``final``. ~5 us on a CPU core."""
    _load_optional_backends()  # (their registration bumps the generation: before reading it)
    interpreted = triton_interpreted()
    return (get_backend(), _generation, _choice_epoch, _TUNED_DEVICE_TYPES,
            os.environ.get("FASTRES_TUNE"), torch.are_deterministic_algorithms_enabled(),
            cudnn_allow_tf32(), matmul_allow_tf32(), interpreted,
            interpreted and interpreter_problem())


def runnable(op: str, backend: str, device: torch.device, impls: dict[str, Impl], args,
             kwargs) -> Impl | None:
    """``impls[backend]`` when it is registered and can run this call on ``device``.

    Says once why not when the user asked for that backend on this device without naming it:
    an optional backend that failed to load (the CUDA extension not built), or
    ``TRITON_INTERPRET=1`` on the CPU with an interpreter that cannot run here."""
    impl = impls.get(backend)
    if impl is None and backend in _missing and _device_ok(backend, device) is None:
        # said once per backend; the note_missing reason names the ops that run without it
        _warn_once(("(missing)", backend, _missing[backend]), _missing[backend])
    if impl is None:
        return None
    reason = _device_ok(backend, device)
    if reason is not None:
        if backend == "triton" and device.type != "cuda" and triton_interpreted():
            _say_once(op, backend, reason)
        return None
    return impl if impl.supports(*args, **kwargs) is None else None


def auto_choice(op: str, device: torch.device, impls: dict[str, Impl], args, kwargs) -> Impl:
    """The fixed ``auto`` order: ``cuda``, ``triton``, ``torch`` (first that runs the call)."""
    for backend in _FALLBACK_ORDER:
        impl = runnable(op, backend, device, impls, args, kwargs)
        if impl is not None:
            return impl
    return impls["torch"]


def named_choice(op: str, device: torch.device, pref: str, impls: dict[str, Impl], args,
                 kwargs) -> Impl:
    """A named backend: use it, or fall back along the chain and say why once."""
    start = _FALLBACK_ORDER.index(pref)
    for backend in _FALLBACK_ORDER[start:]:
        impl = impls.get(backend)
        if impl is None:
            loaded = backend not in _missing and any(backend in by for by in _IMPLS.values())
            reason = (f"the {backend} backend has no {op} implementation" if loaded else
                      "not built or not installed")
            _say_once(op, backend, reason)
            continue
        reason = _device_ok(backend, device) or impl.supports(*args, **kwargs)
        if reason is None:
            return impl
        _say_once(op, backend, reason)
    return impls["torch"]
