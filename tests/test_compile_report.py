"""The sm_90 compile report (``python -m fastres.compile_report``) on a subset: every kernel
compiles for H100 without a GPU, within shared memory, without spills, on wgmma, with
16-byte async tile copies. Takes ~20-60 s on a 2-core machine (less with Triton's cache)."""

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.triton

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_compile_report_quick_passes(tmp_path):
    out = tmp_path / "report.json"
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-m", "fastres.compile_report", "--quick", "--json", str(out)],
        capture_output=True, text=True, env=env, timeout=600, cwd=REPO, check=False,
    )
    print(proc.stdout[-6000:], proc.stderr[-3000:])
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    import json

    rows = json.loads(out.read_text())
    kinds = {r["layer"].split("[")[-1].rstrip("]") for r in rows if r["kernel"] == "conv"}
    assert kinds == {"stem", "gemm", "conv", "grouped"}
    assert {r["dtype"] for r in rows} == {"fp16", "bf16", "fp32"}
    assert {r["kernel"] for r in rows} == {"conv", "maxpool", "avgpool"}
    for r in rows:
        assert r["ok"], r
        assert r["smem"] <= 232448 and r["stack"] == 0 and r["local"] == 0
        if r["kernel"] == "conv":
            assert r["checks"]["wgmma"] and r["checks"]["B16"]
            assert r["checks"].get("A16", True)


def test_compile_report_catches_a_spilling_config():
    """The removed 256-row stem tile spills: the report must say FAIL, not pass silently."""
    from fastres import compile_report as cr
    from fastres.kernels.configs import KernelConfig

    job = cr.conv_jobs([cr.SHAPES[0]], ["fp16"])[0]
    assert "stem" in job.layer
    job.constexprs["BLOCK_M"] = 256
    job.options = {"num_warps": 4, "num_stages": 3}
    job.config = str(KernelConfig(256, 64, 32, 8, 4, 3))
    (res,) = cr.compile_jobs([job], 1)
    assert not res["ok"] and not res["checks"]["spill"], res
