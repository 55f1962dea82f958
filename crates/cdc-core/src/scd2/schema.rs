//! The history's side of schema changes (see `crate::schema_change`): the description a
//! history table has (the columns recorded with the last change it followed in
//! `cdc_schema_changes`), how a schema event changes that description (`follow`, pure), and
//! following it in PostgreSQL (`apply`: the DDL, the versions a filled column adds, the
//! record), all in the apply's transaction.

use crate::db::ctx;
use crate::error::{Error, Result};
use crate::event::DecodedEvent;
use crate::schema_change::{widens, Change, Existing, SchemaEvent};
use crate::table::{Column, TableSpec};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio_postgres::Transaction;

/// A column of a history's description as `cdc_schema_changes.columns_after` records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Recorded {
    name: String,
    #[serde(rename = "type")]
    sql_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    generated: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    key: bool,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    dropped: bool,
}

fn recorded(spec: &TableSpec) -> serde_json::Value {
    let col = |c: &Column, key: bool| Recorded {
        name: c.name.clone(),
        sql_type: c.sql_type.clone(),
        generated: c.generated.clone(),
        key,
        dropped: c.dropped,
    };
    let cols: Vec<Recorded> = spec
        .key
        .iter()
        .map(|c| col(c, true))
        .chain(spec.columns.iter().map(|c| col(c, false)))
        .collect();
    serde_json::to_value(cols).unwrap_or_default()
}

/// The description the history of `source` (the source's description) has: the columns
/// recorded with the last schema change it followed; the first time, the source's, recorded
/// as the baseline.
pub async fn current(tx: &Transaction<'_>, source: &TableSpec) -> Result<TableSpec> {
    let h = source.history_qualified();
    let row = tx
        .query_opt(
            "SELECT columns_after FROM public.cdc_schema_changes WHERE history_table = $1 ORDER BY id DESC LIMIT 1",
            &[&h],
        )
        .await
        .map_err(ctx("reading cdc_schema_changes"))?;
    let Some(row) = row else {
        tx.execute(
            "INSERT INTO public.cdc_schema_changes (history_table, source_table, kind, columns_after)
             VALUES ($1, $2, 'baseline', $3)",
            &[&h, &source.qualified(), &recorded(source)],
        )
        .await
        .map_err(ctx("recording the history's baseline in cdc_schema_changes"))?;
        return Ok(source.clone());
    };
    from_recorded(source, row.get(0))
}

/// The description the history of `source` started with (its `baseline` row), if recorded.
pub async fn baseline(
    client: &impl tokio_postgres::GenericClient,
    source: &TableSpec,
) -> Result<Option<TableSpec>> {
    let row = client
        .query_opt(
            "SELECT columns_after FROM public.cdc_schema_changes
             WHERE history_table = $1 AND kind = 'baseline' ORDER BY id LIMIT 1",
            &[&source.history_qualified()],
        )
        .await
        .map_err(ctx("reading cdc_schema_changes"))?;
    row.map(|r| from_recorded(source, r.get(0))).transpose()
}

/// `source` with the columns of a `columns_after` record.
fn from_recorded(source: &TableSpec, json: serde_json::Value) -> Result<TableSpec> {
    let h = source.history_qualified();
    let cols: Vec<Recorded> = serde_json::from_value(json).map_err(|e| {
        Error::setup(
            format!("cdc_schema_changes of {h}"),
            format!("its columns_after cannot be read: {e}"),
        )
    })?;
    let mut spec = source.clone();
    let to_column = |r: &Recorded| {
        // Positions and type OIDs are the source's, which the history does not need.
        let mut c = source
            .key
            .iter()
            .chain(&source.columns)
            .find(|s| s.name == r.name)
            .cloned()
            .unwrap_or_else(|| Column::new(&r.name, &r.sql_type));
        c.sql_type = r.sql_type.clone();
        c.generated = r.generated.clone();
        c.dropped = r.dropped;
        c
    };
    spec.key = cols.iter().filter(|c| c.key).map(to_column).collect();
    spec.columns = cols.iter().filter(|c| !c.key).map(to_column).collect();
    if spec.key.len() != source.history_key_columns.len() {
        return Err(Error::setup(
            format!("history table {h}"),
            format!(
                "cdc_schema_changes records a key of {} column(s), the source's has {}",
                spec.key.len(),
                source.history_key_columns.len()
            ),
        ));
    }
    Ok(spec)
}

/// The history's description after a schema event. Only the description: whether the
/// history can follow is `apply`'s to say.
pub fn follow(spec: &TableSpec, ev: &SchemaEvent) -> std::result::Result<TableSpec, String> {
    let mut s = spec.clone();
    if followed(spec, ev) {
        return Ok(s);
    }
    let live = |s: &mut TableSpec, name: &str| -> std::result::Result<usize, String> {
        s.columns
            .iter()
            .position(|c| c.name == name && !c.dropped)
            .ok_or_else(|| format!("names column {name}, which the history does not track"))
    };
    for ch in &ev.changes {
        match ch {
            Change::RenameColumn { column, new_name } => {
                if let Some(k) = s.key.iter_mut().find(|k| k.name == *column) {
                    k.name = new_name.clone();
                } else {
                    let i = live(&mut s, column)?;
                    s.columns[i].name = new_name.clone();
                }
            }
            Change::AlterType {
                column, type_after, ..
            } => {
                if let Some(k) = s.key.iter_mut().find(|k| k.name == *column) {
                    k.sql_type = type_after.clone();
                } else {
                    let i = live(&mut s, column)?;
                    s.columns[i].sql_type = type_after.clone();
                }
            }
            Change::AlterGenerated { column, after, .. } => {
                let i = live(&mut s, column)?;
                s.columns[i].generated = after.clone();
            }
            Change::DropColumn { column } => {
                if s.key.iter().all(|k| k.name != *column) {
                    let i = live(&mut s, column)?;
                    s.columns[i].dropped = true;
                }
            }
            Change::AddColumn {
                column,
                sql_type,
                generated,
                ..
            } => {
                if s.columns.iter().any(|c| c.name == *column && !c.dropped) {
                    return Err(format!(
                        "adds column {column}, which the history already tracks"
                    ));
                }
                match s.columns.iter_mut().find(|c| c.name == *column) {
                    // Dropped once, added again: the history's column again.
                    Some(c) => {
                        c.dropped = false;
                        c.sql_type = sql_type.clone();
                        c.generated = generated.clone();
                    }
                    None => {
                        let mut c = Column::new(column, sql_type);
                        c.generated = generated.clone();
                        s.columns.push(c);
                    }
                }
            }
            Change::AlterKey { .. } => {}
        }
    }
    // Generated expressions as the source now spells them (a rename rewrites them).
    for c in s.columns.iter_mut().filter(|c| !c.dropped) {
        if let Some(after) = ev.columns.iter().find(|a| a.name == c.name) {
            c.generated = after.generated.clone();
        }
    }
    for t in &ev.types {
        if !s.types.contains(t) {
            s.types.push(t.clone());
        }
    }
    Ok(s)
}

/// Whether the history already has the shape a schema event leads to (the same event
/// written again by an extractor that stopped before recording it): then it changes nothing.
fn followed(spec: &TableSpec, ev: &SchemaEvent) -> bool {
    let mut have: Vec<(&str, &str, Option<&str>, bool)> = spec
        .key
        .iter()
        .map(|c| (c, true))
        .chain(
            spec.columns
                .iter()
                .filter(|c| !c.dropped)
                .map(|c| (c, false)),
        )
        .map(|(c, key)| {
            (
                c.name.as_str(),
                c.sql_type.as_str(),
                c.generated.as_deref(),
                key,
            )
        })
        .collect();
    let mut want: Vec<(&str, &str, Option<&str>, bool)> = ev
        .columns
        .iter()
        .map(|c| {
            (
                c.name.as_str(),
                c.sql_type.as_str(),
                c.generated.as_deref(),
                c.key,
            )
        })
        .collect();
    have.sort();
    want.sort();
    have == want
}

/// Follows schema event `ev` (read from change-log file `batch`) in the history of `old`,
/// whose description becomes `new` (`follow`): the DDL, the versions a column added with a
/// value for the existing rows adds, one `cdc_schema_changes` row per change. A change the
/// history cannot hold exactly is `Error::SchemaChange`. Returns the versions added.
pub async fn apply(
    tx: &Transaction<'_>,
    old: &TableSpec,
    new: &TableSpec,
    ev: &DecodedEvent,
    batch: &str,
) -> Result<u64> {
    let Some(change) = ev.schema.as_deref().filter(|c| !followed(old, c)) else {
        return Ok(0);
    };
    let h = new.history_qualified();
    let at = DateTime::<Utc>::from_timestamp_micros(ev.ts_us).unwrap_or_default();
    let stop = |ch: &Change, why: String| {
        Error::SchemaChange {
        table: new.qualified(),
        message: format!(
            "history table {h} cannot follow `{ch}` (changed at {}, change-log file {batch}): {why}. \
             This table's changes wait at this change (the other tables go on); the loader goes on with \
             them by itself once the history can hold it",
            at.to_rfc3339()
        ),
    }
    };
    crate::migrate::create_types(tx, &change.types).await?;
    let mut added = 0;
    for ch in &change.changes {
        let mut versions = 0;
        match ch {
            Change::RenameColumn { column, new_name } => {
                // The history's key columns keep their names.
                if old.key.iter().all(|k| k.name != *column) {
                    ddl(
                        tx,
                        &format!(
                            "ALTER TABLE {h} RENAME COLUMN {} TO {}",
                            old.history_name(column),
                            new.history_name(new_name)
                        ),
                    )
                    .await?;
                }
            }
            Change::AlterType {
                column, type_after, ..
            } => {
                let col = history_column_of(new, column);
                let have = history_type(tx, new, &col).await?;
                hold(tx, new, &col, &have, type_after)
                    .await?
                    .map_err(|why| stop(ch, why))?;
            }
            Change::AlterGenerated { column, .. } => {
                return Err(stop(
                    ch,
                    format!(
                        "the history generates {column} for every version, the old ones included, from one expression; \
                         drop the column from the history yourself (ALTER TABLE {h} DROP COLUMN {column}) to follow with \
                         the new expression"
                    ),
                ));
            }
            Change::DropColumn { column } => {
                if old.key.iter().any(|k| k.name == *column) {
                    return Err(stop(ch, "it is a primary-key column".into()));
                }
            }
            Change::AddColumn {
                column,
                sql_type,
                generated,
                existing,
            } => {
                let col = new.history_name(column);
                let have = history_type_opt(tx, new, &col).await?;
                let Some(c) = new.columns.iter().find(|c| c.name == *column) else {
                    return Err(Error::internal(
                        "schema change",
                        format!("no column {column}"),
                    ));
                };
                match have {
                    // Dropped once and added again, or added to the history by hand.
                    Some(have) => {
                        hold(tx, new, &col, &have, sql_type)
                            .await?
                            .map_err(|why| stop(ch, why))?;
                    }
                    None => {
                        ddl(
                            tx,
                            &format!(
                                "ALTER TABLE {h} ADD COLUMN {col} {}",
                                crate::migrate::column_type(new, c)
                            ),
                        )
                        .await?;
                    }
                }
                if generated.is_none() {
                    match existing {
                        Existing::Null => {}
                        Existing::Value(v) => {
                            versions = fill(tx, new, &col, sql_type, v, ev, batch).await?;
                        }
                        Existing::Unknown => {
                            let live: bool = tx
                                .query_one(
                                    &format!("SELECT EXISTS (SELECT 1 FROM {h} WHERE is_current)"),
                                    &[],
                                )
                                .await
                                .map_err(ctx(format!("reading {h}")))?
                                .get(0);
                            if live {
                                return Err(stop(
                                    ch,
                                    "what the rows that existed hold in it is unknown: a volatile default gave each \
                                     its own value, or the table was rewritten (a type change, VACUUM FULL) before the \
                                     extractor saw the column, and no change event carries them; add the column to the \
                                     history yourself, filled as you see fit, to go on"
                                        .into(),
                                ));
                            }
                        }
                    }
                }
            }
            Change::AlterKey { .. } => {
                return Err(stop(
                    ch,
                    "the history's versions are chained by the key; a history of the new key needs a new history table"
                        .into(),
                ));
            }
        }
        added += versions;
        let (column, new_name, before, after) = match ch {
            Change::RenameColumn { column, new_name } => {
                (Some(column.clone()), Some(new_name.clone()), None, None)
            }
            Change::AlterType {
                column,
                type_before,
                type_after,
            } => (
                Some(column.clone()),
                None,
                Some(type_before.clone()),
                Some(type_after.clone()),
            ),
            Change::AddColumn {
                column, sql_type, ..
            } => (Some(column.clone()), None, None, Some(sql_type.clone())),
            _ => (ch.column().map(str::to_owned), None, None, None),
        };
        tx.execute(
            "INSERT INTO public.cdc_schema_changes
                 (history_table, source_table, kind, column_name, new_name, type_before, type_after, detail,
                  changed_at, source_lsn, batch_id, versions_added, columns_after)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9,
                     CASE WHEN $10::int8 IS NULL THEN NULL ELSE '0/0'::pg_lsn + $10::int8::numeric END, $11, $12, $13)",
            &[
                &h,
                &new.qualified(),
                &ch.kind(),
                &column,
                &new_name,
                &before,
                &after,
                &ch.to_string(),
                &at,
                &ev.lsn,
                &batch,
                &(versions as i64),
                &recorded(new),
            ],
        )
        .await
        .map_err(ctx("recording a schema change in cdc_schema_changes"))?;
        tracing::info!(history = %h, change = %ch, versions, "history followed a schema change of the source");
    }
    Ok(added)
}

/// Makes history column `col` (of type `have`) hold values of type `to` exactly: as it is
/// when it holds them already (a `numeric` holds every `numeric(8,1)`), changed to `to` when
/// `to` holds every value it has; otherwise the reason it cannot (the inner error).
async fn hold(
    tx: &Transaction<'_>,
    spec: &TableSpec,
    col: &str,
    have: &str,
    to: &str,
) -> Result<std::result::Result<(), String>> {
    if widens(to, have) {
        return Ok(Ok(()));
    }
    if widens(have, to) {
        alter_type(tx, spec, col, to).await?;
        return Ok(Ok(()));
    }
    Ok(Err(format!(
        "its column {col} is {have}, which cannot be changed to {to} with every value kept exactly; \
         change it yourself to a type that holds both (ALTER TABLE {} ALTER COLUMN {col} TYPE …)",
        spec.history_qualified()
    )))
}

/// The history column of source column `name` (a key column's own history name).
fn history_column_of(spec: &TableSpec, name: &str) -> String {
    match spec.key.iter().position(|k| k.name == name) {
        Some(i) => spec.history_key_columns[i].clone(),
        None => spec.history_name(name),
    }
}

async fn ddl(tx: &Transaction<'_>, sql: &str) -> Result<()> {
    tx.batch_execute(sql)
        .await
        .map_err(ctx(format!("following a schema change: {sql}")))
}

async fn history_type_opt(
    tx: &Transaction<'_>,
    spec: &TableSpec,
    col: &str,
) -> Result<Option<String>> {
    Ok(tx
        .query_opt(
            "SELECT format_type(a.atttypid, a.atttypmod) FROM pg_attribute a
             WHERE a.attrelid = $1::text::regclass AND a.attname = $2 AND a.attnum > 0 AND NOT a.attisdropped",
            &[&spec.history_qualified(), &col],
        )
        .await
        .map_err(ctx(format!(
            "reading the columns of {}",
            spec.history_qualified()
        )))?
        .map(|r| r.get(0)))
}

async fn history_type(tx: &Transaction<'_>, spec: &TableSpec, col: &str) -> Result<String> {
    history_type_opt(tx, spec, col).await?.ok_or_else(|| {
        Error::setup(
            format!("history table {}", spec.history_qualified()),
            format!("has no column {col}"),
        )
    })
}

/// Changes a history column's type; the generated columns whose expression uses it are
/// generated again around the change (PostgreSQL cannot change the type of a column a
/// generated column uses).
async fn alter_type(tx: &Transaction<'_>, spec: &TableSpec, col: &str, to: &str) -> Result<()> {
    let h = spec.history_qualified();
    let users: Vec<&Column> = spec
        .columns
        .iter()
        .filter(|c| {
            c.generated.as_deref().is_some_and(|e| {
                crate::table::substitute_columns(e, spec, |i| {
                    format!("\u{1}{}\u{1}", spec.history_column(&spec.columns[i]))
                })
                .contains(&format!("\u{1}{col}\u{1}"))
            })
        })
        .collect();
    let mut sql = String::new();
    for g in &users {
        sql.push_str(&format!(
            "ALTER TABLE {h} DROP COLUMN {};\n",
            spec.history_column(g)
        ));
    }
    sql.push_str(&format!(
        "ALTER TABLE {h} ALTER COLUMN {col} TYPE {to} USING {col}::{to};\n"
    ));
    for g in &users {
        sql.push_str(&format!(
            "ALTER TABLE {h} ADD COLUMN {} {};\n",
            spec.history_column(g),
            crate::migrate::column_type(spec, g)
        ));
    }
    ddl(tx, &sql).await
}

/// A column added with one value for every existing row: each current version that started
/// before the change is followed by one holding the value, from the change's time; one that
/// started at or after it held the value from its start. Their row hash is the nil UUID
/// ("not hashed"), so the next change of the key always makes a version.
async fn fill(
    tx: &Transaction<'_>,
    spec: &TableSpec,
    col: &str,
    sql_type: &str,
    value: &str,
    ev: &DecodedEvent,
    batch: &str,
) -> Result<u64> {
    let h = spec.history_qualified();
    let at = DateTime::<Utc>::from_timestamp_micros(ev.ts_us).unwrap_or_default();
    let captured = DateTime::<Utc>::from_timestamp_millis(ev.captured_ms).unwrap_or_default();
    let lsn = "CASE WHEN $2::int8 IS NULL THEN NULL ELSE '0/0'::pg_lsn + $2::int8::numeric END";
    // By time alone: a version that started at the change's instant (a change of the ALTER's
    // own transaction, or the version an earlier ALTER of that transaction added) holds the
    // value from its start; closing it there would leave a zero-length version.
    let before = "x.valid_from < $1::timestamptz";
    // The history's columns now: a column a later change of the same event adds is not
    // there yet (it gets its value, if any, from its own change).
    let have: Vec<String> = tx
        .query(
            "SELECT a.attname::text FROM pg_attribute a
             WHERE a.attrelid = $1::text::regclass AND a.attnum > 0 AND NOT a.attisdropped",
            &[&h],
        )
        .await
        .map_err(ctx(format!("reading the columns of {h}")))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let carried: Vec<String> = spec
        .history_key_columns
        .iter()
        .cloned()
        .chain(
            spec.written_columns()
                .into_iter()
                .map(|i| spec.history_column(&spec.columns[i]))
                .filter(|c| c != col && have.contains(c)),
        )
        .collect();
    let carried = carried.join(", ");
    let nil = "'00000000-0000-0000-0000-000000000000'::uuid";
    tx.execute(
        &format!(
            "UPDATE {h} x SET {col} = $2::text::{sql_type}, row_hash = {nil}, updated_at = now()
             WHERE x.is_current AND NOT ({before})"
        ),
        &[&at, &value],
    )
    .await
    .map_err(ctx(format!("filling the added column {col} of {h}")))?;
    let n = tx
        .execute(
            &format!(
                "WITH closed AS (
                     UPDATE {h} x SET valid_to = $1, end_lsn = {lsn}, is_current = false, updated_at = now()
                     WHERE x.is_current AND {before}
                     RETURNING {carried})
                 INSERT INTO {h} ({carried}, {col}, valid_from, valid_to, is_current, is_deleted, is_truncated,
                                  cdc_operation, cdc_timestamp, batch_id, source_lsn, source_txid, end_lsn, row_hash)
                 SELECT {carried}, $3::text::{sql_type}, $1, NULL, true, false, false, 's', $4, $5, {lsn}, $6, NULL, {nil}
                 FROM closed"
            ),
            &[&at, &ev.lsn, &value, &captured, &batch, &ev.tx_id],
        )
        .await
        .map_err(ctx(format!(
            "adding versions for the added column {col} of {h}"
        )))?;
    Ok(n)
}
