//! Capture: the extractor's loop around a capture strategy (timestamp now; logical later).
//! Each pass is recorded in `pipeline_metadata`; a lost connection is retried with backoff.

pub mod json;
pub mod logical;
pub mod pgoutput;
pub mod timestamp;

use crate::changelog::clean_leftovers;
use crate::config::{CaptureMode, ExtractorConfig};
use crate::db::{self, Backoff};
use crate::error::{error_chain, Result};
use crate::metadata::{self, RunCounts, RunRecord};
use crate::migrate;
use crate::shutdown::Shutdown;
use chrono::Utc;
use logical::LogicalCapture;
use std::time::Instant;
use timestamp::{PassOutcome, TimestampCapture};
use tokio_postgres::Client;

pub const PIPELINE_NAME: &str = "cdc_extractor";

/// Runs the extractor until shutdown (or one pass with `once`).
pub async fn run(cfg: ExtractorConfig, shutdown: Shutdown) -> Result<()> {
    let removed = clean_leftovers(&cfg.log_dir)? + clean_leftovers(&cfg.state_dir)?;
    if removed > 0 {
        tracing::info!(
            files = removed,
            "removed temporary files left by an interrupted run"
        );
    }
    let mut capture = Strategy::new(&cfg)?;
    let run_id = metadata::new_run_id("extractor");
    let mut source = db::connect(&cfg.source, &shutdown).await?;
    capture.prepare(&source).await?;
    let mut warehouse = db::connect(&cfg.warehouse, &shutdown).await?;
    migrate::migrate(&mut warehouse, &cfg.table).await?;
    tracing::info!(
        table = %cfg.table.qualified(),
        source = %cfg.source.display(),
        log_dir = %cfg.log_dir.display(),
        mode = cfg.capture_mode.as_str(),
        snapshot_needed = capture.snapshot_needed(),
        "extractor started"
    );

    let mut backoff = Backoff::default();
    loop {
        let started = Utc::now();
        let clock = Instant::now();
        let result = capture.pass(&mut source).await;
        let elapsed = clock.elapsed();
        match &result {
            Ok(out) => {
                backoff.reset();
                if out.events > 0 {
                    tracing::info!(
                        events = out.events,
                        rows = out.rows,
                        deletes = out.deletes,
                        files = out.files.len(),
                        bytes = out.bytes,
                        snapshot = out.snapshot,
                        ms = elapsed.as_millis() as u64,
                        "captured changes"
                    );
                } else {
                    tracing::debug!("no changes");
                }
            }
            Err(e) => tracing::warn!(error = %error_chain(e), "capture pass failed"),
        }
        record_pass(
            &mut warehouse,
            &cfg,
            &run_id,
            started,
            elapsed,
            &result,
            &shutdown,
        )
        .await;
        match result {
            Ok(_) => {}
            Err(e) if e.is_retryable() => {
                let delay = backoff.next_delay();
                if shutdown.sleep(delay).await {
                    break;
                }
                source = db::connect(&cfg.source, &shutdown).await?;
                continue;
            }
            Err(e) => return Err(e),
        }
        if cfg.once || shutdown.sleep(cfg.interval).await {
            break;
        }
    }
    tracing::info!("extractor stopped");
    Ok(())
}

/// `extractor drop-slot`: removes the slot and publication, and the logical progress file
/// (the next logical start takes a new initial copy). Returns what was done.
pub async fn drop_slot(cfg: &ExtractorConfig, shutdown: &Shutdown) -> Result<String> {
    let source = db::connect(&cfg.source, shutdown).await?;
    let (slot, publication) = logical::drop_slot(&source, &cfg.slot).await?;
    let path = crate::progress::Progress::path(&cfg.state_dir, &cfg.table);
    let removed = match crate::progress::Progress::load(&cfg.state_dir, &cfg.table, "logical") {
        Ok(p) if p.logical.is_some() => std::fs::remove_file(&path).is_ok(),
        _ => false,
    };
    Ok(format!(
        "slot {}: {}; publication {}: {}; progress file: {}",
        cfg.slot.slot,
        if slot { "dropped" } else { "did not exist" },
        cfg.slot.publication,
        if publication {
            "dropped"
        } else {
            "did not exist"
        },
        if removed { "removed" } else { "left as it was" }
    ))
}

/// The capture strategy chosen by `CDC_CAPTURE_MODE`.
pub enum Strategy {
    Timestamp(TimestampCapture),
    Logical(LogicalCapture),
}

impl Strategy {
    pub fn new(cfg: &ExtractorConfig) -> Result<Self> {
        let (spec, log, state, max) = (
            cfg.table.clone(),
            cfg.log_dir.clone(),
            cfg.state_dir.clone(),
            cfg.max_rows_per_file,
        );
        Ok(match cfg.capture_mode {
            CaptureMode::Timestamp => {
                Strategy::Timestamp(TimestampCapture::new(spec, log, state, max)?)
            }
            CaptureMode::Logical => Strategy::Logical(LogicalCapture::new(
                spec,
                log,
                state,
                max,
                cfg.slot.clone(),
            )?),
        })
    }

    /// Checks (and for logical mode prepares) the source.
    pub async fn prepare(&mut self, client: &Client) -> Result<()> {
        match self {
            Strategy::Timestamp(t) => t.check_source(client).await,
            Strategy::Logical(l) => l.prepare(client).await,
        }
    }

    pub async fn pass(&mut self, client: &mut Client) -> Result<PassOutcome> {
        match self {
            Strategy::Timestamp(t) => t.pass(client).await,
            Strategy::Logical(l) => l.pass(client).await,
        }
    }

    pub fn snapshot_needed(&self) -> bool {
        match self {
            Strategy::Timestamp(t) => t.progress().watermark.is_none(),
            Strategy::Logical(l) => !l
                .progress()
                .logical
                .as_ref()
                .is_some_and(|s| s.snapshot_done),
        }
    }
}

/// Records a pass; the warehouse being down must not stop capture, so failures only warn.
async fn record_pass(
    warehouse: &mut Client,
    cfg: &ExtractorConfig,
    run_id: &str,
    started: chrono::DateTime<Utc>,
    elapsed: std::time::Duration,
    result: &Result<PassOutcome>,
    shutdown: &Shutdown,
) {
    let (status, counts, error, metrics) = match result {
        Ok(o) => (
            "success",
            RunCounts {
                processed: o.events as i64,
                inserted: 0,
                updated: o.rows as i64,
                deleted: o.deletes as i64,
            },
            None,
            serde_json::json!({
                "files": o.files.iter().map(|f| crate::changelog::file_name(f)).collect::<Vec<_>>(),
                "bytes": o.bytes,
                "snapshot": o.snapshot,
                "duration_ms": elapsed.as_millis() as u64,
                "watermark_us": o.watermark.as_ref().map(|w| w.ts_us),
                "table": cfg.table.qualified(),
                "capture_mode": cfg.capture_mode.as_str(),
            }),
        ),
        Err(e) => (
            "failed",
            RunCounts::default(),
            Some(error_chain(e)),
            serde_json::json!({ "duration_ms": elapsed.as_millis() as u64, "table": cfg.table.qualified() }),
        ),
    };
    let record = RunRecord {
        pipeline_name: PIPELINE_NAME,
        run_id,
        start: started,
        end: Utc::now(),
        status,
        counts,
        error,
        metrics,
    };
    if let Err(e) = metadata::record(&*warehouse, &record).await {
        tracing::warn!(error = %error_chain(&e), "could not record the pass in pipeline_metadata");
        if e.is_retryable() {
            if let Ok(c) = db::connect(&cfg.warehouse, shutdown).await {
                *warehouse = c;
            }
        }
    }
}
