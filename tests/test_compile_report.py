"""The sm_90 compile report (``python -m fastres.compile_report``) on a subset: every kernel
compiles for H100 without a GPU, within shared memory, without spills, on wgmma, with
16-byte async tile copies. Takes ~20-60 s on a 2-core machine (less with Triton's cache)."""

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.triton

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# A directory holding another Triton (``pip install --no-deps --target DIR triton==3.6.0``,
# the GPU machine's version; .ci/run does): the report runs under it too.
OTHER_TRITON = os.environ.get("FASTRES_COMPILE_REPORT_TRITON", "")


def _quick_report(tmp_path, first: list[str] = ()) -> str:
    """Run the quick report (``first``: directories put before everything on the path), check
    every row; return its first line."""
    out = tmp_path / "report.json"
    path = [*first, REPO, os.environ.get("PYTHONPATH", "")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in path if p))
    proc = subprocess.run(
        [sys.executable, "-m", "fastres.compile_report", "--quick", "--json", str(out)],
        capture_output=True, text=True, env=env, timeout=600, cwd=REPO, check=False,
    )
    print(proc.stdout[-6000:], proc.stderr[-3000:])
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    _check_rows(out)
    return proc.stdout.splitlines()[0]


def test_compile_report_quick_passes(tmp_path):
    import triton

    assert f"Triton {triton.__version__}," in _quick_report(tmp_path)


@pytest.mark.skipif(not OTHER_TRITON, reason="FASTRES_COMPILE_REPORT_TRITON (a directory "
                    "holding another Triton) is not set")
def test_compile_report_quick_passes_under_another_triton(tmp_path):
    """The same checks with the Triton the GPU machine has (3.6 where .ci/run installs it):
    what it compiles for sm_90 can differ (it does not pipeline the pointer persistent rows;
    the tables leave those out under it)."""
    import glob

    dists = glob.glob(os.path.join(OTHER_TRITON, "triton-*.dist-info"))
    assert len(dists) == 1, f"no single triton-*.dist-info in {OTHER_TRITON}: {dists}"
    version = os.path.basename(dists[0])[len("triton-"):-len(".dist-info")]
    assert f"Triton {version}," in _quick_report(tmp_path, [OTHER_TRITON])


def _check_rows(out) -> None:
    import json

    rows = json.loads(out.read_text())
    kinds = {r["layer"].split("[")[-1].rstrip("]") for r in rows if r["kernel"] == "conv"}
    assert kinds == {"stem", "gemm", "conv", "grouped"}
    assert {r["dtype"] for r in rows} == {"fp16", "bf16", "fp32"}
    assert {r["kernel"] for r in rows} == {"conv", "maxpool", "avgpool", "splitk"}
    assert any(r["config"].endswith(" t") for r in rows)  # TMA rows were compiled and checked
    # and block rows (3x3 and 3x3/2), whose wgmma check wants both operands in shared memory
    assert {r["config"].split()[-1] for r in rows} >= {"t8x16", "t8x8", "t16x16", "t1x64",
                                                        "t2x8x8", "t4x8x8"}
    # split-K rows (the batch-1 layer of the quick set) and their epilogue kernel's v4 loads
    assert any(" k" in r["config"] and r["kernel"] == "conv" for r in rows)
    assert all(r["checks"]["v4"] for r in rows if r["kernel"] == "splitk")
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


def test_compile_report_catches_a_tma_row_without_tma():
    """A row labelled TMA whose kernel loads its tiles through pointers fails the A/B checks
    (the report looks for the tiles' TMA loads, not for any copy)."""
    from fastres import compile_report as cr

    jobs = [j for j in cr.conv_jobs([s for s in cr.SHAPES if s[0] == "l1 1x1 64>256 +res"],
                                    ["fp16"]) if j.tma]
    assert jobs
    job = jobs[0]
    job.constexprs["TMA"] = False
    (res,) = cr.compile_jobs([job], 1)
    assert not res["ok"] and not res["checks"]["A16"] and not res["checks"]["B16"], res


def test_tma_tile_check_wants_each_tile_by_tma():
    """The TMA tile check on IR text: a TMA load of the block and a global->shared bulk copy
    pass; a pointer load of a tile of that shape fails it even beside another tile's TMA load
    of the same shape (128x128x64: the activation and weight blocks are both 128x64), and so
    does a PTX whose only bulk tensor copy is the output's store."""
    from fastres.compile_report import tma_tile_ok

    tma = ("ttng.async_tma_copy_global_to_local %w_desc[%a, %b] %buf, %bar, %true : "
           "!tt.tensordesc<128x64xbf16, #shared> -> !ttg.memdesc<128x64xbf16>")
    tma36 = tma.replace("<128x64xbf16, #shared>", "<tensor<128x64xbf16, #shared>>")
    ptr = "%a = tt.load %a_ptrs, %m, %o : tensor<128x64x!tt.ptr<bf16>, #blocked2> loc(#l)"
    ptr_t = ptr.replace("128x64x", "64x128x")
    load = "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%r1]"
    store = "cp.async.bulk.tensor.2d.global.shared::cta.bulk_group [%rd4, {%r5, %r6}]"
    assert tma_tile_ok(tma, load, (128, 64)) and tma_tile_ok(tma36, load + store, (128, 64))
    assert not tma_tile_ok(tma, load, (64, 128))  # no TMA load of that block
    assert not tma_tile_ok(tma + "\n" + ptr, load, (128, 64))
    assert not tma_tile_ok(tma + "\n" + ptr_t, load, (128, 64))
    assert not tma_tile_ok(tma, store, (128, 64))


def test_wgmma_check_wants_both_operands_from_shared_memory():
    """A TMA row's wgmma check on PTX text: ``wgmma`` with two matrix descriptors passes; one
    whose A operand is a register list (a tile loaded from shared memory into registers
    first: how Triton ran a reshaped multi-row box as the A operand) fails it, even beside
    descriptor ones, and so does a PTX with no wgmma."""
    from fastres.compile_report import wgmma_from_shared

    d = "{" + ",".join(f"%r{i}" for i in range(64)) + "}"
    op = "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16"
    ss = f"{op} {d}, %rd30, %rd31, %p26, 1, 1, 0, 0;"
    rs = f"{op} {d}, {{%r118,%r120,%r122,%r124}}, %rd30, %p29, 1, 1, 0;"
    assert wgmma_from_shared(ss) and wgmma_from_shared(ss + "\n" + ss)
    assert not wgmma_from_shared(rs) and not wgmma_from_shared(ss + "\n" + rs)
    assert not wgmma_from_shared("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%f1};")


def _copy(name: str, rows: int, cols: int, contiguity: int, dtype: str = "f16") -> str:
    """One async global->shared tile copy line, as Triton 3.8 writes it in TTGIR."""
    return (f"    %{name} = ttg.async_copy_global_to_local %{name}_ptrs_93, %x_102 mask "
            f"%m_104 other %cst_2 {{contiguity = {contiguity} : i32}} : "
            f"tensor<{rows}x{cols}x!tt.ptr<{dtype}>, #blocked2> -> <{rows}x{cols}x{dtype}, "
            "#shared, #smem, mutable>")


def test_tile_check_finds_each_tile_by_its_variable():
    """The A16/B16 check on TTGIR text: each tile's copies are the ones of its kernel
    variable (``a``, ``b``), not those of its shape. An activation tile loaded by 2-byte
    copies (or synchronously) beside 16-byte weight copies of the same shape (a 64x64x64
    row) passed: it looked for any copy of that shape."""
    from fastres.compile_report import pointer_tile_ok

    good = "\n".join([_copy("a_105", 64, 64, 8), _copy("b_110", 64, 64, 8),
                      _copy("a_160", 64, 64, 8), _copy("b_165", 64, 64, 8)])
    assert pointer_tile_ok(good, "a") and pointer_tile_ok(good, "b")
    narrow_a = "\n".join([_copy("a_105", 64, 64, 1), _copy("b_110", 64, 64, 8)])
    assert not pointer_tile_ok(narrow_a, "a") and pointer_tile_ok(narrow_a, "b")
    sync_a = (_copy("b_110", 64, 64, 8) + "\n    %a_175 = tt.load %a_ptrs_93, %m_1, %cst : "
              "tensor<64x64x!tt.ptr<f16>, #blocked2>")
    assert not pointer_tile_ok(sync_a, "a") and pointer_tile_ok(sync_a, "b")
    # (a 1-D load of that name is not a tile: a grouped tile's exact slow path, per row)
    rows = ("\n    %a_343 = tt.load %a_342, %row_ok_328, %cst_0 : tensor<64x!tt.ptr<f16>, "
            "#ttg.slice<{dim = 1, parent = #blocked}>>")
    assert pointer_tile_ok(good + rows, "a")
    # a 4-byte element needs contiguity 4; a copy of another variable (the residual) is
    # neither tile's, and a tile with no copy at all fails
    fp32 = _copy("a_7", 128, 32, 4, "f32") + "\n" + _copy("res_9", 128, 32, 1, "f32")
    assert pointer_tile_ok(fp32, "a") and not pointer_tile_ok(fp32, "b")
    assert not pointer_tile_ok(_copy("a_ptrs_9", 64, 64, 8), "a")  # (not the variable a)


def test_wgmma_check_wants_every_dot_on_tensor_cores():
    """One dot on wgmma beside another left as ``tt.dot`` (an fp32 "ieee" dot: FMAs) passed
    a check for any wgmma in the PTX; every dot must be a ``ttng.warp_group_dot``."""
    from fastres.compile_report import dots_on_tensor_cores

    wg = ("    %acc_3 = ttng.warp_group_dot %a_1, %b_2, %acc_0 {inputPrecision = 0 : i32} : "
          "!ttg.memdesc<128x64xf16> * !ttg.memdesc<64x128xf16> -> tensor<128x128xf32>")
    fma = ("    %acc_9 = tt.dot %x_7, %y_8, %acc_3, inputPrecision = ieee : tensor<128x32xf32> "
           "* tensor<32x128xf32> -> tensor<128x128xf32>")
    ptx = "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 {%r1}, %rd1, %rd2, 1, 1, 1, 1;"
    assert dots_on_tensor_cores(wg, ptx)
    assert not dots_on_tensor_cores(wg + "\n" + fma, ptx)
    assert not dots_on_tensor_cores(wg, "fma.rn.f32 %f1, %f2, %f3, %f4;")


def test_v4_check_wants_every_global_load_16_bytes():
    """The elementwise kernels' check on PTX text: one ``ld.global.v4`` beside scalar loads
    (a gather, an unaligned mask) passed; every global load must be 16 bytes wide."""
    from fastres.compile_report import global_loads_v4

    v4 = "ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];"
    nc = "ld.global.nc.v4.b32 { %r5, %r6, %r7, %r8 }, [ %rd2 + 0 ];"
    assert global_loads_v4(v4 + "\n" + nc)
    assert not global_loads_v4(v4 + "\n" + "ld.global.b32 { %r9 }, [ %rd3 + 0 ];")
    assert not global_loads_v4(v4 + "\n" + "ld.global.b16 { %rs1 }, [ %rd4 + 0 ];")
    assert not global_loads_v4("st.global.v4.b32 [ %rd1 + 0 ], { %r1, %r2, %r3, %r4 };")


def test_compile_report_catches_an_fp32_dot_without_tensor_cores():
    """A real compile: an fp32 row with full-precision ("ieee") dots runs on FMAs and the
    report says so (the wgmma check), as it says spills above."""
    from fastres import compile_report as cr

    job = next(j for j in cr.conv_jobs([s for s in cr.SHAPES if s[0] == "l3 3x3 256"],
                                       ["fp32"]) if not j.tma)
    job.constexprs.update(PRECISION="ieee", ROUND_TF32=False)
    (res,) = cr.compile_jobs([job], 1)
    assert not res["ok"] and not res["checks"]["wgmma"], res


def test_table_names_the_failed_check():
    """Each failing check is marked FAIL in its own column of the printed table, not only in
    the status column (a row over the shared-memory limit showed just its size)."""
    from fastres.compile_report import HEADER, SMEM_LIMIT, _fmt

    def row(fields=(), **checks):
        res = {"kernel": "conv", "layer": "l3 3x3 256 [conv]", "dtype": "bf16",
               "config": "128x128x64 g8 w4 s3", "smem": 96 * 1024, "regs": 154, "stack": 0,
               "local": 0, "checks": {"smem": True, "spill": True, "regs": True,
                                      "wgmma": True, "A16": True, "B16": True}}
        res.update(fields)
        res["checks"].update(checks)
        res["ok"] = all(res["checks"].values())
        return dict(zip(HEADER, _fmt(res)))

    good = row()
    assert good["status"] == "ok" and not any("FAIL" in v for v in good.values())
    over = row({"smem": SMEM_LIMIT + 1024}, smem=False)
    assert over["smem KiB"] == f"FAIL {SMEM_LIMIT // 1024 + 1}" and over["status"] == "FAIL"
    spilled = row({"stack": 144, "regs": 255}, spill=False)
    assert spilled["spill"] == "FAIL st144/lc0" and spilled["regs"] == "255"
    too_many = row({"regs": 256}, regs=False)
    assert too_many["regs"] == "FAIL 256" and too_many["spill"] == "0"
    for column, check in (("wgmma", "wgmma"), ("A/act 16B", "A16"), ("B/wt 16B", "B16")):
        failed = row(**{check: False})
        assert failed[column] == "FAIL" and failed["status"] == "FAIL"
