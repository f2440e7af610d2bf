"""pytest plugin for ``benchmarks/gpu_check.sh``: SIGTERM stops the run the way Ctrl-C does.

The GPU check caps each stage with ``timeout``, which sends SIGTERM. By default that kills
pytest before it writes anything at the end of the session: the junit XML of the tests stage
and pytest-benchmark's JSON would be lost with every result in them. As a KeyboardInterrupt,
pytest stops after the current test, reports, and writes both (SIGINT cannot do this job:
a process started in the background of a non-interactive shell ignores it, for good).

Loaded with ``-p gpu_check_sigterm`` and this folder on ``PYTHONPATH``.
"""

from __future__ import annotations

import signal


def _stop(signum, frame):
    raise KeyboardInterrupt(f"signal {signum} (stage time cap)")


def pytest_configure(config):
    try:
        signal.signal(signal.SIGTERM, _stop)
    except ValueError:  # not the main thread
        pass
