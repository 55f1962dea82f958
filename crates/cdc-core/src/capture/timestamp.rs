//! Timestamp capture: a high-watermark on the change-time column, made correct.
//!
//! Each pass reads, in one REPEATABLE READ snapshot, the delete tombstones and every row whose
//! `(change_time, key)` is past the watermark, and streams them (a binary COPY of the columns'
//! text; the extractor writes each event's JSON) into change-log files. The new watermark is bounded by the oldest
//! transaction that was writing when the pass began, so a transaction that started before a
//! poll and commits after it is still found by the next one; the rows re-read because of that
//! bound are duplicates the loader drops. Tombstones are removed, in the same snapshot, only
//! after the files holding them are durable; the progress file is written last.

use super::json::{write_event, Header, ImageColumns, TEXT_OUTPUT_SETTINGS};
use crate::changelog::ChangeLogWriter;
use crate::db::ctx;
use crate::error::{Error, Result};
use crate::progress::{Progress, Watermark};
use crate::table::{sql_literal, TableSpec};
use chrono::{DateTime, Utc};
use futures_util::{pin_mut, TryStreamExt};
use std::path::PathBuf;
use tokio_postgres::binary_copy::BinaryCopyOutStream;
use tokio_postgres::types::Type;
use tokio_postgres::Client;

/// What one pass did.
#[derive(Debug, Clone, Default)]
pub struct PassOutcome {
    pub events: u64,
    pub rows: u64,
    pub deletes: u64,
    pub files: Vec<PathBuf>,
    pub bytes: u64,
    pub snapshot: bool,
    pub watermark: Option<Watermark>,
}

pub struct TimestampCapture {
    spec: TableSpec,
    log_dir: PathBuf,
    state_dir: PathBuf,
    max_rows_per_file: u64,
    progress: Progress,
}

impl TimestampCapture {
    pub fn new(
        spec: TableSpec,
        log_dir: PathBuf,
        state_dir: PathBuf,
        max_rows_per_file: u64,
    ) -> Result<Self> {
        let progress = Progress::load(&state_dir, &spec, "timestamp")?;
        Ok(TimestampCapture {
            spec,
            log_dir,
            state_dir,
            max_rows_per_file,
            progress,
        })
    }

    pub fn progress(&self) -> &Progress {
        &self.progress
    }

    /// Checks that the source has the table, its columns, the tombstone table, and that this
    /// role can see other sessions' transactions (needed to bound the watermark).
    pub async fn check_source(&self, client: &Client) -> Result<()> {
        check_source_table(client, &self.spec).await?;
        let row = client
            .query_one(
                "SELECT rolsuper OR pg_has_role(current_user, 'pg_read_all_stats', 'MEMBER')
                 FROM pg_roles WHERE rolname = current_user",
                &[],
            )
            .await
            .map_err(ctx("checking the capture role's privileges"))?;
        if !row.get::<_, bool>(0) {
            return Err(Error::setup(
                "source role",
                "timestamp capture must see other sessions' open transactions: make DB_USER a superuser or \
                 GRANT pg_read_all_stats TO it",
            ));
        }
        let tomb = client
            .query_one(
                "SELECT to_regclass('public.cdc_tombstones') IS NOT NULL",
                &[],
            )
            .await
            .map_err(ctx("looking for public.cdc_tombstones"))?;
        if !tomb.get::<_, bool>(0) {
            return Err(Error::setup(
                "source schema",
                "public.cdc_tombstones is missing: apply init-scripts/01-operational-schema.sql to the source database",
            ));
        }
        Ok(())
    }

    /// One capture pass. Files are durable before tombstones are removed and progress moves.
    pub async fn pass(&mut self, client: &mut Client) -> Result<PassOutcome> {
        let spec = &self.spec;
        let prev = self.progress.watermark.clone();
        // The bound: now, and the start of the oldest transaction that holds an xid (a writer).
        // Taken before the snapshot, so every writer not in our snapshot is either listed here
        // or stamps its rows after `now`.
        let now: DateTime<Utc> = client
            .query_one("SELECT clock_timestamp()", &[])
            .await
            .map_err(ctx("reading the source clock"))?
            .get(0);
        let oldest: Option<DateTime<Utc>> = client
            .query_one(
                "SELECT min(xact_start) FROM pg_stat_activity
                 WHERE backend_xid IS NOT NULL AND pid <> pg_backend_pid() AND datname = current_database()",
                &[],
            )
            .await
            .map_err(ctx("reading open transactions from pg_stat_activity"))?
            .get(0);
        let bound = oldest.map_or(now, |o| o.min(now));
        let captured_ms = now.timestamp_millis();

        let tx = client
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .start()
            .await
            .map_err(ctx("starting the capture snapshot"))?;

        let mut writer = ChangeLogWriter::new(
            &self.log_dir,
            &spec.name,
            now,
            self.progress.next_file_seq,
            self.max_rows_per_file,
        );
        let snapshot = prev.is_none();
        let mut out = PassOutcome {
            snapshot,
            ..PassOutcome::default()
        };

        let result: Result<(Option<i64>, Option<Watermark>)> = async {
            tx.batch_execute(TEXT_OUTPUT_SETTINGS)
                .await
                .map_err(ctx("setting the output format"))?;
            let cols = ImageColumns::load(&tx, spec).await?;
            let n = cols.names.len();
            let mut buf = Vec::with_capacity(1024);
            // 1. Deletes, first: for one key a tombstone is always older than a row that exists.
            let sql = tombstone_copy_sql(spec, &cols, prev.as_ref());
            let stream = tx
                .copy_out(sql.as_str())
                .await
                .map_err(ctx("reading tombstones"))?;
            let mut types = vec![Type::INT8, Type::INT8, Type::INT8, Type::TEXT, Type::TEXT];
            types.extend(std::iter::repeat_n(Type::TEXT, n));
            let rows = BinaryCopyOutStream::new(stream, &types);
            pin_mut!(rows);
            let mut max_tomb = None;
            while let Some(row) = rows.try_next().await.map_err(ctx("reading tombstones"))? {
                max_tomb = Some(row.get::<i64>(0));
                let values: Vec<Option<&str>> = (5..5 + n).map(|i| row.get(i)).collect();
                let key: &str = row.get(4);
                let mut h = row_header(
                    &cols,
                    row.get(3),
                    "timestamp",
                    false,
                    row.get(1),
                    key,
                    captured_ms,
                );
                // The deleted row's last state (a version this pass may not have seen), then
                // the delete.
                buf.clear();
                write_event(&mut buf, spec, &h, null, |b| {
                    cols.write_image(b, Some(&values))
                });
                writer.write_event(&buf, false)?;
                (h.op, h.ts_us) = ("d", row.get(2));
                buf.clear();
                write_event(
                    &mut buf,
                    spec,
                    &h,
                    |b| cols.write_image(b, Some(&values)),
                    null,
                );
                writer.write_event(&buf, true)?;
                out.deletes += 1;
            }
            // 2. Rows changed since the watermark, in (change time, key) order.
            let sql = rows_copy_sql(spec, &cols, prev.as_ref());
            let stream = tx
                .copy_out(sql.as_str())
                .await
                .map_err(ctx(format!("reading changed rows of {}", spec.qualified())))?;
            let mut last: Option<Watermark> = None;
            let rows = read_rows(
                stream,
                spec,
                &cols,
                "timestamp",
                prev.is_none(),
                captured_ms,
                &mut writer,
                |ts_us, key| {
                    last = Some(Watermark {
                        ts_us,
                        key: Some(key.to_owned()),
                    });
                },
            )
            .await?;
            out.rows += rows;
            Ok((max_tomb, last))
        }
        .await;

        let (max_tomb, last) = match result {
            Ok(v) => v,
            Err(e) => {
                writer.abandon();
                return Err(e);
            }
        };
        out.events = writer.events_written();
        let next_seq = writer.next_seq();
        let written = writer.finish()?;
        out.bytes = written.iter().map(|f| f.bytes).sum();
        out.files = written.into_iter().map(|f| f.path).collect();

        // The files are durable: the tombstones they hold may go (only those in our snapshot).
        if let Some(max) = max_tomb {
            tx.execute(
                "DELETE FROM public.cdc_tombstones WHERE table_schema = $1 AND table_name = $2 AND tombstone_id <= $3",
                &[&spec.schema, &spec.name, &max],
            )
            .await
            .map_err(ctx("removing captured tombstones"))?;
        }
        tx.commit()
            .await
            .map_err(ctx("committing the capture pass"))?;

        // Progress last.
        let bound_us = bound.timestamp_micros();
        let candidate = match last {
            Some(w) if w.ts_us < bound_us => w,
            _ => Watermark {
                ts_us: bound_us,
                key: None,
            },
        };
        let new = match &prev {
            Some(p) if candidate.cmp_pos(p) == std::cmp::Ordering::Less => p.clone(),
            _ => candidate,
        };
        if prev.as_ref() != Some(&new) || next_seq != self.progress.next_file_seq {
            self.progress.watermark = Some(new);
            self.progress.next_file_seq = next_seq;
            self.progress.save(&self.state_dir, spec, prev.as_ref())?;
        }
        out.watermark = self.progress.watermark.clone();
        Ok(out)
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

fn micros(expr: &str) -> String {
    format!("(extract(epoch FROM {expr}) * 1000000)::int8")
}

fn ts_literal(us: i64) -> String {
    let t = DateTime::<Utc>::from_timestamp_micros(us).unwrap_or_default();
    format!("'{}'::timestamptz", t.format("%Y-%m-%d %H:%M:%S%.6f+00"))
}

fn null(b: &mut Vec<u8>) {
    b.extend_from_slice(b"null");
}

/// `c` for a row created after the watermark, else `u`; `r` during the initial snapshot.
fn op_expr(spec: &TableSpec, r: &str, prev: Option<&Watermark>) -> String {
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
    mode: &str,
    snapshot: bool,
    captured_ms: i64,
    writer: &mut ChangeLogWriter,
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
        let h = row_header(
            cols,
            row.get(2),
            mode,
            snapshot,
            row.get(0),
            key,
            captured_ms,
        );
        buf.clear();
        write_event(&mut buf, spec, &h, null, |b| {
            cols.write_image(b, Some(&values))
        });
        writer.write_event(&buf, false)?;
        on_row(h.ts_us, key);
        count += 1;
    }
    Ok(count)
}

/// The header of an event read from a table row (no log position).
fn row_header<'a>(
    cols: &'a ImageColumns,
    op: &'a str,
    mode: &'a str,
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
fn rows_copy_sql(spec: &TableSpec, cols: &ImageColumns, prev: Option<&Watermark>) -> String {
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

/// Each tombstone gives two events: the deleted row's last state (a version the pass may not
/// have seen, at its change time) and the delete itself, at the delete time. Columns: id,
/// change time (µs), delete time (µs), op of the last state, key, the image columns.
fn tombstone_copy_sql(spec: &TableSpec, cols: &ImageColumns, prev: Option<&Watermark>) -> String {
    let r = "r";
    format!(
        "COPY (SELECT tb.tombstone_id, {ts}, {deleted}, {op}, {r}.{key}::text, {list}
               FROM public.cdc_tombstones tb
               CROSS JOIN LATERAL jsonb_populate_record(NULL::{table}, tb.old_row) {r}
               WHERE tb.table_schema = {schema} AND tb.table_name = {name}
               ORDER BY tb.deleted_at, tb.tombstone_id) TO STDOUT (FORMAT binary)",
        ts = micros(&format!("{r}.{}", spec.change_time_column)),
        deleted = micros("tb.deleted_at"),
        op = op_expr(spec, r, prev),
        key = spec.key.name,
        list = cols.select_list(r),
        table = spec.qualified(),
        schema = sql_literal(&spec.schema),
        name = sql_literal(&spec.name),
    )
}
