"""``stem``: the ResNet stem, 7x7/2 convolution + folded BN + ReLU + 3x3/2 max-pool, one op.

Contract: ``stem(x, weight, bias) -> [N, C_out, P, Q]`` with ``x`` ``[N, C_in, H, W]`` (any
memory format; float32/float16/bfloat16), ``weight`` ``[C_out, C_in, 7, 7]`` in ``x``'s dtype
and ``bias`` ``[C_out]`` float32; equal to
``max_pool2d(conv_bias_act(x, weight, bias, 2, 3, 1, 1, relu=True), 3, 2, 1)``, returned in
``torch.channels_last`` memory format. The reference runs the two ops (each on whichever
backend is chosen for it); a fused implementation never writes the pre-pool activation.
"""

from __future__ import annotations

import torch

from fastres.ops import _backend
from fastres.ops._checks import bias_or_zeros, check_stem_args
from fastres.ops.conv_bias_act import conv_bias_act
from fastres.ops.max_pool import max_pool2d

OP = "stem"


def stem_reference(x, weight, bias) -> torch.Tensor:
    """Unfused stem: ``conv_bias_act`` (7x7/2, pad 3, ReLU) then ``max_pool2d`` (3/2, pad 1)."""
    y = conv_bias_act(x, weight, bias, 2, 3, 1, 1, None, True)
    return max_pool2d(y, 3, 2, 1)


_backend.register_impl(OP, "torch", stem_reference)


@torch.library.custom_op("fastres::stem", mutates_args=())
def _stem_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    check_stem_args(x, weight, bias)  # also for torch.ops.fastres.stem called directly
    return _backend.run_op(OP, x, weight, bias)


def _stem_shape(n, c, h, w):
    h1, w1 = (h + 6 - 7) // 2 + 1, (w + 6 - 7) // 2 + 1
    return n, c, (h1 + 2 - 3) // 2 + 1, (w1 + 2 - 3) // 2 + 1


@_stem_op.register_fake
def stem_fake(x, weight, bias):
    """Shape, dtype and layout of the output, after the op's checks (tracing fails where the
    call would); also the fake of the extension's ``fastres_C::stem``."""
    check_stem_args(x, weight, bias)
    shape = _stem_shape(x.shape[0], weight.shape[0], x.shape[2], x.shape[3])
    return x.new_empty(shape).contiguous(memory_format=torch.channels_last)


def stem(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Fused ResNet stem; see the module docstring. ``bias=None`` means zeros, as in
    :func:`conv_bias_act`."""
    bias = bias_or_zeros(bias, weight)
    check_stem_args(x, weight, bias)
    return _stem_op(x, weight, bias)
