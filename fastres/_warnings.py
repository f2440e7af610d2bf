"""fastres's warnings name the line that called into fastres, not a line inside it."""

from __future__ import annotations

import sys
import threading
import warnings

# fastres's modules and torch's (nn.Module.__call__, torch.no_grad, ... sit between the user's
# ``model(x)`` and fastres), by module name: file paths may be spelled with ``..``
_INSIDE = ("fastres", "torch")


def _inside(frame) -> bool:
    name = frame.f_globals.get("__name__") or ""
    return name.split(".", 1)[0] in _INSIDE


def warn(message: str, category: type[Warning] = RuntimeWarning) -> None:
    """``warnings.warn(message, category)`` attributed to the innermost caller outside fastres
    and torch (the user's ``model(x)``, op call or ``tune_model``), so the report and the
    ``warnings`` filters name that line; with no such caller, the outermost frame (the
    ``fastres`` CLI: its ``__main__`` or console script)."""
    frame, level = sys._getframe(1), 2  # stacklevel 2: warn()'s caller
    while frame.f_back is not None and _inside(frame):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


_once_lock = threading.Lock()


def first_time(seen: set, key) -> bool:
    """Add ``key`` to ``seen`` and say whether it was new: of threads meeting the same key at
    once, exactly one gets True (a say-once warning is said once)."""
    if key in seen:
        return False
    with _once_lock:
        if key in seen:
            return False
        seen.add(key)
        return True
