"""``preprocess``: uint8 images -> normalized float batch (torchvision's ToTensor + Normalize),
one op.

Contract: ``preprocess(images, layout="NHWC", mean=IMAGENET_MEAN, std=IMAGENET_STD,
dtype=torch.float32) -> [N, 3, H, W]``

- ``images``: uint8, ``[N, H, W, 3]`` when ``layout == "NHWC"`` (what image decoders give) or
  ``[N, 3, H, W]`` when ``layout == "NCHW"``; any strides.
- ``mean``, ``std``: 3 floats each, in 0..1 units (as ``torchvision.transforms.Normalize`` after
  ``ToTensor``); ``std`` finite and non-zero.
- ``dtype``: float32, float16 or bfloat16.
- returns ``((images / 255) - mean) / std`` computed in fp32 (those operations, in that order)
  and rounded once to ``dtype``, shape ``[N, 3, H, W]`` in ``torch.channels_last`` memory format
  (ready for the model's NHWC path).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch

from fastres.ops import _backend
from fastres.ops._checks import FLOAT_DTYPES, check_strided

OP = "preprocess"
LAYOUTS = ("NHWC", "NCHW")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def preprocess_reference(images: torch.Tensor, layout: str, mean: list[float], std: list[float],
                         dtype: torch.dtype) -> torch.Tensor:
    """Plain-torch reference of :func:`preprocess` (see the module docstring)."""
    x = images.permute(0, 3, 1, 2) if layout == "NHWC" else images
    x = x.float() / 255.0
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    return ((x - m) / s).to(dtype).contiguous(memory_format=torch.channels_last)


_backend.register_impl(OP, "torch", preprocess_reference)


@torch.library.custom_op("fastres::preprocess", mutates_args=())
def _preprocess_op(images: torch.Tensor, layout: str, mean: list[float], std: list[float],
                   dtype: torch.dtype) -> torch.Tensor:
    _check_args(images, layout, mean, std, dtype)  # also for torch.ops.fastres.preprocess
    return _backend.run_op(OP, images, layout, mean, std, dtype)


def _out_shape(images: torch.Tensor, layout: str) -> tuple:
    if layout == "NHWC":
        n, h, w, _ = images.shape
    else:
        n, _, h, w = images.shape
    return n, 3, h, w


@_preprocess_op.register_fake
def preprocess_fake(images, layout, mean, std, dtype):
    """Shape, dtype and layout of the output, after the op's checks (tracing fails where the
    call would); also the fake of the extension's ``fastres_C::preprocess``."""
    _check_args(images, layout, mean, std, dtype)
    return torch.empty(_out_shape(images, layout), dtype=dtype, device=images.device,
                       memory_format=torch.channels_last)


def preprocess(images: torch.Tensor, layout: str = "NHWC",
               mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 images -> ``((x / 255) - mean) / std`` as channels-last ``[N, 3, H, W]`` ``dtype``.

    See the module docstring for the contract. Arguments are checked here, with errors that
    say what was expected and what was given.
    """
    mean, std = _floats("mean", mean), _floats("std", std)
    _check_args(images, layout, mean, std, dtype)
    return _preprocess_op(images, layout, mean, std, dtype)


def _floats(name: str, values, op: str = OP) -> list[float]:
    """``values`` (a sequence of real numbers: Python or NumPy floats and ints, one-value
    tensors, or a 1-D tensor) as a list of floats; a ``TypeError`` for anything else (a
    scalar, ``None``, strings, bools). ``op`` names the caller in the message."""
    if isinstance(values, torch.Tensor):
        values = values.tolist() if values.dim() == 1 else values
    if (isinstance(values, (str, bytes)) or not isinstance(values, Sequence)
            and (not hasattr(values, "__array__") or getattr(values, "ndim", 1) != 1)):
        raise TypeError(f"{op}: {name} must be a sequence of 3 numbers, got {_shown(values)}")
    out = []
    for v in list(values):
        if isinstance(v, torch.Tensor) and v.dim() == 0:  # (iterating over a tensor)
            v = v.item()
        if isinstance(v, (bool, str, bytes)) or not isinstance(v, numbers.Real):
            raise TypeError(f"{op}: {name} must be a sequence of 3 numbers, got "
                            f"{_shown(values)}")
        try:
            out.append(float(v))
        except OverflowError:  # an int beyond float's range
            raise ValueError(f"{op}: {name} must hold numbers within float range, got "
                             f"{_shown(values)}") from None
    return out


def _shown(values, limit: int = 80) -> str:
    text = repr(values)
    return text if len(text) <= limit else text[:limit - 3] + "..."


# a float whose magnitude is at most _F32_ZERO rounds to 0 in float32; at least _F32_INF, to inf
_F32_ZERO = 2.0 ** -150
_F32_INF = 2.0 ** 128 - 2.0 ** 103


def finite_nonzero_in_float32(v: float) -> bool:
    """``v`` is neither 0 nor infinite (nor NaN) once rounded to float32."""
    return _F32_ZERO < abs(v) < _F32_INF


def _check_args(images, layout, mean, std, dtype) -> None:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{OP}: images must be a torch.Tensor, got {type(images).__name__}")
    check_strided(OP, "images", images)
    if images.dtype != torch.uint8:
        raise TypeError(f"{OP}: images must be uint8, got {images.dtype}")
    if layout not in LAYOUTS:
        raise ValueError(f"{OP}: layout must be one of {LAYOUTS}, got {layout!r}")
    if images.dim() != 4:
        raise ValueError(f"{OP}: images must be 4-D ([N, H, W, 3] or [N, 3, H, W]), got "
                         f"{images.dim()}-D shape {tuple(images.shape)}")
    cdim = 3 if layout == "NHWC" else 1
    if images.shape[cdim] != 3:
        expected = "[N, H, W, 3]" if layout == "NHWC" else "[N, 3, H, W]"
        raise ValueError(f"{OP}: layout {layout} expects images {expected}, got "
                         f"{tuple(images.shape)}")
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"{OP}: mean and std must have 3 values, got {len(mean)} and {len(std)}")
    # ``abs(s) < ...``, not math.isfinite: torch.compile(dynamic=True, fullgraph=True) fails
    # on math.isfinite ("torch.* op returned non-Tensor"; torch 2.11 and 2.14). The check is
    # on the float32 value the arithmetic divides by (1e-50 is 0 there, 1e39 inf), as
    # torchvision's Normalize checks it.
    if not all(map(finite_nonzero_in_float32, std)):
        raise ValueError(f"{OP}: std values must be finite and non-zero in float32 (the "
                         f"precision the normalization runs in), got {std}")
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"{OP}: dtype must be float32, float16 or bfloat16, got {dtype}")
