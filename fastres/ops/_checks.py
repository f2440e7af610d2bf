"""Argument checks shared by the ops: each error says what was expected and what was given."""

from __future__ import annotations

import operator

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_strided(op: str, name: str, t: torch.Tensor) -> None:
    """``t`` is a dense (strided) tensor: a sparse or MKL-DNN one would fail inside torch's
    dispatcher with an error that names neither the op nor what it takes."""
    if t.layout != torch.strided:
        raise TypeError(f"{op}: {name} must be a dense (strided) tensor, got layout "
                        f"{t.layout} (convert it with .to_dense())")


def check_float_activation(name: str, x: torch.Tensor, op: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    check_strided(op, name, x)
    if x.dim() != 4:
        raise ValueError(
            f"{op}: {name} must be 4-D [N, C, H, W], got {x.dim()}-D shape {tuple(x.shape)}"
        )
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be float32, float16 or bfloat16, got {x.dtype}")


def as_int(v) -> int | None:
    """``v`` as an int when it is an integer: Python and NumPy integers (anything with
    ``__index__``), not bools, floats or strings (``int()`` would truncate 2.5 to 2
    silently); else ``None``."""
    if isinstance(v, bool) or isinstance(v, torch.Tensor) and v.dtype == torch.bool:
        return None
    try:
        return operator.index(v)
    except TypeError:  # (no __index__, or one that refuses, as NumPy's bool_ does)
        return None


def int_arg(op: str, name: str, v) -> int:
    """``v`` as an int (see :func:`as_int`), or a ``TypeError`` naming ``op``'s ``name``."""
    i = as_int(v)
    if i is None:
        raise TypeError(f"{op}: {name} must be an int, got {v!r}")
    return i


def bool_arg(op: str, name: str, v) -> bool:
    """``v`` as a bool: ``True``/``False`` only (``bool("no")`` is True)."""
    if not isinstance(v, bool):
        raise TypeError(f"{op}: {name} must be True or False, got {v!r}")
    return v


def bias_or_zeros(bias, weight):
    """``bias``, or for ``None`` (a layer built with ``bias=False``) fp32 zeros, one per output
    channel of ``weight`` (left as given when ``weight`` is not a tensor: its check says so)."""
    if bias is None and isinstance(weight, torch.Tensor):
        return torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device)
    return bias


def cuda_device_problem(device: torch.device) -> str | None:
    """Why a CUDA ``device`` is not on this machine (no GPU, or no such index), or ``None``."""
    if device.type != "cuda":
        return None
    if not torch.cuda.is_available():
        return "this machine has no CUDA GPU (torch.cuda.is_available() is False)"
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        return f"there are only {count} CUDA device(s)"
    return None


def conv_output_size(h, w, r, s, stride, padding, dilation) -> tuple[int, int]:
    p = (h + 2 * padding[0] - dilation[0] * (r - 1) - 1) // stride[0] + 1
    q = (w + 2 * padding[1] - dilation[1] * (s - 1) - 1) // stride[1] + 1
    return p, q


def _check_tensors(op: str, **tensors) -> None:
    """Each of ``tensors`` (``None`` allowed for ``residual``) is a torch.Tensor."""
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor) and not (t is None and name == "residual"):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t is not None:
            check_strided(op, name, t)


def check_conv_args(x, weight, bias, stride, padding, dilation, groups, residual) -> None:
    op = "conv_bias_act"
    check_float_activation("x", x, op)
    _check_tensors(op, weight=weight, bias=bias, residual=residual)
    _check_has_channels(op, x)
    if weight.dim() != 4 or min(weight.shape) < 1:
        raise ValueError(f"{op}: weight must be 4-D [C_out, C_in/groups, R, S] with every "
                         f"size >= 1, got shape {tuple(weight.shape)}")
    for name, v in (("stride", stride), ("padding", padding), ("dilation", dilation)):
        if len(v) != 2:  # (the Python wrapper pairs them; torch.ops.fastres takes lists)
            raise ValueError(f"{op}: {name} must have 2 values, got {list(v)}")
    _check_weight_dtype(op, x, weight)
    if groups < 1 or x.shape[1] % groups or weight.shape[0] % groups:
        raise ValueError(f"{op}: groups={groups} must divide C_in={x.shape[1]} and "
                         f"C_out={weight.shape[0]}")
    if weight.shape[1] * groups != x.shape[1]:
        raise ValueError(f"{op}: weight expects {weight.shape[1] * groups} input channels "
                         f"(C_in/groups={weight.shape[1]}, groups={groups}), x has {x.shape[1]}")
    _check_bias_shape(op, weight, bias)
    if x.shape[2] < 1 or x.shape[3] < 1:
        raise ValueError(f"{op}: x must have H, W >= 1, got shape {tuple(x.shape)}")
    if min(stride) < 1 or min(dilation) < 1 or min(padding) < 0:
        raise ValueError(f"{op}: stride and dilation must be >= 1 and padding >= 0, got "
                         f"stride={stride}, padding={padding}, dilation={dilation}")
    _check_same_device(op, x, weight=weight, bias=bias, residual=residual)
    p, q = conv_output_size(x.shape[2], x.shape[3], weight.shape[2], weight.shape[3],
                            stride, padding, dilation)
    if p < 1 or q < 1:
        raise ValueError(f"{op}: input {tuple(x.shape[2:])} is too small for a "
                         f"{tuple(weight.shape[2:])} kernel with padding {padding}, "
                         f"dilation {dilation} (output would be {p}x{q})")
    if residual is not None:
        expected = (x.shape[0], weight.shape[0], p, q)
        if tuple(residual.shape) != expected:
            raise ValueError(f"{op}: residual must have shape {expected}, "
                             f"got {tuple(residual.shape)}")
        if residual.dtype != x.dtype:
            raise TypeError(f"{op}: residual dtype must equal x's ({x.dtype}), "
                            f"got {residual.dtype}")


def _check_has_channels(op: str, x) -> None:
    # F.conv2d gives a 0-channel output for C_in = 0 whatever the weight says; refuse it
    if x.shape[1] < 1:
        raise ValueError(f"{op}: x must have at least one input channel, got shape "
                         f"{tuple(x.shape)}")


def _check_weight_dtype(op: str, x, weight) -> None:
    if weight.dtype != x.dtype:
        raise TypeError(f"{op}: weight dtype must equal x's ({x.dtype}), got {weight.dtype}")


def _check_bias_shape(op: str, weight, bias) -> None:
    if bias.shape != (weight.shape[0],):
        raise ValueError(f"{op}: bias must have shape ({weight.shape[0]},), "
                         f"got {tuple(bias.shape)}")
    if not bias.is_floating_point():  # (complex, integer, bool: not a bias, computed in fp32)
        raise TypeError(f"{op}: bias must be a floating-point tensor, got {bias.dtype}")


def _check_same_device(op: str, x, **tensors) -> None:
    for name, t in tensors.items():
        if t is not None and t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device}, x is on {x.device}")


def check_stem_args(x, weight, bias) -> None:
    op = "stem"
    check_float_activation("x", x, op)
    _check_tensors(op, weight=weight, bias=bias)
    _check_has_channels(op, x)
    if (weight.dim() != 4 or weight.shape[0] < 1 or weight.shape[1] != x.shape[1]
            or tuple(weight.shape[2:]) != (7, 7)):
        raise ValueError(f"{op}: weight must be [C_out >= 1, {x.shape[1]}, 7, 7], "
                         f"got {tuple(weight.shape)}")
    _check_weight_dtype(op, x, weight)
    _check_bias_shape(op, weight, bias)
    if x.shape[2] < 1 or x.shape[3] < 1:
        raise ValueError(f"{op}: x must have H, W >= 1, got shape {tuple(x.shape)}")
    _check_same_device(op, x, weight=weight, bias=bias)


def check_max_pool_args(x, kernel_size: int, stride: int, padding: int) -> None:
    op = "max_pool2d"
    check_float_activation("x", x, op)
    _check_has_channels(op, x)
    if kernel_size < 1 or stride < 1 or padding < 0:
        raise ValueError(f"{op}: kernel_size and stride must be >= 1 and padding >= 0, got "
                         f"kernel_size={kernel_size}, stride={stride}, padding={padding}")
    if padding * 2 > kernel_size:
        raise ValueError(f"{op}: padding must be at most half the kernel size, got "
                         f"padding={padding}, kernel_size={kernel_size}")
    p = (x.shape[2] + 2 * padding - kernel_size) // stride + 1
    q = (x.shape[3] + 2 * padding - kernel_size) // stride + 1
    if x.shape[2] < 1 or x.shape[3] < 1 or p < 1 or q < 1:
        raise ValueError(f"{op}: input {tuple(x.shape[2:])} is too small for kernel "
                         f"{kernel_size}, stride {stride}, padding {padding}")


def check_head_args(x, weight, bias) -> None:
    op = "avgpool_linear"
    check_float_activation("x", x, op)
    _check_tensors(op, weight=weight, bias=bias)
    if weight.dim() != 2 or weight.shape[1] != x.shape[1]:
        raise ValueError(f"{op}: weight must be [num_classes, {x.shape[1]}], "
                         f"got {tuple(weight.shape)}")
    _check_weight_dtype(op, x, weight)
    _check_bias_shape(op, weight, bias)
    if bias.dtype not in (x.dtype, torch.float32):
        raise TypeError(f"{op}: bias dtype must be x's ({x.dtype}) or float32, "
                        f"got {bias.dtype}")
    _check_same_device(op, x, weight=weight, bias=bias)
