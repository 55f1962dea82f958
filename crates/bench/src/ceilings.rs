//! What the machine can do without the pipeline, measured on the same data in the same run:
//! reading the changed rows out with a bare `COPY … TO STDOUT`, writing the final history
//! rows with a bare binary `COPY` into an empty copy of the history table (same indexes and
//! constraints), and a hand-written SQL-only set-based merge of the same change events.

use crate::procs::Runner;
use crate::setup::{Clusters, PUBLICATION, SLOT, SOURCE_DB};
use anyhow::{Context, Result};
use bytes::Bytes;
use cdc_core::db::copy_text::{push_text, push_time};
use cdc_core::event::{decode, Op};
use cdc_core::table::TableSpec;
use futures_util::{pin_mut, SinkExt, TryStreamExt};
use serde::Serialize;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Instant;
use tokio_postgres::Client;

#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct CopyFigure {
    pub rows: u64,
    pub bytes: u64,
    pub secs: f64,
}

/// Runs `COPY (query) TO STDOUT` and counts what came out.
async fn copy_out(client: &Client, query: &str) -> Result<CopyFigure> {
    let started = Instant::now();
    let stream = client
        .copy_out(&format!("COPY ({query}) TO STDOUT"))
        .await
        .with_context(|| format!("COPY ({query}) TO STDOUT"))?;
    pin_mut!(stream);
    let mut f = CopyFigure::default();
    while let Some(chunk) = stream.try_next().await? {
        f.bytes += chunk.len() as u64;
        f.rows += chunk.iter().filter(|&&b| b == b'\n').count() as u64;
    }
    f.secs = started.elapsed().as_secs_f64();
    Ok(f)
}

/// Reading what the extractor reads, bare: for timestamp capture every row of the table and
/// every tombstone; for logical capture the slot's pending changes (decoded by pgoutput,
/// not consumed).
pub async fn capture(source: &Client, mode: &str) -> Result<CopyFigure> {
    if mode == "logical" {
        return copy_out(
            source,
            &format!(
                "SELECT lsn, xid, data FROM pg_logical_slot_peek_binary_changes('{SLOT}', NULL, NULL,
                   'proto_version', '1', 'publication_names', '{PUBLICATION}', 'messages', 'true')"
            ),
        )
        .await;
    }
    let started = Instant::now();
    let rows = copy_out(source, "SELECT * FROM public.orders").await?;
    let tombs = copy_out(source, "SELECT * FROM public.cdc_tombstones").await?;
    Ok(CopyFigure {
        rows: rows.rows + tombs.rows,
        bytes: rows.bytes + tombs.bytes,
        secs: started.elapsed().as_secs_f64(),
    })
}

/// The copy of the extractor's slot `pg_recvlogical` reads.
const RECV_SLOT: &str = "bench_recvlogical";

/// The streaming floor of logical capture: PostgreSQL's own client, `pg_recvlogical`, reading
/// a copy of the extractor's slot (made before the extractor reads) through a walsender with
/// the same `pgoutput` options and writing it to /dev/null, up to where the backlog ends. No
/// client streaming from a walsender can do less.
pub struct Recvlogical {
    end_lsn: String,
}

impl Recvlogical {
    /// Copies the slot and notes where the backlog ends; `None` (with a note) when there is
    /// no `pg_recvlogical` here.
    pub async fn prepare(source: &Client) -> Result<Option<Recvlogical>> {
        if recvlogical_binary().is_none() {
            eprintln!("bench: no pg_recvlogical (PG_BIN, /usr/lib/postgresql/*/bin, PATH): no streaming floor");
            return Ok(None);
        }
        crate::setup::drop_slot(source, RECV_SLOT).await?;
        let end_lsn: String = source
            .query_one(
                "SELECT (pg_copy_logical_replication_slot($1, $2)).lsn::text,
                        pg_current_wal_lsn()::text",
                &[&SLOT, &RECV_SLOT],
            )
            .await
            .context("copying the extractor's slot for pg_recvlogical")?
            .get(1);
        Ok(Some(Recvlogical { end_lsn }))
    }

    /// Streams the copy to its end; returns the wall time (process start to exit) and drops
    /// the copy.
    pub async fn run(self, runner: &Runner, clusters: &Clusters, source: &Client) -> Result<f64> {
        let bin = recvlogical_binary().context("pg_recvlogical has gone")?;
        let mut runner = runner.clone();
        runner
            .env
            .push(("PGPASSWORD".into(), clusters.password.clone()));
        runner
            .env
            .push(("PGSSLMODE".into(), clusters.tls.mode.to_string()));
        if let Some(root) = &clusters.tls.root_cert {
            runner
                .env
                .push(("PGSSLROOTCERT".into(), root.display().to_string()));
        }
        let port = clusters.source_port.to_string();
        let publications = format!("publication_names={PUBLICATION}");
        let m = runner
            .measured_program(
                "pg_recvlogical",
                &bin,
                &[
                    "-h",
                    &clusters.host,
                    "-p",
                    &port,
                    "-U",
                    &clusters.user,
                    "-d",
                    SOURCE_DB,
                    "--slot",
                    RECV_SLOT,
                    "--start",
                    "--endpos",
                    &self.end_lsn,
                    "-o",
                    "proto_version=1",
                    "-o",
                    &publications,
                    "-o",
                    "messages=true",
                    "-f",
                    "/dev/null",
                    "--no-loop",
                ],
            )
            .await?;
        crate::setup::drop_slot(source, RECV_SLOT).await?;
        Ok(m.secs)
    }
}

/// `pg_recvlogical`: under `PG_BIN`, the newest of `/usr/lib/postgresql/*/bin`, or on PATH.
fn recvlogical_binary() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PG_BIN")
        .map(PathBuf::from)
        .into_iter()
        .collect();
    let mut debian: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"))
        .collect();
    debian.sort_by_key(|p| {
        p.parent()
            .and_then(|v| v.file_name()?.to_str()?.parse::<u32>().ok())
            .unwrap_or(0)
    });
    dirs.extend(debian.into_iter().rev());
    dirs.extend(
        std::env::var_os("PATH")
            .iter()
            .flat_map(std::env::split_paths),
    );
    dirs.into_iter()
        .map(|d| d.join("pg_recvlogical"))
        .find(|p| p.is_file())
}

/// Warms the source's cache for the tables both the ceiling and the extractor read.
pub async fn warm(source: &Client) -> Result<()> {
    source
        .batch_execute(
            "SELECT count(*) FROM public.orders; SELECT count(*) FROM public.cdc_tombstones",
        )
        .await?;
    Ok(())
}

pub async fn history_columns(wh: &Client, spec: &TableSpec) -> Result<Vec<String>> {
    let rows = wh
        .query(
            "SELECT column_name::text FROM information_schema.columns
             WHERE table_schema = $1 AND table_name = $2 AND column_name <> 'surrogate_key'
               AND is_generated = 'NEVER'
             ORDER BY ordinal_position",
            &[&spec.history_schema, &spec.history_table],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Bare binary COPY of every row of the history table into an empty copy of it.
pub async fn apply(wh: &Client, spec: &TableSpec) -> Result<CopyFigure> {
    let h = spec.history_qualified();
    let cols = history_columns(wh, spec).await?.join(", ");
    wh.batch_execute(&format!(
        "DROP TABLE IF EXISTS public.bench_ceiling;
         CREATE TABLE public.bench_ceiling (LIKE {h} INCLUDING ALL)"
    ))
    .await?;
    let stream = wh
        .copy_out(&format!(
            "COPY (SELECT {cols} FROM {h}) TO STDOUT (FORMAT binary)"
        ))
        .await?;
    let chunks: Vec<Bytes> = stream.try_collect().await?;
    let bytes: u64 = chunks.iter().map(|c| c.len() as u64).sum();
    let rows: i64 = wh
        .query_one(&format!("SELECT count(*) FROM {h}"), &[])
        .await?
        .get(0);
    let started = Instant::now();
    let sink = wh
        .copy_in(&format!(
            "COPY public.bench_ceiling ({cols}) FROM STDIN (FORMAT binary)"
        ))
        .await?;
    pin_mut!(sink);
    for c in chunks {
        sink.feed(c).await?;
    }
    sink.finish().await?;
    let secs = started.elapsed().as_secs_f64();
    wh.batch_execute("DROP TABLE public.bench_ceiling").await?;
    Ok(CopyFigure {
        rows: rows as u64,
        bytes,
        secs,
    })
}

/// The change events of `files` as tab-separated COPY text: op, key, change time, LSN, txid,
/// capture time, then the tracked columns.
pub fn merge_input(files: &[PathBuf], spec: &TableSpec) -> Result<(Vec<u8>, u64)> {
    let mut out = String::new();
    let mut n = 0;
    for path in files {
        let text = std::fs::read_to_string(path)?;
        for (i, line) in text.lines().enumerate() {
            let ev = decode(line, spec)
                .map_err(|e| anyhow::anyhow!("{}:{}: {e}", path.display(), i + 1))?;
            let _ = write!(out, "{}\t", ev.op.as_char());
            push_text(&mut out, &ev.key);
            out.push('\t');
            push_time(&mut out, ev.ts_us);
            let _ = write!(
                out,
                "\t{}\t{}\t",
                ev.lsn.map_or("\\N".to_owned(), |l| l.to_string()),
                ev.tx_id.map_or("\\N".to_owned(), |t| t.to_string()),
            );
            push_time(&mut out, ev.captured_ms * 1000);
            for i in 0..spec.columns.len() {
                out.push('\t');
                match ev.values.get(i) {
                    Some(v) if ev.op != Op::Delete => push_text(&mut out, v),
                    _ => out.push_str("\\N"),
                }
            }
            out.push('\n');
            n += 1;
        }
    }
    Ok((out.into_bytes(), n))
}

/// A hand-written set-based merge in plain SQL into an empty copy of the history table, in
/// one transaction: text COPY into a staging table, one UPDATE closing current rows, one
/// INSERT … SELECT of every version (the last event of a key at one instant wins). It does
/// not drop duplicates or no-op updates.
pub async fn sql_merge(wh: &mut Client, spec: &TableSpec, input: &[u8]) -> Result<CopyFigure> {
    let h = spec.history_qualified();
    let hk = &spec.history_key_columns[0];
    let typed: String = spec
        .columns
        .iter()
        .enumerate()
        .map(|(i, c)| format!(", c{i} {}", c.sql_type))
        .collect();
    let c_list: Vec<String> = (0..spec.columns.len()).map(|i| format!("c{i}")).collect();
    let c_list = c_list.join(", ");
    // Generated columns are generated by the history table itself.
    let written: Vec<usize> = (0..spec.columns.len())
        .filter(|&i| spec.columns[i].generated.is_none())
        .collect();
    let w_list: Vec<String> = written.iter().map(|i| format!("c{i}")).collect();
    let w_list = w_list.join(", ");
    let hist: Vec<String> = written
        .iter()
        .map(|&i| spec.history_column(&spec.columns[i]))
        .collect();
    let hist = hist.join(", ");
    wh.batch_execute(&format!(
        "DROP TABLE IF EXISTS public.bench_merge;
         CREATE TABLE public.bench_merge (LIKE {h} INCLUDING ALL)"
    ))
    .await?;
    let started = Instant::now();
    let tx = wh.transaction().await?;
    tx.batch_execute(&format!(
        "CREATE TEMP TABLE merge_stage (op text, k {kt}, ts timestamptz, lsn bigint, txid bigint,
                                        cap timestamptz{typed}) ON COMMIT DROP",
        kt = spec.key[0].sql_type
    ))
    .await?;
    let sink = tx
        .copy_in(&format!(
            "COPY merge_stage (op, k, ts, lsn, txid, cap, {c_list}) FROM STDIN"
        ))
        .await?;
    pin_mut!(sink);
    for chunk in input.chunks(1 << 20) {
        sink.feed(Bytes::copy_from_slice(chunk)).await?;
    }
    sink.finish().await?;
    tx.execute(
        &format!(
            "UPDATE public.bench_merge h SET valid_to = f.ts, is_current = false, updated_at = now()
             FROM (SELECT DISTINCT ON (k) k, ts FROM merge_stage ORDER BY k, ts) f
             WHERE h.{hk} = f.k AND h.is_current"
        ),
        &[],
    )
    .await?;
    let rows = tx
        .execute(
            &format!(
                "INSERT INTO public.bench_merge ({hk}, {hist}, valid_from, valid_to, is_current, is_deleted,
                     cdc_operation, cdc_timestamp, batch_id, source_lsn, source_txid, row_hash)
                 SELECT k, {w_list}, ts, next_ts, next_ts IS NULL, coalesce(next_op = 'd', false), op, cap,
                        'bench', CASE WHEN lsn IS NULL THEN NULL ELSE '0/0'::pg_lsn + lsn::numeric END, txid,
                        md5(ROW({w_list})::text)::uuid
                 FROM (SELECT d.*, lead(ts) OVER w AS next_ts, lead(op) OVER w AS next_op
                       FROM (SELECT DISTINCT ON (k, ts) * FROM merge_stage
                             ORDER BY k, ts, lsn DESC NULLS LAST) d
                       WINDOW w AS (PARTITION BY k ORDER BY ts)) v
                 WHERE op <> 'd'"
            ),
            &[],
        )
        .await?;
    tx.commit().await?;
    let secs = started.elapsed().as_secs_f64();
    wh.batch_execute("DROP TABLE public.bench_merge").await?;
    Ok(CopyFigure {
        rows,
        bytes: input.len() as u64,
        secs,
    })
}
