"""Subscriptions survive a replica dying mid-delivery (issue 12), on the e2e
stack (gateway replicas on one Redis, behind nginx).

Webhook half: a receiver stalls the first delivery while the test SIGKILLs the
replica that is sending it; another replica delivers the wake again after the
lease / take-over, every appended stream ends acknowledged (no wake lost), and
the receiver's late callback for the first delivery answers 409 FENCED.

Pull-wake half: a worker claims through one replica, which is SIGKILLed with
the lease held; the lease runs out, a surviving replica wakes again, the old
holder's late ack is FENCED, and every stream's work is claimed and acked."""

from __future__ import annotations

import asyncio
import json
import signal
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from e2e import stack as stack_module

JSON = {"content-type": "application/json"}
# Conditions are waited for with a deadline, never a fixed sleep: a take-over
# may come after the lease or after the dispatcher's take-over delay.
DEADLINE_S = 120.0


def new_name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


async def wait_for(predicate: Callable[[], Any], what: str, timeout_s: float = DEADLINE_S) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


# --- a webhook receiver that knows which process sent each delivery -----------------


@dataclass
class Delivery:
    body: dict[str, Any]
    sender_pid: int | None
    answered: asyncio.Future[bytes]  # the response body the test chooses


@dataclass
class StallingReceiver:
    """Holds each delivery until the test answers it (or the sender dies)."""

    deliveries: list[Delivery] = field(default_factory=list)
    auto_done: bool = False  # answer {"done": true} at once from now on
    port: int = 0
    server: asyncio.Server | None = None

    async def start(self) -> StallingReceiver:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode().split("\r\n")
            headers = {k.strip().lower(): v.strip() for k, v in (x.split(":", 1) for x in lines[1:] if x)}
            body = json.loads(await reader.readexactly(int(headers["content-length"])))
            peer_port = writer.get_extra_info("peername")[1]
            delivery = Delivery(
                body, pid_of_connection(peer_port, self.port), asyncio.get_running_loop().create_future()
            )
            self.deliveries.append(delivery)
            if self.auto_done:
                delivery.answered.set_result(b'{"done": true}')
            answer = await delivery.answered
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n")
            writer.write(f"content-length: {len(answer)}\r\nconnection: close\r\n\r\n".encode() + answer)
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the sender died while we held its delivery
        finally:
            writer.close()


def _socket_inodes(local_port: int, remote_port: int) -> set[str]:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, remote, inode = fields[1], fields[2], fields[9]
            if (
                int(local.rsplit(":", 1)[1], 16) == local_port
                and int(remote.rsplit(":", 1)[1], 16) == remote_port
            ):
                inodes.add(inode)
    return inodes


def pid_of_connection(sender_port: int, receiver_port: int) -> int | None:
    """The process owning the client end (127.0.0.1:sender_port -> receiver) of a TCP connection."""
    inodes = {f"socket:[{inode}]" for inode in _socket_inodes(sender_port, receiver_port)}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for fd in (proc / "fd").iterdir():
                if fd.readlink().as_posix() in inodes:
                    return int(proc.name)
        except OSError:
            continue
    return None


# --- helpers on the HTTP API ----------------------------------------------------------


async def tail_of(client: httpx.AsyncClient, url: str) -> str:
    response = await client.head(url)
    assert response.status_code == 200, response.text
    return response.headers["stream-next-offset"]


async def acked_offsets(client: httpx.AsyncClient, sub_url: str) -> dict[str, str]:
    response = await client.get(sub_url)
    assert response.status_code == 200, response.text
    return {s["path"]: s["acked_offset"] for s in response.json()["streams"]}


async def callback(
    client: httpx.AsyncClient, base: str, delivery: Delivery, acks: list[dict[str, str]]
) -> httpx.Response:
    """The receiver's callback for `delivery`, sent to `base` (a replica that is alive)."""
    body = delivery.body
    path = urlsplit(body["callback_url"]).path
    return await client.post(
        base + path,
        headers={**JSON, "authorization": f"Bearer {body['callback_token']}"},
        json={"wake_id": body["wake_id"], "generation": body["generation"], "acks": acks, "done": True},
    )


async def test_webhook_wake_survives_the_sending_replica_being_killed(stack):  # type: ignore[no-untyped-def]
    receiver = await StallingReceiver().start()
    prefix = new_name("fo-hook")
    sub_id = new_name("sub-fo-hook")
    gateways = {p.pid: p for p in stack.find("gateway")}
    killed: stack_module.Proc | None = None
    async with httpx.AsyncClient(timeout=30) as client:
        first_base = stack.gateways[0]
        sub_url = f"{first_base}/v1/stream/__ds/subscriptions/{sub_id}"
        try:
            created = await client.put(
                sub_url,
                json={
                    "type": "webhook",
                    "pattern": f"{prefix}/*",
                    "webhook": {"url": receiver.url},
                    "lease_ttl_ms": 2000,
                },
            )
            assert created.status_code == 201, created.text

            # 1. A wake whose delivery the receiver holds, and the replica sending it dies.
            s0 = f"{first_base}/v1/stream/{prefix}/s0"
            assert (await client.put(s0, headers=JSON)).status_code == 201
            assert (await client.post(s0, headers=JSON, json={"n": 0})).status_code in (200, 204)
            first = await wait_for(lambda: receiver.deliveries[:1], "the first delivery")
            stalled = first[0]
            assert stalled.sender_pid in gateways, f"delivery from pid {stalled.sender_pid}, not a gateway"
            killed = gateways[stalled.sender_pid]
            stack_module.stop_proc(killed, signal.SIGKILL)
            survivors = [f"http://127.0.0.1:{p.port}" for p in gateways.values() if p is not killed]
            sub_url = f"{survivors[0]}/v1/stream/__ds/subscriptions/{sub_id}"

            # 2. More work while the wake is orphaned, through the replicas still alive.
            streams = [f"{prefix}/s{i}" for i in range(5)]
            for i, name in enumerate(streams):
                url = f"{survivors[i % len(survivors)]}/v1/stream/{name}"
                if i:
                    assert (await client.put(url, headers=JSON)).status_code == 201
                assert (
                    await client.post(url, headers=JSON, json={"n": i, "after_kill": True})
                ).status_code in (200, 204)

            # 3. Another replica delivers the orphaned wake again (lease ran out / take-over).
            second = (await wait_for(lambda: receiver.deliveries[1:2], "a redelivery by another replica"))[0]
            assert second.sender_pid in gateways and second.sender_pid != killed.pid
            assert f"{prefix}/s0" in {s["path"] for s in second.body["streams"]}
            second.answered.set_result(b"{}")  # accepted; acked through the callback below
            acks = [{"stream": s["path"], "offset": s["tail_offset"]} for s in second.body["streams"]]
            answer = await callback(client, survivors[-1], second, acks)
            assert answer.status_code == 200, answer.text
            assert set(answer.json()) == {"ok", "next_wake"} and answer.json()["ok"] is True

            # 4. Every stream's work is delivered and acknowledged: no wake lost.
            receiver.auto_done = True
            for delivery in receiver.deliveries[2:]:
                if not delivery.answered.done():
                    delivery.answered.set_result(b'{"done": true}')
            tails = {name: await tail_of(client, f"{survivors[0]}/v1/stream/{name}") for name in streams}

            async def all_acked() -> bool:
                acked = await acked_offsets(client, sub_url)
                return all(acked.get(name) == tail for name, tail in tails.items())

            await wait_for(all_acked, "every stream acknowledged at its tail")
            delivered: dict[str, str] = {}
            for delivery in receiver.deliveries:
                assert delivery.body["subscription_id"] == sub_id
                for s in delivery.body["streams"]:
                    delivered[s["path"]] = max(delivered.get(s["path"], ""), s["tail_offset"])
            assert all(delivered.get(name, "") >= tail for name, tail in tails.items()), (delivered, tails)
            generations = [d.body["generation"] for d in receiver.deliveries]
            assert generations == sorted(generations)

            # 5. The receiver's late callback for the delivery the dead replica sent: fenced.
            late = await callback(
                client, survivors[0], stalled, [{"stream": f"{prefix}/s0", "offset": tails[f"{prefix}/s0"]}]
            )
            assert late.status_code == 409 and late.json()["error"]["code"] == "FENCED", late.text
            assert await all_acked()  # and it moved no cursor
        finally:
            for delivery in receiver.deliveries:
                if not delivery.answered.done():
                    delivery.answered.set_result(b"{}")
            if receiver.server:
                receiver.server.close()
            if killed is not None:  # back on its port, for the tests after this one
                stack_module.restart(stack, killed)
            await client.delete(f"{stack.gateways[0]}/v1/stream/__ds/subscriptions/{sub_id}")


# --- pull-wake half (SUBS-CORE) --------------------------------------------------------


async def wake_events(client: httpx.AsyncClient, url: str, sub_id: str) -> list[dict[str, Any]]:
    response = await client.get(url)
    assert response.status_code == 200, response.text
    return [e for e in response.json() if e.get("subscription_id") == sub_id]


async def test_pull_wake_lease_survives_the_claiming_replica_being_killed(stack):  # type: ignore[no-untyped-def]
    prefix = new_name("fo-pull")
    sub_id = new_name("sub-fo-pull")
    gateways = list(stack.find("gateway"))
    holder = gateways[1]
    survivors = [f"http://127.0.0.1:{p.port}" for p in gateways if p is not holder]
    killed = False
    async with httpx.AsyncClient(timeout=30) as client:
        base = f"http://127.0.0.1:{holder.port}"
        wake_url = f"{survivors[0]}/v1/stream/{prefix}-wake"
        sub_path = f"/v1/stream/__ds/subscriptions/{sub_id}"
        try:
            assert (await client.put(wake_url, headers=JSON, content=b"[]")).status_code == 201
            created = await client.put(
                base + sub_path,
                json={
                    "type": "pull-wake",
                    "pattern": f"{prefix}/*",
                    "wake_stream": f"{prefix}-wake",
                    "lease_ttl_ms": 2000,
                },
            )
            assert created.status_code == 201, created.text

            # 1. A wake, claimed through one replica, which then dies with the lease held.
            s0 = f"{base}/v1/stream/{prefix}/s0"
            assert (await client.put(s0, headers=JSON, json={"n": 0})).status_code == 201
            await wait_for(lambda: wake_events(client, wake_url, sub_id), "the first wake event")
            claimed_response = await client.post(base + sub_path + "/claim", json={"worker": "worker-1"})
            assert claimed_response.status_code == 200, claimed_response.text
            claimed = claimed_response.json()
            stack_module.stop_proc(holder, signal.SIGKILL)
            killed = True

            # 2. More work through the replicas still alive, while worker-1 (gone too) never acks.
            streams = [f"{prefix}/s{i}" for i in range(5)]
            for i, name in enumerate(streams[1:], start=1):
                url = f"{survivors[i % len(survivors)]}/v1/stream/{name}"
                assert (await client.put(url, headers=JSON, json={"n": i})).status_code == 201

            # 3. The lease runs out; a surviving replica issues the next wake to the wake stream.
            async def rewoken() -> list[dict[str, Any]]:
                events = await wake_events(client, wake_url, sub_id)
                return [e for e in events if e["generation"] > claimed["generation"]]

            await wait_for(rewoken, "a new wake after the lease expired")

            # 4. worker-1's late ack is fenced and moves no cursor.
            late = await client.post(
                survivors[0] + sub_path + "/ack",
                headers={"authorization": f"Bearer {claimed['token']}"},
                json={"wake_id": claimed["wake_id"], "generation": claimed["generation"], "done": True,
                      "acks": [{"stream": f"{prefix}/s0", "offset": "9999999999999999_0000000000000000"}]},
            )  # fmt: skip
            assert late.status_code == 409 and late.json()["error"]["code"] == "FENCED", late.text

            # 5. worker-2 claims and acks until nothing is pending: every stream's work was woken.
            tails = {name: await tail_of(client, f"{survivors[0]}/v1/stream/{name}") for name in streams}
            seen: dict[str, str] = {}

            async def drained() -> bool:
                response = await client.post(survivors[-1] + sub_path + "/claim", json={"worker": "worker-2"})
                if response.status_code == 409:
                    return response.json()["error"]["code"] == "NO_PENDING_WORK"
                assert response.status_code == 200, response.text
                wake = response.json()
                acks = []
                for s in wake["streams"]:
                    seen[s["path"]] = max(seen.get(s["path"], ""), s["tail_offset"])
                    if s["has_pending"]:
                        acks.append({"stream": s["path"], "offset": s["tail_offset"]})
                done = await client.post(
                    survivors[0] + sub_path + "/ack",
                    headers={"authorization": f"Bearer {wake['token']}"},
                    json={
                        "wake_id": wake["wake_id"],
                        "generation": wake["generation"],
                        "acks": acks,
                        "done": True,
                    },
                )
                assert done.status_code == 200, done.text
                return False

            await wait_for(drained, "no pending work left")
            assert all(seen.get(name, "") >= tail for name, tail in tails.items()), (seen, tails)
            acked = await acked_offsets(client, survivors[0] + sub_path)
            assert all(acked.get(name) == tail for name, tail in tails.items()), (acked, tails)
            generations = [e["generation"] for e in await wake_events(client, wake_url, sub_id)]
            assert generations == sorted(generations)
        finally:
            if killed:
                stack_module.restart(stack, holder)
            await client.delete(f"{survivors[0]}{sub_path}")
