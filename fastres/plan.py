"""The inference plan: a cache derived from a :class:`fastres.ResNet`'s module tree.

In ``eval()`` mode the model runs this plan instead of its modules:

- every ``Conv2d`` + ``BatchNorm2d`` pair becomes one :func:`fastres.ops.conv_bias_act` with
  the BatchNorm folded into the weights and a per-channel fp32 bias (folded in float64, then
  rounded once to the compute dtype and checked finite there);
- the second/third convolution of each block carries the residual add and the ReLU in its
  epilogue, the downsample convolution runs without ReLU;
- the stem is :func:`fastres.ops.stem` (convolution + BN + ReLU + max-pool), the head is
  :func:`fastres.ops.avgpool_linear`;
- activations are channels-last in the compute dtype (the model's parameter dtype, or the
  autocast dtype when autocast is on for the input's device).

The plan is a cache, never a second copy to keep in sync: it remembers every parameter and
buffer of the model (a reference to its storage and its version counter) and is rebuilt on
the next forward whenever one of them changed, was replaced, or moved to another dtype or
device. Folding is O(parameters) elementwise work done once per change.
"""

from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fastres.ops import _backend
from fastres.ops._checks import FLOAT_DTYPES

SUPPORTED_COMPUTE_DTYPES = FLOAT_DTYPES  # float32, float16, bfloat16

# What the plan calls: the custom ops when a forward is traced (the graph records them), and
# the same work without the torch.library dispatch otherwise (see _backend.direct).
_OPS = (torch.ops.fastres.stem.default, torch.ops.fastres.conv_bias_act.default,
        torch.ops.fastres.avgpool_linear.default)
_DIRECT = (_backend.direct("stem"), _backend.direct("conv_bias_act"),
           _backend.direct("avgpool_linear"))

_said: set[str] = set()

_EAGER_MESSAGES = {
    "grad": "eval-mode forward with autograd recording runs eagerly (exact gradients); "
            "run inference under torch.no_grad() or torch.inference_mode() for the fused path",
}


def tracing() -> bool:
    """True while ``torch.compile``, ``torch.export`` or ``torch.jit.trace`` records a forward.

    The plan cache (storage pointers, version counters, Python-side mutation) cannot be traced,
    so a traced eval forward folds BatchNorm as recorded ops on the parameters instead (see
    :func:`plan_for_input`): the graph stays a function of the module's state, never stale.
    """
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


def say_eager_once(reason: str) -> None:
    """Warn once per reason that the eval forward runs eagerly (never silently slow)."""
    if tracing() or reason in _said:  # no Python side effects inside a traced graph
        return
    _said.add(reason)
    msg = _EAGER_MESSAGES.get(reason, f"eval-mode forward runs eagerly: {reason}")
    warnings.warn(f"fastres: {msg}", RuntimeWarning, stacklevel=3)


# -- input checks ------------------------------------------------------------------------------

def model_dtype_device(model: nn.Module) -> tuple[torch.dtype, torch.device]:
    p = model.conv1.weight
    return p.dtype, p.device


def compute_dtype(model: nn.Module, x: Tensor) -> torch.dtype:
    """The dtype the forward pass computes in (autocast's when it is on for x's device)."""
    dev = x.device.type
    if dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return model_dtype_device(model)[0]


def check_input(model: nn.Module, x) -> None:
    """Raise a clear error for input the model cannot take, before any kernel runs."""
    if not isinstance(x, Tensor):
        raise TypeError(f"fastres ResNet expects a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"fastres ResNet expects a 4-D [N, C, H, W] input, got {x.dim()}-D "
                         f"shape {tuple(x.shape)}")
    in_ch = model.conv1.in_channels
    if x.shape[1] != in_ch:
        raise ValueError(f"fastres ResNet expects {in_ch} input channels, got {x.shape[1]} "
                         f"(input shape {tuple(x.shape)}; is it NHWC? pass NCHW, e.g. "
                         "x.permute(0, 3, 1, 2))")
    if not x.is_floating_point():
        raise TypeError(f"fastres ResNet expects a floating-point input, got {x.dtype} "
                        "(convert images with x.float() / 255 and normalize first)")
    dtype, device = model_dtype_device(model)
    if x.device != device:
        raise ValueError(f"fastres ResNet input is on {x.device}, the model is on {device}")
    autocast = x.device.type in ("cuda", "cpu") and torch.is_autocast_enabled(x.device.type)
    if x.dtype != dtype and not autocast:
        raise TypeError(f"fastres ResNet input dtype must match the model's ({dtype}) unless "
                        f"autocast is on, got {x.dtype}")


def eager_reason(model: nn.Module, x) -> str | None:
    """Why this forward must run eagerly (``None``: the plan runs). Also checks ``x``."""
    check_input(model, x)
    if model.training:
        return "train"
    if torch.is_grad_enabled() and (x.requires_grad or _any_requires_grad(model)):
        return "grad"
    dt = compute_dtype(model, x)
    if dt not in SUPPORTED_COMPUTE_DTYPES:
        return f"compute dtype {dt} (the plan runs float32, float16 and bfloat16)"
    return unsupported_reason(model)


def _any_requires_grad(model: nn.Module) -> bool:
    return any(p.requires_grad for p in model.parameters())


_unsupported_memo: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def unsupported_reason(model: nn.Module) -> str | None:
    """Why the plan cannot run this model's module tree (``None``: it can).

    Walking the tree costs ~100-250 us for ResNet-50, every forward; the verdict is memoized
    per model while no module, parameter or buffer is (re)registered anywhere (the counter
    the plan cache uses), which is what a change of verdict requires.
    """
    if _HOOKS and not tracing():
        hit = _unsupported_memo.get(model)
        if hit is not None and hit[0] == _registrations:
            return hit[1]
        reason = _unsupported_reason(model)
        _unsupported_memo[model] = (_registrations, reason)
        return reason
    return _unsupported_reason(model)


def _unsupported_reason(model: nn.Module) -> str | None:
    for name, m in model.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            if m.running_mean is None or m.running_var is None:
                return f"{name} is a BatchNorm2d without running statistics"
        elif name.endswith(("bn1", "bn2", "bn3", "downsample.1")):
            return f"{name} is a {type(m).__name__}, not BatchNorm2d (only BatchNorm folds)"
    return None


# -- folding -----------------------------------------------------------------------------------

@dataclass
class ConvStep:
    """One fused convolution: folded weight (channels-last, compute dtype) and fp32 bias."""

    weight: Tensor
    bias: Tensor
    stride: list[int]
    padding: list[int]
    dilation: list[int]
    groups: int
    name: str

    def __call__(self, x: Tensor, residual: Tensor | None = None, relu: bool = True,
                 conv=_OPS[1]) -> Tensor:
        return conv(x, self.weight, self.bias, self.stride, self.padding, self.dilation,
                    self.groups, residual, relu)


_NO_FLOAT64 = frozenset({"mps"})  # device types whose tensors cannot be float64


def fold_dtype(device: torch.device, traced: bool = False) -> torch.dtype:
    """The dtype :func:`fold_batchnorm` computes in: float64, or fp32 when ``traced`` or on a
    device without float64."""
    return torch.float32 if traced or device.type in _NO_FLOAT64 else torch.float64


@torch.no_grad()
def fold_batchnorm(conv: nn.Conv2d, bn: nn.BatchNorm2d, dtype: torch.dtype,
                   name: str = "", traced: bool = False) -> ConvStep:
    """Fold ``bn`` (eval statistics) into ``conv``: weight cast to ``dtype``, bias fp32.

    ``w' = w * gamma / sqrt(var + eps)``, ``b' = beta - mean * gamma / sqrt(var + eps)``
    (+ the conv's own bias, if any), computed in float64 so each folded value is rounded once
    (an fp32 fold rounds the rsqrt, the gamma product and the weight product in turn). Raises
    ``FloatingPointError`` when the folded weight or bias is not finite in its dtype (for
    example a tiny running variance overflowing fp16).

    ``traced=True`` (a traced forward, whose graph records the fold and runs it on every call)
    folds in fp32, so an exported program run eagerly does not materialize float64 copies of
    the weights per call, and skips the finiteness check (it is data-dependent). Devices
    without float64 (Apple's ``mps``) fold in fp32 too.
    """
    work = fold_dtype(conv.weight.device, traced)
    scale = torch.rsqrt(bn.running_var.to(work) + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.to(work)
    shift = -bn.running_mean.to(work) * scale
    if bn.bias is not None:
        shift = shift + bn.bias.to(work)
    if conv.bias is not None:
        shift = shift + conv.bias.to(work) * scale
    shift = shift.float()
    # the weight is promoted to ``work`` inside the multiply (no converted copy of it)
    folded = (conv.weight * scale.view(-1, 1, 1, 1)).to(dtype)
    if not traced and (not bool(torch.isfinite(folded).all())
                  or not bool(torch.isfinite(shift).all())):
        raise FloatingPointError(f"folding {name or 'a BatchNorm'} gives non-finite weights in "
                                 f"{dtype}")
    return ConvStep(
        weight=folded.contiguous(memory_format=torch.channels_last),
        bias=shift.contiguous(),
        stride=list(conv.stride),
        padding=list(conv.padding),
        dilation=list(conv.dilation),
        groups=conv.groups,
        name=name,
    )


@dataclass
class BlockPlan:
    convs: list[ConvStep]  # conv1, conv2[, conv3]; the last one carries residual + ReLU
    downsample: ConvStep | None


class InferencePlan:
    """The folded, fused forward of one model for one compute dtype."""

    def __init__(self, model: nn.Module, dtype: torch.dtype, traced: bool = False):
        self.dtype = dtype
        self.stem = fold_batchnorm(model.conv1, model.bn1, dtype, "conv1", traced)
        self.blocks: list[BlockPlan] = []
        for li in range(1, 5):
            for bi, blk in enumerate(getattr(model, f"layer{li}")):
                prefix = f"layer{li}.{bi}"
                pairs = [("conv1", "bn1"), ("conv2", "bn2")]
                if hasattr(blk, "conv3"):
                    pairs.append(("conv3", "bn3"))
                convs = [fold_batchnorm(getattr(blk, c), getattr(blk, b), dtype,
                                        f"{prefix}.{c}", traced) for c, b in pairs]
                down = None
                if blk.downsample is not None:
                    down = fold_batchnorm(blk.downsample[0], blk.downsample[1], dtype,
                                          f"{prefix}.downsample", traced)
                self.blocks.append(BlockPlan(convs, down))
        with torch.no_grad():
            self.fc_weight = model.fc.weight.detach().to(dtype).contiguous()
            self.fc_bias = model.fc.bias.detach().to(dtype).contiguous()
        self.num_classes = model.fc.out_features
        self.num_features = model.fc.in_features

    def convs(self) -> list[ConvStep]:
        """Every convolution of the plan, in execution order."""
        out = [self.stem]
        for blk in self.blocks:
            if blk.downsample is not None:
                out.append(blk.downsample)
            out.extend(blk.convs)
        return out

    def run(self, x: Tensor, features_only: bool = False) -> Tensor:
        """The fused forward. ``x`` was checked by :func:`check_input`."""
        if x.shape[0] == 0:
            if features_only:
                raise ValueError("forward_features on an empty batch is not supported")
            return x.new_empty((0, self.num_classes), dtype=self.dtype)
        x = x.to(dtype=self.dtype, memory_format=torch.channels_last)
        # plain tensors outside tracing skip the dispatcher; fake/functional tensors (export's
        # non-strict tracing) and other subclasses go through the custom ops
        stem, conv, head = _DIRECT if type(x) is Tensor and not tracing() else _OPS
        s = self.stem
        x = stem(x, s.weight, s.bias)
        for blk in self.blocks:
            identity = x if blk.downsample is None else blk.downsample(x, None, False, conv)
            out = x
            last = len(blk.convs) - 1
            for i, step in enumerate(blk.convs):
                out = step(out, identity if i == last else None, True, conv)
            x = out
        if features_only:
            return x
        return head(x, self.fc_weight, self.fc_bias)


# -- the cache ---------------------------------------------------------------------------------

# Any parameter, buffer or submodule (re)registered anywhere bumps this counter, so a model
# whose counter is unchanged still has the same tensors list and only versions and storage
# pointers need checking (~tens of microseconds for ResNet-50 instead of a module walk).
_registrations = 0


def _bump(*args):
    global _registrations
    _registrations += 1


try:  # torch >= 2.0
    from torch.nn.modules.module import (
        register_module_buffer_registration_hook,
        register_module_module_registration_hook,
        register_module_parameter_registration_hook,
    )

    register_module_buffer_registration_hook(_bump)
    register_module_module_registration_hook(_bump)
    register_module_parameter_registration_hook(_bump)
    _HOOKS = True
except ImportError:  # pragma: no cover - older torch: always walk the module tree
    _HOOKS = False


class _PlanCache:
    """Plans per compute dtype, valid while every parameter and buffer is unchanged."""

    __slots__ = ("tensors", "refs", "ptrs", "versions", "plans", "registrations")

    def __init__(self, model: nn.Module):
        self.registrations = _registrations
        self.tensors = [*model.parameters(), *model.buffers()]
        # detach() shares storage and version counter: holding it keeps the storage alive, so
        # an equal data_ptr below means the very same storage, never a reused address.
        self.refs = [t.detach() for t in self.tensors]
        self.ptrs = [t.data_ptr() for t in self.tensors]
        self.versions = [t._version for t in self.tensors]
        self.plans: dict[torch.dtype, InferencePlan] = {}

    def valid_for(self, model: nn.Module) -> bool:
        if not _HOOKS or self.registrations != _registrations:
            tensors = [*model.parameters(), *model.buffers()]
            if len(tensors) != len(self.tensors) or any(
                    a is not b for a, b in zip(tensors, self.tensors)):
                return False
            self.registrations = _registrations
        tensors = self.tensors
        return [t._version for t in tensors] == self.versions and \
            [t.data_ptr() for t in tensors] == self.ptrs


def get_plan(model: nn.Module, dtype: torch.dtype | None = None) -> InferencePlan:
    """The model's current plan for ``dtype`` (default: its parameter dtype), built if needed."""
    cache: _PlanCache | None = model.__dict__.get("_plan_cache")
    if cache is None or not cache.valid_for(model):
        cache = _PlanCache(model)
        model.__dict__["_plan_cache"] = cache
    if dtype is None:
        dtype = model_dtype_device(model)[0]
    plan = cache.plans.get(dtype)
    if plan is None:
        plan = cache.plans[dtype] = InferencePlan(model, dtype)
    return plan


def plan_for_input(model: nn.Module, x: Tensor) -> InferencePlan | None:
    """The plan for this input, or ``None`` (after one warning) when folding is not finite.

    Under :func:`tracing` a fresh, uncached plan is built from the parameters: the folding is
    recorded in the graph (``torch.export`` gets ``fastres.*`` ops whose weights are computed
    from the state_dict's tensors; ``torch.compile`` re-folds per call unless inductor's
    ``freezing`` constant-folds it), in fp32 rather than float64, and the finiteness check is
    skipped.
    """
    dtype = compute_dtype(model, x)
    if tracing():
        return InferencePlan(model, dtype, traced=True)
    try:
        return get_plan(model, dtype)
    except FloatingPointError as exc:
        say_eager_once(str(exc))
        return None
