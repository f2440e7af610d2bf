"""Max pooling over NHWC activations in Triton (the ResNet stem's 3x3/2, padding 1).

Padding counts as -inf and a NaN anywhere in a window gives NaN, as in
``torch.nn.functional.max_pool2d``. The comparison runs in fp32 (exact for every input dtype).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastres.kernels import _direct
from fastres.kernels.conv import output_pixel

_INT32_LIMIT = 2**31 - 1


NO_SPECIALIZE = ["M", "H", "W", "P", "Q", "stride", "pad"]


@triton.jit(do_not_specialize=NO_SPECIALIZE)
def max_pool_nhwc_kernel(
    x_ptr, o_ptr,
    M, H, W, C, P, Q, stride, pad,
    KS: tl.constexpr, INDEX64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """out[m, c] = max over the KSxKS window of pixel m; grid (cdiv(M, BLOCK_M),
    cdiv(C, BLOCK_C))."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rc = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    m_ok = rm < M
    c_ok = rc < C
    img, p, q = output_pixel(rm, P, Q, INDEX64)
    if INDEX64:
        rm_i = rm.to(tl.int64)
    else:
        rm_i = rm
    ih0 = p * stride - pad
    iw0 = q * stride - pad
    acc = tl.full((BLOCK_M, BLOCK_C), float("-inf"), tl.float32)
    for r in tl.static_range(KS):
        for s in tl.static_range(KS):
            ih = ih0 + r
            iw = iw0 + s
            ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            ptrs = x_ptr + (((img * H + ih) * W + iw) * C)[:, None] + rc[None, :]
            v = tl.load(ptrs, mask=ok[:, None] & c_ok[None, :], other=float("-inf"))
            v = v.to(tl.float32)
            acc = tl.where((v > acc) | (v != v), v, acc)  # noqa: PLR0124  (NaN sticks)
    o_ptrs = o_ptr + rm_i[:, None] * C + rc[None, :]
    tl.store(o_ptrs, acc.to(o_ptr.dtype.element_ty), mask=m_ok[:, None] & c_ok[None, :])


def _interpreted() -> bool:
    """The kernels are interpreted functions (see ``_backend.kernels_interpreted``)."""
    from fastres.ops._backend import kernels_interpreted

    return kernels_interpreted()


def max_pool2d_triton(x: torch.Tensor, kernel_size: int = 3, stride: int = 2,
                      padding: int = 1, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """Max pooling of ``x`` ``[N, C, H, W]`` (read channels-last) with a square window.

    Returns ``[N, C, P, Q]`` in x's dtype, channels-last. ``out``: optional channels-last
    contiguous tensor to write.
    """
    cl = torch.channels_last
    x = x.contiguous(memory_format=cl)
    n, c, h, w = x.shape
    p = (h + 2 * padding - kernel_size) // stride + 1
    q = (w + 2 * padding - kernel_size) // stride + 1
    shape = (n, c, p, q)
    if out is None:
        out = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=cl)
    elif tuple(out.shape) != shape or out.dtype != x.dtype or not out.is_contiguous(
            memory_format=cl):
        raise ValueError(f"max_pool2d_triton: out must be a channels-last {x.dtype} tensor of "
                         f"shape {shape}, got {out.dtype} {tuple(out.shape)}")
    m = n * p * q
    if m == 0 or c == 0:
        return out
    block_c = min(triton.next_power_of_2(c), 64)
    block_m = 32 if _interpreted() else 64
    index64 = max(x.numel(), out.numel()) + 8 * c > _INT32_LIMIT
    grid = (triton.cdiv(m, block_m), triton.cdiv(c, block_c))
    args = (x, out, m, h, w, c, p, q, stride, padding)
    params = dict(KS=kernel_size, INDEX64=index64, BLOCK_M=block_m, BLOCK_C=block_c,
                  num_warps=4)
    key = ("max_pool", x.dtype, *args[2:], kernel_size, index64)
    _direct.launch(max_pool_nhwc_kernel, grid, args, params, _direct.cache_for(key), 2)
    return out


def supports_max_pool(x, kernel_size, stride, padding) -> str | None:
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"dtype {x.dtype} (Triton max-pool runs float32, float16, bfloat16)"
    if kernel_size > 7:
        return f"kernel_size {kernel_size} > 7 (the window is unrolled)"
    if x.device.type != "cuda" and not _interpreted():
        return f"tensors on {x.device.type}"
    n, _, h, w = x.shape
    p = (h + 2 * padding - kernel_size) // stride + 1
    q = (w + 2 * padding - kernel_size) // stride + 1
    if n * p * q >= _INT32_LIMIT:  # the output pixel index is int32 (INDEX64 or not)
        return "2**31 or more output pixels"
    return None
