-- Run history of every binary, and the set of change-log files applied to the warehouse.
CREATE TABLE IF NOT EXISTS public.pipeline_metadata (
    id                BIGSERIAL   PRIMARY KEY,
    pipeline_name     TEXT        NOT NULL,
    run_id            TEXT        NOT NULL,
    start_time        TIMESTAMPTZ NOT NULL,
    end_time          TIMESTAMPTZ,
    status            TEXT        NOT NULL,
    records_processed BIGINT      NOT NULL DEFAULT 0,
    records_inserted  BIGINT      NOT NULL DEFAULT 0,
    records_updated   BIGINT      NOT NULL DEFAULT 0,
    records_deleted   BIGINT      NOT NULL DEFAULT 0,
    error_message     TEXT,
    metrics           JSONB       NOT NULL DEFAULT '{}'::jsonb,
    created_at        TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS idx_pipeline_metadata_name_start
    ON public.pipeline_metadata (pipeline_name, start_time DESC);

-- One row per applied change-log file, written in the same transaction as its history rows:
-- a file listed here is never applied again.
CREATE TABLE IF NOT EXISTS public.cdc_applied_batches (
    batch_id          TEXT        PRIMARY KEY,
    history_table     TEXT        NOT NULL,
    events            BIGINT      NOT NULL,
    versions_inserted BIGINT      NOT NULL,
    versions_closed   BIGINT      NOT NULL,
    first_change_at   TIMESTAMPTZ,
    last_change_at    TIMESTAMPTZ,
    run_id            TEXT        NOT NULL,
    applied_at        TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS idx_cdc_applied_batches_applied_at
    ON public.cdc_applied_batches (applied_at DESC);
