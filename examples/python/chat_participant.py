"""A chat participant over ds-gateway, with the official Python client
(PyPI `durable-streams`, pinned in pyproject.toml's test extra).

    python examples/python/chat_participant.py http://127.0.0.1:4437 chat/room-1 alice \\
        --say "hi" --expect 1

It joins a room (a JSON stream, created if absent), says something, and prints
what the others say, live, until it has seen --expect messages from them.

- Exactly once: every message it sends carries Producer-Id (its name),
  Producer-Epoch and Producer-Seq. The client (0.1.0) has no idempotent
  producer of its own, so this script adds the three headers (the client
  accepts headers as callables) and keeps the next seq in its state file: a
  resend after a crash or a lost response repeats the seq, and the server
  answers "duplicate" without writing the message twice.
- Resume: the state file also keeps the offset after the last message it
  printed; the next run reads from there, so nothing is shown twice or missed.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path
from typing import Any

from durable_streams import DurableStream, FetchError

JSON = "application/json"


class State:
    """What survives a restart: the producer's epoch and next seq, and the read offset."""

    def __init__(self, path: Path) -> None:
        self.path = path
        saved = json.loads(path.read_text()) if path.exists() else {}
        self.epoch: int = saved.get("epoch", 0)
        self.seq: int = saved.get("seq", 0)
        self.offset: str = saved.get("offset", "-1")

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"epoch": self.epoch, "seq": self.seq, "offset": self.offset}))
        tmp.replace(self.path)


def say(room: DurableStream, state: State, name: str, text: str, attempts: int = 5) -> None:
    """Append one message exactly once: a retry sends the same (id, epoch, seq)."""
    message = {
        "type": "message",
        "key": f"{name}-{state.epoch}-{state.seq}",
        "value": {"from": name, "text": text},
    }
    for attempt in range(attempts):
        try:
            room.append(message)
            break
        except FetchError:
            if attempt == attempts - 1:
                raise
    state.seq += 1
    state.save()


def listen(room: DurableStream, state: State, name: str, expect: int) -> int:
    """Print the others' messages live from the saved offset; stop after `expect`."""
    seen = 0
    with room.stream(offset=state.offset, live="sse") as response:
        for event in response.iter_events(mode="json_batches"):
            for item in event.data:
                value: dict[str, Any] = item.get("value", {}) if isinstance(item, dict) else {}
                if value.get("from") not in (None, name):
                    print(f"{value['from']}: {value.get('text', '')}", flush=True)
                    seen += 1
            # The offset after this batch: where the next run resumes.
            state.offset = event.next_offset
            state.save()
            if seen >= expect:
                break
    return seen


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("base_url")
    parser.add_argument("room", help="stream name, e.g. chat/room-1")
    parser.add_argument("name")
    parser.add_argument("--say", help="a message to send")
    parser.add_argument("--expect", type=int, default=0, help="messages from others to wait for")
    parser.add_argument("--state", type=Path, help="state file (default: .chat-NAME.json)")
    parser.add_argument("--timeout", type=int, default=30, help="give up after this many seconds")
    args = parser.parse_args()

    state = State(args.state or Path(f".chat-{args.name}.json"))
    url = f"{args.base_url.rstrip('/')}/v1/stream/{args.room}"
    # Producer headers as callables: read at each request, so a retry repeats the seq.
    producer = {
        "Producer-Id": args.name,
        "Producer-Epoch": lambda: str(state.epoch),
        "Producer-Seq": lambda: str(state.seq),
    }
    signal.signal(signal.SIGALRM, lambda *_: sys.exit(f"{args.name}: timed out"))
    signal.alarm(args.timeout)

    with DurableStream(url, content_type=JSON, headers=producer, batching=False) as writer:
        writer.create_stream(content_type=JSON)  # idempotent: an existing room is kept
        if args.say:
            say(writer, state, args.name, args.say)
    if args.expect:
        with DurableStream(url, content_type=JSON) as reader:
            listen(reader, state, args.name, args.expect)
    return 0


if __name__ == "__main__":
    sys.exit(main())
