"""Request limits at the HTTP edge: the body size (before any of it is parsed), and HTTP byte ranges."""
from __future__ import annotations

import json

from .schema import ApiError


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes gets 413 before the app reads it, whether it declares
    its length or comes in chunks."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(send)
        seen, sent = 0, False

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge()
            return message

        async def tracked(message):
            nonlocal sent
            sent = sent or message["type"] == "http.response.start"
            await send(message)
        try:
            await self.app(scope, counted, tracked)
        except _TooLarge:
            if not sent:
                await self._refuse(send)

    async def _refuse(self, send):
        body = json.dumps(ApiError(413, "request_too_large", f"the request body is over {self.limit} bytes").body())
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body.encode()})


class _TooLarge(Exception):
    pass


def byte_range(header: str | None, size: int) -> tuple[int, int, int]:
    """An HTTP Range header (one range) -> (start, end exclusive, status): 200 for the whole file, 206 for a part;
    a range that cannot be served is a 416."""
    if not header:
        return 0, size, 200
    unit, _, spec = header.partition("=")
    first, dash, last = spec.strip().partition("-")
    ok = unit.strip().lower() == "bytes" and dash and "," not in spec and (first.isdigit() or last.isdigit())
    if ok and first.isdigit():
        start = int(first)
        end = min(int(last) + 1, size) if last.isdigit() else size
        ok = start < size and start < end
    elif ok:  # a suffix: the last N bytes
        start, end = max(size - int(last), 0), size
        ok = int(last) > 0
    if not ok:
        raise ApiError(416, "range_not_satisfiable", f"cannot serve range {header!r} of a {size}-byte file", "Range",
                       {"Content-Range": f"bytes */{size}"})
    return start, end, 206
