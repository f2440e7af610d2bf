"""Registers fastres's Triton implementations with :mod:`fastres.ops._backend`.

Imported lazily by ``_backend._load_optional_backends()``; raises ImportError (not a crash)
when Triton is not installed, so the torch reference keeps working.
"""

from __future__ import annotations

try:
    import triton
    import triton.language  # noqa: F401
except Exception as exc:  # pragma: no cover - depends on the environment
    raise ImportError(f"fastres Triton kernels need triton: {exc}") from exc

from fastres.kernels.conv import conv_bias_act_triton, supports_conv
from fastres.kernels.head import avgpool_linear_triton, supports_avgpool_linear
from fastres.kernels.pool import max_pool2d_triton, supports_max_pool
from fastres.ops import _backend


def _conv_bias_act(x, weight, bias, stride, padding, dilation, groups, residual=None,
                   relu=True):
    return conv_bias_act_triton(x, weight, bias, stride, padding, dilation, groups, residual,
                                relu)


def _max_pool2d(x, kernel_size, stride, padding):
    return max_pool2d_triton(x, kernel_size, stride, padding)


def _stem(x, weight, bias):
    # 7x7/2 conv + bias + ReLU, then the 3x3/2 max-pool (not yet fused: the pre-pool
    # activation is written once and read once).
    y = conv_bias_act_triton(x, weight, bias, (2, 2), (3, 3), (1, 1), 1, None, True)
    return max_pool2d_triton(y, 3, 2, 1)


def _supports_stem(x, weight, bias):
    return supports_conv(x, weight, bias, (2, 2), (3, 3), (1, 1), 1) or supports_max_pool(
        x, 3, 2, 1)


def _avgpool_linear(x, weight, bias):
    return avgpool_linear_triton(x, weight, bias)


_backend.register_impl("conv_bias_act", "triton", _conv_bias_act, supports_conv)
_backend.register_impl("max_pool2d", "triton", _max_pool2d, supports_max_pool)
_backend.register_impl("stem", "triton", _stem, _supports_stem)
_backend.register_impl("avgpool_linear", "triton", _avgpool_linear, supports_avgpool_linear)
