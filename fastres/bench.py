"""End-to-end benchmark: fastres vs eager torchvision and ``torch.compile`` (``fastres bench``).

For each model x dtype x batch size, in one run on one device:

1. **Check first.** fastres's output (and every baseline's) on the first input batch is
   compared with a precise reference (float64 on the CPU, fp32 with TF32 off on a GPU): relative
   error ``||out - ref|| / ||ref||`` and top-1 agreement. fastres must be within
   ``max(DESIGN.md bound, 2 x eager's own error in the same dtype)`` (see :mod:`fastres.verify`);
   otherwise its rows are ``FAILED``, never timed, and the run exits non-zero. A fastres
   row whose check call ran torchvision's eager code (fastres's fallback) is ``error``, not
   timed: its speed would be eager's.
2. **Then time.** Warm-up (and, on a GPU, ``fastres.tuning.tune_model`` when it exists), then
   ``iters`` calls timed with CUDA events (``time.perf_counter`` on the CPU), inputs rotated over a
   few pre-made batches so caches do not flatter small batches, split into ``rounds`` (3 on a
   GPU): every row of a group is timed once per round, in turn, so that a busy spell of the
   host does not fall on one row only; the statistics are over all calls, and the summary
   names the rows whose round medians differ by more than 10%. Reported: images/s (batch /
   median), median and p90 latency per batch, on a GPU the host time per call (the CPU time
   to issue one call with the GPU idle, :func:`host_times`: near the median, the call is bound
   by the host), peak GPU memory (the implementation's weights, inputs and everything
   allocated during the timed calls), and speedups against each baseline measured in the same
   run.

Implementations (``IMPLS``):

- ``eager_fp32``: torchvision eager, fp32, NCHW input (measured once per model and batch);
- ``eager_amp_cl``: torchvision eager under ``torch.autocast(dtype)``, channels-last model and
  fp32 channels-last input (for fp32 rows: channels-last fp32, no autocast); autocast casts
  every weight again on each call (its cast cache lasts one autocast region);
- ``eager_cl`` (fp16/bf16 rows): torchvision cast to the dtype, channels-last, eager, with
  channels-last input in the dtype (what fastres and ``torch.compile`` are given); for fp32
  rows the ``eager_amp_cl`` row is this baseline;
- ``compile`` / ``compile_max_autotune``: ``torch.compile(dynamic=False)`` of torchvision cast
  to the dtype, channels-last (``max-autotune-no-cudagraphs`` only when asked: it is slow to
  compile; without CUDA graphs, so that it compares with plain fastres like for like);
- ``compile_freezing`` (when asked): the same with inductor's ``freezing`` option (the
  parameters become constants: BatchNorm folded into the convolutions, as fastres's plan
  folds it, and the weights laid out for the kernels once);
- ``compile_reduce_overhead`` (when asked): the same with ``mode="reduce-overhead"`` (CUDA
  graphs), the like-for-like baseline of ``fastres_graphs``;
- ``fastres``: fastres cast to the dtype, channels-last input in the dtype;
- ``fastres_graphs``: ``fastres.optimize(model, cuda_graphs=True)`` when the engine provides it
  (``n/a`` otherwise, and always on the CPU).

On a GPU every implementation runs with ``torch.backends.cudnn.benchmark`` on (cuDNN times
its algorithms for each shape during the check call and the warm-up, as fastres tunes its
kernels); the flag is put back afterwards and recorded with the environment. Speedups
against ``torch.compile`` are like for like: ``fastres`` against the fastest ``torch.compile``
row without CUDA graphs (``compile``, ``compile_max_autotune`` or ``compile_freezing``, those
timed), ``fastres_graphs`` against ``compile_reduce_overhead`` (none when that row was not asked
for).
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from fastres.classify import UserError, dtype_name
from fastres.ops import _backend
from fastres.verify import (
    EagerProbe,
    design_tolerance,
    eager_forward,
    fastres_twin,
    out_of_memory,
    reference_forward,
    rel_err,
    short_error,
    topk_agreement,
    torchvision_model,
)

IMPLS: dict[str, str] = {
    "eager_fp32": "torchvision eager fp32",
    "eager_amp_cl": "torchvision AMP + channels_last",
    "eager_cl": "torchvision {dtype} + channels_last",
    "compile": "torch.compile",
    "compile_max_autotune": "torch.compile max-autotune (no graphs)",
    "compile_freezing": "torch.compile freezing",
    "compile_reduce_overhead": "torch.compile reduce-overhead",
    "fastres": "fastres",
    "fastres_graphs": "fastres + CUDA graphs",
}
BASELINES = ("eager_fp32", "eager_amp_cl", "eager_cl", "compile")
# the torch.compile rows without CUDA graphs: plain fastres's "x compile" is against the fastest
COMPILE_NO_GRAPHS = ("compile", "compile_max_autotune", "compile_freezing")
FASTRES_IMPLS = ("fastres", "fastres_graphs")

# Defaults. CPU ones finish in about a minute on a 2-core machine (measured: ~30-40 s).
GPU_DEFAULTS = {"models": ["resnet50"], "batch_sizes": [1, 32, 256], "dtypes": ["bf16"],
                "image_size": 224, "iters": 50, "warmup": 10, "max_time": 10.0, "compile": True,
                "rounds": 3}
CPU_DEFAULTS = {"models": ["resnet50"], "batch_sizes": [1, 4], "dtypes": ["fp32"],
                "image_size": 224, "iters": 8, "warmup": 2, "max_time": 6.0, "compile": False,
                "rounds": 1}
# a row whose round medians differ by more than this (max / min - 1) is named in the summary
ROUND_SPREAD_NOTE = 0.10

INPUT_BYTES_CAP = 1 << 30  # pre-made input batches per implementation, all rotations together


def impl_label(impl: str, dtype: torch.dtype) -> str:
    if impl == "eager_amp_cl" and dtype == torch.float32:
        return "torchvision fp32 + channels_last"
    return IMPLS[impl].format(dtype=dtype_name(dtype))


@dataclass
class BenchConfig:
    """What ``fastres bench`` measures (see :data:`GPU_DEFAULTS` / :data:`CPU_DEFAULTS`)."""

    models: list[str]
    batch_sizes: list[int]
    dtypes: list[torch.dtype]
    device: torch.device
    image_size: int = 224
    iters: int = 50
    warmup: int = 10
    max_time: float = 10.0          # seconds per timed measurement (at least 5 calls are timed)
    # the timed calls of a group's rows split into this many rounds, every row once per round
    # in turn, so that a busy spell of the host falls on every row, not on one
    rounds: int = 1
    compile: bool = True
    max_autotune: bool = False
    compile_freezing: bool = False
    compile_reduce_overhead: bool = False
    compile_models: list[str] | None = None   # None: every model
    compile_budget: float | None = None       # seconds of compiling, then compile rows skip
    cuda_graphs: bool = True
    tune: bool = True
    weights: str | None = None
    rotate: int = 4
    time_budget: float | None = None          # seconds; later groups are skipped, not timed
    seed: int = 0
    progress: bool = True
    threads: int | None = None                # CPU threads (None: see cpu_threads_default)
    command: str | None = None                # the command line, for the report

    def to_json(self) -> dict:
        d = asdict(self)
        d["dtypes"] = [dtype_name(t) for t in self.dtypes]
        d["device"] = str(self.device)
        return d


@dataclass
class Row:
    """One implementation on one (model, dtype, batch)."""

    model: str
    dtype: str
    batch: int
    impl: str
    label: str
    status: str = "ok"              # ok | FAILED | error | n/a | skipped
    median_ms: float | None = None
    p90_ms: float | None = None
    # GPU: median CPU time to issue one call with the GPU idle (the call returns before its
    # kernels finish); close to median_ms: the call is bound by the host, not the GPU
    host_ms: float | None = None
    images_per_s: float | None = None
    peak_mib: float | None = None
    iters: int = 0
    rel_err: float | None = None
    tolerance: float | None = None
    top1: float | None = None
    speedup: dict[str, float | None] = field(default_factory=dict)
    note: str = ""
    # the median of each round of timed calls (the rows of a group are timed in rounds, each
    # row once per round in turn: see BenchConfig.rounds)
    round_medians: list[float] = field(default_factory=list)


@dataclass
class BenchReport:
    env: dict
    config: dict
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0
    interrupted: bool = False       # stopped by Ctrl-C / SIGTERM: the rows measured so far
    # why the last write_outputs failed (None: it worked); the table says so, not the files
    output_error: str | None = None
    # the write failures warned about already (each is said once a run)
    warned_outputs: set = field(default_factory=set, init=False, repr=False, compare=False)

    @property
    def ok(self) -> bool:
        return not any(r.status == "FAILED" for r in self.rows)

    @property
    def checked(self) -> bool:
        """Whether any fastres output was compared with torchvision (``False``: every group
        skipped, say for memory or the time budget)."""
        return any(r.impl in FASTRES_IMPLS and r.rel_err is not None for r in self.rows)

    def to_json(self) -> dict:
        return {"fastres_bench": 1, "ok": self.ok, "interrupted": self.interrupted,
                "elapsed_s": round(self.elapsed_s, 2),
                "env": self.env, "config": self.config, "notes": self.notes,
                "rows": [asdict(r) for r in self.rows]}


# -- environment -----------------------------------------------------------------------------


def _version(module: str) -> str | None:
    try:
        return getattr(importlib.import_module(module), "__version__", "?")
    except Exception:
        return None


def _gpu_driver() -> str | None:
    """The NVIDIA driver version from ``nvidia-smi``; without it, the CUDA version the driver
    supports (``cuDriverGetVersion`` of libcuda; torch has no Python API for either)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version",
                              "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=10, check=False)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        import ctypes

        v = ctypes.c_int()
        if ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(v)) == 0:
            return f"CUDA driver API {v.value // 1000}.{(v.value % 1000) // 10}"
    except (OSError, AttributeError):  # no driver library (or not this platform's)
        pass
    return None


def cpu_threads_default() -> tuple[int, str]:
    """Threads for CPU timing: torch's default, fewer when other processes keep cores busy.

    OpenMP spin-waits on every layer: with one of two cores taken by another process, two
    threads run ResNet-50 ~10x slower than one (measured here), which says nothing about
    either implementation. So use the cores the 1-minute load average leaves idle.
    """
    n = torch.get_num_threads()
    try:
        load = os.getloadavg()[0]
    except OSError:
        return n, ""
    cores = os.cpu_count() or n
    idle = max(1, int(cores - load + 0.5))
    if idle < n:
        return idle, (f"{idle} of {n} threads: the load average ({load:.1f}) says other "
                      "processes are using the rest (--threads overrides)")
    return n, ""


def _source_commit() -> str | None:
    """``git describe``-like id of the checkout fastres runs from (``+dirty`` when edited), or
    ``None`` (an installed package, no git, no .git directory): results name their code."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.exists(os.path.join(root, ".git")):
        return None
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "--short=12", "HEAD"],
                              capture_output=True, text=True, timeout=10, check=False)
        if head.returncode != 0 or not head.stdout.strip():
            return None
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=False)
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _extension_status() -> tuple[bool, str | None]:
    """Whether ``fastres._C`` loads here (built *and* importable), and why not."""
    try:
        from fastres import _ext
    except Exception as exc:  # noqa: BLE001 - report, never fail the benchmark for it
        return False, short_error(exc)
    ok = _ext.available()
    return ok, (None if ok else _ext.error())


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict:
    """Versions and hardware, printed with every table."""
    import fastres

    ext_ok, ext_error = _extension_status()
    env = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torchvision": _version("torchvision"),
        "triton": _version("triton"),
        "fastres": fastres.__version__,
        "fastres_backend": fastres.get_backend(),
        "fastres_extension": ext_ok,
        "fastres_extension_error": ext_error,
        "fastres_commit": _source_commit(),
        "device": str(device),
        "cpu": _cpu_name(),
        "cpu_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            gpu=torch.cuda.get_device_name(device),
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            compute_capability=f"{props.major}.{props.minor}",
            driver=_gpu_driver(),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            cudnn_tf32=_backend.cudnn_allow_tf32(),
            matmul_tf32=_backend.matmul_allow_tf32(),
            cudnn_benchmark=torch.backends.cudnn.benchmark,
        )
    return env


def format_env(env: dict) -> str:
    if str(env.get("device", "cpu")).startswith("cuda"):
        hw = (f"GPU: {env.get('gpu')} ({env.get('gpu_memory_gib')} GiB, sm "
              f"{env.get('compute_capability')}), driver {env.get('driver')}, CUDA "
              f"{env.get('cuda')}, cuDNN {env.get('cudnn')}, TF32 conv "
              f"{'on' if env.get('cudnn_tf32') else 'off'}, cuDNN benchmark mode "
              f"{'on' if env.get('cudnn_benchmark') else 'off'}")
    else:
        hw = f"CPU: {env.get('cpu')}, {env.get('cpu_threads')} threads (no GPU)"
    commit = f" at {env['fastres_commit']}" if env.get("fastres_commit") else ""
    sw = (f"torch {env.get('torch')}, torchvision {env.get('torchvision')}, triton "
          f"{env.get('triton')}, fastres {env.get('fastres')}{commit} (backend "
          f"{env.get('fastres_backend')}, CUDA extension "
          f"{'loaded' if env.get('fastres_extension') else 'NOT loaded'}), Python "
          f"{env.get('python')}")
    lines = [hw, sw, str(env.get("date"))]
    if env.get("command"):
        lines.append(f"command: {env['command']}")
    return "\n".join(lines)


# -- timing ----------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[Tensor], object], inputs: Sequence[Tensor], warmup: int,
               iters: int, max_time: float, device: torch.device) -> list[float]:
    """Per-call latencies in ms: ``warmup`` untimed calls, then up to ``iters`` timed ones.

    On a GPU each call sits between two CUDA events on the current stream (no sync between
    calls, so a CPU-bound call shows its launch gaps and a GPU-bound one its kernel time); on
    the CPU, ``time.perf_counter``. Timing stops early after ``max_time`` seconds once at least
    ``min(iters, 5)`` calls are timed. Inputs rotate over ``inputs``.
    """
    k = len(inputs)
    with torch.inference_mode():
        for i in range(warmup):
            fn(inputs[i % k])
        _sync(device)
        least = min(iters, 5)
        t0 = time.perf_counter()
        if device.type == "cuda":
            events = []
            stream = torch.cuda.current_stream(device)  # cuda:N's, not the current device's
            for i in range(iters):
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record(stream)
                fn(inputs[i % k])
                end.record(stream)
                events.append((start, end))
                if i + 1 >= least and time.perf_counter() - t0 > max_time:
                    break
            torch.cuda.synchronize(device)
            return [s.elapsed_time(e) for s, e in events]
        times = []
        for i in range(iters):
            s = time.perf_counter()
            fn(inputs[i % k])
            times.append((time.perf_counter() - s) * 1e3)
            if i + 1 >= least and time.perf_counter() - t0 > max_time:
                break
        return times


def host_times(fn: Callable[[Tensor], object], inputs: Sequence[Tensor],
               device: torch.device, calls: int = 5) -> list[float]:
    """CPU time in ms to issue each of ``calls`` calls, each started with the GPU idle (a
    synchronize before and after, outside the timed span): the host's share of a call, which
    :func:`time_calls`'s back-to-back calls cannot separate from a full launch queue."""
    k = len(inputs)
    times = []
    with torch.inference_mode():
        for i in range(calls):
            _sync(device)
            s = time.perf_counter()
            fn(inputs[i % k])
            times.append((time.perf_counter() - s) * 1e3)
        _sync(device)
    return times


def host_syncs(fn: Callable[[Tensor], object], x: Tensor) -> list[str]:
    """The synchronizing CUDA operations one call of ``fn`` makes, as torch's sync debug mode
    (``torch.cuda.set_sync_debug_mode("warn")``) reports them: copies to the host, ``.item()``
    and the like (not the driver's own waits). A call that waits for the GPU has a host time
    close to its GPU time, whatever its launch cost."""
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught, torch.inference_mode():
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn(x)
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    return [f"{str(w.message).splitlines()[0][:100]} at {os.path.basename(w.filename)}:"
            f"{w.lineno}" for w in caught if "synchroniz" in str(w.message)]


def _add_note(row: Row, note: str) -> None:
    row.note = f"{row.note}; {note}" if row.note else note


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (``q`` in [0, 100]), as numpy's default."""
    v = sorted(values)
    if len(v) == 1:
        return v[0]
    pos = (len(v) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def _tensor_bytes(ts: Sequence[Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def _param_bytes(model: nn.Module | None) -> int:
    if model is None:
        return 0
    return sum(t.numel() * t.element_size()
               for t in list(model.parameters()) + list(model.buffers()))


def _plan_bytes(model: nn.Module | None) -> int:
    """Bytes of the tensors that fastres's inference plans for ``model`` hold (the folded
    weights and biases in the compute dtype: a second copy of the parameters, made before
    the timed calls), each storage counted once; 0 for a model without plans."""
    cache = getattr(model, "__dict__", {}).get("_plan_cache")
    plans = getattr(cache, "plans", None)
    if not isinstance(plans, dict):
        return 0
    seen: set[int] = set()
    total = 0

    def walk(obj, depth: int) -> None:
        nonlocal total
        if isinstance(obj, Tensor):
            if obj.device.type != "meta" and not obj.is_sparse:
                storage = obj.untyped_storage()
                if storage.data_ptr() not in seen:
                    seen.add(storage.data_ptr())
                    total += storage.nbytes()
        elif depth > 0 and isinstance(obj, (list, tuple)):
            for v in obj:
                walk(v, depth - 1)
        elif depth > 0 and isinstance(obj, dict):
            for v in obj.values():
                walk(v, depth - 1)
        elif depth > 0 and not isinstance(obj, nn.Module) and hasattr(obj, "__dict__"):
            for v in vars(obj).values():  # (the plan and its steps: no module is walked)
                walk(v, depth - 1)

    walk(list(plans.values()), 8)
    return total


# -- implementations -------------------------------------------------------------------------


class _Impl:
    """A callable under test: its model, how its inputs are made, and how it runs."""

    def __init__(self, key: str, fn: Callable[[Tensor], Tensor], make_input: Callable,
                 model: nn.Module | None = None):
        self.key, self.fn, self.make_input, self.model = key, fn, make_input, model


def _fastres_optimize():
    import fastres

    return getattr(fastres, "optimize", None)


def _fastres_tuner():
    try:
        tuning = importlib.import_module("fastres.tuning")
    except ImportError:
        return None
    return getattr(tuning, "tune_model", None)


class Runner:
    """Runs the whole comparison; :func:`run_bench` is the entry point."""

    def __init__(self, config: BenchConfig, on_update: Callable[[BenchReport], None] | None):
        self.cfg = config
        self.dev = config.device
        self.on_update = on_update
        self.report = BenchReport(environment(self.dev), config.to_json())
        if config.command:
            self.report.env["command"] = config.command
        self.t0 = time.perf_counter()
        self.compile_spent = 0.0
        self.last_compile_s: float | None = None
        self.eager_fp32_cache: dict[tuple[str, int], Row] = {}

    # inputs: the same random batches for every implementation, in each one's format
    def base_inputs(self, batch: int) -> list[Tensor]:
        per = batch * 3 * self.cfg.image_size ** 2 * 4
        k = max(1, min(self.cfg.rotate, INPUT_BYTES_CAP // max(per, 1)))
        g = torch.Generator(device="cpu").manual_seed(self.cfg.seed * 1000 + batch)
        return [torch.randn(batch, 3, self.cfg.image_size, self.cfg.image_size, generator=g)
                .to(self.dev) for _ in range(k)]

    def over_budget(self) -> bool:
        b = self.cfg.time_budget
        return b is not None and time.perf_counter() - self.t0 > b

    def run(self) -> BenchReport:
        cfg = self.cfg
        groups = [(m, d, b) for m in cfg.models for d in cfg.dtypes for b in cfg.batch_sizes]
        from tqdm import tqdm

        show = cfg.progress and sys.stderr.isatty()
        bar = tqdm(total=len(groups), desc="fastres bench", disable=not show, leave=False,
                   file=sys.stderr)
        try:
            self.run_models(bar)
        except KeyboardInterrupt:  # Ctrl-C, or SIGTERM from `timeout` (see fastres.cli)
            self.interrupted()
        finally:
            bar.close()
        self.report.elapsed_s = time.perf_counter() - self.t0
        self.update()
        return self.report

    def interrupted(self) -> None:
        """Keep what was measured: a row cut off before its timing ends is ``skipped``, the
        groups never started are listed as skipped, and the report says it was interrupted."""
        self.report.interrupted = True
        why = f"interrupted after {time.perf_counter() - self.t0:.0f} s"
        for r in self.report.rows:
            if r.status == "ok" and r.median_ms is None:
                r.status, r.note = "skipped", why
        have = {(r.model, r.dtype, r.batch, r.impl) for r in self.report.rows}
        order = {}
        for m in self.cfg.models:
            for d in self.cfg.dtypes:
                keys = self.impl_keys(m, d)
                for b in self.cfg.batch_sizes:
                    for impl in keys:
                        order[(m, dtype_name(d), b, impl)] = len(order)
                        if (m, dtype_name(d), b, impl) not in have:
                            self.report.rows.append(Row(m, dtype_name(d), b, impl,
                                                        impl_label(impl, d), status="skipped",
                                                        note=why))
        # each group's rows together, in the usual order (a cut-off group gets its missing rows)
        self.report.rows.sort(key=lambda r: order.get((r.model, r.dtype, r.batch, r.impl),
                                                      len(order)))
        groups: dict[tuple, dict[str, Row]] = {}
        for r in self.report.rows:
            groups.setdefault((r.model, r.dtype, r.batch), {})[r.impl] = r
        for rows in groups.values():
            fill_speedups(rows)
        self.report.notes.append(f"{why}: rows not measured are marked skipped")

    def run_models(self, bar) -> None:
        cfg = self.cfg
        for model_name in cfg.models:
            if self.over_budget():
                for d in cfg.dtypes:
                    for b in cfg.batch_sizes:
                        self.skip_group(model_name, d, b, "time budget spent")
                        bar.update(1)
                continue
            bar.set_postfix_str(f"{model_name}: building")
            tv = torchvision_model(model_name, cfg.weights, self.dev)
            for dtype in cfg.dtypes:
                self.run_model_dtype(model_name, tv, dtype, bar)
            del tv
            self.eager_fp32_cache.clear()
            if self.compile_wanted(model_name):
                import torch._dynamo as dynamo  # (a bare "import torch._dynamo" here
                # would make ``torch`` local to this function)

                dynamo.reset()  # drop this model's compiled graphs
            if self.dev.type == "cuda":
                torch.cuda.empty_cache()

    def update(self) -> None:
        self.report.elapsed_s = time.perf_counter() - self.t0
        if self.on_update is not None:
            self.on_update(self.report)

    def skip_group(self, model: str, dtype: torch.dtype, batch: int, why: str) -> None:
        for impl in self.impl_keys(model, dtype):
            self.report.rows.append(Row(model, dtype_name(dtype), batch, impl,
                                        impl_label(impl, dtype), status="skipped", note=why))

    def impl_keys(self, model: str, dtype: torch.dtype) -> list[str]:
        keys = ["eager_fp32", "eager_amp_cl"]
        if dtype != torch.float32:  # (fp32: eager_amp_cl is the channels-last eager model)
            keys.append("eager_cl")
        keys += self.compile_keys(model)
        return keys + ["fastres", "fastres_graphs"]

    def compile_keys(self, model: str) -> list[str]:
        """The ``torch.compile`` rows timed for ``model``."""
        if not self.compile_wanted(model):
            return []
        return (["compile"] + (["compile_max_autotune"] if self.cfg.max_autotune else [])
                + (["compile_freezing"] if self.cfg.compile_freezing else [])
                + (["compile_reduce_overhead"] if self.cfg.compile_reduce_overhead else []))

    def compile_wanted(self, model: str) -> bool:
        cm = self.cfg.compile_models
        return self.cfg.compile and (cm is None or model in cm)

    def run_model_dtype(self, name: str, tv: nn.Module, dtype: torch.dtype, bar) -> None:
        cfg, dev = self.cfg, self.dev
        dn = dtype_name(dtype)
        ref64 = copy.deepcopy(tv).double() if dev.type == "cpu" else None
        # eager in the dtype itself (sets the tolerance), AMP baseline, compile baseline
        cast = tv if dtype == torch.float32 else copy.deepcopy(tv).to(dtype)
        tv_cl = copy.deepcopy(tv).to(memory_format=torch.channels_last)
        cast_cl = tv_cl if dtype == torch.float32 else cast.to(memory_format=torch.channels_last)
        fr_error = ""
        try:
            fr = fastres_twin(tv, dtype)
        except Exception as exc:  # noqa: BLE001 - fastres's rows are FAILED, the run goes on
            fr, fr_error = None, f"building fastres raised {short_error(exc)}"

        # Tuning happens before anything is timed (GPU only; the engine may not exist yet).
        tuner = _fastres_tuner()
        if (cfg.tune and tuner is not None and dev.type == "cuda" and fr is not None
                and not self.over_budget()):
            bar.set_postfix_str(f"{name} {dn}: tuning")
            t = time.perf_counter()
            try:
                tuner(fr, list(cfg.batch_sizes), dtype, cfg.image_size)
                self.report.notes.append(f"{name} {dn}: tuned in {time.perf_counter() - t:.1f} s")
            except Exception as exc:
                self.report.notes.append(f"{name} {dn}: tuning failed ({short_error(exc)}); timed "
                                         "untuned")
        elif cfg.tune and tuner is None and dev.type == "cuda":
            note = "fastres.tuning.tune_model not available: fastres timed untuned"
            if note not in self.report.notes:
                self.report.notes.append(note)

        graphs, graphs_why = None, ""
        optimize = _fastres_optimize()
        if fr is None:
            graphs_why = fr_error
        elif not cfg.cuda_graphs:
            graphs_why = "--no-cuda-graphs"
        elif dev.type != "cuda":
            graphs_why = "CUDA graphs need a GPU"
        elif optimize is None:
            graphs_why = "fastres.optimize not available"
        else:
            try:
                # one graph per batch size of this group (the default bound is 8)
                graphs = optimize(fr, cuda_graphs=True,
                                  max_graphs=max(8, len(cfg.batch_sizes)))
            except Exception as exc:
                graphs_why = f"fastres.optimize failed: {short_error(exc)}"

        autocast = dtype != torch.float32

        def amp_fn(x: Tensor) -> Tensor:
            if autocast:
                with torch.autocast(dev.type, dtype=dtype):
                    return tv_cl(x)
            return tv_cl(x)

        compiled = self.compile_keys(name)

        def to_fp32_nchw(x: Tensor) -> Tensor:
            return x.contiguous()

        def to_fp32_cl(x: Tensor) -> Tensor:
            return x.contiguous(memory_format=torch.channels_last)

        def to_dtype_cl(x: Tensor) -> Tensor:
            return x.to(dtype).contiguous(memory_format=torch.channels_last)

        for batch in cfg.batch_sizes:
            bar.set_postfix_str(f"{name} {dn} batch {batch}")
            if self.over_budget():
                self.skip_group(name, dtype, batch, "time budget spent")
                bar.update(1)
                self.update()
                continue
            try:
                base = self.base_inputs(batch)
                x0 = base[0]
                ref = reference_forward(tv, x0, ref64)
            except (MemoryError, RuntimeError) as exc:
                if not out_of_memory(exc):
                    raise
                # this batch size does not fit: its rows say so, the others are kept
                base = x0 = None
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
                self.skip_group(name, dtype, batch, "out of memory for the inputs or the "
                                f"reference at this batch size ({short_error(exc)})")
                bar.update(1)
                self.update()
                continue
            tol_design = design_tolerance(dtype, dev)
            try:
                eager_same = eager_forward(tv, x0, dtype, cast)
                eager_err = rel_err(eager_same, ref)
                eager_note = f"eager {dn} error {eager_err:.1e}"
            except Exception as exc:  # noqa: BLE001 - the bound is then DESIGN.md's alone
                eager_same, eager_err = None, math.nan
                eager_note = f"eager {dn} raised {short_error(exc)}"
            tol = max(tol_design, 2 * eager_err) if math.isfinite(eager_err) else tol_design

            impls: list[tuple[str, _Impl | None, str]] = []
            impls.append(("eager_fp32", _Impl("eager_fp32", tv, to_fp32_nchw, tv), ""))
            impls.append(("eager_amp_cl", _Impl("eager_amp_cl", amp_fn, to_fp32_cl, tv_cl), ""))
            if dtype != torch.float32:
                impls.append(("eager_cl", _Impl("eager_cl", cast_cl, to_dtype_cl, cast_cl), ""))
            for key in compiled:
                impls.append((key, self.compiled_impl(key, cast_cl, to_dtype_cl), ""))
            impls.append(("fastres",
                          None if fr is None else _Impl("fastres", fr, to_dtype_cl, fr),
                          fr_error))
            impls.append(("fastres_graphs",
                          _Impl("fastres_graphs", graphs, to_dtype_cl, fr) if graphs else None,
                          graphs_why))

            rows: dict[str, Row] = {}
            timed: dict[str, tuple] = {}  # key -> (impl, its inputs, its rounds' times)
            for key, impl, why in impls:
                row = Row(name, dn, batch, key, impl_label(key, dtype),
                          tolerance=tol if key in FASTRES_IMPLS else None)
                rows[key] = row
                self.report.rows.append(row)
                if impl is None:
                    row.status = "FAILED" if fr is None and key in FASTRES_IMPLS else "n/a"
                    row.note = why
                    continue
                if key == "eager_fp32" and (name, batch) in self.eager_fp32_cache:
                    cached = self.eager_fp32_cache[(name, batch)]
                    for f in ("status", "median_ms", "p90_ms", "host_ms", "images_per_s",
                              "peak_mib", "iters", "rel_err", "top1", "note",
                              "round_medians"):
                        setattr(row, f, getattr(cached, f))
                    continue
                if key.startswith("compile") and impl.fn is None:
                    row.status, row.note = "skipped", "compile budget spent"
                    continue
                if key.startswith("compile") and self.compile_would_overrun():
                    row.status, row.note = "skipped", "time budget too short to compile"
                    continue
                first = self.check_and_time(row, impl, base, ref, key in FASTRES_IMPLS)
                if first is not None:
                    timed[key] = (impl, *first)
                if key == "eager_fp32":
                    self.eager_fp32_cache[(name, batch)] = row
            self.more_rounds(rows, timed)
            fill_speedups(rows)
            _add_note(rows["fastres"], eager_note)
            del base, ref, eager_same
            bar.update(1)
            self.update()

    def compile_would_overrun(self) -> bool:
        """A new shape compiles about as long as the last one did: don't start one that
        would run past ``time_budget`` (the rows after it would be cut off)."""
        b = self.cfg.time_budget
        if b is None:
            return False
        left = b - (time.perf_counter() - self.t0)
        return left <= 0 or (self.last_compile_s is not None and left < self.last_compile_s)

    def compiled_impl(self, key: str, model: nn.Module, make_input) -> _Impl:
        """A ``torch.compile`` implementation; compiling happens lazily on the first call."""
        budget = self.cfg.compile_budget
        if budget is not None and self.compile_spent > budget:
            return _Impl(key, None, make_input, model)
        mode = {"compile_max_autotune": "max-autotune-no-cudagraphs",
                "compile_reduce_overhead": "reduce-overhead"}.get(key)
        # Every model, dtype and batch size is one more compiled entry on torchvision's
        # ResNet.forward: past dynamo's recompile limit (8) it would silently run eager.
        import torch._dynamo as dynamo

        for limit in ("recompile_limit", "cache_size_limit"):
            if hasattr(dynamo.config, limit):
                setattr(dynamo.config, limit, max(256, getattr(dynamo.config, limit)))
        # freezing: an inductor option (no mode sets it); the parameters are folded into the
        # graph as constants when it compiles, under the timed calls' inference_mode
        options = {"freezing": True} if key == "compile_freezing" else None
        compiled = torch.compile(model, mode=mode, dynamic=False, options=options)
        return _Impl(key, compiled, make_input, model)

    def round_calls(self) -> tuple[int, float]:
        """Timed calls and seconds of one round: ``iters`` and ``max_time`` split over the
        rounds (each round times at least one call)."""
        rounds = max(1, self.cfg.rounds)
        return max(1, self.cfg.iters // rounds), self.cfg.max_time / rounds

    def check_and_time(self, row: Row, impl: _Impl, base: list[Tensor], ref: Tensor,
                       must_agree: bool) -> tuple[list[Tensor], list[list[float]]] | None:
        """Check the output on ``base[0]``, then time the first round (only if it agrees, for
        fastres). Returns the inputs and the round's times when the row was timed."""
        cfg, dev = self.cfg, self.dev
        inputs = [impl.make_input(x) for x in base]
        is_compile = row.impl.startswith("compile")
        # CUDA graphs: the graph is captured on this first call, with the activations in its
        # private pool (freed there, not counted as allocated later): measure its peak from here
        graphs_row = row.impl == "fastres_graphs" and dev.type == "cuda"
        captures = getattr(impl.fn, "captures", None)
        if graphs_row:
            torch.cuda.synchronize(dev)
            before = torch.cuda.memory_allocated(dev)
            torch.cuda.reset_peak_memory_stats(dev)
        probe = EagerProbe(impl.model if must_agree else None)
        try:
            t = time.perf_counter()
            with torch.inference_mode(), probe:
                out = impl.fn(inputs[0])
                out = out.clone() if isinstance(out, Tensor) else out
            _sync(dev)
            first_call = time.perf_counter() - t
            if is_compile:
                self.compile_spent += first_call
                self.last_compile_s = first_call
                row.note = f"first call (compile) {first_call:.1f} s"
        except Exception as exc:
            row.status = "FAILED" if must_agree else "error"
            row.note = f"raised {short_error(exc)}"
            return None
        if graphs_row and captures is not None and impl.fn.captures == captures:
            row.status = "error"
            row.note = "no CUDA graph was captured for this input (see the warning): not timed"
            return None
        if not isinstance(out, Tensor) or out.shape != ref.shape:
            row.status = "FAILED" if must_agree else "error"
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            row.note = f"output {got} != {tuple(ref.shape)}: not timed"
            return None
        row.rel_err = rel_err(out, ref)
        row.top1 = topk_agreement(out, ref, 1)
        if must_agree and not row.rel_err <= row.tolerance:
            row.status = "FAILED"
            row.note = (f"relative error {row.rel_err:.2e} > tolerance {row.tolerance:.1e}: "
                        "not timed")
            return None
        if not must_agree and not math.isfinite(row.rel_err):
            _add_note(row, "output not finite: timed, but not used for speedups")
        if probe.ran:  # right numbers, but eager's: its speed is not fastres's
            row.status = "error"
            row.note = (f"fastres ran torchvision's eager code, not its fused path "
                        f"({probe.why(inputs[0])}): not timed")
            return None
        del out
        if dev.type == "cuda" and not graphs_row:
            torch.cuda.synchronize(dev)
            before = torch.cuda.memory_allocated(dev)
            torch.cuda.reset_peak_memory_stats(dev)
        iters, max_time = self.round_calls()
        try:
            times = time_calls(impl.fn, inputs, cfg.warmup, iters, max_time, dev)
        except Exception as exc:
            row.status = "FAILED" if must_agree else "error"
            row.note = f"raised while timed: {short_error(exc)}"
            return None
        if dev.type == "cuda":
            peak = torch.cuda.max_memory_allocated(dev) - before
            # (fastres's folded weights were made before ``before``: counted here)
            peak += (_tensor_bytes(inputs) + _param_bytes(impl.model)
                     + _plan_bytes(impl.model))
            row.peak_mib = peak / 2**20
            if row.impl == "compile_freezing":
                _add_note(row, "peak MiB leaves out inductor's frozen copy of the weights "
                               "(made when it compiled, before the measurement)")
            try:
                row.host_ms = statistics.median(host_times(impl.fn, inputs, dev))
            except Exception as exc:  # (it ran just before: note it, keep the timing)
                _add_note(row, f"host time not measured: {short_error(exc)}")
            if row.impl in FASTRES_IMPLS:
                try:
                    syncs = host_syncs(impl.fn, inputs[0])
                except Exception as exc:
                    _add_note(row, f"synchronizations not probed: {short_error(exc)}")
                    syncs = []
                if syncs:
                    _add_note(row, f"synchronizing CUDA operations (torch's sync debug mode): "
                                   f"{len(syncs)}, first: {syncs[0]}")
        rounds = [times]
        set_times(row, rounds)
        return inputs, rounds

    def more_rounds(self, rows: dict[str, Row], timed: dict[str, tuple]) -> None:
        """The group's other rounds: every timed row once per round, in turn (a few warm-up
        calls first, as the row ran others' kernels since)."""
        iters, max_time = self.round_calls()
        for _ in range(max(1, self.cfg.rounds) - 1):
            for key, (impl, inputs, rounds) in timed.items():
                row = rows[key]
                if row.status != "ok":
                    continue
                try:
                    rounds.append(time_calls(impl.fn, inputs, min(self.cfg.warmup, 2), iters,
                                             max_time, self.dev))
                except Exception as exc:  # (its first round stands; say why no more)
                    _add_note(row, f"a later round raised {short_error(exc)}")
                    continue
                set_times(row, rounds)


def set_times(row: Row, rounds: list[list[float]]) -> None:
    """``row``'s statistics over every call of its ``rounds`` (ms per call), and each round's
    median."""
    times = [t for r in rounds for t in r]
    row.iters = len(times)
    row.median_ms = statistics.median(times)
    row.p90_ms = percentile(times, 90)
    row.images_per_s = row.batch / (row.median_ms / 1e3) if row.median_ms > 0 else None
    row.round_medians = [statistics.median(r) for r in rounds]


def baseline_row(rows: dict[str, Row], baseline: str, impl: str) -> Row | None:
    """The row of ``rows`` (one group) that ``impl``'s speedup over ``baseline`` is measured
    against: ``torch.compile`` like for like (``fastres_graphs`` against the reduce-overhead
    compile, which uses CUDA graphs too, everything else against the fastest timed compile
    row without graphs: :data:`COMPILE_NO_GRAPHS`), and for fp32 groups ``eager_cl`` is the
    ``eager_amp_cl`` row (fp32 channels-last, no autocast)."""
    if baseline == "compile" and impl == "fastres_graphs":
        return rows.get("compile_reduce_overhead")
    if baseline == "compile":
        timed = [rows[k] for k in COMPILE_NO_GRAPHS if k in rows and _usable_baseline(rows[k])]
        return min(timed, key=lambda r: r.median_ms) if timed else rows.get("compile")
    if baseline == "eager_cl" and "eager_cl" not in rows:
        amp = rows.get("eager_amp_cl")
        return amp if amp is not None and amp.dtype == "fp32" else None
    return rows.get(baseline)


def _usable_baseline(row: Row) -> bool:
    """Timed, and its output finite: a baseline whose output was not finite (fp16 AMP
    overflowing, say) is shown, timed, but no reference for a speedup."""
    return bool(row.status == "ok" and row.median_ms
                and (row.rel_err is None or math.isfinite(row.rel_err)))


def fill_speedups(rows: dict[str, Row]) -> None:
    """Each row's speedup over every baseline of its group (``None`` where either is untimed,
    or the baseline's output was not finite; see :func:`baseline_row` for which row)."""
    for row in rows.values():
        for b in BASELINES:
            base_row = baseline_row(rows, b, row.impl)
            ok = (base_row is not None and _usable_baseline(base_row)
                  and row.status == "ok" and row.median_ms)
            row.speedup[b] = (base_row.median_ms / row.median_ms) if ok else None


def run_bench(config: BenchConfig, on_update: Callable[[BenchReport], None] | None = None
              ) -> BenchReport:
    """Check, then time every implementation; ``on_update`` is called after each group."""
    from fastres import models

    for m in config.models:
        if m not in models.MODEL_NAMES:
            raise UserError(f"unknown model {m!r}; expected one of {', '.join(models.MODEL_NAMES)}")
    if not config.batch_sizes or any(b < 1 for b in config.batch_sizes):
        raise UserError(f"batch sizes must be >= 1, got {config.batch_sizes}")
    if config.image_size < 32:
        raise UserError(f"--image-size must be at least 32, got {config.image_size}")
    if config.iters < 1 or config.warmup < 0:
        raise UserError(f"--iters must be >= 1 and --warmup >= 0, got {config.iters}, "
                        f"{config.warmup}")
    if config.rounds < 1:
        raise UserError(f"--rounds must be >= 1, got {config.rounds}")
    torch.manual_seed(config.seed)
    saved_threads = torch.get_num_threads()
    saved_benchmark = torch.backends.cudnn.benchmark
    if config.device.type == "cuda":
        # every implementation on cuDNN's timed algorithm choice, not its heuristic one (the
        # baselines' convolutions are cuDNN's, and fastres's layers are tuned)
        torch.backends.cudnn.benchmark = True
    note = ""
    if config.device.type == "cpu":
        threads = config.threads
        if threads is None:
            threads, note = cpu_threads_default()
        if threads < 1:
            raise UserError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    try:
        runner = Runner(config, on_update)
        if note:
            runner.report.notes.append(note)
        return runner.run()
    finally:
        torch.set_num_threads(saved_threads)
        torch.backends.cudnn.benchmark = saved_benchmark


# -- output ----------------------------------------------------------------------------------


def _fmt(v, spec: str, none: str = "-") -> str:
    return none if v is None else format(v, spec)


def _speed(v) -> str:
    return "-" if v is None else f"{v:.2f}x"


TABLE_COLUMNS = ("model", "dtype", "batch", "implementation", "img/s", "median ms", "p90 ms",
                 "host ms", "peak MiB", "rel err", "top-1", "x eager fp32", "x AMP+CL",
                 "x eager CL", "x compile", "status")


def _table_cells(row: Row) -> list[str]:
    status = row.status if not row.note or row.status == "ok" else f"{row.status}: {row.note}"
    if row.status == "ok" and row.note and row.impl.startswith("compile"):
        status = f"ok ({row.note})"
    return [row.model, row.dtype, str(row.batch), row.label, _fmt(row.images_per_s, ".1f"),
            _fmt(row.median_ms, ".2f"), _fmt(row.p90_ms, ".2f"), _fmt(row.host_ms, ".2f"),
            _fmt(row.peak_mib, ".0f"),
            _fmt(row.rel_err, ".1e"), "-" if row.top1 is None else f"{row.top1 * 100:.0f}%",
            _speed(row.speedup.get("eager_fp32")), _speed(row.speedup.get("eager_amp_cl")),
            _speed(row.speedup.get("eager_cl")), _speed(row.speedup.get("compile")), status]


def format_table(report: BenchReport) -> str:
    """The terminal table: environment, one line per implementation, then notes."""
    cells = [list(TABLE_COLUMNS)] + [_table_cells(r) for r in report.rows]
    widths = [max(len(c[i]) for c in cells[:]) if i < len(TABLE_COLUMNS) - 1 else 0
              for i in range(len(TABLE_COLUMNS))]
    right = set(range(4, len(TABLE_COLUMNS) - 1))
    lines = [format_env(report.env), ""]
    for n, c in enumerate(cells):
        parts = [(c[i].rjust(widths[i]) if i in right else c[i].ljust(widths[i]))
                 for i in range(len(c))]
        lines.append("  ".join(parts).rstrip())
        if n == 0:
            lines.append("-" * min(160, sum(widths) + 2 * (len(widths) - 1) + 6))
    lines.append("")
    lines.extend(summary_lines(report))
    for note in report.notes:
        lines.append(f"note: {note}")
    if report.output_error:
        lines.append(f"note: {report.output_error}")
    return "\n".join(lines)


def summary_lines(report: BenchReport) -> list[str]:
    """One line per (model, dtype, batch): fastres's agreement and speedups."""
    out = []
    groups: dict[tuple, dict[str, Row]] = {}
    for r in report.rows:
        groups.setdefault((r.model, r.dtype, r.batch), {})[r.impl] = r
    for (model, dtype, batch), rows in groups.items():
        fr = rows.get("fastres")
        if fr is None:
            continue
        best = fr
        g = rows.get("fastres_graphs")
        if g is not None and g.status == "ok" and (best.status != "ok"
                                                  or g.median_ms < best.median_ms):
            best = g
        head = f"{model} {dtype} batch {batch}: "
        if fr.status == "FAILED":
            out.append(head + f"fastres FAILED the check ({fr.note})")
            continue
        if best.status != "ok" or not best.images_per_s:
            out.append(head + f"fastres {best.status} ({best.note})")
            continue
        compiled = baseline_row(rows, "compile", best.impl)
        short = {"eager_fp32": "eager fp32", "eager_amp_cl": "AMP+CL",
                 "eager_cl": f"eager {dtype}+CL",
                 "compile": IMPLS[compiled.impl].removeprefix("torch.") if compiled else ""}
        speed = ", ".join(f"{best.speedup[b]:.2f}x vs {short[b]}"
                          for b in BASELINES if best.speedup.get(b))
        checked = fr if fr.rel_err is not None else best
        agree = ("agrees with torchvision: rel err "
                 f"{_fmt(checked.rel_err, '.1e')} <= {_fmt(checked.tolerance, '.1e')}, top-1 "
                 + ("-" if checked.top1 is None else f"{checked.top1 * 100:.0f}%"))
        out.append(head + f"{best.label} {best.images_per_s:.1f} img/s ({speed}); {agree}")
    moved = [f"{r.model} {r.dtype} b{r.batch} {r.label} ({min(r.round_medians):.3g}-"
             f"{max(r.round_medians):.3g} ms)" for r in report.rows
             if r.status == "ok" and len(r.round_medians) > 1 and min(r.round_medians) > 0
             and max(r.round_medians) / min(r.round_medians) - 1 > ROUND_SPREAD_NOTE]
    if moved:
        out.append(f"round medians differing by more than {ROUND_SPREAD_NOTE:.0%} (the host or "
                   f"the GPU was busier in some rounds): {', '.join(moved)}")
    untimed = sum(r.impl in FASTRES_IMPLS and r.status == "error" for r in report.rows)
    out.append("result: " + ("FAILED: fastres outputs disagree with torchvision (not timed)"
                             if not report.ok else "all outputs agree" if report.checked
                             else "nothing was checked (every group skipped)")
               + (f"; {untimed} fastres row{'s' if untimed > 1 else ''} not timed (error, "
                  "see above)" if untimed else "")
               + (" (INTERRUPTED: partial results)" if report.interrupted else ""))
    return out


def to_markdown(report: BenchReport) -> str:
    def esc(s: str) -> str:
        return s.replace("|", "\\|")

    lines = ["# fastres bench", ""]
    lines += [f"- {esc(line)}" for line in format_env(report.env).splitlines()]
    lines += ["", "| " + " | ".join(TABLE_COLUMNS) + " |",
              "|" + "|".join("---:" if i == 2 or 4 <= i < len(TABLE_COLUMNS) - 1 else "---"
                             for i in range(len(TABLE_COLUMNS))) + "|"]
    for r in report.rows:
        lines.append("| " + " | ".join(esc(c) for c in _table_cells(r)) + " |")
    lines += [""] + [f"- {esc(s)}" for s in summary_lines(report)]
    lines += [f"- note: {esc(n)}" for n in report.notes]
    lines += ["", "Speedup columns: the baseline's median latency / this row's median latency "
              "(same run, same inputs). \"x eager CL\": torchvision in the row's dtype, "
              "channels-last, eager. \"x compile\": like for like, fastres against "
              "the fastest torch.compile row without CUDA graphs (default mode, or "
              "max-autotune or freezing where timed) and fastres + CUDA graphs against its "
              "reduce-overhead mode (CUDA graphs; \"-\" when that row was not timed). "
              + ("cuDNN benchmark mode was on for every row. "
                 if report.env.get("cudnn_benchmark") else "")
              + "Relative error against torchvision "
              + ("float64" if str(report.env.get("device")) == "cpu" else "fp32 with TF32 off")
              + "."]
    return "\n".join(lines) + "\n"


def plot(report: BenchReport, path: str) -> str | None:
    """``bench.png``: throughput vs batch size per implementation (top) and fastres's speedup
    over each baseline (bottom), one column per model. Returns a note if it could not plot."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: bench.png not written"
    ok = [r for r in report.rows if r.status == "ok" and r.images_per_s]
    models = list(dict.fromkeys(r.model for r in report.rows)) or ["(none)"]
    fig, axes = plt.subplots(2, len(models), figsize=(max(9.0, 6.5 * len(models)), 9),
                             squeeze=False)
    for col, model in enumerate(models):
        ax = axes[0][col]
        series: dict[str, list[tuple[int, float]]] = {}
        for r in ok:
            if r.model != model:
                continue
            key = r.label if r.impl == "eager_fp32" else f"{r.label} ({r.dtype})"
            pts = series.setdefault(key, [])
            if all(b != r.batch for b, _ in pts):
                pts.append((r.batch, r.images_per_s))
        for key, pts in series.items():
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=key)
        if series:
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.legend(fontsize=7)
        ax.set_title(f"{model}: throughput")
        ax.set_xlabel("batch size")
        ax.set_ylabel("images / s")
        ax.grid(True, which="both", alpha=0.3)

        ax = axes[1][col]
        groups = []
        for r in report.rows:
            if r.model == model and r.impl == "fastres" and (r.dtype, r.batch) not in groups:
                groups.append((r.dtype, r.batch))
        present = [b for b in BASELINES
                   if any(r.speedup.get(b) for r in ok if r.model == model)] or ["eager_fp32"]
        width = 0.8 / len(present)
        for j, b in enumerate(present):
            vals = []
            for dt, bs in groups:
                cands = [r for r in ok if r.model == model and r.dtype == dt and r.batch == bs
                         and r.impl in FASTRES_IMPLS and r.speedup.get(b)]
                # no bar (not a 0x one) for a group without a timed fastres row (FAILED, skipped)
                vals.append(max((r.speedup[b] for r in cands), default=float("nan")))
            label = {"eager_amp_cl": "torchvision channels_last (AMP for fp16/bf16)",
                     "eager_cl": "torchvision in the dtype, channels_last",
                     "compile": "fastest torch.compile (graphs: reduce-overhead)"}.get(b, IMPLS[b])
            ax.bar([i + (j - (len(present) - 1) / 2) * width for i in range(len(groups))],
                   vals, width, label=f"vs {label}")
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels([f"{dt}\nb{bs}" for dt, bs in groups])
        ax.set_title(f"{model}: fastres speedup (best of plain / CUDA graphs)")
        ax.set_ylabel("speedup (x)")
        ax.legend(fontsize=7)
    dev = report.env.get("gpu") or report.env.get("cpu")
    fig.suptitle(f"fastres bench on {dev}\nfastres {report.env.get('fastres')}, torch "
                 f"{report.env.get('torch')}, {report.env.get('date')}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None


def _finite(obj):
    """JSON-safe: non-finite floats become the strings "inf" / "-inf" / "nan"."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _write_file(path: str, write: Callable[[str], str | None]) -> str | None:
    """Write ``path`` through a temporary file beside it (never a half-written file, and no
    temporary one left when ``write`` raises or is interrupted). The temporary file keeps the
    extension (matplotlib picks the format by it). ``write(tmp)`` may return a note instead
    of writing: ``path`` is then left alone and the note returned."""
    root, ext = os.path.splitext(path)
    tmp = f"{root}.tmp{ext}"
    try:
        note = write(tmp)
        if note is None:
            os.replace(tmp, path)
        return note
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def write_outputs(report: BenchReport, out_dir: str, png: bool = True) -> list[str]:
    """Write ``bench.json`` and ``bench.md`` (and ``bench.png``) under ``out_dir``.

    Called after every group (checkpoints) and at the end. A write that fails (the directory
    removed, replaced or made unwritable during the run, a full disk, a plot that raises)
    neither stops the run nor loses what was measured: it warns on stderr,
    ``report.output_error`` says why (the terminal table prints it; ``fastres bench`` exits
    2), and the paths that were written are returned. (No matplotlib is no failure: the
    JSON and Markdown note that there is no picture.)
    """
    import json

    def write_json(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(_finite(report.to_json()), f, indent=1, default=str, allow_nan=False)

    def write_md(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(to_markdown(report))

    def warn(msg: str) -> None:
        if msg not in report.warned_outputs:
            print(f"fastres bench: warning: {msg}", file=sys.stderr)
            report.warned_outputs.add(msg)
        errors.append(msg)

    paths: list[str] = []
    errors: list[str] = []
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as exc:
        why = exc.strerror or short_error(exc)
        warn(f"--out {out_dir!r} could not be written ({why}): these results are not saved "
             "there")
        report.output_error = errors[0]
        return paths
    picture = None
    if png:  # first: a note on why there is no picture goes into the JSON and Markdown
        ppath = os.path.join(out_dir, "bench.png")
        try:
            note = _write_file(ppath, lambda tmp: plot(report, tmp))
            picture = ppath if note is None else None
        except Exception as exc:  # noqa: BLE001 - the numbers matter more than a picture
            if "matplotlib.pyplot" in sys.modules:  # plot() stopped before closing it
                sys.modules["matplotlib.pyplot"].close("all")
            note = f"bench.png not written: {short_error(exc)}"
            why = (exc.strerror if isinstance(exc, OSError) else None) or short_error(exc)
            warn(f"{ppath!r} could not be written ({why}): no plot of this run")
        if note is not None and note not in report.notes:
            report.notes.append(note)
    # each file on its own: one that cannot be written does not keep the other from its place
    for name, write in (("bench.json", write_json), ("bench.md", write_md)):
        path = os.path.join(out_dir, name)
        try:
            _write_file(path, write)
        except OSError as exc:
            why = exc.strerror or short_error(exc)
            warn(f"{path!r} could not be written ({why}): these results are not saved there")
            continue
        paths.append(path)
    report.output_error = "; ".join(errors) or None
    return paths + ([picture] if picture else [])
