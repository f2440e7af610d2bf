"""fastres ops: one contract, a plain-torch reference and fast implementations per op.

Each op is a ``torch.library`` custom op (``torch.ops.fastres.*``) with a fake
implementation, so ``torch.compile``, ``torch.export`` and CUDA graph capture see through it.
"""

import sys as _sys

from fastres.ops._backend import get_backend, set_backend, use_backend
from fastres.ops.conv_bias_act import conv_bias_act, conv_bias_act_reference
from fastres.ops.head import avgpool_linear, avgpool_linear_reference
from fastres.ops.max_pool import max_pool2d, max_pool2d_reference
from fastres.ops.preprocess import preprocess, preprocess_reference
from fastres.ops.stem import stem, stem_reference

# ``help(fastres.ops.conv_bias_act)`` shows the contract: each function's docstring points at
# its module's, and the function of the same name shadows that module here.
for _fn in (avgpool_linear, conv_bias_act, max_pool2d, preprocess, stem):
    _fn.__doc__ = f"{_fn.__doc__}\n\n{_sys.modules[_fn.__module__].__doc__}"
del _fn

__all__ = [
    "avgpool_linear",
    "avgpool_linear_reference",
    "conv_bias_act",
    "conv_bias_act_reference",
    "get_backend",
    "max_pool2d",
    "max_pool2d_reference",
    "preprocess",
    "preprocess_reference",
    "set_backend",
    "stem",
    "stem_reference",
    "use_backend",
]
