"""Loader of the compiled extension ``fastres._C`` (operators ``torch.ops.fastres_C.*``).

``load()`` returns the module, or ``None`` when it is not built, not importable on this machine
(e.g. built against another torch), or disabled with ``FASTRES_DISABLE_EXTENSION=1``; it never
raises, so ``import fastres`` works without it. ``error()`` says why it is missing.

On first successful load it registers a fake (meta) implementation for every compiled op, so
``torch.compile`` / ``torch.export`` can trace calls to ``torch.ops.fastres_C.*``.
"""

from __future__ import annotations

import os
import threading
from types import ModuleType

import torch

from fastres._env import OFF

_lock = threading.Lock()
_tried = False
_module: ModuleType | None = None
_error: str | None = None

# op name -> schema arguments, for the checks below (kept in sync with csrc/ops.cpp).
OPS = ("preprocess", "stem", "avgpool_linear", "conv1x1")

# csrc's limits of the stem (ops.cpp's check_int32_index, bodies.h's STEM_MAX_CIN_INDEX): its
# tiles and its 49 * C_in * 64 packed weights are indexed with 32-bit ints
STEM_MAX_DIM = 1 << 30
STEM_MAX_CIN_INDEX = (2**31 - 1) // (49 * 64)


def _register_fakes() -> None:
    # The compiled ops implement the Python ops' contracts (their C++ checks are a superset of
    # the Python ones), so their fakes are the Python ops' fakes: the same checks, so that a
    # direct torch.ops.fastres_C call fails while tracing where the call itself would, and the
    # same output shapes.
    from fastres.ops.conv_bias_act import conv_bias_act_fake
    from fastres.ops.head import avgpool_linear_fake
    from fastres.ops.preprocess import preprocess_fake
    from fastres.ops.stem import stem_fake

    def fake_avgpool_linear(x, weight, bias, allow_tf32):
        return avgpool_linear_fake(x, weight, bias)

    def fp32_bias(op, bias):  # (the Python ops take any floating bias; these two fp32 only)
        if isinstance(bias, torch.Tensor) and bias.dtype != torch.float32:
            raise TypeError(f"fastres_C::{op}: bias must be float32, got {bias.dtype}")

    def fake_stem(x, weight, bias):
        fp32_bias("stem", bias)
        out = stem_fake(x, weight, bias)
        if any(size >= STEM_MAX_DIM for size in x.shape):
            raise ValueError("fastres_C::stem: every dimension of x must be below 2^30 (32-bit "
                             f"tile indices), got shape {list(x.shape)}")
        if x.shape[1] > STEM_MAX_CIN_INDEX:
            raise ValueError(f"fastres_C::stem: C_in = {x.shape[1]} is too large (max "
                             f"{STEM_MAX_CIN_INDEX}: 32-bit tile indices)")
        return out

    def fake_conv1x1(x, weight, bias, stride, residual, relu, allow_tf32):
        if weight.dim() != 4 or tuple(weight.shape[2:]) != (1, 1):
            raise ValueError(f"fastres_C::conv1x1: weight must be [C_out, C_in, 1, 1], got "
                             f"{tuple(weight.shape)}")
        fp32_bias("conv1x1", bias)
        return conv_bias_act_fake(x, weight, bias, [stride, stride], [0, 0], [1, 1], 1,
                                  residual, relu)

    for name, fn in (("preprocess", preprocess_fake), ("stem", fake_stem),
                     ("avgpool_linear", fake_avgpool_linear), ("conv1x1", fake_conv1x1)):
        torch.library.register_fake(f"fastres_C::{name}")(fn)


def load() -> ModuleType | None:
    """The extension module, or ``None`` (see :func:`error` for why); never raises."""
    global _tried, _module, _error
    if _tried:
        return _module
    with _lock:
        if _tried:
            return _module
        try:
            # (read as setup.py reads its FASTRES_* switches: 0/false/no/off or unset: off)
            if os.environ.get("FASTRES_DISABLE_EXTENSION", "").strip().lower() not in (
                    "", *OFF):
                raise ImportError("disabled by FASTRES_DISABLE_EXTENSION")
            from fastres import _C as module  # runs the TORCH_LIBRARY registrations

            missing = [op for op in OPS if not hasattr(torch.ops.fastres_C, op)]
            if missing:
                raise ImportError(f"fastres._C lacks ops {missing}; rebuild it")
            _register_fakes()
            _module = module
        except Exception as exc:  # noqa: BLE001 - ImportError, OSError (undefined symbol), skew
            _module = None
            _error = f"{type(exc).__name__}: {exc}"
        _tried = True
    return _module


def available() -> bool:
    """True when ``fastres._C`` is built and loads."""
    return load() is not None


def error() -> str | None:
    """Why the extension is unavailable (``None`` when it loaded)."""
    load()
    return _error
