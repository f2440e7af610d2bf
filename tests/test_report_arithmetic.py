"""What the GPU check's report and the benchmark scripts compute from what they measured, on
synthetic inputs (no GPU): which row a speed comes from, which way a ratio points, which rows a
table keeps, and that a failure is never reported as a pass. The numbers here are made up to
check the arithmetic and the bookkeeping; none is a measurement. (Written from mutants of these
scripts that the other tests let through.)"""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import fresh_seed_args

from fastres import compile_report

REPO = Path(__file__).resolve().parents[1]


def _load(name: str, rel: str):
    spec = importlib.util.spec_from_file_location(name, REPO / rel)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def report():
    return _load("gpu_check_report_extra", "benchmarks/gpu_check_report.py")


def _row(model, dtype, batch, impl, status="ok", ms=None, ips=None, **extra):
    r = {"model": model, "dtype": dtype, "batch": batch, "impl": impl, "status": status,
         "median_ms": ms, "p90_ms": ms * 1.1 if ms else None, "host_ms": None,
         "images_per_s": ips, "peak_mib": None, "rel_err": 1e-3, "speedup": {}, "note": ""}
    r.update(extra)
    return r


def _bench_table(lines: list[str]) -> dict:
    """``(model, dtype, batch) -> cells`` of the summary's bench table."""
    out = {}
    for line in lines:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 20 and cells[2].isdigit():
            out[(cells[0], cells[1], int(cells[2]))] = cells
    return out


# -- gpu_check_report.py: bench ------------------------------------------------------------------


def test_report_best_column_is_the_fastest_row_that_passed(report, tmp_path):
    """"best ms / best x fp32" come from the faster of fastres / fastres_graphs among the rows
    that passed: never from a slower one, never from a row that FAILED its output check."""
    rows = [
        # group 1: graphs is faster and ok -> best = graphs
        _row("resnet50", "bf16", 1, "fastres", ms=4.0, ips=250.0,
             speedup={"eager_fp32": 1.5}),
        _row("resnet50", "bf16", 1, "fastres_graphs", ms=1.0, ips=1000.0,
             speedup={"eager_fp32": 6.0}),
        # group 2: graphs carries a (bogus) rate but FAILED -> best = fastres
        _row("resnet50", "bf16", 32, "fastres", ms=10.0, ips=3200.0,
             speedup={"eager_fp32": 2.5}),
        _row("resnet50", "bf16", 32, "fastres_graphs", status="FAILED", ms=1.0, ips=32000.0,
             speedup={"eager_fp32": 25.0}),
    ]
    d = tmp_path / "details"
    (d / "bench").mkdir(parents=True)
    (d / "bench" / "bench.json").write_text(json.dumps(
        {"ok": False, "interrupted": True, "rows": rows, "env": {}}))
    lines = report.bench(str(d))
    text = "\n".join(lines)
    t = _bench_table(lines)
    g1, g2 = t[("resnet50", "bf16", 1)], t[("resnet50", "bf16", 32)]
    # columns: 12 = best ms (p90), 14 = best x fp32
    assert g1[12].startswith("1.00 ") and g1[14] == "6.00", g1
    assert g2[12].startswith("10.00 ") and g2[14] == "2.50", g2
    assert g2[4] == "FAILED", g2  # the failed row's rate is not shown as a rate
    assert "32000" not in text and "25.00" not in text
    # the run as a whole: outputs disagreed, and it was cut off
    assert "DISAGREE" in text and "agree" not in text.replace("DISAGREE", "")
    assert "INTERRUPTED (partial)" in text


def test_report_bench_status_is_fastres_own(report, tmp_path):
    """The status column is the fastres row's: a FAILED fastres with an ok graphs row must
    read FAILED."""
    rows = [_row("resnet18", "fp16", 1, "fastres", status="FAILED", note="rel err 0.3"),
            _row("resnet18", "fp16", 1, "fastres_graphs", ms=1.0, ips=1000.0)]
    d = tmp_path / "details"
    (d / "bench").mkdir(parents=True)
    (d / "bench" / "bench.json").write_text(json.dumps({"ok": False, "rows": rows}))
    cells = _bench_table(report.bench(str(d)))[("resnet18", "fp16", 1)]
    assert cells[19].startswith("FAILED"), cells


# -- gpu_check_report.py: stages, tests, latency, conv layers -------------------------------------


def test_report_keeps_every_stage_row(report, tmp_path):
    d = tmp_path
    names = ["env", "build", "tests", "fastres_bench"]
    statuses = ["FAILED (exit 1)", "ok", "TIMEOUT after 200s", "ok"]
    (d / "stages.tsv").write_text("stage\tstatus\tseconds\tlog\n" + "".join(
        f"{n}\t{s}\t{i}\tdetails/{n}.log\n" for i, (n, s) in enumerate(zip(names, statuses))))
    text = "\n".join(report.stages(str(d)))
    for i, (n, s) in enumerate(zip(names, statuses)):
        assert f"| {n} | {s} | {i} | details/{n}.log |" in text, text
    assert "| stage | status | seconds | log |" in text and "| stage | status | 0" not in text


def test_report_lists_test_errors_and_closest_margins(report, tmp_path):
    d = tmp_path
    (d / "tests.xml").write_text(
        '<testsuites><testsuite tests="3" failures="1" errors="1" skipped="0" time="3">'
        '<testcase classname="t.m" name="test_fail"><failure message="assert 1 == 2"/>'
        '</testcase><testcase classname="t.m" name="test_err"><error message="fixture boom"/>'
        '</testcase><testcase classname="t.m" name="test_ok"/></testsuite></testsuites>')
    (d / "test_margins.tsv").write_text(
        "0.10\t1e-4\t1e-3\tt.py::far\tout\n0.95\t9.5e-4\t1e-3\tt.py::near\tout\n"
        "0.50\t5e-4\t1e-3\tt.py::mid\tout\n1.50\t1.5e-3\t1e-3\tt.py::over\tout\n")
    out = report.tests(str(d))
    text = "\n".join(out)
    assert "tests: 3 run, 1 failed, 1 errors, 0 skipped" in text
    assert "- t.m::test_fail: assert 1 == 2" in text
    assert "- t.m::test_err: fixture boom" in text  # an error is listed like a failure
    assert "accuracy checks: 4, 1 over their bound" in text
    listed = [line for line in out if line.startswith("- 0.")]
    assert [line.split()[1] for line in listed] == ["0.95", "0.50", "0.10"], listed


def test_report_latency_columns(report, tmp_path):
    """Each latency column holds its own figure (distinct made-up values per column)."""
    (tmp_path / "latency").mkdir()
    rows = [{"dtype": "bf16", "impl": "fastres_graphs", "status": "ok", "median_ms": 1.5,
             "p10_ms": 1.25, "p90_ms": 2.75, "speedup_vs_eager": 3.0,
             "speedup_vs_best_eager": 1.75,
             "speedup_vs_compile_reduce_overhead": 0.8, "rel_err": 2e-3}]
    (tmp_path / "latency" / "bench_latency.json").write_text(json.dumps(
        {"args": {"model": "resnet50"}, "rows": rows}))
    text = "\n".join(report.latency(str(tmp_path)))
    assert ("| bf16 | fastres_graphs | 1.500 | 1.250 | 2.750 | 3.00 | 1.75 | 0.80 | 2.0e-03 "
            "| ok |") in text, text
    # an output that was NaN: its error reads nan, not "-" (as no check at all would)
    rows[0].update(status="FAILED", rel_err=float("nan"), median_ms=None, p10_ms=None,
                   p90_ms=None, speedup_vs_eager=None, speedup_vs_best_eager=None,
                   speedup_vs_compile_reduce_overhead=None)
    (tmp_path / "latency" / "bench_latency.json").write_text(json.dumps(
        {"args": {"model": "resnet50"}, "rows": rows}))
    text = "\n".join(report.latency(str(tmp_path)))
    assert "| bf16 | fastres_graphs | - | - | - | - | - | - | nan | FAILED |" in text, text


def test_report_conv_layers_counts_errors_and_weights_by_count(report, tmp_path):
    (tmp_path / "kernels").mkdir()
    ok = dict(status="ok", dtype="bfloat16", batch=32, fastres_tflops=100.0)
    rows = [dict(ok, layer="a", count=1, fastres_ms=1.0, cudnn_conv_ms=1.0, cudnn_fused_ms=2.0),
            dict(ok, layer="b", count=3, fastres_ms=2.0, cudnn_conv_ms=3.0, cudnn_fused_ms=4.0),
            {"layer": "c", "count": 1, "dtype": "bfloat16", "batch": 32,
             "status": "ERROR RuntimeError: launch failed"},
            {"layer": "d", "count": 1, "dtype": "bfloat16", "batch": 32,
             "status": "FAILED (relative error 5e-2 vs eager)"}]
    (tmp_path / "kernels" / "conv_layers.json").write_text(json.dumps(
        {"meta": {"arch": "resnet50"}, "rows": rows}))
    text = "\n".join(report.conv_layers(str(tmp_path)))
    # ours = 1*1 + 2*3 = 7, conv = 1 + 9 = 10, fused = 2 + 12 = 14; TFLOP/s weighted = 100
    assert "| bfloat16 | 32 | 2 of 4 | 7.000 | 100 | 10.000 | 14.000 | 2.00 | 1.43 | 2 (" \
        in text, text


# -- bench_latency.py ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def latency_mod():
    return _load("bench_latency_extra", "benchmarks/bench_latency.py")


def test_latency_speedups_point_the_right_way_per_dtype(latency_mod):
    rows = [{"dtype": "bf16", "impl": "eager", "status": "ok", "median_ms": 4.0},
            {"dtype": "bf16", "impl": "compile_reduce_overhead", "status": "ok",
             "median_ms": 1.0},
            {"dtype": "bf16", "impl": "fastres", "status": "ok", "median_ms": 2.0},
            {"dtype": "bf16", "impl": "fastres_graphs", "status": "FAILED"},
            {"dtype": "bf16", "impl": "eager_fp32", "status": "ok", "median_ms": 3.0},
            {"dtype": "bf16", "impl": "eager_cl", "status": "ok", "median_ms": 2.5},
            {"dtype": "fp32", "impl": "eager", "status": "ok", "median_ms": 10.0},
            {"dtype": "fp32", "impl": "fastres", "status": "ok", "median_ms": 5.0}]
    latency_mod.add_speedups(rows)
    by = {(r["dtype"], r["impl"]): r for r in rows}
    assert by[("bf16", "fastres")]["speedup_vs_eager"] == pytest.approx(2.0)
    assert by[("bf16", "fastres")]["speedup_vs_compile_reduce_overhead"] == pytest.approx(0.5)
    # against the fastest eager row of the table (bf16 channels-last, no autocast casts)
    assert by[("bf16", "fastres")]["speedup_vs_best_eager"] == pytest.approx(1.25)
    assert by[("fp32", "fastres")]["speedup_vs_eager"] == pytest.approx(2.0)
    assert by[("fp32", "fastres")]["speedup_vs_best_eager"] == pytest.approx(2.0)
    assert "speedup_vs_compile_reduce_overhead" not in by[("fp32", "fastres")]
    assert "speedup_vs_eager" not in by[("bf16", "fastres_graphs")]


def test_latency_compile_speedup_is_against_the_faster_reduce_overhead_row(latency_mod):
    """With freezing timed too, "vs best compile (r-o)" is against the faster of the two
    reduce-overhead rows; a row that failed is not a baseline."""
    fast, slow = (torch.rand(1).item() * 0.9 + 0.05, torch.rand(1).item() + 1.05)
    for frz_ms, frz_status, want in ((fast, "ok", fast), (slow, "ok", 1.0),
                                     (fast, "ERROR", 1.0)):
        rows = [{"dtype": "bf16", "impl": "compile_reduce_overhead", "status": "ok",
                 "median_ms": 1.0},
                {"dtype": "bf16", "impl": "compile_reduce_overhead_freezing",
                 "status": frz_status, "median_ms": frz_ms},
                {"dtype": "bf16", "impl": "fastres_graphs", "status": "ok", "median_ms": 0.7}]
        latency_mod.add_speedups(rows)
        assert rows[2]["speedup_vs_compile_reduce_overhead"] == pytest.approx(want / 0.7)


def test_latency_time_ms_reports_the_median(latency_mod):
    """One slow call among fast ones moves p90, not the median."""
    delays = iter([0.0, 0.0, 0.0, 0.0, 0.3])

    def fn(x):
        time.sleep(next(delays))

    t = latency_mod.time_ms(fn, torch.zeros(1), iters=5, warmup=0)
    # (p90 interpolated between the 4th and 5th of 5 calls: 0.6 of the way to the slow one)
    assert t["median_ms"] < 20 and t["p10_ms"] < 20 and t["p90_ms"] >= 150, t
    assert t["p90_ms"] == pytest.approx(
        statistics.quantiles(t["times"], n=10, method="inclusive")[8]), t


def test_latency_percentiles_are_fastres_bench_s(latency_mod):
    """bench_latency's median, p10 and p90 are interpolated as ``fastres bench``'s p90 is
    (numpy's default; ``statistics``' inclusive method is the same): they were nearest rank,
    so the two tables' p90 of one set of times could differ."""
    for n in (1, 2, 7, 10, 31):
        times = (torch.rand(n, dtype=torch.float64) * 5).tolist()
        got = latency_mod._percentiles(sorted(times))
        deciles = statistics.quantiles(times, n=10, method="inclusive") if n > 1 else times * 9
        want = {"median_ms": statistics.median(times), "p10_ms": deciles[0],
                "p90_ms": deciles[8]}
        for k, v in want.items():
            assert got[k] == pytest.approx(v, rel=1e-12, abs=1e-12), (n, k, got, want)


def test_latency_rounds_are_pooled(latency_mod):
    """A row timed in rounds: median / p10 / p90 over every call of every round, and each
    round's own median kept (how much the row's figure moved between rounds)."""
    rounds = []
    for _ in range(int(torch.randint(2, 5, ()))):
        times = sorted((torch.rand(int(torch.randint(3, 9, ()))) * 10 + 0.5).tolist())
        rounds.append({"times": times, "median_ms": times[len(times) // 2]})
    row = {}
    latency_mod.merge_rounds(row, rounds)
    pooled = sorted(t for r in rounds for t in r["times"])
    deciles = statistics.quantiles(pooled, n=10, method="inclusive")  # (numpy's default)
    assert row["iters"] == len(pooled)
    assert row["median_ms"] == pytest.approx(statistics.median(pooled))
    assert row["p10_ms"] == pytest.approx(deciles[0])
    assert row["p90_ms"] == pytest.approx(deciles[8])
    assert row["round_medians"] == [r["median_ms"] for r in rounds]
    assert "times" not in row  # (not written into the JSON)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU smoke run of the script")
def test_latency_graphs_row_with_wrong_output_is_failed_not_timed(latency_mod, tmp_path,
                                                                  monkeypatch):
    """fastres_graphs returning NaN: its row is FAILED, has no time and no speedup, and the exit
    status is 1 (a NaN error must not pass the tolerance check)."""
    def nan_graphs(model, cuda_graphs=True):
        return lambda x: torch.full_like(model(x), float("nan"))

    monkeypatch.setattr(latency_mod.fastres, "optimize", nan_graphs)
    rc = latency_mod.main(["--smoke", "--out", str(tmp_path), "--dtypes", "fp32", "--iters",
                           "2", "--warmup", "0", "--image-size", "32", "--model", "resnet18"])
    rows = {r["impl"]: r for r in
            json.loads((tmp_path / "bench_latency.json").read_text())["rows"]}
    g = rows["fastres_graphs"]
    assert g["status"] == "FAILED" and "median_ms" not in g and "speedup_vs_eager" not in g, g
    assert rows["fastres"]["status"] == "ok"
    assert rc == 1
    md = (tmp_path / "bench_latency.md").read_text()
    assert "| fp32 | fastres_graphs | - | - | - | - | - | - | - | nan | FAILED |" in md, md


# -- conv_layers.py -----------------------------------------------------------------------------


@pytest.fixture
def conv_mod(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import conv_layers

    real_inputs = conv_layers.make_inputs
    monkeypatch.setattr(conv_layers, "make_inputs",
                        lambda layer, batch, dtype, device="cuda":
                        real_inputs(layer, batch, dtype, device="cpu"))
    monkeypatch.setattr(conv_layers.torch.cuda, "synchronize", lambda *a, **k: None)
    return conv_layers


def _small_layer(conv_layers):
    return conv_layers.Layer("t", 2, c=8, h=5, w=6, k=16, r=3, s=3, stride=1, pad=1, dil=1,
                             groups=1, residual=True, relu=True)


def test_conv_layers_row_arithmetic(conv_mod, monkeypatch):
    """Speedups are cuDNN / fastres (> 1: fastres faster); TFLOP/s = FLOPs / (ms * 1e9)."""
    times = iter([2.0, 3.0, 8.0])  # fastres, cuDNN conv, cuDNN fused (the order timed)
    monkeypatch.setattr(conv_mod, "time_ms", lambda fn, *a, **k: next(times))
    layer = _small_layer(conv_mod)
    row = conv_mod.bench_layer(layer, 2, torch.float32)
    assert row["status"] == "ok", row
    assert row["fastres_ms"] == 2.0 and row["cudnn_conv_ms"] == 3.0
    assert row["speedup_vs_cudnn_fused"] == pytest.approx(4.0)
    assert row["speedup_vs_cudnn_conv"] == pytest.approx(1.5)
    assert row["fastres_tflops"] == pytest.approx(layer.flops(2) / 2.0e-3 / 1e12)
    assert row["cudnn_conv_tflops"] == pytest.approx(layer.flops(2) / 3.0e-3 / 1e12)


def test_conv_layers_roofline_floors(conv_mod, monkeypatch):
    """Least bytes: input, weight and output once, the residual only for the fused kernel;
    a floor is the larger of bytes / bandwidth and FLOPs / throughput; the report says where
    the fused kernel's floor is above cuDNN's measured convolution alone."""
    layer = _small_layer(conv_mod)  # 8x5x6 -> 16 3x3/1 pad 1, with a residual
    x, w, out = 2 * 8 * 5 * 6, 16 * 8 * 3 * 3, 2 * 16 * 5 * 6
    assert layer.min_bytes(2, 2, False) == (x + w + out) * 2
    assert layer.min_bytes(2, 2, True) == (x + w + 2 * out) * 2
    plain = conv_mod.Layer("u", 1, c=8, h=5, w=6, k=16, r=3, s=3, stride=1, pad=1, dil=1,
                           groups=1, residual=False, relu=True)
    assert plain.min_bytes(2, 2, True) == plain.min_bytes(2, 2, False)
    # a strided 1x1 reads only the pixels it samples (8x8 -> 4x4)
    down = conv_mod.Layer("d", 1, c=8, h=8, w=8, k=16, r=1, s=1, stride=2, pad=0, dil=1,
                          groups=1, residual=False, relu=False)
    assert down.min_bytes(1, 2, False) == (8 * 4 * 4 + 16 * 8 + 16 * 4 * 4) * 2
    # 1 GB/s: bytes / 1e6 ms; 1 TFLOP/s: flops / 1e9 ms (memory-bound here)
    roofs = {"copy_gbps": 1.0, "matmul_tflops": 1.0}
    f = conv_mod.floors(layer, 2, 2, roofs)
    assert f["fastres_floor_ms"] == pytest.approx(layer.min_bytes(2, 2, True) / 1e6)
    assert f["cudnn_conv_floor_ms"] == pytest.approx(layer.min_bytes(2, 2, False) / 1e6)
    assert f["fastres_bound"] == f["cudnn_conv_bound"] == "memory"
    f = conv_mod.floors(layer, 2, 2, {"copy_gbps": 1e9, "matmul_tflops": 1e-6})
    assert f["fastres_floor_ms"] == pytest.approx(layer.flops(2) / 1e3)
    assert f["fastres_bound"] == "math"
    times = iter([2.0, 3.0, 8.0])
    monkeypatch.setattr(conv_mod, "time_ms", lambda fn, *a, **k: next(times))
    row = conv_mod.bench_layer(layer, 2, torch.float32, {"copy_gbps": 1e-6,
                                                         "matmul_tflops": 1e9})
    assert row["fastres_floor_ms"] == pytest.approx(layer.min_bytes(2, 4, True))
    lines = conv_mod.roofline_lines([row], {"roofs": {"float32": {"copy_gbps": 1e-6,
                                                                  "matmul_tflops": 1e9}}})
    cells = [c.strip() for c in lines[-1].split("|")[1:-1]]
    assert cells[3] == "memory" and cells[-1] == "yes"  # its floor far above cuDNN's 3 ms
    assert float(cells[6]) == pytest.approx(row["fastres_floor_ms"] / 2.0, rel=1e-2)
    assert conv_mod.roofline_lines([dict(row, status="FAILED")], {}) == []


def test_conv_layers_nan_output_is_failed_not_timed(conv_mod, monkeypatch):
    timed = []
    monkeypatch.setattr(conv_mod, "time_ms", lambda fn, *a, **k: timed.append(fn) or 1.0)
    monkeypatch.setattr(conv_mod, "fastres_checked_output",
                        lambda layer, x, w, b, res: torch.full(
                            (x.shape[0], layer.k, *layer.out_hw()), float("nan")))
    row = conv_mod.bench_layer(_small_layer(conv_mod), 2, torch.float32)
    assert row["status"].startswith("FAILED"), row
    assert "fastres_ms" not in row and timed == []


def test_conv_layers_markdown_totals(conv_mod):
    rows = [{"layer": "a", "count": 1, "shape": "s", "batch": 1, "dtype": "bfloat16",
             "schedule": "gemm", "config": "c", "status": "ok", "fastres_ms": 1.0,
             "cudnn_conv_ms": 1.5, "cudnn_fused_ms": 3.0, "fastres_tflops": 1.0,
             "cudnn_conv_tflops": 1.0, "speedup_vs_cudnn_fused": 3.0,
             "speedup_vs_cudnn_conv": 1.5},
            {"layer": "b", "count": 3, "shape": "s", "batch": 1, "dtype": "bfloat16",
             "schedule": "gemm", "config": "c", "status": "ok", "fastres_ms": 1.0,
             "cudnn_conv_ms": 0.5, "cudnn_fused_ms": 1.0, "fastres_tflops": 1.0,
             "cudnn_conv_tflops": 1.0, "speedup_vs_cudnn_fused": 1.0,
             "speedup_vs_cudnn_conv": 0.5}]
    md = conv_mod.markdown(rows, {"arch": "resnet50", "gpu": "g", "torch": "t", "triton": "t",
                                  "cudnn": 1, "date": "d"})
    # ours 1 + 3 = 4, conv 1.5 + 1.5 = 3, fused 3 + 3 = 6
    assert ("fastres 4.000 ms, cuDNN conv 3.000 ms, cuDNN fused 6.000 ms -> 1.50x vs fused, "
            "0.75x vs conv alone") in md, md


# -- tf32_emulation.py / bn_fold_precision.py ---------------------------------------------------


def test_round_tf32_ties_to_even():
    mod = _load("tf32_emulation_extra", "benchmarks/tf32_emulation.py")
    bits = torch.tensor([0x3F800000 | 0x1000,  # a tie, even kept bits -> down
                         0x3F802000 | 0x1000,  # a tie, odd kept bits -> up
                         0x3F800FFF,           # below half -> down
                         0x3F801001,           # above half -> up
                         -0x40800000 | 0x1000],  # negative (-1.0 + tie): magnitude down
                        dtype=torch.int32)
    got = mod.round_tf32(bits.view(torch.float32)).view(torch.int32).tolist()
    assert got == [0x3F800000, 0x3F804000, 0x3F800000, 0x3F802000, -0x40800000], \
        [hex(v & 0xFFFFFFFF) for v in got]
    trunc = mod.truncate_tf32(bits.view(torch.float32)).view(torch.int32).tolist()
    assert trunc == [0x3F800000, 0x3F802000, 0x3F800000, 0x3F800000, -0x40800000]


def test_bn_fold_precision_mean_row_is_the_column_means():
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRITON_INTERPRET", "FASTRES_BACKEND")}
    res = subprocess.run([sys.executable, "benchmarks/bn_fold_precision.py", "--dtype", "bf16",
                          *fresh_seed_args()], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    table = [line for line in res.stdout.splitlines() if line.startswith("| ")
             and not line.startswith("| layer")]
    body = [[float(v) for v in line.strip("|").split("|")[1:]] for line in table[:-1]]
    mean = [float(v) for v in table[-1].strip("|").split("|")[1:]]
    assert table[-1].startswith("| mean |") and len(body) > 5
    for i in range(3):
        assert mean[i] == pytest.approx(sum(r[i] for r in body) / len(body), rel=2e-3)


# -- fastres tune / fastres._env ----------------------------------------------------------------


def test_environ_puts_back_absence_and_value():
    from fastres._env import environ

    name = f"FASTRES_EXTRA_TEST_{os.getpid()}"
    os.environ.pop(name, None)
    with environ(name, "x"):
        assert os.environ[name] == "x"
    assert name not in os.environ
    with pytest.raises(RuntimeError):
        with environ(name, "y"):
            raise RuntimeError
    assert name not in os.environ
    os.environ[name] = "old"
    try:
        with environ(name, "new"):
            assert os.environ[name] == "new"
        assert os.environ[name] == "old"
        with environ(name, None):
            assert os.environ[name] == "old"
    finally:
        os.environ.pop(name, None)


def test_switched_off_reads_a_switch_as_the_other_switches_do(monkeypatch):
    """``FASTRES_TMA`` and ``FASTRES_DIRECT_LAUNCH`` take 0/false/off/no (any case) for off,
    as ``FASTRES_TUNE`` and ``FASTRES_DISABLE_EXTENSION`` do (``false`` left them on); any
    other value leaves the feature on, with a warning naming what the switch takes."""
    import warnings

    from fastres._env import switched_off

    name = f"FASTRES_SWITCH_TEST_{os.getpid()}"
    monkeypatch.delenv(name, raising=False)
    assert switched_off(name) is False
    for off in ("0", "false", " OFF ", "No"):
        monkeypatch.setenv(name, off)
        assert switched_off(name) is True, off
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for on in ("", "1", "true", "On", " yes"):
            monkeypatch.setenv(name, on)
            assert switched_off(name) is False, on
    monkeypatch.setenv(name, "disabled")
    with pytest.warns(RuntimeWarning, match=f"{name} .*0/false/off/no.*'disabled'.*left on"):
        assert switched_off(name) is False
    # the two switches read this way where their modules are first imported
    code = ("from fastres.kernels import _direct, configs; "
            "print(configs.TMA_ROWS, _direct.ENABLED)")
    env = {**os.environ, "FASTRES_TMA": "false", "FASTRES_DIRECT_LAUNCH": "Off"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"], out.stdout


def test_tune_parse_batches():
    from fastres.tune_cli import TuneUsageError, parse_batches

    assert parse_batches(["32", "1,32", 8]) == [1, 8, 32]
    assert parse_batches([]) == [1]
    for bad in (["0"], ["-1"], ["1,x"]):
        with pytest.raises(TuneUsageError):
            parse_batches(bad)


@pytest.fixture
def fake_tune(monkeypatch, tmp_path):
    from fastres import tuning

    monkeypatch.setenv("FASTRES_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("FASTRES_TUNE", raising=False)
    calls = []

    def fake_tune_model(net, batches, dtype, image_size, progress=None):
        calls.append((list(batches), dtype, image_size))
        return {"tuned": 3, "disk_hits": 5, "timed": 7, "unsaved": 0, "seconds": 1.25}

    monkeypatch.setattr(tuning, "tune_model", fake_tune_model)
    tuning.configure(devices=("cpu",))  # (reach tune_model without a GPU)
    yield calls
    tuning.reset()


def test_tune_reports_what_tune_model_returned(fake_tune, capsys):
    from fastres.tune_cli import tune_main

    assert tune_main("resnet18", ["2", "1"], ["fp32"], image_size=32, device="cpu") == 0
    out = capsys.readouterr().out
    assert ("resnet18 fp32 batch 1, 2 at 32px: tuned 3 layer(s), 5 already cached, "
            "7 candidate(s) timed in 1.2 s") in out, out
    assert fake_tune == [([1, 2], torch.float32, 32)]


def test_tune_pinned_mode_tunes_nothing(fake_tune, capsys, monkeypatch):
    from fastres.tune_cli import tune_main

    monkeypatch.setenv("FASTRES_TUNE", "0")
    assert tune_main("resnet18", ["1"], ["fp32"], image_size=32, device="cpu") == 0
    assert "choices are pinned" in capsys.readouterr().out and fake_tune == []


# -- compile_report.py --------------------------------------------------------------------------


def test_compile_report_failure_is_exit_1_and_says_fail(monkeypatch, capsys, tmp_path):
    """A configuration that spills (or does not compile) fails the report: exit 1, FAIL in its
    row's spill and status columns, counted in "N failed". (compile_jobs faked: no compile.)
    The module is imported before the test (at collection): its table goes to the sys.stdout
    of the call, not of the import (it went to the real stdout, past capsys and past
    contextlib.redirect_stdout)."""
    cr = compile_report

    def fake_compile_jobs(jobs, workers=None):
        out = []
        for i, j in enumerate(jobs):
            r = {"kernel": j.kernel, "layer": j.layer, "dtype": j.dtype, "config": j.config}
            if i == 1:
                r.update(ok=False, error="CompilationError: out of resources")
                out.append(r)
                continue
            spill = i != 0
            checks = {"smem": True, "spill": spill}
            checks.update({"wgmma": True, "A16": True, "B16": True} if j.dot else {"v4": True})
            r.update(smem=65536, regs=128 if spill else 255, stack=0 if spill else 8, local=0,
                     checks=checks, ok=all(checks.values()))
            out.append(r)
        return out

    monkeypatch.setattr(cr, "compile_jobs", fake_compile_jobs)
    jpath = tmp_path / "r.json"
    rc = cr.main(["--quick", "--dtype", "fp16", "--json", str(jpath)])
    out = capsys.readouterr().out
    assert rc == 1, out
    rows = json.loads(jpath.read_text())
    n_bad = sum(1 for r in rows if not r.get("ok"))
    assert n_bad >= 2 and f"{len(rows) - n_bad} passed, {n_bad} failed" in out, out
    table = [line for line in out.splitlines() if line.startswith("| ")][1:]
    assert len(table) == len(rows)
    failing = [line for line in table if "FAIL st8/lc0" in line]
    assert failing and all(line.rstrip(" |").endswith("FAIL") for line in failing), failing
    assert sum("FAIL: CompilationError" in line for line in table) >= 1
    ok_rows = [line for line in table if line.rstrip(" |").endswith("ok")]
    assert len(ok_rows) == len(rows) - n_bad


# -- gpu_check_report.py failures -----------------------------------------------------------


def _write_json(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"rows": rows}))


def test_recorded_failures_come_from_every_result_file(report, tmp_path, capsys):
    """``gpu_check_report.py failures``: nothing recorded is exit 0; each kind of recorded
    failure alone is listed and makes it exit 1; passing rows and failed baselines are not
    failures of fastres."""
    d = tmp_path / "details"
    d.mkdir()
    assert report.recorded_failures(str(d)) == [] and report.main(["failures", str(d)]) == 0
    ok_bench = [{"model": "resnet50", "dtype": "bf16", "batch": 1, "impl": "fastres",
                 "status": "ok"},
                {"model": "resnet50", "dtype": "bf16", "batch": 1, "impl": "compile",
                 "status": "error"}]
    _write_json(d / "bench" / "bench.json", ok_bench)
    _write_json(d / "latency" / "bench_latency.json",
                [{"dtype": "bf16", "impl": "eager", "status": "ERROR"},
                 {"dtype": "bf16", "impl": "fastres", "status": "ok"}])
    _write_json(d / "kernels" / "conv_layers.json",
                [{"layer": "layer1.0.conv1", "dtype": "bfloat16", "batch": 32,
                  "status": "ok"}])
    assert report.recorded_failures(str(d)) == []

    def with_change(write, *needles):
        import shutil

        case = tmp_path / f"case{len(list(tmp_path.iterdir()))}"
        shutil.copytree(d, case)
        write(case)
        found = report.recorded_failures(str(case))
        assert len(found) == 1 and all(n in found[0] for n in needles), found
        capsys.readouterr()
        assert report.main(["failures", str(case)]) == 1
        assert f"recorded failure: {found[0]}" in capsys.readouterr().out

    with_change(lambda c: (c / "tests.xml").write_text(
        '<testsuites><testsuite tests="2" failures="0" errors="1"><testcase classname="t.m" '
        'name="test_a"/><testcase classname="t.m" name="test_b"><error message="x"/>'
        '</testcase></testsuite></testsuites>'), "t.m::test_b")
    with_change(lambda c: (c / "test_failures.log").write_text(
        "=== tests/test_x.py::test_y[bf16] (call, 1.0 s)\nAssertionError\n\n"),
        "tests/test_x.py::test_y[bf16] (call")
    with_change(lambda c: _write_json(c / "bench" / "bench.json", ok_bench + [
        {"model": "resnet50", "dtype": "bf16", "batch": 32, "impl": "fastres_graphs",
         "status": "FAILED"}]), "bench resnet50 bf16 32 fastres_graphs: FAILED")
    with_change(lambda c: (c / "bench" / "bench.json").write_text('{"rows": [{"mod'),
                "bench: bench/bench.json unreadable")
    with_change(lambda c: _write_json(c / "latency" / "bench_latency.json", [
        {"dtype": "fp16", "impl": "fastres_graphs", "status": "FAILED"}]),
        "latency fp16 fastres_graphs: FAILED")
    with_change(lambda c: _write_json(c / "kernels" / "conv_layers.json", [
        {"layer": "layer2.0.conv2", "dtype": "float16", "batch": 1,
         "status": "ERROR RuntimeError: launch failed"}]),
        "conv_layers layer2.0.conv2 float16 1: ERROR RuntimeError")
