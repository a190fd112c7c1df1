-- Tiered history: the cold tier of every stream whose Redis entries may be
-- trimmed (DSGW_RETAIN_MESSAGES / DSGW_RETAIN_SECONDS).
--
-- One row per Redis data-stream entry (= per message), any content type:
--   ds_offset  the entry's DS offset, formatted exactly like
--              session_events.ds_offset (gateway/offsets.py), so offsets sort
--              as strings and a cold read is a range scan of the primary key;
--   more       the entry's `more` field (how many messages of the same append
--              follow it; 0 for the last one), so a cold read never cuts an
--              append either;
--   data       the payload bytes exactly as stored in Redis. JSON streams are
--              here too: session_events.payload (jsonb) cannot give back the
--              client's bytes (key order, whitespace, duplicate keys, and the
--              rows Postgres refused), and a cold read must be byte-identical
--              to a hot one.
-- The sink writes these rows in the same transaction as the session_events
-- rows (ON CONFLICT DO NOTHING), so "committed" means both. Redis only trims
-- an entry once it is committed (meta `trim` <= `synced`).
CREATE TABLE IF NOT EXISTS stream_history (
    stream_name  text    NOT NULL,
    ds_offset    text    NOT NULL,
    more         integer NOT NULL DEFAULT 0,
    data         bytea   NOT NULL,
    PRIMARY KEY (stream_name, ds_offset)
);
