//! Noticing schema changes of the captured tables (see `crate::schema_change`): a catalog
//! fingerprint read each pass; a table whose fingerprint moved is described again, and its
//! shape compared with the one the change log last described. Also the records of the event
//! trigger that dates a change at its ALTER (`AlterRecord`, `event_from_record`).

use crate::catalog::{fingerprints, TableSelection};
use crate::db::ctx;
use crate::error::Result;
use crate::schema_change::{diff, shape_of, Existing, SchemaEvent, Shape};
use crate::table::TableSpec;
use tokio_postgres::GenericClient;

/// The catalog fingerprints seen last, to describe again only the tables that changed.
#[derive(Debug, Default)]
pub struct Watch {
    seen: Vec<Option<String>>,
}

impl Watch {
    /// The tables whose catalog changed since the last call (all of them the first time),
    /// described again: `Some(description)` at their index.
    pub async fn changed(
        &mut self,
        client: &impl GenericClient,
        selection: &TableSelection,
        specs: &[TableSpec],
    ) -> Result<Vec<Option<TableSpec>>> {
        let now = fingerprints(client, specs).await?;
        let mut out = Vec::with_capacity(specs.len());
        for (i, spec) in specs.iter().enumerate() {
            if self.seen.get(i) == Some(&now[i]) {
                out.push(None);
            } else {
                out.push(Some(
                    selection
                        .describe_one(client, &spec.schema, &spec.name)
                        .await?,
                ));
            }
        }
        self.seen = now;
        Ok(out)
    }

    /// Forgets what was seen (a pass that failed: its changes were not written).
    pub fn forget(&mut self) {
        self.seen.clear();
    }
}

/// What the rows hold in column `column` of `spec` when the catalog cannot say (the table was
/// rewritten since the column was added, which drops PostgreSQL's record of the value the
/// existing rows got): read from the rows themselves, those whose change time is before
/// `before_us` when given (timestamp capture: rows not changed since the last pass, so not
/// since the column was added), else all of them. One value in all of them is that value; no
/// value in any is NULL; anything else is `Unknown`.
pub async fn existing_from_rows(
    client: &impl GenericClient,
    spec: &TableSpec,
    column: &str,
    before_us: Option<i64>,
) -> Result<Existing> {
    let filter = match (before_us, &spec.change_time_column) {
        (Some(us), Some(ct)) => format!("WHERE {ct} < to_timestamp({us}::float8 / 1000000)"),
        _ => String::new(),
    };
    let row = client
        .query_one(
            &format!(
                "SELECT count(*), count({column}), count(DISTINCT {column}::text), min({column}::text)
                 FROM {} {filter}",
                spec.qualified()
            ),
            &[],
        )
        .await
        .map_err(ctx(format!(
            "reading what the rows of {} hold in the added column {column}",
            spec.qualified()
        )))?;
    let (rows, values, distinct): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
    Ok(match (values, distinct) {
        (0, _) => Existing::Null,
        (v, 1) if v == rows => row
            .get::<_, Option<String>>(3)
            .map_or(Existing::Unknown, Existing::Value),
        _ => Existing::Unknown,
    })
}

/// Settles from the rows (`existing_from_rows`) each `Unknown` of `spec`'s columns that
/// shape `written` (what the change log describes) does not have: the added ones.
pub async fn settle_existing(
    client: &impl GenericClient,
    spec: &mut TableSpec,
    written: Option<&Shape>,
    before_us: Option<i64>,
) -> Result<()> {
    let Some(written) = written else {
        return Ok(());
    };
    for i in 0..spec.columns.len() {
        let added = written.iter().all(|w| w.name != spec.columns[i].name);
        if added && spec.columns[i].existing == Existing::Unknown {
            let name = spec.columns[i].name.clone();
            spec.columns[i].existing = existing_from_rows(client, spec, &name, before_us).await?;
        }
    }
    Ok(())
}

/// The schema event that takes the change log's description of a table from `written` to
/// the source's `now`; `None` when they describe the same columns.
pub fn event(written: &Shape, now: &TableSpec) -> Option<SchemaEvent> {
    let new = shape_of(now);
    let changes = diff(written, &new, |name| {
        now.columns
            .iter()
            .find(|c| c.name == name)
            .map(|c| c.existing.clone())
            .unwrap_or_default()
    });
    if changes.is_empty() {
        return None;
    }
    Some(SchemaEvent {
        changes,
        columns: new,
        types: now.types.clone(),
    })
}

/// The prefix of the WAL messages the event trigger writes (`init-scripts/03-cdc-schema-changes.sql`).
pub const ALTER_MESSAGE_PREFIX: &str = "cdc_schema_change";

/// A table's columns right after an `ALTER TABLE`, as the event trigger records them (a row of
/// `cdc_alters` in timestamp mode, a WAL message in logical mode).
#[derive(Debug, Clone, serde::Deserialize)]
pub struct AlterRecord {
    #[serde(default)]
    pub schema: String,
    #[serde(default)]
    pub table: String,
    pub columns: Vec<AlterColumn>,
}

#[derive(Debug, Clone, serde::Deserialize)]
pub struct AlterColumn {
    name: String,
    #[serde(rename = "type")]
    sql_type: String,
    type_oid: u32,
    type_mod: i32,
    attnum: i16,
    #[serde(default)]
    key: bool,
    #[serde(default)]
    generated: Option<String>,
    /// `v` (every existing row holds `value`), `d` (a default, but no record of the value the
    /// rows got), `n` (NULL).
    existing: String,
    #[serde(default)]
    value: Option<String>,
}

/// The schema event that takes the change log's description of `spec`'s table from `written`
/// to the columns `record` describes (right after an ALTER); `None` when they describe the
/// same columns. Types are named as the written shape or the catalog (`spec`) name the same
/// type, so that only a real change is one; columns the capture ignores are left out.
pub fn event_from_record(
    written: &Shape,
    spec: &TableSpec,
    record: &[AlterColumn],
) -> Option<SchemaEvent> {
    let catalog: Vec<&crate::table::Column> = spec.key.iter().chain(&spec.columns).collect();
    let shape: Shape = record
        .iter()
        .filter(|c| !spec.ignored.contains(&c.name))
        .map(|c| {
            let same_type = |oid: u32, m: i32| oid == c.type_oid && m == c.type_mod;
            let sql_type = written
                .iter()
                .find(|w| w.name == c.name && same_type(w.type_oid, w.type_mod))
                .map(|w| w.sql_type.clone())
                .or_else(|| {
                    catalog
                        .iter()
                        .find(|k| same_type(k.type_oid, k.type_mod))
                        .map(|k| k.sql_type.clone())
                })
                .or_else(|| {
                    written
                        .iter()
                        .find(|w| same_type(w.type_oid, w.type_mod))
                        .map(|w| w.sql_type.clone())
                })
                .unwrap_or_else(|| c.sql_type.clone());
            crate::schema_change::ShapeColumn {
                name: c.name.clone(),
                sql_type,
                generated: c.generated.clone(),
                key: c.key,
                attnum: c.attnum,
                type_oid: c.type_oid,
                type_mod: c.type_mod,
            }
        })
        .collect();
    let existing = |name: &str| {
        let Some(c) = record.iter().find(|c| c.name == name) else {
            return Existing::Null;
        };
        match (c.existing.as_str(), &c.value) {
            ("v", Some(v)) => Existing::Value(v.clone()),
            ("n", _) => Existing::Null,
            // A rewrite since (or a volatile default): what the catalog read at the pass's
            // start settled from the rows, for the same column.
            _ => catalog
                .iter()
                .find(|k| k.name == c.name && k.attnum == c.attnum)
                .map_or(Existing::Unknown, |k| k.existing.clone()),
        }
    };
    let changes = diff(written, &shape, existing);
    if changes.is_empty() {
        return None;
    }
    Some(SchemaEvent {
        changes,
        columns: shape,
        types: spec.types.clone(),
    })
}
