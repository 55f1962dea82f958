-- What timestamp capture needs in the source, for any table: the change-time trigger
-- function, the tombstone table and the delete trigger function, the truncation table and
-- the truncate trigger function. `extractor setup` applies
-- this same file (it is embedded in the binary) before it installs the triggers; the demo's
-- init scripts apply it first. Idempotent.

-- last_updated is maintained by the database on every insert and update, whatever the client
-- sends. The transaction id is taken first so that a transaction is visible as a writer in
-- pg_stat_activity.backend_xid no later than the time it stamps on its rows: the extractor
-- bounds each poll by the oldest such writer and so never skips a late-committing one.
CREATE OR REPLACE FUNCTION public.cdc_touch_last_updated() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_current_xact_id();
    NEW.last_updated := clock_timestamp();
    RETURN NEW;
END;
$$;

-- Deletes leave a tombstone with the full old row; the extractor emits them and removes
-- the ones it has written to a durable change-log file. `old_text` is the row's text form,
-- which reads back exactly for every type (the JSON copy loses -0, array bounds, duplicate
-- json keys and xml declarations); `old_row` is kept for readers of the JSON.
CREATE TABLE IF NOT EXISTS public.cdc_tombstones (
    tombstone_id  BIGSERIAL   PRIMARY KEY,
    table_schema  TEXT        NOT NULL,
    table_name    TEXT        NOT NULL,
    deleted_at    TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    old_row       JSONB       NOT NULL
);
ALTER TABLE public.cdc_tombstones ADD COLUMN IF NOT EXISTS old_text TEXT;
-- Whether the deleted row's state was written by the deleting transaction itself (it never
-- committed): the extractor then emits the delete alone, with no version for that state, so a
-- row inserted and deleted in one transaction leaves nothing, and a row that existed before,
-- was updated and deleted in one transaction keeps its old version, closed at the delete.
ALTER TABLE public.cdc_tombstones ADD COLUMN IF NOT EXISTS written_by_deleter BOOLEAN NOT NULL DEFAULT false;
CREATE INDEX IF NOT EXISTS idx_cdc_tombstones_table
    ON public.cdc_tombstones (table_schema, table_name, deleted_at, tombstone_id);

-- For `cdc_written_here` below: a row whose `xmin` is newer than the current transaction's
-- id was written by it (by a subtransaction) when its writer has not finished: a
-- row is visible to the delete only if its writer committed or is this transaction, and a
-- committed writer is older than the snapshot's xmax (`pg_xact_status` is asked only below
-- it, where it cannot fail). Volatile, so that the snapshot is taken now, after the delete.
CREATE OR REPLACE FUNCTION public.cdc_written_in_subtransaction(row_xmin xid) RETURNS boolean
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    top int8 := pg_current_xact_id()::text::int8;
    ahead int8 := (row_xmin::text::int8 - top % 4294967296 + 4294967296) % 4294967296;
    full_xid xid8;
BEGIN
    IF ahead = 0 THEN
        RETURN true;
    ELSIF ahead >= 2147483648 THEN
        RETURN false;
    END IF;
    full_xid := (top + ahead)::text::xid8;
    IF full_xid >= pg_snapshot_xmax(pg_current_snapshot()) THEN
        RETURN true;
    END IF;
    RETURN coalesce(pg_xact_status(full_xid) = 'in progress', false);
END;
$$;

-- Whether a row whose `xmin` is `row_xmin` was written by the current transaction (or one
-- of its subtransactions), for the delete triggers' WHEN conditions (a trigger function cannot
-- read OLD.xmin, a WHEN condition can). A plain SQL expression, which PostgreSQL inlines into
-- the WHEN condition, answers the common cases: `age()` > 0 is a writer older than this
-- transaction (so not this transaction: its subtransactions' ids are newer than its own), the
-- transaction's own id is this transaction. Only a newer id asks the function above.
CREATE OR REPLACE FUNCTION public.cdc_written_here(row_xmin xid) RETURNS boolean
LANGUAGE sql VOLATILE AS $$
    SELECT age(row_xmin) <= 0
       AND (row_xmin = pg_current_xact_id()::xid OR public.cdc_written_in_subtransaction(row_xmin))
$$;

-- The text form is written with the extractor's date and interval styles, whatever the
-- deleting session uses, so that it reads back to the same values (restored on return).
-- The trigger's argument `written_by_deleter` says the deleted state is the deleting
-- transaction's own (`extractor setup` installs one trigger for each case).
CREATE OR REPLACE FUNCTION public.cdc_record_delete() RETURNS trigger
LANGUAGE plpgsql SET datestyle = 'ISO, MDY' SET intervalstyle = 'postgres'
    SET extra_float_digits = 3 AS $$
BEGIN
    INSERT INTO public.cdc_tombstones (table_schema, table_name, old_row, old_text, written_by_deleter)
    VALUES (TG_TABLE_SCHEMA, TG_TABLE_NAME, to_jsonb(OLD), OLD::text,
            TG_NARGS > 0 AND TG_ARGV[0] = 'written_by_deleter');
    RETURN OLD;
END;
$$;

-- TRUNCATE fires no row trigger: a statement-level trigger records each truncate of a
-- captured table here, at the same clock the change-time column uses (taken once the
-- TRUNCATE holds its lock, so after every change before it and before every change after
-- it). The extractor reads it in the pass's snapshot, writes a truncate event and removes
-- the record once the event is durable.
CREATE TABLE IF NOT EXISTS public.cdc_truncations (
    truncation_id BIGSERIAL   PRIMARY KEY,
    table_schema  TEXT        NOT NULL,
    table_name    TEXT        NOT NULL,
    truncated_at  TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX IF NOT EXISTS idx_cdc_truncations_table
    ON public.cdc_truncations (table_schema, table_name, truncated_at, truncation_id);

CREATE OR REPLACE FUNCTION public.cdc_record_truncate() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO public.cdc_truncations (table_schema, table_name)
    VALUES (TG_TABLE_SCHEMA, TG_TABLE_NAME);
    RETURN NULL;
END;
$$;
