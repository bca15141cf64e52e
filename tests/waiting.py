"""Polling with a bound: tests wait for a cluster to reach a state, never forever."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_until(condition: Callable[[], bool], timeout_s: float = 15.0, every_s: float = 0.2) -> bool:
    """True once condition() holds; False if it still does not after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(every_s)
    return True
