"""``conv_bias_act``: convolution + per-channel bias (+ residual) (+ ReLU), one op.

Contract
--------
``conv_bias_act(x, weight, bias, stride, padding, dilation, groups, residual=None, relu=True)``

- ``x``: ``[N, C_in, H, W]``, float32 / float16 / bfloat16, any memory format (the fast
  implementations read it channels-last; the op makes it so).
- ``weight``: ``[C_out, C_in // groups, R, S]``, same dtype as ``x``. The inference plan keeps
  it in ``torch.channels_last`` memory format, which is the ``[C_out, R, S, C_in/groups]``
  packing the implicit-GEMM kernels read (K = (r, s, c), c fastest).
- ``bias``: ``[C_out]``, float32 (the folded BatchNorm shift); ``None`` in the Python
  function means zeros.
- ``residual``: ``None`` or ``[N, C_out, P, Q]`` in ``x``'s dtype.
- returns ``[N, C_out, P, Q]`` in ``x``'s dtype, ``torch.channels_last`` memory format, with

      out = relu?( conv2d(x, weight) + bias + residual )

  accumulated in fp32 and rounded once to the output dtype (the reference rounds the
  convolution to ``x``'s dtype first, as eager PyTorch does). fp32 inputs use TF32 exactly
  when ``torch.backends.cudnn.allow_tf32`` is true.

The reference implementation here is plain torch; Triton and CUDA implementations register
with :mod:`fastres.ops._backend` and must match it within DESIGN.md's tolerances.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastres.ops import _backend
from fastres.ops._checks import (bias_or_zeros, bool_arg, check_conv_args, conv_output_size,
                                 int_arg)

OP = "conv_bias_act"


def conv_bias_act_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    residual: torch.Tensor | None = None,
    relu: bool = True,
) -> torch.Tensor:
    """Plain-torch reference of :func:`conv_bias_act` (see the module docstring)."""
    y = F.conv2d(x, weight, None, tuple(stride), tuple(padding), tuple(dilation), groups)
    y = y.float() + bias.float().view(1, -1, 1, 1)
    if residual is not None:
        y = y + residual.float()
    if relu:
        y = torch.relu(y)
    return y.to(x.dtype).contiguous(memory_format=torch.channels_last)


_backend.register_impl(OP, "torch", conv_bias_act_reference)


@torch.library.custom_op("fastres::conv_bias_act", mutates_args=())
def _conv_bias_act_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    residual: torch.Tensor | None,
    relu: bool,
) -> torch.Tensor:
    # checked here too: torch.ops.fastres.conv_bias_act can be called without the wrapper
    check_conv_args(x, weight, bias, stride, padding, dilation, groups, residual)
    return _backend.run_op(OP, x, weight, bias, stride, padding, dilation, groups, residual,
                           relu)


@_conv_bias_act_op.register_fake
def conv_bias_act_fake(x, weight, bias, stride, padding, dilation, groups, residual, relu):
    """Shape, dtype and layout of the output, after the op's checks, so that tracing
    (torch.compile, export, a meta forward) fails where the call would, with the op's message;
    also behind the fake of the extension's ``fastres_C::conv1x1``."""
    check_conv_args(x, weight, bias, stride, padding, dilation, groups, residual)
    n, _, h, w = x.shape
    p, q = conv_output_size(h, w, weight.shape[2], weight.shape[3], stride, padding, dilation)
    return x.new_empty((n, weight.shape[0], p, q)).contiguous(memory_format=torch.channels_last)


def conv_bias_act(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    stride=(1, 1),
    padding=(0, 0),
    dilation=(1, 1),
    groups: int = 1,
    residual: torch.Tensor | None = None,
    relu: bool = True,
) -> torch.Tensor:
    """Fused convolution + bias (+ residual) (+ ReLU); see the module docstring for shapes.

    Arguments are validated here, before any kernel runs, with errors that name what was
    expected and what was given.
    """
    bias = bias_or_zeros(bias, weight)
    stride, padding, dilation = (_pair(v, name) for v, name in
                                 ((stride, "stride"), (padding, "padding"),
                                  (dilation, "dilation")))
    groups = int_arg(OP, "groups", groups)
    relu = bool_arg(OP, "relu", relu)
    check_conv_args(x, weight, bias, stride, padding, dilation, groups, residual)
    return _conv_bias_act_op(x, weight, bias, stride, padding, dilation, groups, residual, relu)


def _pair(v, name: str) -> list[int]:
    if isinstance(v, (tuple, list)):
        if len(v) != 2:
            raise ValueError(f"conv_bias_act: {name} must be an int or a pair, got {v!r}")
        return [int_arg(OP, f"{name}[{i}]", e) for i, e in enumerate(v)]
    if isinstance(v, str):  # F.conv2d's padding="same"/"valid"
        raise TypeError(f"conv_bias_act: {name} must be an int or a pair of ints, got {v!r} "
                        "(string paddings are not supported)")
    i = int_arg(OP, name, v)
    return [i, i]
