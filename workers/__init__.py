"""Workers that keep Postgres in sync with the streams: `sink` (stream ->
session_events rows) and `source` (table changes -> stream)."""
