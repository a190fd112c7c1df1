"""The commit-time numbering of the source outbox (dsgw_number_at_commit)
never plans a nested loop (migration 006). With dsgw_outbox's statistics
saying "analyzed while empty" (what autovacuum leaves behind, since the source
worker drains the table), the planner would rescan the transaction's rows once
per row: a 20,000-row commit took minutes in CI. auto_explain hands us the plan
the trigger really ran, from inside the function, as a NOTICE."""

from __future__ import annotations

import types
from collections.abc import AsyncIterator

import asyncpg
import pytest

from tests.integration.test_postgres_sync import _publish

ROWS = 2000


@pytest.fixture
async def database(postgres_server, unique: str) -> AsyncIterator[str]:
    """A migrated database of its own, so the statistics we force touch no other test."""
    from workers.migrate import migrate

    name = "plan_" + unique.replace("-", "_")[-20:]
    admin = await asyncpg.connect(postgres_server.url)
    await admin.execute(f"CREATE DATABASE {name}")
    url = postgres_server.url.rsplit("/", 1)[0] + f"/{name}"
    conn = await asyncpg.connect(url)
    try:
        await migrate(conn)
        await conn.execute("CREATE TABLE items (id int PRIMARY KEY, v int)")
        # Autovacuum must not replace the statistics the test sets.
        await conn.execute("ALTER TABLE dsgw_outbox SET (autovacuum_enabled = false)")
    finally:
        await conn.close()
    await _publish(types.SimpleNamespace(url=url), "items", "pg/items")
    yield url
    await admin.execute(f"DROP DATABASE {name} WITH (FORCE)")
    await admin.close()


async def numbering_plan(url: str, first_id: int) -> str:
    """Insert ROWS rows in one transaction, with dsgw_outbox looking analyzed
    while empty, and return the plan of the numbering UPDATE run at commit."""
    conn = await asyncpg.connect(url)
    notices: list[str] = []
    conn.add_log_listener(lambda _conn, message: notices.append(message.message))
    try:
        await conn.execute(
            "UPDATE pg_class SET reltuples = 0, relpages = 1 WHERE oid = 'dsgw_outbox'::regclass"
        )
        await conn.execute("LOAD 'auto_explain'")
        async with conn.transaction():
            for setting, value in (
                ("log_min_duration", "0"),
                ("log_nested_statements", "on"),
                ("log_level", "notice"),
            ):
                await conn.execute(f"SET LOCAL auto_explain.{setting} = '{value}'")
            await conn.execute(
                f"INSERT INTO items SELECT g, g FROM generate_series({first_id}, {first_id + ROWS - 1}) g"
            )
            notices.clear()  # the plans of the insert and its capture triggers
        # Notices arrive with the COMMIT's reply; the deferred trigger ran there.
        plans = [n for n in notices if "Update on dsgw_outbox" in n]
        assert plans, notices
        return plans[-1]
    finally:
        await conn.close()


async def test_the_numbering_at_commit_never_uses_a_nested_loop(database):
    plan = await numbering_plan(database, 1)
    assert "Nested Loop" not in plan, plan
    assert "Hash Join" in plan or "Merge Join" in plan, plan


async def test_without_the_function_setting_those_statistics_do_plan_a_nested_loop(database):
    """The control: the statistics above are the trap (so the first test could fail)."""
    conn = await asyncpg.connect(database)
    try:
        await conn.execute("ALTER FUNCTION dsgw_number_at_commit() RESET enable_nestloop")
    finally:
        await conn.close()
    assert "Nested Loop" in await numbering_plan(database, 1)
