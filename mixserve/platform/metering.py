"""Batched ledger calls for tenants without limits.

Why: a Serve handle call costs about 3 ms of CPU on the 2-core CI machine (measured with
py-spy in the attention replica), and every request made two (admit and settle) although
nothing about a tenant without limits can be refused. Their calls are queued here and sent
as one `TenantLedger.record` call every FLUSH_EVERY_S, in order, so usage and metrics lag by
at most that. Tenants with limits keep their synchronous admission and immediate settlement:
their quotas and concurrency slots must be exact.
"""

from __future__ import annotations

import asyncio
import logging

from mixserve.platform.detached import spawn_detached

log = logging.getLogger(__name__)
FLUSH_EVERY_S = 0.25


class MeterBatch:
    def __init__(self, ledger, every_s: float = FLUSH_EVERY_S):
        self.ledger = ledger
        self.every_s = every_s
        self._calls: list[tuple[str, tuple]] = []
        self._flusher: asyncio.Task | None = None

    def add(self, method: str, args: tuple) -> None:
        """Queues TenantLedger.<method>(*args) ('admit' or 'settle')."""
        self._calls.append((method, args))
        if self._flusher is None or self._flusher.done():  # outlives the request that happened to start it
            self._flusher = spawn_detached(self._flush_soon())

    async def flush(self) -> None:
        calls, self._calls = self._calls, []
        if not calls:
            return
        try:
            await self.ledger.record.remote(calls)
        except Exception:  # noqa: BLE001 - metering only: the figures miss these requests
            log.warning("could not send %d metering calls to the tenant ledger", len(calls), exc_info=True)

    async def _flush_soon(self) -> None:
        await asyncio.sleep(self.every_s)
        await self.flush()
