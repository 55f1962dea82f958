//! `extractor setup`: prepares the source for the configured tables and capture mode,
//! idempotently, and says what it did. Timestamp mode: the tombstone and truncation tables
//! and the trigger functions, then per table the change-time trigger, the delete triggers, the
//! key-change triggers and the (statement-level) truncate trigger. Logical mode: `REPLICA
//! IDENTITY FULL` per table, the publication and the slot. A normal start checks the same
//! things and names `extractor setup` when one is missing.

use crate::db::ctx;
use crate::error::{Error, Result};
use crate::table::TableSpec;
use tokio_postgres::Client;

/// The tombstone and truncation tables and the trigger functions timestamp capture needs:
/// the demo's `init-scripts/00-cdc-capture.sql`, the one source of them.
const TIMESTAMP_OBJECTS: &str = include_str!("../../../../init-scripts/00-cdc-capture.sql");

/// The event trigger that dates a schema change at its `ALTER TABLE` (README, "Schema
/// changes"): `init-scripts/03-cdc-schema-changes.sql`, the one source of it.
const ALTER_OBJECTS: &str = include_str!("../../../../init-scripts/03-cdc-schema-changes.sql");

/// Installs (or replaces) the event trigger that records each `ALTER TABLE` of a captured
/// table at the ALTER. Creating an event trigger needs a superuser: for another role it says
/// so and what that means, and setup goes on (schema changes are then dated when capture
/// notices them, as the README says).
pub async fn schema_change_trigger(client: &Client) -> Result<String> {
    match client
        .batch_execute(&format!("SET client_min_messages = warning;\n{ALTER_OBJECTS}"))
        .await
    {
        Ok(()) => Ok(
            "event trigger cdc_schema_change (ALTER TABLE of a captured table, recorded at the ALTER)".into(),
        ),
        Err(e) if e.code().is_some_and(|c| c.code() == "42501") => Ok(
            "event trigger cdc_schema_change NOT installed: creating an event trigger needs a superuser (DB_USER is not); \
             schema changes are followed, but dated when capture notices them (logical: the table's next change; \
             timestamp: the next pass), not at the ALTER. Run `extractor setup` as a superuser once to install it"
                .into(),
        ),
        Err(e) => Err(ctx("installing the event trigger cdc_schema_change")(e)),
    }
}

/// The change-time trigger function for a column (`cdc_touch_last_updated` for the
/// default column, as in the init scripts; `cdc_touch_<column>` for another).
fn touch_function(column: &str) -> (String, String) {
    let name = if column == "last_updated" {
        "cdc_touch_last_updated".to_owned()
    } else {
        format!("cdc_touch_{column}")
    };
    let sql = format!(
        "CREATE OR REPLACE FUNCTION public.{name}() RETURNS trigger
         LANGUAGE plpgsql AS $$
         BEGIN
             PERFORM pg_current_xact_id();
             NEW.{column} := clock_timestamp();
             RETURN NEW;
         END;
         $$;"
    );
    (name, sql)
}

/// The argument of the delete triggers that fire when the deleted row's state was written by
/// the deleting transaction itself (`public.cdc_written_here(OLD.xmin)`): that state never
/// committed, so the tombstone says so and the extractor emits the delete alone.
const OWN: &str = "written_by_deleter";

/// Prepares one table for timestamp capture: per table the change-time trigger, the delete
/// and key-change triggers (each twice: for a committed deleted state, and for one the
/// deleting transaction wrote itself), the truncate trigger and the index. Returns what was
/// done.
pub async fn timestamp_table(
    client: &Client,
    spec: &TableSpec,
    change_time: &str,
) -> Result<String> {
    let has: bool = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM information_schema.columns
                            WHERE table_schema = $1 AND table_name = $2 AND column_name = $3
                              AND data_type = 'timestamp with time zone')",
            &[&spec.schema, &spec.name, &change_time],
        )
        .await
        .map_err(ctx(format!("reading the columns of {}", spec.qualified())))?
        .get(0);
    if !has {
        return Err(Error::setup(
            format!("source table {}", spec.qualified()),
            format!(
                "has no timestamptz column {change_time} (CDC_CHANGE_TIME_COLUMN) for timestamp capture: \
                 ALTER TABLE {} ADD COLUMN {change_time} timestamptz NOT NULL DEFAULT clock_timestamp(), \
                 or use CDC_CAPTURE_MODE=logical",
                spec.qualified()
            ),
        ));
    }
    let (touch, touch_sql) = touch_function(change_time);
    let t = &spec.name;
    let table = spec.qualified();
    let keys: Vec<&str> = spec.key.iter().map(|k| k.name.as_str()).collect();
    let old: Vec<String> = keys.iter().map(|k| format!("OLD.{k}")).collect();
    let new: Vec<String> = keys.iter().map(|k| format!("NEW.{k}")).collect();
    client
        .batch_execute(&format!(
            "SET client_min_messages = warning;
             {TIMESTAMP_OBJECTS}
             {touch_sql}
             CREATE OR REPLACE TRIGGER trg_{t}_last_updated BEFORE INSERT OR UPDATE ON {table}
                 FOR EACH ROW EXECUTE FUNCTION public.{touch}();
             CREATE OR REPLACE TRIGGER trg_{t}_tombstone AFTER DELETE ON {table}
                 FOR EACH ROW WHEN (NOT public.cdc_written_here(OLD.xmin))
                 EXECUTE FUNCTION public.cdc_record_delete();
             CREATE OR REPLACE TRIGGER trg_{t}_tombstone_own AFTER DELETE ON {table}
                 FOR EACH ROW WHEN (public.cdc_written_here(OLD.xmin))
                 EXECUTE FUNCTION public.cdc_record_delete('{OWN}');
             CREATE OR REPLACE TRIGGER trg_{t}_key_change AFTER UPDATE OF {key_list} ON {table}
                 FOR EACH ROW WHEN (({old}) IS DISTINCT FROM ({new}) AND NOT public.cdc_written_here(OLD.xmin))
                 EXECUTE FUNCTION public.cdc_record_delete();
             CREATE OR REPLACE TRIGGER trg_{t}_key_change_own AFTER UPDATE OF {key_list} ON {table}
                 FOR EACH ROW WHEN (({old}) IS DISTINCT FROM ({new}) AND public.cdc_written_here(OLD.xmin))
                 EXECUTE FUNCTION public.cdc_record_delete('{OWN}');
             CREATE OR REPLACE TRIGGER trg_{t}_truncate AFTER TRUNCATE ON {table}
                 FOR EACH STATEMENT EXECUTE FUNCTION public.cdc_record_truncate();
             CREATE INDEX IF NOT EXISTS idx_{t}_{change_time} ON {table} ({change_time}, {key_list});",
            key_list = keys.join(", "),
            old = old.join(", "),
            new = new.join(", "),
        ))
        .await
        .map_err(ctx(format!("installing the capture triggers on {table}")))?;
    Ok(format!(
        "{table}: triggers trg_{t}_last_updated ({change_time}), trg_{t}_tombstone(_own), trg_{t}_key_change(_own), trg_{t}_truncate; index on ({change_time}, {})",
        keys.join(", ")
    ))
}

/// Checks that a table has what timestamp capture needs; names `extractor setup` if not.
pub async fn check_timestamp_table(client: &Client, spec: &TableSpec) -> Result<()> {
    let row = client
        .query_one(
            "SELECT count(*) FILTER (WHERE p.proname LIKE 'cdc\\_touch\\_%' AND (t.tgtype & 2) <> 0),
                    least(count(*) FILTER (WHERE p.proname = 'cdc_record_delete' AND (t.tgtype & 8) <> 0
                                                AND t.tgnargs = 0 AND t.tgqual IS NOT NULL),
                          count(*) FILTER (WHERE p.proname = 'cdc_record_delete' AND (t.tgtype & 8) <> 0
                                                AND t.tgnargs = 1)),
                    count(*) FILTER (WHERE p.proname = 'cdc_record_truncate' AND (t.tgtype & 32) <> 0)
             FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid
             WHERE t.tgrelid = (quote_ident($1) || '.' || quote_ident($2))::regclass AND t.tgenabled <> 'D'",
            &[&spec.schema, &spec.name],
        )
        .await
        .map_err(ctx(format!("reading the triggers of {}", spec.qualified())))?;
    let (touch, delete, truncate): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
    let missing: Vec<&str> = [
        (touch, "its change-time trigger"),
        (
            delete,
            "its pair of delete triggers (one for rows the deleting transaction wrote itself)",
        ),
        (truncate, "its truncate trigger"),
    ]
    .into_iter()
    .filter(|(n, _)| *n == 0)
    .map(|(_, what)| what)
    .collect();
    if !missing.is_empty() {
        return Err(Error::setup(
            format!("source table {}", spec.qualified()),
            format!(
                "is not prepared for timestamp capture (missing: {}): run `extractor setup`",
                missing.join(", ")
            ),
        ));
    }
    Ok(())
}

/// Prepares one table for logical capture: `REPLICA IDENTITY FULL`. Returns what was done.
pub async fn logical_table(client: &Client, spec: &TableSpec) -> Result<String> {
    client
        .batch_execute(&format!(
            "ALTER TABLE {} REPLICA IDENTITY FULL",
            spec.qualified()
        ))
        .await
        .map_err(ctx(format!(
            "setting REPLICA IDENTITY FULL on {}",
            spec.qualified()
        )))?;
    Ok(format!("{}: REPLICA IDENTITY FULL", spec.qualified()))
}

/// Checks that a table sends full old rows (unchanged large values are taken from them).
pub async fn check_logical_table(client: &Client, spec: &TableSpec) -> Result<()> {
    let full: bool = client
        .query_one(
            "SELECT relreplident = 'f' FROM pg_class
             WHERE oid = (quote_ident($1) || '.' || quote_ident($2))::regclass",
            &[&spec.schema, &spec.name],
        )
        .await
        .map_err(ctx(format!(
            "reading the replica identity of {}",
            spec.qualified()
        )))?
        .get(0);
    if !full {
        return Err(Error::setup(
            format!("source table {}", spec.qualified()),
            "does not send full old rows (REPLICA IDENTITY FULL) for logical capture: run `extractor setup`",
        ));
    }
    Ok(())
}
