"""Server-Sent Events framing for live=sse reads.

Each payload line becomes one `data:` line with no space after the colon (a
space would become part of the data), split on CRLF, CR and LF so that a
payload can never inject its own event lines."""

from __future__ import annotations

import base64
import json
import re

_LINE_BREAK = re.compile(rb"\r\n|\r|\n")


def frame(event: str, payload: bytes) -> bytes:
    lines = _LINE_BREAK.split(payload)
    return b"event: " + event.encode() + b"\n" + b"".join(b"data:" + line + b"\n" for line in lines) + b"\n"


def data_event(body: bytes, *, json_mode: bool, binary: bool) -> bytes:
    """One data event for a batch of whole appends: `body` as a read returns
    it (JSON messages joined with ',', without brackets; bytes concatenated)."""
    if json_mode:
        body = b"[" + body + b"]"
    if binary:
        body = base64.b64encode(body)
    return frame("data", body)


def control_event(next_offset: str, *, cursor: str | None, up_to_date: bool, closed: bool) -> bytes:
    control: dict[str, object] = {"streamNextOffset": next_offset}
    if closed:
        control["streamClosed"] = True
    elif cursor is not None:
        control["streamCursor"] = cursor
    if up_to_date:
        control["upToDate"] = True
    return frame("control", json.dumps(control, separators=(",", ":")).encode())
