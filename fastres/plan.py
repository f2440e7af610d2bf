"""The inference plan: a cache derived from a :class:`fastres.ResNet`'s module tree.

In ``eval()`` mode the model runs this plan instead of its modules:

- every ``Conv2d`` + ``BatchNorm2d`` (or torchvision's ``FrozenBatchNorm2d``) pair becomes
  one :func:`fastres.ops.conv_bias_act` with the BatchNorm folded into the weights and a
  per-channel fp32 bias (folded in float64, then rounded once to the compute dtype and
  checked finite there);
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

import contextlib
import itertools
import math
import operator
import sys
import threading
import time
import warnings
import weakref
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.autograd import forward_ad as _forward_ad

from fastres import _warnings
from fastres.ops import _backend
from fastres.ops._checks import FLOAT_DTYPES, conv_output_size

SUPPORTED_COMPUTE_DTYPES = FLOAT_DTYPES  # float32, float16, bfloat16

# What the plan calls: the custom ops when a forward is traced (the graph records them, and
# fake/functional tensors dispatch through them), and the ops' work without the torch.library
# dispatch otherwise (see InferencePlan.run): the dispatcher's Python layers cost ~50 us per
# call on a CPU, more than a small layer's kernel.
_OPS = (torch.ops.fastres.stem.default, torch.ops.fastres.conv_bias_act.default,
        torch.ops.fastres.avgpool_linear.default, torch.ops.fastres.max_pool2d.default)
_OP_NAMES = ("stem", "conv_bias_act", "avgpool_linear", "max_pool2d")
_STEM_OP, _CONV_OP, _HEAD_OP, _POOL_OP = range(4)  # indices into _OPS and _OP_NAMES
# input signatures whose implementation choices one plan remembers (the oldest goes first)
_DISPATCH_MEMO_SIZE = 32


def _through_ops(op: int, *args) -> Tensor:
    return _OPS[op](*args)


_said: set[str] = set()

_EAGER_MESSAGES = {
    "grad": "eval-mode forward with autograd recording runs eagerly (exact gradients); "
            "run inference under torch.no_grad() or torch.inference_mode() for the fused path",
    "torch.func": "eval-mode forward under a torch.func transform (vmap, jvp, jacfwd, grad, "
                  "...) runs eagerly: the fused ops have no batching or forward-mode AD rules",
    "forward AD": "eval-mode forward with forward-mode AD dual tensors (torch.autograd."
                  "forward_ad) runs eagerly: the fused ops have no forward-mode AD rules",
}


def tracing() -> bool:
    """True while ``torch.compile``, ``torch.export`` or ``torch.jit.trace`` records a forward.

    The plan cache (storage pointers, version counters, Python-side mutation) cannot be traced,
    so a traced eval forward folds BatchNorm as recorded ops on the parameters instead (see
    :func:`plan_for_input`): the graph stays a function of the module's state, never stale.
    """
    return _dynamo_tracing() or _exporting() or torch.jit.is_tracing()


# Not torch.compiler.is_compiling(): from torch 2.14 that is true in every thread for as long
# as any thread compiles, so a model served in one thread while another compiled would have
# taken the traced path (an uncached plan folded on every call) and its registrations would
# have gone uncounted. is_dynamo_compiling() is true only in code dynamo traces;
# is_exporting(), only while an export runs (non-strict export runs the forward for real).
_dynamo_tracing = getattr(torch.compiler, "is_dynamo_compiling", torch.compiler.is_compiling)
_exporting = getattr(torch.compiler, "is_exporting", torch.compiler.is_compiling)


def say_eager_once(reason: str) -> None:
    """Warn once per reason that the eval forward runs eagerly (never silently slow)."""
    if tracing() or not _warnings.first_time(_said, reason):  # (no Python side effects
        return                                                # inside a traced graph)
    msg = _EAGER_MESSAGES.get(reason, f"eval-mode forward runs eagerly: {reason}")
    _warnings.warn(f"fastres: {msg}")


# -- input checks ------------------------------------------------------------------------------

def model_dtype_device(model: nn.Module) -> tuple[torch.dtype, torch.device]:
    """The dtype and device of the stem convolution's weight; of the first parameter when the
    stem is not an ``nn.Conv2d`` (``fuse_modules``' ConvReLU2d, an adapter wrapping it: such
    a model runs torchvision's eager code, :func:`unsupported_reason`)."""
    conv = model.__dict__["_modules"].get("conv1")
    if isinstance(conv, nn.Conv2d):
        p = conv.weight
    else:
        p = next(itertools.chain(model.parameters(), model.buffers()), None)
        if p is None:
            return torch.get_default_dtype(), torch.device("cpu")
    return p.dtype, p.device


def compute_dtype(model: nn.Module, x: Tensor) -> torch.dtype:
    """The dtype the forward pass computes in: autocast's when it is on for x's device, except
    that autocast leaves float64 alone (a float64 model or input computes in float64, or fails
    as torchvision's layers do); else the model's."""
    dtype = model_dtype_device(model)[0]
    dev = x.device.type
    if dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev):
        if torch.float64 in (dtype, x.dtype):
            return torch.float64
        return torch.get_autocast_dtype(dev)
    return dtype


def _sizes(x: Tensor) -> tuple[int, ...]:
    """``x``'s sizes as ints. Under ``torch.jit.trace`` sizes are traced tensors, and testing
    them warns that the trace may not generalize; the checks and the empty-batch branch that
    read them are specific to the traced shape by design (a trace records one path), so they
    read plain ints, without the warnings (torchvision's trace gives none)."""
    if not torch.jit.is_tracing():
        return tuple(x.shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        return tuple(map(int, x.shape))


class InputValueError(ValueError, RuntimeError):
    """Input a fastres model cannot take: a ``ValueError`` that is also the ``RuntimeError``
    torchvision's layers raise for it (code that catches either keeps working)."""


class InputTypeError(TypeError, RuntimeError):
    """Input of a dtype a fastres model cannot take: a ``TypeError`` that is also the
    ``RuntimeError`` torchvision's layers raise for it."""


def _uninitialized(conv: nn.Module) -> bool:
    """A lazy module (``nn.LazyConv2d``) whose parameters its first forward has yet to make."""
    has = getattr(conv, "has_uninitialized_params", None)
    return has is not None and has()


def check_input(model: nn.Module, x) -> None:
    """Raise a clear error for input the model cannot take, before any kernel runs
    (:class:`InputValueError` / :class:`InputTypeError`, also ``RuntimeError`` as
    torchvision's; a ``TypeError`` for what is not a dense tensor)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"fastres ResNet expects a torch.Tensor, got {type(x).__name__}")
    if x.is_nested or x.layout not in (torch.strided, torch._mkldnn):
        got = "a nested tensor" if x.is_nested else f"a tensor of layout {x.layout}"
        raise TypeError(f"fastres ResNet expects a dense [N, C, H, W] tensor (torch.strided "
                        f"layout), got {got}; convert it first (x.to_dense(), or "
                        "torch.nested.to_padded_tensor for a batch of differently sized "
                        "images)")
    if x.dim() != 4:
        raise InputValueError(f"fastres ResNet expects a 4-D [N, C, H, W] input, got "
                              f"{x.dim()}-D shape {tuple(x.shape)}")
    conv = model.__dict__["_modules"].get("conv1")
    shape = _sizes(x)
    if 0 in shape[2:]:  # (torchvision's stem convolution refuses it, batch or not)
        raise InputValueError(f"fastres ResNet expects H, W >= 1, got shape {shape}")
    c = shape[1]
    # (a stem that is not a Conv2d, or a lazy one not yet made: torchvision's code runs, and
    # says what it takes)
    in_ch = (conv_in_channels(conv) if isinstance(conv, nn.Conv2d) and not _uninitialized(conv)
             else c)
    if c != in_ch:
        raise InputValueError(f"fastres ResNet expects {in_ch} input channels, got {c} "
                              f"(input shape {tuple(x.shape)}; is it NHWC? pass NCHW, e.g. "
                              "x.permute(0, 3, 1, 2))")
    if not x.is_floating_point():
        raise InputTypeError(f"fastres ResNet expects a floating-point input, got {x.dtype} "
                             "(convert images with x.float() / 255 and normalize first)")
    dtype, device = model_dtype_device(model)
    if x.device != device:
        raise InputValueError(f"fastres ResNet input is on {x.device}, the model is on "
                              f"{device}")
    autocast = x.device.type in ("cuda", "cpu") and torch.is_autocast_enabled(x.device.type)
    if x.dtype != dtype and not autocast:
        raise InputTypeError(f"fastres ResNet input dtype must match the model's ({dtype}) "
                             f"unless autocast is on, got {x.dtype}")


def conv_in_channels(conv: nn.Conv2d) -> int:
    """The input channels ``conv`` takes, as its forward does: from its weight, not its
    ``in_channels`` attribute, which a weight assigned later does not change (a grayscale
    stem: ``conv1.weight = nn.Parameter(w.sum(1, keepdim=True))``)."""
    if _uninitialized(conv):  # (a lazy stem: what it was declared with, 0 for "any")
        return conv.in_channels
    return _sizes(conv.weight)[1] * conv.groups  # (plain ints under torch.jit.trace too)


def eager_reason(model: nn.Module, x, head: bool = True) -> str | None:
    """Why this forward must run eagerly (``None``: the plan runs). Also checks ``x``.
    ``head=False``: a forward of the features only, which does not need the head's layout."""
    check_input(model, x)
    if model.training:
        return "train"
    # (torch.compile cannot answer this one: its stand-in for the interpreter stack is never
    # None; a compiled forward is traced by dynamo's own vmap/jvp handling)
    if not tracing() and torch._C._functorch.peek_interpreter_stack() is not None:
        return "torch.func"
    if x.layout != torch.strided:  # (MKL-DNN: torchvision's convolutions take it, as eager)
        return (f"input layout {x.layout} (the plan takes strided tensors; the output is "
                f"{x.layout}, as torchvision's)")
    if _forward_ad._current_level >= 0 and _has_tangent(model, x):
        return "forward AD"
    # (torch.jit.trace records the fused plan with grad on too: its check re-runs the trace
    # under no_grad, and the two graphs must agree)
    # (inference mode records nothing, even under enable_grad; dynamo cannot ask)
    if (torch.is_grad_enabled() and not torch.jit.is_tracing()
            and (tracing() or not torch.is_inference_mode_enabled())
            and (x.requires_grad or _any_requires_grad(model))):
        return "grad"
    dt = compute_dtype(model, x)
    if dt not in SUPPORTED_COMPUTE_DTYPES:
        return f"compute dtype {dt} (the plan runs float32, float16 and bfloat16)"
    return (unsupported_reason(model, head) or hook_reason(model, head)
            or norm_mode_reason(model, head))


def hook_reason(model: nn.Module, head: bool = True) -> str | None:
    """Why forward hooks keep the plan from running (``None``: no hook it would skip; with
    ``head=False``, none outside the head, which the feature paths do not run).

    The plan runs none of the submodules, so their forward hooks and pre-hooks (feature
    capture, ``torch.nn.utils.prune``, the old hook-based ``weight_norm``, hooks that edit a
    module's input or output) would silently not run. Hooks on the model itself run around
    either path (``nn.Module.__call__``). A registered hook edits a dict the memoized module
    list holds, so this is ~5 us for ResNet-152 while no module is (re)registered.
    """
    from torch.nn.modules import module as nn_module

    if nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks:
        return ("global module forward hooks are registered (register_module_forward_hook / "
                "register_module_forward_pre_hook), which the fused plan would skip")
    # (the memo reads and writes process-wide state that a traced graph would guard on: a
    # compiled model would recompile whenever any module is built anywhere; traced, walk)
    if not tracing() and not any(_modules(model).hooks):
        return None
    for name, m in model.named_modules():
        if name and (m._forward_hooks or m._forward_pre_hooks) and (head or not _in_head(name)):
            return f"{name} has forward hooks, which the fused plan would skip"
    return None


_TRAINING = operator.itemgetter("training")


def norm_mode_reason(model: nn.Module, head: bool = True) -> str | None:
    """Why an ``eval()`` model must still run eagerly because a BatchNorm in it is in train
    mode (``model.eval()`` then ``bn.train()``, as test-time BatchNorm adaptation does):
    torchvision normalizes there with the batch's statistics and updates the running ones,
    which a plan folded from the running statistics would not. ``None`` when every
    BatchNorm is in eval mode. ~2 us for ResNet-50 (the memoized BatchNorm list)."""
    if not tracing():  # (traced: walk, the memo is process-wide state a graph guards on)
        if not any(map(_TRAINING, _modules(model).bns)):  # each BatchNorm2d's __dict__
            return None
    for name, m in model.named_modules():
        if isinstance(m, nn.BatchNorm2d) and m.training and (head or not _in_head(name)):
            return (f"{name} is a BatchNorm2d in train mode inside an eval() model (it "
                    "normalizes with batch statistics and updates its running statistics, "
                    "as in torchvision)")
    return None


def _has_tangent(model: nn.Module, x: Tensor) -> bool:
    """True when ``x`` or a parameter or buffer of ``model`` is a forward-mode AD dual tensor
    (only asked while a dual level is active)."""
    unpack = _forward_ad.unpack_dual
    return any(unpack(t).tangent is not None
               for t in (x, *model.parameters(), *model.buffers()))


def _any_requires_grad(model: nn.Module) -> bool:
    return any(p.requires_grad for p in model.parameters())


_unsupported_memo: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def unsupported_reason(model: nn.Module, head: bool = True) -> str | None:
    """Why the plan cannot run this model's module tree (``None``: it can); with
    ``head=False``, its trunk (the stem and ``layer1``-``layer4``) only.

    Walking the tree costs ~100-250 us for ResNet-50, every forward; the verdict is memoized
    per model while no module, parameter or buffer is (re)registered anywhere (the counter
    the plan cache uses) and the modules' settings (:func:`structure`) are unchanged.
    """
    if _HOOKS and not tracing():
        mods = _modules(model, check_tree=True)
        if _instance_forward_impl(model):
            return _FORWARD_IMPL_SET
        if mods.instance_forward() is not None:
            for name, m in model.named_modules():
                reason = _instance_forward_reason(name, m)
                if reason is not None and (head or not _in_head(name)):
                    return reason
        struct = mods.structure()
        hit = _unsupported_memo.get(model)
        if hit is None or hit[0] != _registrations or hit[1] != struct:
            now = _current_registrations()  # (before the walk: see _PlanCache.valid_for)
            # (instance forwards were checked above, on every call)
            hit = (now, struct, _unsupported_reason(model, instance_forward=False),
                   _head_reason(model, instance_forward=False))
            _unsupported_memo[model] = hit
        return hit[2] or (hit[3] if head else None)
    return _unsupported_reason(model) or (_head_reason(model) if head else None)


def _instance_forward_impl(model: nn.Module) -> bool:
    """True when a ``_forward_impl`` is set on the model instance, other than one marked
    ``fastres_probe`` (``fastres bench`` wraps the eager path to notice a fallback)."""
    f = vars(model).get("_forward_impl")
    return f is not None and not getattr(f, "fastres_probe", False)


def frozen_bn_type() -> type | None:
    """torchvision's ``FrozenBatchNorm2d`` (detection backbones' ``norm_layer``: fixed
    statistics and affine buffers, the same in train and eval mode), which folds as a
    BatchNorm2d does; ``None`` while ``torchvision.ops`` is not imported (no instance can exist
    then, and fastres does not import torchvision for it)."""
    return getattr(sys.modules.get("torchvision.ops.misc"), "FrozenBatchNorm2d", None)


_FOLDED = ("weight", "bias", "running_mean", "running_var")


def _in_head(name: str) -> bool:
    """``name`` is the head's (``avgpool``, ``fc`` or a module inside them), which the
    feature paths (``forward_features``, ``forward_intermediates``) do not run."""
    return name.partition(".")[0] in ("fc", "avgpool")


_FORWARD_IMPL_SET = ("the model's _forward_impl is set on the instance, which the fused plan "
                     "would skip")


def _instance_forward_reason(name: str, m: nn.Module) -> str | None:
    """Why the submodule ``m`` named ``name`` keeps the plan from running because a
    ``forward`` is set on the instance (which the plan would skip); ``None``: none is."""
    if name and "forward" in vars(m):
        if isinstance(m, torch.jit.ScriptModule):  # (its compiled forward is an attribute)
            return _script_reason(name)
        return f"{name}.forward is set on the instance, which the fused plan would skip"
    return None


def _script_reason(name: str) -> str:
    return f"{name} is a TorchScript module, whose tensors the plan cache cannot follow"


def _module_reason(name: str, m: nn.Module, frozen: type | None,
                   instance_forward: bool = True) -> str | None:
    """Why the plan cannot stand in for the submodule ``m`` named ``name`` (``None``: it can).
    ``instance_forward=False`` leaves out a ``forward`` set on the instance: setting or
    deleting one registers nothing, so memoized verdicts must not depend on it (the caller
    checks it on every call instead)."""
    reason = _instance_forward_reason(name, m) if instance_forward else None
    if reason is not None:
        return reason
    if isinstance(m, nn.BatchNorm2d):
        if m.running_mean is None or m.running_var is None:
            return f"{name} is a BatchNorm2d without running statistics"
        if type(m).forward is not nn.BatchNorm2d.forward:
            return f"{name} is a {type(m).__name__} with its own forward"
    elif frozen is not None and isinstance(m, frozen):
        if type(m).forward is not frozen.forward:
            return f"{name} is a {type(m).__name__} with its own forward"
        if not all(isinstance(getattr(m, k, None), Tensor) for k in _FOLDED):
            return f"{name} is a FrozenBatchNorm2d without its {'/'.join(_FOLDED)} tensors"
    elif name.endswith(("bn1", "bn2", "bn3", "downsample.1")):
        return (f"{name} is a {type(m).__name__}, not BatchNorm2d (only BatchNorm2d and "
                "torchvision's FrozenBatchNorm2d fold)")
    elif isinstance(m, nn.Conv2d):
        if type(m).forward is not nn.Conv2d.forward:
            return f"{name} is a {type(m).__name__} with its own forward"
        if m.padding_mode != "zeros" or isinstance(m.padding, str):
            return (f"{name} pads with padding={m.padding!r}, padding_mode="
                    f"{m.padding_mode!r} (the plan pads explicit sizes with zeros)")
    return None


def _unsupported_reason(model: nn.Module, instance_forward: bool = True) -> str | None:
    """The plan hard-codes torchvision's ResNet layout: the 7x7/2 stem convolution, ReLU,
    the 3x3/2 max-pool, blocks of BatchNorm-folded convolutions (and, checked by
    :func:`_head_reason`, the global average pool and a linear ``fc``). Anything else (a
    CIFAR stem, another activation, a block with its own forward, a subclass with its own
    ``_forward_impl``) runs eagerly."""
    from fastres.models import BasicBlock, Bottleneck, ResNet

    frozen = frozen_bn_type()
    if getattr(type(model), "_forward_impl", None) is not ResNet._forward_impl:
        return f"{type(model).__name__} has its own _forward_impl (not fastres.ResNet's)"
    if _instance_forward_impl(model):
        return _FORWARD_IMPL_SET
    for name, m in model.named_modules():
        if isinstance(m, torch.jit.ScriptModule):  # (its slots are not dicts)
            return _script_reason(name)
        if not _in_head(name):  # (the head's modules: _head_reason)
            reason = _module_reason(name, m, frozen, instance_forward)
            if reason is not None:
                return reason
    stem = getattr(model, "conv1", None)
    if not (isinstance(stem, nn.Conv2d) and _geometry(stem) == _STEM):
        return (f"conv1 is {stem} (the fused stem is Conv2d(kernel_size=7, stride=2, "
                "padding=3, dilation=1, groups=1))")
    pool = getattr(model, "maxpool", None)
    if not (type(pool) is nn.MaxPool2d and _maxpool_geometry(pool) == _MAXPOOL):
        extra = " with return_indices=True" if getattr(pool, "return_indices", False) else ""
        return (f"maxpool is {pool}{extra} (the fused stem pools with MaxPool2d(3, stride=2, "
                "padding=1))")
    relus = [("relu", getattr(model, "relu", None))]
    for li in range(1, 5):
        layer = getattr(model, f"layer{li}", None)
        if type(layer) is not nn.Sequential:
            return f"layer{li} is a {type(layer).__name__}, not nn.Sequential"
        for bi, blk in enumerate(layer):
            kind = type(blk)
            if not (kind.forward is BasicBlock.forward or kind.forward is Bottleneck.forward):
                return (f"layer{li}.{bi} is a {kind.__name__} whose forward is not fastres's "
                        "BasicBlock or Bottleneck")
            if not all(isinstance(getattr(blk, c, None), nn.Conv2d)
                       for c in (("conv1", "conv2", "conv3") if kind.forward is
                                 Bottleneck.forward else ("conv1", "conv2"))):
                return f"layer{li}.{bi} has a convolution that is not nn.Conv2d"
            down = getattr(blk, "downsample", None)
            if down is not None and not (type(down) is nn.Sequential and len(down) == 2
                                         and isinstance(down[0], nn.Conv2d)):
                return f"layer{li}.{bi}.downsample is not Sequential(Conv2d, BatchNorm2d)"
            relus.append((f"layer{li}.{bi}.relu", getattr(blk, "relu", None)))
    for name, relu in relus:
        if type(relu) is not nn.ReLU:
            return f"{name} is a {type(relu).__name__}, not nn.ReLU (fused in the epilogues)"
    return None


def _head_reason(model: nn.Module, instance_forward: bool = True) -> str | None:
    """Why the plan cannot run this model's head (``None``: it can); the feature paths
    (``forward_features``, ``forward_intermediates``) do not need it."""
    frozen = frozen_bn_type()
    for top in ("avgpool", "fc"):  # (their subtrees only: _in_head's names)
        sub = model._modules.get(top)
        for name, m in sub.named_modules(prefix=top) if sub is not None else ():
            reason = _module_reason(name, m, frozen, instance_forward)
            if reason is not None:
                return reason
    avg, fc = getattr(model, "avgpool", None), getattr(model, "fc", None)
    if not (type(avg) is nn.AdaptiveAvgPool2d and _pair(avg.output_size) == (1, 1)):
        return f"avgpool is {avg} (the head pools with AdaptiveAvgPool2d(1))"
    if not (isinstance(fc, nn.Linear) and type(fc).forward is nn.Linear.forward):
        return f"fc is a {type(fc).__name__}, not nn.Linear (the fused head)"
    return None


_STEM = ((7, 7), (2, 2), (3, 3), (1, 1), 1)
_MAXPOOL = ((3, 3), (2, 2), (1, 1), (1, 1), False, False)


def _pair(v) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _geometry(conv: nn.Conv2d) -> tuple:
    # (each setting may be an int: ``conv.stride = 1``, which F.conv2d takes, as torchvision)
    return (_pair(conv.kernel_size), _pair(conv.stride), _pair(conv.padding),
            _pair(conv.dilation), conv.groups)


def _maxpool_geometry(pool: nn.MaxPool2d) -> tuple:
    return (_pair(pool.kernel_size), _pair(pool.stride if pool.stride is not None
                                           else pool.kernel_size),
            _pair(pool.padding), _pair(pool.dilation), bool(pool.ceil_mode),
            bool(pool.return_indices))  # (indices: torchvision's forward then fails)


_CONV_KEYS = ("stride", "padding", "dilation", "groups", "padding_mode")
_CONV_ITEMS = operator.itemgetter(*_CONV_KEYS)
_EPS = operator.itemgetter("eps")
_MODULES_OF = operator.itemgetter("_modules")
# containers that may be empty when the module lists are built and filled later (``del
# model.layer1[:]``, then ``insert``): their children are compared too
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
_POOL_ATTRS = operator.attrgetter("kernel_size", "stride", "padding", "dilation", "ceil_mode",
                                  "return_indices")


class _Modules:
    """The modules whose plain attributes the plan reads, listed once per module tree. Their
    ``__dict__`` is read directly: a setattr lands there, and a dict lookup is ~4x cheaper
    than a module attribute lookup (~7 us per ResNet-50 structure instead of ~16)."""

    __slots__ = ("modules", "convs", "bns", "frozen", "hooks", "model", "dicts", "tree", "kids",
                 "values", "children", "last")

    def __init__(self, model: nn.Module):
        # the submodules only, and the model by weak reference: this lives in a
        # WeakKeyDictionary keyed by the model, whose values must not reach their key (the
        # entry, and with it the model, would never be freed)
        everything = list(model.modules())
        self.modules = everything[1:]
        self.convs = [vars(m) for m in everything if isinstance(m, nn.Conv2d)
                      and all(k in vars(m) for k in _CONV_KEYS)]
        self.bns = [vars(m) for m in everything if isinstance(m, nn.BatchNorm2d)
                    and "eps" in vars(m)]
        # torchvision's FrozenBatchNorm2d: its eps is folded too (its mode does not matter)
        frozen = frozen_bn_type() or ()
        self.frozen = [vars(m) for m in everything if isinstance(m, frozen) and "eps" in vars(m)]
        # every submodule's forward-hook and pre-hook dicts (registering a hook edits them)
        self.hooks = [d for m in self.modules for d in (m._forward_hooks,
                                                        m._forward_pre_hooks)]
        self.model = weakref.ref(model)
        # every submodule's __dict__ (a forward set on the instance lands there)
        self.dicts = [vars(m) for m in self.modules]
        # every submodule that has children: its __dict__ and its _modules dict; and how many
        # children each has, the model included (its _modules dict only: its __dict__ would
        # reach the model). Deleting a submodule (``del model.layer4[-1]``,
        # ``Sequential.pop``, ``del blk.downsample``) and ``Sequential.insert`` change these
        # without registering anything, so the registration counter does not see them; nor
        # does storing into the dict (``model._modules["fc"] = m``, as torch.ao.quantization's
        # convert does): the children themselves are compared too.
        tree = [m for m in self.modules if m._modules or isinstance(m, _CONTAINERS)]
        self.tree = ([vars(m) for m in tree], [m._modules for m in tree])
        self.kids = [model._modules, *self.tree[1]]
        # (dict.values is ~2x faster than a methodcaller; TorchScript modules hold another
        # mapping type)
        self.values = (dict.values if all(type(d) is dict for d in self.kids) else
                       operator.methodcaller("values"))
        self.children = list(map(list, map(self.values, self.kids)))
        self.last: tuple | None = None  # what structure() returned last

    def tree_unchanged(self) -> bool:
        """True while every submodule with children holds the same ``_modules`` dict with the
        same children (~3 us for ResNet-50; replacing a child by setattr registers it)."""
        dicts, kids = self.tree
        model = self.model()
        return (model is not None and vars(model).get("_modules") is self.kids[0]
                and all(map(operator.is_, map(_MODULES_OF, dicts), kids))
                and list(map(list, map(self.values, self.kids))) == self.children)

    def instance_forward(self) -> int | None:
        """The first submodule (by its index in ``modules``) with a ``forward`` set on the
        instance (``blk.forward = f``, as instrumentation libraries wrap forwards), which the
        plan would skip; ``None`` when there is none (~3 us for ResNet-50)."""
        if not any(map(operator.contains, self.dicts, itertools.repeat("forward"))):
            return None
        return next(i for i, d in enumerate(self.dicts) if "forward" in d)

    def structure(self) -> tuple:
        model = self.model()
        pool, avg = getattr(model, "maxpool", None), getattr(model, "avgpool", None)
        # module classes too: ``blk.__class__ = MyBlock`` registers nothing
        self.last = (type(model), list(map(type, self.modules)),
                     list(map(_CONV_ITEMS, self.convs)),
                     list(map(_EPS, self.bns)), list(map(_EPS, self.frozen)),
                     _POOL_ATTRS(pool) if isinstance(pool, nn.MaxPool2d) else None,
                     getattr(avg, "output_size", None))
        return self.last


_modules_memo: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def structure(model: nn.Module) -> tuple:
    """The module settings the plan and :func:`unsupported_reason` read that are not tensors:
    every convolution's geometry, every BatchNorm's ``eps``, the pools' settings and every
    module's class. Editing one of them (say ``layer4[0].conv2.stride = (1, 1)``
    after a first forward) changes this value, which rebuilds the plan. ~8 us for ResNet-50
    (the module lists are kept while no module is registered anywhere)."""
    return _modules(model).structure()


def _modules(model: nn.Module, check_tree: bool = False) -> _Modules:
    """The memoized module lists of ``model``. ``check_tree``: first check that no submodule
    was deleted or inserted without registering anything (``tree_unchanged``); one that was
    counts as a registration, so that every memo keyed on the counter (this one, the plan
    cache's, the verdict of :func:`unsupported_reason`) looks again."""
    hit = _modules_memo.get(model)
    if check_tree and hit is not None and not hit[1].tree_unchanged():
        _bump()
    if hit is None or hit[0] != _registrations or not _HOOKS:
        hit = (_current_registrations(), _Modules(model))
        _modules_memo[model] = hit
    return hit[1]


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


_MISFIT = "the model's layers do not fit together (torchvision's code decides): "


class LayersDoNotFit(ValueError):
    """The model's layers do not fit together as the plan would run them (a BatchNorm or a
    bias of another size than its convolution's output, a convolution's input channels or a
    residual that differs from what the layer before gives, an ``fc`` of other features): the
    forward runs torchvision's code instead, which raises its own error, or broadcasts where
    torchvision's layers do."""


_NO_FLOAT64 = frozenset({"mps"})  # device types whose tensors cannot be float64


def fold_dtype(device: torch.device, traced: bool = False) -> torch.dtype:
    """The dtype :func:`fold_batchnorm` computes in: float64, or fp32 when ``traced`` or on a
    device without float64."""
    return torch.float32 if traced or device.type in _NO_FLOAT64 else torch.float64


@torch.no_grad()
def fold_batchnorm(conv: nn.Conv2d, bn: nn.Module, dtype: torch.dtype,
                   name: str = "", traced: bool = False) -> ConvStep:
    """Fold ``bn`` (eval statistics; a BatchNorm2d or torchvision's FrozenBatchNorm2d) into
    ``conv``: weight cast to ``dtype``, bias fp32.

    ``w' = w * gamma / sqrt(var + eps)``, ``b' = beta - mean * gamma / sqrt(var + eps)``
    (+ the conv's own bias, if any), computed in float64 so each folded value is rounded once
    (an fp32 fold rounds the rsqrt, the gamma product and the weight product in turn). Raises
    ``FloatingPointError`` when the folded weight or bias is not finite in its dtype (for
    example a tiny running variance overflowing fp16).

    ``traced=True`` (a traced forward, whose graph records the fold and runs it on every call)
    folds in fp32, so an exported program run eagerly does not materialize float64 copies of
    the weights per call, and skips the finiteness check (it is data-dependent) except under
    ``torch.jit.trace``, whose parameters are real tensors: a fold that overflows then traces
    torchvision's code, as an eager forward runs it. Devices without float64 (Apple's
    ``mps``) fold in fp32 too.
    """
    _check_fold_sizes(conv, bn, name)
    work = fold_dtype(conv.weight.device, traced)
    # (flat: a FrozenBatchNorm2d's tensors may be [1, C] or [1, 1], which its forward reshapes)
    scale = torch.rsqrt(bn.running_var.to(work).reshape(-1) + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.to(work).reshape(-1)
    shift = -bn.running_mean.to(work).reshape(-1) * scale
    if bn.bias is not None:
        shift = shift + bn.bias.to(work).reshape(-1)
    if conv.bias is not None:
        shift = shift + conv.bias.to(work) * scale
    # (a FrozenBatchNorm2d's one-value tensors broadcast, as in torchvision's forward)
    shift = shift.float().expand(_sizes(conv.weight)[0])
    # the weight is promoted to ``work`` inside the multiply (no converted copy of it)
    folded = (conv.weight * scale.view(-1, 1, 1, 1)).to(dtype)
    if _fold_checkable(traced, folded) and not _all_finite(folded, shift):
        raise FloatingPointError(f"folding {name or 'a BatchNorm'} gives non-finite weights in "
                                 f"{dtype}")
    return ConvStep(
        weight=folded.contiguous(memory_format=torch.channels_last),
        bias=shift.contiguous(),
        stride=list(_pair(conv.stride)),
        padding=list(_pair(conv.padding)),
        dilation=list(_pair(conv.dilation)),
        groups=conv.groups,
        name=name,
    )


def _fold_checkable(traced: bool, folded: Tensor) -> bool:
    """Whether :func:`fold_batchnorm` can check its fold's finiteness: always untraced; under
    ``torch.jit.trace`` where the weights hold data (the check is a Python branch, which the
    trace does not record: it is decided for the weights traced); never under dynamo or
    export (fake tensors) or for weights without data."""
    if not traced:
        return True
    if not torch.jit.is_tracing() or _dynamo_tracing() or _exporting():
        return False
    return not without_data(folded)


def _all_finite(*tensors: Tensor) -> bool:
    with warnings.catch_warnings():  # (under torch.jit.trace: a branch on the traced weights)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        return all(bool(torch.isfinite(t).all()) for t in tensors)


def _check_fold_sizes(conv: nn.Conv2d, bn: nn.Module, name: str) -> None:
    """Raise :class:`LayersDoNotFit` where torchvision's layers would refuse ``conv`` and
    ``bn`` together, or compute something the fold does not: a 4-D weight, a bias of one value
    per output channel, and BatchNorm tensors of one value per channel (a
    ``FrozenBatchNorm2d``'s, which its forward reshapes to ``[1, -1, 1, 1]``, of any shape
    with one value per channel or one value in all, which broadcasts). The fold would
    otherwise broadcast a one-value tensor, or the kernels read past a short one."""
    weight = _sizes(conv.weight)  # (sizes as ints: under torch.jit.trace too)
    label = name or "a convolution"
    if len(weight) != 4:
        raise LayersDoNotFit(f"{label}'s weight has shape {weight} (a 2-D convolution's "
                             "weight is 4-D)")
    c_out = weight[0]
    if conv.bias is not None and _sizes(conv.bias) != (c_out,):
        raise LayersDoNotFit(f"{label}'s bias has shape {_sizes(conv.bias)}, expected "
                             f"({c_out},): one per output channel")
    frozen = frozen_bn_type()
    broadcasts = frozen is not None and isinstance(bn, frozen)
    for attr in _FOLDED:
        t = getattr(bn, attr, None)
        shape = None if t is None else _sizes(t)
        if shape is None or shape == (c_out,):
            continue
        if broadcasts and math.prod(shape) in (1, c_out):
            continue
        raise LayersDoNotFit(f"{_bn_name(name)}.{attr} has shape {shape}, expected "
                             f"({c_out},): one per output channel of {label}")


def _bn_name(conv_name: str) -> str:
    """The BatchNorm's name beside the convolution ``conv_name``: ``layer1.0.conv2`` ->
    ``layer1.0.bn2``, ``conv1`` -> ``bn1``, ``layer2.0.downsample`` ->
    ``layer2.0.downsample.1``."""
    if not conv_name:
        return "its BatchNorm"
    if conv_name.endswith("downsample"):
        return f"{conv_name}.1"
    head, _, tail = conv_name.rpartition(".")
    bn = "bn" + tail[len("conv"):] if tail.startswith("conv") else f"{tail}'s BatchNorm"
    return f"{head}.{bn}" if head else bn


@dataclass
class BlockPlan:
    convs: list[ConvStep]  # conv1, conv2[, conv3]; the last one carries residual + ReLU
    downsample: ConvStep | None


_HEAD_MISSING = "the model's avgpool or fc is not torchvision's: only its features run fused"


class InferencePlan:
    """The folded, fused forward of one model for one compute dtype."""

    def __init__(self, model: nn.Module, dtype: torch.dtype, traced: bool = False):
        self.dtype = dtype
        # built for a traced forward or one without data (see plan_for_input): it runs the
        # custom ops, whose fake kernels a graph or a fake tensor goes through
        self.traced = traced
        self.stem = fold_batchnorm(model.conv1, model.bn1, dtype, "conv1", traced)
        self.blocks: list[BlockPlan] = []
        # self.blocks[stage_ends[i - 1]:stage_ends[i]] are layer{i}'s (stage_ends[0] = 0)
        self.stage_ends: list[int] = [0]
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
            self.stage_ends.append(len(self.blocks))
        # a head only where the layout has torchvision's (an fc replaced by nn.Identity() for
        # a backbone: the features paths run this plan, the forward runs eagerly)
        self.fc_weight = self.fc_bias = self.num_classes = None
        if _head_reason(model, instance_forward=False) is None:  # (the layout decides)
            with torch.no_grad():
                self.fc_weight = model.fc.weight.detach().to(dtype).contiguous()
                rows = _sizes(self.fc_weight)[:1]  # (out_features, unless edited)
                fc_bias = model.fc.bias
                if fc_bias is None:  # nn.Linear(..., bias=False): one zero per weight row
                    fc_bias = torch.zeros(rows, device=self.fc_weight.device)
                self.fc_bias = fc_bias.detach().to(dtype).contiguous()
            self.num_classes = rows[0] if rows else 0
        # why torchvision's layers would refuse these parameters at this compute dtype, without
        # and with autocast (see dtype_mismatch)
        self.dtype_mismatch = {(autocast, head): _dtype_mismatch(model, dtype, autocast, head)
                               for autocast in (False, True) for head in (False, True)}
        # input signature and choice state -> the implementation of every step, in order
        self._dispatch: dict[tuple, tuple] = {}
        # The layers' channels, groups and settings against each other (any input size):
        # the trunk's misfit is no plan (the forward runs torchvision's code); the head's
        # keeps the plan for the feature paths, and the full forward runs eagerly.
        trunk = self._walk(_sizes(self.stem.weight)[1] * self.stem.groups, None)
        if isinstance(trunk, str):
            raise LayersDoNotFit(trunk)
        self.head_misfit = self._head_misfit(trunk[0])
        # (channels, height, width) of an input -> why the layers do not fit it (None)
        self._fits: dict[tuple, str | None] = {}

    def misfit(self, c: int, h: int, w: int) -> str | None:
        """Why an input of ``c`` channels and ``h`` x ``w`` pixels does not go through this
        plan's trunk as torchvision's would take it (``None``: it does): on top of what the
        plan's build checked (each convolution's input channels, groups, stride, padding and
        dilation against the step before; ``fc`` against the features: ``head_misfit``),
        each convolution's output size and each block's residual against its last
        convolution's output. Integer arithmetic, remembered per input size, so the kernels
        (which take their operands' sizes on trust) never see a layer that does not fit."""
        key = (c, h, w)
        fits = self._fits
        if key in fits:
            return fits[key]
        if len(fits) >= _DISPATCH_MEMO_SIZE:
            fits.clear()
        walked = self._walk(c, (h, w))
        reason = fits[key] = walked if isinstance(walked, str) else None
        return reason

    def _walk(self, c: int, hw: tuple[int, int] | None):
        """The first misfit met on the way of ``c`` input channels through the trunk (with
        ``hw``, the input's height and width, the sizes too), or the trunk's output:
        ``(channels, (height, width) or None)``. Messages name no input size, so a misfit
        met at several sizes is said once."""
        def through(step: ConvStep, shape: tuple):
            cin, size = shape
            k, per_group, r, s = weight = _sizes(step.weight)
            if step.groups < 1 or k % step.groups or per_group * step.groups != cin:
                return (f"{step.name} takes {per_group * step.groups} input channels "
                        f"(weight {weight}, groups {step.groups}) and gets {cin}")
            if min(step.stride) < 1 or min(step.dilation) < 1 or min(step.padding) < 0:
                return (f"{step.name} has stride {tuple(step.stride)}, padding "
                        f"{tuple(step.padding)}, dilation {tuple(step.dilation)} (a convolution "
                        "takes strides and dilations of at least 1 and no negative padding)")
            if size is None:
                return (k, None)
            p, q = conv_output_size(*size, r, s, step.stride, step.padding, step.dilation)
            if p < 1 or q < 1:
                return f"{step.name}'s {r}x{s} kernel leaves no output pixel at this input size"
            return (k, (p, q))

        shape = through(self.stem, (c, hw))
        if isinstance(shape, str):
            return shape
        if hw is not None:  # the max-pool 3x3/2, padding 1
            shape = (shape[0], ((shape[1][0] - 1) // 2 + 1, (shape[1][1] - 1) // 2 + 1))
        for blk in self.blocks:
            identity = shape
            if blk.downsample is not None:
                identity = through(blk.downsample, shape)
                if isinstance(identity, str):
                    return identity
            for step in blk.convs:
                shape = through(step, shape)
                if isinstance(shape, str):
                    return shape
            if shape != identity:
                name = blk.convs[-1].name.rpartition(".")[0]
                if shape[0] != identity[0]:
                    return (f"{name} adds a residual of {identity[0]} channels to its last "
                            f"convolution's {shape[0]}")
                return (f"{name} adds a residual of another height and width than its last "
                        "convolution's output (its strides and its downsample's differ)")
        return shape

    def _head_misfit(self, features: int) -> str | None:
        """Why ``fc`` does not take the trunk's ``features`` channels, or adds a bias of
        another size than its outputs (``None``: it fits, or the plan has no head)."""
        if self.fc_weight is None:
            return None
        fc_weight, fc_bias = _sizes(self.fc_weight), _sizes(self.fc_bias)
        if len(fc_weight) != 2 or fc_weight[1] != features:
            return (f"fc's weight has shape {fc_weight}, expected "
                    f"[out_features, {features}] for the {features} features it gets")
        if fc_bias != fc_weight[:1]:
            return (f"fc's bias has shape {fc_bias}, not one per output "
                    f"({fc_weight[0]},) (torchvision's F.linear broadcasts it)")
        return None

    def convs(self) -> list[ConvStep]:
        """Every convolution of the plan, in execution order."""
        out = [self.stem]
        for blk in self.blocks:
            if blk.downsample is not None:
                out.append(blk.downsample)
            out.extend(blk.convs)
        return out

    def run(self, x: Tensor, features_only: bool = False,
            taps: tuple[tuple[int, ...], int] | None = None):
        """The fused forward. ``x`` was checked by :func:`check_input`.

        ``features_only``: the output of ``layer4`` (no head). ``taps=(indices, last)``: the
        stages ``0..last`` only, returning ``(output of stage last, [output of each stage in
        indices])``, where stage 0 is the stem before its max-pool (run then as a convolution
        and a max-pool, not the fused stem) and stage ``i`` is ``layer{i}``'s output."""
        if _sizes(x)[0] == 0:  # (H, W >= 1: check_input refuses 0, with or without a batch)
            if torch.jit.is_tracing():  # the trace would return this empty output for any batch
                raise ValueError("torch.jit.trace with an empty batch would record a constant "
                                 "empty output; trace with a batch of at least 1")
            if features_only or taps is not None:
                raise ValueError("forward_features and forward_intermediates on an empty batch "
                                 "are not supported")
            if self.num_classes is None:
                raise RuntimeError(f"fastres: this plan has no head ({_HEAD_MISSING})")
            return x.new_empty((0, self.num_classes), dtype=self.dtype)
        if type(x) is Tensor and not tracing() and _backend.off_current_device(x):
            with torch.cuda.device(x.device):
                return self.run(x, features_only, taps)
        x = x.to(dtype=self.dtype, memory_format=torch.channels_last)
        if self.traced or type(x) is not Tensor or tracing():  # traces, fake/meta, subclasses
            return self._forward(x, features_only, _through_ops, taps)
        # The implementation each step runs is a function of the input's signature (every
        # later shape follows from it) and of the choice state (backend preference, tuning
        # mode and memo, TF32 flags, registered implementations): remembered per signature,
        # a forward skips choosing, about half of fastres's Python time per forward (the
        # tuner's memo key alone hashes every argument's shape and strides; see
        # benchmarks/host_overhead.py).
        key = (x.shape, x.stride(), x.device, features_only, taps, _backend.choice_state())
        fns = self._dispatch.get(key)
        if fns is not None:
            step = iter(fns).__next__
            return self._forward(x, features_only, lambda op, *args: step()(*args), taps)
        chosen: list[_backend.Impl] = []

        def choose_and_run(op: int, *args) -> Tensor:
            impl = _backend.choose(_OP_NAMES[op], args[0].device, *args)
            chosen.append(impl)
            return impl.fn(*args)

        with _backend.deferred_writes():  # (the tuning cache: one write for the forward)
            out = self._forward(x, features_only, choose_and_run, taps)
        # Remembered when every choice is final (one deferred during CUDA graph capture is
        # not the tuned one) and the state did not change during the forward (another thread
        # setting FASTRES_TUNE or the TF32 flags meanwhile: the choices would be a mix)
        if all(impl.final for impl in chosen) and _backend.choice_state() == key[-1]:
            memo = self._dispatch
            if len(memo) >= _DISPATCH_MEMO_SIZE:  # the oldest signature goes
                with contextlib.suppress(KeyError, RuntimeError, StopIteration):
                    del memo[next(iter(memo))]  # (unless another thread's change got there)
            memo[key] = tuple(impl.fn for impl in chosen)
        return out

    def _forward(self, x: Tensor, features_only: bool, call,
                 taps: tuple[tuple[int, ...], int] | None = None):
        """The fused forward on a channels-last ``x`` in the compute dtype, every op run as
        ``call(op, *args)`` with ``op`` one of ``_STEM_OP``, ``_CONV_OP``, ``_HEAD_OP``,
        ``_POOL_OP`` (see :meth:`run` for ``features_only`` and ``taps``)."""
        s = self.stem
        indices, last = taps if taps is not None else ((), 4)
        kept = []
        if 0 in indices:  # the stem's activation before its max-pool is wanted
            x = call(_CONV_OP, x, s.weight, s.bias, s.stride, s.padding, s.dilation, s.groups,
                     None, True)
            kept.append(x)
            x = call(_POOL_OP, x, 3, 2, 1)  # (torchvision's max-pool, which the plan requires)
        else:
            x = call(_STEM_OP, x, s.weight, s.bias)
        for stage in range(1, last + 1):
            for blk in self.blocks[self.stage_ends[stage - 1]:self.stage_ends[stage]]:
                d = blk.downsample
                identity = x if d is None else call(_CONV_OP, x, d.weight, d.bias, d.stride,
                                                    d.padding, d.dilation, d.groups, None, False)
                *inner, t = blk.convs  # the last one adds the residual
                for c in inner:
                    x = call(_CONV_OP, x, c.weight, c.bias, c.stride, c.padding, c.dilation,
                             c.groups, None, True)
                x = call(_CONV_OP, x, t.weight, t.bias, t.stride, t.padding, t.dilation,
                         t.groups, identity, True)
            if stage in indices:
                kept.append(x)
        if taps is not None:
            return x, kept
        if features_only:
            return x
        if self.fc_weight is None:  # (the forward asks eager_reason, which says so first)
            raise RuntimeError(f"fastres: this plan has no head ({_HEAD_MISSING})")
        return call(_HEAD_OP, x, self.fc_weight, self.fc_bias)


# -- the cache ---------------------------------------------------------------------------------

# Any parameter, buffer or submodule (re)registered anywhere bumps this counter, so a model
# whose counter is unchanged still has the same tensors list and only versions and storage
# pointers need checking (~tens of microseconds for ResNet-50 instead of a module walk).
_registrations = 0

# The hooks run *before* torch stores the new value: a forward in another thread between the
# two would see the new count with the old tree, and remember it as current (stale until the
# next registration anywhere). So each registration is pending until its value is in place,
# and while one is, memos store -1 (never current) instead of the count. A value lands
# microseconds after its hook; one that never does (another hook raised, or the name was
# deleted again before anything looked: the slot then still holds "absent") stops counting
# as pending after _PENDING_FOR seconds, so memos are not disabled for good.
# Entries: token -> (owner ref, "_modules"/"_parameters"/"_buffers", name, id of the new
# value, id of the old, when it stops counting). No lock: these hooks run on every
# registration in the process, also from a garbage collector's finalizer inside a hook (a
# lock held there deadlocked) and in a child forked while another thread was inside one (it
# hung). Each operation on the dict is atomic; pruning pops only the entries it saw landed.
_pending: dict[int, tuple] = {}
_pending_tokens = itertools.count()
_ABSENT = object()
_PENDING_FOR = 1.0


def _bump(*args):
    global _registrations
    _registrations += 1


def _landed(entry: tuple) -> bool:
    """The slot holds the new value, or anything but the old one (another hook may have
    replaced the value); ids, not references: a pending entry keeps nothing alive, and a
    reused id can only keep an entry pending (slower, never stale)."""
    owner_ref, where, name, new_id, old_id, until = entry
    owner = owner_ref()
    if owner is None or time.monotonic() > until:
        return True
    held = id(_in_slot(owner, where, name))
    return held == new_id or held != old_id


def _in_slot(owner: nn.Module, where: str, name: str):
    """What ``owner.<where>[name]`` holds (``_ABSENT``: nothing). A module's slots are dicts;
    a TorchScript module's are dict-likes without ``get`` (``OrderedModuleDict``, which
    ``torch.jit.load`` fills through these hooks): read by key, anything unreadable as
    nothing (the registration then counts as landed: never stale, at worst a rebuild)."""
    slots = getattr(owner, where, None)
    if type(slots) is dict:
        return slots.get(name, _ABSENT)
    try:
        return slots[name] if name in slots else _ABSENT
    except Exception:  # noqa: BLE001 - any container a module subclass may use
        return _ABSENT


def _registration_hook(where: str):
    def hook(owner, name, value):
        if _dynamo_tracing():
            # Dynamo traces the hooks of a registration inside a compiled forward (a module
            # assigning a buffer or parameter there: a step counter, an EMA, a cache); it
            # cannot trace a clock or a weak reference (fullgraph and strict export failed,
            # others got a graph break). The count is bumped (dynamo replays the global's
            # update after the graph; its own replay of the assignment may not run this
            # hook), with no pending entry.
            _bump()
            return
        old = _in_slot(owner, where, name)
        entry = (weakref.ref(owner), where, name, id(value), id(old),
                 time.monotonic() + _PENDING_FOR)
        if len(_pending) >= 32:  # (earlier ones have landed by now, but for a race)
            _prune_pending()
        _pending[next(_pending_tokens)] = entry
        _bump()
    return hook


def _prune_pending() -> None:
    for token, entry in _pending.copy().items():
        if _landed(entry):
            _pending.pop(token, None)


def _current_registrations() -> int:
    """The registration count to remember as current: -1 while a registration has not
    landed yet."""
    # the count first: a hook adds its entry before it bumps the count, so a count read
    # before the pending check is never newer than the registrations that check saw
    count = _registrations
    if _pending:
        _prune_pending()
        if _pending:
            return -1
    return count


try:  # torch >= 2.0
    from torch.nn.modules.module import (
        register_module_buffer_registration_hook,
        register_module_module_registration_hook,
        register_module_parameter_registration_hook,
    )

    register_module_buffer_registration_hook(_registration_hook("_buffers"))
    register_module_module_registration_hook(_registration_hook("_modules"))
    register_module_parameter_registration_hook(_registration_hook("_parameters"))
    _HOOKS = True
except ImportError:  # pragma: no cover - older torch: always walk the module tree
    _HOOKS = False


_VERSION = operator.attrgetter("_version")
_DATA_PTR = Tensor.data_ptr


def _version_or_inference(t: Tensor) -> int:
    # inference tensors (made under torch.inference_mode) have no version counter; they can
    # only be changed in place inside inference mode, which (like ``.data``) goes unseen
    return -1 if t.is_inference() else t._version


def _host_checks():
    """``(fastres._C.slots_hold, fastres._C.tensor_state)`` when the extension is loaded and
    has them, else ``(None, None)``: the plan cache's per-forward checks in one C call each
    (for ResNet-50's 373 slots and 320 tensors ~2 and ~3 us, against ~13 us for a dict lookup
    per slot and ~65 us for two attribute reads per tensor in Python)."""
    from fastres import _ext

    module = _ext.load()
    hold, state = getattr(module, "slots_hold", None), getattr(module, "tensor_state", None)
    return (hold, state) if hold is not None and state is not None else (None, None)


def _slots_hold(dicts: list, names: list, held: list) -> bool:
    """Python twin of ``fastres._C.slots_hold``: every ``dicts[i].get(names[i])`` is
    ``held[i]``."""
    return all(map(operator.is_, map(dict.get, dicts, names), held))


def _python_tensor_state(version_of):
    """Python twin of ``fastres._C.tensor_state``, reading versions with ``version_of``: a
    function of a tensor list whose value is equal for two calls exactly when every tensor has
    the same version and data pointer in both."""
    def tensor_state(tensors: list) -> tuple[list, list]:
        return list(map(version_of, tensors)), list(map(_DATA_PTR, tensors))
    return tensor_state


class _PlanCache:
    """Plans per compute dtype, valid while every parameter and buffer is unchanged: the same
    tensor objects in the same module slots (``torch.func.functional_call`` swaps them in
    without registering anything), the same storage and version counters, and the same
    module settings (:func:`structure`)."""

    __slots__ = ("tensors", "live", "refs", "plans", "registrations", "slots", "names",
                 "structure", "hold_of", "state_of", "state")

    def __init__(self, model: nn.Module):
        self.registrations = _current_registrations()
        # every (owner dict, name) slot and what it holds: a tensor, or None (a bias-less
        # convolution's bias, which torch.func.functional_call can fill without registering).
        # (BatchNorm's num_batches_tracked too, which the plan does not read: a train-mode
        # forward updates the running statistics without bumping their version counters,
        # and it is the counter its add_(1) bumps that shows the update.)
        self.slots, self.names, held = [], [], []
        for m in model.modules():
            for d in (m._parameters, m._buffers):
                for name, t in d.items():
                    self.slots.append(d)
                    self.names.append(name)
                    held.append(t)
        self.tensors = held
        live = self.live = [t for t in held if t is not None]
        # detach() shares storage and version counter: holding it keeps the storage alive, so
        # an equal data_ptr below means the very same storage, never a reused address.
        self.refs = [t.detach() for t in live]
        # the checks valid_for repeats: by the extension when it is there, else (or for a
        # slot dict or a tensor it cannot read, say a tensor without storage) in Python
        hold, state = _host_checks()
        if state is not None:
            try:
                self.state = state(live)
                if not hold(self.slots, self.names, held):
                    raise RuntimeError("slots_hold disagrees with the slots just read")
            except (TypeError, ValueError, RuntimeError):
                hold = state = None
        if state is None:
            hold, state = _slots_hold, _python_tensor_state(
                _version_or_inference if any(t.is_inference() for t in live) else _VERSION)
            self.state = state(live)
        self.hold_of, self.state_of = hold, state
        self.structure = structure(model)
        self.plans: dict[torch.dtype, InferencePlan | _FailedBuild] = {}

    def valid_for(self, model: nn.Module, tree_checked: bool = False) -> bool:
        """True while the plans fit ``model``. ``tree_checked``: the caller has just checked
        its tree and read its :func:`structure` (:func:`unsupported_reason` does, in the
        forward's :func:`eager_reason`), so neither is done again."""
        if not tree_checked:
            _modules(model, check_tree=True)  # (a deleted or inserted submodule: a registration)
        if not _HOOKS or self.registrations != _registrations:
            # the count read before the walk: one read after it could include a registration
            # that landed after the walk had passed its slot, and would be kept as current
            # with the old tree (stale until anything else registered anywhere)
            now = _current_registrations()
            slots = [(d, name) for m in model.modules() for d in (m._parameters, m._buffers)
                     for name in d]
            if len(slots) != len(self.slots) or any(
                    d is not d0 or n != n0
                    for (d, n), d0, n0 in zip(slots, self.slots, self.names)):
                return False
            self.registrations = now
        if (not self.hold_of(self.slots, self.names, self.tensors)
                or self.state_of(self.live) != self.state):
            return False
        if tree_checked and _HOOKS:  # (the value unsupported_reason has just read)
            mods = _modules(model)
            return (mods.last if mods.last is not None else mods.structure()) == self.structure
        return structure(model) == self.structure


def release(model: nn.Module, stale_only: bool = False) -> None:
    """Drop what fastres keeps for ``model``'s fused forward now rather than at its next eval
    forward: the plan cache (the folded weights, and references to the tensors they were folded
    from, which keep those alive) and the memoized module lists (which keep replaced submodules
    alive). ``stale_only``: only when the cache no longer matches the model (after ``.to()``
    moved or cast it; a ``.to()`` that changed nothing keeps the plan)."""
    cache = model.__dict__.get("_plan_cache")
    if cache is None or (stale_only and cache.valid_for(model)):
        return
    model.__dict__["_plan_cache"] = None
    _modules_memo.pop(model, None)


# Held while a plan is built (never on the hit path): threads that all miss at once (the first
# requests of a threaded server) wait for one build instead of each folding the whole model.
_build_lock = threading.RLock()


def get_plan(model: nn.Module, dtype: torch.dtype | None = None,
             tree_checked: bool = False) -> InferencePlan:
    """The model's current plan for ``dtype`` (default: its parameter dtype), built if needed.
    ``tree_checked``: as :meth:`_PlanCache.valid_for`'s (the forward's :func:`eager_reason`
    has just checked the module tree).

    Thread-safe: threads calling one model concurrently get a complete plan, and a plan that
    is missing is built once (builds are serialized, process-wide). A call under way while
    another thread edits parameters or calls ``invalidate_plan()`` finishes with the plan it
    had (folded from the weights as it read them); the next call sees the edit. Assigning a
    submodule, parameter or buffer while another thread runs the model can go unseen by that
    call (the registration hooks run before the assignment lands); the calls after the
    assignment returned see it.
    """
    if dtype is None:
        dtype = model_dtype_device(model)[0]
    cache: _PlanCache | None = model.__dict__.get("_plan_cache")
    if cache is not None and cache.valid_for(model, tree_checked):
        plan = cache.plans.get(dtype)
        if plan is not None:
            return _built(plan)
    with _build_lock:  # check again: another thread may have built it meanwhile
        cache = model.__dict__.get("_plan_cache")
        if cache is None or not cache.valid_for(model):
            cache = _PlanCache(model)
            model.__dict__["_plan_cache"] = cache
        plan = cache.plans.get(dtype)
        if plan is None:
            try:
                plan = cache.plans[dtype] = InferencePlan(model, dtype)
            except (FloatingPointError, LayersDoNotFit) as exc:
                # remembered with the cache (so dropped with it when the model changes): each
                # forward would otherwise fold every layer again, under the build lock
                cache.plans[dtype] = _FailedBuild(type(exc), str(exc))
                raise
        return _built(plan)


@dataclass(frozen=True)
class _FailedBuild:
    """A plan that could not be built, and why (raised again by :func:`get_plan`)."""

    kind: type
    message: str


def _built(plan) -> InferencePlan:
    if isinstance(plan, _FailedBuild):
        raise plan.kind(plan.message)
    return plan


try:
    from torch._subclasses.fake_tensor import is_fake as _is_fake
except ImportError:  # pragma: no cover - other torch versions
    def _is_fake(x) -> bool:
        return False


def _fake_mode_active() -> bool:
    try:
        return torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None
    except AttributeError:  # pragma: no cover - other torch versions
        return False


def without_data(x: Tensor) -> bool:
    """True for a forward that has shapes but no values: ``x`` on the ``meta`` device, a
    ``FakeTensor``, or any input while a ``FakeTensorMode`` is active (as shape-inference and
    FLOP-counting tools use; a real input is faked by the first op there). The model's
    forward then gives the output's shape and dtype, as torchvision's does."""
    return x.is_meta or _is_fake(x) or _fake_mode_active()


def plan_for_input(model: nn.Module, x: Tensor, head: bool = True,
                   tree_checked: bool = False) -> InferencePlan | None:
    """The plan for this input, or ``None`` (after one warning) when folding is not finite.
    ``tree_checked=True`` when :func:`eager_reason` has just said ``None`` for this forward
    (it checked the module tree, which is then not checked a second time: 3 to 5 us
    for ResNet-50 on the CPUs we measured).

    Under :func:`tracing` a fresh, uncached plan is built from the parameters: the folding is
    recorded in the graph (``torch.export`` gets ``fastres.*`` ops whose weights are computed
    from the state_dict's tensors; ``torch.compile`` re-folds per call unless inductor's
    ``freezing`` constant-folds it), in fp32 rather than float64, and the finiteness check is
    skipped. So it is for an input without data (:func:`without_data`: a ``meta`` tensor or
    one made under ``FakeTensorMode``, for shapes), whose plan must not be cached either.
    """
    dtype = compute_dtype(model, x)
    try:
        if tracing() or without_data(x):
            plan = InferencePlan(model, dtype, traced=True)
        else:
            plan = get_plan(model, dtype, tree_checked)
        if head and plan.fc_weight is None:  # (eager_reason said the head fuses: a safety net)
            say_eager_once(_HEAD_MISSING)
            return None
    except FloatingPointError as exc:
        say_eager_once(str(exc))
        return None
    except LayersDoNotFit as exc:
        say_eager_once(f"{_MISFIT}{exc}")
        return None
    if head and plan.head_misfit is not None:
        say_eager_once(f"{_MISFIT}{plan.head_misfit}")
        return None
    sizes = _sizes(x)
    # (not inside dynamo, and not for symbolic sizes: the custom ops' checks raise there)
    if not _dynamo_tracing() and all(type(v) is int for v in sizes[1:]):
        misfit = plan.misfit(sizes[1], sizes[2], sizes[3])
        if misfit is not None:
            say_eager_once(f"{_MISFIT}{misfit}")
            return None
    dev = x.device.type
    mismatch = plan.dtype_mismatch[dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev),
                                   head]
    if mismatch is not None:
        say_eager_once(mismatch)
        return None
    return plan


def _dtype_mismatch(model: nn.Module, dtype: torch.dtype, autocast: bool,
                    head: bool = True) -> str | None:
    """Why torchvision's layers would not run ``model``'s parameters together in ``dtype``
    (``None``: they would), so that its eager code gives torchvision's result or error instead
    of a plan that casts them silently. Convolutions and ``fc`` need their weight and bias in
    the compute dtype, which autocast casts them to, except float64; a BatchNorm takes
    parameters and statistics of one dtype, the input's or float32 (for a 16-bit input)."""
    modules = [(name, m) for name, m in model.named_modules() if head or not _in_head(name)]
    matmul = {t.dtype for _, m in modules if isinstance(m, (nn.Conv2d, nn.Linear))
              for t in (m.weight, m.bias) if t is not None}
    if (torch.float64 in matmul) if autocast else (matmul != {dtype}):
        got = ", ".join(sorted(str(d).removeprefix("torch.") for d in matmul))
        return (f"convolution and linear parameters in {got} with a {dtype} forward"
                + (" under autocast (which leaves float64 alone)" if autocast else "")
                + " (torchvision's layers need the input's dtype)")
    frozen = frozen_bn_type()
    for name, m in modules:
        if isinstance(m, nn.BatchNorm2d):
            got = {t.dtype for t in (m.weight, m.bias, m.running_mean, m.running_var)
                   if t is not None}
            if got not in ({dtype}, {torch.float32}):
                got_s = ", ".join(sorted(str(d).removeprefix("torch.") for d in got))
                return (f"{name} holds {got_s} parameters and statistics for a {dtype} "
                        "input (BatchNorm takes one dtype: the input's, or float32)")
        elif frozen is not None and isinstance(m, frozen):
            # x * scale + shift: its buffers promote the output's dtype, and torchvision's next
            # convolution takes the promoted dtype only under autocast (not float64)
            got = {t.dtype for t in (getattr(m, k) for k in _FOLDED)}
            bad = (torch.float64 in got) if autocast else any(
                torch.promote_types(dtype, d) != dtype for d in got)
            if bad:
                got_s = ", ".join(sorted(str(d).removeprefix("torch.") for d in got))
                return (f"{name} holds {got_s} buffers for a {dtype} forward"
                        + (" under autocast" if autocast else "")
                        + " (FrozenBatchNorm2d's output takes their dtype if it is wider)")
    return None
