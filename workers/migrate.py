"""Schema migrations: the numbered files in workers/sql/, applied once each,
in order, under an advisory lock (many workers may start at once)."""

from __future__ import annotations

import logging
from pathlib import Path

import asyncpg

SQL_DIR = Path(__file__).with_name("sql")
MIGRATION_LOCK = 7352000

log = logging.getLogger("dsgw.migrate")


async def migrate(conn: asyncpg.Connection) -> list[str]:
    """Apply pending migrations; return the names applied now."""
    applied_now = []
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
    try:
        # Only when missing: a least-privilege worker role (deploy/postgres-roles.sql)
        # may not CREATE, even IF NOT EXISTS, and only checks nothing is pending.
        if await conn.fetchval("SELECT to_regclass('dsgw_schema_migrations')") is None:
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS dsgw_schema_migrations ("
                " name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
        done = {r["name"] for r in await conn.fetch("SELECT name FROM dsgw_schema_migrations")}
        for path in sorted(SQL_DIR.glob("*.sql")):
            if path.name in done:
                continue
            async with conn.transaction():
                await conn.execute(path.read_text())
                await conn.execute("INSERT INTO dsgw_schema_migrations (name) VALUES ($1)", path.name)
            log.info("applied migration", extra={"fields": {"migration": path.name}})
            applied_now.append(path.name)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)
    return applied_now


async def migrate_url(database_url: str) -> list[str]:
    conn = await asyncpg.connect(database_url)
    try:
        return await migrate(conn)
    finally:
        await conn.close()
