//! Set-based SCD Type 2 apply of a batch of change-log files in one transaction: stream the
//! events into a temporary staging table with binary COPY, compute the versions to keep with
//! one statement, close the superseded current rows, insert the new versions, and record
//! the files as applied, all in the same transaction.
//!
//! Rules (see DESIGN.md): one version per distinct committed state of a key, `valid_from` =
//! change time; events at or before the newest position the warehouse holds for a key are
//! duplicates and dropped; of several events of one key at one instant the last (by LSN) wins;
//! an event equal to the state before it adds nothing; a delete closes the chain.

use crate::changelog::file_name;
use crate::db::ctx;
use crate::error::{Error, Result};
use crate::event::{decode, DecodedEvent};
use crate::table::{substitute_columns, TableSpec};
use chrono::{DateTime, Utc};
use futures_util::pin_mut;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::Transaction;

/// What applying a batch changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApplyStats {
    pub files: usize,
    pub events: u64,
    pub versions_inserted: u64,
    pub versions_closed: u64,
    pub deletes: u64,
}

/// The SQL of the apply, rendered once for a table description.
#[derive(Debug, Clone)]
pub struct ApplySql {
    create_temp: String,
    copy_in: String,
    kept: String,
    close: String,
    insert: String,
    record_batches: String,
    stage_types: Vec<Type>,
}

impl ApplySql {
    pub fn new(spec: &TableSpec) -> Self {
        let h = spec.history_qualified();
        let hk = &spec.history_key_column;
        let kt = &spec.key.sql_type;
        let n = spec.columns.len();
        let vcols: Vec<String> = (1..=n).map(|i| format!("v{i}")).collect();
        let ccols: Vec<String> = (1..=n).map(|i| format!("c{i}")).collect();
        let stage_vals: String = vcols.iter().map(|v| format!(", {v} text")).collect();
        let kept_vals: String = spec
            .columns
            .iter()
            .zip(&ccols)
            .map(|(c, name)| format!(", {name} {}", c.sql_type))
            .collect();
        let create_temp = format!(
            "CREATE TEMP TABLE IF NOT EXISTS cdc_stage (
                 ord bigint NOT NULL, batch_id text NOT NULL, op text NOT NULL, k text NOT NULL,
                 ts timestamptz NOT NULL, lsn bigint, txid bigint, cap timestamptz NOT NULL{stage_vals}
             ) ON COMMIT DELETE ROWS;
             CREATE TEMP TABLE IF NOT EXISTS cdc_kept (
                 batch_id text NOT NULL, op text NOT NULL, k {kt} NOT NULL, ts timestamptz NOT NULL,
                 lsn pg_lsn, txid bigint, cap timestamptz NOT NULL{kept_vals}, h uuid NOT NULL,
                 next_ts timestamptz, next_lsn pg_lsn, next_op text
             ) ON COMMIT DELETE ROWS;"
        );
        let copy_in = format!(
            "COPY pg_temp.cdc_stage (ord, batch_id, op, k, ts, lsn, txid, cap, {}) FROM STDIN (FORMAT binary)",
            vcols.join(", ")
        );
        let cast = |i: usize| format!("(s.{}::{})", vcols[i], spec.columns[i].sql_type);
        let typed: String = spec
            .columns
            .iter()
            .enumerate()
            .map(|(i, c)| match &c.generated {
                Some(expr) => format!(
                    ", coalesce({}, ({})::{}) AS {}",
                    cast(i),
                    substitute_columns(expr, spec, cast),
                    c.sql_type,
                    ccols[i]
                ),
                None => format!(", {} AS {}", cast(i), ccols[i]),
            })
            .collect();
        let c_list = ccols.join(", ");
        let kept = format!(
            "INSERT INTO pg_temp.cdc_kept
             WITH typed AS (
                 SELECT s.ord, s.batch_id, s.op, s.k::{kt} AS k, s.ts,
                        CASE WHEN s.lsn IS NULL THEN NULL ELSE '0/0'::pg_lsn + s.lsn::numeric END AS lsn,
                        s.txid, s.cap{typed}
                 FROM pg_temp.cdc_stage s
             ),
             ev AS (
                 SELECT DISTINCT ON (k, ts) typed.*, md5(ROW({c_list})::text)::uuid AS h
                 FROM typed
                 ORDER BY k, ts, coalesce(lsn, '0/0') DESC, ord DESC
             ),
             lat AS (
                 SELECT DISTINCT ON (x.{hk}) x.{hk} AS k, x.is_current AS cur, x.row_hash AS h,
                        CASE WHEN x.is_current THEN x.valid_from ELSE x.valid_to END AS ts,
                        coalesce(CASE WHEN x.is_current THEN x.source_lsn ELSE x.end_lsn END, '0/0') AS pl
                 FROM {h} x
                 WHERE x.{hk} IN (SELECT DISTINCT k FROM ev)
                 ORDER BY x.{hk}, x.valid_from DESC, x.source_lsn DESC NULLS LAST
             ),
             fresh AS (
                 SELECT ev.* FROM ev LEFT JOIN lat ON lat.k = ev.k
                 WHERE lat.k IS NULL OR (ev.ts, coalesce(ev.lsn, '0/0')) > (lat.ts, lat.pl)
             ),
             seq AS (
                 SELECT k, ts, coalesce(lsn, '0/0') AS pl, op, h, false AS existing FROM fresh
                 UNION ALL
                 SELECT k, ts, pl, CASE WHEN cur THEN 'u' ELSE 'd' END, h, true FROM lat
             ),
             marked AS (
                 SELECT k, ts, existing, op, h, lag(op) OVER w AS prev_op, lag(h) OVER w AS prev_h
                 FROM seq WINDOW w AS (PARTITION BY k ORDER BY ts, pl, existing DESC)
             ),
             keep AS (
                 SELECT k, ts FROM marked
                 WHERE NOT existing AND CASE WHEN op = 'd' THEN coalesce(prev_op <> 'd', false)
                                             ELSE prev_op IS NULL OR prev_op = 'd' OR prev_h IS DISTINCT FROM h END
             )
             SELECT f.batch_id, f.op, f.k, f.ts, f.lsn, f.txid, f.cap, {f_list}, f.h,
                    lead(f.ts) OVER w2, lead(f.lsn) OVER w2, lead(f.op) OVER w2
             FROM fresh f JOIN keep USING (k, ts)
             WINDOW w2 AS (PARTITION BY f.k ORDER BY f.ts, coalesce(f.lsn, '0/0'))",
            f_list = ccols.iter().map(|c| format!("f.{c}")).collect::<Vec<_>>().join(", "),
        );
        let close = format!(
            "WITH first AS (
                 SELECT DISTINCT ON (k) k, ts, lsn, op FROM pg_temp.cdc_kept ORDER BY k, ts, coalesce(lsn, '0/0')
             )
             UPDATE {h} x SET valid_to = first.ts, end_lsn = first.lsn, is_current = false,
                              is_deleted = (first.op = 'd'), updated_at = now()
             FROM first WHERE x.{hk} = first.k AND x.is_current"
        );
        let insert = format!(
            "INSERT INTO {h} ({hk}, {hist_cols}, valid_from, valid_to, is_current, is_deleted, cdc_operation,
                              cdc_timestamp, batch_id, source_lsn, source_txid, end_lsn, row_hash)
             SELECT k, {c_list}, ts, next_ts, next_ts IS NULL, coalesce(next_op = 'd', false), op,
                    cap, batch_id, lsn, txid, next_lsn, h
             FROM pg_temp.cdc_kept WHERE op <> 'd'",
            hist_cols = spec.history_column_list(),
        );
        let record_batches = "INSERT INTO public.cdc_applied_batches
                 (batch_id, history_table, events, versions_inserted, versions_closed, first_change_at, last_change_at, run_id)
             SELECT b.batch_id, $2, b.events, coalesce(k.ins, 0), coalesce(k.del, 0), b.first_at, b.last_at, $3
             FROM unnest($1::text[], $4::int8[], $5::timestamptz[], $6::timestamptz[])
                  AS b(batch_id, events, first_at, last_at)
             LEFT JOIN (SELECT batch_id, count(*) FILTER (WHERE op <> 'd') AS ins, count(*) FILTER (WHERE op = 'd') AS del
                        FROM pg_temp.cdc_kept GROUP BY batch_id) k USING (batch_id)"
            .to_owned();
        let mut stage_types = vec![
            Type::INT8,
            Type::TEXT,
            Type::TEXT,
            Type::TEXT,
            Type::TIMESTAMPTZ,
            Type::INT8,
            Type::INT8,
            Type::TIMESTAMPTZ,
        ];
        stage_types.extend(std::iter::repeat_n(Type::TEXT, n));
        ApplySql {
            create_temp,
            copy_in,
            kept,
            close,
            insert,
            record_batches,
            stage_types,
        }
    }

    /// Creates the session's temporary staging tables (once per connection).
    pub fn create_temp_sql(&self) -> &str {
        &self.create_temp
    }
}

/// Per-file facts recorded in `cdc_applied_batches`.
struct FileFacts {
    name: String,
    events: i64,
    first: Option<DateTime<Utc>>,
    last: Option<DateTime<Utc>>,
}

/// Applies `files` (in order) in the transaction `tx`; the caller commits. A line that does
/// not decode fails the batch with `Error::Parse` naming the file and line.
pub async fn apply_files(
    tx: &Transaction<'_>,
    sql: &ApplySql,
    spec: &TableSpec,
    files: &[PathBuf],
    run_id: &str,
) -> Result<ApplyStats> {
    let sink = tx
        .copy_in(sql.copy_in.as_str())
        .await
        .map_err(ctx("starting the staging COPY"))?;
    let writer = BinaryCopyInWriter::new(sink, &sql.stage_types);
    pin_mut!(writer);
    let mut facts = Vec::with_capacity(files.len());
    let mut ord: i64 = 0;
    for path in files {
        let name = file_name(path);
        let mut f = FileFacts {
            name: name.clone(),
            events: 0,
            first: None,
            last: None,
        };
        let file =
            std::fs::File::open(path).map_err(|e| Error::io("opening change-log file", path, e))?;
        let reader = std::io::BufReader::with_capacity(1 << 20, file);
        for (i, line) in reader.lines().enumerate() {
            let line = line.map_err(|e| Error::io("reading change-log file", path, e))?;
            if line.trim().is_empty() {
                continue;
            }
            let ev = decode(&line, spec).map_err(|message| Error::Parse {
                path: path.clone(),
                line: i as u64 + 1,
                message,
            })?;
            let ts = timestamp(path, i, ev.ts_us)?;
            let cap = timestamp(path, i, ev.captured_ms.saturating_mul(1000))?;
            f.first = Some(f.first.map_or(ts, |x| x.min(ts)));
            f.last = Some(f.last.map_or(ts, |x| x.max(ts)));
            f.events += 1;
            ord += 1;
            write_stage_row(
                writer.as_mut(),
                ord,
                &name,
                &ev,
                ts,
                cap,
                spec.columns.len(),
            )
            .await?;
        }
        facts.push(f);
    }
    writer
        .finish()
        .await
        .map_err(ctx("finishing the staging COPY"))?;

    tx.execute(sql.kept.as_str(), &[])
        .await
        .map_err(ctx(format!(
            "computing versions for {}",
            spec.history_qualified()
        )))?;
    let closed = tx
        .execute(sql.close.as_str(), &[])
        .await
        .map_err(ctx(format!(
            "closing current versions in {}",
            spec.history_qualified()
        )))?;
    let inserted = tx
        .execute(sql.insert.as_str(), &[])
        .await
        .map_err(ctx(format!(
            "inserting versions into {}",
            spec.history_qualified()
        )))?;
    let deletes: i64 = tx
        .query_one("SELECT count(*) FROM pg_temp.cdc_kept WHERE op = 'd'", &[])
        .await
        .map_err(ctx("counting deletes"))?
        .get(0);
    let names: Vec<&str> = facts.iter().map(|f| f.name.as_str()).collect();
    let events: Vec<i64> = facts.iter().map(|f| f.events).collect();
    let firsts: Vec<Option<DateTime<Utc>>> = facts.iter().map(|f| f.first).collect();
    let lasts: Vec<Option<DateTime<Utc>>> = facts.iter().map(|f| f.last).collect();
    tx.execute(
        sql.record_batches.as_str(),
        &[
            &names,
            &spec.history_qualified(),
            &run_id,
            &events,
            &firsts,
            &lasts,
        ],
    )
    .await
    .map_err(ctx("recording applied batches"))?;
    Ok(ApplyStats {
        files: files.len(),
        events: ord as u64,
        versions_inserted: inserted,
        versions_closed: closed,
        deletes: deletes as u64,
    })
}

fn timestamp(path: &Path, line: usize, us: i64) -> Result<DateTime<Utc>> {
    DateTime::<Utc>::from_timestamp_micros(us).ok_or_else(|| Error::Parse {
        path: path.to_path_buf(),
        line: line as u64 + 1,
        message: format!("time {us} µs is out of range"),
    })
}

async fn write_stage_row(
    writer: std::pin::Pin<&mut BinaryCopyInWriter>,
    ord: i64,
    batch: &str,
    ev: &DecodedEvent,
    ts: DateTime<Utc>,
    cap: DateTime<Utc>,
    ncols: usize,
) -> Result<()> {
    let op = ev.op.as_char().to_string();
    let none: Option<String> = None;
    let mut row: Vec<&(dyn ToSql + Sync)> = Vec::with_capacity(8 + ncols);
    row.extend_from_slice(&[&ord, &batch, &op, &ev.key, &ts, &ev.lsn, &ev.tx_id, &cap]);
    for i in 0..ncols {
        row.push(ev.values.get(i).unwrap_or(&none));
    }
    writer
        .write(&row)
        .await
        .map_err(ctx("streaming events into staging"))
}
