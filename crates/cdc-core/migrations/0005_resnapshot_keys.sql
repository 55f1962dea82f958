-- The keys a re-snapshot named (`extractor resnapshot`), kept from its rows until its end
-- event: there every key the history holds at the snapshot's position and the snapshot did
-- not name ends, and the snapshot's keys are forgotten.
CREATE TABLE IF NOT EXISTS public.cdc_resnapshot_keys (
    history_table TEXT        NOT NULL,
    snapshot_at   TIMESTAMPTZ NOT NULL,
    snapshot_lsn  BIGINT      NOT NULL DEFAULT 0,
    key           TEXT[]      NOT NULL,
    PRIMARY KEY (history_table, snapshot_at, snapshot_lsn, key)
);
