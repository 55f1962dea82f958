-- Deletes of keys the history held nothing of before them (their versions are in a file not
-- applied yet: quarantined, or late): kept until a version of the key they end arrives.
CREATE TABLE IF NOT EXISTS public.cdc_pending_deletes (
    history_table TEXT        NOT NULL,
    key           TEXT        NOT NULL,
    deleted_at    TIMESTAMPTZ NOT NULL,
    lsn           BIGINT      NOT NULL DEFAULT 0,
    batch_id      TEXT        NOT NULL,
    PRIMARY KEY (history_table, key, deleted_at, lsn)
);
