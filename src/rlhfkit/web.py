"""What both HTTP servers (``rlhf label serve``, ``rlhf serve``) share: a hard limit on request bodies.

A pure ASGI wrapper rather than a FastAPI dependency, because the limit must hold before anything
is buffered: the declared Content-Length is checked first, and a chunked body is counted as it
arrives, so a client can never make a server hold more than the limit in memory.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodyLimit:
    """Answer 413 to a body over ``max_body_bytes`` (400 to a malformed Content-Length).

    ``error_body(status, message)`` gives the JSON the app uses for its errors, so a refused body
    looks like every other error of that server. ``headers`` are added to every response that does
    not set them already (the labeling app's security headers).
    """

    def __init__(
        self,
        app: ASGIApp,
        max_body_bytes: int,
        error_body: Callable[[int, str], Any],
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.error_body = error_body
        self.headers = dict(headers or {})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start" and self.headers:
                headers = MutableHeaders(scope=message)
                for key, value in self.headers.items():
                    if key not in headers:
                        headers[key] = value
            await send(message)

        too_large = f"request body over {self.max_body_bytes} bytes"
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body_bytes):
            status, message = (413, too_large) if declared.isdigit() else (400, "bad Content-Length header")
            response = JSONResponse(self.error_body(status, message), status_code=status)
            await response(scope, receive, send_with_headers)
            return
        received = 0

        async def bounded_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise HTTPException(413, too_large)  # FastAPI re-raises it from body parsing as a 413
            return message

        await self.app(scope, bounded_receive, send_with_headers)


def unreadable_body(exc: BaseException) -> str | None:
    """What was wrong with a body FastAPI could not parse, in words (None: not a parse failure).

    FastAPI turns anything but a JSON syntax error into "There was an error parsing the body" and
    keeps the real exception as the cause: invalid UTF-8 and JSON nested past Python's recursion
    limit are the two a client can cause.
    """
    cause = exc.__cause__
    if isinstance(cause, UnicodeDecodeError):
        return f"request body is not valid UTF-8 (byte {cause.start}: {cause.reason})"
    if isinstance(cause, RecursionError):
        return "request body is JSON nested too deeply"
    if isinstance(cause, ValueError):
        return f"request body cannot be read as JSON ({cause})"
    return None
