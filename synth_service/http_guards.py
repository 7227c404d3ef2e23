"""What every request passes before a route sees it: the bearer token, the body-size cap, and error bodies that
never echo unbounded input. Plain ASGI, so the checks cover every route, present and future, and run before any
body is read or parsed."""
from __future__ import annotations

import hmac
import time
from collections.abc import Iterable
from typing import Any

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Past the cap, the rest of an oversized body is read and dropped (within these bounds) before the 413 is sent:
# closing with unread data resets the connection, and the client would never see the answer.
DRAIN_MAX_BYTES = 64 << 20
DRAIN_MAX_S = 2.0
ERROR_INPUT_CHARS = 200
ERROR_MAX_ITEMS = 20


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


class TokenGuard:
    """With a token configured, every path but `open_paths` needs `Authorization: Bearer <token>` (401 otherwise)."""

    def __init__(self, app: ASGIApp, token: str, open_paths: Iterable[str]) -> None:
        self.app = app
        self.token = token.encode()
        self.open_paths = frozenset(open_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket") and scope["path"] not in self.open_paths \
                and not self._authorised(scope):
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
                return
            response = JSONResponse({"detail": "missing or wrong bearer token"}, status_code=401,
                                    headers={"WWW-Authenticate": "Bearer"})
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _authorised(self, scope: Scope) -> bool:
        scheme, _, given = (_header(scope, b"authorization") or "").partition(" ")
        # Constant time: the comparison must not tell how much of a guess was right.
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode("latin-1"), self.token)


class BodyLimit:
    """Request bodies over `max_bytes` get 413 before any of it is parsed; the app sees at most `max_bytes`."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        if declared is not None:
            if not declared.strip().isdigit():
                await self._reply(scope, receive, send, 400, f"bad Content-Length {declared[:40]!r}")
                return
            if int(declared) > self.max_bytes:
                # A client waiting for 100-continue has not sent the body: answer now and it never will.
                if (_header(scope, b"expect") or "").lower() != "100-continue":
                    await self._drain(receive, 0)
                await self._too_large(scope, receive, send, int(declared))
                return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                if message.get("more_body", False):
                    await self._drain(receive, len(body))
                await self._too_large(scope, receive, send, None)
                return
            if not message.get("more_body", False):
                break
        await self.app(scope, _replay(bytes(body), receive), send)

    async def _drain(self, receive: Receive, already: int) -> None:
        deadline, read = time.monotonic() + DRAIN_MAX_S, already
        while read < DRAIN_MAX_BYTES and time.monotonic() < deadline:
            message = await receive()
            if message["type"] != "http.request":
                return
            read += len(message.get("body", b""))
            if not message.get("more_body", False):
                return

    async def _too_large(self, scope: Scope, receive: Receive, send: Send, declared: int | None) -> None:
        size = f"{declared} bytes" if declared is not None else f"over {self.max_bytes} bytes"
        await self._reply(scope, receive, send, 413, f"request body of {size}; the limit is {self.max_bytes} "
                                                      "bytes (service.max_body_bytes)")

    @staticmethod
    async def _reply(scope: Scope, receive: Receive, send: Send, status: int, detail: str) -> None:
        # Connection: close, as the rest of the body (if any) is not read.
        await JSONResponse({"detail": detail}, status_code=status, headers={"Connection": "close"})(
            scope, receive, send)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # later calls wait for the disconnect, as usual

    return replay


def _brief(value: Any) -> Any:
    """A value small enough to echo back; a summary of anything bigger."""
    if value is None or isinstance(value, (bool, int, float)):
        return value
    text = value if isinstance(value, str) else repr(value)
    if len(text) <= ERROR_INPUT_CHARS:
        return value if isinstance(value, str) else text
    kind = type(value).__name__
    size = f" of {len(value)} items" if isinstance(value, (list, dict, tuple)) else f" of {len(text)} characters"
    return f"<{kind}{size}, not echoed>"


async def summarised_validation_errors(request, exc: RequestValidationError) -> JSONResponse:
    """422 with the usual error list, bounded: at most ERROR_MAX_ITEMS errors, each input cut to a summary."""
    errors = exc.errors()
    detail = []
    for error in errors[:ERROR_MAX_ITEMS]:
        item = {"loc": [part if isinstance(part, (int, str)) else str(part) for part in error.get("loc", ())],
                "msg": str(error.get("msg", ""))[:500], "type": str(error.get("type", ""))}
        if "input" in error:
            item["input"] = _brief(error["input"])
        detail.append(item)
    if len(errors) > ERROR_MAX_ITEMS:
        detail.append({"loc": [], "msg": f"... and {len(errors) - ERROR_MAX_ITEMS} more errors", "type": "summary"})
    return JSONResponse({"detail": detail}, status_code=422)
