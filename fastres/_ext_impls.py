"""Registers the ``cuda`` implementations (the compiled extension ``fastres._C``) with
:mod:`fastres.ops._backend`.

Imported lazily by ``_backend._load_optional_backends()``. When the extension is missing it
registers nothing and calls ``note_missing``, so the first op that would have used it on a CUDA
tensor says so once and falls back (Triton, then the torch reference).

Implementations (each obeys its op's contract in :mod:`fastres.ops`):

- ``stem``: fused 7x7/2 conv + bias + ReLU + 3x3/2 max-pool, never writing the pre-pool
  activation (``torch.ops.fastres_C.stem``);
- ``conv_bias_act``: 1x1 convolutions (stride 1 or strided, groups 1, no padding) as a cuBLASLt
  GEMM with bias (+ ReLU) epilogue and the residual as the accumulated C operand;
- ``avgpool_linear``: global-average-pool kernel + cuBLASLt linear with bias epilogue;
- ``preprocess``: uint8 -> normalized channels-last float in one pass.
"""

from __future__ import annotations

import functools

import torch

from fastres import _ext
from fastres.ops import _backend
from fastres.ops import preprocess as _preprocess_contract  # noqa: F401  (registers the op)

OP_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
STEM_MAX_CIN = 8  # the stem kernel keeps C_in * 7 * 7 * 64 fp32 weights in shared memory


def _stem(x, weight, bias):
    return torch.ops.fastres_C.stem(x, weight, bias)


# csrc/ops.cpp's hard limits of the fused stem: every input dimension below 2^30
# (_ext.STEM_MAX_DIM: its tile indices are int32) and one grid row (at most 65535) per
# STEM_CC = 64 output channels
_STEM_MAX_COUT = 65535 * 64


def supports_stem(x, weight, bias) -> str | None:
    if x.shape[1] > STEM_MAX_CIN:
        return f"C_in={x.shape[1]} > {STEM_MAX_CIN} (shared-memory limit of the fused stem)"
    if max(x.shape) >= _ext.STEM_MAX_DIM:
        return (f"input shape {tuple(x.shape)} has a dimension of 2^30 or more (the fused "
                "stem indexes tiles in int32)")
    if weight.shape[0] > _STEM_MAX_COUT:
        return f"C_out={weight.shape[0]} > {_STEM_MAX_COUT} (one grid row per 64 channels)"
    if bias.dtype != torch.float32:
        return f"bias dtype {bias.dtype} (needs float32)"
    if x.is_cuda:
        return (kernels_reason(_index(x.device))
                or stem_smem_reason(int(x.shape[1]), _smem_optin(x.device.index)))
    return None


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.lru_cache(maxsize=None)
def kernels_reason(index: int) -> str | None:
    """Why the extension's own kernels (the fused stem, the head's pooling, preprocessing)
    cannot run on CUDA device ``index``, or None: the build holds no code for the GPU's
    architecture (default build: sm_80 and sm_90 machine code, which GPUs of compute capability
    8.x and 9.x run, and compute_90 PTX, which newer ones compile; not Volta or Turing). Asked
    once per device; those ops then run on Triton or the reference instead (said once when the
    ``cuda`` backend is asked for by name)."""
    if torch.ops.fastres_C.kernels_available(index):
        return None
    major, minor = torch.cuda.get_device_capability(index)
    return (f"fastres._C holds no kernels for this GPU ({torch.cuda.get_device_name(index)}, "
            f"compute capability {major}.{minor}); rebuild fastres with "
            f"TORCH_CUDA_ARCH_LIST=\"{major}.{minor}\" to use them")


def supports_own_kernels(x, *args, **kwargs) -> str | None:
    """``avgpool_linear``'s and ``preprocess``'s check: the extension's kernels run on ``x``'s
    GPU (:func:`kernels_reason`)."""
    return kernels_reason(_index(x.device)) if x.is_cuda else None


def stem_smem_reason(cin: int, limit: int | None) -> str | None:
    """Why the fused stem cannot run with ``cin`` input channels on a GPU whose opt-in shared
    memory per block is ``limit`` bytes (H100: 227 KiB; A100: 163 KiB; consumer Ampere/Ada:
    99 KiB; T4: 64 KiB), or None."""
    need = int(torch.ops.fastres_C.stem_smem_bytes(cin))
    if limit is not None and need > limit:
        return (f"C_in={cin} needs {need} bytes of shared memory per block, this GPU allows "
                f"{limit}")
    return None


@functools.lru_cache(maxsize=None)
def _smem_optin(index: int | None) -> int | None:
    props = torch.cuda.get_device_properties(index if index is not None
                                             else torch.cuda.current_device())
    return getattr(props, "shared_memory_per_block_optin", None)


def _conv1x1(x, weight, bias, stride, padding, dilation, groups, residual=None, relu=True):
    return torch.ops.fastres_C.conv1x1(x, weight, bias, int(stride[0]), residual, bool(relu),
                                       _backend.cudnn_allow_tf32())


def supports_conv1x1(x, weight, bias, stride, padding, dilation, groups, residual=None,
                     relu=True) -> str | None:
    """``None`` when the cuBLASLt 1x1 path runs this call, else why not."""
    if tuple(weight.shape[2:]) != (1, 1):
        return f"kernel {tuple(weight.shape[2:])} is not 1x1 (cuBLASLt path is 1x1 only)"
    if groups != 1:
        return f"groups={groups} (cuBLASLt path needs groups=1)"
    if any(int(p) != 0 for p in padding):
        return f"padding {list(padding)} (cuBLASLt path needs padding 0)"
    if int(stride[0]) != int(stride[1]):
        return f"stride {list(stride)} is not square"
    if x.dtype not in OP_DTYPES:
        return f"dtype {x.dtype} (needs float16, bfloat16 or float32)"
    if bias.dtype != torch.float32:
        return f"bias dtype {bias.dtype} (needs float32)"
    # Rows of A (C_in) and of D / C (C_out) 16-byte aligned: what cuBLASLt's tensor-core
    # kernels need; every ResNet 1x1 layer qualifies, odd channel counts go to Triton.
    size = x.element_size()
    if (x.shape[1] * size) % 16 or (weight.shape[0] * size) % 16:
        return (f"C_in={x.shape[1]}, C_out={weight.shape[0]} not multiples of "
                f"{16 // size} (16-byte rows for cuBLASLt)")
    return None


def _avgpool_linear(x, weight, bias):
    return torch.ops.fastres_C.avgpool_linear(x, weight, bias,
                                              _backend.matmul_allow_tf32())


def _preprocess(images, layout, mean, std, dtype):
    return torch.ops.fastres_C.preprocess(images, layout, list(mean), list(std), dtype)


def register() -> bool:
    """Register the ``cuda`` implementations; False (and ``note_missing``) without ``_C``."""
    if _ext.load() is None:
        _backend.note_missing("cuda", f"the CUDA extension fastres._C is not available "
                                      f"({_ext.error()}); the fused stem, preprocessing, "
                                      "cuBLASLt 1x1 convolutions and head run on Triton or "
                                      "the reference instead")
        return False
    _backend.register_impl("stem", "cuda", _stem, supports_stem)
    _backend.register_impl("conv_bias_act", "cuda", _conv1x1, supports_conv1x1)
    _backend.register_impl("avgpool_linear", "cuda", _avgpool_linear, supports_own_kernels)
    _backend.register_impl("preprocess", "cuda", _preprocess, supports_own_kernels)
    return True


REGISTERED = register()
