//! Capture: the change-source seam and the extractor's loop around it. A `ChangeSource`
//! (timestamp or logical capture) writes each pass into a `ChangeSink` (the change-log
//! directory) and moves its progress only with the sink's `Durable` proof. Each pass is
//! recorded in `pipeline_metadata`; a lost connection is retried with backoff.

pub mod logical;
mod rows;
pub mod setup;
pub mod timestamp;

use crate::catalog::{logical_progress_name, stream_name};
use crate::changelog::{clean_leftovers, ChangeLogSink};
use crate::config::extractor::ExtractorConfig;
use crate::db::{self, Backoff, DbRole};
use crate::error::{error_chain, Result};
use crate::event::CaptureMode;
use crate::health;
use crate::metadata::{self, RunCounts, RunRecord, RunStatus};
use crate::metrics;
use crate::migrate;
use crate::progress::{Progress, Watermark};
use crate::shutdown::Shutdown;
use crate::sink::{ChangeSink, Durable, EventCounts};
use crate::slot;
use crate::table::TableSpec;
use chrono::Utc;
use logical::LogicalCapture;
use std::future::Future;
use std::path::PathBuf;
use std::time::Instant;
use timestamp::TimestampCapture;
use tokio_postgres::Client;
use tracing::Instrument;

pub const PIPELINE_NAME: &str = "cdc_extractor";

/// A source of changes: prepares the source, then captures pass by pass into a sink. A pass
/// commits the sink and moves its progress (watermark, slot) only with the `Durable` proof
/// the commit returns.
pub trait ChangeSource {
    fn mode(&self) -> CaptureMode;

    /// Whether the next pass takes the initial copy of the table.
    fn snapshot_needed(&self) -> bool;

    /// Checks (and where needed prepares: publication, slot) the source.
    fn prepare(&mut self, client: &Client) -> impl Future<Output = Result<()>> + Send;

    /// One pass: the changes since the last saved progress, written into `sink` and made
    /// durable there, then the progress moved.
    fn pass(
        &mut self,
        client: &mut Client,
        sink: &mut dyn ChangeSink,
    ) -> impl Future<Output = Result<PassOutcome>> + Send;
}

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
    /// The durable events by table and operation.
    pub counts: EventCounts,
    /// Logical mode: every change committed up to this time (µs since the epoch) is captured.
    /// (Timestamp mode: the watermark says it.)
    pub through_us: Option<i64>,
    /// Logical mode: the slot after the pass.
    pub slot: Option<slot::SlotLag>,
}

impl PassOutcome {
    /// The outcome's sink side: what the committed batch holds.
    pub fn written(durable: &Durable) -> Self {
        PassOutcome {
            events: durable.events(),
            bytes: durable.bytes(),
            files: durable.files().iter().map(|f| f.path.clone()).collect(),
            counts: durable.counts().clone(),
            ..PassOutcome::default()
        }
    }
}

/// Runs the extractor until shutdown (or one pass with `once`).
pub async fn run(cfg: ExtractorConfig, shutdown: Shutdown) -> Result<()> {
    let removed = clean_leftovers(&cfg.log_dir)? + clean_leftovers(&cfg.state_dir)?;
    if removed > 0 {
        tracing::info!(
            files = removed,
            "removed temporary files left by an interrupted run"
        );
    }
    let client = db::connect(&cfg.source, &shutdown).await?;
    let specs = cfg.tables.describe(&client).await?;
    let pipeline = &cfg.tables.pipeline_name;
    let sink = ChangeLogSink::new(
        &cfg.log_dir,
        &stream_name(&specs, pipeline),
        cfg.max_rows_per_file,
    );
    match cfg.capture_mode {
        CaptureMode::Timestamp => {
            let source = TimestampCapture::new(specs.clone(), cfg.state_dir.clone())?;
            Box::pin(run_source(source, sink, client, &specs, &cfg, shutdown)).await
        }
        CaptureMode::Logical => {
            let source = LogicalCapture::new(
                specs.clone(),
                cfg.state_dir.clone(),
                cfg.slot.clone(),
                logical_progress_name(&specs, pipeline),
            )?;
            Box::pin(run_source(source, sink, client, &specs, &cfg, shutdown)).await
        }
    }
}

/// The extractor's loop over any source and sink.
async fn run_source(
    mut capture: impl ChangeSource,
    mut sink: impl ChangeSink,
    mut source: Client,
    specs: &[TableSpec],
    cfg: &ExtractorConfig,
    shutdown: Shutdown,
) -> Result<()> {
    let run_id = metadata::new_run_id("extractor");
    capture.prepare(&source).await?;
    let mut warehouse = db::connect(&cfg.warehouse, &shutdown).await?;
    for spec in specs {
        migrate::migrate(&mut warehouse, spec).await?;
    }
    let tables = specs
        .iter()
        .map(|s| s.qualified())
        .collect::<Vec<_>>()
        .join(", ");
    health::started();
    tracing::info!(
        tables = %tables,
        source = %cfg.source.display(),
        log_dir = %cfg.log_dir.display(),
        mode = %capture.mode(),
        snapshot_needed = capture.snapshot_needed(),
        "extractor started"
    );

    let mut backoff = Backoff::default();
    let mut pass_no: u64 = 0;
    loop {
        pass_no += 1;
        let started = Utc::now();
        let clock = Instant::now();
        let span = tracing::info_span!(
            "capture_pass",
            tables = %tables,
            mode = %capture.mode(),
            pass = pass_no,
            snapshot = capture.snapshot_needed(),
        );
        let result = capture
            .pass(&mut source, &mut sink)
            .instrument(span.clone())
            .await;
        let elapsed = clock.elapsed();
        metrics::capture_pass(&result, elapsed);
        let _entered = span.enter();
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
        drop(_entered);
        record_pass(
            &mut warehouse,
            cfg,
            &tables,
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
                health::lost(DbRole::Source);
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

/// `extractor setup`: prepares the source for the configured tables and capture mode
/// (idempotent). Returns what was done, a line per table.
pub async fn setup(cfg: &ExtractorConfig, shutdown: &Shutdown) -> Result<String> {
    let source = db::connect(&cfg.source, shutdown).await?;
    let specs = cfg.tables.describe(&source).await?;
    let mut done = Vec::new();
    match cfg.capture_mode {
        CaptureMode::Timestamp => {
            for spec in &specs {
                done.push(
                    setup::timestamp_table(&source, spec, &cfg.tables.change_time_column).await?,
                );
            }
        }
        CaptureMode::Logical => {
            slot::check_server(&source).await?;
            for spec in &specs {
                done.push(setup::logical_table(&source, spec).await?);
                slot::ensure_publication(&source, &cfg.slot, spec).await?;
            }
            done.push(format!(
                "publication {} holds every table",
                cfg.slot.publication
            ));
            let owner = logical_progress_name(&specs, &cfg.tables.pipeline_name);
            if slot::exists(&source, &cfg.slot).await? {
                let ours = Progress::load(&cfg.state_dir, &owner, CaptureMode::Logical)
                    .is_ok_and(|p| p.logical.is_some_and(|l| l.snapshot_done));
                if !ours {
                    slot::check_owner(&cfg.slot, &cfg.state_dir, &owner)?;
                }
                done.push(format!("slot {} exists", cfg.slot.slot));
            } else {
                slot::create_owned(&source, &cfg.slot, &cfg.state_dir, &owner).await?;
                done.push(format!("slot {} created", cfg.slot.slot));
            }
        }
    }
    Ok(done.join("\n"))
}

/// `extractor drop-slot`: removes the slot and publication, and the logical progress file
/// (the next logical start takes a new initial copy). Returns what was done.
pub async fn drop_slot(cfg: &ExtractorConfig, shutdown: &Shutdown) -> Result<String> {
    let source = db::connect(&cfg.source, shutdown).await?;
    let (slot, publication) = slot::drop(&source, &cfg.slot).await?;
    slot::forget_owner(&cfg.slot, &cfg.state_dir);
    let removed = match cfg.tables.describe(&source).await {
        Ok(specs) => remove_logical_progress(
            &cfg.state_dir,
            &logical_progress_name(&specs, &cfg.tables.pipeline_name),
        ),
        Err(e) => {
            tracing::warn!(error = %error_chain(&e), "cannot tell which progress file is the logical one");
            false
        }
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

/// Removes the progress file `name` if it is a logical one. Returns whether it did.
fn remove_logical_progress(state_dir: &std::path::Path, name: &str) -> bool {
    match Progress::load(state_dir, name, CaptureMode::Logical) {
        Ok(p) if p.logical.is_some() => {
            std::fs::remove_file(Progress::path(state_dir, name)).is_ok()
        }
        _ => false,
    }
}

/// Records a pass; the warehouse being down must not stop capture, so failures only warn.
#[allow(clippy::too_many_arguments)]
async fn record_pass(
    warehouse: &mut Client,
    cfg: &ExtractorConfig,
    tables: &str,
    run_id: &str,
    started: chrono::DateTime<Utc>,
    elapsed: std::time::Duration,
    result: &Result<PassOutcome>,
    shutdown: &Shutdown,
) {
    let (status, counts, error, metrics) = match result {
        Ok(o) => (
            RunStatus::Success,
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
                "table": tables,
                "capture_mode": cfg.capture_mode.as_str(),
            }),
        ),
        Err(e) => (
            RunStatus::Failed,
            RunCounts::default(),
            Some(error_chain(e)),
            serde_json::json!({ "duration_ms": elapsed.as_millis() as u64, "table": tables }),
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
        metrics::error(&e);
        if e.is_retryable() {
            if let Ok(c) = db::connect(&cfg.warehouse, shutdown).await {
                *warehouse = c;
            }
        }
    }
}
