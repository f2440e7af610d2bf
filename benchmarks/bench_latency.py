"""Batch-1 latency of ResNet-50: fastres with and without CUDA graphs vs eager and compile.

    python benchmarks/bench_latency.py --out DIR [--dtypes bf16 fp32] [--iters 200]

For each dtype, in one process on one GPU:

- ``eager``: torchvision eager (fp32: fp32 NCHW; bf16: autocast + channels-last, the usual
  mixed-precision baseline, which casts every weight again on each call); ``eager_fp32``, in
  a 16-bit dtype's table: fp32 NCHW eager too; ``eager_cl``, in a 16-bit dtype's table:
  torchvision cast to the dtype, channels-last, with the input fastres gets (no casts);
- ``compile_reduce_overhead``: ``torch.compile(torchvision, mode="reduce-overhead")`` of the
  model cast to the dtype, channels-last (inductor + CUDA graphs);
  ``compile_reduce_overhead_freezing``: the same with inductor's ``freezing`` option too
  (BatchNorm folded into constant weights, as fastres folds it); the "vs best compile (r-o)"
  column is against the faster of the two;
- ``fastres``: the fastres eval forward (tuned, no graphs);
- ``fastres_dispatch``: the same with every Triton launch through Triton's own dispatch
  (``kernel[grid]``) instead of straight to the compiled kernel
  (:mod:`fastres.kernels._direct`, what ``FASTRES_DIRECT_LAUNCH=0`` does): what that saves;
- ``fastres_graphs``: ``fastres.optimize(model, cuda_graphs=True)``.

Every implementation's output is first checked against a float64 reference of the same
weights; fastres's must be within ``max(DESIGN.md bound, 2 x eager's own error)``, or its row
is reported ``FAILED`` and not timed (a baseline's error is reported, never a reason to drop
it). Timing: warm-up (which tunes fastres and captures
graphs), then ``--iters`` calls, each bracketed by CUDA events and followed by a synchronize
(true per-call latency, launch overhead included), in ``--rounds`` interleaved rounds (each
implementation timed once per round, in turn: a busy spell of the host falls on every row, and
each row lists its round medians); medians and p10/p90 over all calls are reported, with the
speedup of each row over eager, over the fastest eager row of its table, and over compile.
cuDNN's benchmark mode is on for every row (its algorithms timed per shape during the
warm-up, as fastres tunes its kernels). Exit status 1 when a fastres row is
``FAILED`` or ``ERROR``. Writes ``DIR/bench_latency.json`` and
``DIR/bench_latency.md``. Phase times are printed so a slow first run (tuning, inductor
compile) is visible; later runs reuse the tuning cache and Triton's and inductor's caches.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import platform
import signal
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fastres
from fastres.verify import realistic_bn

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DESIGN_TOL = {torch.float32: 2e-3, torch.bfloat16: 2e-2, torch.float16: 2e-2}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    return float(torch.linalg.vector_norm(out - ref) / torch.linalg.vector_norm(ref))


def time_ms(fn, x, iters: int, warmup: int) -> dict:
    """Median, p10 and p90 milliseconds of ``iters`` calls after ``warmup`` untimed ones
    (``times``: every call's, sorted)."""
    with torch.no_grad():
        for _ in range(warmup):
            fn(x)
        times = []
        if x.is_cuda:
            torch.cuda.synchronize()
            for _ in range(iters):
                s = torch.cuda.Event(enable_timing=True)
                e = torch.cuda.Event(enable_timing=True)
                s.record()
                fn(x)
                e.record()
                e.synchronize()
                times.append(s.elapsed_time(e))
        else:  # --smoke on a CPU machine
            for _ in range(iters):
                t0 = time.perf_counter()
                fn(x)
                times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return {**_percentiles(times), "iters": iters, "times": times}


def _percentiles(times: list[float]) -> dict:
    """Median, p10 and p90 of ``times``, interpolated as ``fastres bench``'s (numpy's
    default)."""
    from fastres.bench import percentile

    return {"median_ms": percentile(times, 50), "p10_ms": percentile(times, 10),
            "p90_ms": percentile(times, 90)}


def merge_rounds(row: dict, rounds: list[dict]) -> None:
    """``row``'s median, p10 and p90 over every call of its ``rounds`` (each a
    :func:`time_ms` result), and each round's median (``round_medians``): the rows of a table
    are timed in interleaved rounds, so a stretch of a busy host lands on every row, and the
    spread of a row's round medians shows how much its figure moved."""
    times = sorted(t for r in rounds for t in r["times"])
    row.update(_percentiles(times), iters=len(times),
               round_medians=[r["median_ms"] for r in rounds])


def env_info() -> dict:
    import importlib.metadata as md

    def ver(name):
        try:
            return md.version(name)
        except Exception:
            return None

    from fastres.bench import _extension_status, _gpu_driver, _source_commit

    cuda = torch.cuda.is_available()
    return {
        "gpu": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        "capability": "{}.{}".format(*torch.cuda.get_device_capability()) if cuda else None,
        "driver": _gpu_driver() if cuda else None,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "fastres_commit": _source_commit(),
        "fastres_extension": _extension_status()[0],
        "torch": torch.__version__,
        "triton": ver("triton"),
        "torchvision": ver("torchvision"),
        "fastres": fastres.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "tf32_conv": torch.backends.cudnn.allow_tf32,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "fastres_tune": os.environ.get("FASTRES_TUNE", "1"),
    }


def bench_dtype(name: str, dtype: torch.dtype, tv_fp32: torch.nn.Module, args,
                rows: list[dict] | None = None, on_row=None) -> list[dict]:
    """Check and time every implementation in ``dtype``; each row is appended to ``rows`` (and
    ``on_row()`` called) as soon as it is measured, so an interrupted run keeps it."""
    device = args.device
    torch.manual_seed(args.seed + 1)
    x32 = torch.randn(1, 3, args.image_size, args.image_size, device=device)
    cl = torch.channels_last
    with torch.no_grad():
        ref = copy.deepcopy(tv_fp32).double()(x32.double())

    impls = {}
    if dtype == torch.float32:
        impls["eager"] = (lambda x: tv_fp32(x), x32)
    else:
        tv_cl = copy.deepcopy(tv_fp32).to(memory_format=cl)

        def eager_amp(x, m=tv_cl):
            with torch.autocast(device, dtype=dtype):
                return m(x)

        impls["eager"] = (eager_amp, x32.contiguous(memory_format=cl))
        impls["eager_fp32"] = (lambda x: tv_fp32(x), x32)
    x_dt = x32.to(dtype).contiguous(memory_format=cl)
    tv_dt = copy.deepcopy(tv_fp32).to(dtype=dtype, memory_format=cl)
    if dtype != torch.float32:
        impls["eager_cl"] = (tv_dt, x_dt)
    if args.compile:
        impls["compile_reduce_overhead"] = (torch.compile(tv_dt, mode="reduce-overhead"), x_dt)
        if args.freezing:  # (a mode and options cannot both be given: the mode's options)
            from torch._inductor import list_mode_options

            options = {**list_mode_options("reduce-overhead"), "freezing": True}
            impls["compile_reduce_overhead_freezing"] = (
                torch.compile(tv_dt, options=options), x_dt)
    fr = fastres.from_torchvision(tv_fp32).to(dtype).eval()
    impls["fastres"] = (fr, x_dt)
    from fastres.kernels import _direct

    def fastres_dispatch(x, m=fr):
        old = _direct.ENABLED
        _direct.ENABLED = False
        try:
            return m(x)
        finally:
            _direct.ENABLED = old

    impls["fastres_dispatch"] = (fastres_dispatch, x_dt)
    try:
        graphs = fastres.optimize(fr, cuda_graphs=True)
    except Exception as exc:  # the row says so (ERROR), as for an error in its first call
        def graphs(x, exc=exc):
            raise exc
    impls["fastres_graphs"] = (graphs, x_dt)

    rows = [] if rows is None else rows
    eager_err = None
    rounds = max(1, min(args.rounds, args.iters))
    per_round = max(1, args.iters // rounds)
    timed: dict[str, list[dict]] = {}  # impl -> its rounds (time_ms results)
    mine: dict[str, dict] = {}
    for impl, (fn, x) in impls.items():
        row = {"dtype": name, "impl": impl, "batch": 1, "image_size": args.image_size}
        t0 = time.perf_counter()
        try:
            with torch.no_grad():
                out = fn(x)  # first call: compile / tune / capture
                out = fn(x)
                if device == "cuda":
                    torch.cuda.synchronize()
                row["first_calls_s"] = round(time.perf_counter() - t0, 2)
                err = rel_err(out.float(), ref)
                if impl == "eager":
                    eager_err = err
                tol = max(DESIGN_TOL[dtype], 2 * (eager_err or 0.0))
                row.update(rel_err=err, tol=tol)
                if not err <= tol and impl.startswith("fastres"):
                    # (as fastres bench: only fastres must agree; a baseline's error is shown,
                    # never a reason to drop the number fastres is compared with)
                    row["status"] = "FAILED"
                    log(f"{name} {impl}: relative error {err:.3e} > {tol:.1e}: FAILED, not timed")
                else:
                    timed[impl] = [time_ms(fn, x, per_round, args.warmup)]
                    merge_rounds(row, timed[impl])
                    row["status"] = "ok"
        except Exception as exc:  # a baseline that cannot run is reported, not fatal
            row.update(status="ERROR", error=f"{type(exc).__name__}: {str(exc)[:300]}")
        rows.append(row)  # kept before it is logged: a SIGTERM after the log line keeps it
        mine[impl] = row
        add_speedups(rows)
        if on_row is not None:
            on_row()
        log(f"{name} {impl}: {row.get('status')} "
            f"median {row.get('median_ms', float('nan')):.3f} ms "
            f"(first calls {row.get('first_calls_s', '-')} s)")
    # the other rounds, every row in turn (the host's busy spells then fall on every row)
    for _ in range(rounds - 1):
        for impl, rounds_done in timed.items():
            fn, x = impls[impl]
            try:
                rounds_done.append(time_ms(fn, x, per_round, min(args.warmup, 3)))
            except Exception as exc:  # (it ran before: keep what was measured, say why)
                mine[impl]["error"] = f"a later round raised {type(exc).__name__}: {exc}"[:300]
                continue
            merge_rounds(mine[impl], rounds_done)
        add_speedups(rows)
        if on_row is not None:
            on_row()
    for impl, rounds_done in timed.items():
        medians = mine[impl]["round_medians"]
        log(f"{name} {impl}: median {mine[impl]['median_ms']:.3f} ms over {len(medians)} "
            f"rounds (round medians {min(medians):.3f} to {max(medians):.3f} ms)")
    from fastres import tuning

    log(f"{name}: tuning stats {tuning.stats()}, graphs held "
        f"{getattr(impls['fastres_graphs'][0], 'num_graphs', 0)}")
    return rows


EAGER_ROWS = ("eager", "eager_fp32", "eager_cl")
COMPILE_ROWS = ("compile_reduce_overhead", "compile_reduce_overhead_freezing")


def add_speedups(rows: list[dict]) -> None:
    """``speedup_vs_eager`` / ``speedup_vs_best_eager`` (the fastest of the table's eager
    rows) / ``speedup_vs_compile_reduce_overhead`` (the faster of the reduce-overhead rows,
    with and without freezing) of every timed row, against the baselines of the same dtype
    measured in the same run."""
    for dt in {r["dtype"] for r in rows}:
        same = [r for r in rows if r["dtype"] == dt]
        base = {r["impl"]: r.get("median_ms") for r in same if r.get("status") == "ok"}
        eager = [base[k] for k in EAGER_ROWS if base.get(k)]
        if eager:
            base["best_eager"] = min(eager)
        compiled = [base[k] for k in COMPILE_ROWS if base.get(k)]
        base["compile_reduce_overhead"] = min(compiled) if compiled else None
        for r in same:
            for b in ("eager", "best_eager", "compile_reduce_overhead"):
                if r.get("status") == "ok" and r.get("median_ms") and base.get(b):
                    r[f"speedup_vs_{b}"] = base[b] / r["median_ms"]


def _err(v) -> str:
    """A relative error: ``nan``/``inf`` shown as such (an output that was NaN), not as ``-``."""
    return "-" if v is None else format(v, ".1e")


def _spread(medians) -> str:
    """A row's round medians as ``min-max`` (ms), or ``-``."""
    if not medians:
        return "-"
    return f"{min(medians):.3f}-{max(medians):.3f}"


def to_markdown(report: dict) -> str:
    env = report["env"]
    lines = [
        f"# {report['args']['model']} batch-1 latency ({env['gpu']})",
        "",
        (f"driver {env.get('driver')}, CUDA {env['cuda']}, cuDNN {env.get('cudnn')}; "
         f"torch {env['torch']}, triton {env['triton']}, torchvision {env['torchvision']}, "
         f"fastres {env['fastres']}"
         + (f" at {env['fastres_commit']}" if env.get("fastres_commit") else "")
         + f" (CUDA extension {'loaded' if env.get('fastres_extension') else 'NOT loaded'}); "
         f"{env['date']}; TF32 convolutions {'on' if env['tf32_conv'] else 'off'}; "
         f"cuDNN benchmark mode "
         f"{ {True: 'on', False: 'off'}.get(env.get('cudnn_benchmark'), 'not recorded')}; "
         f"FASTRES_TUNE={env.get('fastres_tune')}."),
        "",
        ("| dtype | implementation | median ms | p10 | p90 | round medians | speedup vs eager "
         "| vs best eager | vs best compile (r-o) | rel err | status |"),
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]

    def f(v, spec):
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)

    for r in report["rows"]:
        lines.append(
            f"| {r['dtype']} | {r['impl']} | {f(r.get('median_ms'), '.3f')} | "
            f"{f(r.get('p10_ms'), '.3f')} | {f(r.get('p90_ms'), '.3f')} | "
            f"{_spread(r.get('round_medians'))} | {f(r.get('speedup_vs_eager'), '.2f')} | "
            f"{f(r.get('speedup_vs_best_eager'), '.2f')} | "
            f"{f(r.get('speedup_vs_compile_reduce_overhead'), '.2f')} | "
            f"{_err(r.get('rel_err'))} | {r.get('status')} |")
    lines += ["", f"Phases (s): {json.dumps(report['phases_s'])}", ""]
    if report.get("interrupted"):
        lines += ["INTERRUPTED: partial results (the rows measured before the stop).", ""]
    return "\n".join(lines)


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
        return value
    return parse


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=sorted(DTYPES))
    p.add_argument("--iters", type=_int_at_least(1), default=200,
                   help="timed calls per implementation, over all rounds (default: 200)")
    p.add_argument("--rounds", type=_int_at_least(1), default=4,
                   help="the timed calls are split into this many rounds, every "
                        "implementation timed once per round in turn (default: 4)")
    p.add_argument("--warmup", type=_int_at_least(0), default=20)
    p.add_argument("--image-size", type=_int_at_least(32), default=224)
    p.add_argument("--model", default="resnet50")
    p.add_argument("--seed", type=_int_at_least(0), default=0,
                   help="random weights from SEED, the input from SEED + 1 (default: 0)")
    p.add_argument("--no-compile", dest="compile", action="store_false",
                   help="skip the torch.compile(mode='reduce-overhead') baselines")
    p.add_argument("--no-freezing", dest="freezing", action="store_false",
                   help="skip the reduce-overhead baseline with inductor's freezing option "
                        "(one compile less)")
    p.add_argument("--smoke", action="store_true",
                   help="check the script on a CPU machine (small sizes, wall-clock timing; "
                        "the numbers mean nothing)")
    args = p.parse_args(argv)
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cpu":
        if not args.smoke:
            print("bench_latency: needs a CUDA GPU (or --smoke)", file=sys.stderr)
            return 2
        args.compile = False
    import torchvision

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    phases, rows = {}, []
    report = {"env": env_info(), "args": vars(args), "rows": rows, "phases_s": phases,
              "interrupted": False}

    def write() -> str:
        phases["total"] = round(time.perf_counter() - t_start, 1)
        (out_dir / "bench_latency.json").write_text(json.dumps(report, indent=1))
        md = to_markdown(report)
        (out_dir / "bench_latency.md").write_text(md)
        return md

    def on_term(signum, frame):  # `timeout` sends SIGTERM: stop like Ctrl-C, keep the rows
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    saved_benchmark = torch.backends.cudnn.benchmark
    if args.device == "cuda":
        torch.backends.cudnn.benchmark = True  # every row on cuDNN's timed algorithms
        report["env"]["cudnn_benchmark"] = True
    try:
        torch.manual_seed(args.seed)
        tv = getattr(torchvision.models, args.model)(weights=None).to(args.device)
        tv = realistic_bn(tv, batch=4, size=96, device=args.device)
        for name in args.dtypes:
            t0 = time.perf_counter()
            bench_dtype(name, DTYPES[name], tv, args, rows, write)
            phases[name] = round(time.perf_counter() - t0, 1)
    except KeyboardInterrupt:
        report["interrupted"] = True
        log("interrupted: writing the rows measured so far")
        print(write())
        return 130
    finally:
        torch.backends.cudnn.benchmark = saved_benchmark
    print(write())
    return 1 if any(r.get("status") in ("FAILED", "ERROR") and r["impl"].startswith("fastres")
                    for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
