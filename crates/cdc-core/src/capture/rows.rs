//! Reading a table's rows as change events, shared by timestamp capture and the initial copy
//! of logical capture: the image's columns and their types, a binary COPY of the columns'
//! text ordered by (change time, key), and the check that the source table has what the
//! description names.

use crate::db::ctx;
use crate::error::{Error, Result};
use crate::event::encode::{write_event, write_object, Header};
use crate::event::{CaptureMode, Op};
use crate::progress::Watermark;
use crate::sink::ChangeSink;
use crate::table::{sql_literal, TableSpec};
use chrono::{DateTime, Utc};
use futures_util::{pin_mut, TryStreamExt};
use tokio_postgres::binary_copy::BinaryCopyOutStream;
use tokio_postgres::types::Type;
use tokio_postgres::{Client, GenericClient};

/// The columns of a row image as the extractor reads them: the key, the tracked columns and
/// the change-time column (each once), with their type OIDs.
#[derive(Debug, Clone)]
pub struct ImageColumns {
    pub names: Vec<String>,
    pub oids: Vec<u32>,
    /// The source database's name (`source.db`).
    pub db: String,
}

impl ImageColumns {
    /// Looks up the types of the image's columns in the source.
    pub async fn load(client: &impl GenericClient, spec: &TableSpec) -> Result<Self> {
        let mut names = vec![spec.key.name.clone()];
        for n in spec
            .columns
            .iter()
            .map(|c| &c.name)
            .chain(std::iter::once(&spec.change_time_column))
        {
            if !names.contains(n) {
                names.push(n.clone());
            }
        }
        let rows = client
            .query(
                "SELECT a.attname::text, a.atttypid::int8, current_database()::text
                 FROM pg_attribute a
                 WHERE a.attrelid = (quote_ident($1) || '.' || quote_ident($2))::regclass
                   AND a.attnum > 0 AND NOT a.attisdropped",
                &[&spec.schema, &spec.name],
            )
            .await
            .map_err(ctx(format!(
                "reading the column types of {}",
                spec.qualified()
            )))?;
        let mut oids = Vec::with_capacity(names.len());
        for n in &names {
            let oid = rows
                .iter()
                .find(|r| r.get::<_, String>(0) == *n)
                .map(|r| r.get::<_, i64>(1) as u32)
                .ok_or_else(|| {
                    Error::setup(
                        format!("source table {}", spec.qualified()),
                        format!("has no column {n}"),
                    )
                })?;
            oids.push(oid);
        }
        let db = rows.first().map(|r| r.get(2)).unwrap_or_default();
        Ok(ImageColumns { names, oids, db })
    }

    /// `alias.col::text, …` in image order.
    pub fn select_list(&self, alias: &str) -> String {
        self.names
            .iter()
            .map(|n| format!("{alias}.{n}::text"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The image's values as a JSON object.
    pub fn write_image(&self, b: &mut Vec<u8>, values: Option<&[Option<&str>]>) {
        match values {
            Some(v) => write_object(
                b,
                self.names
                    .iter()
                    .zip(&self.oids)
                    .zip(v)
                    .map(|((n, &o), &v)| (n.as_str(), o, v)),
            ),
            None => b.extend_from_slice(b"null"),
        }
    }
}

/// Verifies that the source table has the key, the tracked columns and the change-time column.
pub async fn check_source_table(client: &Client, spec: &TableSpec) -> Result<()> {
    let rows = client
        .query(
            "SELECT column_name::text FROM information_schema.columns WHERE table_schema = $1 AND table_name = $2",
            &[&spec.schema, &spec.name],
        )
        .await
        .map_err(ctx(format!("reading the columns of {}", spec.qualified())))?;
    if rows.is_empty() {
        return Err(Error::setup(
            format!("source table {}", spec.qualified()),
            "does not exist (or is not visible to DB_USER); apply init-scripts/*.sql to the source database",
        ));
    }
    let have: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    let missing: Vec<&str> = std::iter::once(spec.key.name.as_str())
        .chain(spec.columns.iter().map(|c| c.name.as_str()))
        .chain(std::iter::once(spec.change_time_column.as_str()))
        .filter(|c| !have.iter().any(|h| h == c))
        .collect();
    if !missing.is_empty() {
        return Err(Error::setup(
            format!("source table {}", spec.qualified()),
            format!("has no column(s) {}", missing.join(", ")),
        ));
    }
    Ok(())
}

pub(super) fn micros(expr: &str) -> String {
    format!("(extract(epoch FROM {expr}) * 1000000)::int8")
}

pub(super) fn ts_literal(us: i64) -> String {
    let t = DateTime::<Utc>::from_timestamp_micros(us).unwrap_or_default();
    format!("'{}'::timestamptz", t.format("%Y-%m-%d %H:%M:%S%.6f+00"))
}

pub(super) fn null(b: &mut Vec<u8>) {
    b.extend_from_slice(b"null");
}

/// `c` for a row created after the watermark, else `u`; `r` during the initial snapshot.
pub(super) fn op_expr(spec: &TableSpec, r: &str, prev: Option<&Watermark>) -> String {
    match (prev, &spec.created_time_column) {
        (None, _) => "'r'".into(),
        (Some(w), Some(created)) => format!(
            "CASE WHEN {r}.{created} >= {} THEN 'c' ELSE 'u' END",
            ts_literal(w.ts_us)
        ),
        (Some(_), None) => "'u'".into(),
    }
}

/// Streams a rows COPY (`rows_copy_sql`) into events; `on_row(change_us, key)` sees each row.
/// Returns the number of rows.
#[allow(clippy::too_many_arguments)]
pub async fn read_rows(
    stream: tokio_postgres::CopyOutStream,
    spec: &TableSpec,
    cols: &ImageColumns,
    mode: CaptureMode,
    snapshot: bool,
    captured_ms: i64,
    sink: &mut dyn ChangeSink,
    mut on_row: impl FnMut(i64, &str),
) -> Result<u64> {
    let n = cols.names.len();
    let mut types = vec![Type::INT8, Type::TEXT, Type::TEXT];
    types.extend(std::iter::repeat_n(Type::TEXT, n));
    let rows = BinaryCopyOutStream::new(stream, &types);
    pin_mut!(rows);
    let mut buf = Vec::with_capacity(1024);
    let mut count = 0;
    while let Some(row) = rows
        .try_next()
        .await
        .map_err(ctx(format!("reading rows of {}", spec.qualified())))?
    {
        let values: Vec<Option<&str>> = (3..3 + n).map(|i| row.get(i)).collect();
        let key: &str = row.get(1);
        let op = row.get::<&str>(2);
        let op = Op::from_code(op)
            .ok_or_else(|| Error::decode("row copy", format!("unknown operation {op:?}")))?;
        let h = row_header(cols, op, mode, snapshot, row.get(0), key, captured_ms);
        buf.clear();
        write_event(&mut buf, spec, &h, null, |b| {
            cols.write_image(b, Some(&values))
        });
        sink.write(&buf, false)?;
        on_row(h.ts_us, key);
        count += 1;
    }
    Ok(count)
}

/// The header of an event read from a table row (no log position).
pub(super) fn row_header<'a>(
    cols: &'a ImageColumns,
    op: Op,
    mode: CaptureMode,
    snapshot: bool,
    ts_us: i64,
    key: &'a str,
    captured_ms: i64,
) -> Header<'a> {
    Header {
        op,
        mode,
        snapshot,
        db: Some(&cols.db),
        ts_us,
        key,
        lsn: None,
        tx_id: None,
        captured_ms,
    }
}

/// The initial copy: every row as an `r` event at its change time.
pub fn snapshot_copy_sql(spec: &TableSpec, cols: &ImageColumns) -> String {
    rows_copy_sql(spec, cols, None)
}

/// Change time (µs), key, op and the image columns as text of every row past the watermark.
pub(super) fn rows_copy_sql(
    spec: &TableSpec,
    cols: &ImageColumns,
    prev: Option<&Watermark>,
) -> String {
    let t = "t";
    let ct = format!("{t}.{}", spec.change_time_column);
    let key = format!("{t}.{}", spec.key.name);
    let filter = match prev {
        None => "true".to_owned(),
        Some(Watermark { ts_us, key: None }) => format!("{ct} >= {}", ts_literal(*ts_us)),
        Some(Watermark {
            ts_us,
            key: Some(k),
        }) => format!(
            "({ct}, {key}) > ({}, {}::{})",
            ts_literal(*ts_us),
            sql_literal(k),
            spec.key.sql_type
        ),
    };
    format!(
        "COPY (SELECT {ts}, {key}::text, {op}, {list} FROM {table} {t} WHERE {filter} ORDER BY {ct}, {key})
         TO STDOUT (FORMAT binary)",
        ts = micros(&ct),
        op = op_expr(spec, t, prev),
        list = cols.select_list(t),
        table = spec.qualified()
    )
}
