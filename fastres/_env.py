"""A process environment variable set for the duration of a block."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


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
