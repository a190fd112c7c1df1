-- 1. Source worker: refuse a commit sequence that went backwards.
--
-- Each append of the source worker carries its commit_seq as the stream's
-- source sequence (meta srcseq in Redis, which no HTTP request can set); an
-- append not above the stored one writes nothing. That makes a retry after a
-- crash harmless, but a sequence that goes backwards (Postgres restored from
-- a backup, a failover to a logical replica, the sequence reset) would make
-- new changes look like old ones. So the worker records, BEFORE it appends,
-- the highest commit_seq it hands to an append for a stream (appending_seq).
-- A stream whose source sequence is above it, or outbox rows at or below the
-- stream's last_seq (rows up to last_seq were appended and deleted), mean the
-- numbers were reused: the worker stops publishing that stream and keeps its
-- rows until an operator runs dsgw_source_resync (below).
ALTER TABLE dsgw_source_progress ADD COLUMN IF NOT EXISTS appending_seq bigint NOT NULL DEFAULT 0;
UPDATE dsgw_source_progress SET appending_seq = last_seq WHERE appending_seq < last_seq;

-- Recovery: number every change still in the outbox above `past` (the
-- highest number the worker reported), in commit order (committed_at: after a
-- reset the numbers alone no longer tell), and move the sequence past it.
-- Run it with every source worker stopped.
CREATE OR REPLACE FUNCTION dsgw_source_resync(past bigint) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    renumbered bigint;
BEGIN
    -- 7352002: the source worker's leader lock (workers/source.py).
    IF NOT pg_try_advisory_xact_lock(7352002) THEN
        RAISE EXCEPTION 'a source worker is publishing: stop every dsgw worker source first';
    END IF;
    -- 7352001: the commit ordering lock (002): no commit numbers its rows meanwhile.
    PERFORM pg_advisory_xact_lock(7352001);
    PERFORM setval('dsgw_outbox_commit_seq_seq',
                   greatest(past, (SELECT last_value FROM dsgw_outbox_commit_seq_seq)));
    UPDATE dsgw_outbox o
       SET commit_seq = n.seq
      FROM (SELECT id, nextval('dsgw_outbox_commit_seq_seq') AS seq
              FROM (SELECT id FROM dsgw_outbox
                     WHERE commit_seq IS NOT NULL
                     ORDER BY committed_at, commit_seq, id) ordered) n
     WHERE o.id = n.id;
    GET DIAGNOSTICS renumbered = ROW_COUNT;
    RETURN renumbered;
END $$;

-- 2. Sink: event_key, event_type and operation of a message. The top-level
-- field wins; else the one in "headers" (where the State Protocol, and so
-- the source worker, puts the operation). Strings as they are, other values
-- as JSON text, JSON null as NULL.
CREATE OR REPLACE FUNCTION dsgw_json_text(value jsonb) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE jsonb_typeof(value) WHEN 'string' THEN value #>> '{}' WHEN 'null' THEN NULL ELSE value::text END
$$;

CREATE OR REPLACE FUNCTION dsgw_event_field(message jsonb, name text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT coalesce(dsgw_json_text(message -> name), dsgw_json_text(message -> 'headers' -> name))
$$;

-- 3. Number a transaction's outbox rows in time linear in their count. The
-- constraint trigger fires once per row at commit; 002 asked "any unnumbered
-- row left?" each time, a scan over the index entries the numbering itself
-- had just made dead: quadratic (a 10,000-row transaction took 20 s to
-- commit). Now each call looks up its own row by primary key, and numbers
-- whatever is still unnumbered only when that row is (the first call, or a
-- row written by another deferred trigger after the numbering).
CREATE OR REPLACE FUNCTION dsgw_number_at_commit() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF (SELECT commit_seq FROM dsgw_outbox WHERE id = NEW.id) IS NULL THEN
        PERFORM pg_advisory_xact_lock(7352001);  -- 'dsgw' commit ordering lock
        UPDATE dsgw_outbox o
           SET commit_seq = n.seq, committed_at = clock_timestamp()
          FROM (SELECT id, nextval('dsgw_outbox_commit_seq_seq') AS seq
                  FROM (SELECT id FROM dsgw_outbox
                         WHERE txid = txid_current() AND commit_seq IS NULL
                         ORDER BY id) ordered) n
         WHERE o.id = n.id;
        PERFORM pg_notify('dsgw_outbox', '');
    END IF;
    RETURN NULL;
END $$;
