"""``max_pool2d``: max pooling over NHWC activations (the ResNet stem's 3x3/2, padding 1).

Contract: ``max_pool2d(x, kernel_size, stride, padding) -> [N, C, P, Q]`` in ``x``'s dtype and
``torch.channels_last`` memory format, equal to ``torch.nn.functional.max_pool2d`` (padding
counts as -inf; a NaN in a window gives NaN).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastres.ops import _backend
from fastres.ops._checks import check_max_pool_args, int_arg

OP = "max_pool2d"


def _out(h: int, k: int, s: int, p: int) -> int:
    return (h + 2 * p - k) // s + 1


def max_pool2d_reference(x, kernel_size: int, stride: int, padding: int) -> torch.Tensor:
    """Plain-torch reference of :func:`max_pool2d`."""
    y = F.max_pool2d(x, kernel_size, stride, padding)
    return y.contiguous(memory_format=torch.channels_last)


_backend.register_impl(OP, "torch", max_pool2d_reference)


@torch.library.custom_op("fastres::max_pool2d", mutates_args=())
def _max_pool2d_op(x: torch.Tensor, kernel_size: int, stride: int, padding: int) -> torch.Tensor:
    check_max_pool_args(x, kernel_size, stride, padding)  # also when called as torch.ops
    return _backend.run_op(OP, x, kernel_size, stride, padding)


@_max_pool2d_op.register_fake
def _(x, kernel_size, stride, padding):
    check_max_pool_args(x, kernel_size, stride, padding)  # tracing fails where the call would
    n, c, h, w = x.shape
    shape = (n, c, _out(h, kernel_size, stride, padding), _out(w, kernel_size, stride, padding))
    return x.new_empty(shape).contiguous(memory_format=torch.channels_last)


def max_pool2d(x: torch.Tensor, kernel_size: int = 3, stride: int = 2,
               padding: int = 1) -> torch.Tensor:
    """Max pooling with square window; see the module docstring."""
    kernel_size, stride, padding = (int_arg(OP, name, v) for name, v in (
        ("kernel_size (one int: the window is square)", kernel_size),
        ("stride (one int)", stride), ("padding (one int)", padding)))
    check_max_pool_args(x, kernel_size, stride, padding)
    return _max_pool2d_op(x, kernel_size, stride, padding)
