"""The protocol's subscription errors: `{"error": {"code", "message", ...}}`."""

from __future__ import annotations

import json
from typing import Any

from ..http import Reply

STATUS = {
    "INVALID_REQUEST": 400,
    "WEBHOOK_URL_REJECTED": 400,
    "SUBSCRIPTION_NOT_FOUND": 404,
    "SUBSCRIPTION_ALREADY_EXISTS": 409,
    "TOKEN_INVALID": 401,
    "TOKEN_EXPIRED": 401,
    "FENCED": 409,
    "ALREADY_CLAIMED": 409,
    "NO_PENDING_WORK": 409,
    "INVALID_OFFSET": 409,
    "METHOD_NOT_ALLOWED": 405,
    "UNAUTHORIZED": 401,
    "FORBIDDEN": 403,
}


class SubError(Exception):
    def __init__(self, code: str, message: str, status: int | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status or STATUS[code]
        self.extra = extra

    def reply(self) -> Reply:
        body = {"error": {"code": self.code, "message": self.message, **self.extra}}
        return json_reply(self.status, body)


def json_reply(status: int, body: Any, content_type: bytes = b"application/json") -> Reply:
    return Reply(status, [(b"content-type", content_type)], json.dumps(body, separators=(",", ":")).encode())


def not_found() -> SubError:
    return SubError("SUBSCRIPTION_NOT_FOUND", "subscription not found")


def invalid(message: str) -> SubError:
    return SubError("INVALID_REQUEST", message)
