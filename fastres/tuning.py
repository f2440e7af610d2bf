"""Measured choice of implementation and kernel configuration, remembered on disk.

On a GPU, the first call of an op for a new *layer signature* — (op, argument shapes, dtypes
and memory layout, TF32 flags for fp32, the competing backends) on a given GPU with given
library versions — times every candidate once with CUDA events and keeps the fastest:

- candidates are the registered implementations that support the call (``triton``, ``cuda``,
  ``torch``; with a named backend, only that one), each expanded into the kernel
  configurations it offers (:func:`fastres.ops._backend.register_configs`; the Triton
  convolution offers its pruned autotuning table);
- each candidate's output is checked against the ``torch`` reference before it is timed (a
  configuration that computes garbage on this GPU is rejected, never chosen);
- the choice goes into the tuning cache: one JSON file per environment under
  :func:`cache_dir` (``$FASTRES_CACHE_DIR``, default ``$XDG_CACHE_HOME/fastres`` or
  ``~/.cache/fastres``), so another process on the same GPU and versions starts with every
  known layer already decided and times nothing. Triton's own compile cache
  (``~/.triton/cache``) is left on, so it does not recompile either.

Cache file (``tuning-<gpu>-<hash>.json``)::

    {"format": "fastres-tuning-cache", "schema": 1,
     "env": {"device_type": "cuda", "device": "NVIDIA H100 80GB HBM3", "capability": "9.0",
             "torch": "2.11.0", "triton": "3.6.0", "fastres": "0.1.0", "cuda": "12.8"},
     "entries": {"<layer key>": {"backend": "triton", "label": "128x128x64 g8 w4 s3",
                                 "config": {...}, "ms": 0.0123, "timings": {...},
                                 "rejected": {...}, "tuned_at": "..."}}}

The environment is part of the key (the file name hashes it and the loader checks it). The
file is written atomically (temporary file in the same directory + ``os.replace``) under a
lock file (``<file>.lock``, :mod:`filelock`), merging what is on disk with this process's new
entries, so concurrent tuners never lose or corrupt each other's work. A corrupt, truncated or
foreign (other format, schema or environment) file is ignored with a
:class:`TuningCacheWarning` and replaced at the next write; an unwritable cache directory
keeps the choices in memory for the process (warned once). Nothing here raises into a
forward pass.

When nothing is timed:

- ``FASTRES_TUNE=0`` (or ``torch.use_deterministic_algorithms(True)``): **pinned mode**. Each
  op runs one documented choice — the first of ``triton``, ``cuda``, ``torch`` that supports
  the call, with its *first* configuration (for the Triton convolution the first row of its
  pruned table, :func:`fastres.kernels.conv.conv_configs`) — chosen without timing or
  reading the cache, so results are bit-identical from run to run and process to process.
  On CPU tensors the choice is :mod:`fastres.ops._backend`'s fixed order (``torch``, or the
  interpreted ``triton`` under ``TRITON_INTERPRET=1``).
- during CUDA graph capture (``torch.cuda.is_current_stream_capturing()``) or
  ``torch.compile`` tracing: a layer that is not tuned yet runs the pinned choice for that
  call (said once) and is tuned at its next ordinary call. Tune before capturing:
  :func:`fastres.optimize` warms up first, :func:`tune_model` / ``fastres tune`` ahead of time.

Tuning shows a progress bar (tqdm) when stderr is a terminal and is silent otherwise
(decisions are logged at INFO on the ``fastres`` logger).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import glob
import hashlib
import json
import logging
import math
import numbers
import os
import platform
import re
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from fastres import _warnings
from fastres._env import OFF, ON
from fastres.kernels.configs import tables_digest
from fastres.ops import _backend
from fastres.ops._checks import FLOAT_DTYPES, as_int, cuda_device_problem

log = logging.getLogger("fastres")

FORMAT = "fastres-tuning-cache"
SCHEMA = 1
PINNED_ORDER = ("triton", "cuda", "torch")
_LOCK_TIMEOUT_S = 60.0

__all__ = [
    "Candidate",
    "TuningCache",
    "TuningCacheWarning",
    "cache_dir",
    "cache_path",
    "configure",
    "mode",
    "reset",
    "stats",
    "tune_model",
]


class TuningCacheWarning(UserWarning):
    """A tuning cache file could not be used (corrupt, truncated, foreign or unwritable)."""


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One way to run one call: a backend, optionally with a kernel configuration.

    ``fn`` has the op's signature; ``label`` names the configuration (the backend's name when
    it has none); ``config`` is its JSON-able description (recorded in the cache).
    ``warmup`` (optional, the op's signature too) compiles what ``fn`` would launch, without
    launching it (see :class:`fastres.ops._backend.ConfigProvider`).
    """

    backend: str
    label: str
    config: Any
    fn: Callable
    warmup: Callable | None = None

    @property
    def name(self) -> str:
        return self.backend if self.label == self.backend else f"{self.backend}:{self.label}"


# -- settings (the injectable timer and candidates are for tests and experiments) ------------

Timer = Callable[[Callable[[], Any], Candidate], float]
CandidateHook = Callable[[str, torch.device, tuple, dict], "list[Candidate] | None"]


@dataclasses.dataclass
class _Settings:
    timer: Timer | None = None  # None: CUDA events on CUDA, perf_counter elsewhere
    candidates: CandidateHook | None = None
    progress: bool | None = None  # None: a bar when stderr is a terminal
    check: bool = True  # compare each candidate with the torch reference before timing


_settings = _Settings()
_UNSET = object()


def configure(*, timer: Timer | None | object = _UNSET,
              devices: Iterable[str] | object = _UNSET,
              candidates: CandidateHook | None | object = _UNSET,
              progress: bool | None | object = _UNSET,
              check: bool | object = _UNSET) -> None:
    """Change how tuning runs (tests and experiments; defaults suit normal use).

    ``timer(run, candidate) -> milliseconds``: how one candidate is timed (default: CUDA
    events, median of repeated runs). ``devices``: device types whose calls are tuned
    (default ``("cuda",)``; a test adds ``"cpu"`` with a fake timer). ``candidates(op,
    device, args, kwargs)``: a list of :class:`Candidate` replacing the registered ones (or
    ``None`` to keep them). ``progress``: force the progress bar on/off. ``check``: verify
    candidates against the reference before timing. Clears the per-process memo of choices.
    """
    if timer is not _UNSET:
        _settings.timer = timer  # type: ignore[assignment]
    if candidates is not _UNSET:
        _settings.candidates = candidates  # type: ignore[assignment]
    if progress is not _UNSET:
        _settings.progress = progress  # type: ignore[assignment]
    if check is not _UNSET:
        _settings.check = bool(check)
    if devices is not _UNSET:
        if isinstance(devices, str):  # "cuda", not the letters c, u, d, a
            devices = (devices,)
        _backend._TUNED_DEVICE_TYPES = frozenset(devices)  # type: ignore[arg-type]
    _memo.clear()
    _backend.invalidate_choices()  # and the choices the inference plans remember


def reset() -> None:
    """Forget everything this process knows (memo, loaded caches, statistics, settings):
    the next call behaves as in a fresh process."""
    global _settings
    _settings = _Settings()
    _backend._TUNED_DEVICE_TYPES = frozenset({"cuda"})
    _memo.clear()
    _names.clear()
    _caches.clear()
    _backend.invalidate_choices()
    _envs.clear()
    _said.clear()
    for k in _stats:
        _stats[k] = 0


def mode() -> str:
    """``"pinned"`` when ``FASTRES_TUNE=0`` (or ``false``/``off``/``no``, any case) or
    deterministic algorithms are on, else ``"tune"`` (``FASTRES_TUNE`` unset, empty, ``1``,
    ``true``, ``on`` or ``yes``; any other value is a ``ValueError``: ``pinned`` or
    ``disabled`` must not silently tune). Pinned: no timing and no cache; each op runs the
    first of ``triton``, ``cuda``, ``torch`` that supports the call, with its first
    configuration."""
    v = os.environ.get("FASTRES_TUNE")
    if v is not None:
        v = v.strip().lower()
        if v in OFF:
            return "pinned"
        if v not in ON:
            raise ValueError(
                "the FASTRES_TUNE environment variable must be 0/false/off/no (pinned "
                "choices) or 1/true/on/yes (tune; also when unset or empty), got "
                f"{os.environ['FASTRES_TUNE']!r}")
    if torch.are_deterministic_algorithms_enabled():
        return "pinned"
    return "tune"


_stats = {"tuned": 0, "timed": 0, "disk_hits": 0, "pinned": 0, "deferred": 0}


def stats() -> dict[str, int]:
    """Counters of this process: layers ``tuned`` (measured), candidates ``timed``,
    ``disk_hits`` (choices read from the cache), ``pinned`` choices, ``deferred`` (untuned
    layers met during graph capture or tracing)."""
    return dict(_stats)


# -- the cache file --------------------------------------------------------------------------

def expand_user(path: str | os.PathLike, what: str) -> Path:
    """``Path(path).expanduser()``, with an ``OSError`` naming ``what`` where a ``~user`` or
    ``~`` in it names no home directory (``expanduser`` raises ``RuntimeError``)."""
    try:
        return Path(path).expanduser()
    except (RuntimeError, KeyError) as exc:
        raise OSError(f"{what} {str(path)!r} starts with a home directory that cannot be "
                      f"found ({exc})") from exc


def dir_variable(name: str) -> str | None:
    """The directory environment variable ``name``, or ``None`` where it is unset, empty or
    blank (a blank one made a folder named by its spaces in the working directory)."""
    value = os.environ.get(name)
    return value if value and value.strip() else None


def cache_dir() -> Path:
    """``$FASTRES_CACHE_DIR``, else ``$XDG_CACHE_HOME/fastres``, else ``~/.cache/fastres``
    (``OSError`` where one of these names a home directory that cannot be found). A variable
    that is empty or blank counts as unset (:func:`dir_variable`)."""
    env = dir_variable("FASTRES_CACHE_DIR")
    if env:
        return expand_user(env, "FASTRES_CACHE_DIR")
    xdg = dir_variable("XDG_CACHE_HOME")
    if xdg:
        return expand_user(xdg, "XDG_CACHE_HOME") / "fastres"
    try:
        home = Path.home()
    except (RuntimeError, KeyError, OSError) as exc:  # no $HOME and no passwd entry
        raise OSError("cannot find the home directory for the default tuning cache "
                      f"directory ~/.cache/fastres ({exc}); set FASTRES_CACHE_DIR or "
                      "XDG_CACHE_HOME") from exc
    return home / ".cache" / "fastres"


def _dist_version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return None


_envs: dict[torch.device, dict] = {}


def environment(device: torch.device) -> dict:
    """What, besides the layer, a choice depends on: GPU name and compute capability, torch,
    triton, fastres and CUDA versions, and the Triton candidate tables (their digest)."""
    env = _envs.get(device)
    if env is not None:
        return env
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        name = torch.cuda.get_device_name(idx)
        cap = "{}.{}".format(*torch.cuda.get_device_capability(idx))
    else:
        name, cap = platform.processor() or platform.machine() or device.type, None
    import fastres

    triton_version = None
    triton_mod = sys.modules.get("triton")
    if triton_mod is not None:
        triton_version = getattr(triton_mod, "__version__", None)
    env = {
        "device_type": device.type,
        "device": name,
        "capability": cap,
        "torch": torch.__version__,
        "triton": triton_version or _dist_version("triton"),
        "fastres": getattr(fastres, "__version__", None),
        "cuda": torch.version.cuda,
        "triton_tables": tables_digest(),
    }
    _envs[device] = env
    return env


def nearest_existing(path: Path) -> Path:
    """``path`` if it exists, else its nearest ancestor that does (what a directory that is
    to be made would be made in, or a file in the way); ``OSError`` from a folder that may
    not be looked into."""
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


_DEVICE_EXPECTED = "expected a torch.device or a device string such as 'cuda', 'cuda:0' or 'cpu'"


def _as_device(device: Any, who: str) -> torch.device:
    """``device`` as a ``torch.device`` whose environment can be read, or a ``TypeError`` /
    ``ValueError`` saying what was expected and what was given (not torch's own errors from
    deep inside ``torch.cuda``)."""
    if isinstance(device, torch.device):
        dev = device
    elif isinstance(device, str) or (isinstance(device, int) and not isinstance(device, bool)):
        try:
            dev = torch.device(device)
        except (RuntimeError, ValueError, TypeError):
            raise ValueError(f"{who}: {_DEVICE_EXPECTED}, got {device!r}") from None
    else:
        raise TypeError(f"{who}: {_DEVICE_EXPECTED}, got {device!r}")
    problem = cuda_device_problem(dev)
    if problem is not None:
        expected = (f"cuda:0 to cuda:{torch.cuda.device_count() - 1}"
                    if torch.cuda.is_available() else "'cpu'")
        raise ValueError(f"{who}: device {str(dev)!r} asked for, but {problem}; expected "
                         f"{expected}")
    return dev


def cache_path(device: torch.device | str = "cuda") -> Path:
    """The cache file for ``device``'s environment (see :func:`environment`).

    A device that is not a device (a bogus string, ``None``), a CUDA device this machine does
    not have, or ``"meta"`` (no data: nothing runs or is timed there) is a ``TypeError`` /
    ``ValueError``."""
    device = _as_device(device, "cache_path")
    if device.type == "meta":
        raise ValueError("cache_path: 'meta' has no tuning cache (meta tensors hold no data: "
                         "nothing runs or is timed on them); expected a cuda or cpu device")
    return _cache_file(device)


def _cache_file(device: torch.device) -> Path:
    env = environment(device)
    digest = hashlib.sha1(json.dumps(env, sort_keys=True).encode()).hexdigest()[:12]
    slug = re.sub(r"[^A-Za-z0-9]+", "-", str(env["device"])).strip("-")[:40] or "device"
    return cache_dir() / f"tuning-{slug}-{digest}.json"


def _valid_record(rec: Any) -> bool:
    return isinstance(rec, dict) and isinstance(rec.get("backend"), str) and \
        isinstance(rec.get("label"), str)


class TuningCache:
    """One environment's choices: ``{layer key: record}``, backed by one JSON file.

    :meth:`get` reads memory; :meth:`put` records a new choice and writes the file at once
    (lock, re-read, merge, atomic replace), or, inside
    :func:`fastres.ops._backend.deferred_writes`, when the outermost one ends (a forward that
    chooses its layers writes once, not once per layer: each write re-reads and rewrites the
    whole file, under its lock). Every failure to read or write is a :class:`TuningCacheWarning`,
    never an exception; the choices not written stay in memory (:attr:`unsaved`) and go with
    the next write. After a failed write, later writes do not wait for the file's lock (a
    writer that holds it, stopped or on a slow disk, held up every new layer's forward for the
    lock's full timeout, again and again); :meth:`save` with ``wait=True`` does.
    """

    def __init__(self, path: str | os.PathLike | None, env: dict):
        # None: no file (no directory could be named for it): the choices live in memory
        self.path = None if path is None else Path(path)
        self.env = env
        self.entries: dict[str, dict] = {}
        self._new: dict[str, dict] = {}
        self._write_failed = False
        self.write_error: str | None = None  # why the last write failed (None: it did not)
        self.entries = self._read(warn=True)

    # reading
    def _read(self, warn: bool, for_merge: bool = False) -> dict[str, dict]:
        if self.path is None:
            return {}
        try:
            raw = self.path.read_bytes()
        except (FileNotFoundError, NotADirectoryError):  # (a file where a directory should be:
            return {}  # no cache file there; save() says what is in the way)
        except OSError as exc:
            if for_merge:
                # there but unreadable (permissions, ...): replacing it would drop what other
                # processes saved in it
                raise OSError(f"the existing file cannot be read ({exc}); not replacing it")
            if warn:
                self._warn(f"cannot read tuning cache {self.path} ({exc}); ignoring it")
            return {}
        try:  # (bytes that are not UTF-8: read, but corrupt, as JSON that does not parse)
            data = json.loads(raw.decode("utf-8"))
        except (ValueError, RecursionError) as exc:  # (RecursionError: nested too deeply)
            if warn:
                self._warn(f"tuning cache {self.path} is corrupt or truncated ({exc}); "
                           "ignoring it, it will be rewritten")
            return {}
        problem = self._foreign(data)
        if problem:
            if warn:
                self._warn(f"tuning cache {self.path} is foreign ({problem}); ignoring it, it "
                           "will be rewritten")
            return {}
        return {k: v for k, v in data["entries"].items() if _valid_record(v)}

    def _foreign(self, data: Any) -> str | None:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            return f"not a {FORMAT} file"
        if data.get("schema") != SCHEMA:
            return f"schema {data.get('schema')!r}, this fastres reads schema {SCHEMA}"
        if data.get("env") != self.env:
            return f"written for {data.get('env')!r}, this process is {self.env!r}"
        if not isinstance(data.get("entries"), dict):
            return "no entries table"
        return None

    @staticmethod
    def _warn(msg: str) -> None:
        _warnings.warn(f"fastres: {msg}", TuningCacheWarning)

    # using
    def get(self, key: str) -> dict | None:
        return self.entries.get(key)

    @property
    def unsaved(self) -> int:
        """Choices made in this process and not written to the file yet."""
        return 0 if self.path is None else len(self._new)

    def put(self, key: str, record: dict) -> None:
        self.entries[key] = record
        self._new[key] = record
        if not _backend.defer_write(self.save):
            self.save()

    def save(self, wait: bool | None = None) -> None:
        """Merge this process's new entries into the file, under the lock, atomically.
        ``wait``: wait up to a minute for the lock (``None``: unless a write failed
        before)."""
        if not self._new:
            return
        if self.path is None:  # (said when the cache was made)
            self._new.clear()
            return
        if wait is None:
            wait = not self._write_failed
        try:
            import filelock

            self.path.parent.mkdir(parents=True, exist_ok=True)
            with filelock.FileLock(str(self.path) + ".lock",
                                   timeout=_LOCK_TIMEOUT_S if wait else 0):
                merged = self._read(warn=False, for_merge=True)
                merged.update(self._new)
                self._write(merged)
                self._sweep_temporaries()
        except Exception as exc:  # read-only directory, lock timeout, disk full, ...
            self.write_error = f"{type(exc).__name__}: {exc}"
            if not self._write_failed:
                self._write_failed = True
                blocker = self._not_a_directory()
                why = (f": {blocker} is a file, not a directory (the cache directory is "
                       "$FASTRES_CACHE_DIR, else $XDG_CACHE_HOME/fastres or ~/.cache/fastres)"
                       if blocker is not None else f" ({exc})")
                self._warn(f"cannot write tuning cache {self.path}{why}; this process keeps "
                           "its choices in memory")
            return
        self._new.clear()
        self.write_error = None
        merged.update(self.entries)  # keep what this process decided in memory
        self.entries = merged

    def _not_a_directory(self) -> Path | None:
        """The nearest existing folder of the cache file's directory, when it is not a
        directory (``FASTRES_CACHE_DIR`` naming a file): what stops the directory from being
        made."""
        try:
            p = nearest_existing(self.path.parent)
            return p if p.exists() and not p.is_dir() else None
        except OSError:  # (a folder we may not look into): nothing more to say
            return None

    def _sweep_temporaries(self) -> None:
        """Remove temporaries that writers left behind (killed, or interrupted inside
        ``mkstemp``, before the file had a name to clean up): writes happen under the lock
        this holds, so an old one belongs to no writer."""
        cutoff = time.time() - _STALE_TMP_S
        with contextlib.suppress(OSError):  # (the write succeeded: this must not undo it)
            for tmp in self.path.parent.glob(glob.escape(self.path.name) + ".*.tmp"):
                with contextlib.suppress(OSError):
                    if tmp.stat().st_mtime < cutoff:
                        tmp.unlink()

    def _write(self, entries: dict[str, dict]) -> None:
        data = {"format": FORMAT, "schema": SCHEMA, "env": self.env, "entries": entries}
        fd, tmp, f = -1, None, None
        try:
            fd, tmp = tempfile.mkstemp(prefix=self.path.name + ".", suffix=".tmp",
                                       dir=self.path.parent)
            if hasattr(os, "fchmod"):  # mkstemp makes it 0600: other users could not read it
                os.fchmod(fd, _FILE_MODE)
            f = os.fdopen(fd, "w", encoding="utf-8")  # (closes fd from here on)
            with f:
                json.dump(data, f, indent=1, sort_keys=True)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            if f is None and fd >= 0:  # (the descriptor leaked when fchmod failed)
                with contextlib.suppress(OSError):
                    os.close(fd)
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            raise


_STALE_TMP_S = 600.0  # a temporary older than this, seen under the lock, is a dead writer's
_FILE_MODE = 0o644  # a shared cache directory: everyone reads, the owner rewrites
_caches: dict[Path | str, TuningCache] = {}


def cache_for(device: torch.device | str) -> TuningCache:
    """The (loaded) tuning cache of ``device``'s environment (a ``torch.device`` or a device
    string, checked as :func:`cache_path` checks it; a ``torch.device``, which is what the
    forward pass passes, is taken as it is)."""
    if not isinstance(device, torch.device):
        device = _as_device(device, "cache_for")
    try:
        path = _cache_file(device)
    except OSError as exc:  # no directory can be named (no home directory): memory only
        key = f"in memory: {device}"
        cache = _caches.get(key)
        if cache is None:
            TuningCache._warn(f"{exc}; this process keeps its choices in memory")
            cache = _caches[key] = TuningCache(None, environment(device))
        return cache
    cache = _caches.get(path)
    if cache is None:
        cache = _caches[path] = TuningCache(path, environment(device))
    return cache


# -- layer keys --------------------------------------------------------------------------------

_DT = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16",
       torch.float64: "f64"}


def _layout(t: torch.Tensor) -> str:
    if t.is_contiguous():
        return ""
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return ":cl"
    return ":s" + ",".join(map(str, t.stride()))


def _unaligned(t: torch.Tensor) -> bool:
    """``t``'s data is not 16-byte aligned (a tensor with no data, a meta or fake one while
    tracing, counts as aligned)."""
    from torch._subclasses.fake_tensor import is_fake

    if t.device.type == "meta" or is_fake(t):
        return False
    try:
        return t.data_ptr() % 16 != 0
    except (RuntimeError, NotImplementedError):  # no storage: a sparse tensor, or torch's
        return False  # FunctionalTensor (RuntimeError); a subclass without data_ptr


def _sig(a: Any) -> str:
    if isinstance(a, torch.Tensor):
        dt = _DT.get(a.dtype, str(a.dtype).replace("torch.", ""))
        # an operand off 16-byte alignment keys a layer of its own: the Triton TMA rows run
        # without TMA on it, so it is tuned without them, and its choice must not replace
        # the aligned calls' (the key of aligned operands is unchanged)
        odd = ":unaligned" if _unaligned(a) else ""
        return f"{dt}[{','.join(map(str, a.shape))}]{_layout(a)}{odd}"
    if isinstance(a, (list, tuple)):
        return "[" + ",".join(_sig(v) for v in a) + "]"
    return repr(a)


def _has_fp32(args, kwargs) -> bool:
    return any(isinstance(a, torch.Tensor) and a.dtype == torch.float32
               for a in (*args, *kwargs.values()))


# The TF32 flag each op's fp32 arithmetic follows, as eager's: a convolution cuDNN's
# (``torch.backends.cudnn.allow_tf32``), ``F.linear`` cuBLAS's (``...cuda.matmul...``). An op
# named here has its input first; its key carries that one flag when the input is fp32 (a
# 16-bit layer's fp32 bias does not split its key). Ops with no TF32 arithmetic (the pools,
# preprocessing) carry none; an op not named here carries both whenever an argument is fp32.
_TF32_FLAG = {
    "conv_bias_act": _backend.cudnn_allow_tf32,
    "stem": _backend.cudnn_allow_tf32,
    "avgpool_linear": _backend.matmul_allow_tf32,
    "max_pool2d": None,
    "preprocess": None,
}


def layer_key(op: str, args: Sequence, kwargs: dict, backends: Iterable[str]) -> str:
    """The cache key of one call: op, argument shapes/dtypes/layouts (and a mark on an operand
    off 16-byte alignment) and scalars, the TF32 flag the op's fp32 arithmetic follows when
    its input is fp32 (:data:`_TF32_FLAG`), and the backends that compete for it."""
    parts = [_sig(a) for a in args] + [f"{k}={_sig(v)}" for k, v in sorted(kwargs.items())]
    key = f"{op}({', '.join(parts)})"
    if op in _TF32_FLAG:
        flag = _TF32_FLAG[op]
        x = args[0] if args else None
        if flag is not None and isinstance(x, torch.Tensor) and x.dtype == torch.float32:
            key += f" tf32={int(flag())}"
    elif _has_fp32(args, kwargs):
        key += (f" tf32={int(_backend.cudnn_allow_tf32())}"
                f"{int(_backend.matmul_allow_tf32())}")
    return key + " on " + ",".join(sorted(set(backends)))


def _tf32_flags() -> tuple[bool, bool]:
    return _backend.cudnn_allow_tf32(), _backend.matmul_allow_tf32()


def _fast(a: Any) -> Any:
    if isinstance(a, torch.Tensor):
        return (a.shape, a.dtype, a.stride())
    if isinstance(a, list):
        return tuple(a)
    return a


# -- candidates --------------------------------------------------------------------------------

def _jsonable(cfg: Any) -> Any:
    """``cfg`` as JSON values, all the way down (a value JSON has no form for, at any depth,
    becomes its ``str``: one provider's odd config must not stop every later cache write)."""
    if hasattr(cfg, "as_dict"):
        cfg = cfg.as_dict()
    try:
        return json.loads(json.dumps(cfg, default=str))
    except (TypeError, ValueError, RecursionError):  # (circular, unsortable keys, ...)
        return str(cfg)


def _expand(op: str, impl: _backend.Impl, args, kwargs) -> list[Candidate]:
    provider = _backend.config_provider(op, impl.backend)
    if provider is not None:
        try:
            configs = list(provider.configs(*args, **kwargs))
        except Exception as exc:  # a provider bug must not break the forward pass
            log.warning("fastres: %s %s configurations unavailable: %s", op, impl.backend, exc)
            configs = []
        if configs:
            run, warmup = provider.run, provider.warmup
            return [Candidate(impl.backend, str(cfg), _jsonable(cfg), _bind(run, cfg),
                              None if warmup is None else _bind(warmup, cfg))
                    for cfg in configs]
    return [Candidate(impl.backend, impl.backend, None, impl.fn)]


def _bind(run: Callable, cfg: Any) -> Callable:
    def fn(*args, **kwargs):
        return run(cfg, *args, **kwargs)

    return fn


def candidates(op: str, device: torch.device, pref: str, impls: dict, args,
               kwargs) -> list[Candidate]:
    """The candidates for one call, pinned choice first (see :func:`mode`)."""
    if _settings.candidates is not None:
        hooked = _settings.candidates(op, device, tuple(args), dict(kwargs))
        if hooked:
            return list(hooked)
    _ensure_default_providers()
    if pref == "auto":
        out: list[Candidate] = []
        for backend in PINNED_ORDER:
            impl = _backend.runnable(op, backend, device, impls, args, kwargs)
            if impl is not None:
                out.extend(_expand(op, impl, args, kwargs))
        return out or [Candidate("torch", "torch", None, impls["torch"].fn)]
    impl = _backend.named_choice(op, device, pref, impls, args, kwargs)
    return _expand(op, impl, args, kwargs)


_providers_done = False


def _ensure_default_providers() -> None:
    """Offer the Triton convolution's autotuning table to the tuner, for ``conv_bias_act``,
    the Triton ``stem`` (its 7x7 convolution then the max-pool) and the Triton head
    ``avgpool_linear`` (the pool then its linear layer's GEMM), unless the kernels
    registered providers themselves. Every Triton conv the tuner runs then gets an explicit
    configuration, so the launcher's own in-memory autotuner never times anything (its
    choices would be neither persisted nor pinned)."""
    global _providers_done
    if _providers_done:
        return
    _providers_done = True
    want = [op for op in ("conv_bias_act", "stem", "avgpool_linear")
            if "triton" in _backend.implementations(op)
            and _backend.config_provider(op, "triton") is None]
    if not want:
        return
    try:
        from fastres.kernels import triton_impls as impls
        from fastres.kernels.conv import conv_configs
        from fastres.kernels.head import head_configs
    except ImportError as exc:
        log.info("fastres: Triton conv configurations not available: %s", exc)
        return

    # The kernels are looked up on fastres.kernels.triton_impls at call time, the module the
    # registered ``triton`` implementations call through, so both paths run the same function
    # (and a wrapper put there, e.g. by a test counting launches, sees every launch).
    def configs(x, weight, bias, stride, padding, dilation, groups, residual=None, relu=True):
        return conv_configs(x, weight, stride, padding, dilation, groups, residual, relu)

    def run(cfg, x, weight, bias, stride, padding, dilation, groups, residual=None, relu=True):
        return impls.conv_bias_act_triton(x, weight, bias, stride, padding, dilation, groups,
                                          residual, relu, config=cfg)

    # the stem's contract: conv 7x7/2 pad 3 + bias + ReLU, then max-pool 3/2 pad 1
    def stem_configs(x, weight, bias):
        return conv_configs(x, weight, (2, 2), (3, 3), (1, 1), 1, None, True)

    def warmup(cfg, x, weight, bias, stride, padding, dilation, groups, residual=None,
               relu=True):
        return impls.conv_bias_act_triton(x, weight, bias, stride, padding, dilation, groups,
                                          residual, relu, config=cfg, compile_only=True)

    def stem_warmup(cfg, x, weight, bias):  # (the max-pool has one configuration)
        return impls.conv_bias_act_triton(x, weight, bias, (2, 2), (3, 3), (1, 1), 1, None,
                                          True, config=cfg, compile_only=True)

    def stem_run(cfg, x, weight, bias):
        y = impls.conv_bias_act_triton(x, weight, bias, (2, 2), (3, 3), (1, 1), 1, None, True,
                                       config=cfg)
        return impls.max_pool2d_triton(y, 3, 2, 1)

    def head_run(cfg, x, weight, bias):
        return impls.avgpool_linear_triton(x, weight, bias, config=cfg)

    def head_warmup(cfg, x, weight, bias):  # (its linear layer: the pool has one configuration)
        return impls.avgpool_linear_triton(x, weight, bias, config=cfg, compile_only=True)

    if "avgpool_linear" in want:
        _backend.register_configs("avgpool_linear", "triton", head_configs, head_run,
                                  head_warmup)
    if "conv_bias_act" in want:
        _backend.register_configs("conv_bias_act", "triton", configs, run, warmup)
    if "stem" in want:
        _backend.register_configs("stem", "triton", stem_configs, stem_run, stem_warmup)


# -- timing ------------------------------------------------------------------------------------

# The longest GPU sleep the timer queues ahead of the timed calls (see cuda_event_timer)
_MAX_SLEEP_MS = 100.0


def _sleep_cycles(ms: float, device: torch.device | None = None) -> int:
    """Clock cycles of ``torch.cuda._sleep`` that last at least ``ms`` milliseconds: counted at
    the GPU's highest SM clock (``clock_rate``, kHz), so a GPU running slower sleeps longer;
    3 GHz where the rate is not known."""
    khz = getattr(torch.cuda.get_device_properties(device), "clock_rate", 0) or 3_000_000
    return int(ms * khz) + 1


def cuda_event_timer(run: Callable[[], Any], candidate: Candidate | None = None) -> float:
    """Median milliseconds of ``run()``'s GPU time on the current CUDA stream, after warm-up.

    The host's cost of launching is kept out: the timed calls are queued behind a GPU sleep
    (``torch.cuda._sleep``) that lasts longer than their launching, so the GPU runs them back
    to back. Timed as launched, a call whose kernels are shorter than the Python that launches
    them (batch 1, and most layers at batch 32) measures the launch path, alike for every
    candidate, and the choice would not be the fastest kernel (the one a CUDA graph replays).
    Calls are grouped so each timed group lasts about 0.1 ms or more (event resolution);
    7 groups, median of the group means. Without ``torch.cuda._sleep``: timed as launched.
    """
    run()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    run()
    host_ms = (time.perf_counter() - t0) * 1e3  # launching one call (the GPU was idle)
    torch.cuda.synchronize()
    sleep = getattr(torch.cuda, "_sleep", None)

    def timed_groups(groups: int, per_group: int) -> list[float]:
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(groups)]
        if sleep is not None:  # twice the launching of every call and event, 50 us at least
            ms = min(_MAX_SLEEP_MS, 2 * groups * (per_group * host_ms + 0.02) + 0.05)
            sleep(_sleep_cycles(ms))
        for s, e in events:
            s.record()
            for _ in range(per_group):
                run()
            e.record()
        events[-1][1].synchronize()
        return [s.elapsed_time(e) / per_group for s, e in events]

    est = max(timed_groups(1, 1)[0], 1e-3)
    per_group = max(1, min(50, math.ceil(0.1 / est)))
    times = sorted(timed_groups(7, per_group))
    return times[len(times) // 2]


def wall_timer(run: Callable[[], Any], candidate: Candidate | None = None) -> float:
    """Median milliseconds of ``run()`` by ``time.perf_counter`` (non-CUDA devices)."""
    run()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        run()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


def _finite_args(args: tuple) -> tuple:
    """``args`` with each floating-point tensor that holds a NaN or an infinity replaced by
    fresh normal values of its shape, dtype and layout, for the correctness check: a first
    call on ``torch.empty()`` or on data with a NaN would leave nothing to compare (the
    timing still runs the real arguments)."""
    out = []
    for a in args:
        if (isinstance(a, torch.Tensor) and a.is_floating_point()
                and not bool(torch.isfinite(a).all())):
            a = torch.randn_like(a)
        out.append(a)
    return tuple(out)


def _rel_err(out: Any, ref: Any) -> float:
    """The larger of the norm-wise relative error and the worst element's error relative to
    the largest reference magnitude (both in float64); infinite where ``out`` is not a
    tensor of the reference's shape (a candidate returning ``None`` is wrong, not exact)."""
    if not isinstance(ref, torch.Tensor):
        return 0.0  # (nothing to compare with)
    if not isinstance(out, torch.Tensor) or out.shape != ref.shape:
        return math.inf
    ref64, out64 = ref.detach().double(), out.detach().double()
    finite = torch.isfinite(ref64)
    if not bool(finite.all()):  # (overflow in the reference) compare where it is finite
        ref64, out64 = ref64[finite], out64[finite]
    if ref64.numel() == 0:
        return 0.0
    diff = out64 - ref64
    den = float(torch.linalg.vector_norm(ref64))
    num = float(torch.linalg.vector_norm(diff))
    if math.isnan(num):
        return math.inf
    # the norm-wise error, and the worst element against the largest reference value: a
    # kernel that gets a few elements wrong (a tile edge) can pass a norm-wise bound
    peak = float(diff.abs().max()) / max(float(ref64.abs().max()), 1e-30)
    return max(num / max(den, 1e-30), peak)


def _tolerance(args) -> float:
    for a in args:
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            return 5e-3 if a.dtype == torch.float32 else 3e-2
    return 3e-2


def _progress(items: list, desc: str):
    show = _settings.progress
    if show is None:
        show = sys.stderr.isatty()
    if not show:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=desc, leave=False, unit="cand", dynamic_ncols=True)


# -- the choice --------------------------------------------------------------------------------

_memo: dict[tuple, _backend.Impl] = {}
_names: dict[tuple, str] = {}  # memo key -> chosen candidate's name (reports, tests)
# how many choices (op and argument signature) the memo holds; the oldest goes first. A
# service fed many input sizes adds one per distinct layer per size: an evicted choice is
# looked up again in the tuning cache (held in memory), not measured again, unless the cache
# holds no record of it (no candidate ran; or the cache directory changed meanwhile).
_MEMO_SIZE = 4096
_memo_generation = -1
_lock = threading.RLock()
_said: set[str] = set()


def _say_once(key: str, msg: str) -> None:
    if _warnings.first_time(_said, key):
        _warnings.warn(f"fastres: {msg}")


def _tuning_allowed(device: torch.device) -> str | None:
    from fastres.plan import tracing  # (not is_compiling(): true in every thread while one
                                      # compiles, from torch 2.14)

    if tracing():
        return "torch.compile tracing"
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return "CUDA graph capture"
    return None


def choose(op: str, device: torch.device, pref: str, impls: dict, args: tuple,
           kwargs: dict) -> _backend.Impl:
    """The implementation (bound to its configuration) that runs this call; measured and
    cached on first sight of the layer, pinned in :func:`mode` ``"pinned"``."""
    global _memo_generation
    md = mode()
    mkey = (op, device, pref, md, _tf32_flags(), tuple([_fast(a) for a in args]),
            tuple(sorted((k, _fast(v)) for k, v in kwargs.items())) if kwargs else ())
    if _memo_generation != _backend._generation:
        _memo.clear()
        _names.clear()
        _memo_generation = _backend._generation
    hit = _memo.get(mkey)
    if hit is not None:
        return hit
    with _lock:
        hit = _memo.get(mkey)  # (another thread may have chosen it meanwhile)
        if hit is not None:
            return hit
        cands = candidates(op, device, pref, impls, args, kwargs)
        if md == "pinned" or len(cands) == 1:
            if md == "pinned":
                _stats["pinned"] += 1
            return _remember(mkey, op, cands[0], impls)
        key = layer_key(op, args, kwargs, (c.backend for c in cands))
        cache = cache_for(device)
        rec = cache.get(key)
        if rec is not None:
            chosen = _match(rec, cands)
            if chosen is not None:
                _stats["disk_hits"] += 1
                return _remember(mkey, op, chosen, impls)
        why_not = _tuning_allowed(device)
        if why_not is not None:
            _stats["deferred"] += 1
            _say_once("deferred", f"{op} layer {key} is not tuned yet and cannot be tuned "
                      f"during {why_not}; it runs the pinned choice there. Warm up (or run "
                      "fastres.tuning.tune_model) before capturing or compiling.")
            return _backend.Impl(op, cands[0].backend, cands[0].fn,
                                 _supports_of(cands[0], impls), final=False)
        chosen, record = _measure(op, key, cands, impls, args, kwargs)
        if record is not None:
            cache.put(key, record)
        return _remember(mkey, op, chosen, impls)


def _supports_of(cand: Candidate, impls: dict):
    impl = impls.get(cand.backend)
    return impl.supports if impl is not None else _backend._always


def _remember(mkey: tuple, op: str, cand: Candidate, impls: dict) -> _backend.Impl:
    impl = _backend.Impl(op, cand.backend, cand.fn, _supports_of(cand, impls))
    # (under _lock; a generation change may clear the memo meanwhile)
    while mkey not in _memo and len(_memo) >= _MEMO_SIZE:
        try:
            oldest = next(iter(_memo))
            del _memo[oldest]
        except (KeyError, RuntimeError, StopIteration):
            break
        _names.pop(oldest, None)
    _memo[mkey] = impl
    _names[mkey] = cand.name
    return impl


def _match(rec: dict, cands: list[Candidate]) -> Candidate | None:
    for c in cands:
        if c.backend == rec.get("backend") and c.label == rec.get("label"):
            return c
    return None  # the cached choice is no longer offered (table changed): tune again


def _measure(op: str, key: str, cands: list[Candidate], impls: dict, args,
             kwargs) -> tuple[Candidate, dict | None]:
    timer = _settings.timer
    if timer is None:
        timer = cuda_event_timer if any(
            isinstance(a, torch.Tensor) and a.is_cuda for a in args) else wall_timer
    ref, check_args = None, args
    if _settings.check and any(c.backend != "torch" for c in cands):
        check_args = _finite_args(args)
        with contextlib.suppress(Exception):
            ref = impls["torch"].fn(*check_args, **kwargs)
    tol = _tolerance(args)
    timings: dict[str, float] = {}
    rejected: dict[str, str] = {}
    t0 = time.perf_counter()
    _compile_ahead(cands, args, kwargs)
    for cand in _progress(cands, f"fastres: tuning {op}"):
        try:
            out = cand.fn(*check_args, **kwargs)  # first run: compiles, and is checked
            if ref is not None and cand.backend != "torch":
                err = _rel_err(out, ref)
                if not err <= tol:
                    rejected[cand.name] = f"relative error {err:.3g} > {tol:g}"
                    continue
            del out
            _stats["timed"] += 1
            ms = float(timer(lambda c=cand: c.fn(*args, **kwargs), cand))
        except Exception as exc:  # out of resources, unsupported here, ...
            rejected[cand.name] = f"{type(exc).__name__}: {str(exc)[:200]}"
            continue
        if math.isfinite(ms):
            timings[cand.name] = ms
    if rejected:
        # A wrong result is a kernel defect: a warning. A candidate that cannot run here (out
        # of resources on a smaller GPU, ...) is expected: info, so tuning stays quiet off a
        # terminal. Both are kept in the cache record's "rejected".
        wrong = any(v.startswith("relative error") for v in rejected.values())
        log.log(logging.WARNING if wrong else logging.INFO, "fastres: tuning %s rejected %s",
                key, rejected)
    if not timings:
        _say_once(f"none:{key}", f"no candidate ran for {key} ({rejected}); using the "
                  "reference implementation")
        ref_cand = Candidate("torch", "torch", None, impls["torch"].fn)
        return ref_cand, None
    best = min((c for c in cands if c.name in timings), key=lambda c: timings[c.name])
    _stats["tuned"] += 1
    log.info("fastres: tuned %s -> %s (%.4f ms; %d candidates in %.1f s)", key, best.name,
             timings[best.name], len(cands), time.perf_counter() - t0)
    record = {
        "backend": best.backend,
        "label": best.label,
        "config": _jsonable(best.config),
        "ms": timings[best.name],
        "timings": timings,
        "rejected": rejected,
        "tuned_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    return best, record


def _compile_ahead(cands: list[Candidate], args, kwargs) -> None:
    """Compile every candidate that can be compiled without a launch (``warmup``), on a pool
    of threads, before the first is timed: each would otherwise compile at its first launch,
    one after another (about 0.4 s per distinct Triton conv kernel on a core of the 2-core
    development CPU, ResNet-50 in bf16: ``benchmarks/compile_time.py``).
    Best effort: a candidate that fails here is compiled again, and fails, where it runs."""
    warmups = [functools.partial(c.warmup, *args, **kwargs) for c in cands
               if c.warmup is not None]
    if len(warmups) < 2:
        return
    try:
        from fastres.kernels import _direct
    except ImportError:  # (no Triton: nothing to compile)
        return
    _direct.compile_in_threads(warmups)


def choices() -> dict[str, str]:
    """This process's remembered choices: ``{op and argument signature: candidate name}``
    (for reports and tests)."""
    # (a copy first: another thread choosing meanwhile would change the dict under the loop)
    return {f"{k[0]}{k[5]}{k[6] or ''}": name for k, name in list(_names.items())
            if k in _memo}


# -- ahead-of-time tuning ------------------------------------------------------------------

_DTYPES = {
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "f32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
    "half": torch.float16, "f16": torch.float16, "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"bf16"``/``"bfloat16"``, ``"fp16"``/``"half"``, ``"fp32"``/``"float"`` or a dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).strip().lower().replace("torch.", "")
    if key not in _DTYPES:
        raise ValueError(f"dtype must be one of fp32, fp16, bf16 (or torch dtypes), got "
                         f"{dtype!r}")
    return _DTYPES[key]


_FLOAT_DTYPES = (*FLOAT_DTYPES, torch.float64)  # the ops' dtypes, and float64 models


def _forward_to_tune(model: torch.nn.Module, x: torch.Tensor):
    """The forward whose layers :func:`tune_model` times: the model's, or, for a fastres
    ResNet whose head alone keeps that forward eager (a backbone with ``fc = nn.Identity()``),
    its ``forward_features``, which runs fused (forward_intermediates' layers but stage 0's)."""
    from fastres import plan as _plan
    from fastres.models import ResNet

    if (isinstance(model, ResNet) and _plan.eager_reason(model, x) is not None
            and _plan.eager_reason(model, x, head=False) is None):
        return model.forward_features
    return model


def _tune_stage0(net: torch.nn.Module, batch: int, image_size: tuple[int, int]) -> None:
    """Run stage 0 of ``net.forward_intermediates`` (the stem as a convolution, then the
    max-pool) on a random input of ``net``'s own channels, dtype and device, so that its two
    layers are tuned; nothing for a net whose feature paths would run eagerly (its hooks would
    run, and nothing would be tuned) or whose device is not tuned."""
    from fastres import plan as _plan

    conv = getattr(net, "conv1", None)
    dtype, device = _plan.model_dtype_device(net)
    if not isinstance(conv, torch.nn.Conv2d) or device.type not in _backend._TUNED_DEVICE_TYPES:
        return
    x = torch.randn(batch, _plan.conv_in_channels(conv), *image_size, device=device,
                    dtype=dtype)
    if _plan.eager_reason(net, x, head=False) is None:
        net.forward_intermediates(x, [0], stop_early=True, intermediates_only=True)


def _resnets(model: torch.nn.Module) -> list:
    """The fastres ResNets in ``model`` (``model`` itself, if it is one)."""
    from fastres.models import ResNet

    return [m for m in model.modules() if isinstance(m, ResNet)]


def _check_tunable(model: Any) -> None:
    """``model`` must run fastres's ops: a fastres ResNet, or a module holding one."""
    if isinstance(model, torch.nn.Module) and _resnets(model):
        return
    cls = type(model)
    name = (cls.__qualname__ if cls.__module__ == "builtins"
            else f"{cls.__module__}.{cls.__qualname__}")
    hint = ("; convert a torchvision ResNet with fastres.from_torchvision(model)"
            if cls.__module__.startswith("torchvision") else "")
    raise TypeError("tune_model expects a fastres ResNet (or a module holding one), whose "
                    f"layers run fastres's tuned ops, got {name}{hint}")


def _batch_list(batch_sizes: Any) -> list[int]:
    if isinstance(batch_sizes, (str, bytes)) or not (
            isinstance(batch_sizes, (numbers.Number, Iterable))
            or as_int(batch_sizes) is not None):
        what = (f"{type(batch_sizes).__name__} {batch_sizes!r}"
                if isinstance(batch_sizes, (str, bytes)) else repr(batch_sizes))
        raise TypeError(f"tune_model: batch_sizes must be an int or a sequence of ints, got "
                        f"{what}")
    items = (list(batch_sizes) if isinstance(batch_sizes, Iterable)
             and as_int(batch_sizes) is None else [batch_sizes])
    out = []
    for b in items:
        n = as_int(b)
        if n is None:
            raise TypeError(f"tune_model: batch sizes must be integers, got {b!r}")
        out.append(n)
    if not out:
        raise ValueError("tune_model: at least one batch size is needed, got none")
    if min(out) < 1:
        raise ValueError(f"tune_model: batch sizes must be >= 1, got {out}")
    return out


def _image_hw(image_size: Any) -> tuple[int, int]:
    n = as_int(image_size)
    if n is not None:
        hw = (n, n)
    elif (isinstance(image_size, (tuple, list)) and len(image_size) == 2
          and all(as_int(v) is not None for v in image_size)):
        hw = (as_int(image_size[0]), as_int(image_size[1]))
    else:
        raise TypeError(f"tune_model: image_size must be an int or an (H, W) pair of ints, "
                        f"got {image_size!r}")
    if min(hw) < 1:
        raise ValueError(f"tune_model: image_size must be >= 1, got {image_size!r}")
    return hw  # type: ignore[return-value]


def tune_model(model: torch.nn.Module, batch_sizes: int | Iterable[int] = (1,),
               dtype: str | torch.dtype | None = None,
               image_size: int | tuple[int, int] = 224, *,
               progress: bool | None = None) -> dict:
    """Measure and cache every layer's choice for these batch sizes, ahead of time.

    Runs one eval-mode forward under ``torch.no_grad()`` per batch size on random input
    ``[B, 3, H, W]`` on the model's device: each layer not in the cache is timed then (see
    the module docstring), each cached one costs nothing. ``dtype`` is the compute dtype
    (default: the model's parameter dtype); fp16/bf16 on an fp32 model run under autocast,
    which gives the same layers as a model converted to that dtype. Every module's mode
    (``training``) is restored afterwards. Returns ``{"tuned", "disk_hits", "timed", "cache",
    "unsaved", "write_error", "seconds"}`` (``cache``: ``None`` when no cache directory could
    be named and the choices stay in memory; ``unsaved``: choices the cache file could not
    take, with ``write_error`` saying why; the file is written once per batch size, and at
    the end, waiting for its lock, with anything an earlier write left). Choices this
    process made before are looked up again in the cache file in force now, so that a layer
    chosen while another cache directory was set is written to this one.

    The layers timed are those of the model's forward (of ``forward_features`` for a backbone
    whose ``fc`` is ``nn.Identity()``), and the two that
    :meth:`~fastres.models.ResNet.forward_intermediates` runs when stage 0 is asked for: the
    stem as a convolution, then the max-pool (every other forward runs the stem fused). Each
    fastres ResNet in ``model`` gets a random input of the same size, in its own dtype and on
    its own device, for those (none where its feature paths would run eagerly).

    ``model`` is a fastres :class:`~fastres.models.ResNet` or a module holding one;
    ``batch_sizes`` an int or ints >= 1; ``image_size`` an int or an ``(H, W)`` pair >= 1;
    anything else is a ``TypeError`` / ``ValueError`` saying what was expected. A model on a
    device whose calls are not tuned (only CUDA, unless :func:`configure` says otherwise) is
    warned about (``RuntimeWarning``) and nothing runs: the result counts zeros and its
    ``cache`` is ``None``.
    """
    _check_tunable(model)
    batch_sizes = _batch_list(batch_sizes)
    image_size = _image_hw(image_size)
    param = next(model.parameters())
    device, pdtype = param.device, param.dtype
    dtype = pdtype if dtype is None else parse_dtype(dtype)
    if dtype not in _FLOAT_DTYPES:
        raise ValueError(f"tune_model: dtype must be a floating-point dtype (fp32, fp16, bf16 "
                         f"or torch.float64), got {dtype}")
    if device.type not in _backend._TUNED_DEVICE_TYPES:
        tuned = ", ".join(sorted(_backend._TUNED_DEVICE_TYPES)) or "no"
        _warnings.warn(f"fastres: tune_model: the model is on {device.type}, and only {tuned} "
                       "calls are tuned (others run a fixed choice): nothing to tune")
        return {"tuned": 0, "disk_hits": 0, "timed": 0, "cache": None, "unsaved": 0,
                "write_error": None, "seconds": 0.0}
    # Forget this process's remembered choices first: each layer is then looked up in the
    # cache file in force now (FASTRES_CACHE_DIR, or ``fastres tune --cache-dir``, may name
    # another one than the earlier calls used) and written there when it is missing.
    with _lock:
        _memo.clear()
        _names.clear()
    _backend.invalidate_choices()
    before = stats()
    t0 = time.perf_counter()
    if mode() == "pinned":
        log.info("fastres: FASTRES_TUNE=0 / deterministic mode: nothing to tune")
    run_model, ctx = model, contextlib.nullcontext()
    if dtype != pdtype:
        if dtype in (torch.float16, torch.bfloat16):
            ctx = torch.autocast(device.type, dtype=dtype)
        else:
            run_model = copy.deepcopy(model).to(dtype)
            pdtype = dtype
    from fastres import plan as _plan

    stem = getattr(model, "conv1", None)
    in_ch = (_plan.conv_in_channels(stem) or 3) if isinstance(stem, torch.nn.Conv2d) else 3
    # every module's own mode, not only the top's: ``train(flag)`` sets the whole tree, and a
    # model with a frozen stage (``m.train(); m.layer1.eval()``) or one BatchNorm left in train
    # mode (test-time adaptation) must come back as it was
    modes = [(m, m.training) for m in run_model.modules()]
    run_model.eval()
    old_progress = _settings.progress
    if progress is not None:
        _settings.progress = progress
    nets = _resnets(run_model)  # (stage 0 of each, after each batch's forward)
    bar = _progress_bar(len(batch_sizes), progress)
    try:
        for bs in batch_sizes:
            x = torch.randn(bs, in_ch, *image_size, device=device, dtype=pdtype)
            with torch.no_grad(), ctx, _backend.deferred_writes():
                _forward_to_tune(run_model, x)(x)
                for net in nets:
                    _tune_stage0(net, bs, image_size)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if bar is not None:
                bar.update(1)
    finally:
        for m, training in modes:
            m.training = training
        _settings.progress = old_progress
        if bar is not None:
            bar.close()
    after = stats()
    cache = cache_for(device)
    cache.save(wait=True)  # (what an earlier write could not write, waiting for the lock)
    return {
        "tuned": after["tuned"] - before["tuned"],
        "disk_hits": after["disk_hits"] - before["disk_hits"],
        "timed": after["timed"] - before["timed"],
        "cache": None if cache.path is None else str(cache.path),
        "unsaved": cache.unsaved,
        "write_error": cache.write_error if cache.unsaved else None,
        "seconds": time.perf_counter() - t0,
    }


def _progress_bar(total: int, progress: bool | None):
    show = sys.stderr.isatty() if progress is None else progress
    if not show:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="fastres: tuning batch sizes", unit="batch")


def register_cli(register_command) -> None:
    """The ``fastres`` CLI's plugin hook: adds ``fastres tune`` (:mod:`fastres.tune_cli`)."""
    from fastres import tune_cli

    register_command("tune", tune_cli.HELP, tune_cli.add_arguments, tune_cli.run,
                     description=tune_cli.DESCRIPTION)
