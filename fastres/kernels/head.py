"""The ResNet head in Triton: global average pool (fp32 mean, rounded to x's dtype) then the
linear layer (fp32 accumulation, bias in the epilogue) by the 1x1 GEMM schedule of
:mod:`fastres.kernels.conv` — the same arithmetic as eager
``fc(flatten(avgpool(x)))``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastres.kernels import _direct
from fastres.kernels.conv import _interpreted, _to_output, conv_bias_act_triton, conv_configs
from fastres.ops._backend import matmul_allow_tf32

NO_SPECIALIZE = ["HW"]


@triton.jit(do_not_specialize=NO_SPECIALIZE)
def global_avgpool_nhwc_kernel(
    x_ptr, o_ptr, HW, C,
    INDEX64: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr,
    INTERPRETED: tl.constexpr = False,
):
    """out[n, c] = mean over HW of x[n, :, c] (fp32 sum); grid (N, cdiv(C, BLOCK_C))."""
    n = tl.program_id(0)
    if INDEX64:
        n = n.to(tl.int64)
    rc = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = rc < C
    rh = tl.arange(0, BLOCK_HW)
    acc = tl.zeros((BLOCK_HW, BLOCK_C), dtype=tl.float32)
    # the pointer advances each step: an offset h0 * C inside one image would overflow int32
    # for images of 2**31 elements or more, which INDEX64 (the batch offset) does not cover
    ptrs = x_ptr + n * HW * C + (rh * C)[:, None] + rc[None, :]
    for h0 in range(0, HW, BLOCK_HW):
        v = tl.load(ptrs, mask=((h0 + rh) < HW)[:, None] & c_ok[None, :], other=0.0)
        acc += v.to(tl.float32)
        ptrs += BLOCK_HW * C
    mean = tl.sum(acc, axis=0) / HW
    tl.store(o_ptr + n * C + rc, _to_output(mean, o_ptr.dtype.element_ty, INTERPRETED),
             mask=c_ok)


def global_avgpool_triton(x: torch.Tensor) -> torch.Tensor:
    """``x`` ``[N, C, H, W]`` (read channels-last) -> ``[N, C]`` mean in x's dtype."""
    x = x.contiguous(memory_format=torch.channels_last)
    n, c, h, w = x.shape
    out = torch.empty((n, c), dtype=x.dtype, device=x.device)
    if n == 0 or c == 0:
        return out
    if h * w == 0:
        return out.fill_(float("nan"))
    block_c = min(triton.next_power_of_2(c), 128)
    block_hw = min(triton.next_power_of_2(h * w), 16)
    grid = (n, triton.cdiv(c, block_c))
    index64 = x.numel() > 2**31 - 1
    args = (x, out, h * w, c)
    params = dict(INDEX64=index64, BLOCK_HW=block_hw, BLOCK_C=block_c,
                  INTERPRETED=_interpreted(), num_warps=4)
    key = ("avgpool", x.dtype, h * w, c, index64)
    _direct.launch(global_avgpool_nhwc_kernel, grid, args, params, _direct.cache_for(key), 2)
    return out


def avgpool_linear_triton(x: torch.Tensor, weight: torch.Tensor,
                          bias: torch.Tensor, *, config=None,
                          compile_only: bool = False) -> torch.Tensor | None:
    """Global average pool then ``pooled @ weight.T + bias`` -> ``[N, num_classes]``.

    x: ``[N, C, H, W]``; weight ``[num_classes, C]`` in x's dtype; bias ``[num_classes]``
    (x's dtype or fp32; rounded to x's dtype first, as the reference does). fp32 uses TF32
    exactly when ``torch.backends.cuda.matmul.allow_tf32`` is true (eager ``F.linear``'s flag).
    ``config``: the linear layer's GEMM :class:`~fastres.kernels.configs.KernelConfig`
    (``None``: the launcher's, see :func:`head_configs`). ``compile_only``: compile the
    linear layer's kernel for ``config`` (the tuner's warm-up), launch nothing, return
    ``None``; the pool's kernel (one configuration) compiles at its first launch.
    """
    n, c = x.shape[0], x.shape[1]
    k = weight.shape[0]
    b = bias.to(x.dtype).to(torch.float32)
    if compile_only:
        pooled = x.new_empty((n, c))  # (the pool's output: only its shape and dtype count)
    else:
        pooled = global_avgpool_triton(x)
    y = conv_bias_act_triton(
        pooled.view(n, c, 1, 1), weight.contiguous().view(k, c, 1, 1), b,
        (1, 1), (0, 0), (1, 1), 1, None, False,
        tf32=x.dtype == torch.float32 and matmul_allow_tf32(), config=config,
        compile_only=compile_only,
    )
    return None if compile_only else y.reshape(n, k)


def head_configs(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> list:
    """Candidate configurations of the head's linear layer (a 1x1 GEMM on the pooled
    ``[N, C, 1, 1]`` tensor), for the tuning engine."""
    n, c = x.shape[0], x.shape[1]
    k = weight.shape[0]
    # the weight as the launcher passes it (its alignment decides the TMA rows); the pooled
    # input is a fresh tensor
    return conv_configs(x.new_empty((n, c, 1, 1)), weight.contiguous().view(k, c, 1, 1),
                        (1, 1), (0, 0), (1, 1), 1)


def supports_avgpool_linear(x, weight, bias) -> str | None:
    from fastres.ops._backend import triton_interpreted

    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"dtype {x.dtype} (Triton head runs float32, float16, bfloat16)"
    if weight.dtype != x.dtype:
        return f"weight dtype {weight.dtype} differs from x's {x.dtype}"
    if x.device.type != "cuda" and not triton_interpreted():
        return f"tensors on {x.device.type}"
    return None
