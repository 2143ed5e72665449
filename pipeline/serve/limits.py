"""A request-size limit for the server, applied to the bytes as they arrive.

Checking ``Content-Length`` alone would let a chunked upload (no length) through, so the
body is counted while it is received; past the limit the request is answered 413 with a
JSON error and the rest is never read into memory.
"""
from __future__ import annotations

import json


class LimitBody:
    """ASGI middleware: refuse request bodies over ``max_bytes`` with 413 ``{"error": ...}``."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await self._refuse(send)
            return
        seen = 0
        started = refused = False

        async def counted_receive():
            nonlocal seen, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    # answer now; the application sees the client leave and its own answer is dropped
                    if not started:
                        await self._refuse(send)
                    refused = True
                    return {"type": "http.disconnect"}
            return message

        async def tracked_send(message):
            nonlocal started
            if refused:
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        await self.app(scope, counted_receive, tracked_send)

    async def _refuse(self, send) -> None:
        mb = self.max_bytes / (1 << 20)
        body = json.dumps({"error": f"the request is larger than the server's limit of {mb:g} MiB; send fewer or smaller images "
                                    "(pipe serve --max-upload-mb raises it)"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})
