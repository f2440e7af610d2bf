"""Compile every fastres Triton kernel in every autotune configuration for H100 (sm_90) — no
GPU needed — and check what makes it fast.

    python -m fastres.compile_report [--quick] [--jobs N] [--json PATH] [--dtype fp16 ...]

For representative ResNet-50/ResNeXt-50 layer shapes (batch 32, and four at batch 1, where
the split-K rows are offered) in fp16, bf16 and fp32
(TF32), every configuration the autotuner would try is compiled with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`` (integer arguments that
are multiples of 16 get the divisibility attribute and 1 is specialized, as at a real launch,
except the shape arguments the kernels mark ``do_not_specialize``)
and checked:

- ``smem``: shared memory <= 232448 bytes (H100's per-block maximum);
- ``spill``: no stack or local memory (``cuobjdump --dump-resource-usage`` from Triton's
  bundled binaries); ``regs``: registers <= 255;
- ``wgmma``: every dot runs on Hopper tensor cores (``wgmma.mma_async`` in the PTX, and no
  ``tt.dot`` left in the TTGIR: :func:`dots_on_tensor_cores`); for a
  TMA row, every ``wgmma`` reads both operands from shared memory (two matrix descriptors,
  :func:`wgmma_from_shared`: the tiles go from the TMA buffers to the tensor cores, not
  through registers);
- ``A16``/``B16``: the activation and weight tiles are loaded with 16-byte async copies
  (``ttg.async_copy_global_to_local`` of the tile with contiguity x element size >= 16 in the
  TTGIR, lowered to ``cp.async ... 0x10``), and never synchronously; each tile's copies are
  found by the kernel variable they load (``a``, ``b``: :func:`pointer_tile_ok`). The
  stem's activation rows (3 channels, 7 taps, stride 2) cannot be 16-byte aligned: that
  column reads ``n/a`` there. A TMA row (``... t``) loads both tiles by the tensor memory
  accelerator instead: each must be an ``ttng.async_tma_copy_global_to_local`` of the whole
  tile in the TTGIR, lowered to a global->shared ``cp.async.bulk.tensor`` in the PTX, with
  no pointer load of a tile of its shape (:func:`tma_tile_ok`);
- max-pool, global average pool and the split-K rows' epilogue kernel: no spills, and every
  global load 16 bytes wide (``ld.global...v4``: :func:`global_loads_v4`).

Prints a table and exits non-zero when any check fails. A failing configuration is removed
from :mod:`fastres.kernels.configs` (or fixed), not kept.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

SMEM_LIMIT = 232448
_DT = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}
_PTR = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32"}
_BYTES = {"fp16": 2, "bf16": 2, "fp32": 4}

# Representative layers (batch 32): name, N, C, H, W, C_out, R, S, stride, pad, dil, groups,
# residual in the epilogue (Bottleneck conv3; BasicBlock conv2 of resnet18/34).
SHAPES = [
    ("stem 7x7/2", 32, 3, 224, 224, 64, 7, 7, 2, 3, 1, 1, False),
    ("l1 1x1 64>64", 32, 64, 56, 56, 64, 1, 1, 1, 0, 1, 1, False),
    ("l1 1x1 64>256 +res", 32, 64, 56, 56, 256, 1, 1, 1, 0, 1, 1, True),
    ("l1 1x1 256>64", 32, 256, 56, 56, 64, 1, 1, 1, 0, 1, 1, False),
    ("l1 3x3 64", 32, 64, 56, 56, 64, 3, 3, 1, 1, 1, 1, False),
    ("l1 3x3 64 +res", 32, 64, 56, 56, 64, 3, 3, 1, 1, 1, 1, True),
    ("l2 3x3/2 128", 32, 128, 56, 56, 128, 3, 3, 2, 1, 1, 1, False),
    ("l2 down 1x1/2", 32, 256, 56, 56, 512, 1, 1, 2, 0, 1, 1, False),
    ("l3 3x3 256", 32, 256, 14, 14, 256, 3, 3, 1, 1, 1, 1, False),
    ("l3 3x3 256 +res", 32, 256, 14, 14, 256, 3, 3, 1, 1, 1, 1, True),
    ("l4 3x3 512", 32, 512, 7, 7, 512, 3, 3, 1, 1, 1, 1, False),
    ("l4 1x1 512>2048 +res", 32, 512, 7, 7, 2048, 1, 1, 1, 0, 1, 1, True),
    ("dil2 3x3 256", 32, 256, 28, 28, 256, 3, 3, 1, 2, 2, 1, False),
    ("x50 3x3 g32x4", 32, 128, 56, 56, 128, 3, 3, 1, 1, 1, 32, False),
    ("x50 3x3/2 g32x8", 32, 256, 56, 56, 256, 3, 3, 2, 1, 1, 32, False),
    ("x50 3x3 g32x32", 32, 1024, 7, 7, 1024, 3, 3, 1, 1, 1, 32, False),
    ("fc 2048>1000", 32, 2048, 1, 1, 1000, 1, 1, 1, 0, 1, 1, False),
    # batch 1: fewer output tiles than SMs, long K loops (the split-K rows)
    ("b1 l3 3x3 256", 1, 256, 14, 14, 256, 3, 3, 1, 1, 1, 1, False),
    ("b1 l4 3x3 512", 1, 512, 7, 7, 512, 3, 3, 1, 1, 1, 1, False),
    ("b1 l4 1x1 2048>512", 1, 2048, 7, 7, 512, 1, 1, 1, 0, 1, 1, False),
    ("b1 l4 1x1 512>2048 +res", 1, 512, 7, 7, 2048, 1, 1, 1, 0, 1, 1, True),
]
QUICK_SHAPES = ["stem 7x7/2", "l1 1x1 64>256 +res", "l1 3x3 64", "l2 3x3/2 128",
                "x50 3x3 g32x4", "b1 l4 1x1 2048>512"]


@dataclass
class Job:
    kernel: str  # conv | maxpool | avgpool | splitk
    layer: str
    dtype: str
    config: str
    signature: dict
    constexprs: dict  # arg name -> value
    ints: dict  # arg name -> value (for the divisibility attribute)
    options: dict
    tiles: dict = field(default_factory=dict)  # "A"/"B" -> block shape or None (n/a)
    dot: bool = True
    tma: bool = False  # the A and B tiles are loaded by TMA (tiles: their descriptor blocks)

    def key(self) -> str:
        _, plain = _kernel(self.kernel)
        attrs = {k: (v == 1, v % 16 == 0) for k, v in self.ints.items() if k not in plain}
        return json.dumps([self.kernel, self.signature, self.constexprs, attrs, self.options],
                          sort_keys=True, default=str)


class _SM90Driver:
    """What Triton's JIT binder and ``kernel.warmup`` ask of the active driver, for an H100
    (sm_90): the target, device 0, stream 0. Compiling needs no more; launching does."""

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


def use_sm90_driver() -> None:
    """Make a stand-in driver for an H100 Triton's active one in this process (no GPU
    needed): ``kernel.warmup(...)`` on CPU tensors then compiles for sm_90 through Triton's
    own JIT path, as the tuner's compile pool does on a GPU (nothing can be launched).
    For benchmarks/compile_time.py and tests, in processes of their own."""
    import triton

    triton.runtime.driver.set_active(_SM90Driver())


def _jit(fn):
    """The kernel as a JITFunction (under TRITON_INTERPRET=1 ``@triton.jit`` gives an
    InterpretedFunction, which ``triton.compile`` cannot take)."""
    from triton.runtime.jit import JITFunction

    return fn if isinstance(fn, JITFunction) else JITFunction(fn.fn)


def _kernel(name: str):
    """(kernel as a JITFunction, names of its integer arguments that are not specialized)."""
    if name == "conv":
        from fastres.kernels.conv import NO_SPECIALIZE
        from fastres.kernels.conv import conv_bias_act_kernel as k
    elif name == "splitk":
        from fastres.kernels.conv import split_k_epilogue_kernel as k

        return _jit(k), set()
    elif name == "maxpool":
        from fastres.kernels.pool import NO_SPECIALIZE
        from fastres.kernels.pool import max_pool_nhwc_kernel as k
    else:
        from fastres.kernels.head import NO_SPECIALIZE
        from fastres.kernels.head import global_avgpool_nhwc_kernel as k
    return _jit(k), set(NO_SPECIALIZE)


def conv_jobs(shapes, dtypes, first_only_dtypes=()) -> list[Job]:
    import torch

    from fastres.kernels.configs import TABLES, prune
    from fastres.kernels.conv import ConvProblem, launch_params, tma_box

    jobs = []
    for name, n, c, h, w, k, r, s, st, pad, dil, g, res in shapes:
        for dt in dtypes:
            prob = ConvProblem(n, c, h, w, k, r, s, (st, st), (pad, pad), (dil, dil), g,
                               getattr(torch, _DT[dt]), has_res=res, relu=True,
                               tf32=dt == "fp32")
            kind = prob.kind
            cands = prune(TABLES[kind], kind, prob.m, prob.k_g, prob.k_extent, _BYTES[dt], res,
                          taps=prob.taps, groups=g, box=tma_box(prob))
            if dt in first_only_dtypes:
                cands = cands[:1]
            p, q = prob.pq
            for cfg in cands:
                lp = launch_params(prob, cfg, interpreted=False)
                params = dict(lp.params)
                options = {"num_warps": params.pop("num_warps"),
                           "num_stages": params.pop("num_stages")}
                ints = dict(M=prob.m, H=h, W=w, C=c, P=p, Q=q, K_OUT=k, C_G=lp.c_g,
                            K_G=lp.k_g, stride_h=st, stride_w=st, pad_h=pad, pad_w=pad,
                            dil_h=dil, dil_w=dil)
                ptr = _PTR[dt]
                sig = {"x_ptr": ptr, "w_ptr": ptr, "b_ptr": "*fp32", "r_ptr": ptr,
                       # (split-K: the fp32 workspace of partial sums)
                       "o_ptr": ptr if params["SPLIT_K"] == 1 else "*fp32"}
                bm, bn, bk = params["BLOCK_M"], params["BLOCK_N"], params["BLOCK_K"]
                tma = bool(params.get("TMA"))
                tiles = {"A": (bm, bk) if kind != "stem" else None,
                         "B": (bn, bk) if tma else (bk, bn)}  # (TMA: the [N, K] weight block)
                if cfg.box_h:  # the activation's box (strided: of [N, H/sh, sh, W/sw, sw*C])
                    box = (cfg.box_h, cfg.box_w, bk)
                    tiles["A"] = ((cfg.box_n, *box) if st == 1
                                  else (cfg.box_n, box[0], 1, *box[1:]))
                jobs.append(Job("conv", f"{name} [{kind}]", dt, str(cfg), sig, params, ints,
                                options, tiles, tma=tma))
    return jobs


def pool_jobs(dtypes) -> list[Job]:
    jobs = []
    for dt in dtypes:
        ptr = _PTR[dt]
        ints = dict(M=32 * 56 * 56, H=112, W=112, C=64, P=56, Q=56, stride=2, pad=1)
        jobs.append(Job("maxpool", "maxpool 3x3/2 64ch", dt, "64x64 w4", {"x_ptr": ptr,
                        "o_ptr": ptr}, dict(KS=3, INDEX64=False, BLOCK_M=64, BLOCK_C=64),
                        ints, {"num_warps": 4, "num_stages": 1}, dot=False))
        ints = dict(HW=49, C=2048)
        jobs.append(Job("avgpool", "avgpool 7x7 2048ch", dt, "16x128 w4", {"x_ptr": ptr,
                        "o_ptr": ptr}, dict(INDEX64=False, BLOCK_HW=16, BLOCK_C=128,
                                            INTERPRETED=False),
                        ints, {"num_warps": 4, "num_stages": 1}, dot=False))
        # the split-K rows' second kernel, as the launcher runs it (resnet50 layer4 at batch
        # 1, 8 splits, with a residual)
        from fastres.kernels.conv import split_k_epilogue_params

        params = split_k_epilogue_params(8, True, True, False)
        warps = params.pop("num_warps")
        jobs.append(Job("splitk", "split-K epilogue 49x2048", dt,
                        f"{params['BLOCK']} w{warps} k8",
                        {"ws_ptr": "*fp32", "b_ptr": "*fp32", "r_ptr": ptr, "o_ptr": ptr},
                        params, dict(MN=49 * 2048, K_OUT=2048),
                        {"num_warps": warps, "num_stages": 1}, dot=False))
    return jobs


def _cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                        "cuobjdump")


def _resources(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        text = subprocess.run([_cuobjdump(), "--dump-resource-usage", path],
                              capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(path)
    out = {}
    for key in ("REG", "STACK", "SHARED", "LOCAL"):
        m = re.search(rf"\b{key}:(\d+)", text)
        out[key.lower()] = int(m.group(1)) if m else None
    return out


_COPY = re.compile(r"ttg\.async_copy_global_to_local.*?(\{[^}]*contiguity\s*=\s*(\d+)[^}]*\})?"
                   r"\s*:\s*tensor<(\d+)x(\d+)x!tt\.ptr<(\w+)>")
_ELEM = {"f16": 2, "bf16": 2, "f32": 4}
# (Triton 3.6 writes the descriptor type as ``!tt.tensordesc<tensor<128x64xbf16, ...>>``, 3.8
# as ``!tt.tensordesc<128x64xbf16, ...>``)
_TMA_LOAD = re.compile(r"ttng\.async_tma_copy_global_to_local.*?:\s*"
                       r"!tt\.tensordesc<(?:tensor<)?((?:\d+x)+)")


# a 2-D tile loaded through pointers (synchronously, or by a cp.async copy)
_POINTER_TILE = re.compile(r"(?:tt\.load|ttg\.async_copy_global_to_local)\s.*?:\s*"
                           r"tensor<(\d+)x(\d+)x!tt\.ptr<")
# a TMA load (global -> shared; the output's store is ``...global.shared::cta...``)
_TMA_LOAD_PTX = re.compile(r"cp\.async\.bulk\.tensor\.\d+d\.shared::\w+\.global")


def _tma_tiles(ttgir: str) -> set[tuple[int, ...]]:
    """The block shape of every TMA global->shared tile load (its descriptor's block: (rows,
    cols), or the implicit-GEMM activation's 4-D or 5-D box)."""
    return {tuple(int(d) for d in m.group(1).rstrip("x").split("x"))
            for m in _TMA_LOAD.finditer(ttgir)}


def tma_tile_ok(ttgir: str, ptx: str, shape) -> bool:
    """A TMA row's tile of block ``shape``: a TMA load of that block in the TTGIR, a
    global->shared bulk tensor copy in the PTX, and no pointer load of a tile of that shape
    (for a box, its flattened ``[pixels, channels]`` shape), nor of its transpose. (The
    activation and weight blocks, or the activation and residual ones, can have one shape:
    a kernel that loaded one of them through pointers would otherwise pass on the other's
    TMA load.)"""
    shape = tuple(shape)
    rows, cols = math.prod(shape[:-1]), shape[-1]
    pointer = {(int(r), int(c)) for r, c in _POINTER_TILE.findall(ttgir)}
    return (shape in _tma_tiles(ttgir) and bool(_TMA_LOAD_PTX.search(ptx))
            and not pointer & {(rows, cols), (cols, rows)})


# a wgmma whose A operand is in registers: ``wgmma... {d...}, {a...}, desc_b, ...`` (from
# shared memory: ``{d...}, desc_a, desc_b, ...``)
_WGMMA_RS = re.compile(r"wgmma\.mma_async[^;{]*\{[^}]*\}\s*,\s*\{")


def wgmma_from_shared(ptx: str) -> bool:
    """The PTX has ``wgmma`` instructions and every one reads both operands from shared
    memory (matrix descriptors), none its A operand from registers."""
    return "wgmma.mma_async" in ptx and not _WGMMA_RS.search(ptx)


# the SSA name Triton gives an op's result after the kernel's variable (``%a_105 = ...``:
# the ``a`` of ``a = tl.load(...)``; 3.6 and 3.8 alike)
_RESULT = re.compile(r"^\s*%([A-Za-z_]\w*?)(?:_\d+)?\s*=")


def _tile_copies(ttgir: str) -> list[tuple[str | None, int | None]]:
    """(the kernel variable it loads, bytes per copy or None) of every async global->shared
    tile copy."""
    out = []
    for line in ttgir.splitlines():
        if "async_copy_global_to_local" not in line:
            continue
        m = _COPY.search(line)
        if not m:
            continue
        contig = int(m.group(2)) if m.group(2) else None
        size = contig * _ELEM.get(m.group(5), 0) if contig else None
        name = _RESULT.match(line)
        out.append((name.group(1) if name else None, size))
    return out


def pointer_tile_ok(ttgir: str, tile: str) -> bool:
    """The kernel's operand tile ``tile`` (its variable: ``a`` the activations, ``b`` the
    weights) is loaded only by async global->shared copies of 16 bytes or more, and never
    synchronously as a tile (a 2-D ``tt.load``). The copies are told apart by the variable
    they load, not by their shape: an activation and a weight tile can have one shape
    (64x64x64), and a 2-byte load of one passed beside the other's 16-byte copies."""
    sizes = [size for name, size in _tile_copies(ttgir) if name == tile]
    sync = re.compile(rf"^\s*%{tile}(?:_\d+)?\s*=\s*tt\.load\b.*:\s*tensor<\d+x\d+x!tt\.ptr<",
                      re.M)  # (a 2-D tile: a grouped tile's exact slow path loads 1-D rows)
    return (bool(sizes) and all(size is not None and size >= 16 for size in sizes)
            and not sync.search(ttgir))


def dots_on_tensor_cores(ttgir: str, ptx: str) -> bool:
    """Every dot of the kernel was lowered to Hopper's ``wgmma`` (``ttng.warp_group_dot``; no
    ``tt.dot`` left for FMA or ``mma.sync``), and the PTX has ``wgmma`` instructions: one
    dot on tensor cores beside another on FMAs passed a test for any ``wgmma``."""
    return "wgmma.mma_async" in ptx and not re.search(r"\btt\.dot\b", ttgir)


def global_loads_v4(ptx: str) -> bool:
    """Every global load of the PTX is 16 bytes wide (``ld.global...v4``), for the
    elementwise kernels (pools, split-K epilogue): one such load passed beside scalar ones."""
    loads = re.findall(r"\bld\.global[.\w]*", ptx)
    return bool(loads) and all(".v4." in ld + "." for ld in loads)


def compile_job(job: Job) -> dict:
    """Compile one job for sm_90 and evaluate the checks (in a process where Triton is not
    interpreted: see :func:`compile_jobs`)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn, plain = _kernel(job.kernel)
    names = fn.arg_names
    sig, consts, attrs = {}, {}, {}
    for i, name in enumerate(names):
        if name in job.constexprs:
            sig[name] = "constexpr"
            consts[(i,)] = job.constexprs[name]
        elif name in job.signature:
            sig[name] = job.signature[name]
            attrs[(i,)] = [["tt.divisibility", 16]]  # torch allocations are 16-byte aligned
        else:
            v = job.ints[name]
            if name in plain:  # do_not_specialize: as at a launch, no attribute
                sig[name] = "i32" if v < 2**31 else "i64"
            elif v == 1:  # specialized like a launch does
                sig[name] = "constexpr"
                consts[(i,)] = 1
            else:
                sig[name] = "i32" if v < 2**31 else "i64"
                if v % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
    t0 = time.time()
    res = {"kernel": job.kernel, "layer": job.layer, "dtype": job.dtype, "config": job.config}
    try:
        ck = triton.compile(ASTSource(fn, sig, consts, attrs),
                            target=GPUTarget("cuda", 90, 32), options=job.options)
    except Exception as exc:  # a config that does not compile fails the report
        res.update(ok=False, error=f"{type(exc).__name__}: {str(exc)[-600:]}")
        return res
    res["compile_s"] = round(time.time() - t0, 1)
    ptx, ttgir = ck.asm["ptx"], ck.asm["ttgir"]
    rsc = _resources(ck.asm["cubin"])
    shared = int(ck.metadata.shared)
    res.update(smem=shared, regs=rsc["reg"], stack=rsc["stack"], local=rsc["local"])
    checks = {
        "smem": shared <= SMEM_LIMIT,
        "spill": rsc["stack"] == 0 and rsc["local"] == 0,
        "regs": (rsc["reg"] or 0) <= 255,
    }
    if job.dot:
        checks["wgmma"] = (wgmma_from_shared(ptx) if job.tma else True) \
            and dots_on_tensor_cores(ttgir, ptx)
        for tile, shape in job.tiles.items():
            if job.tma:  # the whole tile by the tensor memory accelerator
                checks[tile + "16"] = tma_tile_ok(ttgir, ptx, shape)
            elif shape is None:
                res[tile + "16"] = "n/a"
            else:
                checks[tile + "16"] = pointer_tile_ok(ttgir, tile.lower())
    else:
        checks["v4"] = global_loads_v4(ptx)
    res["checks"] = checks
    res["ok"] = all(checks.values())
    return res


def compile_jobs(jobs: list[Job], workers: int | None = None) -> list[dict]:
    """Run :func:`compile_job` for each job in fresh worker processes.

    Workers are spawned with ``TRITON_INTERPRET=0``: in a process where Triton was imported
    interpreted, ``triton.language``'s own jitted helpers (``tl.cdiv``...) are interpreter
    functions and cannot be compiled.
    """
    import multiprocessing as mp

    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs)))
    from fastres._env import environ

    with environ("TRITON_INTERPRET", "0"), \
            ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        return list(pool.map(compile_job, jobs))


def _fmt(res: dict) -> list[str]:
    def mark(name):
        if name in res.get("checks", {}):
            return "ok" if res["checks"][name] else "FAIL"
        return res.get(name, "-")

    def failed(name):  # each column says FAIL for its own check (the status: that one did)
        return not res["checks"].get(name, True)

    if "error" in res:
        return [res["layer"], res["dtype"], res["config"], "-", "-", "-", "-", "-", "-",
                "FAIL: " + res["error"][:60]]
    wg = mark("wgmma") if res["kernel"] == "conv" else "-"
    a = mark("A16") if res["kernel"] == "conv" else mark("v4")
    b = mark("B16") if res["kernel"] == "conv" else "-"
    smem = ("FAIL " if failed("smem") else "") + f"{res['smem'] / 1024:.0f}"
    regs = ("FAIL " if failed("regs") else "") + str(res["regs"])
    spill = f"FAIL st{res['stack']}/lc{res['local']}" if failed("spill") else "0"
    return [res["layer"], res["dtype"], res["config"], smem, regs, spill, wg, a, b,
            "ok" if res["ok"] else "FAIL"]


HEADER = ["layer [schedule]", "dtype", "config (MxNxK group warps stages)", "smem KiB",
          "regs", "spill", "wgmma", "A/act 16B", "B/wt 16B", "status"]


def table(results: list[dict]) -> str:
    rows = [HEADER] + [_fmt(r) for r in results]
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(HEADER))]
    lines = []
    for j, row in enumerate(rows):
        lines.append("| " + " | ".join(str(v).ljust(w) for v, w in zip(row, widths)) + " |")
        if j == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def build_jobs(quick: bool, dtypes: list[str]) -> list[Job]:
    shapes = [s for s in SHAPES if s[0] in QUICK_SHAPES] if quick else SHAPES
    if quick:  # every config in fp16; the first config of each layer in the other dtypes
        jobs = conv_jobs(shapes, ["fp16"]) + conv_jobs(
            shapes, [d for d in dtypes if d != "fp16"],
            first_only_dtypes=("bf16", "fp32"))
    else:
        jobs = conv_jobs(shapes, dtypes)
    return jobs + pool_jobs(dtypes if not quick else ["fp16"])


def run(quick: bool = False, jobs: int | None = None, dtypes=("fp16", "bf16", "fp32"),
        json_path: str | None = None, out=None) -> int:
    """Compile and check; print the table to ``out`` (default: ``sys.stdout`` at the time of
    the call, so ``contextlib.redirect_stdout`` takes it); return the number of failing rows."""
    out = sys.stdout if out is None else out
    all_jobs = build_jobs(quick, list(dtypes))
    # Many layers share one compiled kernel (same constexprs and divisibility): compile once.
    unique: dict[str, Job] = {}
    for j in all_jobs:
        unique.setdefault(j.key(), j)
    t0 = time.time()
    ordered = list(unique.values())
    results = compile_jobs(ordered, jobs)
    by_key = {j.key(): r for j, r in zip(ordered, results)}
    rows = []
    for j in all_jobs:
        r = dict(by_key[j.key()])
        r.update(layer=j.layer, dtype=j.dtype, config=j.config)
        rows.append(r)
    import triton

    print(f"fastres compile report: Triton {triton.__version__}, target sm_90 "
          f"(H100), {len(rows)} kernel/config/layer rows, {len(ordered)} distinct compiles, "
          f"{time.time() - t0:.0f} s", file=out)
    print(table(rows), file=out)
    failures = [r for r in rows if not r.get("ok")]
    print(f"\n{len(rows) - len(failures)} passed, {len(failures)} failed", file=out)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(rows, f, indent=1)
    return len(failures)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastres.compile_report",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="a subset (5 layers; every config in fp16, the first in bf16/fp32)")
    ap.add_argument("--jobs", type=int, default=None, help="parallel compiles (default: CPUs)")
    ap.add_argument("--dtype", nargs="+", default=["fp16", "bf16", "fp32"],
                    choices=["fp16", "bf16", "fp32"])
    ap.add_argument("--json", default=None, help="also write the rows as JSON here")
    args = ap.parse_args(argv)
    failures = run(args.quick, args.jobs, args.dtype, args.json)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
