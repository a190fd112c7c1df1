"""The least-privilege credentials of deploy/redis-acl.example and
deploy/postgres-roles.sql, used for real: a Redis started with that ACL file
and a Postgres with those roles, a gateway and both workers each on its own
user, doing everything they do (create, append, read live, fork, delete, rate
limits, sink rows, source changes, subscriptions, tiered history, shard stats,
the admin tools), and refused what they must not do. Redis's ACL LOG must stay
empty: a denied command the code swallows (a pipeline with raise_on_error=False,
a retried sweep) is as wrong as one that fails a request."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import httpx
import pytest
import redis

from gateway.embedded import find_redis_server, free_port, start_postgres, stop_child, wait_for_port
from gateway.keys import SHARD_STATS, SHARD_STATS_LEASE, SHARDS, shard_tag, stream_keys, trim_due_key
from tests.conftest import ROOT, reachable_tmp_dir, start_gateway, start_worker

ACL_EXAMPLE = ROOT / "deploy" / "redis-acl.example"
ROLES_SQL = ROOT / "deploy" / "postgres-roles.sql"
JSON = {"content-type": "application/json"}
USERS = ("gateway", "sink", "source", "admin")


@dataclass
class AclRedis:
    port: int
    passwords: dict[str, str]

    def url(self, user: str) -> str:
        return f"redis://dsgw-{user}:{self.passwords[user]}@127.0.0.1:{self.port}/0"


@pytest.fixture(scope="module")
def acl_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AclRedis]:
    base = tmp_path_factory.mktemp("acl-redis")
    passwords = {user: uuid.uuid4().hex for user in USERS}
    text = ACL_EXAMPLE.read_text()
    for user, password in passwords.items():
        assert f">change-me-{user} " in text
        text = text.replace(f">change-me-{user} ", f">{password} ")
    (base / "users.acl").write_text(text)
    port = free_port()
    proc = subprocess.Popen(
        [find_redis_server((6, 2)), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(base),
         "--save", "", "--appendonly", "no", "--aclfile", str(base / "users.acl")],
        stdout=open(base / "redis.log", "wb"),  # noqa: SIM115
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    wait_for_port(port, proc=proc)
    server = AclRedis(port, passwords)
    admin = redis.Redis.from_url(server.url("admin"))
    deadline = time.monotonic() + 15
    while True:
        try:
            admin.ping()
            break
        except redis.RedisError:
            assert time.monotonic() < deadline, (base / "redis.log").read_text()
            time.sleep(0.05)
    yield server
    stop_child(proc, timeout_s=10)


@dataclass
class RolesPostgres:
    superuser_url: str
    passwords: dict[str, str]

    def url(self, role: str) -> str:
        parts = urlsplit(self.superuser_url)
        return f"postgresql://dsgw_{role}:{self.passwords[role]}@{parts.hostname}:{parts.port}{parts.path}"


async def _apply_roles(pg: RolesPostgres, sql: str) -> None:
    """What deploy/postgres-roles.sql says to do: roles, migrate as the owner, grants."""
    from workers.migrate import migrate_url

    admin = await asyncpg.connect(pg.superuser_url)
    try:
        await admin.execute(sql)
        await migrate_url(pg.url("owner"))
        await admin.execute(sql)
    finally:
        await admin.close()


@pytest.fixture(scope="module")
def roles_postgres() -> Iterator[RolesPostgres]:
    # Its own Postgres: a source worker takes every outbox row of its database.
    base = reachable_tmp_dir("dsgw-test-roles-")
    server = start_postgres(base / "pg", durable=False, log_file=base / "postgres.log")
    passwords = {role: uuid.uuid4().hex for role in ("owner", "sink", "source", "gateway")}
    sql = ROLES_SQL.read_text()
    for role, password in passwords.items():
        assert f"'change-me-{role}'" in sql
        sql = sql.replace(f"'change-me-{role}'", f"'{password}'")
    pg = RolesPostgres(server.url, passwords)
    asyncio.run(_apply_roles(pg, sql))
    yield pg
    server.stop()


def _no_permission_errors(*logs: Path) -> None:
    for log in logs:
        text = log.read_text(errors="replace")
        assert "NOPERM" not in text and "permission denied" not in text, text[-3000:]


def _admin(acl_redis: AclRedis) -> redis.Redis:
    return redis.Redis.from_url(acl_redis.url("admin"))


def _no_acl_denials(acl_redis: AclRedis) -> None:
    """Nothing any user ran was refused (what Redis recorded in ACL LOG), then
    start afresh for the next test."""
    admin = _admin(acl_redis)
    try:
        denied = [
            {k: entry[k] for k in ("username", "reason", "context", "object")}
            for entry in admin.acl_log(count=128)
            # redis-py opens each connection with CLIENT SETINFO and ignores a refusal:
            # not granted, since Redis 6.2 has no such subcommand (6.2 logs just "client").
            if entry["object"] not in ("client", "client|setinfo")
        ]
        assert denied == [], denied
    finally:
        admin.acl_log_reset()
        admin.close()


def test_gateway_and_workers_run_on_least_privilege_credentials(
    acl_redis: AclRedis, roles_postgres: RolesPostgres, tmp_path: Path
) -> None:
    _admin(acl_redis).acl_log_reset()
    gw = start_gateway(
        acl_redis.url("gateway"),
        tmp_path,
        DSGW_RATE_APPENDS_PER_S="1000",
        DSGW_RATE_LIVE_CONNECTIONS="10",
        DSGW_FORK_SWEEP_MS="200",
    )
    sink = start_worker("sink", acl_redis.url("sink"), roles_postgres.url("sink"), tmp_path,
                        DSGW_SINK_BLOCK_MS="200")  # fmt: skip
    source = start_worker("source", acl_redis.url("source"), roles_postgres.url("source"), tmp_path)
    try:
        name = f"acl/{uuid.uuid4().hex[:8]}"
        url = gw.stream_url(name)
        with httpx.Client(timeout=20) as http:
            # Every kind of gateway request.
            assert http.put(url, headers=JSON).status_code == 201
            assert (
                http.post(url, content=b'{"type":"m","key":"k1","value":1}', headers=JSON).status_code == 204
            )
            assert http.get(url, params={"offset": "-1"}).json() == [{"type": "m", "key": "k1", "value": 1}]
            assert http.head(url).status_code == 200
            assert http.get(url, params={"offset": "-1", "live": "long-poll"}).status_code == 200
            with http.stream("GET", url, params={"offset": "-1", "live": "sse"}) as r:
                assert r.status_code == 200
                assert any(line.startswith("event: control") for line in r.iter_lines())
            fork = gw.stream_url(f"{name}-fork")
            assert http.put(fork, headers={"stream-forked-from": f"/v1/stream/{name}"}).status_code == 201
            assert http.delete(fork).status_code == 204

            # Sink: the message became a row, written as dsgw_sink.
            async def rows() -> int:
                conn = await asyncpg.connect(roles_postgres.superuser_url)
                try:
                    return int(
                        await conn.fetchval(
                            "SELECT count(*) FROM session_events WHERE stream_name = $1", name
                        )
                    )
                finally:
                    await conn.close()

            deadline = time.monotonic() + 30
            while asyncio.run(rows()) != 1:
                assert time.monotonic() < deadline, sink.log_path.read_text()[-3000:]
                time.sleep(0.2)

            # Source: a table published by the owner, written by an application
            # role that only has dsgw_capture, reaches its stream.
            table = "acl_" + uuid.uuid4().hex[:8]
            published = f"pg/{table}"
            asyncio.run(_make_app_table(roles_postgres, table))
            done = subprocess.run(
                [sys.executable, "-m", "gateway.cli", "publish", table, "--stream", published],
                cwd=ROOT,
                env={
                    **os.environ,
                    "DATABASE_URL": roles_postgres.url("owner"),
                    "REDIS_URL": acl_redis.url("admin"),
                },
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert done.returncode == 0, done.stderr
            asyncio.run(_app_insert(roles_postgres, table))
            deadline = time.monotonic() + 30
            while True:
                got = http.get(gw.stream_url(published), params={"offset": "-1"})
                if got.status_code == 200 and got.json():
                    break
                assert time.monotonic() < deadline, source.log_path.read_text()[-3000:]
                time.sleep(0.2)
            assert got.json()[0]["value"] == {"id": 1, "title": "from the app"}
            assert http.delete(url).status_code == 204
    finally:
        gw.stop()
        sink.stop()
        source.stop()
    _no_permission_errors(gw.log_path, sink.log_path, source.log_path)
    _no_acl_denials(acl_redis)


async def _make_app_table(pg: RolesPostgres, table: str) -> None:
    owner = await asyncpg.connect(pg.url("owner"))
    try:
        await owner.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, title text)")
    finally:
        await owner.close()
    admin = await asyncpg.connect(pg.superuser_url)
    try:
        app = f"app_{table}"
        await admin.execute(f"CREATE ROLE {app} LOGIN PASSWORD 'app' IN ROLE dsgw_capture")
        await admin.execute(f"GRANT INSERT ON {table} TO {app}")
    finally:
        await admin.close()


async def _app_insert(pg: RolesPostgres, table: str) -> None:
    parts = urlsplit(pg.superuser_url)
    app = await asyncpg.connect(f"postgresql://app_{table}:app@{parts.hostname}:{parts.port}{parts.path}")
    try:
        await app.execute(f"INSERT INTO {table} (id, title) VALUES (1, 'from the app')")
    finally:
        await app.close()


def test_subscriptions_tiering_and_admin_tools_on_least_privilege_credentials(
    acl_redis: AclRedis, roles_postgres: RolesPostgres, tmp_path: Path
) -> None:
    """A pull-wake subscription woken, claimed and acked through the gateway user;
    a tiered stream the sink trims on its own user, read back from -1 by a
    gateway whose history role reads the cold part; shard stats collected; then
    the admin tools (rotate-keys, reshard) on the admin user."""
    admin = _admin(acl_redis)
    admin.acl_log_reset()
    admin.delete(SHARD_STATS_LEASE)  # an earlier test's gateway measured for its (long) interval
    gw = start_gateway(
        acl_redis.url("gateway"),
        tmp_path,
        DSGW_HISTORY_DATABASE_URL=roles_postgres.url("gateway"),
        DSGW_RETAIN_MESSAGES="1000000",  # every stream it creates is tiered; the limit is the sink's
        DSGW_SHARD_STATS_S="1",
        DSGW_SUBSCRIPTIONS_POLL_MS="100",
    )
    sink = start_worker("sink", acl_redis.url("sink"), roles_postgres.url("sink"), tmp_path,
                        DSGW_SINK_BLOCK_MS="200", DSGW_RETAIN_MESSAGES="2", DSGW_RETAIN_SECONDS="3600",
                        DSGW_TRIM_SWEEP_MS="200")  # fmt: skip
    unique = uuid.uuid4().hex[:8]
    work, wakes = f"acl-sub/{unique}/work", f"acl-wakes/{unique}"
    sub_url = f"{gw.url}/v1/stream/__ds/subscriptions/acl-{unique}"
    try:
        with httpx.Client(timeout=20) as http:
            assert http.put(gw.stream_url(wakes), headers=JSON).status_code == 201
            # A pattern: the stream created next is linked by create.lua (the registry's patterns).
            config = {"type": "pull-wake", "pattern": f"acl-sub/{unique}/*", "wake_stream": wakes}
            created = http.put(sub_url, json=config)
            assert created.status_code == 201, created.text
            assert http.put(gw.stream_url(work), headers=JSON).status_code == 201
            values = list(range(5))
            for value in values:
                appended = http.post(gw.stream_url(work), content=str(value).encode(), headers=JSON)
                assert appended.status_code == 204, appended.text
            tail = appended.headers["stream-next-offset"]

            # Subscription: the appends' wake reaches the wake stream; claim, ack, release.
            deadline = time.monotonic() + 20
            while not http.get(gw.stream_url(wakes), params={"offset": "-1"}).json():
                assert time.monotonic() < deadline, gw.log_path.read_text()[-3000:]
                time.sleep(0.1)
            claim = http.post(f"{sub_url}/claim", json={"worker": "w1"})
            assert claim.status_code == 200, claim.text
            claimed = claim.json()
            bearer = {"authorization": f"Bearer {claimed['token']}"}
            wake = {"generation": claimed["generation"], "wake_id": claimed["wake_id"]}
            acked = http.post(
                f"{sub_url}/ack", json={**wake, "acks": [{"stream": work, "offset": tail}]}, headers=bearer
            )
            assert acked.status_code == 200 and acked.json()["ok"] is True, acked.text
            assert http.post(f"{sub_url}/release", json=wake, headers=bearer).status_code == 204

            # Tiering: the sink committed the stream to stream_history and trimmed
            # Redis to 2 messages on its own user; the gateway reads the rest cold.
            keys = stream_keys(work)
            deadline = time.monotonic() + 30
            schedule = trim_due_key(keys.shard)  # the age limit schedules the oldest entry left
            while not (
                admin.hget(keys.meta, "trim") and admin.xlen(keys.data) <= 2 and admin.exists(schedule)
            ):
                assert time.monotonic() < deadline, sink.log_path.read_text()[-3000:]
                time.sleep(0.2)
            read: list[int] = []
            offset = "-1"
            while True:  # the cold part comes in its own responses: follow the offsets
                got = http.get(gw.stream_url(work), params={"offset": offset})
                assert got.status_code == 200, got.text
                read += got.json()
                offset = got.headers["stream-next-offset"]
                if "stream-up-to-date" in got.headers or len(read) >= len(values):
                    break
            assert read == values

            # Shard stats: measured under the lease (MEMORY USAGE of every key of the
            # shard, the trim schedule included), reported in /metrics.
            deadline = time.monotonic() + 20
            while True:
                counted = sum(1 for _ in admin.scan_iter(match=f"*{shard_tag(keys.shard)}*"))
                line = f'dsgw_redis_shard_keys{{shard="{keys.shard}"}} {float(counted)}'
                if admin.hlen(SHARD_STATS) == SHARDS and line in http.get(f"{gw.url}/metrics").text:
                    break
                shown = [m for m in http.get(f"{gw.url}/metrics").text.splitlines() if f'"{keys.shard}"' in m]
                assert time.monotonic() < deadline, (line, shown, gw.log_path.read_text()[-2000:])
                time.sleep(0.2)
            assert http.delete(gw.stream_url(work)).status_code == 204  # unlinked from the subscription
            assert http.delete(sub_url).status_code == 204
    finally:
        gw.stop()
        sink.stop()
    _no_permission_errors(gw.log_path, sink.log_path)

    # The admin tools, on the admin user (reshard is offline: after every process stopped).
    def dsgw(*args: str) -> None:
        done = subprocess.run(
            [sys.executable, "-m", "gateway.cli", *args],
            cwd=ROOT,
            env={**os.environ, "REDIS_URL": acl_redis.url("admin")},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stdout + done.stderr

    dsgw("rotate-keys", "signing")
    dsgw("reshard", "--to", "16")
    _no_acl_denials(acl_redis)
    admin.close()


def test_each_redis_user_is_refused_what_it_does_not_need(acl_redis: AclRedis) -> None:
    def refused(user: str, *command: str) -> bool:
        client = redis.Redis.from_url(acl_redis.url(user))
        try:
            client.execute_command(*command)
        except redis.exceptions.NoPermissionError:
            return True
        finally:
            client.close()
        return False

    assert refused("gateway", "FLUSHALL")
    assert refused("gateway", "CONFIG", "GET", "dir")
    assert refused("gateway", "GET", "someone-elses-key")
    assert refused("gateway", "KEYS", "*")
    # The sink trims tiered streams (meta and data only), nothing else of a stream.
    assert refused("sink", "HGETALL", "ds:{s00}:x:prod")
    assert refused("sink", "DEL", "ds:{s00}:x:meta")
    assert refused("sink", "XADD", "ds:{s00}:x:data", "*", "f", "v")
    # Subscriptions are the gateway's: the sink cannot touch them, nor the source.
    assert refused("sink", "HGETALL", "dssub:{abc}:def")
    assert refused("sink", "ZADD", "dswake:{s00}", "1", "x")
    assert refused("sink", "GET", "dskeys:webhook-signing")
    assert refused("source", "GET", "dskeys:webhook-signing")
    assert refused("source", "SMEMBERS", "dssubs:all")
    # Only the admin moves keys between layouts (reshard) or lists clients.
    assert refused("gateway", "DUMP", "ds:{s00}:x:data")
    assert refused("gateway", "RESTORE", "ds:{s00}:x:data", "0", "x")
    assert refused("gateway", "CLIENT", "LIST")
    assert refused("gateway", "FLUSHDB")
    assert refused("gateway", "XTRIM", "ds:{s00}:x:data", "MAXLEN", "0")  # trimming is the sink's
    assert refused("source", "XTRIM", "ds:{s00}:x:data", "MAXLEN", "0")
    assert refused("sink", "PUBLISH", "ds:x", "y")
    assert refused("sink", "SUBSCRIBE", "ds:x")
    assert refused("source", "GET", "dsrl:{abc}:appends")
    assert refused("admin", "FLUSHALL")
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis(port=acl_redis.port).ping()  # no anonymous access
