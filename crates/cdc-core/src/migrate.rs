//! Warehouse schema: numbered SQL migrations and the history table of the configured source
//! table, applied at start-up in one transaction under an advisory lock, recorded in
//! `cdc_schema_migrations`. Idempotent; safe when several binaries start at once.

use crate::db::ctx;
use crate::error::{Error, Result};
use crate::table::{substitute_columns, Column, TableSpec};
use tokio_postgres::Client;

const LOCK_KEY: i64 = 0x0cdc_0001;

const MIGRATIONS: &[(i32, &str, &str)] = &[
    (
        1,
        "runs_and_batches",
        include_str!("../migrations/0001_runs_and_batches.sql"),
    ),
    (
        2,
        "schema_changes",
        include_str!("../migrations/0002_schema_changes.sql"),
    ),
    (
        3,
        "pending_deletes",
        include_str!("../migrations/0003_pending_deletes.sql"),
    ),
    (
        4,
        "held_tables",
        include_str!("../migrations/0004_held_tables.sql"),
    ),
    (
        5,
        "resnapshot_keys",
        include_str!("../migrations/0005_resnapshot_keys.sql"),
    ),
];

/// Brings the warehouse schema up to date for `spec` (the source's description of a table).
/// Returns the description the history has: the columns recorded by the last schema change
/// it followed (`cdc_schema_changes`), which the change log has not necessarily reached in
/// the source yet; the first time, the source's, recorded as the baseline.
pub async fn migrate(client: &mut Client, spec: &TableSpec) -> Result<TableSpec> {
    let tx = client
        .transaction()
        .await
        .map_err(ctx("starting the migration transaction"))?;
    apply_migrations(&tx).await?;
    let spec = &crate::scd2::schema::current(&tx, spec).await?;
    create_types(&tx, &spec.types).await?;
    tx.batch_execute(&history_ddl(spec))
        .await
        .map_err(ctx(format!(
            "creating history table {}",
            spec.history_qualified()
        )))?;
    check_history_columns(&tx, spec).await?;
    make_generated_columns(&tx, spec).await?;
    add_truncated_column(&tx, spec).await?;
    tx.commit().await.map_err(ctx("committing migrations"))?;
    Ok(spec.clone())
}

/// Brings the warehouse's own tables up to date (no history table).
pub async fn migrations(client: &mut Client) -> Result<()> {
    let tx = client
        .transaction()
        .await
        .map_err(ctx("starting the migration transaction"))?;
    apply_migrations(&tx).await?;
    tx.commit().await.map_err(ctx("committing migrations"))
}

/// The numbered migrations not applied yet, under the migration lock (held to the end of
/// the transaction).
async fn apply_migrations(tx: &tokio_postgres::Transaction<'_>) -> Result<()> {
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&LOCK_KEY])
        .await
        .map_err(ctx("taking the migration lock"))?;
    tx.batch_execute(
        "SET LOCAL client_min_messages = warning;
         CREATE TABLE IF NOT EXISTS public.cdc_schema_migrations (
             version    INTEGER     PRIMARY KEY,
             name       TEXT        NOT NULL,
             applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
         )",
    )
    .await
    .map_err(ctx("creating cdc_schema_migrations"))?;
    let applied: Vec<i32> = tx
        .query("SELECT version FROM public.cdc_schema_migrations", &[])
        .await
        .map_err(ctx("reading cdc_schema_migrations"))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    for (version, name, sql) in MIGRATIONS {
        if applied.contains(version) {
            continue;
        }
        tx.batch_execute(sql)
            .await
            .map_err(ctx(format!("applying migration {version} ({name})")))?;
        tx.execute(
            "INSERT INTO public.cdc_schema_migrations (version, name) VALUES ($1, $2)",
            &[version, name],
        )
        .await
        .map_err(ctx("recording a migration"))?;
        tracing::info!(version, name, "applied warehouse migration");
    }
    Ok(())
}

/// Refuses a history table that is missing or empty while `cdc_applied_batches` records
/// files that added versions to it (dropped or emptied by hand): creating it again empty
/// would leave it without those changes for good.
pub async fn refuse_lost_history(client: &Client, spec: &TableSpec) -> Result<()> {
    let h = spec.history_qualified();
    let row = client
        .query_one(
            "SELECT to_regclass($1) IS NOT NULL, to_regclass('public.cdc_applied_batches') IS NOT NULL",
            &[&h],
        )
        .await
        .map_err(ctx(format!("looking up {h}")))?;
    let (exists, recorded): (bool, bool) = (row.get(0), row.get(1));
    if !recorded {
        return Ok(());
    }
    let applied: i64 = client
        .query_one(
            "SELECT count(*) FROM public.cdc_applied_batches
             WHERE $1 = ANY(string_to_array(history_table, ', ')) AND versions_inserted > 0",
            &[&h],
        )
        .await
        .map_err(ctx("reading cdc_applied_batches"))?
        .get(0);
    if applied == 0 {
        return Ok(());
    }
    let state = if !exists {
        "is missing"
    } else {
        let empty: bool = client
            .query_one(&format!("SELECT NOT EXISTS (SELECT 1 FROM {h})"), &[])
            .await
            .map_err(ctx(format!("reading {h}")))?
            .get(0);
        if !empty {
            return Ok(());
        }
        "is empty"
    };
    Err(Error::setup(
        format!("history table {h}"),
        format!(
            "{state} while cdc_applied_batches records {applied} change-log file(s) that added versions to it; \
             applying on would leave it without them for good. Rebuild it from the kept change logs: \
             `scd2-loader rebuild {t} --replace`; if processed/ no longer holds them all, follow it with \
             `extractor resnapshot {t}`, which versions every row the rebuild lacks and ends the keys the source \
             no longer has",
            t = spec.qualified()
        ),
    ))
}

/// Creates in the warehouse each user-defined type the table's columns need that it lacks,
/// with the source's definition.
pub(crate) async fn create_types(
    tx: &tokio_postgres::Transaction<'_>,
    types: &[crate::table::TypeDef],
) -> Result<()> {
    for t in types {
        let missing: bool = tx
            .query_one("SELECT to_regtype($1) IS NULL", &[&t.name])
            .await
            .map_err(ctx(format!("looking up type {} in the warehouse", t.name)))?
            .get(0);
        if missing {
            tx.batch_execute(&format!(
                "CREATE SCHEMA IF NOT EXISTS {}; {}",
                crate::table::quote_ident(&t.schema),
                t.ddl
            ))
            .await
            .map_err(ctx(format!("creating type {} in the warehouse", t.name)))?;
            tracing::info!(r#type = %t.name, "created a type of the source in the warehouse");
        }
    }
    Ok(())
}

/// Brings the warehouse's copies of the source's enums and domains (`types`) up to date
/// with `source`: a label the source's enum gained is added at its place in the source's
/// order; a domain's CHECK constraint or NOT NULL the source no longer has is dropped (the
/// history keeps what the old definition allowed and takes what the new one allows: it
/// never refuses a value the source holds). Each change commits on its own (an enum's new
/// label is usable only once its statement has committed). Returns the changes made.
pub async fn sync_types(
    warehouse: &Client,
    source: &Client,
    types: &[crate::table::TypeDef],
) -> Result<Vec<String>> {
    let mut done = Vec::new();
    for t in types {
        if t.ddl.starts_with("CREATE TYPE") && t.ddl.contains(" AS ENUM (") {
            let want = enum_labels(source, &t.name).await.map_err(ctx(format!(
                "reading the labels of enum {} in the source",
                t.name
            )))?;
            let mut have = enum_labels(warehouse, &t.name).await.map_err(ctx(format!(
                "reading the labels of enum {} in the warehouse",
                t.name
            )))?;
            if have.is_empty() {
                continue;
            }
            for (i, label) in want.iter().enumerate() {
                if have.contains(label) {
                    continue;
                }
                // After the nearest earlier label the warehouse has, else before the first.
                let place = match want[..i].iter().rev().find(|l| have.contains(l)) {
                    Some(prev) => format!("AFTER {}", quote_literal(prev)),
                    None => format!("BEFORE {}", quote_literal(&have[0])),
                };
                let sql = format!(
                    "ALTER TYPE {} ADD VALUE IF NOT EXISTS {} {place}",
                    t.name,
                    quote_literal(label)
                );
                warehouse
                    .batch_execute(&sql)
                    .await
                    .map_err(ctx(format!("adding label {label} to enum {}", t.name)))?;
                tracing::info!(r#type = %t.name, label = %label, "the source's enum gained a label; added it in the warehouse");
                done.push(format!("enum {} gained label {label}", t.name));
                have.push(label.clone());
            }
        } else if t.ddl.starts_with("CREATE DOMAIN") {
            let (src_notnull, src_checks) = domain_checks(source, &t.name)
                .await
                .map_err(ctx(format!("reading domain {} in the source", t.name)))?;
            let (wh_notnull, wh_checks) = domain_checks(warehouse, &t.name)
                .await
                .map_err(ctx(format!("reading domain {} in the warehouse", t.name)))?;
            if wh_notnull && !src_notnull {
                warehouse
                    .batch_execute(&format!("ALTER DOMAIN {} DROP NOT NULL", t.name))
                    .await
                    .map_err(ctx(format!("dropping NOT NULL of domain {}", t.name)))?;
                done.push(format!("domain {} dropped NOT NULL", t.name));
            }
            for (name, def) in wh_checks {
                if src_checks.iter().any(|(_, d)| *d == def) {
                    continue;
                }
                warehouse
                    .batch_execute(&format!(
                        "ALTER DOMAIN {} DROP CONSTRAINT {}",
                        t.name,
                        crate::table::quote_ident(&name)
                    ))
                    .await
                    .map_err(ctx(format!(
                        "dropping constraint {name} of domain {}",
                        t.name
                    )))?;
                tracing::info!(r#type = %t.name, constraint = %name, "the source's domain no longer has this check; dropped it in the warehouse");
                done.push(format!("domain {} dropped {name} ({def})", t.name));
            }
        }
    }
    Ok(done)
}

/// The labels of enum `name`, in their order.
async fn enum_labels(
    c: &Client,
    name: &str,
) -> std::result::Result<Vec<String>, tokio_postgres::Error> {
    Ok(c.query(
        "SELECT e.enumlabel::text FROM pg_enum e
             WHERE e.enumtypid = to_regtype($1) ORDER BY e.enumsortorder",
        &[&name],
    )
    .await?
    .iter()
    .map(|r| r.get(0))
    .collect())
}

/// Whether domain `name` is NOT NULL, and its CHECK constraints (name, definition).
async fn domain_checks(
    c: &Client,
    name: &str,
) -> std::result::Result<(bool, Vec<(String, String)>), tokio_postgres::Error> {
    let notnull = c
        .query_opt(
            "SELECT typnotnull FROM pg_type WHERE oid = to_regtype($1)",
            &[&name],
        )
        .await?
        .is_some_and(|r| r.get::<_, bool>(0));
    let checks = c
        .query(
            "SELECT conname::text, pg_get_constraintdef(oid) FROM pg_constraint
             WHERE contypid = to_regtype($1) AND contype = 'c'",
            &[&name],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    Ok((notnull, checks))
}

/// `s` as an SQL string literal.
fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// DDL of the history table: the key and tracked columns typed as in the source, the SCD2
/// columns, and the indexes the invariants and queries need (see README, "Indexes").
pub fn history_ddl(spec: &TableSpec) -> String {
    let t = &spec.history_table;
    let hist = spec.history_qualified();
    let key = spec.history_key_list("");
    let key_cols: String = spec
        .key
        .iter()
        .zip(&spec.history_key_columns)
        .map(|(k, h)| format!("    {h} {} NOT NULL,\n", k.sql_type))
        .collect();
    let cols: String = spec
        .columns
        .iter()
        .map(|c| format!("    {} {},\n", spec.history_column(c), column_type(spec, c)))
        .collect();
    format!(
        "CREATE SCHEMA IF NOT EXISTS {schema};
CREATE TABLE IF NOT EXISTS {hist} (
    surrogate_key BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
{key_cols}{cols}    valid_from    TIMESTAMPTZ NOT NULL,
    valid_to      TIMESTAMPTZ,
    is_current    BOOLEAN     NOT NULL,
    is_deleted    BOOLEAN     NOT NULL DEFAULT false,
    is_truncated  BOOLEAN     NOT NULL DEFAULT false,
    cdc_operation CHAR(1)     NOT NULL,
    cdc_timestamp TIMESTAMPTZ NOT NULL,
    batch_id      TEXT        NOT NULL,
    source_lsn    PG_LSN,
    source_txid   BIGINT,
    end_lsn       PG_LSN,
    row_hash      UUID        NOT NULL,
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT {t}_no_empty_version CHECK (valid_to IS NULL OR valid_to > valid_from),
    CONSTRAINT {t}_current_is_open CHECK (is_current = (valid_to IS NULL)),
    CONSTRAINT {t}_deleted_is_closed CHECK (NOT is_deleted OR valid_to IS NOT NULL),
    CONSTRAINT {t}_truncated_is_deleted CHECK (NOT is_truncated OR is_deleted)
);
CREATE UNIQUE INDEX IF NOT EXISTS {t}_one_current
    ON {hist} ({key}) WHERE is_current;
CREATE UNIQUE INDEX IF NOT EXISTS {t}_key_position
    ON {hist} ({key}, valid_from, source_lsn) NULLS NOT DISTINCT;
",
        schema = spec.history_schema,
    )
}

/// A tracked column's type in the history table: generated columns are generated there too,
/// from the same expression over the history's columns (logical replication does not send
/// them, and the loader's COPY leaves them to PostgreSQL).
pub(crate) fn column_type(spec: &TableSpec, c: &Column) -> String {
    match &c.generated {
        Some(expr) => format!(
            "{} GENERATED ALWAYS AS (({})::{}) STORED",
            c.sql_type,
            substitute_columns(expr, spec, |i| spec.history_column(&spec.columns[i])),
            c.sql_type
        ),
        None => c.sql_type.clone(),
    }
}

/// Makes the generated columns of a history table created by an older version generated
/// (their stored values are the expression's by definition, so nothing changes).
async fn make_generated_columns(
    tx: &tokio_postgres::Transaction<'_>,
    spec: &TableSpec,
) -> Result<()> {
    for c in spec.columns.iter().filter(|c| c.generated.is_some()) {
        let name = spec.history_column(c);
        let plain: bool = tx
            .query_opt(
                "SELECT 1 FROM information_schema.columns
                 WHERE table_schema = $1 AND table_name = $2 AND column_name = $3 AND is_generated = 'NEVER'",
                &[&spec.history_schema, &spec.history_table, &name],
            )
            .await
            .map_err(ctx("reading the history table's columns"))?
            .is_some();
        if plain {
            tx.batch_execute(&format!(
                "ALTER TABLE {h} DROP COLUMN {name}, ADD COLUMN {name} {t}",
                h = spec.history_qualified(),
                t = column_type(spec, c)
            ))
            .await
            .map_err(ctx(format!("making {name} a generated column")))?;
            tracing::info!(column = %name, "history column is now generated");
        }
    }
    Ok(())
}

/// Gives a history table created before truncates were captured its `is_truncated` column
/// (false for every existing version: none was ended by a captured truncate), in place: a
/// column with a constant default and a constraint `NOT VALID` (checked for new rows; the
/// existing ones hold it by the default) need no rewrite or scan of the table.
async fn add_truncated_column(
    tx: &tokio_postgres::Transaction<'_>,
    spec: &TableSpec,
) -> Result<()> {
    let missing = tx
        .query_opt(
            "SELECT 1 FROM information_schema.columns
             WHERE table_schema = $1 AND table_name = $2 AND column_name = 'is_truncated'",
            &[&spec.history_schema, &spec.history_table],
        )
        .await
        .map_err(ctx("reading the history table's columns"))?
        .is_none();
    if missing {
        tx.batch_execute(&format!(
            "ALTER TABLE {h} ADD COLUMN is_truncated BOOLEAN NOT NULL DEFAULT false,
                 ADD CONSTRAINT {t}_truncated_is_deleted CHECK (NOT is_truncated OR is_deleted) NOT VALID",
            h = spec.history_qualified(),
            t = spec.history_table,
        ))
        .await
        .map_err(ctx(format!(
            "adding is_truncated to {}",
            spec.history_qualified()
        )))?;
        tracing::info!(table = %spec.history_qualified(), "history table has the is_truncated column now");
    }
    Ok(())
}

/// A history table created by an older description must still have every tracked column.
async fn check_history_columns(
    tx: &tokio_postgres::Transaction<'_>,
    spec: &TableSpec,
) -> Result<()> {
    let rows = tx
        .query(
            "SELECT column_name::text FROM information_schema.columns
             WHERE table_schema = $1 AND table_name = $2",
            &[&spec.history_schema, &spec.history_table],
        )
        .await
        .map_err(ctx("reading the history table's columns"))?;
    let have: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    let missing: Vec<String> = spec
        .columns
        .iter()
        .map(|c| spec.history_column(c))
        .chain(spec.history_key_columns.iter().cloned())
        .filter(|c| !have.contains(c))
        .collect();
    if !missing.is_empty() {
        return Err(Error::setup(
            format!("history table {}", spec.history_qualified()),
            format!(
                "exists without column(s) {}; it was created for another table description",
                missing.join(", ")
            ),
        ));
    }
    Ok(())
}
