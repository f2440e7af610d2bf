"""The benchmark scripts that can run without a GPU still run (tiny sizes, in subprocesses: each
changes process-wide state): ``bench_latency.py --smoke``, ``host_overhead.py``,
``tf32_emulation.py`` and ``bn_fold_precision.py``. Timings mean nothing here; what is checked
is that they finish, check outputs, and report."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import fresh_seed_args

REPO = Path(__file__).resolve().parents[1]


def _run(*args: str, timeout: int = 300, drop: tuple[str, ...] = (),
         **extra_env: str) -> subprocess.CompletedProcess:
    # the scripts' own setup, not the test suite's (conftest sets the interpreter and the
    # torch backend for this process; host_overhead.py sets the interpreter itself)
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRITON_INTERPRET", "FASTRES_BACKEND", *drop)}
    env.update(extra_env)
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU check runs the real benchmark")
def test_bench_latency_smoke(tmp_path):
    res = _run("benchmarks/bench_latency.py", "--smoke", "--out", str(tmp_path),
               "--dtypes", "bf16", "--iters", "3", "--warmup", "1", "--image-size", "32",
               "--model", "resnet18", *fresh_seed_args())
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    report = json.loads((tmp_path / "bench_latency.json").read_text())
    rows = {r["impl"]: r for r in report["rows"]}
    assert {"eager", "eager_fp32", "eager_cl", "fastres", "fastres_dispatch",
            "fastres_graphs"} <= set(rows)
    for name, row in rows.items():
        assert row["status"] == "ok", (name, row)
        assert row["rel_err"] < 0.1 and row["median_ms"] > 0, (name, row)
        # --iters 3 in (at most) 3 interleaved rounds of one call each
        assert row["iters"] == 3 and len(row["round_medians"]) == 3, (name, row)
    assert "| bf16 | fastres |" in (tmp_path / "bench_latency.md").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU check runs the real benchmark")
def test_bench_latency_fails_when_fastres_raises(tmp_path, monkeypatch, capsys):
    """A fastres row that raised is ERROR and the exit status says so (it was 0: the GPU
    check's summary read "latency | ok")."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_latency_under_test",
                                                  REPO / "benchmarks" / "bench_latency.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)

    def broken(*a, **k):
        raise RuntimeError("graphs broke in this test")

    monkeypatch.setattr(mod.fastres, "optimize", broken)
    rc = mod.main(["--smoke", "--out", str(tmp_path), "--dtypes", "fp32", "--iters", "2",
                   "--warmup", "0", "--image-size", "32", "--model", "resnet18",
                   *fresh_seed_args()])
    rows = {r["impl"]: r for r in json.loads((tmp_path / "bench_latency.json").read_text())["rows"]}
    assert rc == 1 and rows["fastres_graphs"]["status"] == "ERROR", rows
    assert rows["fastres"]["status"] == "ok"
    for bad in (["--iters", "0"], ["--warmup", "-1"], ["--iters", "x"]):
        with pytest.raises(SystemExit) as exc:
            mod.main(["--smoke", "--out", str(tmp_path), *bad])
        assert exc.value.code == 2
    assert "expected an integer >= 1, got 0" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the script runs instead")
def test_bench_latency_needs_gpu_without_smoke(tmp_path):
    res = _run("benchmarks/bench_latency.py", "--out", str(tmp_path))
    assert res.returncode == 2 and "needs a CUDA GPU" in res.stderr


@pytest.mark.parametrize("path", ["tuned", "auto"])
def test_host_overhead_reports(path):
    res = _run("benchmarks/host_overhead.py", "--model", "resnet18", "--size", "16",
               "--iters", "3", "--repeats", "1", "--path", path)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    m = re.search(rf"resnet18 1x3x16x16, {path} path: ([0-9.]+) ms", res.stdout)
    assert m and float(m.group(1)) > 0, res.stdout


def test_host_overhead_leaves_no_cache_behind(tmp_path):
    """Without FASTRES_CACHE_DIR it runs with a cache folder of its own, and removes it (every
    run used to leave one in the temporary directory, also when the variable was set)."""
    res = _run("benchmarks/host_overhead.py", "--model", "resnet18", "--size", "16",
               "--iters", "1", "--repeats", "1", drop=("FASTRES_CACHE_DIR",),
               TMPDIR=str(tmp_path))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "ms of fastres Python per forward" in res.stdout
    assert not list(tmp_path.glob("fastres-overhead-*"))


def test_compile_time_compiles_the_same_kernels_on_one_thread_and_two(tmp_path):
    """``compile_time.py`` (without a GPU: for sm_90 through a stand-in driver) compiles each
    candidate of the first two ResNet-50 layers once, whatever the thread count."""
    out = tmp_path / "ct.json"
    res = _run("benchmarks/compile_time.py", "--layers", "2", "--threads", "1", "2",
               "--batch", "8", "--json", str(out), timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    one, two = json.loads(out.read_text())["results"]
    assert (one["threads"], two["threads"]) == (1, 2)
    cands = sum(r["candidates"] for r in one["layers"])
    assert one["kernels"] == two["kernels"] == cands > 2, (one, two)
    assert re.search(r"^\| 2 \| %d \| [0-9.]+ \| [0-9.]+ \|$" % cands, res.stdout, re.M), \
        res.stdout


def test_tf32_emulation_table():
    res = _run("benchmarks/tf32_emulation.py", "--arch", "resnet18", *fresh_seed_args())
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    row = [line for line in res.stdout.splitlines() if line.startswith("| resnet18 |")]
    assert len(row) == 1, res.stdout
    exact, rounded, truncated = (float(v) for v in row[0].split("|")[2:5])
    # fp32 is near-exact; TF32 rounding costs ~1e-3 on resnet18; truncation costs more
    assert exact < 1e-5 < rounded < truncated


def test_bn_fold_precision_table():
    res = _run("benchmarks/bn_fold_precision.py", "--dtype", "fp32", *fresh_seed_args())
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    rows = [line for line in res.stdout.splitlines() if line.startswith("| mean |")]
    assert len(rows) == 1, res.stdout
    f64, f32, epilogue = (float(v) for v in rows[0].split("|")[2:5])
    # fastres's float64 fold rounds each weight once: less error than either fp32 scheme
    assert 0 < f64 < 0.8 * min(f32, epilogue) < 1e-7


# -- the GPU check (benchmarks/gpu_check.sh) and its report, dry-run on the CPU ------------------

GPU_CHECK_FILES = {"summary.md", "all.tar.gz", "gpu_check.log", "bench.json", "bench.md",
                   "bench.png", "conv_layers.md", "bench_latency.md"}
TINY_BENCH = ("-m resnet18 -b 1 --dtype bf16 --image-size 64 --iters 2 --warmup 1 "
              "--device cpu")


def _gpu_check(out: Path | str, timeout: int = 400, cwd: Path = REPO,
               **env: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items()
            if k not in ("TRITON_INTERPRET", "FASTRES_BACKEND") and not k.startswith("GPU_CHECK")}
    # never build here (it would pip-install into this environment); run on the CPU
    full.update(PYTHON=sys.executable, GPU_CHECK_AUTO_BUILD="0", GPU_CHECK_ALLOW_CPU="1")
    full.update(env)
    return subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), str(out)],
                          cwd=cwd, env=full, capture_output=True, text=True, timeout=timeout)


def _assert_device_tool_can_bring_back(out: Path) -> None:
    """The device tool returns at most 8 files, named in letters, digits, '.', '_', '-'."""
    names = {p.name for p in out.iterdir()}
    assert names <= GPU_CHECK_FILES and len(names) <= 8, names
    assert all(p.is_file() for p in out.iterdir())
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", n) for n in names)


CPU_DRY_RUN = pytest.mark.skipif(torch.cuda.is_available(),
                                 reason="a CPU dry run; on a GPU the real one runs")


@CPU_DRY_RUN
def test_gpu_check_dry_run_on_cpu(tmp_path):
    """Every stage that can run here runs, through the real script: the stage caps, the
    summary (printed last), the bundle, and the files the device tool brings back."""
    import tarfile

    out = tmp_path / "r"
    cache = tmp_path / "tuning_cache"  # (a GPU run's tuning records come back with the rest)
    cache.mkdir()
    (cache / "tuning-NVIDIA-H100-0123456789ab.json").write_text('{"entries": {}}')
    res = _gpu_check(out, GPU_CHECK_STAGES="env tests fastres_bench",
                     GPU_CHECK_TESTS="tests/test_graphs.py -m cuda", GPU_CHECK_WORKERS="1",
                     GPU_CHECK_BENCH_ARGS=TINY_BENCH, FASTRES_CACHE_DIR=str(cache))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    _assert_device_tool_can_bring_back(out)
    assert {"summary.md", "all.tar.gz", "gpu_check.log", "bench.json", "bench.md",
            "bench.png"} <= {p.name for p in out.iterdir()}
    summary = (out / "summary.md").read_text()
    assert res.stdout.rstrip().endswith("s)") and summary.strip() in res.stdout
    assert res.stdout.index("SUMMARY") > res.stdout.index("=== fastres_bench")
    for needle in ('- command: `GPU_CHECK_ALLOW_CPU="1" GPU_CHECK_AUTO_BUILD="0" '
                   'GPU_CHECK_BENCH_ARGS=',
                   f'PYTHON="{sys.executable}" bash benchmarks/gpu_check.sh',
                   "source digest", "- Python 3.", "torch 2.", "| env | ok |", "| tests | ok |",
                   "| fastres_bench | ok |",
                   "## fastres bench", "| resnet18 | bf16 | 1 |", "fastres_bench: `",
                   "--out details/bench`"):
        assert needle in summary, (needle, summary)
    assert re.search(r"tests: (\d+) run, 0 failed, 0 errors, \1 skipped", summary), summary
    bench = json.loads((out / "bench.json").read_text())
    assert bench["ok"] is True and bench["interrupted"] is False
    assert bench["env"]["command"].startswith("fastres bench -m resnet18")
    with tarfile.open(out / "all.tar.gz") as tar:
        names = set(tar.getnames())
    for n in ("details/stages.tsv", "details/env.json", "details/tests.xml",
              "details/bench/bench.json", "details/bench/bench.png", "summary.md",
              "details/tuning/tuning-NVIDIA-H100-0123456789ab.json"):
        assert n in names, names


@CPU_DRY_RUN
def test_gpu_check_without_a_gpu_stops_after_env(tmp_path):
    """It used to run every stage on the CPU for the whole budget and exit 0."""
    out = tmp_path / "r"
    t0 = time.monotonic()
    res = _gpu_check(out, GPU_CHECK_ALLOW_CPU="0", GPU_CHECK_STAGES="env tests fastres_bench",
                     GPU_CHECK_BENCH_ARGS=TINY_BENCH)
    assert res.returncode == 3, res.stdout[-3000:] + res.stderr[-2000:]
    assert time.monotonic() - t0 < 150
    assert "torch sees no CUDA GPU" in res.stdout
    _assert_device_tool_can_bring_back(out)
    summary = (out / "summary.md").read_text()
    assert "| env | ok |" in summary and "| gpu | FAILED (torch sees no CUDA GPU" in summary
    assert "| tests |" not in summary and not (out / "bench.json").exists()


@CPU_DRY_RUN
def test_gpu_check_paths_are_relative_to_where_it_is_run(tmp_path):
    """A relative OUTDIR (and PYTHON) name paths from the caller's directory: the script
    changes into the repository, and wrote (and cleared) REPO/OUTDIR instead."""
    name = f"out_{os.getpid()}_{time.monotonic_ns()}"
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "py").symlink_to(sys.executable)
    try:
        res = _gpu_check(name, timeout=300, cwd=tmp_path, PYTHON="bin/py",
                         GPU_CHECK_STAGES="env")
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
        assert (tmp_path / name / "summary.md").is_file()
        assert "| env | ok |" in (tmp_path / name / "summary.md").read_text()
        assert not (REPO / name).exists()
    finally:
        shutil.rmtree(REPO / name, ignore_errors=True)


@CPU_DRY_RUN
def test_gpu_check_exit_status_says_a_stage_failed(tmp_path):
    res = _gpu_check(tmp_path / "r", GPU_CHECK_STAGES="fastres_bench",
                     GPU_CHECK_BENCH_ARGS="-m nosuchmodel --device cpu")
    assert res.returncode == 1, res.stdout[-3000:] + res.stderr[-2000:]
    assert "| fastres_bench | FAILED (exit 2) |" in (tmp_path / "r" / "summary.md").read_text()


def _gpu_check_tests_stage(tmp_path, source: str, **env: str):
    """A dry run of the tests stage alone, over one test file written here: the result and
    summary.md."""
    tests = tmp_path / "t" / "test_on_purpose.py"
    tests.parent.mkdir()
    tests.write_text(source)
    res = _gpu_check(tmp_path / "r", GPU_CHECK_STAGES="tests", GPU_CHECK_TESTS=str(tests),
                     GPU_CHECK_WORKERS="1", **env)
    return res, (tmp_path / "r" / "summary.md").read_text()


@CPU_DRY_RUN
def test_gpu_check_failing_test_fails_the_check(tmp_path):
    """A tests stage whose pytest reports a failure is FAILED in the summary, the failure is
    listed, and the exit status is 1 (the dry runs elsewhere only run passing tests)."""
    res, summary = _gpu_check_tests_stage(
        tmp_path, "def test_passes():\n    pass\n\n\n"
                  "def test_fails():\n    assert 1 == 2, 'failed on purpose'\n")
    assert res.returncode == 1, res.stdout[-3000:] + res.stderr[-2000:]
    assert "| tests | FAILED (exit 1) |" in summary, summary
    assert "tests: 2 run, 1 failed, 0 errors, 0 skipped" in summary, summary
    assert "::test_fails: AssertionError: failed on purpose" in summary, summary


@CPU_DRY_RUN
def test_gpu_check_failure_in_a_stage_stopped_at_its_cap_fails_the_check(tmp_path):
    """A tests stage stopped at its cap is TIMEOUT, not FAILED, but a test that failed before
    the cap is in its junit XML: the check exits 1 (it exited 0) and says which test."""
    res, summary = _gpu_check_tests_stage(
        tmp_path, "import time\n\n\ndef test_fails():\n    assert 1 == 2, 'on purpose'\n\n\n"
                  "def test_outlives_the_cap():\n    time.sleep(600)\n",
        GPU_CHECK_TESTS_S="30")
    assert res.returncode == 1, res.stdout[-3000:] + res.stderr[-2000:]
    assert "| tests | TIMEOUT after 30s |" in summary, summary
    assert "test_on_purpose::test_fails: AssertionError: on purpose" in summary, summary
    assert "recorded failure: test " in res.stdout and "::test_fails" in res.stdout, res.stdout


@CPU_DRY_RUN
def test_gpu_check_stage_cap_keeps_the_partial_bench(tmp_path):
    """A bench that outlives its stage cap gets SIGTERM, writes what it measured and says it
    was interrupted; the stage reads TIMEOUT and the summary says INTERRUPTED."""
    out = tmp_path / "r"
    res = _gpu_check(out, GPU_CHECK_STAGES="fastres_bench", GPU_CHECK_BENCH_S="30",
                     GPU_CHECK_BENCH_ARGS="-m resnet18 -b 1 2 --dtype fp32 --image-size 64 "
                                          "--iters 100000 --max-time 1000 --warmup 1 "
                                          "--device cpu")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    _assert_device_tool_can_bring_back(out)
    summary = (out / "summary.md").read_text()
    assert "| fastres_bench | TIMEOUT after 30s |" in summary, summary
    assert "INTERRUPTED (partial)" in summary
    bench = json.loads((out / "bench.json").read_text())
    assert bench["interrupted"] is True and (out / "bench.png").exists()
    rows = bench["rows"]
    # every group is listed with every implementation, none "ok" without a time
    assert {(r["batch"], r["impl"]) for r in rows} == {
        (b, i) for b in (1, 2) for i in ("eager_fp32", "eager_amp_cl", "fastres",
                                          "fastres_graphs")}
    assert all(r["median_ms"] for r in rows if r["status"] == "ok")
    assert any(r["status"] == "skipped" and "interrupted" in r["note"] for r in rows)


def test_gpu_check_usage():
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_CHECK")}
    run = lambda *a, **e: subprocess.run(["bash", "benchmarks/gpu_check.sh", *a], cwd=REPO,
                                         env={**env, **e}, capture_output=True, text=True,
                                         timeout=60)
    res = run()
    assert res.returncode == 2 and "usage" in res.stderr
    res = run("/nonexistent-never-created", GPU_CHECK_STAGES="env nosuchstage")
    assert res.returncode == 2 and "unknown stage 'nosuchstage'" in res.stderr
    assert not Path("/nonexistent-never-created").exists()
    digest = run("--digest")
    assert digest.returncode == 0 and re.fullmatch(r"[0-9a-f]{16}\n", digest.stdout)
    res = run("--help")
    assert res.returncode == 0 and "part1" in res.stdout and "fastres_bench" in res.stdout
    assert '"one" = env build tests fastres_bench' in res.stdout


def _synthetic_details(d: Path) -> None:
    """What a full GPU run leaves in details/: every model x dtype x batch of the bench, every
    conv layer, the latency rows and the quick kernel benchmarks (numbers made up)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from conv_layers import markdown, model_conv_layers

    (d / "bench").mkdir(parents=True)
    (d / "latency").mkdir()
    (d / "kernels").mkdir()
    (d / "env.json").write_text(json.dumps({
        "date_utc": "2026-11-24 10:00 UTC", "python": "3.12.3", "gpu": "NVIDIA H100 80GB HBM3",
        "gpu_count": 1, "sm_count": 132, "memory_gib": 79.2, "capability": "9.0",
        "driver": "580.159.04", "torch_cuda": "13.0", "cudnn": 91900, "nvcc": "V13.0.88",
        "torch_cuda_arch_list": "9.0a", "packages": {"torch": "2.11.0", "triton": "3.6.0",
                                                     "torchvision": "0.26.0"}}))
    (d / "stages.tsv").write_text("stage\tstatus\tseconds\tlog\nenv\tok\t4\tdetails/env.log\n"
                                  "tests\tTIMEOUT after 200s\t212\tdetails/tests.log\n")
    (d / "commands.tsv").write_text("fastres_bench\tpython3 -m fastres bench -m resnet50\n")
    (d / "tests.xml").write_text(
        '<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1" time="12.5">'
        '<testcase classname="tests.test_x" name="test_a"/>'
        '<testcase classname="tests.test_x" name="test_b"><failure message="boom | bad"/>'
        '</testcase></testsuite></testsuites>')
    (d / "test_margins.tsv").write_text("0.500\t1e-3\t2e-3\ttests/t.py::a\tout\n"
                                        "nan\tnan\t2e-3\ttests/t.py::b\tout\n")
    rows = []
    for model in ("resnet50", "resnet18", "resnet101"):
        for dt in ("bf16", "fp16"):
            for bs in (1, 32, 256):
                for impl in ("eager_fp32", "eager_amp_cl", "eager_cl", "compile",
                             "compile_freezing", "compile_reduce_overhead", "fastres",
                             "fastres_graphs"):
                    ok = not impl.startswith("compile") or model == "resnet50"
                    rows.append({"model": model, "dtype": dt, "batch": bs, "impl": impl,
                                 "label": impl, "status": "ok" if ok else "skipped",
                                 "median_ms": 2.0 if ok else None, "p90_ms": 2.1 if ok else None,
                                 "host_ms": 1.9 if ok else None,
                                 "images_per_s": bs * 500.0 if ok else None,
                                 "peak_mib": 812.0 if ok else None, "rel_err": 4.5e-2,
                                 "tolerance": 9.8e-2, "top1": 1.0,
                                 "speedup": {"eager_fp32": 1.5, "eager_amp_cl": 1.2,
                                             "eager_cl": 1.3,
                                             "compile": 1.1 if model == "resnet50" else None},
                                 "note": "" if ok else "compile budget spent"})
    (d / "bench" / "bench.json").write_text(json.dumps({
        "ok": True, "interrupted": False, "elapsed_s": 301.0, "rows": rows,
        "notes": ["resnet50 bf16: tuned in 41.0 s"],
        "env": {"gpu": "NVIDIA H100 80GB HBM3", "driver": "580.159.04", "torch": "2.11.0",
                "command": "fastres bench -m resnet50,resnet18,resnet101"}}))
    lat = [{"dtype": "bf16", "impl": i, "batch": 1, "status": "ok", "median_ms": m,
            "p10_ms": m, "p90_ms": m, "rel_err": 4e-2}
           for i, m in (("eager", 4.3), ("compile_reduce_overhead", 1.1), ("fastres", 5.5),
                        ("fastres_graphs", 0.7))]
    (d / "latency" / "bench_latency.json").write_text(json.dumps(
        {"env": {}, "args": {"model": "resnet50"}, "rows": lat, "phases_s": {}}))
    layers = model_conv_layers("resnet50")
    crow = []
    for dt in ("bfloat16", "float16"):
        for bs in (1, 32, 256):
            for x in layers:
                crow.append({"layer": x.name, "count": x.count, "shape": x.shape_str(),
                             "batch": bs, "dtype": dt, "schedule": "gemm", "config": "c",
                             "status": "ok", "fastres_ms": 0.01, "cudnn_conv_ms": 0.012,
                             "cudnn_fused_ms": 0.02, "fastres_tflops": 300.0,
                             "cudnn_conv_tflops": 250.0, "speedup_vs_cudnn_fused": 2.0,
                             "speedup_vs_cudnn_conv": 1.2})
    crow[-1] = dict(crow[-1], status="FAILED (relative error 5e-2 vs eager)")
    meta = {"arch": "resnet50", "gpu": "H100", "torch": "2.11", "triton": "3.6",
            "cudnn": 91900, "date": "today", "layers": []}
    (d / "kernels" / "conv_layers.json").write_text(json.dumps({"meta": meta, "rows": crow}))
    assert "| 0.0100 | 300.0 | 0.0120 | 250.0 | 0.0200 | 2.00x | 1.20x |" in markdown(crow, meta)
    bm = [{"name": f"t{i}", "stats": {"median": 1e-4},
           "extra_info": {"op": f"conv1x1 l{i // 3}", "shape": "32x64", "dtype": "torch.bfloat16",
                          "impl": ("cuda", "triton", "eager")[i % 3]}} for i in range(60)]
    bm += [{"name": f"c{n}", "stats": {"median": n * 1e-5},  # one conv layer at two batches
            "extra_info": {"layer": "conv1", "shape": "3->64 7x7/2", "batch": n,
                           "dtype": "torch.bfloat16", "impl": "fastres"}} for n in (1, 256)]
    (d / "kernel_benchmarks.json").write_text(json.dumps({"benchmarks": bm}))


def test_gpu_check_summary_of_a_full_run_fits_the_reply(tmp_path):
    """The summary of a full run (18 bench groups, 144 conv rows, the latency and kernel
    tables) names what RESULTS.md needs and fits in the device reply's 12,000-character
    tail with the script's own last lines."""
    d = tmp_path / "details"
    _synthetic_details(d)
    res = _run("benchmarks/gpu_check_report.py", "summary", str(tmp_path), str(d), "480", "520",
               "GPU_CHECK_STAGES=\"part2\" bash benchmarks/gpu_check.sh OUT")
    assert res.returncode == 0, res.stderr
    s = res.stdout
    assert len(s) < 10000, len(s)
    for needle in ("# fastres GPU check, 2026-11-24 10:00 UTC",
                   "- command: `GPU_CHECK_STAGES=\"part2\" bash benchmarks/gpu_check.sh OUT` "
                   "(480 s of a 520 s budget)",
                   "- GPU: NVIDIA H100 80GB HBM3 (132 SMs, 79.2 GiB, sm 9.0), driver 580.159.04, "
                   "CUDA 13.0 (torch), cuDNN 91900",
                   "torch 2.11.0", "Triton 3.6.0", "| tests | TIMEOUT after 200s | 212 |",
                   "tests: 3 run, 1 failed, 0 errors, 1 skipped (12 s)",
                   "- tests.test_x::test_b: boom | bad",
                   "accuracy checks: 2, 1 over their bound",
                   "| resnet50 | bf16 | 256 | 128000 | 128000 | 128000 | 128000 | 128000 | "
                   "128000 | 128000 | 128000 | 2.00 (1.90) | 2.00 (2.10) | 812 | 1.50 | 1.20 | "
                   "1.30 | 1.10 | 4.5e-02 | ok |",
                   "| resnet18 | fp16 | 1 | 500 | 500 | 500 | 500 | 500 | skipped | skipped | "
                   "skipped |",
                   "\"x compile\" is like for like",
                   "| bf16 | fastres_graphs | 0.700 | 0.700 | 0.700 | - | - | - | 4.0e-02 | ok |",
                   "| bfloat16 | 32 | 24 of 24 | 0.530 | 300 | 0.636 | 1.060 | 2.00 | 1.20 | 0 |",
                   "| float16 | 256 | 23 of 24 |", "| op | shape | dtype | cuda | triton | eager |",
                   "| conv1x1 l0 | 32x64 | bfloat16 | 0.1000 | 0.1000 | 0.1000 |",
                   "| conv conv1 | batch 1, 3->64 7x7/2 | bfloat16 | - | - | - | 0.0100 |",
                   "| conv conv1 | batch 256, 3->64 7x7/2 | bfloat16 | - | - | - | 2.5600 |"):
        assert needle in s, (needle, s)
    # a broken input is one line, never a crash
    (d / "bench" / "bench.json").write_text("{ truncated")
    (d / "tests.xml").write_text("<testsuites><testsuite")
    res = _run("benchmarks/gpu_check_report.py", "summary", str(tmp_path), str(d), "1", "520",
               "cmd")
    assert res.returncode == 0, res.stderr
    assert "fastres bench: no results (unreadable (JSONDecodeError))" in res.stdout
    assert "tests: junit XML unreadable" in res.stdout


@CPU_DRY_RUN
def test_bench_latency_keeps_rows_when_stopped(tmp_path):
    """SIGTERM (a stage cap) mid-run: the rows measured so far are written, marked
    interrupted, exit 130."""
    import signal

    env = {k: v for k, v in os.environ.items()
           if k not in ("TRITON_INTERPRET", "FASTRES_BACKEND")}
    proc = subprocess.Popen(
        [sys.executable, "benchmarks/bench_latency.py", "--smoke", "--out", str(tmp_path),
         "--dtypes", "bf16", "--iters", "150", "--warmup", "1", "--image-size", "32",
         "--model", "resnet18"], cwd=REPO, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    seen = []
    try:
        for line in proc.stdout:  # the log line of the first row (eager), then stop it
            seen.append(line)
            if "bf16 eager:" in line:
                proc.send_signal(signal.SIGTERM)
                break
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, "".join(seen) + out[-2000:]
    report = json.loads((tmp_path / "bench_latency.json").read_text())
    assert report["interrupted"] is True and report["rows"][0]["impl"] == "eager"
    assert report["rows"][0]["status"] == "ok" and len(report["rows"]) < 3
    assert "INTERRUPTED" in (tmp_path / "bench_latency.md").read_text()


def test_cuda_op_benchmarks_notice_a_fallback():
    """A benchmark labelled with a backend that cannot run the call (here: cuda on CPU
    tensors) sees which backend really ran, instead of timing the fallback under its name."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import fastres
    from test_bench_cuda_ops import backends_that_ran

    from fastres.ops.head import avgpool_linear

    x, w, b = torch.randn(2, 16, 3, 3), torch.randn(5, 16), torch.randn(5)

    def call(backend):
        def run():
            with fastres.use_backend(backend):
                return avgpool_linear(x, w, b)
        return run

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert backends_that_ran(call("torch")) == [("avgpool_linear", "torch")]
        ran = backends_that_ran(call("cuda"))
    assert ran and all(op == "avgpool_linear" and be != "cuda" for op, be in ran), ran


def test_conv_layers_lists_the_tuners_candidates():
    """Each timed layer's candidates, fastest first, as multiples of the fastest; one that did
    not run shows why; a layer the tuner did not time (pinned, one candidate) is left out."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from conv_layers import candidate_lines

    rows = [{"layer": "layer1.0.conv3", "batch": 256, "dtype": "bfloat16",
             "candidates": {"64x64x64 g8 w4 s2": 0.3, "128x64x64 g8 w4 s4 p2": 0.2,
                            "128x128x64 g8 w8 s3 p1": "OutOfResources: shared memory"}},
            {"layer": "conv1", "batch": 1, "dtype": "bfloat16", "candidates": {}}]
    lines = candidate_lines(rows)
    assert lines[-1] == ("| layer1.0.conv3 | 256 | bfloat16 | 0.2000 | 128x64x64 g8 w4 s4 p2 "
                         "1.00; 64x64x64 g8 w4 s2 1.50; 128x128x64 g8 w8 s3 p1: "
                         "OutOfResources: shared memory (not timed) |")
    assert not any("conv1" in line for line in lines)
    assert candidate_lines(rows[1:]) == []


def test_conv_layers_checks_one_launch_into_a_poisoned_output(monkeypatch):
    """conv_layers.py / test_bench_conv.py check the chosen configuration's own launch into a
    NaN-filled buffer: the tuning call's output also holds what earlier candidates wrote."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import conv_layers
    from conv_layers import Layer, cudnn_fused_fn, fastres_checked_output, make_inputs

    from fastres.kernels import conv as kconv

    layer = Layer("t", 1, c=8, h=5, w=6, k=16, r=3, s=3, stride=1, pad=1, dil=1, groups=1,
                  residual=True, relu=True)
    x, w, b, res = make_inputs(layer, 2, torch.float32, device="cpu")
    ref = cudnn_fused_fn(layer, x, w, b, res)()
    out = fastres_checked_output(layer, x, w, b, res)  # the Triton kernel, interpreted
    tol = conv_layers.TOL[torch.float32]  # (TF32, as cuDNN's default)
    assert conv_layers.rel_err(out, ref) <= tol

    real = kconv.conv_bias_act_triton
    state = {"calls": 0}

    def partial(*args, out=None, **kwargs):
        """A configuration that writes only the first image (the tuning call's output is
        whole: earlier candidates wrote the rest)."""
        state["calls"] += 1
        full = real(*args, **kwargs)
        if out is None:
            return full
        out[:1] = full[:1]
        return out

    monkeypatch.setattr(kconv, "conv_bias_act_triton", partial)
    assert conv_layers.rel_err(conv_layers.fastres_fn(layer, x, w, b, res)(), ref) <= tol
    bad = fastres_checked_output(layer, x, w, b, res)
    assert state["calls"] == 3 and not conv_layers.rel_err(bad, ref) <= tol
