-- Stream -> Postgres: one row per message appended to a synced JSON stream.
--
-- ds_offset is the DS offset at the END of the message (the Redis entry ID of
-- the message, as a fixed-width offset): reading the stream from a row's
-- ds_offset returns the messages after it. Offsets sort as strings.
CREATE TABLE IF NOT EXISTS session_events (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    stream_name  text        NOT NULL,
    event_key    text,                 -- payload.key, when the message is an object with one
    event_type   text,                 -- payload.type
    operation    text,                 -- payload.operation
    payload      jsonb       NOT NULL,
    ds_offset    text        NOT NULL,
    received_at  timestamptz NOT NULL, -- when Redis accepted the append (from the entry ID)
    CONSTRAINT session_events_stream_offset UNIQUE (stream_name, ds_offset)
);

-- A session's messages in order use the unique index (stream_name, ds_offset).
-- Latest state per key (presence, for example): DISTINCT ON (event_key) ... ORDER BY event_key, ds_offset DESC.
CREATE INDEX IF NOT EXISTS session_events_latest_by_key
    ON session_events (stream_name, event_type, event_key, ds_offset DESC);

-- Messages Postgres refused (for example "\u0000" inside a JSON string, which
-- jsonb cannot hold): kept byte for byte so that nothing is lost or retried forever.
CREATE TABLE IF NOT EXISTS session_events_rejected (
    stream_name  text        NOT NULL,
    ds_offset    text        NOT NULL,
    raw          bytea       NOT NULL,
    error        text        NOT NULL,
    rejected_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (stream_name, ds_offset)
);
