"""`dsgw streams`, `subscriptions`, `info` and `tail`: read-only looks at what
Redis holds (gateway/inspect.py, gateway/subscriptions/listing.py)."""

from __future__ import annotations

import sys
import time
from typing import Any

import typer

from .cli_support import CliError, print_json, print_rows, with_redis

# Merged into `dsgw` by gateway/cli.py (a Typer added without a name lends it its commands).
commands = typer.Typer()


@commands.command()
def streams(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """List the streams: name, content type, messages, bytes, closed, TTL (tab-separated when piped)."""
    from .inspect import list_streams

    rows = with_redis(lambda target: list_streams(target.client))
    if as_json:
        print_json(rows)
        return
    table = []
    for r in rows:
        state = "yes" if r["closed"] else ("deleted" if r["deleted"] else "")
        expiry = f"{r['ttl']} s" if r["ttl"] is not None else (r["expires_at"] or "")
        table.append([r["name"], r["content_type"], str(r["messages"]), str(r["bytes"]), state, expiry])
    print_rows(["name", "content type", "messages", "bytes", "closed", "ttl / expires"], table)


@commands.command()
def subscriptions(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """List the subscriptions (issue 12): type, target, wake state, and each linked stream's cursor."""
    from .subscriptions.listing import list_subscriptions

    rows = with_redis(lambda target: list_subscriptions(target.mux))
    if as_json:
        print_json(rows)
        return
    table = []
    for r in rows:
        wake = (
            f"gen {r['generation']}"
            + (f" {r['wake_id']}" if r["wake_id"] else "")
            + (f" held by {r['holder']}" if r["holder"] else "")
        )
        table.append([r["id"], r["type"], r["pattern"] or "", r["target"], wake, r["status"], ""])
        for s in r["streams"]:
            table.append(
                [
                    "",
                    "",
                    "",
                    f"  {s['path']} ({s['link']})",
                    f"acked {s['acked']}",
                    "",
                    f"tail {s['tail'] or '?'}",
                ]
            )
        if r["streams_total"] > len(r["streams"]):
            table.append(
                ["", "", "", f"  ... {r['streams_total'] - len(r['streams'])} more streams", "", "", ""]
            )
    print_rows(["id", "type", "pattern", "target / stream", "wake / cursor", "status", "tail"], table)


@commands.command()
def info(
    name: str = typer.Argument(..., help="Stream name, e.g. chat/room-1."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """A stream's state: metadata, producers (epoch, seq), forks, sink lag, Redis keys."""
    from .inspect import stream_info

    data = with_redis(lambda target: stream_info(target.client, name))
    if data is None:
        raise CliError(f"no stream named {name}")
    if as_json:
        print_json(data)
        return
    overview = []
    for field in ("content_type", "tail_offset", "messages", "bytes", "closed", "deleted", "ttl", "expires_at",
                  "forked_from", "fork_offset", "stream_seq", "synced_to_postgres"):  # fmt: skip
        overview.append([field, "" if data[field] is None else str(data[field])])
    overview.append(["forks", ", ".join(data["forks"])])
    for label, key in (("hot range (Redis)", "hot_range"), ("cold range (Postgres)", "cold_range")):
        span = data[key]
        overview.append([label, f"{span['from']} .. {span['to']}" if span else "(none)"])
    if data["sink"]:
        overview.append(["sink backlog (shard)", str(data["sink"].get("backlog"))])
        overview.append(["sink oldest age ms", str(data["sink"].get("oldest_age_ms"))])
    for label, key in data["keys"].items():
        overview.append([f"key: {label}", key])
    print_rows(["field", "value"], overview, title=f"stream {name}")
    producers = []
    for p in data["producers"]:
        updated = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(p["updated_ms"] / 1000))
        producers.append([p["id"], str(p["epoch"]), str(p["seq"]), updated])
    if producers or sys.stdout.isatty():
        print_rows(["producer", "epoch", "seq", "updated"], producers, title="producers")


@commands.command()
def tail(
    name: str = typer.Argument(..., help="Stream name."),
    from_offset: str = typer.Option(
        "-1", "--from", help="Start after this offset: -1 the beginning, now only new messages."
    ),
    lines: int = typer.Option(None, "-n", "--lines", min=0, help="Start with the last N messages."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep waiting for new messages."),
    as_json: bool = typer.Option(
        False,
        "--json",
        help='NDJSON: one {"offset", "message"} object per line, JSON messages as JSON values.',
    ),
) -> None:
    """Print a stream's messages (JSON as text, text as is, binary as base64), one per line."""
    from .inspect import NOW
    from .inspect import tail as read_tail
    from .offsets import ZERO_ID, BadOffset, parse_offset

    start: Any
    if from_offset == "-1":
        start = ZERO_ID
    elif from_offset == "now":
        start = NOW
    else:
        try:
            start = parse_offset(from_offset)
        except BadOffset:
            raise typer.BadParameter(
                f"{from_offset!r} is not an offset (use -1, now, or an offset dsgw tail printed)",
                param_hint="--from",
            ) from None
    if lines is not None and from_offset != "-1":
        raise typer.BadParameter("use either -n or --from, not both", param_hint="-n")

    async def print_messages(target: Any) -> None:
        async for message in read_tail(target, name, start, follow=follow, last=lines):
            typer.echo(message.ndjson() if as_json else f"{message.offset}  {message.text}")

    with_redis(print_messages)
