"""The subscription operations of one gateway process: create, read, delete,
links, callbacks, claims, acks, releases, and delivering wakes (webhook POSTs
through webhook.py, wake events appended to the wake stream through the
normal append path). All state is in Redis (state.py); nothing here survives
or needs to survive the process."""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import random
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from .. import keys
from ..offsets import ZERO_OFFSET
from ..protocol import ProblemError
from . import metrics, patterns
from .config import SubConfig, parse_config, stream_list, stream_path
from .errors import SubError, invalid, not_found
from .signing import KeyHolder, Keys, TokenError
from .state import TAKEOVER_MS, SubState, new_wake_id, now_ms, text
from .urlsafety import WebhookUrlRejected, check_callback_url
from .wakebody import encoded_size, fit_streams

if TYPE_CHECKING:
    from ..app import Gateway

log = logging.getLogger("dsgw.subscriptions")

# Callback and claim tokens outlive their wake (a replayed callback must reach
# the fencing check and answer FENCED, not TOKEN_EXPIRED); fencing, not expiry,
# is what makes an old token useless.
TOKEN_TTL_S = 24 * 3600
# Pattern backfill at creation reads at most this many stream names (SCAN of
# the meta keys); more are linked only when they are next created.
BACKFILL_MAX_STREAMS = 100_000
# The second backfill waits this long past the Redis timeout.
BACKFILL_AGAIN_MARGIN_S = 1.0
JITTER = 0.2
# Up to this many links a claim reads their streams' tails and lists them all.
CLAIM_READS_TAILS_MAX = 1000

Woke = tuple[str, int, str, str, str]  # id, generation, wake id, type, stream that woke it


def _iso(ms: str) -> str:
    moment = datetime.datetime.fromtimestamp(int(ms) / 1000, tz=datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Subscriptions:
    def __init__(self, gateway: Gateway) -> None:
        self.gw = gateway
        self.settings = gateway.settings
        self.state = SubState(gateway.store.mux)
        self.patterns = patterns.PatternCache(gateway.store.mux)
        self.key_holder = KeyHolder(refresh_s=self.settings.webhook_keys_refresh_s)
        self.public_url = self.settings.public_url.rstrip("/")
        # Without DSGW_PUBLIC_URL: the listening address, as the first __ds request showed it.
        self.listen_url = ""
        self._tasks: set[asyncio.Task[Any]] = set()

    # --- helpers -------------------------------------------------------------------

    def base_url(self) -> str:
        return self.public_url or self.listen_url or "http://127.0.0.1"

    def control_url(self, tail: str) -> str:
        return f"{self.base_url()}/v1/stream/__ds/{tail}"

    async def signing(self) -> Keys:
        return await self.key_holder.get(self.gw.redis)

    def spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()

    def after_transition(self, sub_id: str, reply: list[str], due_at: int) -> None:
        """Arm the timer at `reply[due_at]`; deliver a wake the transition issued."""
        if reply[0] == "woke":
            metrics.WAKES.inc()
            self.spawn(self.deliver(sub_id, int(reply[1]), reply[2], reply[3]))
        self.spawn(self.state.arm(sub_id, reply[due_at]))

    # --- create / read / delete -------------------------------------------------------

    async def create(self, sub_id: str, body: Any) -> tuple[bool, dict[str, Any]]:
        config = parse_config(body)
        if config.webhook_url:
            # The URL rules are urlsafety.py's. The official suite runs with
            # DSGW_WEBHOOK_ALLOW_PRIVATE=loopback (its receiver is on 127.0.0.1)
            # and expects http://10.0.0.1/hook refused with WEBHOOK_URL_REJECTED.
            try:
                check_callback_url(config.webhook_url, self.settings.webhook_allow_private)
            except WebhookUrlRejected as exc:
                raise SubError("WEBHOOK_URL_REJECTED", exc.message) from exc
        canonical = json.dumps(config.canonical(), separators=(",", ":"))
        reply = await self.state.sub(
            "sub_create",
            sub_id,
            [config.hash(), config.type, config.pattern or "", config.webhook_url or "",
             config.wake_stream or "", config.lease_ttl_ms, config.description or "",
             "1" if config.description is not None else "", canonical],
        )  # fmt: skip
        if reply[0] == "conflict":
            raise SubError(
                "SUBSCRIPTION_ALREADY_EXISTS", "a subscription with this id has another configuration"
            )
        created = reply[0] == "created"
        if created:
            await self.state.execute("SADD", keys.SUBSCRIPTIONS, sub_id, key=keys.SUBSCRIPTIONS)
            if config.pattern:
                await patterns.register(self.state.mux, sub_id, config.pattern, config.wake_stream or "")
        # Linking is idempotent: a re-confirmation also finishes a creation that died half-way.
        await self.link_explicit(sub_id, list(config.streams), config.pattern, config.wake_stream)
        if created and config.pattern:
            await self.backfill(sub_id, config, int(reply[1]))
            self.spawn(self.backfill_again(sub_id, config, int(reply[1])))
        record = await self.get(sub_id)
        return created, record

    async def backfill(self, sub_id: str, config: SubConfig, created_ms: int) -> None:
        """Link the existing streams the pattern matches, at their tails. A
        stream created after the subscription (create.lua may have missed the
        pattern while it was being registered) starts before its first entry."""
        assert config.pattern
        matching: list[str] = []
        seen = 0
        async for raw in self.gw.redis.scan_iter(match=keys.META_SCAN_PATTERN, count=1000):
            seen += 1
            if seen > BACKFILL_MAX_STREAMS:
                log.warning("pattern backfill stopped", extra={"fields": {"id": sub_id, "seen": seen}})
                break
            name = keys.name_from_meta_key(text(raw))
            if name and name != config.wake_stream and patterns.glob_match(config.pattern, name):
                matching.append(name)
        births = await asyncio.gather(
            *(self.state.execute("HGET", keys.stream_keys(n).meta, "created", key=keys.stream_keys(n).meta)
              for n in matching)
        )  # fmt: skip
        old = [n for n, born in zip(matching, births, strict=True) if born is None or int(born) < created_ms]
        new = [
            n
            for n, born in zip(matching, births, strict=True)
            if born is not None and int(born) >= created_ms
        ]
        for i in range(0, len(old), 500):
            await self.state.link(sub_id, "g", old[i : i + 500])
        for i in range(0, len(new), 500):
            await self.state.link(sub_id, "g", new[i : i + 500], start_new_at="-1")
        for name in new:
            # They may hold entries no append will announce again.
            sk = keys.stream_keys(name)
            await self.state.execute("ZADD", sk.wakes, now_ms(), name, key=sk.wakes)
            channel = keys.wake_channel(sk.shard)
            await self.state.execute(self.gw.store.publish_command, channel, name, key=channel)

    async def backfill_again(self, sub_id: str, config: SubConfig, created_ms: int) -> None:
        """A second backfill once every stream creation that may have read the
        pattern list before this subscription was registered has finished (a
        create script runs within the Redis timeout of its request): a stream
        created in that window is linked before its first entry after all."""
        await asyncio.sleep(self.settings.redis_timeout_ms / 1000 + BACKFILL_AGAIN_MARGIN_S)
        try:
            if await self.state.load_head(sub_id) is not None:
                await self.backfill(sub_id, config, created_ms)
        except Exception as exc:  # Redis unavailable: the window stays as documented
            log.warning("second pattern backfill failed: %s", exc, extra={"fields": {"id": sub_id}})

    async def get(self, sub_id: str, streams_cursor: str | None = None) -> dict[str, Any]:
        """A subscription of more than LISTED_LINKS_MAX links lists about that
        many a page: `streams_cursor` from the previous page's answer."""
        if streams_cursor is not None and not (
            streams_cursor.isascii() and streams_cursor.isdigit() and len(streams_cursor) < 20
        ):
            raise invalid("streams_cursor must be the streams_cursor of a previous answer")
        rec = await self.state.load(sub_id, int(streams_cursor or 0))
        if rec is None:
            raise not_found()
        return await self.serialize(sub_id, rec)

    async def serialize(self, sub_id: str, rec: dict[str, Any]) -> dict[str, Any]:
        d, st = rec["def"], rec["state"]
        out: dict[str, Any] = {"id": sub_id, "subscription_id": sub_id, "type": d["type"]}
        if d.get("pattern"):
            out["pattern"] = d["pattern"]
        out["streams"] = [
            {"path": p, "link_type": _link_type(t), "acked_offset": rec["acked"].get(p, ZERO_OFFSET)}
            for p, t in sorted(rec["links"].items())
        ]
        if rec["links_cursor"] is not None:  # a page of the links (state.LISTED_LINKS_MAX)
            out["streams_total"] = rec["links_total"]
            if rec["links_cursor"]:
                out["streams_cursor"] = rec["links_cursor"]
        if d.get("url"):
            out["webhook"] = {
                "url": d["url"],
                "signing": {
                    "alg": "ed25519",
                    "kid": (await self.signing()).signing_kid(),
                    "jwks_url": self.control_url("jwks.json"),
                },
            }
        out["wake_stream"] = d.get("wake_stream") or None
        out["lease_ttl_ms"] = int(d["ttl"])
        out["created_at"] = _iso(d["created"])
        out["status"] = st.get("status", "active")
        if d.get("has_desc") == "1":
            out["description"] = d.get("desc", "")
        return out

    async def delete(self, sub_id: str) -> None:
        paths = await self.state.sub("sub_delete", sub_id, [])
        paths = [p for p in paths if p]
        await asyncio.gather(*(self.state.stream_unlink(p, sub_id) for p in paths))
        await self.state.execute("SREM", keys.SUBSCRIPTIONS, sub_id, key=keys.SUBSCRIPTIONS)
        await self.state.execute("ZREM", keys.SUB_TIMERS, sub_id, key=keys.SUB_TIMERS)
        if await self.state.execute("HEXISTS", keys.SUB_PATTERNS, sub_id, key=keys.SUB_PATTERNS):
            await patterns.unregister(self.state.mux, sub_id)

    async def add_streams(self, sub_id: str, body: Any) -> None:
        streams = stream_list(body.get("streams") if isinstance(body, dict) else None)
        k = keys.subscription_keys(sub_id)
        pattern, wake_stream = await self.state.execute(
            "HMGET", k.definition, "pattern", "wake_stream", key=k.definition
        )
        if wake_stream is None:
            raise not_found()
        if not await self.link_explicit(sub_id, streams, text(pattern), text(wake_stream)):
            raise not_found()

    async def link_explicit(
        self, sub_id: str, streams: list[str], pattern: str | None, wake_stream: str | None
    ) -> bool:
        """Explicit links (never the subscription's own wake stream); those the
        pattern also matches get their glob link too, so removing the explicit
        link leaves the stream linked."""
        streams = [p for p in streams if p != wake_stream]
        if not streams:
            return True
        if not await self.state.link(sub_id, "e", streams):
            return False
        globbed = [p for p in streams if pattern and patterns.glob_match(pattern, p)]
        return not globbed or await self.state.link(sub_id, "g", globbed)

    async def remove_stream(self, sub_id: str, raw_path: str) -> None:
        path = stream_path(raw_path, "stream path")
        reply = await self.state.sub("sub_unlink", sub_id, [path, "e"])
        if reply[0] == "missing":
            raise not_found()
        if reply[1] == "":
            await self.state.stream_unlink(path, sub_id)

    # --- callbacks, claims, acks, releases --------------------------------------------

    async def verify(self, sub_id: str, token: str | None) -> tuple[int, str]:
        if not token:
            raise SubError("TOKEN_INVALID", "missing or malformed Authorization header")
        try:
            claims = (await self.signing()).verify_token(token, sub_id)
        except TokenError as exc:
            raise SubError(exc.code, exc.message) from exc
        return claims.generation, claims.wake_id

    async def ack(self, sub_id: str, token: str | None, body: Any, required_type: str) -> dict[str, Any]:
        """A webhook callback (required_type '') or a pull-wake ack."""
        token_gen, token_wake = await self.verify(sub_id, token)
        gen, wake_id, done = _wake_fields(body)
        acks = body.get("acks", [])
        if not isinstance(acks, list) or len(acks) > 10_000:
            raise invalid("acks must be an array")
        pairs = []
        for ack in acks:
            if not isinstance(ack, dict):
                raise invalid("each ack must be an object {stream, offset}")
            path = stream_path(ack.get("stream", ack.get("path")), "ack stream")
            offset = ack.get("offset")
            if not isinstance(offset, str) or not offset or len(offset) > 64:
                raise invalid("ack offset must be an offset string")
            pairs.append((path, offset))
        tails = await self.state.stream_tails([p for p, _ in pairs])
        args: list[Any] = [required_type, token_gen, token_wake, gen, wake_id, "1" if done else "",
                           new_wake_id(), TAKEOVER_MS]  # fmt: skip
        for path, offset in pairs:
            args += [path, offset, tails.get(path, ZERO_OFFSET)]
        reply = await self.state.sub("sub_ack", sub_id, args)
        self._raise_for(reply)
        if reply[0] == "invalid_offset":
            raise SubError("INVALID_OFFSET", reply[1])
        self.after_transition(sub_id, reply, 5 if reply[0] == "woke" else 2)
        return {"ok": True, "next_wake": reply[0] == "woke"}

    async def release(self, sub_id: str, token: str | None, body: Any) -> None:
        token_gen, token_wake = await self.verify(sub_id, token)
        gen, wake_id, _ = _wake_fields(body)
        reply = await self.state.sub(
            "sub_release", sub_id, [token_gen, token_wake, gen, wake_id, new_wake_id(), TAKEOVER_MS]
        )
        self._raise_for(reply)
        self.after_transition(sub_id, reply, 5 if reply[0] == "woke" else 1)

    async def claim(self, sub_id: str, body: Any) -> dict[str, Any]:
        worker = body.get("worker") if isinstance(body, dict) else None
        if not isinstance(worker, str) or not worker or len(worker) > 256:
            raise invalid("worker must be a non-empty string")
        k = keys.subscription_keys(sub_id)
        # A small subscription's claim reads every linked stream's tail itself,
        # so it sees an append the dispatcher has not announced yet; a larger
        # one relies on the announcements (milliseconds behind) and its claim
        # costs the same whatever the number of links.
        small = await self.state.execute("HLEN", k.links, key=k.links) <= CLAIM_READS_TAILS_MAX
        paths = [text(p) for p in await self.state.execute("HKEYS", k.links, key=k.links)] if small else []
        tails = await self.state.stream_tails(paths)
        args: list[Any] = [worker, new_wake_id()]
        for path, tail in tails.items():
            args += [path, tail]
        reply = await self.state.sub("sub_claim", sub_id, args)
        if reply[0] == "claimed":
            raise SubError(
                "ALREADY_CLAIMED",
                "another worker holds the lease",
                current_holder=reply[1],
                generation=int(reply[2]),
            )
        if reply[0] == "no_work":
            raise SubError("NO_PENDING_WORK", "the subscription has no pending work")
        self._raise_for(reply)
        _, gen, wake_id, ttl, lease_end = reply
        await self.state.arm(sub_id, lease_end)
        metrics.CLAIMS.inc()
        token = (await self.signing()).issue_token(sub_id, wake_id, int(gen), TOKEN_TTL_S)
        # Every link of a small subscription (as the reference server lists
        # them); the streams the wake names (at most WAKE_STREAMS_MAX) otherwise.
        rec = (
            {"state": {}, **await self.state.streams_of(sub_id, paths)}
            if small
            else await self.state.load_wake(sub_id)
        )
        if rec is not None and not small and rec["state"].get("wake") != wake_id:
            rec = None  # the lease ran out already and a later wake holds the snapshot
        answer = {
            "wake_id": wake_id,
            "generation": int(gen),
            "token": token,
            "streams": _stream_infos(rec, snapshot=False) if rec else [],
            "lease_ttl_ms": int(ttl),
        }
        if rec and rec["state"].get("more") == "1":
            answer["has_more"] = True  # as in a webhook body (wakebody.py): the next wake names them
        return answer

    @staticmethod
    def _raise_for(reply: list[str]) -> None:
        status = reply[0]
        if status in ("missing", "gone"):
            raise not_found()
        if status == "wrong_type":
            raise invalid("this operation is for pull-wake subscriptions")
        if status == "fenced":
            raise SubError("FENCED", "the wake is not current (stale generation or wake id)")

    # --- delivering wakes ---------------------------------------------------------------

    async def deliver(self, sub_id: str, gen: int, wake_id: str, kind: str) -> None:
        """Send one wake (webhook POST or wake event) and record the outcome; a
        webhook answering done may lead straight to the next wake."""
        while True:
            listed: list[str] | None = None
            try:
                if kind == "webhook":
                    outcome, listed = await self._post_webhook(sub_id, gen, wake_id)
                else:
                    outcome = await self._append_wake_event(sub_id, gen, wake_id)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("wake delivery failed", extra={"fields": {"id": sub_id, "wake": wake_id}})
                outcome = "failed"
            if outcome == "stale":
                return
            metrics.DELIVERIES.labels(kind, outcome).inc()
            jitter = random.uniform(-JITTER, JITTER)
            # A webhook's {"done": true} acks only the streams its body listed.
            only = ["1", *listed] if listed is not None else [""]
            reply = await self.state.sub(
                "sub_delivered",
                sub_id,
                [wake_id, outcome, f"{jitter:.4f}", new_wake_id(), TAKEOVER_MS, *only],
            )
            if reply[0] == "stale":
                return
            due = reply[5] if reply[0] == "woke" else reply[1]
            await self.state.arm(sub_id, due)
            if reply[0] != "woke":
                return
            metrics.WAKES.inc()
            gen, wake_id, kind = int(reply[1]), reply[2], reply[3]

    async def _post_webhook(self, sub_id: str, gen: int, wake_id: str) -> tuple[str, list[str]]:
        """POST the wake; the outcome and the streams the body listed."""
        from . import webhook

        rec = await self.state.load_wake(sub_id)
        if rec is None or rec["state"].get("wake") != wake_id:
            return "stale", []
        signing = await self.signing()
        payload: dict[str, Any] = {
            "subscription_id": sub_id,
            "wake_id": wake_id,
            "generation": gen,
            "streams": [],
            "has_more": True,
            "callback_url": self.control_url(f"subscriptions/{quote(sub_id, safe='')}/callback"),
            "callback_token": signing.issue_token(sub_id, wake_id, gen, TOKEN_TTL_S),
        }
        # Only streams with pending work, as many as fit (wakebody.py).
        pending = [info for info in _stream_infos(rec, snapshot=True) if info["has_pending"]]
        payload["streams"], more = fit_streams(
            pending, encoded_size(payload), self.settings.webhook_max_payload_bytes, gen
        )
        if more or rec["state"].get("more") == "1":
            # More pending than the body lists (it is full, or the wake named
            # only WAKE_STREAMS_MAX of sub_common.lua): the next wake names them.
            metrics.TRUNCATED.inc()
        else:
            del payload["has_more"]
        listed = [info["path"] for info in payload["streams"]]
        body = json.dumps(payload, separators=(",", ":")).encode()
        headers = {
            "content-type": "application/json",
            "webhook-signature": signing.signature_header(body, int(time.time())),
        }
        result = await webhook.deliver(rec["def"]["url"], body, headers)
        if not result.ok:
            log.info("webhook delivery failed", extra={"fields": {"id": sub_id, "error": result.error}})
            return "failed", listed
        return ("done" if result.done else "sent"), listed

    async def _append_wake_event(self, sub_id: str, gen: int, wake_id: str) -> str:
        rec = await self.state.load_head(sub_id)
        if rec is None or rec["state"].get("wake") != wake_id:
            return "stale"
        wake_stream = rec["def"]["wake_stream"]
        event = {
            "type": "wake",
            "subscription_id": sub_id,
            "stream": rec["state"].get("trig", ""),
            "generation": gen,
            "ts": now_ms(),
        }
        store = self.gw.store
        try:
            media = await store.media_type_of(wake_stream)
            outcome = await store.append(wake_stream, media, [json.dumps(event).encode()])
        except ProblemError as exc:
            # The application creates its wake stream; until then (or while it is
            # closed) the wake is retried on the backoff schedule.
            log.info("wake stream refused the wake", extra={"fields": {"id": sub_id, "why": exc.title}})
            return "failed"
        return "sent" if outcome.status == "ok" else "failed"


def _link_type(types: str) -> str:
    return "explicit" if "e" in types else "glob"


def _wake_fields(body: Any) -> tuple[int, str, bool]:
    if not isinstance(body, dict):
        raise invalid("the body must be a JSON object")
    gen, wake_id, done = body.get("generation"), body.get("wake_id"), body.get("done", False)
    if type(gen) is not int or not isinstance(wake_id, str) or not isinstance(done, bool):
        raise invalid("generation (integer), wake_id (string) and done (boolean) are required")
    return gen, wake_id, done


def _stream_infos(rec: dict[str, Any], *, snapshot: bool) -> list[dict[str, Any]]:
    snap = json.loads(rec["state"].get("snap") or "{}") if snapshot else {}
    infos = []
    for path, types in sorted(rec["links"].items()):
        acked = rec["acked"].get(path, ZERO_OFFSET)
        tail = snap.get(path) or rec["tails"].get(path) or (acked if acked != "-1" else ZERO_OFFSET)
        infos.append(
            {"path": path, "link_type": _link_type(types), "acked_offset": acked, "tail_offset": tail,
             "has_pending": acked < tail}
        )  # fmt: skip
    return infos
