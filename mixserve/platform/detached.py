"""Tasks that outlive the request that starts them (settlements, metering flushes, closing a
generation whose client left).

Why a fresh context: Serve cancels the calls a request makes when its client leaves, and it
finds them through the request's context variables; work that must still happen after the
client is gone runs in an empty context. Why a module-level set: the event loop keeps only
weak references to tasks, so an unreferenced one may be collected before it ends.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Coroutine

_running: set[asyncio.Task] = set()


def spawn_detached(work: Coroutine) -> asyncio.Task:
    """Runs `work` on the current loop in a fresh context, held until it ends."""
    task = asyncio.get_running_loop().create_task(work, context=contextvars.Context())
    _running.add(task)
    task.add_done_callback(_running.discard)
    return task
