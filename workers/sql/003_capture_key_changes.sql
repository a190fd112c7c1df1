-- An UPDATE that changes a row's primary key is published as a delete of the
-- old key and an insert of the new one (a client keyed on the primary key
-- would otherwise keep the old key's state forever). Same arguments as before:
-- TG_ARGV[0] = stream, TG_ARGV[1] = type, TG_ARGV[2..] = primary key columns.
CREATE OR REPLACE FUNCTION dsgw_row_key(rec jsonb, args text[]) RETURNS text
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    parts text[];
    i     int;
BEGIN
    -- TG_ARGV arrives with whatever lower bound it has (0 in PL/pgSQL):
    -- the key columns are the third element on.
    FOR i IN array_lower(args, 1) + 2 .. array_upper(args, 1) LOOP
        parts := parts || (rec ->> args[i]);
    END LOOP;
    -- One key column: its text. Several: a JSON array of their texts (unambiguous).
    IF array_length(args, 1) = 3 THEN
        RETURN parts[1];
    END IF;
    RETURN to_jsonb(parts)::text;
END $$;

CREATE OR REPLACE FUNCTION dsgw_capture() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    new_rec jsonb;
    old_rec jsonb;
    new_key text;
    old_key text;
BEGIN
    IF TG_OP <> 'INSERT' THEN
        old_rec := to_jsonb(OLD);
        old_key := dsgw_row_key(old_rec, TG_ARGV);
    END IF;
    IF TG_OP <> 'DELETE' THEN
        new_rec := to_jsonb(NEW);
        new_key := dsgw_row_key(new_rec, TG_ARGV);
    END IF;
    IF TG_OP = 'UPDATE' AND new_key IS DISTINCT FROM old_key THEN
        INSERT INTO dsgw_outbox (stream, table_name, row_key, operation, value, old_value)
        VALUES (TG_ARGV[0], TG_ARGV[1], old_key, 'delete', NULL, old_rec),
               (TG_ARGV[0], TG_ARGV[1], new_key, 'insert', new_rec, NULL);
        RETURN NULL;
    END IF;
    INSERT INTO dsgw_outbox (stream, table_name, row_key, operation, value, old_value)
    VALUES (TG_ARGV[0], TG_ARGV[1], coalesce(new_key, old_key), lower(TG_OP), new_rec, old_rec);
    RETURN NULL;
END $$;
