"""fastres's warnings name the line that called into fastres, not a line inside it."""

from __future__ import annotations

import os
import sys
import warnings

import torch

# fastres's own files and torch's (nn.Module.__call__, torch.no_grad, ... sit between the
# user's ``model(x)`` and fastres)
_INSIDE = tuple(os.path.dirname(os.path.abspath(f)) + os.sep
                for f in (__file__, torch.__file__))


def warn(message: str, category: type[Warning] = RuntimeWarning) -> None:
    """``warnings.warn(message, category)`` attributed to the innermost caller outside fastres
    and torch (the user's ``model(x)``, op call or ``tune_model``), so the report and the
    ``warnings`` filters name that line; with no such caller (the ``fastres`` CLI), the
    outermost frame."""
    frame, level = sys._getframe(1), 2  # stacklevel 2: warn()'s caller
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_INSIDE):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
