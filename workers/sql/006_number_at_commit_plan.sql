-- The commit-time numbering (dsgw_number_at_commit, 004) joins the
-- transaction's outbox rows to themselves. When autovacuum has analyzed
-- dsgw_outbox while it was empty (the worker drains it, so it often is), the
-- planner believes one row is there and picks a nested loop that rescans the
-- transaction's rows for each of them: a 20,000-row transaction then spends
-- minutes of CPU in its commit (seen in CI). The function never wants a nested
-- loop for that join, whatever the statistics say: hash or merge, both linear.
ALTER FUNCTION dsgw_number_at_commit() SET enable_nestloop = off;
