//! `scd2-loader status`: what has been captured and applied, what is waiting, and the lag
//! (the watermark's age in timestamp mode; in logical mode the age of the newest commit
//! captured, and the slot's retained WAL).

use crate::catalog::logical_progress_name;
use crate::changelog::{self, DEAD_LETTER_DIR};
use crate::config::loader::LoaderConfig;
use crate::db::{ctx, DbSettings};
use crate::error::Result;
use crate::event::CaptureMode;
use crate::progress::Progress;
use crate::slot;
use crate::table::TableSpec;
use chrono::{DateTime, Utc};
use std::fmt::Write as _;
use tokio_postgres::Client;

/// The status report and what makes the pipeline unhealthy (empty when healthy).
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub text: String,
    pub problems: Vec<String>,
}

impl Report {
    /// The report with its verdict first.
    pub fn render(&self) -> String {
        let mut out = if self.problems.is_empty() {
            "health: OK\n".to_owned()
        } else {
            let mut h = format!("health: UNHEALTHY ({})\n", self.problems.len());
            for p in &self.problems {
                let _ = writeln!(h, "  - {p}");
            }
            h
        };
        out.push_str(&self.text);
        out
    }
}

/// Renders the status report. `warehouse` may be absent (unreachable): the file side is
/// still reported.
pub async fn status(
    cfg: &LoaderConfig,
    warehouse: Option<&Client>,
    source: Option<&Client>,
) -> Result<Report> {
    let mut s = String::new();
    let mut problems = Vec::new();
    let now = Utc::now();
    for program in ["extractor", "scd2-loader"] {
        match crate::ownership::running(&cfg.log_dir, program) {
            Some(pid) => {
                let _ = writeln!(s, "{program:<11} running (process {pid})");
            }
            None => {
                let _ = writeln!(s, "{program:<11} not running");
                problems.push(format!("{program} is not running"));
            }
        }
    }
    let specs = match source {
        Some(src) => match cfg.tables.describe(src).await {
            Ok(specs) => Some(specs),
            Err(e) => {
                let _ = writeln!(s, "tables: {e}");
                problems.push(format!("the configured tables cannot be described: {e}"));
                None
            }
        },
        None => {
            let _ = writeln!(
                s,
                "tables: source unreachable, so the configured tables cannot be described"
            );
            problems.push(format!(
                "the source database at {} is unreachable",
                cfg.source.display()
            ));
            None
        }
    };

    for w in crate::waiting::current(&cfg.state_dir) {
        let _ = writeln!(
            s,
            "{} waiting for {} since {} ({:.0}s; last error: {})",
            w.program,
            w.waiting_for,
            w.since.format("%Y-%m-%d %H:%M:%S UTC"),
            secs(now - w.since),
            w.last_error
        );
        problems.push(format!(
            "{} is waiting for {} since {}",
            w.program,
            w.waiting_for,
            w.since.format("%Y-%m-%d %H:%M:%S UTC")
        ));
    }

    let pending = changelog::pending_files(&cfg.log_dir)?;
    let dead = std::fs::read_dir(cfg.log_dir.join(DEAD_LETTER_DIR))
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(".jsonl"))
                .count()
        })
        .unwrap_or(0);
    let _ = writeln!(s, "change log  {}", cfg.log_dir.display());
    let _ = writeln!(s, "  pending files      {}", pending.len());
    if let Some(oldest) = pending.first() {
        let waited = std::fs::metadata(oldest)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok());
        if let Some(w) = waited.filter(|w| *w > cfg.max_lag) {
            problems.push(format!(
                "apply lag: the oldest pending file has waited {:.0}s (CDC_MAX_LAG_SECONDS {})",
                w.as_secs_f64(),
                cfg.max_lag.as_secs_f64()
            ));
        }
        let age = waited
            .map(|d| format!("{:.1}s", d.as_secs_f64()))
            .unwrap_or_else(|| "?".into());
        let _ = writeln!(
            s,
            "  oldest pending     {} (waiting {age})",
            changelog::file_name(oldest)
        );
    }
    let _ = writeln!(s, "  dead-lettered      {dead}");
    if dead > 0 {
        problems.push(format!(
            "{dead} change-log file(s) in {} (the reason is beside each, in <name>.reason.json)",
            cfg.log_dir.join(DEAD_LETTER_DIR).display()
        ));
    }

    match &specs {
        Some(specs) => extractor_progress(&mut s, &mut problems, cfg, specs, source, now).await,
        None => {
            let _ = writeln!(
                s,
                "extractor: progress unknown (the tables are not described)"
            );
        }
    }

    let Some(w) = warehouse else {
        let _ = writeln!(s, "warehouse: unreachable");
        problems.push(format!(
            "the warehouse database at {} is unreachable",
            cfg.warehouse.display()
        ));
        return Ok(Report { text: s, problems });
    };
    for spec in specs.iter().flatten() {
        history_summary(&mut s, cfg, w, spec, now).await?;
    }
    held_tables(&mut s, &mut problems, w).await?;
    let runs = w
        .query(
            "SELECT DISTINCT ON (pipeline_name) pipeline_name, status, end_time, coalesce(error_message, '')
             FROM public.pipeline_metadata ORDER BY pipeline_name, id DESC",
            &[],
        )
        .await
        .map_err(ctx("reading pipeline_metadata"))?;
    for r in runs {
        let end: Option<DateTime<Utc>> = r.get(2);
        let err: String = r.get(3);
        let _ = writeln!(
            s,
            "  last {:<16} {} {}{}",
            r.get::<_, String>(0),
            r.get::<_, String>(1),
            end.map(|e| format!("({:.1}s ago)", secs(now - e)))
                .unwrap_or_default(),
            if err.is_empty() {
                String::new()
            } else {
                format!(" error: {err}")
            }
        );
    }
    Ok(Report { text: s, problems })
}

/// The extractor's progress: the logical slot's, or each table's watermark.
async fn extractor_progress(
    s: &mut String,
    problems: &mut Vec<String>,
    cfg: &LoaderConfig,
    specs: &[TableSpec],
    source: Option<&Client>,
    now: DateTime<Utc>,
) {
    let logical = logical_progress_name(specs, &cfg.tables.pipeline_name);
    match Progress::peek(&cfg.state_dir, &logical) {
        Ok(Some(p)) if p.capture_mode == CaptureMode::Logical => {
            logical_progress(s, problems, cfg, &p, source, now).await;
            return;
        }
        Ok(_) => {}
        Err(e) => {
            let _ = writeln!(s, "extractor: {e}");
            return;
        }
    }
    for spec in specs {
        let name = spec.qualified();
        match Progress::peek(&cfg.state_dir, &name) {
            Ok(Some(p)) => match &p.watermark {
                Some(w) => {
                    let wm = DateTime::<Utc>::from_timestamp_micros(w.ts_us).unwrap_or_default();
                    if (now - wm).to_std().is_ok_and(|lag| lag > cfg.max_lag) {
                        problems.push(format!(
                            "capture lag of {name}: its watermark is {:.0}s old (CDC_MAX_LAG_SECONDS {})",
                            secs(now - wm),
                            cfg.max_lag.as_secs_f64()
                        ));
                    }
                    let _ = writeln!(s, "extractor (timestamp mode) {name}");
                    let _ = writeln!(
                        s,
                        "  watermark          {} (capture lag {:.1}s)",
                        wm.to_rfc3339(),
                        secs(now - wm)
                    );
                    let _ = writeln!(
                        s,
                        "  last progress      {}",
                        p.updated_at.as_deref().unwrap_or("-")
                    );
                }
                None => {
                    let _ = writeln!(
                        s,
                        "extractor {name}: no capture yet (the first pass takes a snapshot)"
                    );
                }
            },
            Ok(None) => {
                let _ = writeln!(
                    s,
                    "extractor {name}: no capture yet (the first pass takes a snapshot)"
                );
            }
            Err(e) => {
                let _ = writeln!(s, "extractor {name}: {e}");
            }
        }
    }
    if let Some(src) = source {
        prepared_holds(s, problems, cfg, src, now).await;
    }
}

/// Timestamp mode: the prepared transactions of the source, each of which holds the
/// watermark (of every table) until it is committed or rolled back; a forgotten one stalls
/// capture, so one older than `CDC_MAX_LAG_SECONDS` makes the pipeline unhealthy.
async fn prepared_holds(
    s: &mut String,
    problems: &mut Vec<String>,
    cfg: &LoaderConfig,
    source: &Client,
    now: DateTime<Utc>,
) {
    let prepared = match crate::capture::timestamp::prepared_xacts(source).await {
        Ok(p) => p,
        Err(e) => {
            let _ = writeln!(s, "  prepared transactions unreadable: {e}");
            return;
        }
    };
    for p in prepared {
        let age = secs(now - p.prepared);
        let _ = writeln!(
            s,
            "  held by prepared transaction '{}' (xid {}, owner {}, prepared at {}, {age:.0}s ago) until COMMIT PREPARED or ROLLBACK PREPARED",
            p.gid,
            p.xid,
            p.owner,
            p.prepared.to_rfc3339()
        );
        if (now - p.prepared).to_std().is_ok_and(|a| a > cfg.max_lag) {
            problems.push(format!(
                "prepared transaction '{}' has held the capture watermark for {age:.0}s (CDC_MAX_LAG_SECONDS {}): \
                 COMMIT PREPARED or ROLLBACK PREPARED it",
                p.gid,
                cfg.max_lag.as_secs_f64()
            ));
        }
    }
}

/// The logical slot's progress and lag: in seconds, how old the newest commit is up to which
/// everything is captured (checked against `CDC_MAX_LAG_SECONDS`); in bytes, the WAL the slot
/// has not confirmed and the WAL it retains.
async fn logical_progress(
    s: &mut String,
    problems: &mut Vec<String>,
    cfg: &LoaderConfig,
    p: &Progress,
    source: Option<&Client>,
    now: DateTime<Utc>,
) {
    let _ = writeln!(s, "extractor (logical mode, slot {})", cfg.slot_name);
    let _ = writeln!(
        s,
        "  initial copy       {}",
        if p.logical.as_ref().is_some_and(|l| l.snapshot_done) {
            "taken"
        } else {
            "not yet"
        }
    );
    let _ = writeln!(
        s,
        "  last progress      {}",
        p.updated_at.as_deref().unwrap_or("-")
    );
    let through = p
        .logical
        .as_ref()
        .and_then(|l| l.captured_through_us)
        .and_then(DateTime::<Utc>::from_timestamp_micros);
    match through {
        Some(t) => {
            // A pass that ended after `now` may have confirmed a commit past it: no lag.
            let lag = secs(now - t).max(0.0);
            let _ = writeln!(
                s,
                "  captured through   {} (capture lag {lag:.1}s)",
                t.to_rfc3339()
            );
            if (now - t).to_std().is_ok_and(|l| l > cfg.max_lag) {
                problems.push(format!(
                    "capture lag: changes committed since {} are not captured yet ({lag:.0}s; CDC_MAX_LAG_SECONDS {})",
                    t.format("%Y-%m-%d %H:%M:%S UTC"),
                    cfg.max_lag.as_secs_f64()
                ));
            }
        }
        None => {
            let _ = writeln!(
                s,
                "  captured through   unknown (no pass has recorded it yet)"
            );
        }
    }
    match source {
        Some(src) => match slot::lag(src, &cfg.slot_name).await {
            Ok(Some(lag)) => {
                let _ = writeln!(s, "  slot retained WAL  {} bytes", lag.retained_wal_bytes);
                if lag.retained_wal_bytes > cfg.max_slot_wal_bytes {
                    problems.push(format!(
                        "slot {} retains {} MiB of WAL (CDC_MAX_SLOT_WAL_MB {})",
                        cfg.slot_name,
                        lag.retained_wal_bytes >> 20,
                        cfg.max_slot_wal_bytes >> 20
                    ));
                }
                let _ = writeln!(s, "  unconfirmed WAL    {} bytes", lag.confirmed_lag_bytes);
            }
            Ok(None) => {
                let _ = writeln!(s, "  slot               missing on the source");
                if p.logical.as_ref().is_some_and(|l| l.snapshot_done) {
                    problems.push(format!(
                        "slot {} is missing on the source, so changes may be lost",
                        cfg.slot_name
                    ));
                }
            }
            Err(e) => {
                let _ = writeln!(s, "  slot               unreadable: {e}");
            }
        },
        None => {
            let _ = writeln!(s, "  slot               source unreachable");
        }
    }
}

/// The tables held at a schema change their history cannot hold (`cdc_held_tables`): each
/// makes the pipeline unhealthy, whether or not the loader runs.
async fn held_tables(s: &mut String, problems: &mut Vec<String>, w: &Client) -> Result<()> {
    let exists: bool = w
        .query_one(
            "SELECT to_regclass('public.cdc_held_tables') IS NOT NULL",
            &[],
        )
        .await
        .map_err(ctx("looking for cdc_held_tables"))?
        .get(0);
    if !exists {
        return Ok(());
    }
    let rows = w
        .query(
            "SELECT source_table, held_since, batch_id, line, reason
             FROM public.cdc_held_tables ORDER BY held_since, source_table",
            &[],
        )
        .await
        .map_err(ctx("reading cdc_held_tables"))?;
    for r in rows {
        let (table, since) = (r.get::<_, String>(0), r.get::<_, DateTime<Utc>>(1));
        let _ = writeln!(
            s,
            "held        {table} since {} at the schema change in {} line {}: {}",
            since.format("%Y-%m-%d %H:%M:%S UTC"),
            r.get::<_, String>(2),
            r.get::<_, i32>(3),
            r.get::<_, String>(4)
        );
        problems.push(format!(
            "{table} is held at a schema change its history cannot hold since {} (its changes wait; the other tables go on)",
            since.format("%Y-%m-%d %H:%M:%S UTC")
        ));
    }
    Ok(())
}

/// Versions, current rows, keys and deletes of one table's history.
async fn history_summary(
    s: &mut String,
    cfg: &LoaderConfig,
    w: &Client,
    spec: &TableSpec,
    now: DateTime<Utc>,
) -> Result<()> {
    let h = spec.history_qualified();
    let exists: bool = w
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&h])
        .await
        .map_err(ctx("looking for the history table"))?
        .get(0);
    if !exists {
        let _ = writeln!(
            s,
            "warehouse: {h} does not exist yet (the loader creates it at start-up)"
        );
        return Ok(());
    }
    let row = w
        .query_one(
            &format!(
                "SELECT count(*), count(*) FILTER (WHERE is_current), count(DISTINCT {k}),
                        count(*) FILTER (WHERE is_deleted), max(valid_from), max(cdc_timestamp)
                 FROM {h}",
                k = if spec.key.len() == 1 {
                    spec.history_key_list("")
                } else {
                    format!("ROW({})", spec.history_key_list(""))
                }
            ),
            &[],
        )
        .await
        .map_err(ctx(format!("summarizing {h}")))?;
    let _ = writeln!(s, "warehouse   {} ({})", cfg.warehouse.display(), h);
    let _ = writeln!(s, "  versions           {}", row.get::<_, i64>(0));
    let _ = writeln!(s, "  current rows       {}", row.get::<_, i64>(1));
    let _ = writeln!(s, "  keys               {}", row.get::<_, i64>(2));
    let _ = writeln!(s, "  deletes recorded   {}", row.get::<_, i64>(3));
    if let Some(last) = row.get::<_, Option<DateTime<Utc>>>(4) {
        let _ = writeln!(
            s,
            "  newest change      {} ({:.1}s ago)",
            last.to_rfc3339(),
            secs(now - last)
        );
    }
    let batches = w
        .query_one(
            "SELECT count(*), max(applied_at), (SELECT batch_id FROM public.cdc_applied_batches ORDER BY applied_at DESC, batch_id DESC LIMIT 1)
             FROM public.cdc_applied_batches WHERE $1 = ANY(string_to_array(history_table, ', '))",
            &[&h],
        )
        .await
        .map_err(ctx("summarizing cdc_applied_batches"))?;
    let _ = writeln!(s, "  applied files      {}", batches.get::<_, i64>(0));
    if let (Some(at), Some(name)) = (
        batches.get::<_, Option<DateTime<Utc>>>(1),
        batches.get::<_, Option<String>>(2),
    ) {
        let _ = writeln!(
            s,
            "  last applied       {name} at {} ({:.1}s ago)",
            at.to_rfc3339(),
            secs(now - at)
        );
    }
    Ok(())
}

fn secs(d: chrono::Duration) -> f64 {
    d.num_milliseconds() as f64 / 1000.0
}

/// `status` as the binary runs it: the warehouse part is left out if it is unreachable.
pub async fn run(cfg: &LoaderConfig, shutdown: &crate::shutdown::Shutdown) -> Result<Report> {
    let quick = |db: &DbSettings| {
        let mut d = db.clone();
        d.connect_retry = std::time::Duration::from_secs(2);
        d
    };
    let warehouse = crate::db::connect(&quick(&cfg.warehouse), shutdown)
        .await
        .ok();
    let source = crate::db::connect(&quick(&cfg.source), shutdown).await.ok();
    status(cfg, warehouse.as_ref(), source.as_ref()).await
}
