"""fastres's own Python cost per forward, with every Triton launch replaced by a no-op.

    python benchmarks/host_overhead.py [--model resnet50] [--size 32] [--path tuned|auto]

At batch 1 on a GPU, an eager fastres forward (no CUDA graphs) is bound by the host: the
kernels are shorter than the Python that launches them. This measures the part of that host
time that is fastres's (the plan, the implementation choice, the launchers' argument
preparation) on any machine, GPU or not: the Triton kernels are imported interpreted and then
replaced by stubs that return at once, so neither the kernels nor Triton's launcher are
timed. What it does not measure: Triton's own launch cost and the GPU.

``--path tuned`` goes through the measured-choice memo (what CUDA tensors take; choices
pinned, nothing timed); ``--path auto`` through the fixed order (what CPU tensors take).
Prints the best of ``--repeats`` medians, in milliseconds per forward, on one CPU thread.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: kernels we can replace
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class _NoLaunch:
    """Stands in for a Triton kernel: ``kernel[grid](*args, **kwargs)`` does nothing."""

    def __getitem__(self, grid):
        return self._launch

    @staticmethod
    def _launch(*args, **kwargs):
        return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--size", type=int, default=32, help="input height and width")
    ap.add_argument("--path", choices=("tuned", "auto"), default="tuned")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    with contextlib.ExitStack() as stack:
        if not os.environ.get("FASTRES_CACHE_DIR"):  # a cache of its own, removed at the end
            os.environ["FASTRES_CACHE_DIR"] = stack.enter_context(
                tempfile.TemporaryDirectory(prefix="fastres-overhead-"))
        return _measure(args)


def _measure(args: argparse.Namespace) -> int:
    os.environ["FASTRES_TUNE"] = "0"
    import torch

    import fastres
    from fastres import tuning
    from fastres.kernels import conv, head, pool
    from fastres.ops import _backend

    for module in (conv, pool, head):
        for name in dir(module):
            if name.endswith("_kernel"):
                setattr(module, name, _NoLaunch())
    if args.path == "tuned":
        tuning.configure(devices=("cpu",), timer=lambda run, cand=None: 1.0, check=False,
                         progress=False)
    torch.set_num_threads(1)
    model = getattr(fastres, args.model)().eval()
    x = torch.randn(1, 3, args.size, args.size)
    medians = []
    with torch.no_grad(), _backend.use_backend("triton"):
        for _ in range(3):
            model(x)
        for _ in range(args.repeats):
            times = []
            for _ in range(args.iters):
                t0 = time.perf_counter()
                model(x)
                times.append(time.perf_counter() - t0)
            medians.append(statistics.median(times))
    ms = min(medians) * 1e3
    print(f"{args.model} 1x3x{args.size}x{args.size}, {args.path} path: {ms:.3f} ms of fastres "
          f"Python per forward (kernels stubbed; best of {args.repeats} medians of "
          f"{args.iters}; torch {torch.__version__}, one thread)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
