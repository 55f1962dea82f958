//! Reading a table's rows as change events, shared by timestamp capture and the initial copy
//! of logical capture: the image's columns and their types, a text COPY of the columns
//! ordered by (change time, key), and the check that the source table has what the
//! description names. The COPY's text of each value is its type's output function's, the
//! same text `pgoutput` sends, so a value reads the same on every path.

use crate::db::copy_text::parse_row;
use crate::db::ctx;
use crate::error::{Error, Result};
use crate::event::encode::{write_event, write_object, Header};
use crate::event::{CaptureMode, Op};
use crate::progress::Watermark;
use crate::sink::ChangeSink;
use crate::table::{sql_literal, TableSpec};
use chrono::{DateTime, Utc};
use futures_util::{pin_mut, TryStreamExt};
use std::borrow::Cow;
use tokio_postgres::{Client, CopyOutStream, GenericClient};

/// The columns of a row image as the extractor reads them: the key columns, the tracked
/// columns and the change-time column (each once), with their type OIDs.
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
        let mut names: Vec<String> = spec.key.iter().map(|k| k.name.clone()).collect();
        for n in spec
            .columns
            .iter()
            .map(|c| &c.name)
            .chain(spec.change_time_column.iter())
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

    /// The key of a row image (`TableSpec::encode_key` of its key columns' values).
    pub fn key(&self, spec: &TableSpec, image: &[Option<&str>], what: &str) -> Result<String> {
        let mut parts = Vec::with_capacity(spec.key.len());
        for (i, k) in spec.key.iter().enumerate() {
            match image.get(i).copied().flatten() {
                Some(v) => parts.push(v),
                None => {
                    return Err(Error::decode(
                        what.to_owned(),
                        format!("key column {} is NULL", k.name),
                    ))
                }
            }
        }
        Ok(spec.encode_key(&parts))
    }

    /// `alias.col, …` in image order.
    pub fn select_list(&self, alias: &str) -> String {
        self.names
            .iter()
            .map(|n| format!("{alias}.{n}"))
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

/// Verifies that the source table has the key, the tracked columns and, for timestamp
/// capture, the change-time column.
pub async fn check_source_table(client: &Client, spec: &TableSpec, timestamp: bool) -> Result<()> {
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
    if timestamp && spec.change_time_column.is_none() {
        return Err(Error::setup(
            format!("source table {}", spec.qualified()),
            "has no change-time column (CDC_CHANGE_TIME_COLUMN) for timestamp capture; add it with its trigger, or use CDC_CAPTURE_MODE=logical",
        ));
    }
    let have: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    let missing: Vec<&str> = spec
        .key
        .iter()
        .chain(&spec.columns)
        .map(|c| c.name.as_str())
        .chain(spec.change_time_column.as_deref())
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

/// Streams the rows of a `COPY … TO STDOUT` in text format, handing each row's values
/// (`None` for NULL) to `f`. `what` names the COPY in errors.
pub(super) async fn copy_rows(
    stream: CopyOutStream,
    what: &str,
    mut f: impl FnMut(&[Option<Cow<'_, str>>]) -> Result<()>,
) -> Result<()> {
    pin_mut!(stream);
    let mut pending: Vec<u8> = Vec::new();
    let mut row = |line: &[u8]| -> Result<()> {
        let values = parse_row(line).map_err(|m| Error::decode(what.to_owned(), m))?;
        f(&values)
    };
    while let Some(chunk) = stream
        .try_next()
        .await
        .map_err(ctx(format!("reading {what}")))?
    {
        // PostgreSQL sends a row a message; a row split across messages is put together.
        let mut data: &[u8] = &chunk;
        if !pending.is_empty() {
            match data.iter().position(|&b| b == b'\n') {
                Some(end) => {
                    pending.extend_from_slice(&data[..end]);
                    row(&std::mem::take(&mut pending))?;
                    data = &data[end + 1..];
                }
                None => {
                    pending.extend_from_slice(data);
                    continue;
                }
            }
        }
        let mut lines = data.split(|&b| b == b'\n').peekable();
        while let Some(line) = lines.next() {
            if lines.peek().is_none() {
                // The part after the last newline: the start of the next row, if anything.
                pending.extend_from_slice(line);
            } else {
                row(line)?;
            }
        }
    }
    if !pending.is_empty() {
        return Err(Error::decode(
            what.to_owned(),
            "the COPY ended inside a row",
        ));
    }
    Ok(())
}

/// A COPY value that must be there: what the SQL selects is never NULL.
pub(super) fn required<'a>(
    values: &'a [Option<Cow<'_, str>>],
    i: usize,
    what: &str,
) -> Result<&'a str> {
    values
        .get(i)
        .and_then(|v| v.as_deref())
        .ok_or_else(|| Error::decode(what.to_owned(), format!("column {} is missing", i + 1)))
}

/// A COPY value that must be a whole number.
pub(super) fn required_i64(values: &[Option<Cow<'_, str>>], i: usize, what: &str) -> Result<i64> {
    let v = required(values, i, what)?;
    v.parse().map_err(|_| {
        Error::decode(
            what.to_owned(),
            format!("column {} is not a number: {v:?}", i + 1),
        )
    })
}

/// A COPY value that must be an operation code.
pub(super) fn required_op(values: &[Option<Cow<'_, str>>], i: usize, what: &str) -> Result<Op> {
    let v = required(values, i, what)?;
    Op::from_code(v)
        .ok_or_else(|| Error::decode(what.to_owned(), format!("unknown operation {v:?}")))
}

/// The values of a COPY row from column `from` on (the image).
pub(super) fn image_values<'a>(
    row: &'a [Option<Cow<'_, str>>],
    from: usize,
) -> Vec<Option<&'a str>> {
    row.get(from..)
        .unwrap_or_default()
        .iter()
        .map(|v| v.as_deref())
        .collect()
}

/// Streams a rows COPY (`rows_copy_sql`) into events; `on_row(change_us, key)` sees each row.
/// Returns the number of rows.
#[allow(clippy::too_many_arguments)]
pub async fn read_rows(
    stream: CopyOutStream,
    spec: &TableSpec,
    cols: &ImageColumns,
    mode: CaptureMode,
    snapshot: bool,
    captured_ms: i64,
    sink: &mut dyn ChangeSink,
    mut on_row: impl FnMut(i64, &str),
) -> Result<u64> {
    let what = format!("rows of {}", spec.qualified());
    let mut buf = Vec::with_capacity(1024);
    let mut count = 0;
    copy_rows(stream, &what, |row| {
        let ts_us = required_i64(row, 0, &what)?;
        let op = required_op(row, 1, &what)?;
        let image = image_values(row, 2);
        let key = cols.key(spec, &image, &what)?;
        let h = row_header(cols, op, mode, snapshot, ts_us, &key, captured_ms);
        buf.clear();
        write_event(&mut buf, spec, &h, null, |b| {
            cols.write_image(b, Some(&image))
        });
        sink.write(&buf, spec, op, false)?;
        on_row(ts_us, &key);
        count += 1;
        Ok(())
    })
    .await?;
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
        incremental: false,
        db: Some(&cols.db),
        ts_us,
        key,
        lsn: None,
        tx_id: None,
        captured_ms,
    }
}

/// The initial copy: every row as an `r` event at its change time.
pub fn snapshot_copy_sql(spec: &TableSpec, cols: &ImageColumns) -> Result<String> {
    rows_copy_sql(spec, cols, None)
}

/// The change time (µs) of a row for its event: the change-time column, or, for a table
/// without one (logical capture), the time of the snapshot.
pub(super) fn change_time_expr(spec: &TableSpec, alias: &str) -> String {
    match &spec.change_time_column {
        // A NULL (possible where no trigger keeps the column, in logical mode): the copy's time.
        Some(ct) => micros(&format!("coalesce({alias}.{ct}, now())")),
        None => micros("now()"),
    }
}

/// Change time (µs), op and the image columns of every row past the watermark, in (change
/// time, key) order.
pub(super) fn rows_copy_sql(
    spec: &TableSpec,
    cols: &ImageColumns,
    prev: Option<&Watermark>,
) -> Result<String> {
    let t = "t";
    let key = spec.key_list(t);
    let order = match &spec.change_time_column {
        Some(ct) => format!("{t}.{ct}, {key}"),
        None => key.clone(),
    };
    let filter = past_watermark(spec, t, prev)?;
    Ok(format!(
        "COPY (SELECT {ts}, {op}, {list} FROM {table} {t} WHERE {filter} ORDER BY {order})
         TO STDOUT",
        ts = change_time_expr(spec, t),
        op = op_expr(spec, t, prev),
        list = cols.select_list(t),
        table = spec.qualified()
    ))
}

/// The condition (on alias `t`) of the rows past the watermark `prev` (every row without one).
pub(super) fn past_watermark(
    spec: &TableSpec,
    t: &str,
    prev: Option<&Watermark>,
) -> Result<String> {
    let key = spec.key_list(t);
    Ok(match (prev, &spec.change_time_column) {
        (None, _) => "true".to_owned(),
        (Some(_), None) => {
            return Err(Error::setup(
                format!("source table {}", spec.qualified()),
                "has no change-time column (CDC_CHANGE_TIME_COLUMN) for timestamp capture",
            ))
        }
        (Some(Watermark { ts_us, key: None }), Some(ct)) => {
            format!("{t}.{ct} >= {}", ts_literal(*ts_us))
        }
        (
            Some(Watermark {
                ts_us,
                key: Some(k),
            }),
            Some(ct),
        ) => {
            let parts = spec
                .key_parts(k)
                .map_err(|m| Error::State {
                    path: format!("extractor-{}.json", spec.qualified()).into(),
                    message: format!(
                        "its watermark key does not fit the table's primary key any more ({m}); remove it to capture the table again"
                    ),
                })?;
            let typed: Vec<String> = parts
                .iter()
                .zip(&spec.key)
                .map(|(p, c)| format!("{}::{}", sql_literal(p), c.sql_type))
                .collect();
            format!(
                "({t}.{ct}, {key}) > ({}, {})",
                ts_literal(*ts_us),
                typed.join(", ")
            )
        }
    })
}
