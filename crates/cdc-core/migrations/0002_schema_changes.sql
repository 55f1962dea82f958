-- Every schema change of a captured table the history followed, one row per change, in the
-- same transaction as the history's DDL; `columns_after` is the history's description from
-- then on (the loader starts from the newest). A `baseline` row records the description a
-- history table was first applied with.
CREATE TABLE IF NOT EXISTS public.cdc_schema_changes (
    id            BIGSERIAL   PRIMARY KEY,
    history_table TEXT        NOT NULL,
    source_table  TEXT        NOT NULL,
    kind          TEXT        NOT NULL,
    column_name   TEXT,
    new_name      TEXT,
    type_before   TEXT,
    type_after    TEXT,
    detail        TEXT,
    changed_at    TIMESTAMPTZ,
    source_lsn    PG_LSN,
    batch_id      TEXT,
    versions_added BIGINT     NOT NULL DEFAULT 0,
    columns_after JSONB       NOT NULL,
    applied_at    TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS idx_cdc_schema_changes_table
    ON public.cdc_schema_changes (history_table, id DESC);
