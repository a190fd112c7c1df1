"""Tiered history, reading side (issue 11): entries trimmed from Redis are
read back from Postgres table stream_history (history.py), and a read below
a stream's trim point becomes such a cold read, a 410 when no history
database is configured, or a 503 while it is unreachable (cold.py)."""
