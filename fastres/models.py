"""torchvision-compatible ResNet family.

The module tree, attribute names, ``state_dict`` keys/order/shapes and train-mode behaviour
are torchvision's (``torchvision.models.resnet``, ResNet v1.5: the stride is on the 3x3).
What differs is ``ResNet.forward`` in ``eval()`` mode: it runs the inference plan
(:mod:`fastres.plan`), a cache of BN-folded, channels-last weights executed through the
fused ops in :mod:`fastres.ops`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "from_torchvision",
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
    - A model whose norm layers are not ``BatchNorm2d`` with running statistics, or whose
      layout the plan does not fuse (another stem, activation or pool, an ``fc`` that is not
      ``nn.Linear``, a block with its own ``forward``), runs eagerly (warned once).
    - Edits through ``param.data`` bypass PyTorch's version counter: call
      :meth:`invalidate_plan` after them (ordinary in-place edits, optimizer steps,
      ``load_state_dict``, ``.to()`` and ``.half()`` are detected).
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
            for m in self.modules():
                if isinstance(m, Bottleneck) and m.bn3.weight is not None:
                    nn.init.constant_(m.bn3.weight, 0)
                elif isinstance(m, BasicBlock) and m.bn2.weight is not None:
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
    def forward_features_eager(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)

    def forward_head_eager(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.avgpool(x), 1))

    def forward_eager(self, x: Tensor) -> Tensor:
        """torchvision's forward, op for op."""
        return self.forward_head_eager(self.forward_features_eager(x))

    # -- the fused path ----------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        from fastres import plan as _plan

        reason = _plan.eager_reason(self, x)
        if reason is not None:
            if reason != "train":
                _plan.say_eager_once(reason)
            return self.forward_eager(x)
        plan = _plan.plan_for_input(self, x)
        if plan is None:
            return self.forward_eager(x)
        return plan.run(x)

    def forward_features(self, x: Tensor) -> Tensor:
        """Everything up to ``layer4``: ``[N, 512 * expansion, H/32, W/32]`` (timm's split)."""
        from fastres import plan as _plan

        plan = None
        if _plan.eager_reason(self, x) is None and x.shape[0] > 0:  # (eager: [0, C, h, w])
            plan = _plan.plan_for_input(self, x)
        if plan is None:
            return self.forward_features_eager(x)
        return plan.run(x, features_only=True)

    def forward_head(self, x: Tensor) -> Tensor:
        """Global average pool + ``fc`` on features from :meth:`forward_features`."""
        return self.forward_head_eager(x)

    def reset_classifier(self, num_classes: int) -> None:
        """Replace ``fc`` with a fresh ``nn.Linear`` of ``num_classes`` outputs (timm's API)."""
        fc = nn.Linear(self.fc.in_features, num_classes)
        self.fc = fc.to(device=self.fc.weight.device, dtype=self.fc.weight.dtype)
        self.invalidate_plan()

    def invalidate_plan(self) -> None:
        """Drop the cached inference plan; the next eval forward rebuilds it."""
        object.__setattr__(self, "_plan_cache", None)

    def __getstate__(self):  # pickling and deepcopy never carry a plan along
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__
        state = dict(state)
        state["_plan_cache"] = None
        return state


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


def load_weights(weights: str | os.PathLike | Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A state_dict from a checkpoint path (``torch.load``, weights only) or a mapping.

    Checkpoints saved as ``{"state_dict": ...}`` or ``{"model": ...}`` are unwrapped.
    Nothing is downloaded: torchvision's ``Weights`` enums are refused with a clear error.
    """
    if isinstance(weights, Mapping):
        return dict(weights)
    if isinstance(weights, (str, os.PathLike)):
        path = os.fspath(weights)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"fastres: weights file {path!r} does not exist")
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(f"fastres: could not read {path!r} as a PyTorch checkpoint: "
                             f"{exc}") from exc
        for key in ("state_dict", "model"):
            if isinstance(sd, Mapping) and key in sd and isinstance(sd[key], Mapping):
                sd = sd[key]
        if not isinstance(sd, Mapping):
            raise ValueError(f"fastres: {path!r} holds a {type(sd).__name__}, "
                             "expected a state_dict")
        return dict(sd)
    raise TypeError("fastres: weights must be a checkpoint path or a state_dict mapping "
                    f"(nothing is downloaded), got {type(weights).__name__}")


def _build(arch: str, weights, progress: bool = True, **kwargs: Any) -> ResNet:
    block, layers, defaults = _ARCHS[arch]
    for key, value in defaults.items():
        if key in kwargs and kwargs[key] != value:
            raise ValueError(f"{arch}: {key}={kwargs[key]} conflicts with the architecture's "
                             f"{key}={value}")
        kwargs[key] = value
    sd = load_weights(weights) if weights is not None else None
    if sd is not None and "num_classes" not in kwargs and "fc.weight" in sd:
        kwargs["num_classes"] = sd["fc.weight"].shape[0]
    model = ResNet(block, layers, **kwargs)
    if sd is not None:
        try:
            model.load_state_dict(sd, strict=True)
        except RuntimeError as exc:
            raise ValueError(f"fastres: the weights do not fit {arch}: {exc}") from exc
    return model


def _make_constructor(arch: str):
    def constructor(*, weights=None, progress: bool = True, **kwargs: Any) -> ResNet:
        return _build(arch, weights, progress, **kwargs)

    block, layers, defaults = _ARCHS[arch]
    constructor.__name__ = constructor.__qualname__ = arch
    constructor.__doc__ = (
        f"{arch} (torchvision-compatible; {block.__name__} blocks, layers {layers}"
        + (f", {defaults}" if defaults else "")
        + ").\n\n"
        "Keyword-only, as torchvision: ``weights`` is a path to a torchvision checkpoint or a\n"
        "state_dict (nothing is downloaded; ``num_classes`` is taken from it when not given);\n"
        "other keywords (``num_classes``, ``zero_init_residual``, ``groups``,\n"
        "``width_per_group``, ``replace_stride_with_dilation``, ``norm_layer``) go to\n"
        ":class:`ResNet`. ``progress`` is accepted for torchvision compatibility and ignored.\n"
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


def get_model(name: str, **kwargs: Any) -> ResNet:
    """Build a model by name (one of :data:`MODEL_NAMES`)."""
    if name not in _ARCHS:
        raise ValueError(f"fastres: unknown model {name!r}; expected one of "
                         f"{', '.join(MODEL_NAMES)}")
    return globals()[name](**kwargs)


def from_torchvision(model: nn.Module) -> ResNet:
    """A fastres :class:`ResNet` with ``model``'s architecture, weights, mode, dtype, device.

    ``model`` is a ``torchvision.models.ResNet`` (any of the family, any ``num_classes``,
    dilation or norm layer with BatchNorm's interface). The architecture is read off the
    module tree; the weights are copied (``load_state_dict(strict=True)``), so the two models
    do not share storage afterwards.
    """
    needed = ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc")
    if not isinstance(model, nn.Module) or not all(hasattr(model, n) for n in needed):
        raise TypeError("from_torchvision expects a torchvision ResNet (with conv1, bn1, "
                        f"layer1..4 and fc), got {type(model).__name__}")
    first = model.layer1[0]
    kind = type(first).__name__
    if kind not in ("BasicBlock", "Bottleneck"):
        raise TypeError(f"from_torchvision: unknown block type {kind!r} in layer1")
    block = BasicBlock if kind == "BasicBlock" else Bottleneck
    layers = [len(getattr(model, f"layer{i}")) for i in range(1, 5)]
    groups, width_per_group = 1, 64
    if block is Bottleneck:
        groups = first.conv2.groups
        width = first.conv2.out_channels
        width_per_group = width * 64 // (64 * groups)
    dilate = []
    for i in (2, 3, 4):
        blk0 = getattr(model, f"layer{i}")[0]
        # torchvision replaces a stride-2 layer by stride 1 and dilation in the layers after.
        strided = (blk0.conv2 if block is Bottleneck else blk0.conv1).stride[0] == 2
        dilate.append(not strided)
    norm_layer = type(model.bn1)
    new = ResNet(block, layers, num_classes=model.fc.out_features, groups=groups,
                 width_per_group=width_per_group, replace_stride_with_dilation=dilate,
                 norm_layer=norm_layer if norm_layer is not nn.BatchNorm2d else None)
    param = next(model.parameters())
    new = new.to(device=param.device, dtype=param.dtype)
    new.load_state_dict(model.state_dict(), strict=True)
    new.train(model.training)
    return new
