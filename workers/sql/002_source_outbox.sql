-- Postgres -> Stream: row changes of published tables, captured by triggers
-- into an outbox, numbered in COMMIT order, and appended to streams by
-- `dsgw worker source`.
--
-- Why commit order holds: the row trigger only writes the change (commit_seq
-- NULL). A deferred constraint trigger runs at COMMIT, takes a transaction
-- advisory lock and numbers the transaction's rows; the lock is held until
-- the commit completes, so no later transaction can number (or make visible)
-- its rows first. The worker reads commit_seq > its checkpoint, in order.

CREATE TABLE IF NOT EXISTS dsgw_outbox (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    commit_seq    bigint,               -- set at commit; NULL only inside the open transaction
    stream        text        NOT NULL,
    table_name    text        NOT NULL, -- the STATE-PROTOCOL "type"
    row_key       text        NOT NULL,
    operation     text        NOT NULL, -- insert | update | delete
    value         jsonb,
    old_value     jsonb,
    txid          bigint      NOT NULL DEFAULT txid_current(),
    committed_at  timestamptz
);
CREATE INDEX IF NOT EXISTS dsgw_outbox_commit_seq ON dsgw_outbox (commit_seq);
CREATE INDEX IF NOT EXISTS dsgw_outbox_unnumbered ON dsgw_outbox (txid) WHERE commit_seq IS NULL;
CREATE SEQUENCE IF NOT EXISTS dsgw_outbox_commit_seq_seq;

-- Per stream: the last commit_seq appended (the worker's checkpoint).
CREATE TABLE IF NOT EXISTS dsgw_source_progress (
    stream      text PRIMARY KEY,
    last_seq    bigint NOT NULL
);

-- Which tables are published to which stream (`dsgw publish`).
CREATE TABLE IF NOT EXISTS dsgw_publications (
    table_name  text PRIMARY KEY,       -- schema-qualified
    stream      text NOT NULL,
    key_columns text[] NOT NULL
);

-- Row trigger: TG_ARGV[0] = stream, TG_ARGV[1] = type (the table as published),
-- TG_ARGV[2..] = primary key columns.
CREATE OR REPLACE FUNCTION dsgw_capture() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    rec       jsonb;
    key_parts text[];
    col       text;
    i         int;
BEGIN
    IF TG_OP = 'DELETE' THEN
        rec := to_jsonb(OLD);
    ELSE
        rec := to_jsonb(NEW);
    END IF;
    FOR i IN 2 .. TG_NARGS - 1 LOOP
        col := TG_ARGV[i];
        key_parts := key_parts || (rec ->> col);
    END LOOP;
    INSERT INTO dsgw_outbox (stream, table_name, row_key, operation, value, old_value)
    VALUES (
        TG_ARGV[0],
        TG_ARGV[1],
        -- One key column: its text. Several: a JSON array of their texts (unambiguous).
        CASE WHEN TG_NARGS = 3 THEN key_parts[1] ELSE to_jsonb(key_parts)::text END,
        lower(TG_OP),
        CASE WHEN TG_OP = 'DELETE' THEN NULL ELSE rec END,
        CASE WHEN TG_OP = 'INSERT' THEN NULL ELSE to_jsonb(OLD) END
    );
    RETURN NULL;
END $$;

-- Deferred constraint trigger on the outbox: number this transaction's rows at commit.
CREATE OR REPLACE FUNCTION dsgw_number_at_commit() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    -- Fires once per outbox row; only the first call in a transaction has work.
    IF EXISTS (SELECT 1 FROM dsgw_outbox WHERE txid = txid_current() AND commit_seq IS NULL) THEN
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

DROP TRIGGER IF EXISTS dsgw_outbox_number ON dsgw_outbox;
CREATE CONSTRAINT TRIGGER dsgw_outbox_number
    AFTER INSERT ON dsgw_outbox
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION dsgw_number_at_commit();
