-- Least-privilege Postgres roles for ds-gateway (an example: pick your own
-- passwords, e.g. with psql's \password, and adapt the names).
--
-- Who needs what:
--   dsgw_owner    owns the schema: runs `dsgw migrate` (creates the tables and
--                 triggers) and `dsgw publish` / `dsgw unpublish`. The tables
--                 you publish must be owned by it too (a trigger is added to
--                 them), or run publish as their owner.
--   dsgw_sink     the sink worker: inserts rows into session_events,
--                 session_events_rejected and stream_history (through temp
--                 tables it creates).
--   dsgw_source   the source worker: reads and deletes the outbox, keeps its
--                 progress per stream, takes advisory locks, LISTENs.
--   dsgw_gateway  the gateway's tiered-history reads (DSGW_HISTORY_DATABASE_URL):
--                 SELECT on stream_history only; also fits `dsgw tail`.
--   dsgw_capture  no login: grant it to every application role that writes to
--                 a published table, since the capture trigger runs as that
--                 writer and records the change in the outbox.
-- The gateway connects to Postgres only to read trimmed history.
--
-- Run as a superuser (or a role with CREATEROLE that owns the database), in the
-- gateway's database, BEFORE the first `dsgw migrate`:
--     psql "$ADMIN_URL" -v ON_ERROR_STOP=1 -f deploy/postgres-roles.sql
-- then migrate as the owner:
--     DATABASE_URL=postgresql://dsgw_owner:...@host/db dsgw migrate
-- and AFTER it, run the grants at the end of this file again (psql -f again is
-- fine: every statement here can be repeated), since they name the tables the
-- migrations create. Workers then start with their own DATABASE_URL, e.g.
--     postgresql://dsgw_sink:...@host/db   and   postgresql://dsgw_source:...@host/db
-- and find every migration applied (they never apply one themselves without
-- the privileges to: run `dsgw migrate` as dsgw_owner after an upgrade).

DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'dsgw_owner') THEN
        CREATE ROLE dsgw_owner LOGIN PASSWORD 'change-me-owner';
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'dsgw_sink') THEN
        CREATE ROLE dsgw_sink LOGIN PASSWORD 'change-me-sink';
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'dsgw_source') THEN
        CREATE ROLE dsgw_source LOGIN PASSWORD 'change-me-source';
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'dsgw_gateway') THEN
        CREATE ROLE dsgw_gateway LOGIN PASSWORD 'change-me-gateway';
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'dsgw_capture') THEN
        CREATE ROLE dsgw_capture NOLOGIN;
    END IF;
    -- CONNECT, and TEMP for the sink's staging table, on this database only.
    EXECUTE format('GRANT CONNECT, TEMP ON DATABASE %I TO dsgw_sink', current_database());
    EXECUTE format('GRANT CONNECT ON DATABASE %I TO dsgw_source, dsgw_owner, dsgw_gateway', current_database());
    EXECUTE format('GRANT CREATE ON DATABASE %I TO dsgw_owner', current_database());
END
$$;

-- Postgres 15+ no longer lets everyone create in public; older versions do:
-- take it away so only the owner creates tables there.
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
GRANT USAGE, CREATE ON SCHEMA public TO dsgw_owner;
GRANT USAGE ON SCHEMA public TO dsgw_sink, dsgw_source, dsgw_capture, dsgw_gateway;

-- The grants below name the tables of workers/sql/: they apply once
-- `dsgw migrate` created them (before that, they are skipped).
DO $$
DECLARE
    grants text[] := ARRAY[
        -- every worker checks at start that no migration is pending
        'GRANT SELECT ON dsgw_schema_migrations TO dsgw_sink, dsgw_source',
        -- sink
        'GRANT SELECT, INSERT ON session_events, session_events_rejected TO dsgw_sink',
        -- tiered history: the sink writes it (ON CONFLICT DO NOTHING needs no SELECT),
        -- the gateway reads what Redis trimmed
        'GRANT INSERT ON stream_history TO dsgw_sink',
        'GRANT SELECT ON stream_history TO dsgw_gateway',
        -- source
        'GRANT SELECT, DELETE ON dsgw_outbox TO dsgw_source',
        'GRANT SELECT, INSERT, UPDATE ON dsgw_source_progress TO dsgw_source',
        -- writers of published tables (through their capture triggers)
        'GRANT INSERT, SELECT, UPDATE ON dsgw_outbox TO dsgw_capture',
        'GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO dsgw_capture, dsgw_sink'
    ];
    statement text;
BEGIN
    IF to_regclass('dsgw_schema_migrations') IS NULL THEN
        RAISE NOTICE 'tables not created yet: run dsgw migrate as dsgw_owner, then this file again';
        RETURN;
    END IF;
    FOREACH statement IN ARRAY grants LOOP
        EXECUTE statement;
    END LOOP;
END
$$;
