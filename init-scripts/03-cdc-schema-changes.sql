-- Dating schema changes at the ALTER (README, "Schema changes"): an event trigger on
-- ALTER TABLE that, for each captured table the statement changed, records the table's shape
-- right after the statement, inside the ALTER's transaction:
--   * timestamp mode (a table with the capture triggers of 00-cdc-capture.sql): a row of
--     cdc_alters, at the clock the change-time column uses, which the extractor reads in its
--     pass's snapshot and removes once its files are durable;
--   * logical mode (a table of a publication, wal_level = logical): a transactional WAL
--     message (prefix 'cdc_schema_change'), decoded in the ALTER's transaction, so the schema
--     event gets that transaction's commit time and its place among the changes around it.
-- Installed by `extractor setup` (creating an event trigger needs a superuser; without one
-- the extractor notices the change later, see the README). Idempotent. The function runs as
-- its owner (any role may ALTER a table), with pg_catalog first and pg_temp last in its search
-- path, so that no other role can put objects in front of the catalog.
CREATE TABLE IF NOT EXISTS public.cdc_alters (
    alter_id     BIGSERIAL   PRIMARY KEY,
    table_schema TEXT        NOT NULL,
    table_name   TEXT        NOT NULL,
    altered_at   TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    columns      JSONB       NOT NULL
);
CREATE INDEX IF NOT EXISTS idx_cdc_alters_table
    ON public.cdc_alters (table_schema, table_name, altered_at, alter_id);

CREATE OR REPLACE FUNCTION public.cdc_record_alter() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp AS $$
DECLARE
    r record;
    cols jsonb;
    timestamp_capture boolean;
    logical_capture boolean;
BEGIN
    FOR r IN SELECT DISTINCT c.oid, n.nspname::text AS s, c.relname::text AS t
             FROM pg_event_trigger_ddl_commands() d
             JOIN pg_class c ON c.oid = d.objid AND d.classid = 'pg_class'::regclass
             JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE c.relkind = 'r'
    LOOP
        timestamp_capture := to_regproc('public.cdc_record_truncate') IS NOT NULL
            AND EXISTS (SELECT 1 FROM pg_trigger g
                        WHERE g.tgrelid = r.oid AND g.tgfoid = to_regproc('public.cdc_record_truncate'));
        logical_capture := current_setting('wal_level') = 'logical'
            AND EXISTS (SELECT 1 FROM pg_publication_tables p
                        WHERE p.schemaname = r.s AND p.tablename = r.t);
        CONTINUE WHEN NOT (timestamp_capture OR logical_capture);
        -- The columns as the extractor's catalog reading describes them.
        SELECT jsonb_agg(jsonb_build_object(
                   'name', a.attname::text,
                   'type', format_type(a.atttypid, a.atttypmod),
                   'type_oid', a.atttypid::int8,
                   'type_mod', a.atttypmod,
                   'attnum', a.attnum,
                   'key', coalesce(a.attnum = ANY (i.indkey::int2[]), false),
                   'generated', CASE WHEN a.attgenerated = 's' THEN pg_get_expr(d.adbin, d.adrelid) END,
                   'existing', CASE WHEN a.atthasmissing THEN 'v'
                                    WHEN d.adbin IS NOT NULL AND a.attgenerated = '' THEN 'd'
                                    ELSE 'n' END,
                   'value', CASE WHEN a.atthasmissing THEN (a.attmissingval::text::text[])[1] END)
               ORDER BY a.attnum)
          INTO cols
          FROM pg_attribute a
          LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
          LEFT JOIN pg_index i ON i.indrelid = a.attrelid AND i.indisprimary
         WHERE a.attrelid = r.oid AND a.attnum > 0 AND NOT a.attisdropped;
        IF timestamp_capture THEN
            INSERT INTO public.cdc_alters (table_schema, table_name, columns)
            VALUES (r.s, r.t, coalesce(cols, '[]'));
        END IF;
        IF logical_capture THEN
            PERFORM pg_logical_emit_message(true, 'cdc_schema_change',
                jsonb_build_object('schema', r.s, 'table', r.t, 'columns', coalesce(cols, '[]'))::text);
        END IF;
    END LOOP;
END;
$$;

DROP EVENT TRIGGER IF EXISTS cdc_schema_change;
CREATE EVENT TRIGGER cdc_schema_change ON ddl_command_end WHEN TAG IN ('ALTER TABLE')
    EXECUTE FUNCTION public.cdc_record_alter();
