//! The update-every-row rounds (README, "Performance"): `--round-rows` orders, then
//! `--rounds` rounds that each update every one of them on the source, capture the changes
//! and time `scd2-loader --once` on them (every change closes a version and adds one). Beside
//! each round, in the same run, the least SQL doing the same work on a plain copy of the same
//! history (same columns, indexes and constraints, the same rows before the round): one
//! `UPDATE … FROM unnest(…)` closing the current rows and one binary `COPY` of the round's
//! new versions, in one transaction.

use crate::Bench;
use anyhow::{bail, Context, Result};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures_util::{pin_mut, SinkExt, TryStreamExt};
use serde::Serialize;
use std::path::Path;
use std::time::Instant;
use tokio_postgres::Client;

/// One round: the loader's and the least SQL's time for the same changes.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Round {
    /// History rows before the round.
    pub history_rows: i64,
    /// Change events the round's capture wrote.
    pub changes: u64,
    /// `scd2-loader --once`, the whole process.
    pub loader_secs: f64,
    /// What the loader logged: its apply transactions' time and where it went (waiting for
    /// decoded events, newest + plan, close, copy), in milliseconds.
    pub loader_apply_ms: u64,
    pub loader_phases_ms: [u64; 4],
    /// The least SQL on the plain copy, and its UPDATE alone.
    pub least_secs: f64,
    pub least_update_secs: f64,
    /// The round after the history was grown to --growth-rows rows.
    pub grown: bool,
}

const LEAST: &str = "public.bench_least";

impl Bench {
    pub(crate) async fn rounds(&self, mode: &str) -> Result<Vec<Round>> {
        let (rounds, rows) = (self.args.rounds, self.args.round_rows);
        self.clusters.fresh().await?;
        let runner = self.runner(mode, "rounds")?;
        let log_dir = runner.cwd.join("cdc_logs");
        let source = self.clusters.source().await?;
        source
            .execute(
                "INSERT INTO public.orders (customer_id, product_id, quantity, unit_price)
                 SELECT 1 + g % 500, 1 + g % 50, 1 + g % 5, (g % 1000) / 10.0
                 FROM generate_series(1, $1::int8) g",
                &[&(rows as i64)],
            )
            .await
            .context("inserting the rounds' rows")?;
        self.capture_all(&runner, &log_dir).await?;
        runner.measured("scd2-loader", &["--once"]).await?;

        // The plain copy, holding what the history holds.
        let mut wh = self.clusters.warehouse().await?;
        let h = self.spec.history_qualified();
        let cols = crate::ceilings::history_columns(&wh, &self.spec)
            .await?
            .join(", ");
        wh.batch_execute(&format!(
            "DROP TABLE IF EXISTS {LEAST};
             CREATE TABLE {LEAST} (LIKE {h} INCLUDING ALL);
             INSERT INTO {LEAST} ({cols}) SELECT {cols} FROM {h};"
        ))
        .await
        .context("copying the history for the least SQL")?;
        for t in [h.as_str(), LEAST] {
            wh.batch_execute(&format!("VACUUM ANALYZE {t}")).await?;
        }
        let loader_log = runner.log_dir.join("scd2-loader.log");
        let hk = &self.spec.history_key_columns[0];
        let kt = &self.spec.key[0].sql_type;
        let grow = self.args.growth_rows;
        let mut out = Vec::with_capacity(rounds + 1);
        for i in 0..rounds + usize::from(grow > 0) {
            let grown = i == rounds;
            if grown {
                eprintln!("bench: {mode}: growing the history to {grow} rows");
                if !grow_history(&wh, &h, hk, &cols, grow).await? {
                    eprintln!(
                        "bench: {mode}: the history already has {grow} rows or more: no growth round"
                    );
                    break;
                }
            }
            let history_rows: i64 = wh
                .query_one(&format!("SELECT count(*) FROM {h}"), &[])
                .await?
                .get(0);
            source
                .execute("UPDATE public.orders SET quantity = quantity + 1", &[])
                .await
                .context("updating every row")?;
            let before = change_logs_len(&log_dir)?;
            self.capture_all(&runner, &log_dir).await?;
            let changes = crate::change_logs(&log_dir)?
                .iter()
                .skip(before)
                .map(|f| crate::count_lines(f))
                .sum::<Result<u64>>()?;
            let started_at: DateTime<Utc> = wh.query_one("SELECT now()", &[]).await?.get(0);
            let log_from = std::fs::metadata(&loader_log).map_or(0, |m| m.len());
            wh.batch_execute("CHECKPOINT").await?;
            let m = runner.measured("scd2-loader", &["--once"]).await?;
            let (loader_apply_ms, loader_phases_ms) = applied_ms(&loader_log, log_from)?;

            // The round's new versions and what closes the copy's current rows.
            let new_rows = wh
                .query(
                    &format!(
                        "SELECT {hk}::text, valid_from, source_lsn::text FROM {h}
                         WHERE is_current AND created_at >= $1"
                    ),
                    &[&started_at],
                )
                .await?;
            if new_rows.len() as u64 * 10 < changes * 9 {
                bail!(
                    "round {}: the loader wrote {} current versions for {changes} changes",
                    i + 1,
                    new_rows.len()
                );
            }
            let keys: Vec<String> = new_rows.iter().map(|r| r.get(0)).collect();
            let ts: Vec<DateTime<Utc>> = new_rows.iter().map(|r| r.get(1)).collect();
            let lsn: Vec<Option<String>> = new_rows.iter().map(|r| r.get(2)).collect();
            let copy: Vec<Bytes> = wh
                .copy_out(&format!(
                    "COPY (SELECT {cols} FROM {h} WHERE is_current AND created_at >= '{}')
                     TO STDOUT (FORMAT binary)",
                    started_at.to_rfc3339()
                ))
                .await?
                .try_collect()
                .await?;
            wh.batch_execute("CHECKPOINT").await?;
            let (least_secs, least_update_secs) =
                least_sql(&mut wh, hk, kt, &cols, &keys, &ts, &lsn, copy).await?;
            let r = Round {
                history_rows,
                changes,
                loader_secs: m.secs,
                loader_apply_ms,
                loader_phases_ms,
                least_secs,
                least_update_secs,
                grown,
            };
            let which = if grown {
                "growth round".to_owned()
            } else {
                format!("round {}/{rounds}", i + 1)
            };
            eprintln!(
                "bench: {mode}: {which}: {changes} changes over {history_rows} history rows: \
                 loader {:.2} s (apply {} ms, phases {:?}), least SQL {:.2} s (UPDATE {:.2} s): {:.2}x",
                r.loader_secs,
                r.loader_apply_ms,
                r.loader_phases_ms,
                r.least_secs,
                r.least_update_secs,
                r.least_secs / r.loader_secs
            );
            out.push(r);
        }
        runner
            .measured("scd2-loader", &["verify"])
            .await
            .context("the history the rounds produced does not verify")?;
        wh.batch_execute(&format!("DROP TABLE {LEAST}")).await?;
        Ok(out)
    }

    /// Extractor passes until one finds nothing.
    async fn capture_all(&self, runner: &crate::procs::Runner, log_dir: &Path) -> Result<()> {
        loop {
            let before = change_logs_len(log_dir)?;
            runner.measured("extractor", &["--once"]).await?;
            if change_logs_len(log_dir)? == before {
                return Ok(());
            }
        }
    }
}

fn change_logs_len(dir: &Path) -> Result<usize> {
    Ok(crate::change_logs(dir)?.len())
}

/// Grows the history and its plain copy to at least `rows` rows: whole copies of the
/// history's keys under new keys (past every key there is), each ended by a delete a second
/// after its last version began, as orders deleted long ago would be. Nothing current is
/// added, so the rounds' keys and the source are as before; the indexes grow as they would.
/// Whether anything was added.
async fn grow_history(wh: &Client, h: &str, hk: &str, cols: &str, rows: u64) -> Result<bool> {
    let r = wh
        .query_one(&format!("SELECT count(*), max({hk})::int8 FROM {h}"), &[])
        .await?;
    let (have, max_key): (i64, i64) = (r.get(0), r.get(1));
    let copies = rows
        .saturating_sub(have as u64)
        .div_ceil(have.max(1) as u64);
    if copies == 0 {
        return Ok(false);
    }
    let exprs = cols
        .split(", ")
        .map(|c| match c {
            c if c == hk => format!("{hk} + {max_key} * g"),
            "is_current" => "false".to_owned(),
            "is_deleted" => "is_deleted OR is_current".to_owned(),
            "valid_to" => "coalesce(valid_to, valid_from + interval '1 second')".to_owned(),
            c => c.to_owned(),
        })
        .collect::<Vec<_>>()
        .join(", ");
    wh.batch_execute(&format!(
        "INSERT INTO {h} ({cols}) SELECT {exprs} FROM {h} CROSS JOIN generate_series(1, {copies}) g
         WHERE {hk} <= {max_key};
         INSERT INTO {LEAST} ({cols}) SELECT {cols} FROM {h} WHERE {hk} > {max_key};"
    ))
    .await
    .context("growing the history")?;
    for t in [h, LEAST] {
        wh.batch_execute(&format!("VACUUM ANALYZE {t}")).await?;
    }
    Ok(true)
}

/// The least SQL, timed from its transaction's start to its commit; and its UPDATE.
#[allow(clippy::too_many_arguments)]
async fn least_sql(
    wh: &mut Client,
    hk: &str,
    kt: &str,
    cols: &str,
    keys: &[String],
    ts: &[DateTime<Utc>],
    lsn: &[Option<String>],
    copy: Vec<Bytes>,
) -> Result<(f64, f64)> {
    let started = Instant::now();
    let tx = wh.transaction().await?;
    tx.execute(
        &format!(
            "UPDATE {LEAST} x SET valid_to = f.ts, end_lsn = f.lsn, is_current = false, updated_at = now()
             FROM unnest($1::text[]::{kt}[], $2::timestamptz[], $3::text[]::pg_lsn[]) AS f(k, ts, lsn)
             WHERE x.{hk} = f.k AND x.is_current"
        ),
        &[&keys, &ts, &lsn],
    )
    .await
    .context("the least SQL's UPDATE")?;
    let update = started.elapsed().as_secs_f64();
    let sink = tx
        .copy_in(&format!("COPY {LEAST} ({cols}) FROM STDIN (FORMAT binary)"))
        .await?;
    pin_mut!(sink);
    for c in copy {
        sink.feed(c).await?;
    }
    sink.finish().await.context("the least SQL's COPY")?;
    tx.commit().await?;
    Ok((started.elapsed().as_secs_f64(), update))
}

/// The apply time and phases the loader logged after byte `from` of its log.
fn applied_ms(log: &Path, from: u64) -> Result<(u64, [u64; 4])> {
    let text = std::fs::read(log).with_context(|| format!("reading {}", log.display()))?;
    let text = String::from_utf8_lossy(text.get(from as usize..).unwrap_or_default());
    let (mut ms, mut phases) = (0, [0u64; 4]);
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let f = v.get("fields").unwrap_or(&v);
        if f["message"] != "applied change-log files" {
            continue;
        }
        ms += f["ms"].as_u64().unwrap_or(0);
        // `phases_ms` is logged with Debug: "[a, b, c, d]".
        let p = f["phases_ms"].as_str().unwrap_or("");
        for (slot, n) in phases.iter_mut().zip(
            p.trim_matches(|c| c == '[' || c == ']')
                .split(',')
                .map(|x| x.trim().parse::<u64>().unwrap_or(0)),
        ) {
            *slot += n;
        }
    }
    Ok((ms, phases))
}
