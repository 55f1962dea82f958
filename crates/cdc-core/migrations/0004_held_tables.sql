-- Tables whose history stopped at a schema change it cannot hold exactly (the other tables
-- go on): their events from `line` of change-log file `batch_id` on are not applied yet, and
-- are replayed from the archive once the history can hold the change.
CREATE TABLE IF NOT EXISTS public.cdc_held_tables (
    history_table TEXT        PRIMARY KEY,
    source_table  TEXT        NOT NULL,
    batch_id      TEXT        NOT NULL,
    line          INTEGER     NOT NULL,
    changed_at    TIMESTAMPTZ,
    reason        TEXT        NOT NULL,
    held_since    TIMESTAMPTZ NOT NULL DEFAULT now(),
    checked_at    TIMESTAMPTZ NOT NULL DEFAULT now()
);
