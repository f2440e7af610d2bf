"""Implicit-GEMM convolution + bias (+ residual) (+ ReLU) in Triton, over NHWC activations.

The GEMM view: M = N*P*Q output pixels, N = C_out, K = R*S*C_in/groups ordered (r, s, c) with
c fastest. Activations are read channels-last (``[N, H, W, C]`` physically) and weights as
``[C_out, R, S, C_in/groups]`` (a ``[C_out, C_in/groups, R, S]`` tensor in channels-last memory
format), so both tiles of a K step are contiguous runs of channels: 16-byte async copies.

One kernel, four schedules (the ``MODE`` constexpr and a weight packing, chosen by the
launcher):

- ``gemm``: 1x1, stride 1, no padding, one group. Plain ``[M, C_in] x [C_in, C_out]``, grouped
  program order, large tiles and deep pipelining.
- ``conv``: everything else dense (3x3, strided 1x1, dilation, groups with >= 32 channels per
  group): one flattened loop over (tap, channel block); padding through masked loads.
- ``grouped``: few channels per group (ResNeXt, 4..16): block-diagonal packing. ``gpb``
  consecutive groups become one group of ``gpb * C_in/groups`` channels whose weight is
  dense with zeros off the diagonal blocks (packed once per weight, cached), then the
  ``conv`` schedule runs it. Wastes FLOPs, keeps loads 16-byte and the dot on tensor cores
  (wgmma needs N, K >= 16; a per-group dot of 4..8 channels would not). The zeros multiply
  the other groups' inputs, so an inf or NaN input would make NaN in every group of its
  block: a tile whose sum is not finite is computed again group by group (a slow path for
  such tiles only), which gives the reference's inf and NaN.
- ``stem``: few input channels (the 7x7 stem, C_in = 3): the S*C inputs of one kernel row are
  contiguous in NHWC (and in the weight), so K steps over kernel rows with S*C merged.

Epilogue in fp32: + bias, + residual, ReLU (NaN-preserving like ``torch.relu``), one cast at
the store. fp32 inputs use TF32 exactly when ``torch.backends.cudnn.allow_tf32`` is true.
Under the Triton interpreter dot operands are upcast to fp32 (bf16 ``tl.dot`` is wrong there,
triton#11584), TF32 is emulated (operands rounded to TF32, then an exact fp32 dot), and one
small configuration runs (the interpreter cannot benchmark).
"""

from __future__ import annotations

import dataclasses
import functools
import weakref
from dataclasses import dataclass
from types import MappingProxyType

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from fastres.kernels.configs import (
    SMEM_LIMIT,
    SMS,
    TABLES,
    TMA_ROWS,
    KernelConfig,
    _pow2_at_least,
    box_blocks,
    interpreter_config,
    prune,
)
from fastres.kernels import _direct
from fastres.ops import _backend
from fastres.ops._backend import cudnn_allow_tf32, kernels_interpreted
from fastres.ops._checks import conv_output_size

MODE_GEMM, MODE_CONV, MODE_STEM = 0, 1, 2
_MODES = {"gemm": MODE_GEMM, "conv": MODE_CONV, "grouped": MODE_CONV, "stem": MODE_STEM}
_INT32_LIMIT = 2**31 - 1
_GRID_Y_LIMIT = 65535  # CUDA's maximum gridDim.y


# Shape arguments that are not specialized (no divisibility / ==1 variants): one compiled
# kernel serves every batch and spatial size. The channel counts stay specialized: their
# divisibility by 16 is what makes the tile loads 16-byte aligned.
NO_SPECIALIZE = ["M", "H", "W", "P", "Q", "stride_h", "stride_w", "pad_h", "pad_w", "dil_h",
                 "dil_w"]


@triton.jit
def _round_low_bits(v, DROP: tl.constexpr):
    """fp32 ``v`` rounded to the nearest value whose low ``DROP`` mantissa bits are zero
    (ties to even; a carry moves into the exponent, overflow gives inf), still fp32."""
    i = v.to(tl.int32, bitcast=True)
    i = (i + (((1 << (DROP - 1)) - 1) + ((i >> DROP) & 1))) & -(1 << DROP)
    return tl.where(v != v, v, i.to(tl.float32, bitcast=True))  # NaN stays NaN


@triton.jit
def _round_tf32(v):
    """fp32 -> the nearest TF32 value (10 mantissa bits, ties to even), still stored as fp32.

    Triton hands fp32 bits straight to the TF32 tensor-core instructions, which drop the low
    13 mantissa bits (truncation, a bias that accumulates over a deep network; see
    triton-lang/triton#4574). Measured on an H100 before this rounding: ResNet-50 fp32 with
    TF32 through the Triton kernels was 2.2e-2 from the float64 result, eager cuDNN TF32
    5.0e-3. Rounding first makes the truncation exact, as cuBLAS/cuDNN's conversion does.
    """
    return _round_low_bits(v, 13)


@triton.jit
def _to_output(v, dtype: tl.constexpr, INTERPRETED: tl.constexpr):
    """fp32 ``v`` in the output ``dtype``, rounded to nearest even on every target.

    A GPU's fp32 -> bf16 conversion rounds to nearest even; Triton's interpreter (3.8)
    truncates (and flushes bf16 subnormals), which made the per-layer bf16 error of CPU runs
    2x that of a GPU (single 3x3 layer: 3.3e-3 against the float64 result; 1.6e-3 rounded).
    Interpreted, bf16 is rounded here with integer ops and bit-cast, exactly as
    ``Tensor.to(torch.bfloat16)`` does; compiled code is unchanged."""
    if INTERPRETED and dtype == tl.bfloat16:
        i = _round_low_bits(v, 16).to(tl.int32, bitcast=True) >> 16  # the bf16 bits
        i = tl.where(v != v, 0x7FC0, i)  # NaN: the canonical quiet NaN
        return i.to(tl.int16).to(tl.bfloat16, bitcast=True)
    return v.to(dtype)


@triton.jit
def _mma(a, b, acc, UPCAST: tl.constexpr, ROUND_TF32: tl.constexpr, PRECISION: tl.constexpr):
    """``acc + a @ b``: fp32 operands under the interpreter (UPCAST), TF32-rounded fp32
    operands for TF32 dots (ROUND_TF32)."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if ROUND_TF32:
        a = _round_tf32(a)
        b = _round_tf32(b)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def output_pixel(rm, P, Q, INDEX64: tl.constexpr):
    """(image, output row, output column) of flattened NHWC output pixel indices ``rm`` (the
    image index in int64 with ``INDEX64``, so that image offsets cannot wrap)."""
    q = rm % Q
    t = rm // Q
    p = t % P
    img = t // P
    if INDEX64:
        img = img.to(tl.int64)
    return img, p, q


@triton.jit
def _tile_coords(tile, num_in_group, num_pid_m, GROUP_M: tl.constexpr):
    """(row block, column block) of output tile number ``tile`` in grouped program order:
    GROUP_M consecutive row blocks share each weight column block while it is in L2."""
    first_m = (tile // num_in_group) * GROUP_M
    group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + ((tile % num_in_group) % group_size)
    pid_n = (tile % num_in_group) // group_size
    return pid_m, pid_n


@triton.jit
def _load_operands(a_ptrs, b_ptrs, row_ok, n_ok, c, c_end, EVEN_C: tl.constexpr):
    """One K step's activation tile ``[rows, channels]`` and weight tile ``[channels,
    columns]``: rows not ``row_ok`` and columns not ``n_ok`` read as zeros, and so do channels
    ``c`` from ``c_end`` on unless ``EVEN_C`` (every channel block full: no channel mask)."""
    if EVEN_C:
        a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
        b = tl.load(b_ptrs, mask=n_ok[None, :], other=0.0)
    else:
        c_ok = c < c_end
        a = tl.load(a_ptrs, mask=row_ok[:, None] & c_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=n_ok[None, :] & c_ok[:, None], other=0.0)
    return a, b


@triton.jit
def _split_range(total, SPLIT_K: tl.constexpr):
    """The K-loop iterations ``[lo, hi)`` of this program's split (``program_id(2)``) of
    ``total``: all of them without split-K. The splits' lengths differ by one at most; with
    more splits than steps some get none, and write a zero partial sum."""
    if SPLIT_K > 1:
        pid = tl.program_id(2)
        lo = pid * total // SPLIT_K
        hi = (pid + 1) * total // SPLIT_K
    else:
        lo = 0
        hi = total
    return lo, hi


@triton.jit
def _gemm_k_loop(x_ptr, w_ptr, x_row, w_row, m_ok, n_ok, C, acc, EVEN_C: tl.constexpr,
                 UPCAST: tl.constexpr, ROUND_TF32: tl.constexpr, PRECISION: tl.constexpr,
                 BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr = 1):
    """``acc`` + one GEMM tile of a 1x1 stride-1 convolution: rows ``x_row`` of the
    ``[M, C]`` activations times columns ``w_row`` of the ``[K_OUT, C]`` weight, channel
    block by channel block (masked rows/columns read as zeros); with ``SPLIT_K``, this
    program's split of the channel blocks only."""
    rk = tl.arange(0, BLOCK_K)
    kb_lo, kb_hi = _split_range(tl.cdiv(C, BLOCK_K), SPLIT_K)
    for kb in range(kb_lo, kb_hi):
        c = kb * BLOCK_K + rk
        a, b = _load_operands(x_ptr + x_row[:, None] + c[None, :],
                              w_ptr + w_row[None, :] + c[:, None], m_ok, n_ok, c, C, EVEN_C)
        acc = _mma(a, b, acc, UPCAST, ROUND_TF32, PRECISION)
    return acc


@triton.jit
def _gemm_persistent(x_ptr, w_ptr, b_ptr, r_ptr, o_ptr, M, C, K_OUT, HAS_RES: tl.constexpr,
                     RELU: tl.constexpr, EVEN_C: tl.constexpr, INDEX64: tl.constexpr,
                     UPCAST: tl.constexpr, PRECISION: tl.constexpr, ROUND_TF32: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     GROUP_M: tl.constexpr):
    """The 1x1 stride-1 GEMM ``[M, C] x [C, K_OUT]`` by persistent programs: each program
    takes every ``num_programs``-th tile. The tile loop and the K loop are flattened into one
    (``tl.range(flatten=True)``) so that the pipeliner issues the next tile's first operand
    loads while this tile's epilogue reads the residual and stores: the memory-bound layers
    (ResNet's 1x1 layers from 64-256 channels, one to four K steps) otherwise wait for memory
    at every tile's start."""
    start = tl.program_id(0)
    step = tl.num_programs(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(K_OUT, BLOCK_N)
    num_in_group = GROUP_M * num_pid_n
    # The epilogue recomputes its tile's coordinates from a counter of its own (as Triton's
    # persistent matmul tutorial does): values shared by the flattened loop's prologue and
    # epilogue defeat its pipelining on some targets.
    tile_c = start - step
    for tile in tl.range(start, num_pid_m * num_pid_n, step, flatten=True):
        pid_m, pid_n = _tile_coords(tile, num_in_group, num_pid_m, GROUP_M)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok = rm < M
        n_ok = rn < K_OUT
        if INDEX64:
            x_row = rm.to(tl.int64) * C
        else:
            x_row = rm * C
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc = _gemm_k_loop(x_ptr, w_ptr, x_row, rn * C, m_ok, n_ok, C, acc, EVEN_C, UPCAST,
                           ROUND_TF32, PRECISION, BLOCK_K)
        tile_c += step
        pid_m, pid_n = _tile_coords(tile_c, num_in_group, num_pid_m, GROUP_M)
        rm_c = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn_c = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        if INDEX64:
            rm_i = rm_c.to(tl.int64)
        else:
            rm_i = rm_c
        _epilogue(acc, b_ptr, r_ptr, o_ptr, rm_i, rm_c < M, rn_c, rn_c < K_OUT, K_OUT,
                  HAS_RES, RELU, UPCAST)


@triton.jit
def _gemm_tma(x_ptr, w_ptr, b_ptr, r_ptr, o_ptr, M, C, K_OUT, HAS_RES: tl.constexpr,
              RELU: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
              GROUP_M: tl.constexpr):
    """The 1x1 stride-1 GEMM ``[M, C] x [C, K_OUT]`` with every tile moved by the Hopper
    tensor memory accelerator (TMA): the activation, weight and residual tiles are loaded, and
    the output tile stored, through tensor descriptors made on the device. TMA fills rows and
    channels past the tensor's end with zeros on load and clips them on store, so the kernel
    computes no addresses or masks; the launcher runs it only where every tensor is 16-byte
    aligned and C and K_OUT rows are whole 16-byte multiples (16-bit dtypes). Each program
    takes every ``num_programs``-th tile: one per program for an ordinary grid, several for a
    persistent one (tile and K loops flattened, as in :func:`_gemm_persistent`)."""
    x_desc = tl.make_tensor_descriptor(x_ptr, shape=[M, C], strides=[C, 1],
                                       block_shape=[BLOCK_M, BLOCK_K])
    w_desc = tl.make_tensor_descriptor(w_ptr, shape=[K_OUT, C], strides=[C, 1],
                                       block_shape=[BLOCK_N, BLOCK_K])
    o_desc = tl.make_tensor_descriptor(o_ptr, shape=[M, K_OUT], strides=[K_OUT, 1],
                                       block_shape=[BLOCK_M, BLOCK_N])
    if HAS_RES:
        r_desc = tl.make_tensor_descriptor(r_ptr, shape=[M, K_OUT], strides=[K_OUT, 1],
                                           block_shape=[BLOCK_M, BLOCK_N])
    start = tl.program_id(0)
    step = tl.num_programs(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(K_OUT, BLOCK_N)
    num_in_group = GROUP_M * num_pid_n
    tile_c = start - step  # the epilogue's own tile counter (see _gemm_persistent)
    for tile in tl.range(start, num_pid_m * num_pid_n, step, flatten=True):
        pid_m, pid_n = _tile_coords(tile, num_in_group, num_pid_m, GROUP_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kb in range(0, tl.cdiv(C, BLOCK_K)):
            a = x_desc.load([pid_m * BLOCK_M, kb * BLOCK_K])
            b = w_desc.load([pid_n * BLOCK_N, kb * BLOCK_K])
            acc = _mma(a, b.T, acc, UPCAST, False, PRECISION)
        tile_c += step
        pid_m, pid_n = _tile_coords(tile_c, num_in_group, num_pid_m, GROUP_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        bias = tl.load(b_ptr + rn, mask=rn < K_OUT, other=0.0)
        acc = acc + bias.to(tl.float32)[None, :]
        if HAS_RES:
            acc = acc + r_desc.load([pid_m * BLOCK_M, pid_n * BLOCK_N]).to(tl.float32)
        if RELU:
            acc = tl.where(acc < 0.0, 0.0, acc)  # keeps NaN, like torch.relu
        o_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N],
                     _to_output(acc, o_ptr.dtype.element_ty, UPCAST))


@triton.jit
def _conv_tma(x_ptr, w_ptr, b_ptr, r_ptr, o_ptr, M, H, W, C, P, Q, K_OUT, stride_h, stride_w,
              pad_h, pad_w, dil_h, dil_w, R: tl.constexpr, S: tl.constexpr,
              HAS_RES: tl.constexpr, RELU: tl.constexpr, UPCAST: tl.constexpr,
              PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, BOX_H: tl.constexpr,
              STRIDED: tl.constexpr, BOX_N: tl.constexpr):
    """A one-group implicit-GEMM convolution whose strides divide the input's height and width,
    with every tile moved by TMA. The output tile is a ``BOX_H x BOX_W`` block of the output
    pixels of ``BOX_N`` consecutive images (``BOX_W = BLOCK_M // (BOX_N * BOX_H)``; images
    past the batch read zeros and are not stored, like pixels past an edge; the boxes below
    are written for ``BOX_N`` = 1, their first axis is ``BOX_N``). At stride 1 the input
    pixels a block reads for tap (r, s) are the box ``[1, BOX_H, BOX_W, BLOCK_K]`` of the NHWC
    input at the block's first pixel plus (r*dil - pad, s*dil - pad). With a stride (``STRIDED``)
    the input is described as ``[N, H/sh, sh, W/sw, sw*C]`` (sh, sw: the strides; the same
    memory), where the input pixels a block reads for one tap, (p*sh + r*dil - pad, q*sw +
    s*dil - pad) for its output pixels (p, q), form one box ``[1, BOX_H, 1, BOX_W,
    BLOCK_K]``: the row offset ``r*dil - pad`` splits into whole strides and a phase (index
    2), the column offset likewise, its phase selecting which C channels of the merged
    ``sw*C`` axis. Coordinates before the image (negative) or past it read zeros (TMA's
    out-of-bounds fill): the padding halo, with no masks. The weight tile is a ``[BLOCK_N,
    BLOCK_K]`` block of the ``[K_OUT, R*S*C]`` weight (the launcher runs these rows only
    where C is a whole number of channel blocks (:func:`_launch_params` refuses the rest),
    so a tap's last block never reads the next tap's weights, nor the next phase's
    channels). Strides are 64-bit (an image may hold 2**31 values or more). The residual is
    loaded and the output stored as ``[1, BOX_H, BOX_W, BLOCK_N]`` boxes; pixels past the
    output's edge are not written."""
    BOX_W: tl.constexpr = BLOCK_M // (BOX_N * BOX_H)
    n_img = M // (P * Q)
    # strides in 64 bits: one image can hold 2**31 values or more (its coordinates cannot)
    row_in = W.to(tl.int64) * C
    img_in = H * row_in
    row_out = Q.to(tl.int64) * K_OUT
    img_out = P * row_out
    if STRIDED:
        x_desc = tl.make_tensor_descriptor(
            x_ptr, shape=[n_img, H // stride_h, stride_h, W // stride_w, stride_w * C],
            strides=[img_in, stride_h * row_in, row_in, stride_w * C, 1],
            block_shape=[BOX_N, BOX_H, 1, BOX_W, BLOCK_K])
    else:
        x_desc = tl.make_tensor_descriptor(x_ptr, shape=[n_img, H, W, C],
                                           strides=[img_in, row_in, C, 1],
                                           block_shape=[BOX_N, BOX_H, BOX_W, BLOCK_K])
    w_desc = tl.make_tensor_descriptor(w_ptr, shape=[K_OUT, R * S * C], strides=[R * S * C, 1],
                                       block_shape=[BLOCK_N, BLOCK_K])
    o_desc = tl.make_tensor_descriptor(o_ptr, shape=[n_img, P, Q, K_OUT],
                                       strides=[img_out, row_out, K_OUT, 1],
                                       block_shape=[BOX_N, BOX_H, BOX_W, BLOCK_N])
    boxes_h = tl.cdiv(P, BOX_H)
    boxes_w = tl.cdiv(Q, BOX_W)
    num_pid_m = tl.cdiv(n_img, BOX_N) * boxes_h * boxes_w
    num_pid_n = tl.cdiv(K_OUT, BLOCK_N)
    pid_m, pid_n = _tile_coords(tl.program_id(0), GROUP_M * num_pid_n, num_pid_m, GROUP_M)
    img_group = pid_m // (boxes_h * boxes_w)
    rest = pid_m - img_group * (boxes_h * boxes_w)
    img = img_group * BOX_N  # the block's first image
    p0 = (rest // boxes_w) * BOX_H
    q0 = (rest % boxes_w) * BOX_W
    n0 = pid_n * BLOCK_N
    cb_per_tap = tl.cdiv(C, BLOCK_K)
    # The product is computed transposed, acc_t = W_tile @ X_box^T ([BLOCK_N, BLOCK_M]): a
    # multi-row box [1, BOX_H, BOX_W, BLOCK_K] is then wgmma's B operand, which Triton keeps
    # in shared memory and reshapes there (memdesc_reshape: TMA's 128-byte-swizzled box is
    # the [BLOCK_M, BLOCK_K] tile's layout), so both operands go from the TMA buffers to the
    # tensor cores. As the A operand it went through registers (Triton 3.6/3.8 keep a
    # reshaped A tile in registers) with a shallower pipeline. Its transpose back after the
    # loop is a relabelling of the accumulator's registers (no data moves).
    acc_t = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for it in range(0, R * S * cb_per_tap):
        tap = it // cb_per_tap
        cb = it - tap * cb_per_tap
        r = tap // S
        s = tap - r * S
        dh = r * dil_h - pad_h  # the tap's input offset
        dw = s * dil_w - pad_w
        if STRIDED:  # in whole strides and a phase (>= 0)
            ph = (dh % stride_h + stride_h) % stride_h
            pw = (dw % stride_w + stride_w) % stride_w
            a = x_desc.load([img, p0 + (dh - ph) // stride_h, ph, q0 + (dw - pw) // stride_w,
                             pw * C + cb * BLOCK_K])
        else:
            a = x_desc.load([img, p0 + dh, q0 + dw, cb * BLOCK_K])
        b = w_desc.load([n0, tap * C + cb * BLOCK_K])
        acc_t = _mma(b, tl.reshape(a, [BLOCK_M, BLOCK_K]).T, acc_t, UPCAST, False, PRECISION)
    acc = acc_t.T
    rn = n0 + tl.arange(0, BLOCK_N)
    bias = tl.load(b_ptr + rn, mask=rn < K_OUT, other=0.0)
    acc = acc + bias.to(tl.float32)[None, :]
    if HAS_RES:
        r_desc = tl.make_tensor_descriptor(r_ptr, shape=[n_img, P, Q, K_OUT],
                                           strides=[img_out, row_out, K_OUT, 1],
                                           block_shape=[BOX_N, BOX_H, BOX_W, BLOCK_N])
        res = r_desc.load([img, p0, q0, n0])
        acc = acc + tl.reshape(res, [BLOCK_M, BLOCK_N]).to(tl.float32)
    if RELU:
        acc = tl.where(acc < 0.0, 0.0, acc)  # keeps NaN, like torch.relu
    y = _to_output(acc, o_ptr.dtype.element_ty, UPCAST)
    o_desc.store([img, p0, q0, n0], tl.reshape(y, [BOX_N, BOX_H, BOX_W, BLOCK_N]))


@triton.jit(do_not_specialize=NO_SPECIALIZE)
def conv_bias_act_kernel(
    x_ptr, w_ptr, b_ptr, r_ptr, o_ptr,
    M, H, W, C, P, Q, K_OUT, C_G, K_G,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    R: tl.constexpr, S: tl.constexpr, MODE: tl.constexpr,
    HAS_RES: tl.constexpr, RELU: tl.constexpr, EVEN_C: tl.constexpr,
    INDEX64: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    ROUND_TF32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, SUB_C: tl.constexpr = 0, SUB_K: tl.constexpr = 0,
    EARLY_RES: tl.constexpr = False, PERSISTENT: tl.constexpr = False,
    TMA: tl.constexpr = False, SPLIT_K: tl.constexpr = 1, BOX_H: tl.constexpr = 0,
    BOX_STRIDED: tl.constexpr = False, BOX_N: tl.constexpr = 1,
):
    """out[m, g*N_EXT + n] = act(sum_k x_im2col[m, k] * w[n, k] + bias (+ res)).

    Grid: (cdiv(M, BLOCK_M) * cdiv(K_G, BLOCK_N), groups), or with ``PERSISTENT`` (1x1
    stride-1 GEMMs, one group) fewer programs, each looping over tiles
    (:func:`_gemm_persistent`); with ``TMA`` (1x1 stride-1 GEMMs, 16-bit, aligned) every
    tile moves by tensor descriptors (:func:`_gemm_tma`), one program per tile or
    persistent; with ``TMA`` and ``BOX_H`` (one-group implicit GEMMs whose strides divide
    the input, 16-bit, aligned) the output tile is a block of one image's pixels and every
    tile moves by TMA (:func:`_conv_tma`). x: NHWC contiguous [N, H, W, C];
    w: [K_OUT, R, S, C_G] contiguous (MODE 2: [K_OUT, R, BLOCK_K], zero-padded); out/res:
    [M, K_OUT] contiguous. ``SUB_C``/``SUB_K`` (block-diagonal grouped schedule only): the
    real groups' input/output channels inside a packed group; a tile whose sum is not finite
    is computed again group by group (:func:`_grouped_exact`). ``SPLIT_K`` > 1 (1x1 GEMMs
    and implicit GEMMs; grid axis 2 = the split): the program sums its split of the K loop
    only and stores that fp32 partial sum to ``o_ptr`` = a ``[SPLIT_K, M, K_OUT]`` fp32
    workspace, with no bias, residual or ReLU (:func:`split_k_epilogue_kernel` adds them).
    """
    if TMA and BOX_H > 0:
        _conv_tma(x_ptr, w_ptr, b_ptr, r_ptr, o_ptr, M, H, W, C, P, Q, K_OUT, stride_h,
                  stride_w, pad_h, pad_w, dil_h, dil_w, R, S, HAS_RES, RELU, UPCAST, PRECISION,
                  BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, BOX_H, BOX_STRIDED, BOX_N)
    elif TMA:
        _gemm_tma(x_ptr, w_ptr, b_ptr, r_ptr, o_ptr, M, C, K_OUT, HAS_RES, RELU, UPCAST,
                  PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)
    elif PERSISTENT:
        # 1x1 stride-1 GEMM only (the launcher's grid: a few programs per SM, each looping
        # over tiles)
        _gemm_persistent(x_ptr, w_ptr, b_ptr, r_ptr, o_ptr, M, C, K_OUT, HAS_RES, RELU, EVEN_C,
                         INDEX64, UPCAST, PRECISION, ROUND_TF32, BLOCK_M, BLOCK_N, BLOCK_K,
                         GROUP_M)
    else:
        g = tl.program_id(1)
        num_pid_m = tl.cdiv(M, BLOCK_M)
        num_pid_n = tl.cdiv(K_G, BLOCK_N)
        pid_m, pid_n = _tile_coords(tl.program_id(0), GROUP_M * num_pid_n, num_pid_m, GROUP_M)

        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        m_ok = rm < M
        n_ok = rn < K_G
        n_glob = g * K_G + rn
        if INDEX64:
            rm_i = rm.to(tl.int64)
        else:
            rm_i = rm
        if MODE == 2:
            w_row = n_glob * (R * BLOCK_K)
        else:
            w_row = n_glob * (R * S * C_G)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if EARLY_RES:  # issued now, waited for in the epilogue: overlaps the K loop's loads
            res = tl.load(r_ptr + rm_i[:, None] * K_OUT + n_glob[None, :],
                          mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        else:
            res = 0.0  # (unused: the epilogue loads it)

        if MODE == 0:
            # 1x1 stride 1: x is already the [M, C] A matrix.
            acc = _gemm_k_loop(x_ptr, w_ptr, rm_i * C, w_row, m_ok, n_ok, C, acc, EVEN_C,
                               UPCAST, ROUND_TF32, PRECISION, BLOCK_K, SPLIT_K)
        else:
            img, p, q = output_pixel(rm, P, Q, INDEX64)
            ih0 = p * stride_h - pad_h
            iw0 = q * stride_w - pad_w
            # Offset of the group's first channel at (img, ih0, iw0); may point into the padding
            # (negative or past the row): such rows are masked, never dereferenced.
            x_row = ((img * H + ih0) * W + iw0) * C + g * C_G
            if MODE == 1:
                cb_per_tap = tl.cdiv(C_G, BLOCK_K)
                it_lo, it_hi = _split_range(R * S * cb_per_tap, SPLIT_K)
                for it in range(it_lo, it_hi):
                    tap = it // cb_per_tap
                    cb = it - tap * cb_per_tap
                    r = tap // S
                    s = tap - r * S
                    ih = ih0 + r * dil_h
                    iw = iw0 + s * dil_w
                    row_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                    c = cb * BLOCK_K + rk
                    a_ptrs = x_ptr + (x_row + (r * dil_h * W + s * dil_w) * C)[:, None] + c[None, :]
                    b_ptrs = w_ptr + w_row[None, :] + (tap * C_G + c)[:, None]
                    a, b = _load_operands(a_ptrs, b_ptrs, row_ok, n_ok, c, C_G, EVEN_C)
                    acc = _mma(a, b, acc, UPCAST, ROUND_TF32, PRECISION)
            else:
                # Stem: K step = one kernel row r; the S*C inputs of that row are contiguous, and
                # the packed weight row is [S*C zero-padded to BLOCK_K].
                k_ok = rk < S * C_G
                iw = iw0[:, None] + (rk // C_G)[None, :]
                col_ok = k_ok[None, :] & (iw >= 0) & (iw < W)
                for r in range(0, R):
                    ih = ih0 + r * dil_h
                    row_ok = m_ok & (ih >= 0) & (ih < H)
                    a_ptrs = x_ptr + (x_row + r * dil_h * W * C)[:, None] + rk[None, :]
                    b_ptrs = w_ptr + w_row[None, :] + (r * BLOCK_K + rk)[:, None]
                    a = tl.load(a_ptrs, mask=row_ok[:, None] & col_ok, other=0.0)
                    b = tl.load(b_ptrs, mask=n_ok[None, :], other=0.0)
                    acc = _mma(a, b, acc, UPCAST, ROUND_TF32, PRECISION)

        if SPLIT_K > 1:
            # this split's partial sum, in fp32, to its slice of the workspace
            ws_ptr = o_ptr + tl.program_id(2).to(tl.int64) * M * K_OUT
            tl.store(ws_ptr + rm_i[:, None] * K_OUT + n_glob[None, :], acc,
                     mask=m_ok[:, None] & n_ok[None, :])
        elif SUB_C > 0:
            # Block-diagonal packing multiplies the other groups' inputs by zeros, and 0 * inf and
            # 0 * NaN are NaN: an inf or NaN input would make NaN in every group of its block
            # (the reference: its own group only, and inf stays inf). Such a tile, and only such a
            # tile, is computed again, group by group, without the zeros.
            bad = tl.max(((acc != acc) | (tl.abs(acc) == float("inf"))).to(tl.int32))
            if bad != 0:
                _grouped_exact(x_ptr, w_ptr, b_ptr, r_ptr, o_ptr, x_row, ih0, iw0, rm_i, m_ok,
                               pid_n, g, H, W, C, K_OUT, C_G, K_G, dil_h, dil_w, R, S, HAS_RES,
                               RELU, UPCAST, BLOCK_M, BLOCK_N, SUB_C, SUB_K)
            else:
                _epilogue(acc, b_ptr, r_ptr, o_ptr, rm_i, m_ok, n_glob, n_ok, K_OUT, HAS_RES, RELU,
                          UPCAST, res, EARLY_RES)
        else:
            _epilogue(acc, b_ptr, r_ptr, o_ptr, rm_i, m_ok, n_glob, n_ok, K_OUT, HAS_RES, RELU,
                      UPCAST, res, EARLY_RES)


@triton.jit
def _epilogue(acc, b_ptr, r_ptr, o_ptr, rm_i, m_ok, n_glob, n_ok, K_OUT, HAS_RES: tl.constexpr,
              RELU: tl.constexpr, UPCAST: tl.constexpr, res=0.0, EARLY_RES: tl.constexpr = False):
    """In fp32: + bias (+ residual: ``res``, loaded already when ``EARLY_RES``) (ReLU), then
    one rounding at the store."""
    bias = tl.load(b_ptr + n_glob, mask=n_ok, other=0.0)
    acc = acc + bias.to(tl.float32)[None, :]
    o_off = rm_i[:, None] * K_OUT + n_glob[None, :]
    o_mask = m_ok[:, None] & n_ok[None, :]
    if HAS_RES:
        if not EARLY_RES:
            res = tl.load(r_ptr + o_off, mask=o_mask, other=0.0)
        acc = acc + res.to(tl.float32)
    if RELU:
        acc = tl.where(acc < 0.0, 0.0, acc)  # keeps NaN, like torch.relu
    tl.store(o_ptr + o_off, _to_output(acc, o_ptr.dtype.element_ty, UPCAST), mask=o_mask)


@triton.jit
def split_k_epilogue_kernel(ws_ptr, b_ptr, r_ptr, o_ptr, MN, K_OUT, SPLIT_K: tl.constexpr,
                            HAS_RES: tl.constexpr, RELU: tl.constexpr, UPCAST: tl.constexpr,
                            BLOCK: tl.constexpr):
    """The split-K rows' second kernel: ``out = relu?(sum of the SPLIT_K partial sums + bias
    (+ residual))`` over the flattened ``[M, K_OUT]`` output (``MN`` values), the partial sums
    (``ws``: ``[SPLIT_K, M, K_OUT]`` fp32) added in split order (the same result every run),
    then one rounding at the store. Grid: cdiv(MN, BLOCK)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < MN
    acc = tl.load(ws_ptr + offs, mask=ok, other=0.0)
    for s in tl.static_range(1, SPLIT_K):
        acc += tl.load(ws_ptr + s * MN + offs, mask=ok, other=0.0)
    acc += tl.load(b_ptr + offs % K_OUT, mask=ok, other=0.0)
    if HAS_RES:
        acc += tl.load(r_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    if RELU:
        acc = tl.where(acc < 0.0, 0.0, acc)  # keeps NaN, like torch.relu
    tl.store(o_ptr + offs, _to_output(acc, o_ptr.dtype.element_ty, UPCAST), mask=ok)


@triton.jit
def _grouped_exact(x_ptr, w_ptr, b_ptr, r_ptr, o_ptr, x_row, ih0, iw0, rm_i, m_ok, pid_n, g,
                   H, W, C, K_OUT, C_G, K_G, dil_h, dil_w, R: tl.constexpr, S: tl.constexpr,
                   HAS_RES: tl.constexpr, RELU: tl.constexpr, UPCAST: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SUB_C: tl.constexpr,
                   SUB_K: tl.constexpr):
    """The tile of a block-diagonal grouped program, one real group at a time: each of its
    SUB_K output channels sums only its own group's SUB_C inputs (fp32 rank-1 updates, no
    tensor cores: the slow path of a tile that holds an inf or NaN), then the epilogue and
    the store of those columns."""
    n_lo = pid_n * BLOCK_N
    n_hi = tl.minimum(n_lo + BLOCK_N, K_G)
    rj = tl.arange(0, SUB_K)
    for j in range(n_lo // SUB_K, tl.cdiv(n_hi, SUB_K)):
        cols = j * SUB_K + rj  # output channels of group j (inside the packed group)
        col_ok = (cols >= n_lo) & (cols < n_hi)
        n_glob = g * K_G + cols
        w_row = n_glob * (R * S * C_G)
        acc = tl.zeros((BLOCK_M, SUB_K), dtype=tl.float32)
        for tap in range(0, R * S):
            r = tap // S
            s = tap - r * S
            ih = ih0 + r * dil_h
            iw = iw0 + s * dil_w
            row_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            a_base = x_ptr + x_row + (r * dil_h * W + s * dil_w) * C + j * SUB_C
            b_base = w_ptr + w_row + tap * C_G + j * SUB_C
            for k in range(0, SUB_C):
                a = tl.load(a_base + k, mask=row_ok, other=0.0).to(tl.float32)
                b = tl.load(b_base + k, mask=col_ok, other=0.0).to(tl.float32)
                acc += a[:, None] * b[None, :]
        _epilogue(acc, b_ptr, r_ptr, o_ptr, rm_i, m_ok, n_glob, col_ok, K_OUT, HAS_RES, RELU,
                  UPCAST)


# -- problem description and launch parameters ---------------------------------------------


@dataclass(frozen=True)
class ConvProblem:
    """The shape facts of one ``conv_bias_act`` call that decide schedule and configuration."""

    n: int
    c: int
    h: int
    w: int
    k_out: int
    r: int
    s: int
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    dtype: torch.dtype
    has_res: bool = False
    relu: bool = True
    tf32: bool = False

    # Derived values are computed once per instance (a frozen dataclass still has a __dict__
    # that functools.cached_property can fill); the launcher asks for them on every call.
    @functools.cached_property
    def pq(self) -> tuple[int, int]:
        return conv_output_size(self.h, self.w, self.r, self.s, self.stride, self.padding,
                                self.dilation)

    @functools.cached_property
    def m(self) -> int:
        p, q = self.pq
        return self.n * p * q

    @property
    def c_g(self) -> int:
        return self.c // self.groups

    @property
    def k_g(self) -> int:
        return self.k_out // self.groups

    @functools.cached_property
    def kind(self) -> str:
        return conv_kind(self)

    @property
    def k_extent(self) -> int:
        """Channels of one K step: C_in/groups, or S*C_in for the stem (a kernel row)."""
        return self.s * self.c_g if self.kind == "stem" else self.c_g

    @property
    def taps(self) -> int:
        """Kernel positions the K loop visits: R*S, or R kernel rows for the stem."""
        return self.r if self.kind == "stem" else self.r * self.s

    @functools.cached_property
    def _hash(self) -> int:
        return hash(tuple(getattr(self, f.name) for f in dataclasses.fields(self)))

    def __hash__(self) -> int:  # memoized launch parameters hash the problem on every call
        return self._hash

    def __getstate__(self) -> dict:
        # the fields only: the cached values (the hash includes torch.dtype's per-process
        # hash) are recomputed where the copy lives
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def key(self) -> tuple:
        """Autotuning key: everything that changes the best configuration."""
        return (self.kind, str(self.dtype), self.n, self.c, self.h, self.w, self.k_out, self.r,
                self.s, self.stride, self.padding, self.dilation, self.groups, self.has_res,
                self.tf32)

    def index64(self) -> bool:
        p, q = self.pq
        biggest = max(self.n * self.h * self.w * self.c, self.n * p * q * self.k_out)
        return biggest + self.c * 8 > _INT32_LIMIT  # margin: padded-row offsets past the end

    def elem_bytes(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @staticmethod
    def from_tensors(x, weight, stride, padding, dilation, groups, residual=None, relu=True,
                     tf32: bool | None = None):
        """The problem of one call; ``tf32`` overrides ``torch.backends.cudnn.allow_tf32``.
        Equal calls get the same (cached) instance, with its derived values already known."""
        if x.dtype == torch.float32:
            tf32 = cudnn_allow_tf32() if tf32 is None else bool(tf32)
        else:
            tf32 = False
        return _problem(x.shape, weight.shape, _pair(stride), _pair(padding), _pair(dilation),
                        int(groups), x.dtype, residual is not None, bool(relu), tf32)


@functools.lru_cache(maxsize=4096)
def _problem(xs, ws, stride, padding, dilation, groups, dtype, has_res, relu, tf32):
    n, c, h, w = xs
    return ConvProblem(n, c, h, w, ws[0], ws[2], ws[3], stride, padding, dilation, groups,
                       dtype, has_res, relu, tf32)


def tma_box(prob: ConvProblem) -> tuple[int, int] | None:
    """The output's (height, width) when ``prob``'s activation boxes can be loaded by TMA
    (an implicit-GEMM convolution with one group whose strides divide the input's height
    and width, as ResNet's 3x3/2 and 1x1/2 layers at even sizes: each tap's tile is then a
    box of the input seen as ``[N, H/sh, sh, W/sw, sw*C]``), for the implicit-GEMM TMA
    rows; else ``None``. Dtype, channel counts and alignment are checked by the pruner and
    :func:`_tma_ready`."""
    (sh, sw) = prob.stride
    if prob.kind == "conv" and prob.groups == 1 and prob.h % sh == 0 and prob.w % sw == 0:
        return prob.pq
    return None


def _pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


def _pow2_divisor(v: int) -> int:
    return v & -v


def conv_kind(prob: ConvProblem) -> str:
    """Which schedule runs ``prob``: ``gemm``, ``conv``, ``grouped`` or ``stem``."""
    c_g, k_g = prob.c_g, prob.k_g
    if (prob.groups == 1 and prob.r == prob.s == 1 and prob.stride == (1, 1)
            and prob.padding == (0, 0)):
        return "gemm"
    if prob.groups == 1 and c_g < 16 and prob.s * c_g <= 64 and prob.dilation[1] == 1:
        return "stem"
    gmax = _pow2_divisor(prob.groups)
    if (prob.groups > 1 and c_g <= 16 and k_g <= 16 and _pow2(c_g) and _pow2(k_g)
            and gmax >= 2 and gmax * min(c_g, k_g) >= 16):
        return "grouped"
    return "conv"


@dataclass(frozen=True)
class Launch:
    """How one configuration runs one problem: kernel constexprs/options, grid, and the
    kernel's view of the groups after packing (``pack``: how the weight is repacked)."""

    params: MappingProxyType
    grid: tuple[int, ...]  # (tiles, groups), and the splits for a split-K row
    groups: int
    c_g: int
    k_g: int
    pack: tuple | None  # None | ("blockdiag", groups_per_block) | ("rows", block_k)
    # {device: compiled kernel} for fastres.kernels._direct.launch: this description fixes
    # everything that selects the compiled kernel but the tensors' data
    direct: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)


def launch_params(prob: ConvProblem, cfg: KernelConfig, interpreted: bool | None = None,
                  index64: bool | None = None) -> Launch:
    """The kernel's constexpr arguments, launch options and grid for ``cfg`` on ``prob``.

    Memoized (``prob`` and ``cfg`` are frozen): every forward asks again for each layer, and
    building them costs ~13 us of Python per call on a CPU core.
    """
    if interpreted is None:
        interpreted = _interpreted()
    return _launch_params(prob, cfg, bool(interpreted), index64,
                          device_sm_count() if cfg.persistent else 0)


@functools.lru_cache(maxsize=4096)
def _launch_params(prob: ConvProblem, cfg: KernelConfig, interpreted: bool,
                   index64: bool | None, sms: int = 0) -> Launch:
    kind = prob.kind
    bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
    groups, c_g, k_g, pack, even_c = prob.groups, prob.c_g, prob.k_g, None, False
    if cfg.persistent and kind != "gemm":
        raise ValueError(f"persistent configuration {cfg} on a {kind} problem: persistent "
                         "programs run 1x1 stride-1 convolutions (gemm) only")
    if cfg.tma and not cfg.box_h and kind != "gemm":
        raise ValueError(f"TMA configuration {cfg} on a {kind} problem: TMA programs without "
                         "an output block (box_h) run 1x1 stride-1 convolutions (gemm) only")
    if cfg.box_h:
        if not cfg.tma or cfg.persistent or tma_box(prob) is None:
            raise ValueError(
                f"TMA block configuration {cfg} on a {kind} problem with stride "
                f"{prob.stride}, input {prob.h}x{prob.w} and {prob.groups} group(s): its boxes "
                "run one-group implicit-GEMM convolutions (conv) whose strides divide the "
                "input's height and width only, with tma and not persistent")
        if (not _pow2(cfg.box_n) or bm % (cfg.box_n * cfg.box_h)
                or not _pow2(bm // (cfg.box_n * cfg.box_h))):
            raise ValueError(f"TMA block configuration {cfg}: block_m {bm} is not box_n "
                             f"{cfg.box_n} (a power of two) times box_h {cfg.box_h} times a "
                             "power of two")
        if prob.c % bk:  # a partial block would read the next tap's (or phase's) channels
            raise ValueError(f"TMA block configuration {cfg}: {prob.c} input channels are "
                             f"not a whole number of {bk}-channel blocks")
    split = max(cfg.split_k, 1)
    if split > 1:
        if kind not in ("gemm", "conv") or cfg.persistent or cfg.tma or cfg.early_res:
            raise ValueError(f"split-K configuration {cfg} on a {kind} problem: split-K runs "
                             "1x1 GEMMs and implicit-GEMM convolutions (gemm, conv), with "
                             "none of persistent, TMA or early residual")
        if split * prob.m * prob.k_out > _INT32_LIMIT:
            raise ValueError(f"split-K configuration {cfg}: its workspace of {split} x "
                             f"{prob.m} x {prob.k_out} fp32 partial sums has 2**31 or more "
                             "values (32-bit offsets); split-K is for small layers")
    persistent = cfg.persistent > 0
    if kind == "gemm":
        even_c = prob.c % bk == 0
    elif kind == "conv":
        even_c = c_g % bk == 0
    elif kind == "grouped":
        # Block-diagonal packing: gpb groups become one group of gpb*c_g input channels, at
        # most the row's block_k (the pruner's shared-memory estimate; a 16 // k_g term here
        # packed 256 channels for 16 -> 1 channels per group, over the H100's limit). A packed
        # group narrower than 16 output channels runs a 16-column N tile, masked.
        gpb = max(bk // c_g, 2, 16 // c_g)
        gpb = min(gpb, _pow2_divisor(prob.groups))
        groups, c_g, k_g, pack = prob.groups // gpb, gpb * c_g, gpb * k_g, ("blockdiag", gpb)
        bk, bn, even_c = c_g, max(min(bn, k_g), 16), True
    else:  # stem: K step = one kernel row, S*C zero-padded to a power of two
        bk = _pow2_at_least(prob.s * prob.c_g, 16)
        pack = ("rows", bk)
    if prob.dtype != torch.float32:
        # irrelevant to fp16/bf16 tensor-core dots: Triton's default; exact fp32 operands when
        # interpreted (UPCAST)
        precision = "ieee" if interpreted else "tf32"
    else:
        precision = "tf32" if prob.tf32 and not interpreted else "ieee"
    params = dict(
        # split-K: the partial sums go out raw; split_k_epilogue_kernel adds bias, residual
        R=prob.r, S=prob.s, MODE=_MODES[kind], HAS_RES=prob.has_res and split == 1,
        RELU=prob.relu and split == 1,
        EVEN_C=even_c, INDEX64=prob.index64() if index64 is None else index64,
        UPCAST=bool(interpreted), PRECISION=precision,
        # TF32 operands rounded also when interpreted: the interpreter's exact fp32 dot of
        # rounded operands is what the tensor cores compute (CPU tests see TF32's error)
        ROUND_TF32=prob.tf32 and prob.dtype == torch.float32,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=cfg.group_m,
        # the real groups inside a packed one (the non-finite slow path); 0: not grouped
        SUB_C=prob.c_g if kind == "grouped" else 0, SUB_K=prob.k_g if kind == "grouped" else 0,
        EARLY_RES=cfg.early_res and prob.has_res,
        PERSISTENT=persistent, TMA=cfg.tma, SPLIT_K=split, BOX_H=cfg.box_h,
        BOX_STRIDED=bool(cfg.box_h) and prob.stride != (1, 1), BOX_N=cfg.box_n,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if cfg.box_h:  # output blocks of box_h x box_w pixels of box_n images
        rows, cols = box_blocks(cfg, prob.pq)
        tiles = triton.cdiv(prob.n, cfg.box_n) * rows * cols * triton.cdiv(k_g, bn)
    else:
        tiles = triton.cdiv(prob.m, bm) * triton.cdiv(k_g, bn)
    # persistent: cfg.persistent programs per SM (``sms``: the device's count), each looping
    grid = (min(tiles, cfg.persistent * (sms or SMS)) if persistent else tiles, groups)
    if split > 1:
        grid = (*grid, split)
    return Launch(MappingProxyType(params), grid, groups, c_g, k_g, pack)  # shared: read-only


def pack_block_diagonal(weight: torch.Tensor, groups: int, gpb: int) -> torch.Tensor:
    """``[C_out, C_g, R, S]`` grouped weight -> ``[C_out, R, S, gpb*C_g]`` contiguous, where
    each output channel's row holds its group's C_g weights and zeros for the other gpb-1
    groups of its block: the same convolution with ``groups // gpb`` groups."""
    k_out, c_g, r, s = weight.shape
    k_g = k_out // groups
    w = weight.permute(0, 2, 3, 1).reshape(groups // gpb, gpb, k_g, r, s, c_g)
    out = weight.new_zeros((groups // gpb, gpb, k_g, r, s, gpb, c_g))
    for j in range(gpb):
        out[:, j, :, :, :, j, :] = w[:, j]
    return out.reshape(k_out, r, s, gpb * c_g)


def pack_rows(weight: torch.Tensor, block_k: int) -> torch.Tensor:
    """``[C_out, C, R, S]`` -> ``[C_out, R, block_k]``: each kernel row's S*C weights in
    (s, c) order, zero-padded to ``block_k`` (16-byte aligned rows, no mask in the kernel)."""
    k_out, c, r, s = weight.shape
    w = weight.permute(0, 2, 3, 1).reshape(k_out, r, s * c)
    return torch.nn.functional.pad(w, (0, block_k - s * c)).contiguous()


_PACKED: dict[tuple, tuple[weakref.ref, torch.Tensor]] = {}


def _packed_weight(weight: torch.Tensor, groups: int, pack: tuple) -> torch.Tensor:
    """``weight`` repacked per ``pack``, cached while the weight object lives unchanged.

    Unchanged means the same object, storage and version counter: in-place edits through
    ``.data``, or of an inference tensor inside ``torch.inference_mode()``, are not seen
    (as for the inference plan); pass a new tensor after such an edit."""
    try:
        version = weight._version
    except RuntimeError:  # inference tensors have no version counter
        version = -1
    # groups: the same weight packs differently for another group count with the same pack
    key = (id(weight), weight.data_ptr(), version, weight.dtype, weight.device,
           tuple(weight.shape), groups, pack)
    hit = _PACKED.get(key)
    if hit is not None and hit[0]() is weight:
        return hit[1]
    # drop the packings of this weight's earlier contents (an edit in place, say an optimizer
    # step between calls, would otherwise keep one stale copy each); a dead weight's entries
    # went with it (_drop_packed)
    for k in [k for k, (ref, _) in list(_PACKED.items())
              if ref() is weight and k[1:3] != key[1:3]]:
        _PACKED.pop(k, None)  # (another thread may have pruned it)
    with torch.no_grad():
        if pack[0] == "blockdiag":
            packed = pack_block_diagonal(weight, groups, pack[1])
        else:
            packed = pack_rows(weight, pack[1])
    # the entry goes with the weight: a dropped model's packed copies (device memory, larger
    # than the weight for block-diagonal packing) are freed with it, not at the next miss
    _PACKED[key] = (weakref.ref(weight, functools.partial(_drop_packed, key)), packed)
    return packed


def _drop_packed(key: tuple, ref: weakref.ref) -> None:
    hit = _PACKED.get(key)
    if hit is not None and hit[0] is ref:  # (not a later entry that reused the key)
        _PACKED.pop(key, None)


def _interpreted() -> bool:
    """The kernels are interpreted functions (see ``_backend.kernels_interpreted``)."""
    return kernels_interpreted()


_DEVICE_PROPS: dict[tuple[int, str], int] = {}


def _device_prop(name: str, default: int) -> int:
    """Integer property ``name`` of the current CUDA device (read once per device), or
    ``default`` without a GPU or where torch does not report it."""
    if not torch.cuda.is_available():
        return default
    idx = torch.cuda.current_device()
    value = _DEVICE_PROPS.get((idx, name))
    if value is None:
        props = torch.cuda.get_device_properties(idx)
        value = int(getattr(props, name, 0)) or default
        _DEVICE_PROPS[(idx, name)] = value
    return value


def device_smem_limit() -> int:
    """The current CUDA device's opt-in shared memory per block (bytes), what the rows are
    pruned against: 227 KiB on H100/H200, 163 KiB on A100, ~99 KiB on sm_86/sm_89. Without
    a GPU, H100's (:data:`~fastres.kernels.configs.SMEM_LIMIT`)."""
    return _device_prop("shared_memory_per_block_optin", SMEM_LIMIT)


def device_sm_count() -> int:
    """The current CUDA device's multiprocessors (the persistent rows' grid); without a GPU,
    H100's (:data:`~fastres.kernels.configs.SMS`)."""
    return _device_prop("multi_processor_count", SMS)


def problem_configs(prob: ConvProblem,
                    tensors: tuple[torch.Tensor, ...] | None = None) -> list[KernelConfig]:
    """Candidate configurations for ``prob`` (one, the small one, under the interpreter),
    pruned for the current CUDA device's shared memory (:func:`device_smem_limit`): on a
    GPU with less than H100 the first row, the pinned one, must still launch.

    With ``tensors`` (the call's, as the launcher passes them to the kernel), the TMA rows
    that would run as their twin without TMA for these tensors (:func:`_tma_ready`: an
    operand not 16-byte aligned) are left out: a tuner timing the TMA row's label would time
    the twin and remember a TMA row it never ran. (The twin is in the list, except for the
    persistent TMA rows under a Triton that offers no pointer persistent rows; rows without
    TMA remain either way.)"""
    kind = prob.kind
    if _interpreted():  # grouped: 64 packed channels -> few, large programs
        return [interpreter_config(prob.m, prob.k_g, 64 if kind == "grouped" else prob.k_extent)]
    rows = prune(TABLES[kind], kind, prob.m, prob.k_g, prob.k_extent, prob.elem_bytes(),
                 prob.has_res, taps=prob.taps, smem_limit=device_smem_limit(),
                 sms=device_sm_count(), groups=prob.groups, box=tma_box(prob))
    # (never empty without them: each non-persistent TMA row's twin passes the same pruning,
    # and no problem is offered persistent TMA rows alone)
    if not TMA_ENABLED:
        return [c for c in rows if not c.tma]
    if tensors is not None:
        return [c for c in rows if not c.tma or _tma_runs(c, prob, tensors)]
    return rows


def conv_configs(x, weight, stride, padding, dilation, groups, residual=None,
                 relu=True) -> list[KernelConfig]:
    """Candidate configurations for this call (the tuning engine times these), pruned for
    ``x``'s GPU."""
    prob = ConvProblem.from_tensors(x, weight, stride, padding, dilation, groups, residual,
                                    relu)
    # what the launcher hands the kernel: these as they are where they are already
    # channels-last (and, for the weight, of x's dtype), else its fresh (aligned) copies
    cl = torch.channels_last
    tensors = tuple(t for t in (x, weight, residual) if t is not None
                    and t.dtype == x.dtype and t.is_contiguous(memory_format=cl))
    if x.is_cuda and x.device.index is not None and x.device.index != torch.cuda.current_device():
        with torch.cuda.device(x.device):
            return problem_configs(prob, tensors)
    return problem_configs(prob, tensors)


# -- autotuning ------------------------------------------------------------------------------

_TUNED: dict[tuple, KernelConfig] = {}
# What the tuner measured for each key it timed: {label: ms, or the error of a candidate that
# did not run} (reports: benchmarks/conv_layers.py lists every candidate's time)
_TIMINGS: dict[tuple, dict[str, float | str]] = {}


def _tuned_key(prob: ConvProblem) -> tuple:
    """``prob``'s key on the current CUDA device: a machine with two kinds of GPU (the rows
    are pruned per device's shared memory) must not run one GPU's winner on the other."""
    return (prob.key(), torch.cuda.current_device() if torch.cuda.is_available() else None)


def tuned_config(prob: ConvProblem) -> KernelConfig | None:
    """The configuration remembered for ``prob``'s key on the current device, if it was tuned
    (or set)."""
    return _TUNED.get(_tuned_key(prob))


def tuning_timings(prob: ConvProblem) -> dict[str, float | str]:
    """Milliseconds of every candidate the tuner timed for ``prob``'s key on the current
    device, in the order tried (the error message for one that did not run); empty when it
    timed none (remembered, pinned, a single candidate, or interpreted)."""
    return dict(_TIMINGS.get(_tuned_key(prob), {}))


def set_tuned_config(prob: ConvProblem, cfg: KernelConfig) -> None:
    """Pin ``cfg`` for ``prob``'s key on the current device."""
    _TUNED[_tuned_key(prob)] = cfg


def _time_ms(fn) -> float:
    """GPU milliseconds of ``fn()``: the tuner's timer (the host's launching not timed)."""
    from fastres.tuning import cuda_event_timer

    return cuda_event_timer(fn)


def _choose_config(prob: ConvProblem, run, check=None, warm=None,
                   tensors: tuple[torch.Tensor, ...] | None = None) -> KernelConfig:
    """Best configuration for ``prob``: the first in pinned mode (``FASTRES_TUNE=0``,
    deterministic algorithms), else remembered, else timed once (GPU), else the first.

    ``run(cfg)`` launches one candidate and returns what it wrote; ``check(output)`` (when
    given) returns that output's relative error and the bound it must meet: a candidate
    outside its bound is wrong (a kernel defect, pytorch#173068-style), listed with its
    error and never chosen. ``warm(cfg)`` (when given) compiles one candidate without
    launching it: every candidate is compiled that way, on a pool of threads, before any is
    timed. ``tensors``: the call's, for :func:`problem_configs` (TMA rows that run
    without TMA for them are not timed); a call whose tensors are not all 16-byte aligned
    is remembered apart (chosen without the TMA rows, its choice must not stand for the
    aligned calls of the problem, which :func:`tuned_config` reports)."""
    from fastres.tuning import mode

    if mode() == "pinned":  # (before the remembered one: pinned means the documented row)
        return problem_configs(prob)[0]
    key = _tuned_key(prob)
    if tensors is not None and not _direct.aligned(tensors):
        key += ("unaligned",)
    cfg = _TUNED.get(key)
    if cfg is not None:
        return cfg
    cands = problem_configs(prob, tensors)
    if len(cands) == 1 or _interpreted():
        return cands[0]
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return cands[0]  # no timing inside a CUDA graph capture (tune before capturing)
    if warm is not None:
        _direct.compile_in_threads([functools.partial(warm, c) for c in cands])
    best, best_ms, timings = None, float("inf"), {}
    for cand in cands:
        try:
            if check is not None:
                err, tol = check(run(cand))
                if not err <= tol:
                    timings[str(cand)] = f"wrong result: relative error {err:.3g} > {tol:g}"
                    continue
            ms = _time_ms(lambda cand=cand: run(cand))
        except Exception as exc:  # out of resources on this GPU: not a candidate here
            timings[str(cand)] = f"{type(exc).__name__}: {str(exc)[:200]}"
            continue
        timings[str(cand)] = ms
        if ms < best_ms:
            best, best_ms = cand, ms
    _TIMINGS[key] = timings
    if best is None:
        raise RuntimeError("fastres: no Triton conv configuration ran:\n" + "\n".join(
            f"{label}: {err}" for label, err in timings.items()))
    _TUNED[key] = best
    return best


# -- launcher --------------------------------------------------------------------------------


def conv_bias_act_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    stride=(1, 1),
    padding=(0, 0),
    dilation=(1, 1),
    groups: int = 1,
    residual: torch.Tensor | None = None,
    relu: bool = True,
    *,
    config: KernelConfig | None = None,
    out: torch.Tensor | None = None,
    tf32: bool | None = None,
    index64: bool | None = None,
    compile_only: bool = False,
) -> torch.Tensor:
    """``relu?(conv2d(x, weight) + bias + residual)`` by the Triton implicit-GEMM kernel.

    x: ``[N, C_in, H, W]`` fp32/fp16/bf16 (read channels-last; copied if not); weight:
    ``[C_out, C_in/groups, R, S]`` (read as channels-last); bias: ``[C_out]`` (fp32);
    residual: ``None`` or ``[N, C_out, P, Q]`` in x's dtype. Returns ``[N, C_out, P, Q]`` in
    x's dtype, channels-last. ``config``: an explicit :class:`KernelConfig` (``None``: the
    tuned one); ``out``: a channels-last contiguous tensor to write (tests poison it; it may
    be ``residual`` itself, an in-place residual add, but not ``x``);
    ``tf32``: override ``torch.backends.cudnn.allow_tf32``; ``index64``: force 64-bit
    offsets (``None``: when a tensor has more than 2**31 elements). ``compile_only``: compile
    the kernel that ``config`` selects for this call (Triton's ``warmup``; with
    ``config=None``, every candidate the tuner would time) and launch nothing; ``out`` is
    returned unwritten. The tuner (``config=None``) compiles its candidates that way, on a
    pool of threads (:func:`fastres.kernels._direct.compile_in_threads`), before timing any.
    """
    cl = torch.channels_last
    prob = ConvProblem.from_tensors(x, weight, stride, padding, dilation, groups, residual,
                                    relu, tf32)
    x = x.contiguous(memory_format=cl)
    # (dtype tests first: a no-op .to() still costs ~1 us of dispatch, on every layer)
    if weight.dtype != x.dtype:
        weight = weight.to(x.dtype)
    packable = weight  # packing reads any layout; keep the caller's object (cache key)
    weight = weight.contiguous(memory_format=cl)
    if bias.dtype != torch.float32:
        bias = bias.to(torch.float32)
    bias = bias.contiguous()
    if residual is not None:
        if residual.dtype != x.dtype:
            residual = residual.to(x.dtype)
        residual = residual.contiguous(memory_format=cl)
    p, q = prob.pq
    shape = (prob.n, prob.k_out, p, q)
    if out is None:
        out = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=cl)
    elif (tuple(out.shape) != shape or out.dtype != x.dtype
          or not out.is_contiguous(memory_format=cl)):
        raise ValueError(f"conv_bias_act_triton: out must be a channels-last {x.dtype} tensor "
                         f"of shape {shape}, got {out.dtype} {tuple(out.shape)}")
    if prob.m == 0 or prob.k_out == 0:
        return out
    res = residual if residual is not None else out  # never read when HAS_RES is False

    def run(cfg: KernelConfig, dst: torch.Tensor = out, warmup: bool = False) -> torch.Tensor:
        if cfg.tma:
            cfg = _tma_ready(cfg, prob, x, weight, res, dst)
        lp = launch_params(prob, cfg, index64=index64)
        w = weight if lp.pack is None else _packed_weight(packable, prob.groups, lp.pack)
        split = lp.params["SPLIT_K"]
        # split-K: the fp32 partial sums first, then bias, residual and ReLU into dst
        partial = dst if split == 1 else torch.empty((split, prob.m, prob.k_out),
                                                     dtype=torch.float32, device=x.device)
        args = (x, w, bias, res, partial,
                prob.m, prob.h, prob.w, prob.c, p, q, prob.k_out, lp.c_g, lp.k_g,
                prob.stride[0], prob.stride[1], prob.padding[0], prob.padding[1],
                prob.dilation[0], prob.dilation[1])
        _launch(conv_bias_act_kernel, lp.grid, args, lp.params, lp.direct, 5, warmup)
        if split > 1:
            _split_k_epilogue(prob, split, partial, bias, res, dst, warmup)
        return dst

    if compile_only:
        if config is not None:
            return run(config, warmup=True)
        cands = problem_configs(prob)
        if not _direct.compile_in_threads([functools.partial(run, c, warmup=True)
                                           for c in cands]):
            for cand in cands:
                run(cand, warmup=True)
        return out

    if config is None:
        target: list[torch.Tensor] = []

        def tune_run(cfg: KernelConfig) -> torch.Tensor:  # only when candidates are timed
            if not target:
                # ``out`` sharing the residual's memory (an in-place residual add) is right in
                # one launch, but the tuner launches each candidate repeatedly and every
                # launch would add the convolution to the previous result: time those
                # candidates into a scratch output instead.
                shared = residual is not None and (residual.untyped_storage().data_ptr()
                                                   == out.untyped_storage().data_ptr())
                target.append(torch.empty_like(out, memory_format=cl) if shared else out)
            return run(cfg, target[0])

        reference: list[torch.Tensor] = []

        def check(y: torch.Tensor) -> tuple[float, float]:
            """Each candidate's output against torch's (computed once, in fp32, before any
            candidate wrote over an in-place residual: those write to scratch)."""
            from fastres.tuning import _rel_err, _tolerance

            if not reference:
                with torch.no_grad():
                    ref = F.conv2d(x.float(), packable.float(), bias, prob.stride,
                                   prob.padding, prob.dilation, prob.groups)
                    if residual is not None:
                        ref += residual.float()
                    reference.append(torch.relu(ref) if relu else ref)
            return _rel_err(y, reference[0]), _tolerance((x,))

        config = _choose_config(prob, tune_run, check, functools.partial(run, warmup=True),
                                (x, weight, res, out))
    run(config)
    return out


# configs.TMA_ROWS: ``FASTRES_TMA=0`` or a Triton without device descriptors turns them off
TMA_ENABLED = TMA_ROWS
# the kernels the tuner compiles on a pool of threads (their failed compiles are retried)
_direct.pooled_kernels(conv_bias_act_kernel, split_k_epilogue_kernel)


def _launch(kernel, grid, args, params, cache, n_tensors: int, warmup: bool) -> None:
    """``_direct.launch``, or with ``warmup`` Triton's ``warmup``: compile, launch nothing (an
    interpreted kernel has nothing to compile)."""
    if not warmup:
        _direct.launch(kernel, grid, args, params, cache, n_tensors)
    elif not _interpreted():
        kernel.warmup(*args, grid=grid, **params)


def split_k_epilogue_params(split: int, has_res: bool, relu: bool, interpreted: bool) -> dict:
    """Constexprs and launch options of :func:`split_k_epilogue_kernel` (``BLOCK``: output
    values per program; the compile report compiles these)."""
    return dict(SPLIT_K=split, HAS_RES=has_res, RELU=relu, UPCAST=interpreted,
                BLOCK=256 if interpreted else 1024, num_warps=4)


def _split_k_epilogue(prob: ConvProblem, split: int, partial: torch.Tensor,
                      bias: torch.Tensor, res: torch.Tensor, out: torch.Tensor,
                      warmup: bool = False) -> None:
    """A split-K row's second kernel: ``out`` = the ``partial`` sums added, + bias (+
    ``res``) (ReLU), one rounding to ``out``'s dtype (:func:`split_k_epilogue_kernel`)."""
    mn = prob.m * prob.k_out
    params, grid, direct = _split_k_epilogue_launch(prob, split, _interpreted())
    _launch(split_k_epilogue_kernel, grid, (partial, bias, res, out, mn, prob.k_out), params,
            direct, 4, warmup)


@functools.lru_cache(maxsize=1024)
def _split_k_epilogue_launch(prob: ConvProblem, split: int, interpreted: bool):
    """(params, grid, direct-launch cache) of ``prob``'s split-K epilogue, built once per
    problem (as :func:`launch_params` is for the main kernel: a split row runs every
    forward)."""
    params = split_k_epilogue_params(split, prob.has_res, prob.relu, interpreted)
    return (MappingProxyType(params), (triton.cdiv(prob.m * prob.k_out, params["BLOCK"]),),
            {})


def _tma_ready(cfg: KernelConfig, prob: ConvProblem, *tensors: torch.Tensor) -> KernelConfig:
    """``cfg`` where its tensor descriptors can be made for these tensors (16-bit, every one
    16-byte aligned, rows of whole 16-byte multiples: channel counts multiples of 8), with
    Triton's scratch allocator set for the descriptors the kernel makes on the device; else
    the same row without TMA. An implicit-GEMM block row also runs without TMA on the
    implicit-GEMM layers its boxes do not fit (grouped layers of this schedule, or a stride
    that does not divide the input's size) and where a channel block would run past its tap.
    (A TMA row of another schedule's table, say a GEMM row on a 3x3 layer or a block row on
    a GEMM: :func:`launch_params` raises.)"""
    if prob.kind != ("conv" if cfg.box_h else "gemm"):
        return cfg  # (launch_params says what TMA rows run, whatever the tensors)
    if not _tma_runs(cfg, prob, tensors):
        return dataclasses.replace(cfg, tma=False, box_h=0, box_n=1)
    if tensors[0].is_cuda:
        _set_scratch_allocator()
    return cfg


def _tma_runs(cfg: KernelConfig, prob: ConvProblem, tensors) -> bool:
    """TMA row ``cfg`` of ``prob``'s schedule runs with TMA on these tensors (the conditions
    of :func:`_tma_ready`)."""
    return (TMA_ENABLED and prob.elem_bytes() == 2 and prob.c % 8 == 0 and prob.k_out % 8 == 0
            and (not cfg.box_h or (tma_box(prob) is not None and prob.c % cfg.block_k == 0))
            and _direct.aligned(tensors))


def _scratch(size: int, alignment: int, stream) -> torch.Tensor:
    """Triton's device scratch (the tensor descriptors a TMA program writes), from torch's
    caching allocator on the current device and stream (inside a CUDA graph capture: the
    graph's pool). Blocks are 512-byte aligned, more than Triton asks."""
    return torch.empty(size, dtype=torch.uint8, device="cuda")


def _set_scratch_allocator() -> None:
    """Give Triton :func:`_scratch` as its allocator in this context (thread), unless one is
    set already (the user's, or torch's inductor's): Triton's default raises."""
    try:  # (Triton's private module: 3.6 and 3.8 keep the allocator in a ContextVar there)
        from triton.runtime import _allocation

        unset = isinstance(_allocation._allocator.get(), _allocation.NullAllocator)
    except (ImportError, AttributeError):  # cannot tell: a launch without one would raise
        unset = True
    if unset:
        triton.set_allocator(_scratch)


def _pair(v) -> tuple[int, int]:
    if isinstance(v, int):
        return (int(v), int(v))
    t = tuple(v)
    if len(t) != 2:
        raise ValueError(f"expected an int or a pair, got {t}")
    if type(t[0]) is int and type(t[1]) is int:
        return t
    return (int(t[0]), int(t[1]))


def supports_conv(x, weight, bias, stride, padding, dilation, groups, residual=None,
                  relu=True) -> str | None:
    """``None`` when the Triton kernel runs this call, else why not."""
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"dtype {x.dtype} (Triton conv runs float32, float16, bfloat16)"
    if weight.dtype != x.dtype:
        return f"weight dtype {weight.dtype} differs from x's {x.dtype}"
    if x.device.type != "cuda" and not _interpreted():
        return f"tensors on {x.device.type}"
    h, w = x.shape[2], x.shape[3]
    p, q = conv_output_size(h, w, weight.shape[2], weight.shape[3], _pair(stride),
                            _pair(padding), _pair(dilation))
    if x.shape[0] * max(h * w, p * q, 1) >= _INT32_LIMIT:  # pixel indices are int32
        return "2**31 or more input or output pixels"
    if int(groups) > _GRID_Y_LIMIT:  # the grid's y dimension is the group count
        return f"{groups} groups (the GPU grid's y dimension allows {_GRID_Y_LIMIT})"
    return None


# Triton decided interpreted or compiled when the kernels above were defined: record it, so
# that a TRITON_INTERPRET set or unset later does not route calls the kernels cannot take.
_backend._kernels_interpreted = not isinstance(conv_bias_act_kernel,
                                               triton.runtime.JITFunction)
