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
from fastres.ops._checks import check_float_activation

OP = "avgpool_linear"


def avgpool_linear_reference(x, weight, bias) -> torch.Tensor:
    """Plain-torch reference of :func:`avgpool_linear`."""
    pooled = x.float().mean(dim=(2, 3)).to(x.dtype)
    return F.linear(pooled, weight, bias.to(x.dtype))


_backend.register_impl(OP, "torch", avgpool_linear_reference)


@torch.library.custom_op("fastres::avgpool_linear", mutates_args=())
def _avgpool_linear_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return _backend.run(OP, x, weight, bias)


@_avgpool_linear_op.register_fake
def _(x, weight, bias):
    return x.new_empty((x.shape[0], weight.shape[0]))


def avgpool_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Global average pool then ``x @ weight.T + bias``; see the module docstring."""
    check_float_activation("x", x, OP)
    if weight.dim() != 2 or weight.shape[1] != x.shape[1]:
        raise ValueError(f"{OP}: weight must be [num_classes, {x.shape[1]}], "
                         f"got {tuple(weight.shape)}")
    if weight.dtype != x.dtype:
        raise TypeError(f"{OP}: weight dtype must equal x's ({x.dtype}), got {weight.dtype}")
    if bias.shape != (weight.shape[0],):
        raise ValueError(f"{OP}: bias must be ({weight.shape[0]},), got {tuple(bias.shape)}")
    return _avgpool_linear_op(x, weight, bias)
