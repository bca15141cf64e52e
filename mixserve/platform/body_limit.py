"""ASGI middleware refusing request bodies over a size limit with 413 (OpenAI error body).

Checks Content-Length up front. A body sent without one (chunked) is read here first, up to the
limit, and handed on whole: refused while the app reads it, the 413 would surface as the app's own
parse error (FastAPI turns any exception from reading a body into a bare 400). The bytes of every
body are counted too, so a client can never make the ingress buffer more than the limit.
"""

from __future__ import annotations

import json


class _TooLarge(Exception):
    pass


class BodyLimit:
    max_bytes: int = 1 << 20  # set per process by the ingress from the deployment config

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = type(self).max_bytes
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await self._refuse(send, limit)
        if declared is None:
            receive = await self._read_ahead(receive, limit)
            if receive is None:
                return await self._refuse(send, limit)
        seen = 0
        started = False

        async def counted_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _TooLarge
            return message

        async def tracked_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except _TooLarge:
            if not started:
                await self._refuse(send, limit)

    @staticmethod
    async def _read_ahead(receive, limit: int):
        """Reads a body of unknown length up to its end; None when it passes `limit`, else a
        receive that replays what was read, then goes on with the client's (a disconnect)."""
        read, size = [], 0
        while True:
            message = await receive()
            read.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > limit:
                return None
            if not message.get("more_body", False):
                break

        async def replay():
            return read.pop(0) if read else await receive()

        return replay

    @staticmethod
    async def _refuse(send, limit: int) -> None:
        body = json.dumps({"error": {"message": f"request body is larger than {limit} bytes", "type": "invalid_request_error",
                                     "param": None, "code": "request_too_large"}}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
