"""Per-layer benchmark of fastres's Triton ``conv_bias_act`` against cuDNN on ResNet-50's
convolutions.

    python benchmarks/conv_layers.py --out DIR [--batch 1 32 256] [--dtype bf16 fp16]
                                     [--arch resnet50] [--time-budget S]

Every distinct convolution of the model (derived from the module tree, shapes traced on the
meta device at 224x224) at each batch size and dtype, in one process on one GPU:

- ``fastres``: the fused Triton kernel (conv + folded-BN bias [+ residual] [+ ReLU], one
  launch), autotuned first (its candidate table, timed once per shape);
- ``cudnn conv``: ``F.conv2d`` alone, channels-last, ``cudnn.benchmark`` on;
- ``cudnn fused``: what eager PyTorch runs for the same layer: ``F.conv2d`` with bias, then
  ``add_(residual)`` and ``relu_()`` where the layer has them.

Each row also has its roofline floors (:func:`floors`): the least time the fused kernel and
cuDNN's convolution alone could take at the copy bandwidth and matmul throughput measured at
the start of each dtype (:func:`device_roofs`), and the report lists how close each comes.

The fastres output is checked against the eager one before anything is timed (:func:`rel_err`:
the larger of the norm-wise and the worst element's error, within :data:`TOL`); a disagreeing
layer is reported FAILED, not timed. The stem's row (``conv1``) times the convolution kernel
on the stem's shape, as for every layer; the model runs the fused ``stem`` op (that
convolution, its ReLU and the max-pool), which these rows do not time.
Times are GPU times: medians of CUDA-event timed groups after warm-up, queued behind a GPU
sleep so that the host's launching is not timed (see :func:`time_ms`). Writes
``DIR/conv_layers.json`` and ``DIR/conv_layers.md`` after every layer (a run that is stopped
keeps what it measured) and prints the Markdown table at the end. ``--time-budget`` stops
starting new layers after that many seconds (the rest are listed as not run).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# One layer against eager PyTorch in the same dtype, whose output is rounded too: twice the
# per-op bounds against float64 of tests/test_triton_conv.py (fp16 2e-3, bf16 8e-3: the
# output's rounding), not DESIGN.md's end-to-end 2e-2, which would pass a 1% error in every
# element; fp32 (TF32 on both sides, cuDNN's default): DESIGN.md's TF32 bound.
TOL = {torch.bfloat16: 1.6e-2, torch.float16: 4e-3, torch.float32: 2e-3}


@dataclass(frozen=True)
class Layer:
    """One distinct convolution of the model (batch left out)."""

    name: str  # first module name with this shape
    count: int  # how many modules share it
    c: int
    h: int
    w: int
    k: int
    r: int
    s: int
    stride: int
    pad: int
    dil: int
    groups: int
    residual: bool
    relu: bool

    def shape_str(self) -> str:
        g = f" g{self.groups}" if self.groups > 1 else ""
        d = f" d{self.dil}" if self.dil > 1 else ""
        extra = (" +res" if self.residual else "") + ("" if self.relu else " norelu")
        return (f"{self.c}x{self.h}x{self.w} -> {self.k} {self.r}x{self.s}/{self.stride}"
                f"{d}{g}{extra}")

    def out_hw(self) -> tuple[int, int]:
        p = (self.h + 2 * self.pad - self.dil * (self.r - 1) - 1) // self.stride + 1
        q = (self.w + 2 * self.pad - self.dil * (self.s - 1) - 1) // self.stride + 1
        return p, q

    def flops(self, batch: int) -> int:
        p, q = self.out_hw()
        return 2 * batch * p * q * self.k * (self.c // self.groups) * self.r * self.s

    def min_bytes(self, batch: int, elem: int, residual: bool) -> int:
        """The least memory traffic of the layer: the input (the pixels a 1x1 kernel
        samples, every pixel for a larger one), the weight and the output each moved once
        (``elem`` bytes per value), plus the residual when ``residual`` and the layer has one
        (the fused kernel reads it; cuDNN's convolution alone does not); the fp32 bias is
        negligible and left out."""
        p, q = self.out_hw()
        out = batch * self.k * p * q
        weight = self.k * (self.c // self.groups) * self.r * self.s
        pixels = p * q if self.r == self.s == 1 else self.h * self.w
        reads = batch * self.c * pixels + weight + (out if residual and self.residual else 0)
        return (reads + out) * elem


def model_conv_layers(arch: str = "resnet50", size: int = 224) -> list[Layer]:
    """Distinct convolutions of ``fastres.<arch>()`` in execution order, with the epilogue the
    inference plan gives them (the last conv of a block carries the residual and the ReLU,
    the downsample conv has no ReLU)."""
    import fastres

    model = getattr(fastres, arch)().to("meta").train()
    seen: dict[tuple, list] = {}
    hooks = []

    def hook(name, mod):
        def fn(_m, inputs, _out):
            x = inputs[0]
            block_last = name.endswith("conv3") or (
                name.endswith("conv2") and not hasattr(_parent(model, name), "conv3"))
            residual = name.startswith("layer") and block_last
            relu = not name.endswith("downsample.0")
            key = (x.shape[1], x.shape[2], x.shape[3], mod.out_channels, *mod.kernel_size,
                   mod.stride[0], mod.padding[0], mod.dilation[0], mod.groups, residual, relu)
            if key in seen:
                seen[key][1] += 1
            else:
                seen[key] = [name, 1]
        return fn

    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Conv2d):
            hooks.append(mod.register_forward_hook(hook(name, mod)))
    with torch.no_grad():
        model(torch.empty(1, 3, size, size, device="meta"))
    for h in hooks:
        h.remove()
    return [Layer(name, count, *key) for key, (name, count) in seen.items()]


def _parent(model, name: str):
    mod = model
    for part in name.split(".")[:-1]:
        mod = getattr(mod, part)
    return mod


def make_inputs(layer: Layer, batch: int, dtype: torch.dtype, device="cuda"):
    """(x, weight, bias, residual) for one layer: channels-last, weights scaled like a folded
    conv (unit-variance outputs), fp32 bias."""
    cl = torch.channels_last
    x = torch.randn(batch, layer.c, layer.h, layer.w, device=device).to(dtype)
    x = x.contiguous(memory_format=cl)
    fan_in = layer.c // layer.groups * layer.r * layer.s
    w = (torch.randn(layer.k, layer.c // layer.groups, layer.r, layer.s, device=device)
         * fan_in ** -0.5).to(dtype).contiguous(memory_format=cl)
    b = torch.randn(layer.k, device=device) * 0.1
    res = None
    if layer.residual:
        p, q = layer.out_hw()
        res = torch.randn(batch, layer.k, p, q, device=device).to(dtype).contiguous(
            memory_format=cl)
    return x, w, b, res


def fastres_fn(layer: Layer, x, w, b, res):
    from fastres.kernels.conv import conv_bias_act_triton

    st, pad, dil = (layer.stride,) * 2, (layer.pad,) * 2, (layer.dil,) * 2
    return lambda: conv_bias_act_triton(x, w, b, st, pad, dil, layer.groups, res, layer.relu)


def fastres_checked_output(layer: Layer, x, w, b, res) -> torch.Tensor:
    """The kernel's output from one launch of its chosen configuration into a NaN-filled
    buffer, after the first (tuning) call: while tuning, every candidate writes the same
    output, so a configuration that leaves part of it unwritten would still show earlier
    candidates' correct values there."""
    from fastres.kernels.conv import conv_bias_act_triton

    first = fastres_fn(layer, x, w, b, res)()  # autotunes
    poisoned = torch.full_like(first, float("nan"))
    st, pad, dil = (layer.stride,) * 2, (layer.pad,) * 2, (layer.dil,) * 2
    return conv_bias_act_triton(x, w, b, st, pad, dil, layer.groups, res, layer.relu,
                                out=poisoned)


def cudnn_conv_fn(layer: Layer, x, w, b, res):
    return lambda: F.conv2d(x, w, None, layer.stride, layer.pad, layer.dil, layer.groups)


def cudnn_fused_fn(layer: Layer, x, w, b, res):
    """What eager PyTorch runs for conv + bias (+ residual) (+ ReLU)."""
    bias = b.to(x.dtype)

    def run():
        y = F.conv2d(x, w, bias, layer.stride, layer.pad, layer.dil, layer.groups)
        if res is not None:
            y.add_(res)
        if layer.relu:
            y.relu_()
        return y
    return run


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """The larger of the norm-wise relative error of ``a`` against ``b`` and the worst
    element's error relative to ``b``'s largest magnitude (the tuner's measure: a kernel
    that writes a few wrong elements, say at a tile edge, can pass a norm-wise bound);
    ``inf`` for a NaN."""
    from fastres.tuning import _rel_err

    return _rel_err(a, b)


def time_ms(fn) -> float:
    """Median milliseconds of ``fn``'s GPU time after warm-up: the tuner's own timer
    (:func:`fastres.tuning.cuda_event_timer`), whose timed calls wait behind a GPU sleep, so
    a layer whose kernels are shorter than their launching is timed by its kernels, for
    fastres and cuDNN alike (the host's cost per call is ``fastres bench``'s "host ms")."""
    from fastres.tuning import cuda_event_timer

    return cuda_event_timer(fn)


def device_roofs(dtype: torch.dtype) -> dict:
    """What this GPU sustains, measured now: device-to-device copy bandwidth (GB/s, bytes
    read + written, a 1 GiB copy) and dense matmul throughput in ``dtype`` (TFLOP/s, an
    8192-cube ``torch.mm``: cuBLAS), both by :func:`time_ms`. The per-layer floors are
    computed from these, not from datasheet peaks."""
    n = 1 << 29  # 1 GiB of 16-bit values
    src = torch.empty(n, dtype=torch.float16, device="cuda").normal_()
    dst = torch.empty_like(src)
    copy_ms = time_ms(lambda: dst.copy_(src))
    a = torch.randn(8192, 8192, device="cuda").to(dtype)
    b = torch.randn(8192, 8192, device="cuda").to(dtype)
    mm_ms = time_ms(lambda: torch.mm(a, b))
    return {"copy_gbps": 2 * n * 2 / copy_ms / 1e6, "matmul_tflops": 2 * 8192**3 / mm_ms / 1e9}


def floors(layer: Layer, batch: int, elem: int, roofs: dict) -> dict:
    """The least time each path could take at the measured roofs: the larger of its memory
    time (:meth:`Layer.min_bytes` at the copy bandwidth) and its math time (at the matmul
    throughput), for fastres's fused kernel (which reads the residual) and for cuDNN's
    convolution alone (which does not)."""
    math_ms = layer.flops(batch) / roofs["matmul_tflops"] / 1e9
    out = {}
    for name, res in (("fastres", True), ("cudnn_conv", False)):
        mem_ms = layer.min_bytes(batch, elem, res) / roofs["copy_gbps"] / 1e6
        out[f"{name}_floor_ms"] = max(mem_ms, math_ms)
        out[f"{name}_bound"] = "memory" if mem_ms >= math_ms else "math"
    return out


def bench_layer(layer: Layer, batch: int, dtype: torch.dtype,
                roofs: dict | None = None) -> dict:
    """Check, then time, one layer; returns one result row (with the roofline floors when
    ``roofs``, :func:`device_roofs`, is given)."""
    from fastres.kernels.conv import ConvProblem, tuned_config, tuning_timings

    x, w, b, res = make_inputs(layer, batch, dtype)
    ours, conv, fused = (f(layer, x, w, b, res) for f in (fastres_fn, cudnn_conv_fn,
                                                          cudnn_fused_fn))
    row = {"layer": layer.name, "count": layer.count, "shape": layer.shape_str(),
           "batch": batch, "dtype": str(dtype).split(".")[-1]}
    t0 = time.time()
    out = fastres_checked_output(layer, x, w, b, res)  # autotunes, then one checked launch
    torch.cuda.synchronize()
    row["tune_s"] = round(time.time() - t0, 2)
    st, pad, dil = (layer.stride,) * 2, (layer.pad,) * 2, (layer.dil,) * 2
    prob = ConvProblem.from_tensors(x, w, st, pad, dil, layer.groups, res, layer.relu)
    cfg = tuned_config(prob)
    row["schedule"] = prob.kind
    # (none recorded: a single candidate, or FASTRES_TUNE=0 / deterministic mode's first one)
    row["config"] = str(cfg) if cfg is not None else "(not tuned)"
    # every candidate the tuner timed ({label: ms, or why it did not run}): which rows of the
    # configuration table win where
    row["candidates"] = tuning_timings(prob)
    err = rel_err(out, fused())
    row["rel_err"] = err
    if not err <= TOL[dtype]:
        row["status"] = f"FAILED (relative error {err:.2e} vs eager)"
        return row
    row["fastres_ms"] = time_ms(ours)
    row["cudnn_conv_ms"] = time_ms(conv)
    row["cudnn_fused_ms"] = time_ms(fused)
    fl = layer.flops(batch)
    row["fastres_tflops"] = fl / row["fastres_ms"] / 1e9
    row["cudnn_conv_tflops"] = fl / row["cudnn_conv_ms"] / 1e9
    row["speedup_vs_cudnn_fused"] = row["cudnn_fused_ms"] / row["fastres_ms"]
    row["speedup_vs_cudnn_conv"] = row["cudnn_conv_ms"] / row["fastres_ms"]
    if roofs:
        row.update(floors(layer, batch, x.element_size(), roofs))
    row["status"] = "ok"
    return row


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"# fastres conv layers vs cuDNN — {meta['arch']}",
             "",
             (f"{meta['gpu']}, driver {meta.get('driver')}; torch {meta['torch']}, triton "
              f"{meta['triton']}, cuDNN {meta['cudnn']}, fastres "
              f"{meta.get('fastres_commit') or meta.get('fastres', '')}; {meta['date']}. "
              "Times: median ms (CUDA events). "
              "speedup = cuDNN time / fastres time (> 1: fastres faster). cuDNN fused = "
              "conv2d(+bias) then add_(residual), relu_() as eager runs it."),
             "",
             ("| layer (xN) | shape | batch | dtype | schedule | fastres ms | TFLOP/s | "
              "cuDNN conv ms | cuDNN TFLOP/s | cuDNN conv+bias+(res)+ReLU ms | vs fused | "
              "vs conv | config | status |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("status") == "ok":
            lines.append(
                f"| {r['layer']} (x{r['count']}) | {r['shape']} | {r['batch']} | {r['dtype']} "
                f"| {r['schedule']} | {r['fastres_ms']:.4f} | {r['fastres_tflops']:.1f} | "
                f"{r['cudnn_conv_ms']:.4f} | {r['cudnn_conv_tflops']:.1f} | "
                f"{r['cudnn_fused_ms']:.4f} | "
                f"{r['speedup_vs_cudnn_fused']:.2f}x | {r['speedup_vs_cudnn_conv']:.2f}x | "
                f"{r['config']} | ok |")
        else:
            lines.append(f"| {r['layer']} (x{r['count']}) | {r['shape']} | {r['batch']} | "
                         f"{r['dtype']} | {r.get('schedule', '-')} | - | - | - | - | - | - | "
                         f"- | {r.get('config', '-')} | {r.get('status')} |")
    ok = [r for r in rows if r.get("status") == "ok"]
    if ok:
        for dt in sorted({r["dtype"] for r in ok}):
            for bs in sorted({r["batch"] for r in ok}):
                sel = [r for r in ok if r["dtype"] == dt and r["batch"] == bs]
                if not sel:
                    continue
                # model-weighted totals: each distinct layer counted as often as it occurs
                ours = sum(r["fastres_ms"] * r["count"] for r in sel)
                fused = sum(r["cudnn_fused_ms"] * r["count"] for r in sel)
                conv = sum(r["cudnn_conv_ms"] * r["count"] for r in sel)
                total = len({r["layer"] for r in rows})
                lines.append(f"\n**{dt}, batch {bs}** ({len(sel)} of {total} shapes measured, "
                             f"weighted by occurrence): fastres {ours:.3f} ms, cuDNN conv "
                             f"{conv:.3f} ms, cuDNN fused {fused:.3f} ms -> "
                             f"{fused / ours:.2f}x vs fused, {conv / ours:.2f}x vs conv alone")
    lines += roofline_lines(rows, meta)
    lines += candidate_lines(rows)
    if meta.get("interrupted"):
        lines.append("\nINTERRUPTED: partial results (layers not run are listed as such).")
    return "\n".join(lines) + "\n"


def roofline_lines(rows: list[dict], meta: dict) -> list[str]:
    """Each measured layer against the least time it could take at the roofs measured in the
    same run (:func:`floors`): how close fastres and cuDNN's convolution alone come to their
    own floor, and whether fastres's floor (it reads the residual too) is above cuDNN's
    measured time, so that no fused kernel could match cuDNN's convolution alone there."""
    timed = [r for r in rows if r.get("status") == "ok" and "fastres_floor_ms" in r]
    if not timed:
        return []
    roofs = ", ".join(f"{dt}: copy {v['copy_gbps']:.0f} GB/s, matmul "
                      f"{v['matmul_tflops']:.0f} TFLOP/s"
                      for dt, v in (meta.get("roofs") or {}).items() if v)
    out = ["", f"### Against the roofline ({roofs}; measured in this run)", "",
           "Floor: the larger of the least memory time (input, weight, output, and for "
           "fastres the residual, each moved once, at the copy bandwidth) and the math time "
           "(at the matmul throughput). \"of floor\" = floor / measured time (1.00: at the "
           "roofline). \"fused floor > cuDNN conv\": the fused kernel's floor is above "
           "cuDNN's measured convolution alone, which no fused kernel can then match.", "",
           "| layer | batch | dtype | bound | fastres floor ms | fastres ms | of floor | "
           "cuDNN conv floor ms | cuDNN conv ms | of floor | fused floor > cuDNN conv |",
           "|---|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in timed:
        f, c = r["fastres_floor_ms"], r["cudnn_conv_floor_ms"]
        out.append(f"| {r['layer']} | {r['batch']} | {r['dtype']} | {r['fastres_bound']} | "
                   f"{f:.4f} | {r['fastres_ms']:.4f} | {f / r['fastres_ms']:.2f} | {c:.4f} | "
                   f"{r['cudnn_conv_ms']:.4f} | {c / r['cudnn_conv_ms']:.2f} | "
                   f"{'yes' if f > r['cudnn_conv_ms'] else 'no'} |")
    return out


def candidate_lines(rows: list[dict]) -> list[str]:
    """The tuner's measurements: for each layer it timed, every candidate configuration's
    GPU time relative to the fastest (1.00 = the chosen one), fastest first; a candidate
    that was not timed (it did not run, or its result was wrong) shows why."""
    timed = [r for r in rows if r.get("candidates")]
    if not timed:
        return []
    out = ["", "### Tuner's candidates (time / fastest candidate's; fastest first)", "",
           "| layer | batch | dtype | fastest ms | candidates |", "|---|---|---|---:|---|"]
    for r in timed:
        ms = {k: v for k, v in r["candidates"].items() if isinstance(v, (int, float))}
        failed = [f"{k}: {v}" for k, v in r["candidates"].items() if k not in ms]
        best = min(ms.values()) if ms else None
        cells = [f"{k} {v / best:.2f}" for k, v in sorted(ms.items(), key=lambda kv: kv[1])]
        cells += [f"{f[:80]} (not timed)" for f in failed]
        out.append(f"| {r['layer']} | {r['batch']} | {r['dtype']} | "
                   f"{'-' if best is None else f'{best:.4f}'} | {'; '.join(cells)} |")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32, 256])
    ap.add_argument("--dtype", nargs="+", default=["bf16", "fp16"], choices=list(DTYPES))
    ap.add_argument("--arch", default="resnet50")
    ap.add_argument("--time-budget", type=float, default=None,
                    help="seconds; no new layer is started after this")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not torch.cuda.is_available():
        print("conv_layers.py: needs a CUDA GPU; nothing measured", file=sys.stderr)
        return 2
    import triton

    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = True
    layers = model_conv_layers(args.arch)
    from fastres.bench import _gpu_driver, _source_commit

    meta = {"arch": args.arch, "gpu": torch.cuda.get_device_name(), "driver": _gpu_driver(),
            "fastres_commit": _source_commit(), "torch": torch.__version__,
            "triton": triton.__version__, "cudnn": torch.backends.cudnn.version(),
            "python": platform.python_version(),
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "batches": args.batch, "dtypes": args.dtype, "layers": [asdict(x) for x in layers]}
    rows: list[dict] = []

    def write():
        (out / "conv_layers.json").write_text(json.dumps({"meta": meta, "rows": rows},
                                                         indent=1))
        (out / "conv_layers.md").write_text(markdown(rows, meta))

    def on_term(signum, frame):  # `timeout` sends SIGTERM: stop like Ctrl-C (below)
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    t_start = time.time()
    print(f"{len(layers)} distinct convolutions of {args.arch}; batches {args.batch}; "
          f"dtypes {args.dtype}", flush=True)
    try:
        run_all(args, layers, rows, write, t_start, meta)
    except KeyboardInterrupt:  # keep what was measured; the rest is listed as not run
        done = {(r["layer"], r["batch"], r["dtype"]) for r in rows}
        for dt_name in args.dtype:
            dt = str(DTYPES[dt_name]).split(".")[-1]
            for bs in args.batch:
                rows.extend({"layer": x.name, "count": x.count, "shape": x.shape_str(),
                             "batch": bs, "dtype": dt, "status": "not run (interrupted)"}
                            for x in layers if (x.name, bs, dt) not in done)
        meta["interrupted"] = True
        meta["total_s"] = round(time.time() - t_start, 1)
        write()
        print(markdown(rows, meta))
        return 130
    meta["total_s"] = round(time.time() - t_start, 1)
    write()
    print(markdown(rows, meta))
    bad = [r for r in rows if r.get("status", "").startswith(("FAILED", "ERROR"))]
    if not any(r.get("status") == "ok" for r in rows):
        print("conv_layers.py: no layer was measured", file=sys.stderr)
        return 1
    return 1 if bad else 0


def run_all(args, layers: list[Layer], rows: list[dict], write, t_start: float,
            meta: dict) -> None:
    """Every layer at every batch size and dtype, appended to ``rows`` (``write()`` after
    each)."""
    for dt_name in args.dtype:
        dt = str(DTYPES[dt_name]).split(".")[-1]
        roofs = None
        try:
            roofs = device_roofs(DTYPES[dt_name])
            print(f"{dt}: copy {roofs['copy_gbps']:.0f} GB/s, matmul "
                  f"{roofs['matmul_tflops']:.0f} TFLOP/s (the roofline floors)", flush=True)
        except Exception as exc:  # (out of memory, ...): the rows go without floors
            print(f"{dt}: roofs not measured ({type(exc).__name__}: {exc})", flush=True)
        meta.setdefault("roofs", {})[dt] = roofs
        torch.cuda.empty_cache()
        for bs in args.batch:
            for layer in layers:
                if args.time_budget is not None and time.time() - t_start > args.time_budget:
                    rows.append({"layer": layer.name, "count": layer.count,
                                 "shape": layer.shape_str(), "batch": bs, "dtype": dt,
                                 "status": "not run (time budget)"})
                    continue
                try:
                    row = bench_layer(layer, bs, DTYPES[dt_name], roofs)
                except Exception as exc:  # report and go on with the other layers
                    row = {"layer": layer.name, "count": layer.count,
                           "shape": layer.shape_str(), "batch": bs, "dtype": dt,
                           "status": f"ERROR {type(exc).__name__}: {str(exc)[:200]}"}
                rows.append(row)
                print(f"[{time.time() - t_start:6.1f}s] {dt} b{bs} {layer.name:22s} "
                      f"{row.get('status')} fastres {row.get('fastres_ms', float('nan')):.4f} "
                      f"ms, cuDNN fused {row.get('cudnn_fused_ms', float('nan')):.4f} ms",
                      flush=True)
                write()


if __name__ == "__main__":
    sys.exit(main())
