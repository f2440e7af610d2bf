"""Edge checks of the Triton kernels, written from mutants (a second round of mutation testing)
that the other Triton test files let through: conditions they do not drive. Each test names
the mistake it catches.

- exact-arithmetic inputs (small integers, weights on a 1/8 grid): every fp32 sum is exact, so
  the 16-bit outputs must equal the float64 result rounded once to the dtype, bit for bit (a
  truncating store is within the per-op tolerance of the random-input tests, not of this);
- the block-diagonal grouped schedule's non-finite slow path with dilation, stride and padding
  that differ per axis, batch 2;
- the registered max-pool implementation with windows other than the stem's 3x3/2;
- the head's TF32 switch (``torch.backends.cuda.matmul.allow_tf32``, not cuDNN's flag);
- shape classes that must not take the stem / block-diagonal schedules.
"""

import dataclasses
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import HAS_CUDA, assert_close_rel, rel_err

import fastres
from fastres.kernels import configs as kcfg
from fastres.kernels.conv import ConvProblem, conv_bias_act_triton, launch_params
from fastres.kernels.head import avgpool_linear_triton, global_avgpool_triton
from fastres.ops.max_pool import max_pool2d

pytestmark = pytest.mark.triton

DEV = "cuda" if HAS_CUDA else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 8e-3}
CL = torch.channels_last


@pytest.fixture(autouse=True)
def _no_tf32():
    """Full fp32 (the exact checks). The legacy flags, set and put back as the other tests do:
    ``_backend.tf32_off`` puts back the per-op settings, and a legacy flag set inside it (as
    the head's TF32 test does) would leave conv and RNN flags that torch refuses to read."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def _out_hw(h, w, r, s, st, pad, dil):
    return ((h + 2 * pad[0] - dil[0] * (r - 1) - 1) // st[0] + 1,
            (w + 2 * pad[1] - dil[1] * (s - 1) - 1) // st[1] + 1)


def _ref(x, wt, b, st, pad, dil, g, res, relu):
    y = F.conv2d(x.double(), wt.double(), None, st, pad, dil, g) + b.double().view(1, -1, 1, 1)
    if res is not None:
        y = y + res.double()
    return torch.relu(y) if relu else y


# -- 16-bit output rounding of the conv epilogue, exactly ----------------------------------

# (name, N, C_in, H, W, C_out, R, S, stride, padding, dilation, groups, kind)
EXACT_SHAPES = [
    ("gemm", 2, 24, 5, 6, 20, 1, 1, (1, 1), (0, 0), (1, 1), 1, "gemm"),
    ("conv", 2, 20, 7, 6, 24, 3, 3, (2, 1), (1, 1), (1, 1), 1, "conv"),
    ("stem", 1, 3, 11, 10, 16, 7, 7, (2, 2), (3, 3), (1, 1), 1, "stem"),
    ("grouped", 1, 64, 5, 5, 64, 3, 3, (1, 1), (1, 1), (1, 1), 16, "grouped"),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", EXACT_SHAPES, ids=[s[0] for s in EXACT_SHAPES])
def test_conv_16bit_store_rounds_to_nearest_exactly(shape, dtype):
    """Kills: the epilogue's store not rounding to nearest even under the interpreter
    (``_to_output(..., INTERPRETED=False)``: Triton's interpreter truncates fp32 -> bf16), or
    any extra rounding before the store (bias/residual added in the 16-bit dtype). Integer
    activations, weights on a 1/8 grid and integer bias/residual make every fp32 partial sum
    exact (all below 2**21 in units of 1/8), so the only rounding is the final one: the output
    must equal the float64 result rounded to ``dtype``, bit for bit."""
    name, n, c, h, w, k, r, s, st, pad, dil, g, kind = shape
    xs = 8 if dtype == torch.bfloat16 else 64  # outputs past the dtype's exact integers
    x = torch.randint(-xs, xs + 1, (n, c, h, w)).to(dtype).to(DEV).contiguous(memory_format=CL)
    wt = (torch.randint(-16, 17, (k, c // g, r, s)) / 8).to(dtype).to(DEV)
    b = torch.randint(-40 * xs, 40 * xs + 1, (k,)).float().to(DEV)
    p, q = _out_hw(h, w, r, s, st, pad, dil)
    res = torch.randint(-200, 201, (n, k, p, q)).to(dtype).to(DEV).contiguous(memory_format=CL)
    prob = ConvProblem.from_tensors(x, wt, st, pad, dil, g, res)
    assert prob.kind == kind
    for relu, rr in ((False, res), (True, None)):
        ref = _ref(x, wt, b, st, pad, dil, g, rr, relu)
        assert ref.abs().max() < 2**18  # exact in fp32 (units of 1/8)
        y = conv_bias_act_triton(x, wt, b, st, pad, dil, g, rr, relu)
        want = ref.to(dtype)
        # the test has teeth: many outputs are not representable in the 16-bit dtype
        assert (want.double() != ref).float().mean() > 0.05
        bad = (y.cpu() != want.cpu()) & ~(torch.isnan(y.cpu()) & torch.isnan(want.cpu()))
        assert not bad.any(), (f"{int(bad.sum())} of {bad.numel()} outputs not rounded to "
                               f"nearest; first at {bad.nonzero()[0].tolist()}")


# -- 16-bit rounding of the head's mean, exactly --------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_head_mean_and_logits_round_to_nearest_exactly(dtype):
    """Kills: the average-pool kernel launched with ``INTERPRETED=False`` (its bf16 store then
    truncates under the interpreter), or the head adding the bias or rounding the logits other
    than once. Integer activations over 2x2 and 4x4 windows: the fp32 mean is exact, so the
    pooled values must be the float64 mean rounded to ``dtype``; weights on a 1/8 grid keep the
    linear layer exact too, so the logits are its float64 result rounded once."""
    for n, c, hw, k in ((2, 40, 2, 24), (1, 20, 4, 9)):
        xs = 700 if dtype == torch.bfloat16 else 2048
        x = torch.randint(-xs, xs + 1, (n, c, hw, hw)).to(dtype).to(DEV).contiguous(
            memory_format=CL)
        pooled_ref = x.double().mean(dim=(2, 3))
        pooled = global_avgpool_triton(x)
        want = pooled_ref.to(dtype)
        assert (want.double() != pooled_ref).float().mean() > 0.05
        assert torch.equal(pooled.cpu(), want.cpu()), "mean not rounded to nearest"
        w = (torch.randint(-8, 9, (k, c)) / 8).to(dtype).to(DEV)
        b = torch.randint(-500, 501, (k,)).to(dtype).float().to(DEV)
        y = avgpool_linear_triton(x, w, b)
        logits = want.double() @ w.double().t() + b.double()
        assert torch.equal(y.cpu(), logits.to(dtype).cpu()), "logits not rounded once"


# -- head: TF32 follows the matmul flag ------------------------------------------------------

def _tf32_nearest(v):
    d = v.double()
    m, e = torch.frexp(d)
    out = torch.ldexp(torch.round(m * 2.0**11), e - 11)
    return torch.where(torch.isfinite(v), out, d)


@pytest.mark.skipif(HAS_CUDA, reason="the interpreter's TF32 emulation")
def test_head_tf32_follows_the_matmul_flag():
    """Kills: the head's linear layer ignoring ``torch.backends.cuda.matmul.allow_tf32``
    (eager ``F.linear``'s flag) or following cuDNN's instead. fp32, matmul flag on and cuDNN's
    off: the result is the float64 product of the TF32-rounded pooled values and weights;
    matmul flag off and cuDNN's on: the exact fp32 product. The inputs are multiples of 1/16
    over a 4x4 window, so the pooled means are exact in fp32 and already TF32 values whatever
    order the kernel sums in: with 3x3 random windows a last-bit difference in one mean could
    tip its TF32 rounding the other way (a 1e-5 miss in CI at one seed in ~1000)."""
    x = (torch.randint(-64, 65, (2, 64, 4, 4)) / 16.0).contiguous(memory_format=CL)
    w = torch.randn(30, 64) * 64**-0.5
    b = torch.randn(30)
    pooled = x.double().mean(dim=(2, 3)).float()
    exact = pooled.double() @ w.double().t() + b.double()
    assert torch.equal(_tf32_nearest(pooled).float(), pooled)
    rounded = pooled.double() @ _tf32_nearest(w).t() + b.double()
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = True, False
    y = avgpool_linear_triton(x, w, b)
    assert_close_rel(y, rounded, 1e-5, "head with TF32")
    assert rel_err(y, exact) > 1e-5  # TF32 rounding really happened
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = False, True
    assert_close_rel(avgpool_linear_triton(x, w, b), exact, 1e-5, "head without TF32")


# -- block-diagonal grouped: the non-finite slow path with per-axis geometry ----------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_grouped_non_finite_slow_path_per_axis_geometry(dtype):
    """Kills: ``_grouped_exact`` (the group-by-group recomputation of a tile holding an inf or
    NaN) ignoring the dilation or using one axis's value for the other's (the existing
    non-finite tests are all square and undilated). Stride (2, 1), padding (2, 1), dilation
    (2, 1), batch 2, residual, with and without ReLU: NaN/inf reach exactly the outputs of their
    own group whose window holds them, and the finite outputs match F.conv2d."""
    n, c, h, w, k, g = 2, 64, 9, 10, 64, 16
    st, pad, dil = (2, 1), (2, 1), (2, 1)
    x = torch.randn(n, c, h, w).to(dtype)
    wt = (torch.randn(k, c // g, 3, 3) * (c // g * 9) ** -0.5).to(dtype)
    b = torch.randn(k)
    p, q = _out_hw(h, w, 3, 3, st, pad, dil)
    res = torch.randn(n, k, p, q).to(dtype)
    x[0, 5, 4, 7] = float("inf")
    x[1, 22, 6, 2] = float("-inf")
    x[1, 47, 4, 9] = float("nan")  # (even rows: dilation 2, stride 2)
    x, wt, res = (t.to(DEV).contiguous(memory_format=CL) for t in (x, wt, res))
    b = b.to(DEV)
    assert ConvProblem.from_tensors(x, wt, st, pad, dil, g, res).kind == "grouped"
    for relu in (True, False):
        y = conv_bias_act_triton(x, wt, b, st, pad, dil, g, res, relu).double().cpu()
        ref = _ref(x, wt, b, st, pad, dil, g, res, relu).cpu()
        assert torch.isnan(ref).any() and torch.isinf(ref).any()
        assert torch.equal(torch.isnan(y), torch.isnan(ref))
        assert torch.equal(torch.isposinf(y), torch.isposinf(ref))
        assert torch.equal(torch.isneginf(y), torch.isneginf(ref))
        fin = torch.isfinite(ref)
        assert_close_rel(y[fin], ref[fin], TOL[dtype])


# -- schedule choice: shapes that must not take the stem / block-diagonal schedules ---------

def test_stem_schedule_not_taken_with_width_dilation():
    """Kills: ``conv_kind`` sending a few-channel conv with dilation along the width to the
    stem schedule, whose kernel-row K step assumes the S*C inputs of a row are contiguous
    (dilation 1 along W). It must run on the implicit-GEMM schedule and be right."""
    st, pad, dil = (2, 1), (3, 2), (1, 2)
    x = torch.randn(1, 3, 13, 14).to(DEV).contiguous(memory_format=CL)
    wt = torch.randn(16, 3, 7, 5).to(DEV) * (3 * 35) ** -0.5
    b = torch.randn(16).to(DEV)
    assert ConvProblem.from_tensors(x, wt, st, pad, dil, 1).kind == "conv"
    y = conv_bias_act_triton(x, wt, b, st, pad, dil, 1, None, True)
    assert_close_rel(y, _ref(x, wt, b, st, pad, dil, 1, None, True), TOL[torch.float32])


def test_block_diagonal_only_for_power_of_two_groups_of_16_channels():
    """Kills: ``conv_kind`` dropping its ``_pow2(k_g)`` or ``gmax * min(c_g, k_g) >= 16``
    conditions. Two groups of 8 -> 12 channels (not a power of two: the slow path's
    ``tl.arange(0, SUB_K)`` cannot be built) and two groups of 4 -> 4 (a packed group of 8
    channels: a dot narrower than the tensor cores' 16) stay on the implicit-GEMM schedule,
    and with a NaN input only its group's windows are NaN."""
    for c, k in ((16, 24), (8, 8)):
        x = torch.randn(1, c, 5, 6)
        x[0, 1, 2, 3] = float("nan")
        x = x.to(DEV).contiguous(memory_format=CL)
        wt = torch.randn(k, c // 2, 3, 3).to(DEV) * (c // 2 * 9) ** -0.5
        b = torch.randn(k).to(DEV)
        prob = ConvProblem.from_tensors(x, wt, 1, 1, 1, 2)
        assert prob.kind == "conv", (c, k, prob.kind)
        # every candidate's GPU launch has tensor-core sized tiles (a TMA block row runs
        # as its twin without TMA on a grouped layer: the twin is in the table)
        for cfg in kcfg.TABLES[prob.kind]:
            if cfg.box_h:
                continue
            params = launch_params(prob, cfg, interpreted=False).params
            assert min(params["BLOCK_M"], params["BLOCK_N"], params["BLOCK_K"]) >= 16
        y = conv_bias_act_triton(x, wt, b, 1, 1, 1, 2, None, False).cpu()
        ref = _ref(x, wt, b, (1, 1), (1, 1), (1, 1), 2, None, False).cpu()
        assert torch.equal(torch.isnan(y), torch.isnan(ref)) and torch.isnan(ref).any()
        fin = ~torch.isnan(ref)
        assert_close_rel(y[fin], ref[fin], TOL[torch.float32])


# -- registration: max-pool with other windows ----------------------------------------------

def test_registered_max_pool_passes_its_window(triton_calls):
    """Kills: the registered ``max_pool2d`` implementation running the stem's 3x3/2/1 window
    whatever it is asked (every other test of the op uses that window). All-negative inputs,
    so a padding of 0 instead of -inf would show too."""
    x = (-torch.rand(2, 12, 9, 8) - 0.5).to(DEV).contiguous(memory_format=CL)
    with fastres.use_backend("triton"):
        for k, s, p in ((2, 2, 0), (3, 1, 1), (5, 2, 2), (1, 1, 0)):
            y = max_pool2d(x, k, s, p)
            assert torch.equal(y, F.max_pool2d(x, k, s, p)), (k, s, p)
    assert triton_calls["pool"] == 4


# -- launcher: a non-contiguous bias ----------------------------------------------------------

def test_conv_reads_a_strided_bias():
    """Kills: the launcher passing a non-contiguous bias (a strided view) to the kernel, which
    reads ``bias[n]`` at ``b_ptr + n``."""
    x = torch.randn(1, 16, 6, 5).to(DEV).contiguous(memory_format=CL)
    wt = torch.randn(24, 16, 3, 3).to(DEV) * (16 * 9) ** -0.5
    b = torch.randn(48).to(DEV)[::2]
    assert not b.is_contiguous()
    y = conv_bias_act_triton(x, wt, b, 1, 1, 1, 1, None, False)
    assert_close_rel(y, _ref(x, wt, b, (1, 1), (1, 1), (1, 1), 1, None, False),
                     TOL[torch.float32])


# -- pruning: the fallback row fits a small shared memory ------------------------------------

def test_prune_fallback_fits_a_small_shared_memory():
    """Kills: the pruner's last resort (no row fits) returning the smallest row without
    trimming its pipeline to the GPU's shared memory."""
    for kind, table in kcfg.TABLES.items():
        for eb in (2, 4):
            limit = 40000
            kept = kcfg.prune(table, kind, 1 << 16, 256, 256 if kind != "stem" else 21, eb,
                              taps=7 if kind == "stem" else 9, smem_limit=limit)
            assert len(kept) >= 1
            for cfg in kept:
                assert kcfg.smem_bytes(cfg, eb) <= limit, (kind, eb, cfg)


def test_prune_drops_fp32_tiles_that_spill_next_to_tf32_operands():
    """Kills: the pruner dropping its fp32 rule (implicit-GEMM and grouped fp32 tiles are
    TF32-rounded in registers: accumulator + A + B tiles past 128 fp32 values per thread
    spill, compile report). The rule has rows to drop (128x128x64 fits shared memory and the
    accumulator limit in fp32) and applies to fp32 only."""
    def tile_vals(cfg):
        return cfg.block_m * cfg.block_n + cfg.block_m * cfg.block_k + cfg.block_k * cfg.block_n

    for kind in ("conv", "grouped"):
        k_ext = 256 if kind == "conv" else 16
        kept32 = kcfg.prune(kcfg.TABLES[kind], kind, 1 << 16, 256 if kind == "conv" else 16,
                            k_ext, 4, taps=9)
        assert kept32 and all(tile_vals(c) <= 128 * 32 * c.num_warps for c in kept32), kind
    kept16 = kcfg.prune(kcfg.CONV_CONFIGS, "conv", 1 << 16, 256, 256, 2, taps=9)
    assert any(tile_vals(c) > 128 * 32 * c.num_warps for c in kept16)  # fp32's rule only


@pytest.mark.parametrize("shape", [
    ("gemm-odd", 2, 20, 4, 5, 24, 1, 1, (1, 1), (0, 0), (1, 1), 1),
    ("conv-odd", 2, 24, 5, 6, 20, 3, 3, (1, 1), (1, 1), (1, 1), 1),
    ("conv-g2-odd", 1, 20, 5, 5, 6, 3, 3, (2, 1), (1, 1), (1, 1), 2),
], ids=lambda s: s[0])
def test_non_finite_input_stays_in_its_windows_channels_off_the_block(shape):
    """Kills: the channel mask of the activation tile dropped when C_in (per group) is not a
    multiple of the channel block (EVEN_C false). The channels past C_in are the next pixel's
    (or the next group's): multiplied by the masked (zero) weights they are harmless when
    finite, but a NaN or inf there makes NaN in outputs whose window does not hold it. The
    random-input tests cannot see it; with non-finite inputs NaN and inf must land exactly
    where F.conv2d puts them."""
    name, n, c, h, w, k, r, s, st, pad, dil, g = shape
    x = torch.randn(n, c, h, w)
    x[0, 0, 1, 2] = float("nan")
    x[n - 1, 0, h - 1, 0] = float("inf")
    x[n - 1, c // g if g > 1 else c - 1, 2, 3] = float("-inf")  # (second group's first)
    x = x.to(DEV).contiguous(memory_format=CL)
    wt = torch.randn(k, c // g, r, s).to(DEV) * (c // g * r * s) ** -0.5
    b = torch.randn(k).to(DEV)
    prob = ConvProblem.from_tensors(x, wt, st, pad, dil, g)
    assert not launch_params(prob, kcfg.INTERPRETER_CONFIG).params["EVEN_C"]
    for config in (None, kcfg.INTERPRETER_CONFIG):
        y = conv_bias_act_triton(x, wt, b, st, pad, dil, g, None, False, config=config)
        y = y.double().cpu()
        ref = _ref(x, wt, b, st, pad, dil, g, None, False).cpu()
        assert torch.equal(torch.isnan(y), torch.isnan(ref)), "NaN outside its windows"
        assert torch.equal(torch.isinf(y), torch.isinf(ref))
        fin = torch.isfinite(ref)
        assert fin.any() and (~fin).any()
        assert_close_rel(y[fin], ref[fin], TOL[torch.float32])


# -- the residual read before the K loop (early_res rows) ----------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [
    ("gemm-odd", 2, 24, 5, 7, 40, 1, 1, (1, 1), (0, 0), (1, 1), 1),
    ("conv-odd", 1, 16, 7, 6, 24, 3, 3, (1, 1), (1, 1), (1, 1), 1),
], ids=lambda s: s[0] if isinstance(s, tuple) else str(s))
def test_early_residual_rows_equal_the_epilogue_load(shape, dtype):
    """Kills: the early residual tile read at the wrong rows or columns, unmasked past M or
    C_out, or added twice (or not at all) in the epilogue. A row with ``early_res`` computes
    the same sums as the row without it, so the outputs are bit-identical, also written in
    place over the residual, with and without ReLU; and right against F.conv2d. Without a
    residual the flag changes nothing (the pruner does not offer those rows then)."""
    name, n, c, h, w, k, r, s, st, pad, dil, g = shape
    x = torch.randn(n, c, h, w).to(dtype).to(DEV).contiguous(memory_format=CL)
    wt = (torch.randn(k, c, r, s) * (c * r * s) ** -0.5).to(dtype).to(DEV)
    b = torch.randn(k).to(DEV)
    p, q = _out_hw(h, w, r, s, st, pad, dil)
    res = torch.randn(n, k, p, q).to(dtype).to(DEV).contiguous(memory_format=CL)
    base = kcfg.KernelConfig(32, 16, 16, 4, 4, 1)  # several M and N blocks, masked edges
    early = kcfg.KernelConfig(32, 16, 16, 4, 4, 1, early_res=True)
    prob = ConvProblem.from_tensors(x, wt, st, pad, dil, g, res)
    assert launch_params(prob, early).params["EARLY_RES"]
    assert not launch_params(prob, base).params["EARLY_RES"]
    assert str(early) == str(base) + " r"
    for relu in (True, False):
        y0 = conv_bias_act_triton(x, wt, b, st, pad, dil, g, res, relu, config=base)
        y1 = conv_bias_act_triton(x, wt, b, st, pad, dil, g, res, relu, config=early)
        assert torch.equal(y0, y1)
        assert_close_rel(y1, _ref(x, wt, b, st, pad, dil, g, res, relu), TOL[dtype])
        acc = res.clone()
        y2 = conv_bias_act_triton(x, wt, b, st, pad, dil, g, acc, relu, config=early, out=acc)
        assert y2.data_ptr() == acc.data_ptr() and torch.equal(y2, y0)
    assert not launch_params(ConvProblem.from_tensors(x, wt, st, pad, dil, g),
                             early).params["EARLY_RES"]


def test_early_residual_rows_offered_only_with_a_residual():
    for has_res in (False, True):
        kept = kcfg.prune(kcfg.GEMM_CONFIGS, "gemm", 256 * 56 * 56, 256, 64, 2, has_res,
                          taps=1)
        assert any(c.early_res for c in kept) == has_res
        assert len(kept) == len(set(kept))
    # fp32 (TF32 operands in registers): the early tile spills on sm_90, never offered
    assert not any(c.early_res for c in kcfg.prune(kcfg.GEMM_CONFIGS, "gemm", 256 * 56 * 56,
                                                    256, 64, 4, True, taps=1))


# -- persistent GEMM rows (programs looping over tiles) ---------------------------------------

# (name, N, C_in, H, W, C_out, residual): M = 70 and 80 output pixels, C_out = 40 (masked last
# blocks, or for TMA rows a last row block past the tensor's end, which TMA must zero on load
# and clip on store); C_in = 24 is not a multiple of block_k (two K steps, the second masked or
# reading 8 channels past the end); 48 is three K steps. 15 tiles of 16x16.
GEMM_TILE_SHAPES = pytest.mark.parametrize("shape", [
    ("odd", 2, 24, 5, 7, 40, True),
    ("even-k", 2, 48, 5, 8, 40, False),
], ids=lambda s: s[0] if isinstance(s, tuple) else str(s))


def _gemm_case(shape, dtype, sms, monkeypatch):
    """(x, weight, bias, residual or None) of a GEMM_TILE_SHAPES case, fresh random, with the
    launcher seeing ``sms`` multiprocessors (the persistent grids)."""
    from fastres.kernels import conv as kconv

    name, n, c, h, w, k, with_res = shape
    monkeypatch.setattr(kconv, "device_sm_count", lambda: sms)
    x = torch.randn(n, c, h, w).to(dtype).to(DEV).contiguous(memory_format=CL)
    wt = (torch.randn(k, c, 1, 1) * c ** -0.5).to(dtype).to(DEV)
    b = torch.randn(k).to(DEV)
    res = (torch.randn(n, k, h, w).to(dtype).to(DEV).contiguous(memory_format=CL)
           if with_res else None)
    return x, wt, b, res


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("sms", [1, 3, 32])
@GEMM_TILE_SHAPES
def test_persistent_rows_equal_one_program_per_tile(shape, sms, dtype, monkeypatch):
    """Kills: a persistent program that skips or repeats tiles (wrong start or stride of the
    tile loop), an epilogue that writes to the tile of the K loop's counter rather than its
    own, masks of the first tile reused for later ones, K steps that leak from one tile's
    accumulator into the next. With 1 or 3 programs looping over the 15 tiles of 16x16 (and
    with 32 SMs, one program per tile), the output is bit-identical to one program per
    tile, also written in place over the residual, and right against F.conv2d."""
    x, wt, b, res = _gemm_case(shape, dtype, sms, monkeypatch)
    n, k, h, w = x.shape[0], wt.shape[0], x.shape[2], x.shape[3]
    base = kcfg.KernelConfig(16, 16, 16, 4, 4, 1)
    pers = kcfg.KernelConfig(16, 16, 16, 4, 4, 1, persistent=1)
    assert str(pers) == str(base) + " p1"
    prob = ConvProblem.from_tensors(x, wt, 1, 0, 1, 1, res)
    lp = launch_params(prob, pers)
    tiles = launch_params(prob, base).grid[0]
    assert tiles == 15 and lp.params["PERSISTENT"] and lp.grid == (min(tiles, sms), 1)
    for relu in (True, False):
        poisoned = torch.full((n, k, h, w), float("nan"), dtype=dtype, device=DEV)
        poisoned = poisoned.contiguous(memory_format=CL)
        y0 = conv_bias_act_triton(x, wt, b, 1, 0, 1, 1, res, relu, config=base)
        y1 = conv_bias_act_triton(x, wt, b, 1, 0, 1, 1, res, relu, config=pers, out=poisoned)
        assert torch.equal(y0, y1)
        y64 = conv_bias_act_triton(x, wt, b, 1, 0, 1, 1, res, relu, config=pers, index64=True)
        assert torch.equal(y64, y0)  # 64-bit offsets (forced): the same tiles
        assert_close_rel(y1, _ref(x, wt, b, (1, 1), (0, 0), (1, 1), 1, res, relu), TOL[dtype])
        if res is not None:
            acc = res.clone()
            y2 = conv_bias_act_triton(x, wt, b, 1, 0, 1, 1, acc, relu, config=pers, out=acc)
            assert y2.data_ptr() == acc.data_ptr() and torch.equal(y2, y0)


def test_persistent_rows_offered_for_large_gemms_only(monkeypatch):
    """A persistent row is offered for 1x1 GEMMs with at least two tiles per program, when
    its programs fit an SM together, and runs nothing else (a clear error). (With a Triton
    that pipelines their loop: see the next test.)"""
    monkeypatch.setattr(kcfg, "POINTER_PERSISTENT", True)
    big = kcfg.prune(kcfg.GEMM_CONFIGS, "gemm", 256 * 56 * 56, 256, 64, 2, True, taps=1)
    assert {c.persistent for c in big} == {0, 1, 2}
    assert all(c in kcfg.GEMM_CONFIGS for c in big if c.persistent)  # depth kept whole
    small = kcfg.prune(kcfg.GEMM_CONFIGS, "gemm", 49, 2048, 512, 2, True, taps=1)
    assert not any(c.persistent for c in small)
    # 24 SMs: 64 tiles of 128x128 are two or more per program at one program per SM (24
    # programs), not at two (48)
    few = kcfg.prune(kcfg.GEMM_CONFIGS, "gemm", 1024, 1024, 64, 2, False, taps=1, sms=24)
    assert {c.persistent for c in few if c.block_m * c.block_n == 128 * 128} == {0, 1}
    # 80 KiB of shared memory per block: no two 96 KiB programs per SM
    tight = kcfg.prune(kcfg.GEMM_CONFIGS, "gemm", 256 * 56 * 56, 256, 64, 2, False, taps=1,
                       smem_limit=160 * 1024)
    assert not any(c.persistent == 2 for c in tight)
    assert not any(c.persistent for c in kcfg.prune(kcfg.CONV_CONFIGS, "conv", 256 * 56 * 56,
                                                     256, 64, 2, False, taps=9))
    x = torch.randn(1, 16, 6, 6).to(DEV)
    wt = torch.randn(16, 16, 3, 3).to(DEV)
    with pytest.raises(ValueError, match="persistent.*gemm"):
        conv_bias_act_triton(x, wt, torch.zeros(16).to(DEV), 1, 1, 1, 1,
                             config=kcfg.KernelConfig(16, 16, 16, 4, 4, 1, persistent=1))


def test_pointer_persistent_rows_only_where_triton_pipelines_them(monkeypatch):
    """Triton 3.6 does not pipeline the flattened loop of the pointer persistent rows (the
    compile report under it: synchronous loads), 3.8 does: ``POINTER_PERSISTENT`` follows the
    installed version, and without it only the TMA persistent rows are offered."""
    import triton

    major, minor = (int(v) for v in triton.__version__.split(".")[:2])
    assert kcfg.POINTER_PERSISTENT == ((major, minor) >= (3, 8))
    args = ("gemm", 256 * 56 * 56, 256, 64, 2, False)
    monkeypatch.setattr(kcfg, "POINTER_PERSISTENT", False)
    rows = kcfg.prune(kcfg.GEMM_CONFIGS, *args, taps=1)
    assert {c.persistent for c in rows if c.tma} == {0, 1, 2}
    assert not any(c.persistent and not c.tma for c in rows)
    monkeypatch.setattr(kcfg, "POINTER_PERSISTENT", True)
    rows = kcfg.prune(kcfg.GEMM_CONFIGS, *args, taps=1)
    assert {c.persistent for c in rows if not c.tma} == {0, 1, 2}


# -- TMA GEMM rows (tiles moved by tensor descriptors) ----------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("sms", [1, 3, 32])
@GEMM_TILE_SHAPES
def test_tma_rows_equal_the_pointer_kernel(shape, sms, dtype, monkeypatch):
    """Kills: a descriptor whose shape or strides are not the tensor's (rows or channels read
    from the next pixel, out-of-bounds rows stored over the next image), the weight block
    loaded untransposed, the epilogue storing to the K loop's tile rather than its own, a
    residual or bias read from another tile, ReLU dropped. One program per tile and
    persistent programs (1 or 3 looping over 15 tiles), into a NaN-poisoned output and in
    place over the residual: against the pointer kernel and F.conv2d."""
    from fastres.kernels import conv as kconv

    monkeypatch.setattr(kconv, "TMA_ENABLED", True)  # (whatever FASTRES_TMA says)
    x, wt, b, res = _gemm_case(shape, dtype, sms, monkeypatch)
    n, k, h, w = x.shape[0], wt.shape[0], x.shape[2], x.shape[3]
    base = kcfg.KernelConfig(16, 16, 16, 4, 4, 1)
    prob = ConvProblem.from_tensors(x, wt, 1, 0, 1, 1, res)
    for tma in (kcfg.KernelConfig(16, 16, 16, 4, 4, 1, tma=True),
                kcfg.KernelConfig(16, 16, 16, 4, 4, 1, persistent=1, tma=True)):
        assert str(tma).endswith(" t")
        # these tensors take TMA (the launch below is the TMA kernel, not the fallback)
        assert kconv._tma_ready(tma, prob, x, wt, x if res is None else res) is tma
        lp = launch_params(prob, tma)
        assert lp.params["TMA"] and lp.grid[0] == (min(15, sms) if tma.persistent else 15)
        for relu in (True, False):
            poisoned = torch.full((n, k, h, w), float("nan"), dtype=dtype, device=DEV)
            poisoned = poisoned.contiguous(memory_format=CL)
            y0 = conv_bias_act_triton(x, wt, b, 1, 0, 1, 1, res, relu, config=base)
            y1 = conv_bias_act_triton(x, wt, b, 1, 0, 1, 1, res, relu, config=tma,
                                      out=poisoned)
            ref = _ref(x, wt, b, (1, 1), (0, 0), (1, 1), 1, res, relu)
            assert_close_rel(y1, ref, TOL[dtype])
            # the same products summed in the same K order: equal to the pointer kernel
            # but for the last bit (the dot's own summation order within a block)
            assert rel_err(y1, y0) <= TOL[dtype] / 4
            if res is not None:
                acc = res.clone()
                y2 = conv_bias_act_triton(x, wt, b, 1, 0, 1, 1, acc, relu, config=tma, out=acc)
                assert y2.data_ptr() == acc.data_ptr() and torch.equal(y2, y1)


def test_tma_rows_fall_back_where_descriptors_cannot_be_made(monkeypatch):
    """A TMA row on tensors a descriptor cannot describe runs the same row without TMA, and
    right: an activation 2 bytes off 16-byte alignment, channel counts that are not multiples
    of 8 (rows not whole 16-byte multiples), fp32; and a TMA row on a 3x3 layer is an error,
    not a silent fallback (the tuner never offers one), in any dtype."""
    from fastres.kernels import conv as kconv

    monkeypatch.setattr(kconv, "TMA_ENABLED", True)
    tma = kcfg.KernelConfig(16, 16, 16, 4, 4, 1, tma=True)
    dtype = torch.float16
    big = torch.randn(2 * 16 * 5 * 6 + 1).to(dtype).to(DEV)
    x_off = big[1:].view(2, 5, 6, 16).permute(0, 3, 1, 2)  # channels-last, 2 bytes off
    assert x_off.is_contiguous(memory_format=CL) and x_off.data_ptr() % 16 == 2
    cases = [(x_off, torch.randn(24, 16, 1, 1)),
             (torch.randn(2, 12, 5, 6), torch.randn(24, 12, 1, 1)),  # C_in 12
             (torch.randn(2, 16, 5, 6), torch.randn(20, 16, 1, 1))]  # C_out 20
    for x, wt in cases:
        x = x.to(dtype).to(DEV).contiguous(memory_format=CL)
        wt = (wt * x.shape[1] ** -0.5).to(dtype).to(DEV)
        b = torch.randn(wt.shape[0]).to(DEV)
        prob = ConvProblem.from_tensors(x, wt, 1, 0, 1, 1, None)
        out = torch.empty(2, wt.shape[0], 5, 6, dtype=dtype, device=DEV).contiguous(
            memory_format=CL)
        assert kconv._tma_ready(tma, prob, x, wt, out) == kcfg.KernelConfig(16, 16, 16, 4, 4, 1)
        y = conv_bias_act_triton(x, wt, b, 1, 0, 1, 1, None, True, config=tma)
        assert_close_rel(y, _ref(x, wt, b, (1, 1), (0, 0), (1, 1), 1, None, True), TOL[dtype])
    x = torch.randn(2, 16, 5, 6).to(DEV)  # fp32: its TF32 rounding is the pointer kernel's
    wt = torch.randn(24, 16, 1, 1).to(DEV)
    prob = ConvProblem.from_tensors(x, wt, 1, 0, 1, 1, None)
    assert not kconv._tma_ready(tma, prob, x, wt, x).tma
    assert kconv._tma_ready(tma, ConvProblem.from_tensors(x.half(), wt.half(), 1, 0, 1, 1, None),
                            x.half(), wt.half()).tma
    for dt in (torch.float16, torch.float32):  # (fp32 could not take TMA either: raises too)
        with pytest.raises(ValueError, match="TMA.*gemm"):
            conv_bias_act_triton(x.to(dt), torch.randn(16, 16, 3, 3).to(dt).to(DEV),
                                 torch.zeros(16).to(DEV), 1, 1, 1, 1, config=tma)


def test_tma_rows_offered_for_aligned_16_bit_gemms_only():
    """TMA rows are candidates for 1x1 stride-1 GEMMs in fp16/bf16 whose channel counts are
    multiples of 8, never for fp32, other schedules, or odd channel counts; their shared
    memory estimate counts the output (and residual) tile they stage."""
    kept = kcfg.prune(kcfg.GEMM_CONFIGS, "gemm", 256 * 56 * 56, 256, 64, 2, False, taps=1)
    assert {c.persistent for c in kept if c.tma} == {0, 1, 2}
    # with a residual tile staged too, two 4-stage 128x64 programs no longer fit one SM
    kept = kcfg.prune(kcfg.GEMM_CONFIGS, "gemm", 256 * 56 * 56, 256, 64, 2, True, taps=1)
    assert {c.persistent for c in kept if c.tma} == {0, 1}
    for args in [(256 * 56 * 56, 256, 64, 4, True),  # fp32
                 (256 * 56 * 56, 256, 60, 2, True),  # C_in 60
                 (256 * 56 * 56, 260, 64, 2, False)]:  # C_out 260
        assert not any(c.tma for c in kcfg.prune(kcfg.GEMM_CONFIGS, "gemm", *args, taps=1))
    assert not any(c.tma for c in kcfg.prune(kcfg.GEMM_CONFIGS, "conv", 256 * 28 * 28, 256,
                                               256, 2, False, taps=9))
    row = kcfg.KernelConfig(128, 128, 64, 8, 8, 3, tma=True)
    plain = kcfg.smem_bytes(kcfg.KernelConfig(128, 128, 64, 8, 8, 3), 2)
    assert kcfg.smem_bytes(row, 2) == plain + 128 * 128 * 2
    assert kcfg.smem_bytes(row, 2, has_res=True) == plain + 2 * 128 * 128 * 2


# -- TMA block rows of the implicit-GEMM schedule (one group, strides dividing the input) ----

# (name, N, C_in, H, W, C_out, kernel (R, S), stride, padding, dilation, residual): output
# sizes that are not whole blocks (4x8 blocks at 32-row tiles), zero and wider padding,
# dilation 2, stride 2 (3x3 and 1x1: the input seen as [N, H/2, 2, W/2, 2*C]), (2, 1) and
# (1, 2), C_out not a multiple of the 16-wide N tile, and kernels, paddings and dilations
# that differ between the axes (a row quantity used for columns shows)
BOX_SHAPES = pytest.mark.parametrize("shape", [
    ("pad1-odd", 2, 32, 7, 9, 24, (3, 3), (1, 1), (1, 1), (1, 1), True),
    ("pad2-dil2", 1, 16, 5, 11, 48, (3, 3), (1, 1), (2, 2), (2, 2), False),
    ("pad0", 2, 16, 6, 6, 16, (3, 3), (1, 1), (0, 0), (1, 1), True),
    ("s2", 2, 32, 10, 18, 24, (3, 3), (2, 2), (1, 1), (1, 1), True),
    ("s2x1-dil2", 1, 16, 8, 7, 16, (3, 3), (2, 1), (2, 2), (2, 2), False),
    ("s1x2", 1, 16, 7, 8, 16, (3, 3), (1, 2), (1, 1), (1, 1), True),
    ("1x1s2", 2, 16, 12, 10, 40, (1, 1), (2, 2), (0, 0), (1, 1), True),
    ("1x3-pad0x1", 1, 16, 6, 9, 16, (1, 3), (1, 1), (0, 1), (1, 1), True),
    ("3x1-dil2x1", 1, 16, 9, 6, 24, (3, 1), (1, 1), (2, 0), (2, 1), False),
    ("5x3-pad2x1-s2x1", 2, 16, 10, 7, 16, (5, 3), (2, 1), (2, 1), (1, 2), True),
    # three images: blocks of two images in turn, the last with its second one missing
    ("n3-s2", 3, 16, 6, 10, 24, (3, 3), (2, 2), (1, 1), (1, 1), True),
], ids=lambda s: s[0] if isinstance(s, tuple) else str(s))


def _box_case(shape, dtype):
    name, n, c, h, w, k, (r, s), stride, pad, dil, with_res = shape
    x = torch.randn(n, c, h, w).to(dtype).to(DEV).contiguous(memory_format=CL)
    wt = (torch.randn(k, c, r, s) * (r * s * c) ** -0.5).to(dtype).to(DEV)
    b = torch.randn(k).to(DEV)
    p, q = _out_hw(h, w, r, s, stride, pad, dil)
    res = (torch.randn(n, k, p, q).to(dtype).to(DEV).contiguous(memory_format=CL)
           if with_res else None)
    return x, wt, b, res, stride, pad, dil


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@BOX_SHAPES
def test_tma_block_rows_equal_f_conv2d(shape, dtype, monkeypatch):
    """Kills: a box at the wrong tap offset (padding, dilation or stride ignored, r and s
    swapped, a negative offset's phase rounded toward zero, the row stride applied to
    columns), a halo read from the neighbouring row or image instead of zeros, a block
    decomposition
    that skips or repeats pixels (rows and columns of blocks swapped, the image index
    wrong), the weight block of another tap, an output block stored past the image's edge
    (over the next image's pixels), residual or bias of another block, ReLU dropped. Into
    a NaN-poisoned output and in place over the residual: against F.conv2d in float64 and
    the pointer kernel."""
    from fastres.kernels import conv as kconv

    monkeypatch.setattr(kconv, "TMA_ENABLED", True)  # (whatever FASTRES_TMA says)
    x, wt, b, res, stride, pad, dil = _box_case(shape, dtype)
    args = (stride, pad, dil, 1)
    prob = ConvProblem.from_tensors(x, wt, *args, res)
    assert prob.kind == "conv"
    p, q = prob.pq
    n, k = x.shape[0], wt.shape[0]
    base = kcfg.KernelConfig(32, 16, 16, 4, 4, 1)
    for row in (kcfg.KernelConfig(32, 16, 16, 4, 4, 1, tma=True, box_h=4),
                kcfg.KernelConfig(32, 16, 16, 4, 4, 1, tma=True, box_h=2),
                kcfg.KernelConfig(32, 16, 16, 4, 4, 1, tma=True, box_h=1),  # one row
                # blocks of two images (a batch of one: the second is past the batch)
                kcfg.KernelConfig(32, 16, 16, 4, 4, 1, tma=True, box_h=2, box_n=2)):
        bw = 32 // (row.box_n * row.box_h)
        images = f"{row.box_n}x" if row.box_n > 1 else ""
        assert str(row).endswith(f" t{images}{row.box_h}x{bw}")
        # these tensors take TMA (the launch below is the block kernel, not the fallback)
        assert kconv._tma_ready(row, prob, x, wt, x if res is None else res) is row
        lp = launch_params(prob, row)
        assert lp.params["BOX_H"] == row.box_h and lp.params["TMA"]
        assert lp.params["BOX_N"] == row.box_n
        assert lp.grid == (-(-n // row.box_n) * -(-p // row.box_h) * -(-q // bw) * -(-k // 16),
                           1)
        for relu in (True, False):
            poisoned = torch.full((n, k, p, q), float("nan"), dtype=dtype, device=DEV)
            poisoned = poisoned.contiguous(memory_format=CL)
            y0 = conv_bias_act_triton(x, wt, b, *args, res, relu, config=base)
            y1 = conv_bias_act_triton(x, wt, b, *args, res, relu, config=row, out=poisoned)
            assert_close_rel(y1, _ref(x, wt, b, stride, pad, dil, 1, res, relu), TOL[dtype])
            assert rel_err(y1, y0) <= TOL[dtype] / 4  # the same products in the same K order
            if res is not None:
                acc = res.clone()
                y2 = conv_bias_act_triton(x, wt, b, *args, acc, relu, config=row, out=acc)
                assert y2.data_ptr() == acc.data_ptr() and torch.equal(y2, y1)


@pytest.mark.parametrize("shape", [
    # (N, C_in, H = W, C_out, kernel, stride, padding, dilation, residual): small
    # ResNet-like layers, including outputs narrower than a block and C_out under BLOCK_N
    (1, 64, 16, 64, 3, 1, 1, 1, False), (1, 64, 14, 128, 3, 1, 1, 1, True),
    (1, 64, 12, 64, 3, 1, 2, 2, False), (1, 64, 7, 128, 3, 1, 1, 1, True),
    (1, 64, 16, 64, 3, 2, 1, 1, False), (1, 64, 12, 128, 1, 2, 0, 1, False),
], ids=lambda s: "x".join(str(v) for v in s[:6]))
def test_tma_block_table_rows_at_their_own_tile_sizes(shape, monkeypatch):
    """Every block row of the table as the GPU would run it (its own BLOCK_M/N/K, 8x16, 8x8,
    16x16 and 1x64 boxes, and 8x8 boxes of 2 and 4 images, of which a batch of one fills
    the first), under the interpreter on small layers: bf16 against F.conv2d, into a
    NaN-poisoned output, and in place over the residual."""
    from fastres.kernels import conv as kconv

    monkeypatch.setattr(kconv, "TMA_ENABLED", True)
    dtype = torch.bfloat16
    n, c, hw, k, r, st, pad, dil, with_res = shape
    geo = ((st, st), (pad, pad), (dil, dil))
    pq = _out_hw(hw, hw, r, r, *geo)
    rows = [row for row in kcfg.CONV_CONFIGS if row.box_h]
    assert {row.box_h for row in rows} == {16, 8, 1}
    assert {row.box_n for row in rows} == {1, 2, 4}
    for row in rows:
        x = torch.randn(n, c, hw, hw).to(dtype).to(DEV).contiguous(memory_format=CL)
        wt = (torch.randn(k, c, r, r) * (r * r * c) ** -0.5).to(dtype).to(DEV)
        b = torch.randn(k).to(DEV)
        res = (torch.randn(n, k, *pq).to(dtype).to(DEV).contiguous(memory_format=CL)
               if with_res else None)
        out = torch.full((n, k, *pq), float("nan"), dtype=dtype, device=DEV).contiguous(
            memory_format=CL)
        prob = ConvProblem.from_tensors(x, wt, *geo, 1, res)
        assert kconv._tma_ready(row, prob, x, wt, out) is row  # the block kernel runs
        y = conv_bias_act_triton(x, wt, b, *geo, 1, res, True, config=row, out=out)
        assert_close_rel(y, _ref(x, wt, b, *geo, 1, res, True), TOL[dtype], str(row))
        if res is not None:
            acc = res.clone()
            conv_bias_act_triton(x, wt, b, *geo, 1, acc, True, config=row, out=acc)
            assert torch.equal(acc, y)


def test_tma_block_rows_fall_back_or_refuse(monkeypatch):
    """A block row runs as its twin without TMA (and right) where a descriptor cannot be made,
    where its boxes do not fit the input (grouped implicit GEMMs, a stride that does not
    divide the input's size), or where a channel block would run into the next tap's
    weights: an activation 2 bytes off 16-byte alignment, C_in or C_out not multiples of 8,
    C_in not a whole number of channel blocks, stride 2 on 5 rows or 5 columns, 3 groups,
    fp32. It is an error, not a silent fallback, on another schedule's problem (a GEMM,
    block-diagonal grouped: the tuner never offers one there) and where block_m is not box_h
    times a power of two."""
    from fastres.kernels import conv as kconv

    monkeypatch.setattr(kconv, "TMA_ENABLED", True)
    row = kcfg.KernelConfig(32, 16, 16, 4, 4, 1, tma=True, box_h=4)
    twin = kcfg.KernelConfig(32, 16, 16, 4, 4, 1)
    dtype = torch.float16
    big = torch.randn(2 * 16 * 5 * 6 + 1).to(dtype).to(DEV)
    x_off = big[1:].view(2, 5, 6, 16).permute(0, 3, 1, 2)  # channels-last, 2 bytes off
    assert x_off.is_contiguous(memory_format=CL) and x_off.data_ptr() % 16 == 2
    cases = [(x_off, torch.randn(24, 16, 3, 3), 1, 1),
             (torch.randn(2, 20, 5, 6), torch.randn(24, 20, 3, 3), 1, 1),  # C_in 20
             # 24 = 1.5 blocks of 16
             (torch.randn(2, 24, 5, 6), torch.randn(24, 24, 3, 3), 1, 1),
             (torch.randn(2, 16, 5, 6), torch.randn(20, 16, 3, 3), 1, 1),  # C_out 20
             (torch.randn(2, 16, 5, 6), torch.randn(24, 16, 3, 3), 2, 1),  # 2 into 5 rows
             (torch.randn(2, 16, 6, 5), torch.randn(24, 16, 3, 3), 2, 1),  # 2 into 5 columns
             (torch.randn(2, 16, 6, 5), torch.randn(24, 16, 3, 3), (1, 2), 1),
             (torch.randn(2, 48, 5, 6), torch.randn(48, 16, 3, 3), 1, 3)]  # 3 groups
    for x, wt, stride, groups in cases:
        x = x.to(dtype).to(DEV).contiguous(memory_format=CL)
        wt = (wt * (9 * wt.shape[1]) ** -0.5).to(dtype).to(DEV)
        b = torch.randn(wt.shape[0]).to(DEV)
        prob = ConvProblem.from_tensors(x, wt, stride, 1, 1, groups, None)
        assert prob.kind == "conv"
        p, q = prob.pq
        out = torch.empty(2, wt.shape[0], p, q, dtype=dtype, device=DEV).contiguous(
            memory_format=CL)
        assert kconv._tma_ready(row, prob, x, wt, out) == twin
        y = conv_bias_act_triton(x, wt, b, stride, 1, 1, groups, None, True, config=row)
        st = stride if isinstance(stride, tuple) else (stride, stride)
        assert_close_rel(y, _ref(x, wt, b, st, (1, 1), (1, 1), groups, None,
                                 True), TOL[dtype])
    x = torch.randn(2, 16, 5, 6).to(DEV)
    wt = torch.randn(16, 16, 3, 3).to(DEV)
    assert kconv._tma_ready(row, ConvProblem.from_tensors(x, wt, 1, 1, 1, 1, None), x,
                            wt) == twin  # fp32
    refused = [(2, torch.randn(16, 8, 3, 3), 1, "grouped"),  # block-diagonal
               (1, torch.randn(16, 16, 1, 1), 0, "gemm")]  # (the GEMM's TMA rows: no block)
    for groups, w, pad, kind in refused:
        assert ConvProblem.from_tensors(x, w, 1, pad, 1, groups, None).kind == kind
        for dt in (torch.float16, torch.float32):
            with pytest.raises(ValueError, match="one-group implicit-GEMM convolutions"):
                conv_bias_act_triton(x.to(dt), w.to(dt).to(DEV), torch.zeros(16).to(DEV),
                                     1, pad, 1, groups, config=row)
    # a partial channel block (the launcher's fallback never lets one reach the kernel)
    partial = ConvProblem.from_tensors(torch.empty(2, 24, 5, 6, dtype=torch.float16),
                                       torch.empty(16, 24, 3, 3, dtype=torch.float16), 1, 1, 1,
                                       1, None)
    with pytest.raises(ValueError, match="24 input channels are not a whole number of 16"):
        launch_params(partial, row)
    for bad in (kcfg.KernelConfig(48, 16, 16, 4, 4, 1, tma=True, box_h=4),
                kcfg.KernelConfig(48, 16, 16, 4, 4, 1, tma=True, box_h=2, box_n=3),
                kcfg.KernelConfig(32, 16, 16, 4, 4, 1, tma=True, box_h=4, box_n=16)):
        with pytest.raises(ValueError, match=f"not box_n {bad.box_n} .* times box_h "
                                             f"{bad.box_h} times a power of two"):
            conv_bias_act_triton(x.half(), wt.half(), torch.zeros(16).to(DEV), 1, 1, 1, 1,
                                 config=bad)


def test_tma_block_rows_offered_where_their_blocks_fit():
    """Block rows are candidates for 16-bit, one-group implicit GEMMs whose strides divide the input
    (``box`` given) whose channels are whole blocks and multiples of 8, and only rows whose
    blocks waste at most a quarter of the pixels they compute: at 56x56, 28x28 and 14x14 the
    8x16, 16x16 and 8x8 blocks of 2 and 4 images (12.5% and 23% wasted), at 56x56 also the
    1x64 row (12.5%; at 28x28 it would waste 56%), at 7x7 the 8x8 blocks, of 1, 2 and 4
    images (8x16 would waste 62%). The waste counts the images a batch leaves missing in its
    last block of several (batch 1: half of a two-image block). Never without ``box``, for
    fp32, C_in or C_out not multiples of 8, or a partial channel block; a GEMM is never
    offered one."""
    def boxes(m_hw, c=256, k=256, eb=2, box=True, kind="conv", table=kcfg.CONV_CONFIGS,
              images=256):
        h, w = m_hw
        return {str(r).split()[-1] for r in kcfg.prune(
            table, kind, images * h * w, k, c, eb, taps=9 if kind == "conv" else 1,
            box=(h, w) if box else None) if r.box_h}

    # 64 outputs: the 128x64 and 256x64 block rows and the 64x64 one-row box only
    assert boxes((56, 56), c=64, k=64) == {"t8x16", "t16x16", "t1x64"}
    several = {"t2x8x8", "t4x8x8"}
    assert boxes((28, 28)) == boxes((14, 14)) == {"t8x16", "t8x8", "t16x16"} | several
    assert boxes((7, 7), c=512, k=512) == {"t8x8"} | several
    assert boxes((7, 7), c=512, k=512, images=1) == {"t8x8"}
    assert boxes((7, 7), c=512, k=512, images=3) == {"t8x8"}  # t2x8x8: 147 pixels in 256
    assert boxes((7, 7), c=512, k=512, images=6) == {"t8x8", "t2x8x8"}  # 294 in 384, 512
    two_images = kcfg.KernelConfig(32, 16, 16, tma=True, box_h=2, box_n=2)  # 2 x 2x8
    assert kcfg.box_waste_ok(two_images, (2, 6), images=4)  # 4 x 12 computed as 4 x 16
    assert not kcfg.box_waste_ok(two_images, (2, 6), images=3)  # 3 x 12 of 4 x 16
    assert kcfg.box_waste_ok(kcfg.KernelConfig(128, 64, 64, tma=True, box_h=8), (56, 56))
    assert not kcfg.box_waste_ok(kcfg.KernelConfig(128, 64, 64, tma=True, box_h=8), (7, 7))
    two_by_four = kcfg.KernelConfig(8, 16, 16, tma=True, box_h=2)
    assert kcfg.box_waste_ok(two_by_four, (3, 4))  # 16 computed for 12: a quarter, kept
    assert not kcfg.box_waste_ok(two_by_four, (3, 3))
    assert not boxes((28, 28), box=False)
    assert not boxes((28, 28), eb=4)
    assert not boxes((28, 28), c=200)  # a multiple of 8, not of the 64-channel block
    assert not boxes((28, 28), c=100) and not boxes((28, 28), k=260)
    assert not boxes((28, 28), kind="gemm", table=kcfg.GEMM_CONFIGS + kcfg.CONV_CONFIGS)
    for row in kcfg.CONV_CONFIGS:  # every block row's twin without TMA is in the table
        if row.box_h:
            assert dataclasses.replace(row, tma=False, box_h=0, box_n=1) in kcfg.CONV_CONFIGS


def test_tma_block_rows_for_resnet_layers(monkeypatch):
    """What the launcher offers a GPU: ResNet-50's 3x3 layers (stride 1 and 2), its 1x1/2
    downsampling layers and the dilated layers of a dilated backbone get block rows in 16-bit
    (and not with FASTRES_TMA=0); a stride-2 layer on an odd size, grouped layers and fp32
    none."""
    from fastres.kernels import conv as kconv

    monkeypatch.setattr(kconv, "_interpreted", lambda: False)  # the GPU's candidate list
    monkeypatch.setattr(kconv, "TMA_ENABLED", True)

    def offered(c, hw, k, stride=1, pad=1, dil=1, dtype=torch.bfloat16, groups=1, r=3):
        prob = ConvProblem(256, c, hw, hw, k, r, r, (stride, stride), (pad, pad), (dil, dil),
                           groups, dtype, has_res=False, relu=True, tf32=False)
        return [str(r) for r in kconv.problem_configs(prob) if r.box_h]

    assert offered(64, 56, 64) and offered(256, 14, 256) and offered(512, 7, 512)
    assert offered(512, 28, 512, pad=4, dil=4)  # DeepLab-style dilated layer4
    assert offered(128, 56, 128, stride=2) and offered(512, 14, 512, stride=2)
    assert offered(256, 56, 512, stride=2, pad=0, r=1)
    assert not offered(128, 57, 128, stride=2)
    assert not offered(128, 56, 128, groups=32)
    assert not offered(256, 14, 256, dtype=torch.float32)
    monkeypatch.setattr(kconv, "TMA_ENABLED", False)
    assert not offered(256, 14, 256)


def test_tma_switched_off(monkeypatch):
    """``FASTRES_TMA=0`` (``conv.TMA_ENABLED``): no TMA row among the candidates, and a
    remembered TMA row runs as its twin without TMA."""
    from fastres.kernels import conv as kconv

    prob = ConvProblem(256, 64, 56, 56, 256, 1, 1, (1, 1), (0, 0), (1, 1), 1, torch.float16,
                       has_res=True, relu=True, tf32=False)
    monkeypatch.setattr(kconv, "_interpreted", lambda: False)  # the GPU's candidate list
    on = kconv.problem_configs(prob)
    assert any(c.tma for c in on)
    x = torch.empty(0, dtype=torch.float16)
    tma = kcfg.KernelConfig(128, 128, 64, 8, 8, 3, tma=True)
    assert kconv._tma_ready(tma, prob, x) is tma
    monkeypatch.setattr(kconv, "TMA_ENABLED", False)
    assert kconv.problem_configs(prob) == [c for c in on if not c.tma]
    assert kconv._tma_ready(tma, prob, x) == kcfg.KernelConfig(128, 128, 64, 8, 8, 3)


def test_tuner_offered_no_tma_row_that_would_run_without_tma(monkeypatch):
    """A TMA row runs as its twin without TMA on an operand that is not 16-byte aligned
    (``_tma_ready``). The candidates of such a call (the engine's, ``conv_configs``, and the
    launcher's own tuner's) leave those rows out, so no tuner times the twin under the TMA
    row's label and remembers a TMA row it never ran. Operands the launcher copies
    (not channels-last, or of another dtype) are aligned copies and take TMA."""
    from fastres.kernels import conv as kconv
    from fastres import tuning

    monkeypatch.setattr(kconv, "_interpreted", lambda: False)  # the GPU's candidate list
    monkeypatch.setattr(kconv, "TMA_ENABLED", True)
    dt = torch.bfloat16

    def cl(n, c, h, w, offset=0):  # channels-last contiguous, ``offset`` elements in
        buf = torch.randn(n * c * h * w + 8).to(dt)
        return buf[offset:offset + n * c * h * w].view(n, h, w, c).permute(0, 3, 1, 2)

    for c, k, r, hw in [(64, 64, 3, 56), (256, 64, 1, 56)]:  # block rows; GEMM TMA rows
        x, xu = cl(2, c, hw, hw), cl(2, c, hw, hw, offset=1)
        assert xu.data_ptr() % 16 and xu.is_contiguous(memory_format=CL)
        wt = torch.randn(k, c, r, r).to(dt)
        res, resu = cl(2, k, hw, hw), cl(2, k, hw, hw, offset=3)
        aligned = kconv.conv_configs(x, wt, 1, r // 2, 1, 1, res)
        plain = [cfg for cfg in aligned if not cfg.tma]
        assert len(plain) < len(aligned)
        assert kconv.conv_configs(xu, wt, 1, r // 2, 1, 1, res) == plain
        assert kconv.conv_configs(x, wt, 1, r // 2, 1, 1, resu) == plain
        # copied by the launcher: NCHW x, an fp32 residual (converted), the weight's layout
        assert kconv.conv_configs(xu.contiguous(), wt, 1, r // 2, 1, 1, res) == aligned
        assert kconv.conv_configs(x, wt, 1, r // 2, 1, 1, resu.float()) == aligned
        prob = ConvProblem.from_tensors(x, wt, 1, r // 2, 1, 1, res)
        assert kconv.problem_configs(prob, (x, wt, res)) == aligned
        # the launcher's own tuner: only the rows that run as labelled are timed
        monkeypatch.setattr(tuning, "mode", lambda: "tune")
        monkeypatch.setattr(kconv, "_TUNED", {})
        monkeypatch.setattr(kconv, "_TIMINGS", {})
        monkeypatch.setattr(kconv, "_time_ms", lambda fn: fn())
        timed = []
        assert not kconv._choose_config(prob, lambda cfg: timed.append(cfg) or len(timed),
                                        tensors=(xu, wt, res, res)).tma
        assert timed == plain
        # remembered apart: the problem's aligned calls are tuned with every row
        assert kconv.tuned_config(prob) is None
        timed.clear()
        assert kconv._choose_config(prob, lambda cfg: timed.append(cfg) or len(timed),
                                    tensors=(x, wt, res, res)) == aligned[0]
        assert timed == aligned and kconv.tuned_config(prob) == aligned[0]
    # the head's linear layer: its weight as the launcher gets it
    from fastres.kernels.head import head_configs

    pooled = torch.randn(256, 512, 1, 1).to(dt)
    buf = torch.randn(1000 * 512 + 8).to(dt)
    fc, fc_u = buf[:512000].view(1000, 512), buf[1:512001].view(1000, 512)
    assert any(cfg.tma for cfg in head_configs(pooled, fc, None))
    assert not any(cfg.tma for cfg in head_configs(pooled, fc_u, None))
    assert any(cfg.tma for cfg in head_configs(pooled, fc_u.t().contiguous().t(), None))
    # and the launcher hands its tuner the tensors it launches with
    seen = []

    def choose(prob, run, check=None, warm=None, tensors=None):
        seen.append(tensors)
        return kcfg.INTERPRETER_CONFIG

    monkeypatch.setattr(kconv, "_choose_config", choose)
    monkeypatch.setattr(kconv, "_interpreted", lambda: True)  # (the kernel interpreted)
    xu, res = cl(1, 16, 4, 5, offset=1).to(DEV), cl(1, 8, 4, 5).to(DEV)
    wt, out = torch.randn(8, 16, 3, 3).to(dt).to(DEV), torch.empty_like(res)
    y = conv_bias_act_triton(xu, wt, torch.zeros(8).to(DEV), 1, 1, 1, 1, res, out=out)
    assert y is out
    # x, residual and out as given (channels-last already), the weight's channels-last copy
    x_, w_, res_, out_ = seen[0]
    assert (x_.data_ptr(), res_.data_ptr(), out_.data_ptr()) == (
        xu.data_ptr(), res.data_ptr(), out.data_ptr())
    assert w_.is_contiguous(memory_format=CL) and torch.equal(w_, wt)


def test_tma_switch_keys_the_tuning_cache():
    """Choices made with ``FASTRES_TMA=0`` were made without the TMA rows: the candidate
    tables' digest (part of the tuning cache's key) differs, so neither setting reuses the
    other's choices."""
    import subprocess
    import sys

    code = ("from fastres.kernels import configs as c; "
            "print(c.TMA_ROWS, c.tables_digest())")

    def read(tma: str) -> list[str]:
        env = {**os.environ, "FASTRES_TMA": tma}
        return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                              text=True, check=True).stdout.split()

    off, on = read("0"), read("1")
    assert off[0] == "False" and off[1] != on[1]
    assert on[0] == str(kcfg.TMA_ROWS)


def test_tma_scratch_allocator_set_per_thread_and_never_over_the_users():
    """Triton's allocator is per context: fastres sets its own in a thread that has none, and
    keeps one the thread set itself (the user's, or inductor's)."""
    import threading

    import triton
    from triton.runtime import _allocation

    from fastres.kernels import conv as kconv

    def mine(size, alignment, stream):
        raise AssertionError("not called here")

    seen = []

    def fresh():
        before = _allocation._allocator.get()
        kconv._set_scratch_allocator()
        seen.append((before, _allocation._allocator.get()))

    def users():
        triton.set_allocator(mine)
        kconv._set_scratch_allocator()
        seen.append((mine, _allocation._allocator.get()))

    for target in (fresh, users):
        t = threading.Thread(target=target)
        t.start()
        t.join()
    (before, after), (_, kept) = seen
    assert isinstance(before, _allocation.NullAllocator) and after is kconv._scratch
    assert kept is mine


@pytest.mark.cuda
def test_gpu_tma_rows_in_threads_direct_launch_and_graphs(monkeypatch):
    """Triton's scratch allocator (where a TMA program writes its descriptors) is per
    context: TMA rows launched first from threads that never set one, then again (straight
    to the compiled kernel), then captured in a CUDA graph and replayed on new input, are
    right each time (into poisoned outputs). The persistent row's grid is 3 programs (as if
    on 3 SMs), each looping over ~17 of the 52 tiles."""
    import threading

    from fastres.kernels import _direct
    from fastres.kernels import conv as kconv

    monkeypatch.setattr(kconv, "TMA_ENABLED", True)
    monkeypatch.setattr(kconv, "device_sm_count", lambda: 3)
    monkeypatch.setattr(_direct, "ENABLED", True)  # (whatever FASTRES_DIRECT_LAUNCH says)

    dev, dt = "cuda", torch.bfloat16
    n, c, h, w, k = 4, 64, 14, 14, 256
    wt = (torch.randn(k, c, 1, 1, device=dev) * c ** -0.5).to(dt)
    b = torch.randn(k, device=dev)

    def case():
        x = torch.randn(n, c, h, w, device=dev).to(dt).contiguous(memory_format=CL)
        res = torch.randn(n, k, h, w, device=dev).to(dt).contiguous(memory_format=CL)
        return x, res, _ref(x, wt, b, (1, 1), (0, 0), (1, 1), 1, res, True)

    def poisoned():
        return torch.full((n, k, h, w), float("nan"), device=dev, dtype=dt).contiguous(
            memory_format=CL)

    rows = [kcfg.KernelConfig(128, 128, 64, 8, 8, 3, tma=True),
            kcfg.KernelConfig(64, 64, 64, 8, 4, 2, persistent=1, tma=True)]
    x, res, _ = case()
    prob = ConvProblem.from_tensors(x, wt, 1, 0, 1, 1, res)
    for cfg in rows:  # the launches below are the TMA kernel's, not the fallback's
        assert kconv._tma_ready(cfg, prob, x, wt, res, poisoned()) is cfg
    assert launch_params(prob, rows[1]).grid == (3, 1)
    errors = []

    def in_thread(cfg):
        try:
            x, res, ref = case()
            for _ in range(2):  # dispatched, then direct
                y = conv_bias_act_triton(x, wt, b, 1, 0, 1, 1, res, True, config=cfg,
                                         out=poisoned())
                torch.cuda.synchronize()
                errors.append(rel_err(y, ref))
        except Exception as exc:  # reported below
            errors.append(exc)

    before = _direct.stats()["direct"]
    threads = [threading.Thread(target=in_thread, args=(cfg,)) for cfg in rows]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errors) == 4 and all(isinstance(e, float) and e <= TOL[dt] for e in errors), \
        errors
    assert _direct.stats()["direct"] >= before + 2
    for cfg in rows:
        x, res, _ = case()
        sx, sres, out = x.clone(), res.clone(), poisoned()
        conv_bias_act_triton(sx, wt, b, 1, 0, 1, 1, sres, True, config=cfg, out=out)  # warm
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            conv_bias_act_triton(sx, wt, b, 1, 0, 1, 1, sres, True, config=cfg, out=out)
        x, res, ref = case()
        sx.copy_(x)
        sres.copy_(res)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert_close_rel(out, ref, TOL[dt])


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16,
                                   pytest.param(torch.float16, marks=pytest.mark.slow)],
                         ids=str)
def test_gpu_tma_block_rows(dtype, monkeypatch):
    """The implicit-GEMM block rows on the GPU, where TMA itself fills the halo (negative
    and past-the-edge box coordinates) and clips the output blocks: ResNet-50-like layers
    (3x3 at 56x56 from 64 channels, 3x3 at 14x14 with a residual, dilation 2 at 28x28, 3x3
    at 7x7, 3x3/2 from 56x56, 1x1/2 from 28x28: the input as a 5-D view), every block row of
    the table into a NaN-poisoned output, launched twice (Triton's dispatch, then straight
    to the compiled kernel), in place over the residual, and captured in a CUDA graph
    replayed on new input; against F.conv2d in float64."""
    from fastres.kernels import _direct
    from fastres.kernels import conv as kconv

    monkeypatch.setattr(kconv, "TMA_ENABLED", True)
    monkeypatch.setattr(_direct, "ENABLED", True)
    dev = "cuda"
    rows = [r for r in kcfg.CONV_CONFIGS if r.box_h]
    direct_before = _direct.stats()["direct"]
    # (N, C_in, H = W, C_out, kernel, stride, padding, dilation, residual)
    for n, c, hw, k, r, st, pad, dil, with_res in [(4, 64, 56, 64, 3, 1, 1, 1, False),
                                                   (4, 256, 14, 256, 3, 1, 1, 1, True),
                                                   (2, 256, 28, 256, 3, 1, 2, 2, False),
                                                   (4, 512, 7, 512, 3, 1, 1, 1, True),
                                                   (4, 128, 56, 128, 3, 2, 1, 1, False),
                                                   (4, 512, 28, 1024, 1, 2, 0, 1, False)]:
        wt = (torch.randn(k, c, r, r, device=dev) * (r * r * c) ** -0.5).to(dtype)
        b = torch.randn(k, device=dev)
        pq = _out_hw(hw, hw, r, r, (st, st), (pad, pad), (dil, dil))
        geo = ((st, st), (pad, pad), (dil, dil))

        def case():
            x = torch.randn(n, c, hw, hw, device=dev).to(dtype).contiguous(memory_format=CL)
            res = (torch.randn(n, k, *pq, device=dev).to(dtype).contiguous(
                memory_format=CL) if with_res else None)
            return x, res, _ref(x, wt, b, *geo, 1, res, True)

        def poisoned():
            return torch.full((n, k, *pq), float("nan"), device=dev, dtype=dtype).contiguous(
                memory_format=CL)

        for cfg in rows:
            x, res, ref = case()
            prob = ConvProblem.from_tensors(x, wt, *geo, 1, res)
            assert kconv._tma_ready(cfg, prob, x, wt, poisoned()) is cfg  # the block kernel
            for _ in range(2):  # dispatched, then direct
                y = conv_bias_act_triton(x, wt, b, *geo, 1, res, True, config=cfg,
                                         out=poisoned())
                assert_close_rel(y, ref, TOL[dtype])
            if res is not None:
                acc = res.clone()
                conv_bias_act_triton(x, wt, b, *geo, 1, acc, True, config=cfg, out=acc)
                assert torch.equal(acc, y)
            sx = x.clone()
            sres = None if res is None else res.clone()
            out = poisoned()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                conv_bias_act_triton(sx, wt, b, *geo, 1, sres, True, config=cfg, out=out)
            x, res, ref = case()
            sx.copy_(x)
            if res is not None:
                sres.copy_(res)
            out.fill_(float("nan"))
            graph.replay()
            torch.cuda.synchronize()
            assert_close_rel(out, ref, TOL[dtype])
    # the second launch of each row and layer went straight to the compiled kernel
    assert _direct.stats()["direct"] >= direct_before + 6 * len(rows)
