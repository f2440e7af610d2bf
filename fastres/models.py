"""torchvision-compatible ResNet family.

The module tree, attribute names, ``state_dict`` keys/order/shapes and train-mode behaviour
are torchvision's (``torchvision.models.resnet``, ResNet v1.5: the stride is on the 3x3).
What differs is ``ResNet.forward`` in ``eval()`` mode: it runs the inference plan
(:mod:`fastres.plan`), a cache of BN-folded, channels-last weights executed through the
fused ops in :mod:`fastres.ops`.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import operator
import os
import pickle
import re
import sys
import zipfile
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from fastres import _warnings

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "from_torchvision",
    "get_model",
    "get_model_weights",
    "get_weight",
    "list_models",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "resnext101_64x4d",
    "wide_resnet50_2",
    "wide_resnet101_2",
]


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1,
            dilation: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=dilation,
                     groups=groups, bias=False, dilation=dilation)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion: int = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None, groups: int = 1, base_width: int = 64,
                 dilation: int = 1, norm_layer: Callable[..., nn.Module] | None = None) -> None:
        super().__init__()
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock only supports groups=1 and base_width=64")
        if dilation > 1:
            raise NotImplementedError("Dilation > 1 not supported in BasicBlock")
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    expansion: int = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None, groups: int = 1, base_width: int = 64,
                 dilation: int = 1, norm_layer: Callable[..., nn.Module] | None = None) -> None:
        super().__init__()
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = norm_layer(width)
        self.conv2 = conv3x3(width, width, stride, groups, dilation)
        self.bn2 = norm_layer(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


def _block_types(ours: type) -> tuple[type, type]:
    """fastres's block class and torchvision's of the same name (fastres's again when
    torchvision's resnet module is not loaded: then no torchvision block exists)."""
    tv = sys.modules.get("torchvision.models.resnet")
    return ours, getattr(tv, ours.__name__, ours)


class ResNet(nn.Module):
    """torchvision's ResNet, with a fused inference path in ``eval()`` mode.

    Constructor arguments are torchvision's. In ``train()`` mode, or whenever autograd must
    track the forward pass (grad enabled and the input or a parameter requires grad), the
    forward pass is torchvision's eager code. Otherwise it runs the inference plan, which is
    rebuilt automatically when any parameter or buffer changes (see :mod:`fastres.plan`).

    Choices a user will notice:

    - The eval-mode output is a new tensor in the compute dtype: the model's parameter dtype,
      or the autocast dtype when autocast is on for the input's device.
    - Activations inside the plan are channels-last; the output ``[N, num_classes]`` is as
      torchvision's.
    - Eval mode with autograd recording falls back to eager (warned once): wrap inference in
      ``torch.no_grad()`` / ``torch.inference_mode()`` for the fused path.
    - A model whose norm layers are not ``BatchNorm2d`` with running statistics (or
      torchvision's ``FrozenBatchNorm2d``, which folds too), or whose
      layout the plan does not fuse (another stem, activation or pool, an ``fc`` that is not
      ``nn.Linear``, a block with its own ``forward``), runs eagerly (warned once).
    - Forward hooks or pre-hooks on any submodule (or global module hooks) make the eval
      forward run eagerly (warned once), so they run as in torchvision: the plan runs no
      submodule. Hooks on the model itself run around either path. ``torch.fx`` tracing
      (``create_feature_extractor``) and ``torch.jit.script`` see torchvision's code.
    - A forward under a ``torch.func`` transform (``vmap``, ``jvp``, ...) or with
      forward-mode AD dual tensors runs eagerly (warned once): the fused ops have no
      batching or forward-mode rules.
    - Edits through ``param.data`` bypass PyTorch's version counter: call
      :meth:`invalidate_plan` after them (ordinary in-place edits, optimizer steps,
      ``load_state_dict``, ``.to()`` and ``.half()`` are detected), and after changing a
      weight parametrization's non-tensor state (its tensors are tracked).
    - The plan (a folded copy of the weights) is dropped when ``.to()`` / ``.cpu()`` /
      ``.half()`` ... move or cast the model and on a train-mode forward, so the memory it
      holds is freed then; the next eval forward folds again.
    """

    def __init__(self, block: type[BasicBlock | Bottleneck], layers: list[int],
                 num_classes: int = 1000, zero_init_residual: bool = False, groups: int = 1,
                 width_per_group: int = 64,
                 replace_stride_with_dilation: list[bool] | None = None,
                 norm_layer: Callable[..., nn.Module] | None = None) -> None:
        super().__init__()
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        self._norm_layer = norm_layer
        self.inplanes = 64
        self.dilation = 1
        if replace_stride_with_dilation is None:
            replace_stride_with_dilation = [False, False, False]
        if len(replace_stride_with_dilation) != 3:
            raise ValueError("replace_stride_with_dilation should be None or a 3-element "
                             f"tuple, got {replace_stride_with_dilation}")
        self.groups = groups
        self.base_width = width_per_group
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2,
                                       dilate=replace_stride_with_dilation[0])
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2,
                                       dilate=replace_stride_with_dilation[1])
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2,
                                       dilate=replace_stride_with_dilation[2])
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if zero_init_residual:
            # torchvision's own blocks too (fastres.ResNet(torchvision's Bottleneck, ...)), as
            # torchvision's ResNet zero-inits them
            bottlenecks, basics = _block_types(Bottleneck), _block_types(BasicBlock)
            for m in self.modules():
                if isinstance(m, bottlenecks) and m.bn3.weight is not None:
                    nn.init.constant_(m.bn3.weight, 0)
                elif isinstance(m, basics) and m.bn2.weight is not None:
                    nn.init.constant_(m.bn2.weight, 0)
        # Not a submodule, parameter or buffer: the plan never shows in state_dict().
        object.__setattr__(self, "_plan_cache", None)

    def _make_layer(self, block, planes: int, blocks: int, stride: int = 1,
                    dilate: bool = False) -> nn.Sequential:
        norm_layer = self._norm_layer
        downsample = None
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride),
                norm_layer(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample, self.groups, self.base_width,
                        previous_dilation, norm_layer)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes, groups=self.groups,
                                base_width=self.base_width, dilation=self.dilation,
                                norm_layer=norm_layer))
        return nn.Sequential(*layers)

    # -- torchvision's eager path ------------------------------------------------------------
    def _forward_impl(self, x: Tensor) -> Tensor:
        """torchvision's ``_forward_impl``, op for op (TorchScript-compatible)."""
        return self.forward_head_eager(self.forward_features_eager(x))

    def forward_features_eager(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)

    def forward_head_eager(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.avgpool(x), 1))

    def forward_eager(self, x: Tensor) -> Tensor:
        """torchvision's forward, op for op (a subclass's own ``_forward_impl`` if it has one)."""
        return self._forward_impl(x)

    # -- the fused path ----------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():  # torch.jit.script: torchvision's code, as torchvision
            return self._forward_impl(x)
        return self._forward_fused(x)

    @torch.jit.unused
    def _forward_fused(self, x: Tensor) -> Tensor:
        from fastres import plan as _plan

        if isinstance(x, torch.fx.Proxy):  # torch.fx symbolic tracing (create_feature_extractor)
            return self._forward_impl(x)
        if _onnx_exporting():  # ONNX has no fastres ops: torchvision's graph
            return self._forward_impl(x)
        reason = _plan.eager_reason(self, x)
        if reason is not None:
            if reason != "train":
                _plan.say_eager_once(reason)
            elif not _plan.tracing():
                _plan.release(self)  # training changes the weights the plan was folded from
            return self._forward_impl(x)
        plan = _plan.plan_for_input(self, x, tree_checked=True)
        if plan is None:
            return self._forward_impl(x)
        return plan.run(x)

    def forward_features(self, x: Tensor) -> Tensor:
        """Everything up to ``layer4`` (timm's split): ``[N, 512 * expansion, h, w]`` with
        ``h, w`` the input's size over 32, rounded up (over 16 or 8 with
        ``replace_stride_with_dilation``). On the fused path (eval mode) the result is
        channels-last in the compute dtype: call ``.contiguous()`` before ``.view()``."""
        plan = self._features_plan(x)
        if plan is None:
            return self.forward_features_eager(x)
        return plan.run(x, features_only=True)

    def forward_intermediates(self, x: Tensor, indices: int | Sequence[int] | None = None,
                              norm: bool = False, stop_early: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False):
        """The feature maps of several stages in one forward, for detection and segmentation
        backbones (timm's API): stage 0 is the stem's activation before the max-pool (64
        channels, the input's size over 2), stages 1-4 are ``layer1``-``layer4``'s outputs
        (over 4, 8, 16, 32, or 8 from the dilated stages on with
        ``replace_stride_with_dilation``).

        ``indices``: ``None`` for all five stages, an int ``n`` for the last ``n``, or a
        sequence of stage numbers (negative ones count from the end, ``-1`` is ``layer4``).
        The list returned holds each chosen stage once, in stage order. ``stop_early=True``
        runs no stage after the last chosen one. Returns ``(final, intermediates)``, with
        ``final`` the last stage run (``layer4``'s output unless ``stop_early``; after the
        max-pool if only stage 0 ran), or the list alone with ``intermediates_only=True``.
        ``norm`` is accepted for timm's signature and does nothing (ResNet has no final norm);
        ``output_fmt`` must be ``"NCHW"`` (the shape's order; on the fused path the tensors
        are channels-last in memory, in the compute dtype, as :meth:`forward_features`'s).

        In eval mode the stages run fused, as :meth:`forward_features` does; asking for stage
        0 replaces the fused stem by its convolution and a separate max-pool, so the
        activation before the pool is written. Otherwise, and wherever the forward would run
        eagerly, torchvision's modules run (the stage outputs are then theirs)."""
        take, last = _take_indices(indices)
        if output_fmt != "NCHW":
            raise ValueError(f"forward_intermediates: output_fmt must be 'NCHW' (the only "
                             f"format of a ResNet's feature maps), got {output_fmt!r}")
        for name, flag in (("norm", norm), ("stop_early", stop_early),
                           ("intermediates_only", intermediates_only)):
            if not isinstance(flag, bool):
                raise TypeError(f"forward_intermediates: {name} must be a bool, got {flag!r}")
        taps = (take, last if stop_early else 4)
        plan = self._features_plan(x)
        if plan is None:
            final, kept = self.forward_intermediates_eager(x, *taps)
        else:
            final, kept = plan.run(x, taps=taps)
        return kept if intermediates_only else (final, kept)

    def forward_intermediates_eager(self, x: Tensor, take: Sequence[int] = (0, 1, 2, 3, 4),
                                    last: int = 4) -> tuple[Tensor, list[Tensor]]:
        """torchvision's modules run stage by stage up to stage ``last``: ``(the last stage's
        output, [the outputs of the stages in take])`` (see :meth:`forward_intermediates`)."""
        kept = []
        x = self.relu(self.bn1(self.conv1(x)))
        if 0 in take:
            kept.append(x)
        x = self.maxpool(x)
        for stage in range(1, last + 1):
            x = getattr(self, f"layer{stage}")(x)
            if stage in take:
                kept.append(x)
        return x, kept

    def _features_plan(self, x: Tensor):
        """The plan :meth:`forward_features` and :meth:`forward_intermediates` run, or
        ``None`` for torchvision's eager code (said once why, as the forward does)."""
        from fastres import plan as _plan

        if isinstance(x, torch.fx.Proxy) or _onnx_exporting():  # fx symbolic tracing, ONNX
            return None
        reason = _plan.eager_reason(self, x, head=False)  # (an fc replaced by Identity is fine)
        if reason is None and _plan._sizes(x)[0] > 0:  # (eager: [0, C, h, w])
            return _plan.plan_for_input(self, x, head=False, tree_checked=True)
        if reason not in (None, "train"):
            _plan.say_eager_once(reason)
        elif reason == "train" and not _plan.tracing():
            _plan.release(self)
        return None

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Global average pool + ``fc`` on features from :meth:`forward_features`; with
        ``pre_logits=True`` the pooled ``[N, 512 * expansion]`` features, before ``fc``
        (timm's API)."""
        if pre_logits:
            return torch.flatten(self.avgpool(x), 1)
        return self.forward_head_eager(x)

    def _num_features(self) -> int:
        """Channels of the features :meth:`forward_features` returns."""
        fc = self.fc
        return fc.in_features if isinstance(fc, nn.Linear) else self.inplanes

    def reset_classifier(self, num_classes: int, global_pool: str = "avg") -> None:
        """Replace ``fc`` with a fresh ``nn.Linear`` of ``num_classes`` outputs, or with
        ``nn.Identity()`` for ``num_classes=0`` (the forward then returns the pooled features,
        on torchvision's eager code), as timm's ``reset_classifier`` does. ``global_pool``
        must be ``"avg"``, the only pooling of torchvision's layout."""
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"reset_classifier: num_classes must be an int >= 0, got "
                             f"{num_classes!r}")
        if global_pool != "avg":
            raise ValueError(f"reset_classifier: global_pool must be 'avg' (torchvision's "
                             f"average pool), got {global_pool!r}")
        ref = self.fc.weight if isinstance(self.fc, nn.Linear) else next(self.parameters())
        fc = nn.Linear(self._num_features(), num_classes) if num_classes else nn.Identity()
        self.fc = fc.to(device=ref.device, dtype=ref.dtype)
        self.invalidate_plan()

    def invalidate_plan(self) -> None:
        """Drop the cached inference plan; the next eval forward rebuilds it.

        Call it after editing weights in a way their version counters do not see: through
        ``param.data``, a NumPy view, ``param.untyped_storage()``, in-place inside
        ``torch.inference_mode()`` on inference tensors, or from another process through
        shared memory. (Until then the plan may run the old weights, or some of the new
        ones: a layer whose plan tensor is the parameter itself sees the edit, a folded
        one does not.)"""
        object.__setattr__(self, "_plan_cache", None)

    def _apply(self, fn, *args, **kwargs):
        # .to(), .cpu(), .cuda(), .half(), ...: a plan folded from the old tensors is dropped
        # now, with its references to them, so that the old copies (the GPU's, after .cpu())
        # are freed at once; a .to() that changed nothing keeps it
        out = super()._apply(fn, *args, **kwargs)
        from fastres import plan as _plan

        _plan.release(self, stale_only=True)
        return out

    def __getstate__(self):  # pickling and deepcopy never carry a plan along
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__
        state = dict(state)
        state["_plan_cache"] = None
        return state


NUM_STAGES = 5  # forward_intermediates' stages: the stem (before its max-pool), layer1-layer4


def _as_index(v) -> int | None:
    """``v`` as an int if it is one (a numpy or 0-d tensor integer too), not a bool (nor a
    one-element array or tensor, which ``operator.index`` takes too: a sequence of one)."""
    if isinstance(v, bool) or getattr(v, "ndim", 0) != 0:
        return None
    if isinstance(v, int):
        return v
    if not hasattr(type(v), "__index__"):  # (asked first: torch 2.11's dynamo turns the
        return None                        # TypeError of operator.index([..]) into its own)
    try:
        return operator.index(v)
    except TypeError:
        return None


def _take_indices(indices) -> tuple[tuple[int, ...], int]:
    """timm's ``feature_take_indices`` for the five stages: ``(the chosen stages in order,
    each once, the last of them)``, with a clear error for anything else."""
    what = "forward_intermediates: indices must be None, an int n (the last n stages) or " \
           f"a sequence of stage numbers in -{NUM_STAGES}..{NUM_STAGES - 1}"
    if indices is None:
        indices = NUM_STAGES
    if isinstance(indices, (bool, str, bytes)):
        raise TypeError(f"{what}, got {indices!r}")
    n = _as_index(indices)
    if n is not None:
        if not 1 <= n <= NUM_STAGES:
            raise ValueError(f"{what}; the last n needs 1 <= n <= {NUM_STAGES}, got {n}")
        return tuple(range(NUM_STAGES - n, NUM_STAGES)), NUM_STAGES - 1
    try:
        items = list(indices)
    except TypeError:
        raise TypeError(f"{what}, got {indices!r}") from None
    take = set()
    for item in items:
        i = _as_index(item)
        if i is None:
            raise TypeError(f"{what}, got {indices!r} (holding {item!r})")
        if not -NUM_STAGES <= i < NUM_STAGES:
            raise ValueError(f"{what}, got {indices!r} (holding {i})")
        take.add(i % NUM_STAGES)
    if not take:
        raise ValueError(f"{what}, got an empty {type(indices).__name__}")
    return tuple(sorted(take)), max(take)


def _onnx_exporting() -> bool:
    """True inside ``torch.onnx.export`` (the TorchScript-based exporter traces the forward
    with ``torch.jit.trace``, and ONNX has no ``fastres::*`` ops: the export records
    torchvision's eager graph instead, as it would for torchvision's model)."""
    from fastres import plan as _plan

    if not _plan.tracing():
        return False
    onnx = sys.modules.get("torch.onnx")  # not imported: nothing is exporting
    return onnx is not None and bool(onnx.is_in_onnx_export())


# -- constructors ----------------------------------------------------------------------------

_ARCHS: dict[str, tuple[type, list[int], dict[str, Any]]] = {
    "resnet18": (BasicBlock, [2, 2, 2, 2], {}),
    "resnet34": (BasicBlock, [3, 4, 6, 3], {}),
    "resnet50": (Bottleneck, [3, 4, 6, 3], {}),
    "resnet101": (Bottleneck, [3, 4, 23, 3], {}),
    "resnet152": (Bottleneck, [3, 8, 36, 3], {}),
    "resnext50_32x4d": (Bottleneck, [3, 4, 6, 3], {"groups": 32, "width_per_group": 4}),
    "resnext101_32x8d": (Bottleneck, [3, 4, 23, 3], {"groups": 32, "width_per_group": 8}),
    "resnext101_64x4d": (Bottleneck, [3, 4, 23, 3], {"groups": 64, "width_per_group": 4}),
    "wide_resnet50_2": (Bottleneck, [3, 4, 6, 3], {"width_per_group": 128}),
    "wide_resnet101_2": (Bottleneck, [3, 4, 23, 3], {"width_per_group": 128}),
}

MODEL_NAMES = tuple(_ARCHS)


_TV_WEIGHTS_NAME = re.compile(r"^(?:\w+_Weights\.)?(?:DEFAULT|IMAGENET1K_\w+)$")


def _torchvision_weights_enum(weights, arch: str | None):
    """The torchvision ``WeightsEnum`` member ``weights`` is or names (``"IMAGENET1K_V2"``,
    ``"ResNet50_Weights.DEFAULT"`` for ``arch``), else ``None``. Never downloads anything."""
    try:
        from torchvision.models import get_model_weights
        from torchvision.models._api import WeightsEnum
    except Exception:  # no torchvision (or a very old one): only the name can be recognized
        return None
    if isinstance(weights, WeightsEnum):
        return weights
    if isinstance(weights, str) and arch is not None and _TV_WEIGHTS_NAME.match(weights):
        try:
            return get_model_weights(arch).verify(weights)
        except Exception:
            return None
    return None


def torchvision_checkpoint_path(enum) -> str:
    """Where torchvision keeps the file of the weights enum member ``enum``: torch.hub's
    checkpoint directory (``$TORCH_HOME/hub/checkpoints``, ``torch.hub.set_dir``), under the
    name at the end of its URL, as ``torch.hub.load_state_dict_from_url`` stores it."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(enum.url))


def torchvision_weights_file(name: str, arch: str | None) -> str | None:
    """The file torchvision keeps for ``arch``'s weights named ``name`` (``"IMAGENET1K_V2"``,
    ``"DEFAULT"``, ``"ResNet50_Weights.DEFAULT"``) when ``name`` is such a name and the file
    is there, else ``None``."""
    enum = _torchvision_weights_enum(name, arch) if _TV_WEIGHTS_NAME.match(name) else None
    path = torchvision_checkpoint_path(enum) if enum is not None else None
    return path if path is not None and os.path.isfile(path) else None


def _no_download_hint(arch: str | None, enum) -> str:
    """How to get torchvision's weights into fastres without fastres downloading them."""
    arch = arch or "resnet50"
    where = ""
    if getattr(enum, "url", None):
        where = f" (torchvision downloads it to {torchvision_checkpoint_path(enum)})"
    name = f"{type(enum).__name__}.{enum.name}" if enum is not None else "..."
    return (f"pass weights= the path of a local checkpoint file{where}, or convert torchvision's "
            f"model: fastres.from_torchvision(torchvision.models.{arch}(weights={name}))")


def _load_torchvision_weights(enum, arch: str | None) -> dict[str, Tensor]:
    """The state_dict of torchvision's weights ``enum`` from the file torchvision keeps
    (loaded as torchvision loads it when it is there); a ``FileNotFoundError`` with the hint
    when it is not, since fastres downloads nothing. ``enum`` must be ``arch``'s weights, as
    torchvision's builders check (``TypeError`` otherwise)."""
    if arch is not None:
        from torchvision.models import get_model_weights

        enum = get_model_weights(arch).verify(enum)  # torchvision's TypeError for another model's
    path = torchvision_checkpoint_path(enum)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"fastres: {type(enum).__name__}.{enum.name} is not in "
                                "torchvision's cache, and fastres downloads nothing: "
                                + _no_download_hint(arch, enum))
    return load_weights(path)


# Keys that wrap a state_dict in training checkpoints: "state_dict", "model" (torchvision's
# reference scripts) and "model_state_dict" (PyTorch's checkpoint tutorial).
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")
# Prefixes every key gets when the model was wrapped: DataParallel / DistributedDataParallel
# ("module.") and torch.compile ("_orig_mod.").
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def unwrap_state_dict(sd: Mapping) -> dict:
    """The model's own ``state_dict`` inside a training checkpoint: nested under
    ``model_state_dict`` (or ``state_dict`` / ``model``) next to optimizer state, and with the
    ``module.`` / ``_orig_mod.`` prefix that DataParallel, DistributedDataParallel and
    torch.compile put on every key. A plain state_dict comes back as a plain ``dict`` copy.
    Tensors beside the nested state (pytorch/examples' ImageNet script saves ``best_acc1`` as
    one) do not stop the unwrapping: a model's own keys are dotted parameter names, never one
    of those wrapper names holding a mapping."""
    sd = dict(sd)
    for _ in range(3):
        inner = next((sd[k] for k in _WRAPPER_KEYS
                      if isinstance(sd.get(k), Mapping) and sd[k]), None)
        if inner is None:
            break
        sd = dict(inner)
    stripped = True
    while stripped and sd:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if all(isinstance(k, str) and k.startswith(prefix) for k in sd):
                sd = {k[len(prefix):]: v for k, v in sd.items()}
                stripped = True
    return sd


def not_a_file(path: str, what: str = "weights", expected: str = "a checkpoint file") -> str:
    """Why ``path`` (not a regular file) cannot be read as ``what``, in words.

    Callers test ``os.path.isfile`` first: opening a FIFO, socket or device would block or
    read forever, so only a regular file is opened.
    """
    if not path:
        return f"{what} is an empty path, expected {expected}"
    if os.path.isdir(path):
        return f"{what} path {path!r} is a directory, expected {expected}"
    if os.path.lexists(path) and not os.path.exists(path):
        return f"{what} path {path!r} is a broken symbolic link, expected {expected}"
    if os.path.exists(path):  # a FIFO, socket or device
        return f"{what} path {path!r} is not a regular file, expected {expected}"
    return f"{what} file {path!r} does not exist"


def load_weights(weights: str | os.PathLike | Mapping[str, Tensor],
                 arch: str | None = None) -> dict[str, Tensor]:
    """A state_dict from a checkpoint path (``torch.load``, weights only; or a safetensors
    file, the format model hubs distribute weights in, recognised by its header and read with
    the optional ``safetensors`` package) or a mapping.

    Training checkpoints are unwrapped (:func:`unwrap_state_dict`): the model's state nested
    under ``"state_dict"``, ``"model"`` or ``"model_state_dict"`` beside optimizer state, and
    the ``module.`` / ``_orig_mod.`` key prefixes of DataParallel/DDP and ``torch.compile``.
    torchvision's ``Weights`` enums and their names (``"DEFAULT"``, ``"IMAGENET1K_V1"``; ``arch``
    names the model they are for) load from the file torchvision keeps in torch.hub's
    checkpoint directory, as torchvision's builders do once they have downloaded it. Nothing
    is downloaded: when that file is missing, a ``FileNotFoundError`` says where torchvision
    would put it.

    A path that is not a regular file (missing, a directory, a FIFO, empty) is a
    ``FileNotFoundError`` that says which; a file that cannot be opened or is not a checkpoint
    is a ``ValueError``.
    """
    if isinstance(weights, Mapping):
        return unwrap_state_dict(weights)
    if isinstance(weights, (str, os.PathLike)):
        path = os.fspath(weights)
        if not os.path.isfile(path):
            if isinstance(weights, str) and _TV_WEIGHTS_NAME.match(weights):
                enum = _torchvision_weights_enum(weights, arch)
                if enum is not None:
                    return _load_torchvision_weights(enum, arch)
                raise FileNotFoundError(
                    f"fastres: weights {path!r} is not a file but the name of torchvision "
                    "weights, and fastres downloads nothing: " + _no_download_hint(arch, enum))
            raise FileNotFoundError(f"fastres: {not_a_file(path)}")
        if _is_safetensors(path):
            return unwrap_state_dict(_load_safetensors(path))
        # torchvision's reference scripts save {"model": ..., "args": argparse.Namespace}:
        # the Namespace is allowed through the weights-only unpickler (torch >= 2.5; older
        # torch refuses such a file with its weights-only message)
        safe = getattr(torch.serialization, "safe_globals", None)
        try:
            with safe([argparse.Namespace]) if safe else contextlib.nullcontext():
                sd = torch.load(path, map_location="cpu", weights_only=True)
        except OSError as exc:  # there, but cannot be opened (permissions, I/O error, ...)
            raise ValueError(f"fastres: cannot open weights file {path!r}: "
                             f"{exc.strerror or exc}") from exc
        except Exception as exc:
            why = str(exc) or ("the file is empty or truncated" if isinstance(exc, EOFError)
                               else type(exc).__name__)
            if isinstance(exc, (KeyError, IndexError, pickle.UnpicklingError)):
                # the unpickler's own words ("101", "pop from empty list") say nothing here
                why = _not_torch_save(path, f"{type(exc).__name__}: {why}")
            raise ValueError(f"fastres: could not read {path!r} as a PyTorch checkpoint: "
                             f"{why}") from exc
        if not isinstance(sd, Mapping):
            raise ValueError(f"fastres: {path!r} holds a {type(sd).__name__}, "
                             "expected a state_dict")
        return unwrap_state_dict(sd)
    enum = _torchvision_weights_enum(weights, arch)
    if enum is not None:
        return _load_torchvision_weights(enum, arch)
    raise TypeError("fastres: weights must be a checkpoint path, a state_dict mapping or "
                    f"torchvision weights (nothing is downloaded), got {type(weights).__name__}")


def _is_safetensors(path: str) -> bool:
    """True when the file starts as a safetensors file does: the 8-byte little-endian length
    of its JSON header (at most 100 MB, the format's limit), then the header's ``{``.
    (``torch.save``'s zip files and legacy pickles have a 0, 8 or 0xf9 byte there.) A
    truncated safetensors file passes, and ``safetensors`` says what is wrong with it.
    torch >= 2.14's ``torch.load`` reads files named ``*.safetensors`` itself; this reads
    them under any name and with older torch."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False  # torch.load's branch says why it cannot be opened
    return (len(head) == 9 and head[8:] == b"{"
            and int.from_bytes(head[:8], "little") <= 100_000_000)


def _load_safetensors(path: str) -> dict[str, Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise ValueError(f"fastres: {path!r} is a safetensors file, and reading it needs the "
                         "safetensors package (pip install safetensors)") from None
    try:
        return load_file(path, device="cpu")
    except Exception as exc:
        raise ValueError(f"fastres: could not read {path!r} as a safetensors file: "
                         f"{exc}") from exc


def _legacy_pretrained(arch: str, weights, kwargs: dict[str, Any]):
    """torchvision's deprecated ``pretrained=`` keyword, with torchvision's deprecation
    warning: ``False`` is ``weights=None``, ``True`` is ``IMAGENET1K_V1`` (what torchvision
    loads for it; read from torchvision's cache, never downloaded)."""
    if isinstance(weights, bool):  # torchvision reads weights=True/False as pretrained=
        if "pretrained" in kwargs:
            raise TypeError(f"{arch}: pass weights= or the deprecated pretrained=, not both")
        kwargs["pretrained"], weights = weights, None
    if "pretrained" not in kwargs:
        return weights
    pretrained = kwargs.pop("pretrained")
    if weights is not None:
        raise TypeError(f"{arch}: pass weights= or the deprecated pretrained=, not both")
    if pretrained:
        try:
            from torchvision.models import get_model_weights
        except Exception as exc:
            raise ValueError(f"fastres: {arch}(pretrained=True) loads torchvision's "
                             "IMAGENET1K_V1 weights, which needs torchvision "
                             f"({type(exc).__name__}: {exc})") from exc
        weights = get_model_weights(arch).IMAGENET1K_V1
    _warnings.warn("The parameter 'pretrained' is deprecated (torchvision 0.13), please use "
                   f"'weights' instead: pretrained={bool(pretrained)} is weights="
                   + (f"{type(weights).__name__}.IMAGENET1K_V1" if pretrained else "None"),
                   UserWarning)
    return weights


def _build(arch: str, weights, progress: bool = True, **kwargs: Any) -> ResNet:
    block, layers, defaults = _ARCHS[arch]
    weights = _legacy_pretrained(arch, weights, kwargs)
    for key, value in defaults.items():
        if key in kwargs and kwargs[key] != value:  # torchvision's _ovewrite_named_param
            raise ValueError(f"The parameter '{key}' expected value {value} but got "
                             f"{kwargs[key]} instead.")
        kwargs[key] = value
    sd = load_weights(weights, arch) if weights is not None else None
    if sd is not None and "num_classes" not in kwargs and "fc.weight" in sd:
        fc_weight = sd["fc.weight"]
        if not (isinstance(fc_weight, torch.Tensor) and fc_weight.dim() == 2):
            what = (f"shape {tuple(fc_weight.shape)}" if isinstance(fc_weight, torch.Tensor)
                    else f"a {type(fc_weight).__name__}")
            raise ValueError(f"fastres: the weights do not fit {arch}: fc.weight must be a "
                             f"2-D tensor [num_classes, features], got {what}")
        kwargs["num_classes"] = fc_weight.shape[0]
    model = ResNet(block, layers, **kwargs)
    if sd is not None:
        try:
            model.load_state_dict(sd, strict=True)
        except RuntimeError as exc:
            raise ValueError(f"fastres: the weights do not fit {arch}: {exc}") from exc
    return model


# torch.save's legacy (non-zip) format begins with its magic number, pickled
_LEGACY_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"


def _not_torch_save(path: str, detail: str) -> str:
    """Why ``path`` did not unpickle, where it is neither the zip archive ``torch.save``
    writes nor its legacy pickle (which begins with its magic number): that, with its first
    bytes; else ``detail``."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
        if head.startswith(_LEGACY_MAGIC) or zipfile.is_zipfile(path):
            return detail
    except OSError:
        return detail
    return ("it is neither the zip archive torch.save writes nor a legacy torch.save pickle "
            f"(its first bytes: {head!r}; the unpickler said {detail})")


def _make_constructor(arch: str):
    def constructor(*args: Any, weights=None, progress: bool = True, **kwargs: Any) -> ResNet:
        if args:  # torchvision's deprecated positional (weights, progress)
            if len(args) > 2:
                raise TypeError(f"{arch}() takes at most 2 positional arguments (weights, "
                                f"progress), but {len(args)} were given")
            if weights is not None:
                raise TypeError(f"{arch}() got multiple values for argument 'weights'")
            names = ", ".join(("'weights'", "'progress'")[:len(args)])
            _warnings.warn(f"Using {names} as positional parameter(s) is deprecated since "
                           "0.13 and may be removed in the future. Please use keyword "
                           "parameter(s) instead.", UserWarning)
            weights = args[0]
            if len(args) == 2:
                progress = args[1]
        return _build(arch, weights, progress, **kwargs)

    block, layers, defaults = _ARCHS[arch]
    constructor.__name__ = constructor.__qualname__ = arch
    constructor.__doc__ = (
        f"{arch} (torchvision-compatible; {block.__name__} blocks, layers {layers}"
        + (f", {defaults}" if defaults else "")
        + ").\n\n"
        "Keyword-only, as torchvision: ``weights`` is a path to a torchvision checkpoint, a\n"
        "state_dict, or torchvision's weights (an enum member or its name, such as\n"
        "``\"IMAGENET1K_V2\"``) read from the file torchvision keeps (nothing is downloaded;\n"
        "``num_classes`` is taken from the weights when not given);\n"
        "other keywords (``num_classes``, ``zero_init_residual``, ``groups``,\n"
        "``width_per_group``, ``replace_stride_with_dilation``, ``norm_layer``) go to\n"
        ":class:`ResNet`. ``progress`` is accepted for torchvision compatibility and ignored.\n"
        "torchvision's deprecated ``pretrained=`` is accepted too: ``True`` is\n"
        "``IMAGENET1K_V1``, ``False`` is ``None``; so are its deprecated forms\n"
        "``weights=True``/``False`` and ``weights``/``progress`` given positionally\n"
        "(``resnet50(True)``), with torchvision's deprecation warnings.\n"
    )
    return constructor


resnet18 = _make_constructor("resnet18")
resnet34 = _make_constructor("resnet34")
resnet50 = _make_constructor("resnet50")
resnet101 = _make_constructor("resnet101")
resnet152 = _make_constructor("resnet152")
resnext50_32x4d = _make_constructor("resnext50_32x4d")
resnext101_32x8d = _make_constructor("resnext101_32x8d")
resnext101_64x4d = _make_constructor("resnext101_64x4d")
wide_resnet50_2 = _make_constructor("wide_resnet50_2")
wide_resnet101_2 = _make_constructor("wide_resnet101_2")


# torchvision's weights enums of the models fastres builds (``fastres.ResNet50_Weights`` is
# torchvision's own class, imported when first asked for: torchvision stays optional)
WEIGHTS_ENUMS = ("ResNet18_Weights", "ResNet34_Weights", "ResNet50_Weights",
                 "ResNet101_Weights", "ResNet152_Weights", "ResNeXt50_32X4D_Weights",
                 "ResNeXt101_32X8D_Weights", "ResNeXt101_64X4D_Weights",
                 "Wide_ResNet50_2_Weights", "Wide_ResNet101_2_Weights")


def _torchvision_models(what: str):
    try:
        import torchvision.models as tvm
    except Exception as exc:
        raise ImportError(f"fastres: {what} is torchvision's, and importing torchvision "
                          f"failed ({type(exc).__name__}: {exc})") from exc
    return tvm


def __getattr__(name: str):
    if name in WEIGHTS_ENUMS:
        return getattr(_torchvision_models(name), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _patterns(p) -> list[str]:
    return [p] if isinstance(p, str) else list(p)


def list_models(module=None, include=None, exclude=None) -> list[str]:
    """The names of the models fastres builds, sorted, as ``torchvision.models.list_models``:
    ``include``/``exclude`` are ``fnmatch`` patterns (a string or several); ``module`` is
    accepted for compatibility (``None`` or ``fastres``/``fastres.models``)."""
    import fnmatch

    if module is not None and getattr(module, "__name__", None) not in ("fastres", __name__):
        raise ValueError(f"list_models: fastres lists its own models; module must be None, "
                         f"fastres or fastres.models, got {module!r}")
    names = sorted(MODEL_NAMES)
    if include is not None:
        names = [n for n in names if any(fnmatch.fnmatch(n, p) for p in _patterns(include))]
    if exclude is not None:
        names = [n for n in names if not any(fnmatch.fnmatch(n, p) for p in _patterns(exclude))]
    return names


def get_model_weights(name):
    """torchvision's weights enum of model ``name`` (a name, any case, or a builder such as
    ``fastres.resnet50``), as ``torchvision.models.get_model_weights``."""
    key = getattr(name, "__name__", name)
    key = key.lower() if isinstance(key, str) else key
    if key not in _ARCHS:
        raise ValueError(f"Unknown model {key} (fastres has {', '.join(MODEL_NAMES)})")
    return _torchvision_models("get_model_weights").get_model_weights(key)


def get_weight(name: str):
    """torchvision's weights enum member named ``name`` (``"ResNet50_Weights.IMAGENET1K_V2"``),
    as ``torchvision.models.get_weight``."""
    return _torchvision_models("get_weight").get_weight(name)


def get_model(name: str, **kwargs: Any) -> ResNet:
    """Build a model by name (one of :data:`MODEL_NAMES`, any case, as
    ``torchvision.models.get_model``)."""
    key = name.lower() if isinstance(name, str) else name
    if key not in _ARCHS:
        raise ValueError(f"Unknown model {key} (fastres has {', '.join(MODEL_NAMES)})")
    return globals()[key](**kwargs)


def _is_norm_slot(name: str) -> bool:
    """Where torchvision's ``norm_layer`` puts its modules: ``bn1``, ``layerI.J.bn1/2/3``,
    ``layerI.J.downsample.1``."""
    last = name.rsplit(".", 1)[-1]
    return last in ("bn1", "bn2", "bn3") or name.endswith(".downsample.1")


_CONTAINER_SLOT = re.compile(r"layer\d+(?:\.\d+(?:\.downsample)?)?")


def _is_container_slot(name: str, m: nn.Module) -> bool:
    """A torchvision container whose fastres twin has another class by design: ``layerI``
    and ``layerI.J.downsample`` (``nn.Sequential``), the blocks ``layerI.J``."""
    if not _CONTAINER_SLOT.fullmatch(name):
        return False
    if name.count(".") == 1:  # a block (a subclass, maybe with its own forward, is copied)
        return type(m) in _block_types(BasicBlock) + _block_types(Bottleneck)
    return type(m) is nn.Sequential


def _own_forward(model: nn.Module) -> str | None:
    """``"forward"`` or ``"_forward_impl"`` when ``model`` (its class, or the instance) has
    its own, not torchvision's ResNet's (or fastres's): a subclass that post-processes the
    logits, say. A wrapper set on the instance that wraps torchvision's own (accelerate's
    hooks, an autocast decorator, a ``functools.partial`` of it) is torchvision's: like the
    source's hooks, it stays with the source. ``None`` otherwise."""
    try:
        from torchvision.models.resnet import ResNet as TorchvisionResNet
    except ImportError:  # (not installed: the model given is none of its)
        TorchvisionResNet = ResNet
    for name in ("forward", "_forward_impl"):
        theirs = {getattr(TorchvisionResNet, name), getattr(ResNet, name)}
        if getattr(type(model), name, None) not in theirs:
            return name
        if name in model.__dict__ and not _unwraps_to(model.__dict__[name], theirs):
            return name
    return None


def _unwraps_to(fn, targets: set) -> bool:
    """Whether ``fn``, unwrapped (bound methods, ``functools.wraps``' ``__wrapped__``,
    ``functools.partial``), is one of ``targets``."""
    for _ in range(32):  # (a wrapper chain that long, or a cycle: not one of them)
        fn = getattr(fn, "__func__", fn)
        try:
            if fn in targets:
                return True
        except TypeError:  # (unhashable)
            return False
        nxt = getattr(fn, "__wrapped__", None)
        if nxt is None and isinstance(fn, functools.partial):
            nxt = fn.func
        if nxt is None:
            return False
        fn = nxt
    return False


def _same_layout(ours: nn.Module, theirs: nn.Module) -> bool:
    """Whether ``theirs`` is ``ours`` as built: the same ``repr`` (the settings) and its own
    parameters and buffers of the same names and shapes (a weight assigned with another
    shape, such as a grayscale stem's or a class subset's fc, leaves the repr as it was). A
    repr that raises (a setting torch's own repr cannot print) is a difference."""
    try:
        if repr(ours) != repr(theirs):
            return False
    except Exception:
        return False

    def tensors(m: nn.Module) -> list[tuple[str, tuple]]:
        return [(n, tuple(t.shape)) for n, t in (*m.named_parameters(recurse=False),
                                                  *m.named_buffers(recurse=False))]

    try:
        return tensors(ours) == tensors(theirs)
    except Exception:  # (an uninitialized lazy parameter has no shape)
        return False


def from_torchvision(model: nn.Module) -> ResNet:
    """A fastres :class:`ResNet` with ``model``'s architecture, weights, mode, dtype, device.

    ``model`` is a ``torchvision.models.ResNet`` (any of the family, any ``num_classes``,
    dilation or ``norm_layer``). The architecture is read off the module tree; the norm
    modules (whatever ``norm_layer`` made them: ``BatchNorm2d`` with its own ``eps`` and
    ``momentum``, ``GroupNorm``, ``FrozenBatchNorm2d``, ...) and an ``fc`` that is not a plain
    ``nn.Linear`` are copied as modules (without their hooks), and so is any module edited
    away from torchvision's layout (the plan still fuses an ``fc`` without bias and a stem with
    another number of input channels; with a CIFAR stem, another activation or block,
    fastres's model runs eagerly, with a warning naming the edit); the
    weights are copied, each in its own dtype (a model cast in part keeps its mix), so the two
    models do not share storage afterwards.
    Each module's train/eval mode and each parameter's ``requires_grad`` are kept.
    A ``torch.compile``'d model is converted from the module it wraps (the result is not
    compiled: compile it again).
    """
    orig = getattr(model, "_orig_mod", None)  # torch.compile's OptimizedModule
    if isinstance(orig, nn.Module) and type(model).__name__ == "OptimizedModule":
        model = orig
    needed = ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc")
    if not isinstance(model, nn.Module) or not all(hasattr(model, n) for n in needed):
        raise TypeError("from_torchvision expects a torchvision ResNet (with conv1, bn1, "
                        f"layer1..4 and fc), got {type(model).__name__}")
    own = _own_forward(model)
    if own:
        raise TypeError(f"from_torchvision: {type(model).__name__} has its own {own}, which "
                        "fastres's ResNet (torchvision's forward) would drop; convert the "
                        "torchvision ResNet it runs, or wrap the converted model in that code")
    # The architecture is read off the stages that are still torchvision's (an nn.Sequential
    # of blocks); a stage edited away from that (an nn.Identity() for layer4, an emptied
    # Sequential, a block replaced) is built with one block and replaced (or cut) below.
    stages = [getattr(model, f"layer{i}") for i in range(1, 5)]
    firsts = [st[0] if type(st) is nn.Sequential and len(st) else None for st in stages]
    stage, first = next(((i, b) for i, b in enumerate(firsts) if isinstance(b, nn.Module)
                         and type(b).__name__ in ("BasicBlock", "Bottleneck")), (0, None))
    if first is None:
        kinds = sorted({type(b).__name__ for b in firsts if b is not None})
        raise TypeError("from_torchvision: no torchvision BasicBlock or Bottleneck begins "
                        f"any of layer1..4 (found {kinds or 'none'})")
    block = BasicBlock if type(first).__name__ == "BasicBlock" else Bottleneck
    layers = [max(len(st), 1) if type(st) is nn.Sequential else 1 for st in stages]
    groups, width_per_group = 1, 64
    if block is Bottleneck:
        groups = first.conv2.groups
        width = first.conv2.out_channels  # planes * width_per_group / 64 * groups
        width_per_group = width * 64 // ((64 << stage) * groups)
    dilate = []
    for blk0 in firsts[1:]:
        # torchvision replaces a stride-2 layer by stride 1 and dilation in the layers after.
        conv = getattr(blk0, "conv2" if block is Bottleneck else "conv1", None)
        stride = getattr(conv, "stride", 2)
        strided = (stride if isinstance(stride, int) else stride[0]) == 2
        dilate.append(not strided)
    fc = model.fc
    plain_fc = type(fc) is nn.Linear
    # BatchNorm2d placeholders; the source's norm modules replace them below (a norm_layer is
    # a factory, often a lambda or partial, that type(model.bn1) cannot rebuild: eps, momentum,
    # GroupNorm's groups would be lost)
    new = ResNet(block, layers, num_classes=fc.out_features if plain_fc else 1000,
                 groups=groups, width_per_group=width_per_group,
                 replace_stride_with_dilation=dilate)
    param = next(model.parameters())
    new = new.to(device=param.device, dtype=param.dtype)
    # The norm modules are copied, and so is every other module the source has where fastres's
    # differs or is missing (an fc Linear without bias, a 1-channel or CIFAR stem conv1, an
    # Identity maxpool, another activation, an edited convolution): the copy computes what the
    # source computes (the plan fuses a bias-less fc and another stem width; the other edits
    # run eagerly, with fastres's warning naming them).
    mine = dict(new.named_modules())
    copied: list[str] = []
    for name, m in model.named_modules():
        if not name or any(name.startswith(c + ".") for c in copied):
            continue
        if _is_container_slot(name, m):  # layerI, its blocks, their downsample Sequential
            continue
        ours = mine.get(name)
        if not (_is_norm_slot(name) or ours is None or type(ours) is not type(m)
                or not _same_layout(ours, m)):
            continue
        twin = copy.deepcopy(m)
        for sub in twin.modules():  # the source's hooks stay with the source
            for hooks in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                          "_backward_pre_hooks"):
                getattr(sub, hooks, {}).clear()
        parent, _, attr = name.rpartition(".")
        setattr(new.get_submodule(parent), attr, twin)
        copied.append(name)
    for i, st in enumerate(stages, 1):  # an emptied stage (built with one block)
        ours = getattr(new, f"layer{i}")
        if type(st) is nn.Sequential and type(ours) is nn.Sequential and len(ours) > len(st):
            del ours[len(st):]
    new._norm_layer = getattr(model, "_norm_layer", nn.BatchNorm2d)
    # copies assigned, not copied into fastres's tensors: each keeps the source's dtype (a
    # model cast in part, such as fc.half(), stays so), device and memory format
    new.load_state_dict({k: v.detach().clone() for k, v in model.state_dict().items()},
                        strict=True, assign=True)
    params = dict(new.named_parameters())
    for name, p in model.named_parameters():
        if name in params:
            params[name].requires_grad_(p.requires_grad)
    modules = dict(new.named_modules())
    for name, m in model.named_modules():
        if name in modules:
            modules[name].training = m.training
    return new
