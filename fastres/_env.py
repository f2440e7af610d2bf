"""Process environment variables: a switch's reading, and a variable set for a block."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

OFF = ("0", "false", "off", "no")
ON = ("", "1", "true", "on", "yes")


def switched_off(name: str) -> bool:
    """Whether the switch ``name`` (a variable that turns a feature off) says off:
    ``0``/``false``/``off``/``no`` in any case, spaces around ignored. Unset, empty,
    ``1``/``true``/``on``/``yes`` leave the feature on; another value leaves it on too, with
    a warning that names the values the switch takes."""
    raw = os.environ.get(name)
    if raw is None:
        return False
    value = raw.strip().lower()
    if value in OFF:
        return True
    if value not in ON:
        from fastres import _warnings  # (said at the caller's line outside fastres)

        _warnings.warn(f"fastres: the {name} environment variable must be 0/false/off/no "
                       f"(off) or 1/true/on/yes (on; also when unset or empty), got {raw!r}: "
                       "left on")
    return False


@contextlib.contextmanager
def environ(name: str, value: str | None) -> Iterator[None]:
    """``os.environ[name] = value`` inside the block, and the old value (or its absence) back
    afterwards; ``value=None`` leaves the variable as it is."""
    if value is None:
        yield
        return
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old
