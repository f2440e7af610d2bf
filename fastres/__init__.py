"""fastres: a drop-in, faster ResNet for PyTorch.

``fastres.resnet50()`` and friends build the same module tree (and ``state_dict``) as
torchvision; in ``eval()`` mode the forward pass runs an inference plan of fused ops
(BatchNorm folded into the convolutions, residual add and ReLU in the convolution's epilogue,
channels-last activations) through Triton / CUDA kernels where available.
"""

__version__ = "0.1.0"

from fastres import ops  # noqa: E402  (registers the custom ops)
from fastres.models import (  # noqa: E402
    BasicBlock,
    Bottleneck,
    ResNet,
    WEIGHTS_ENUMS,
    from_torchvision,
    get_model,
    get_model_weights,
    get_weight,
    list_models,
    resnet18,
    resnet34,
    resnet50,
    resnet101,
    resnet152,
    resnext50_32x4d,
    resnext101_32x8d,
    resnext101_64x4d,
    wide_resnet50_2,
    wide_resnet101_2,
)
from fastres.ops import get_backend, set_backend, use_backend  # noqa: E402
from fastres.graphs import optimize  # noqa: E402

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "__version__",
    "from_torchvision",
    "get_backend",
    "get_model",
    "get_model_weights",
    "get_weight",
    "list_models",
    "optimize",
    "ops",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "resnext101_64x4d",
    "set_backend",
    "use_backend",
    "wide_resnet50_2",
    "wide_resnet101_2",
]


def __getattr__(name: str):
    """torchvision's weights enums (``fastres.ResNet50_Weights``), imported when asked for."""
    if name in WEIGHTS_ENUMS:
        from fastres import models

        return getattr(models, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
