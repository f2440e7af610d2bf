"""What a model's first tuning spends compiling: the tuner's Triton candidates for every
distinct convolution of the model, compiled with one thread and with fastres's pool.

    python benchmarks/compile_time.py [--model resnet50] [--batch 256] [--dtype bf16]
                                      [--threads 1 16] [--layers N] [--json FILE]

Before timing a layer's candidates the tuner compiles them all (``compile_only``, Triton's
``warmup``: nothing is launched) on ``FASTRES_COMPILE_THREADS`` threads; with one thread each
candidate compiles at its first launch, one after another. This times exactly that compile
step, layer by layer, for each thread count, each in a fresh process with an empty Triton
cache of its own (a warm cache compiles nothing). With a GPU the kernels are compiled for it;
without one, for an H100 (sm_90), through a stand-in for Triton's driver that names that
target: the same compiler passes and ``ptxas``, no device.

Prints, per thread count, the wall time, the kernels compiled and the speed-up over the first
count given.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _child(args: argparse.Namespace) -> dict:
    os.environ.pop("TRITON_INTERPRET", None)
    import torch
    import triton

    device = "cuda" if torch.cuda.is_available() else "cpu"
    target = "this GPU"
    if device == "cpu":
        from fastres.compile_report import use_sm90_driver

        use_sm90_driver()
        target = "sm_90 (no GPU: stand-in driver)"
    from benchmarks.conv_layers import DTYPES, model_conv_layers
    from fastres.kernels import _direct, conv

    dtype = DTYPES[args.dtype]
    cl = torch.channels_last
    layers = model_conv_layers(args.model)[:args.layers or None]
    rows = []
    t_all = time.perf_counter()
    for layer in layers:
        # (contents never read: compile only; empty tensors of the layer's shapes)
        x = torch.empty(args.batch, layer.c, layer.h, layer.w, dtype=dtype, device=device,
                        memory_format=cl)
        w = torch.empty(layer.k, layer.c // layer.groups, layer.r, layer.s, dtype=dtype,
                        device=device, memory_format=cl)
        b = torch.empty(layer.k, device=device)
        res = None
        if layer.residual:
            p, q = layer.out_hw()
            res = torch.empty(args.batch, layer.k, p, q, dtype=dtype, device=device,
                              memory_format=cl)
        st, pd, dl = (layer.stride,) * 2, (layer.pad,) * 2, (layer.dil,) * 2
        prob = conv.ConvProblem.from_tensors(x, w, st, pd, dl, layer.groups, res, layer.relu,
                                             None)
        t0 = time.perf_counter()
        conv.conv_bias_act_triton(x, w, b, st, pd, dl, layer.groups, res, layer.relu,
                                  compile_only=True)
        rows.append({"layer": layer.name, "shape": layer.shape_str(),
                     "candidates": len(conv.problem_configs(prob)),
                     "s": round(time.perf_counter() - t0, 3)})
    kernels = sum(len(c[0]) for k in (conv.conv_bias_act_kernel, conv.split_k_epilogue_kernel)
                  for c in k.device_caches.values())
    return {"threads": _direct.compile_threads(), "seconds": time.perf_counter() - t_all,
            "kernels": kernels, "layers": rows, "target": target,
            "triton": triton.__version__, "torch": torch.__version__}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    ap.add_argument("--threads", type=int, nargs="+", default=None,
                    help="thread counts to compare (default: 1 and fastres's default)")
    ap.add_argument("--layers", type=int, default=0, help="only the first N layers (0: all)")
    ap.add_argument("--json", type=Path, default=None, help="write the results here too")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args)))
        return 0
    counts = args.threads
    if counts is None:
        from fastres.kernels._direct import compile_threads

        os.environ.pop("FASTRES_COMPILE_THREADS", None)
        counts = sorted({1, compile_threads()})
    if any(n < 1 for n in counts):
        ap.error(f"--threads takes positive counts, got {counts}")
    results = []
    for n in counts:
        with tempfile.TemporaryDirectory(prefix="fastres-compile-time-") as cache:
            env = {**os.environ, "TRITON_CACHE_DIR": cache, "FASTRES_COMPILE_THREADS": str(n)}
            env.pop("TRITON_INTERPRET", None)
            cmd = [sys.executable, str(Path(__file__).resolve()), "--child",
                   "--model", args.model, "--batch", str(args.batch), "--dtype", args.dtype,
                   "--layers", str(args.layers)]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr[-4000:], file=sys.stderr)
            print(f"compile_time: the run with {n} thread(s) failed", file=sys.stderr)
            return 1
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    first = results[0]
    print(f"{args.model} {args.dtype} batch {args.batch}: {len(first['layers'])} distinct "
          f"convolutions; target {first['target']}; Triton {first['triton']}, "
          f"{os.cpu_count()} CPUs")
    print("| threads | kernels compiled | wall s | x first |")
    print("|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['threads']} | {r['kernels']} | {r['seconds']:.1f} | "
              f"{first['seconds'] / r['seconds']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)},
                                         "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
