"""Lean ASGI plumbing for the stream routes: a parsed request, the request body
with its size limit, and responses sent as two plain ASGI messages.

Why not Starlette's Request/Response here: on the append and read paths their
object construction, header re-parsing and response machinery cost more than
our own protocol work; everything else (health, metrics) still uses them."""

from __future__ import annotations

import json
from collections.abc import Callable
from urllib.parse import parse_qsl

from starlette.types import Receive, Scope, Send

from .protocol import ProblemError

Headers = list[tuple[bytes, bytes]]


class ClientGone(Exception):
    """The client disconnected before we answered."""


class StreamRequest:
    """One request to /v1/stream/{name}: headers parsed once, query on demand."""

    __slots__ = ("method", "name", "scope", "receive", "_headers", "_query")

    def __init__(self, scope: Scope, receive: Receive, name: str) -> None:
        self.method: str = scope["method"]
        self.name = name
        self.scope = scope
        self.receive = receive
        # Header names arrive lowercased; for a repeated header the first wins.
        headers: dict[bytes, bytes] = {}
        for key, value in scope["headers"]:
            headers.setdefault(key, value)
        self._headers = headers
        self._query: list[tuple[str, str]] | None = None

    def header(self, name: bytes) -> str | None:
        value = self._headers.get(name)
        return None if value is None else value.decode("latin-1")

    @property
    def query(self) -> list[tuple[str, str]]:
        if self._query is None:
            raw = self.scope.get("query_string", b"").decode("latin-1")
            self._query = parse_qsl(raw, keep_blank_values=True)
        return self._query

    def query_all(self, key: str) -> list[str]:
        return [v for k, v in self.query if k == key]

    def query_one(self, key: str) -> str | None:
        for k, v in self.query:
            if k == key:
                return v
        return None

    async def body(self, limit: int) -> bytes:
        """The whole body; 413 past `limit` bytes (as declared, or as received)."""
        chunks: list[bytes] = []
        await self._receive_body(limit, chunks.append)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def declares_body(self) -> bool:
        length = self._headers.get(b"content-length")
        return (length is not None and length != b"0") or b"transfer-encoding" in self._headers

    async def discard_body(self, limit: int) -> None:
        """Read and drop a body the route has no use for (GET, HEAD, DELETE).
        Left unread, it would make the server's close (Connection: close)
        reset the connection, and the client lose the unsent tail of the
        answer. 413 past `limit` bytes, as for a body that is kept."""
        await self._receive_body(limit, lambda _chunk: None)

    async def _receive_body(self, limit: int, keep: Callable[[bytes], object]) -> None:
        declared = self._headers.get(b"content-length")
        if declared is not None and len(declared) < 20 and declared.isdigit() and int(declared) > limit:
            raise ProblemError(413, "Body too large", f"at most {limit} bytes")
        size = 0
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                raise ClientGone()
            chunk = message.get("body", b"")
            if chunk:
                size += len(chunk)
                if size > limit:
                    raise ProblemError(413, "Body too large", f"at most {limit} bytes")
                keep(chunk)
            if not message.get("more_body", False):
                return


class Reply:
    """A complete response: status, headers (bytes pairs), body."""

    __slots__ = ("status", "headers", "body")

    def __init__(self, status: int, headers: Headers | None = None, body: bytes = b"") -> None:
        self.status = status
        self.headers = headers if headers is not None else []
        self.body = body

    async def send(self, send: Send, extra: Headers) -> None:
        headers = self.headers + extra
        if self.status != 204 and self.status != 304:
            # Without it uvicorn would frame the body as chunked.
            headers.append((b"content-length", b"%d" % len(self.body)))
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        await send({"type": "http.response.body", "body": self.body})


def problem_reply(status: int, title: str, detail: str = "", headers: dict[str, str] | None = None) -> Reply:
    """An application/problem+json response."""
    body = b'{"type":"about:blank","status":%d,"title":%s' % (status, json.dumps(title).encode())
    if detail:
        body += b',"detail":' + json.dumps(detail).encode()
    body += b"}"
    pairs = [(b"content-type", b"application/problem+json")]
    if headers:
        pairs += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
    return Reply(status, pairs, body)


def reply_from(error: ProblemError) -> Reply:
    return problem_reply(error.status, error.title, error.detail, error.headers)


def abort_connection(send: Send) -> None:
    """Drop the client's connection at once, discarding what it has not taken.
    A graceful close would keep the unsent bytes for as long as the client
    keeps its receive window shut, i.e. forever for a hostile one. uvicorn's
    send is a method of its per-request cycle, which holds the transport;
    on other servers this does nothing and the server closes as usual."""
    transport = getattr(getattr(send, "__self__", None), "transport", None)
    if transport is not None and hasattr(transport, "abort"):
        transport.abort()
