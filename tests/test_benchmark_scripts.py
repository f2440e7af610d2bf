"""The benchmark scripts that can run without a GPU still run (tiny sizes, in subprocesses: each
changes process-wide state): ``bench_latency.py --smoke``, ``host_overhead.py``,
``tf32_emulation.py`` and ``bn_fold_precision.py``. Timings mean nothing here; what is checked
is that they finish, check outputs, and report."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    # the scripts' own setup, not the test suite's (conftest sets the interpreter and the
    # torch backend for this process; host_overhead.py sets the interpreter itself)
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRITON_INTERPRET", "FASTRES_BACKEND")}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU check runs the real benchmark")
def test_bench_latency_smoke(tmp_path):
    res = _run("benchmarks/bench_latency.py", "--smoke", "--out", str(tmp_path),
               "--dtypes", "bf16", "--iters", "3", "--warmup", "1", "--image-size", "32",
               "--model", "resnet18")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    report = json.loads((tmp_path / "bench_latency.json").read_text())
    rows = {r["impl"]: r for r in report["rows"]}
    assert {"eager", "fastres", "fastres_graphs"} <= set(rows)
    for name, row in rows.items():
        assert row["status"] == "ok", (name, row)
        assert row["rel_err"] < 0.1 and row["median_ms"] > 0, (name, row)
    assert "| bf16 | fastres |" in (tmp_path / "bench_latency.md").read_text()


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


def test_tf32_emulation_table():
    res = _run("benchmarks/tf32_emulation.py", "--arch", "resnet18")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    row = [line for line in res.stdout.splitlines() if line.startswith("| resnet18 |")]
    assert len(row) == 1, res.stdout
    exact, rounded, truncated = (float(v) for v in row[0].split("|")[2:5])
    # fp32 is near-exact; TF32 rounding costs ~1e-3 on resnet18; truncation costs more
    assert exact < 1e-5 < rounded < truncated


def test_bn_fold_precision_table():
    res = _run("benchmarks/bn_fold_precision.py", "--dtype", "fp32",
               "--seed", str(torch.randint(0, 2**31, ()).item()))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    rows = [line for line in res.stdout.splitlines() if line.startswith("| mean |")]
    assert len(rows) == 1, res.stdout
    f64, f32, epilogue = (float(v) for v in rows[0].split("|")[2:5])
    # fastres's float64 fold rounds each weight once: less error than either fp32 scheme
    assert 0 < f64 < 0.8 * min(f32, epilogue) < 1e-7
