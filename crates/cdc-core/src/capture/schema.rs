//! Noticing schema changes of the captured tables (see `crate::schema_change`): a catalog
//! fingerprint read each pass; a table whose fingerprint moved is described again, and its
//! shape compared with the one the change log last described.

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
