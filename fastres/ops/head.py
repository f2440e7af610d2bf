"""``avgpool_linear``: global average pool + linear layer (the ResNet head), one op.

Contract: ``avgpool_linear(x, weight, bias) -> [N, num_classes]`` in ``x``'s dtype, where
``x`` is ``[N, C, H, W]`` (any memory format), ``weight`` is ``[num_classes, C]`` in ``x``'s
dtype and ``bias`` is ``[num_classes]`` (``x``'s dtype or float32). The mean over H and W is
taken in fp32 and rounded to ``x``'s dtype before the linear layer, as eager
``flatten(avgpool(x)) @ weight.T + bias`` does; the linear layer accumulates in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastres.ops import _backend
from fastres.ops._checks import bias_or_zeros, check_head_args

OP = "avgpool_linear"


def avgpool_linear_reference(x, weight, bias) -> torch.Tensor:
    """Plain-torch reference of :func:`avgpool_linear`."""
    pooled = x.float().mean(dim=(2, 3)).to(x.dtype)
    return F.linear(pooled, weight, bias.to(x.dtype))


_backend.register_impl(OP, "torch", avgpool_linear_reference)


@torch.library.custom_op("fastres::avgpool_linear", mutates_args=())
def _avgpool_linear_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    check_head_args(x, weight, bias)  # also for torch.ops.fastres.avgpool_linear directly
    return _backend.run_op(OP, x, weight, bias)


@_avgpool_linear_op.register_fake
def avgpool_linear_fake(x, weight, bias):
    """Shape and dtype of the output, after the op's checks (tracing fails where the call
    would); also behind the fake of the extension's ``fastres_C::avgpool_linear``."""
    check_head_args(x, weight, bias)
    return x.new_empty((x.shape[0], weight.shape[0]))


def avgpool_linear(x: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor | None) -> torch.Tensor:
    """Global average pool then ``x @ weight.T + bias``; see the module docstring.
    ``bias=None`` (an ``nn.Linear(bias=False)``) means zeros."""
    bias = bias_or_zeros(bias, weight)
    check_head_args(x, weight, bias)
    return _avgpool_linear_op(x, weight, bias)
