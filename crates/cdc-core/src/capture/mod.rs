//! Capture: the change-source seam and the extractor's loop around it. A `ChangeSource`
//! (timestamp or logical capture) writes each pass into a `ChangeSink` (the change-log
//! directory) and moves its progress only with the sink's `Durable` proof. Each pass is
//! recorded in `pipeline_metadata`; a lost connection is retried with backoff.

pub mod logical;
pub mod resnapshot;
mod rows;
pub mod schema;
pub mod setup;
pub mod timestamp;

use crate::catalog::{logical_progress_name, stream_name};
use crate::changelog::{clean_leftovers, ChangeLogSink};
use crate::config::extractor::ExtractorConfig;
use crate::db::{self, Backoff, DbRole};
use crate::error::{error_chain, Result};
use crate::event::CaptureMode;
use crate::metadata::{self, PendingRecord, Recorder, RunCounts, RunStatus};
use crate::migrate;
use crate::ownership::{claim_log_dir, LogDirOwner, ProcessLock};
use crate::progress::{Progress, Watermark};
use crate::shutdown::Shutdown;
use crate::sink::{ChangeSink, Durable, EventCounts};
use crate::slot;
use crate::table::TableSpec;
use crate::waiting::Waiting;
use crate::{health, metrics};
use chrono::Utc;
use logical::LogicalCapture;
use std::future::Future;
use std::path::PathBuf;
use std::time::Instant;
use timestamp::TimestampCapture;
use tokio_postgres::Client;
use tracing::Instrument;

pub const PIPELINE_NAME: &str = "cdc_extractor";

/// While the source is idle, passes that would find nothing are skipped after a cheap look
/// (`ChangeSource::unchanged`); a full pass still runs at least this often (it moves the
/// timestamp watermark, whose age `status` reports as the capture lag), and a pass that
/// found nothing is recorded in `pipeline_metadata` at most this often.
const IDLE_FULL_PASS_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// A source of changes: prepares the source, then captures pass by pass into a sink. A pass
/// commits the sink and moves its progress (watermark, slot) only with the `Durable` proof
/// the commit returns.
pub trait ChangeSource {
    fn mode(&self) -> CaptureMode;

    /// Whether the next pass takes the initial copy of the table.
    fn snapshot_needed(&self) -> bool;

    /// Checks (and where needed prepares: publication, slot) the source.
    fn prepare(&mut self, client: &Client) -> impl Future<Output = Result<()>> + Send;

    /// Whether nothing the next pass would capture can have committed since the last
    /// successful pass: a cheap look (one query) that is sound but not complete (`false`
    /// when unsure, and always before the first pass). The loop then skips the pass.
    fn unchanged(&self, client: &Client) -> impl Future<Output = Result<bool>> + Send;

    /// Whether a pass waits for changes itself (a replication stream): the loop then runs
    /// the next pass at once instead of sleeping `CDC_EXTRACTION_INTERVAL_SECONDS`.
    fn waits_for_changes(&self) -> bool {
        false
    }

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
    /// Schema changes written.
    pub schema_changes: u64,
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
    // Before anything touches the directories: a second extractor's cleanup below would
    // delete this one's in-flight temporary files.
    let _lock = ProcessLock::extractor(&cfg.log_dir, &cfg.state_dir, &cfg.tables.pipeline_name)?;
    let removed = clean_leftovers(&cfg.log_dir)? + clean_leftovers(&cfg.state_dir)?;
    if removed > 0 {
        tracing::info!(
            files = removed,
            "removed temporary files left by an interrupted run"
        );
    }
    let mut waiting = Waiting::new(
        Some(&cfg.state_dir),
        "extractor",
        "source",
        format!("the source database at {}", cfg.source.display()),
        true,
    );
    // The tables' descriptions need the source: a looping extractor waits for it.
    let mut backoff = Backoff::default();
    let (client, specs) = loop {
        let attempt = async {
            let client = connect_source(&cfg, &shutdown, &mut waiting).await?;
            let specs = cfg.tables.describe(&client).await?;
            Ok((client, specs))
        };
        match attempt.await {
            Ok(v) => break v,
            Err(e) => wait_out(&cfg, &shutdown, &mut waiting, &mut backoff, e).await?,
        }
    };
    let pipeline = &cfg.tables.pipeline_name;
    let stream = stream_name(&specs, pipeline);
    claim_log_dir(
        &cfg.log_dir,
        &LogDirOwner {
            pipeline: pipeline.clone(),
            stream: stream.clone(),
        },
    )?;
    let sink = ChangeLogSink::new(&cfg.log_dir, &stream, cfg.max_rows_per_file);
    let looping = Looping {
        cfg: &cfg,
        specs: &specs,
        shutdown,
        waiting,
    };
    match cfg.capture_mode {
        CaptureMode::Timestamp => {
            let source = TimestampCapture::new(specs.clone(), cfg.state_dir.clone())?
                .following(cfg.tables.clone());
            Box::pin(run_source(source, sink, client, looping)).await
        }
        CaptureMode::Logical => {
            let source = LogicalCapture::new(
                specs.clone(),
                cfg.state_dir.clone(),
                cfg.slot.clone(),
                logical_progress_name(&specs, pipeline),
                cfg.source.clone(),
            )?
            .following(cfg.tables.clone());
            let source = if cfg.once {
                source
            } else {
                source.streaming(looping.shutdown.clone())
            };
            Box::pin(run_source(source, sink, client, looping)).await
        }
    }
}

/// What the extractor's loop runs with.
struct Looping<'a> {
    cfg: &'a ExtractorConfig,
    specs: &'a [TableSpec],
    shutdown: Shutdown,
    /// The source being away.
    waiting: Waiting,
}

/// Connects to the source: with `--once` within `DB_CONNECT_RETRY_SECONDS`, otherwise for as
/// long as it takes.
async fn connect_source(
    cfg: &ExtractorConfig,
    shutdown: &Shutdown,
    waiting: &mut Waiting,
) -> Result<Client> {
    if cfg.once {
        db::connect(&cfg.source, shutdown).await
    } else {
        db::connect_patiently(&cfg.source, shutdown, waiting).await
    }
}

/// A failed start-up step: a transient failure (the source going away half-way) is waited
/// out with backoff unless the extractor runs `--once`; anything else is returned.
async fn wait_out(
    cfg: &ExtractorConfig,
    shutdown: &Shutdown,
    waiting: &mut Waiting,
    backoff: &mut Backoff,
    e: crate::error::Error,
) -> Result<()> {
    if !e.is_retryable() || cfg.once {
        return Err(e);
    }
    waiting.fault(&e);
    if shutdown.sleep(backoff.next_delay()).await {
        return Err(crate::error::Error::Shutdown);
    }
    Ok(())
}

/// The extractor's loop over any source and sink. Capture never needs the warehouse: the
/// passes' records go to `pipeline_metadata` from a recorder of their own, which waits for
/// the warehouse while it is away.
async fn run_source(
    mut capture: impl ChangeSource,
    mut sink: impl ChangeSink,
    source: Client,
    looping: Looping<'_>,
) -> Result<()> {
    let Looping {
        cfg,
        specs,
        shutdown,
        mut waiting,
    } = looping;
    let run_id = metadata::new_run_id("extractor");
    let mut backoff = Backoff::default();
    let mut source = source;
    while let Err(e) = capture.prepare(&source).await {
        wait_out(cfg, &shutdown, &mut waiting, &mut backoff, e).await?;
        source = connect_source(cfg, &shutdown, &mut waiting).await?;
    }
    waiting.resolved();
    let recorder = start_recorder(cfg, specs, &run_id, &shutdown);
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

    backoff.reset();
    let mut pass_no: u64 = 0;
    let mut last_full: Option<Instant> = None;
    let mut last_recorded: Option<Instant> = None;
    let outcome = loop {
        if !capture.waits_for_changes()
            && last_full.is_some_and(|t| t.elapsed() < IDLE_FULL_PASS_EVERY)
        {
            match capture.unchanged(&source).await {
                Ok(true) => {
                    if shutdown.sleep(cfg.interval).await {
                        break Ok(());
                    }
                    continue;
                }
                Ok(false) => {}
                // The pass meets the same fault and handles it.
                Err(e) => {
                    tracing::debug!(error = %error_chain(&e), "cannot tell whether the source changed")
                }
            }
        }
        last_full = Some(Instant::now());
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
                waiting.resolved();
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
        // Every pass that did something or failed; an empty one now and then.
        let worth_recording = match &result {
            Ok(out) => {
                out.events > 0
                    || out.snapshot
                    || last_recorded.is_none_or(|t| t.elapsed() >= IDLE_FULL_PASS_EVERY)
            }
            Err(_) => true,
        };
        if worth_recording {
            last_recorded = Some(Instant::now());
            recorder.record(pass_record(cfg, &tables, started, elapsed, &result));
        }
        match result {
            Ok(_) => {}
            Err(e) if e.is_retryable() && !cfg.once => {
                // The source went away (or the disk is full): wait it out, reconnect, go on.
                metrics::error(&e);
                waiting.fault(&e);
                if shutdown.sleep(backoff.next_delay()).await {
                    break Ok(());
                }
                if !source.is_closed() {
                    continue;
                }
                health::lost(DbRole::Source);
                match db::connect_patiently(&cfg.source, &shutdown, &mut waiting).await {
                    Ok(c) => source = c,
                    Err(crate::error::Error::Shutdown) => break Ok(()),
                    Err(e) => break Err(e),
                }
                continue;
            }
            Err(e) => break Err(e),
        }
        if cfg.once {
            break Ok(());
        }
        // Passes start an interval apart: the time a pass took is not added to the next
        // change's delay (a pass longer than the interval is followed at once).
        if capture.waits_for_changes() {
            if shutdown.is_triggered() {
                break Ok(());
            }
        } else if shutdown
            .sleep(cfg.interval.saturating_sub(clock.elapsed()))
            .await
        {
            break Ok(());
        }
    };
    recorder.finish(std::time::Duration::from_secs(5)).await;
    tracing::info!("extractor stopped");
    outcome
}

/// The recorder of the extractor's passes; it migrates the warehouse's schema on connecting.
fn start_recorder(
    cfg: &ExtractorConfig,
    specs: &[TableSpec],
    run_id: &str,
    shutdown: &Shutdown,
) -> Recorder {
    let specs = specs.to_vec();
    Recorder::start(
        cfg.warehouse.clone(),
        PIPELINE_NAME,
        run_id.to_owned(),
        Waiting::new(
            Some(&cfg.state_dir),
            "extractor",
            "warehouse",
            format!("the warehouse database at {}", cfg.warehouse.display()),
            // Capture goes on while the warehouse is away: not a reason to be unready.
            false,
        ),
        shutdown.clone(),
        move |mut client| {
            let specs = specs.clone();
            async move {
                for spec in &specs {
                    migrate::migrate(&mut client, spec).await?;
                }
                Ok(client)
            }
        },
    )
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
            }
            slot::ensure_publication(&source, &cfg.slot, &specs).await?;
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
    // Last: the setup's own ALTERs (REPLICA IDENTITY) change no shape, but need not be seen.
    done.push(setup::schema_change_trigger(&source).await?);
    Ok(done.join("\n"))
}

/// `extractor resnapshot <schema.table>… | --all`: records the requests durably; the running
/// extractor takes them at its next pass, or, when none runs, one pass here takes them (with
/// `--once` semantics, under the extractor's lock; in logical mode a lost slot is created
/// again when every table is read again). Returns what was done.
pub async fn resnapshot(
    cfg: ExtractorConfig,
    tables: &[String],
    all: bool,
    shutdown: Shutdown,
) -> Result<String> {
    let source = db::connect(&cfg.source, &shutdown).await?;
    let specs = cfg.tables.describe(&source).await?;
    drop(source);
    let ours: Vec<String> = specs.iter().map(|s| s.qualified()).collect();
    let mut wanted: Vec<String> = if all {
        ours.clone()
    } else {
        tables
            .iter()
            .map(|t| {
                if t.contains('.') {
                    t.clone()
                } else {
                    format!("public.{t}")
                }
            })
            .collect()
    };
    wanted.dedup();
    if wanted.is_empty() {
        return Err(crate::error::Error::config(
            "extractor resnapshot",
            "name a table (schema.table), or --all",
        ));
    }
    if let Some(t) = wanted.iter().find(|t| !ours.contains(t)) {
        return Err(crate::error::Error::config(
            "CDC_TABLES",
            format!(
                "{t} is not one of the pipeline's tables ({}); name a table CDC_TABLES selects",
                ours.join(", ")
            ),
        ));
    }
    for t in &wanted {
        resnapshot::request(&cfg.state_dir, t)?;
    }
    let list = wanted.join(", ");
    if let Some(pid) = crate::ownership::running(&cfg.log_dir, "extractor") {
        return Ok(format!(
            "re-snapshot of {list} requested (in {}); the running extractor (process {pid}) takes it at its next pass",
            cfg.state_dir.display()
        ));
    }
    let state_dir = cfg.state_dir.clone();
    let once = ExtractorConfig {
        once: true,
        metrics_addr: None,
        ..cfg
    };
    run(once, shutdown).await?;
    let left: Vec<&String> = wanted
        .iter()
        .filter(|t| resnapshot::requested(&state_dir, t))
        .collect();
    if !left.is_empty() {
        return Err(crate::error::Error::internal(
            "extractor resnapshot",
            format!(
                "the pass ended without taking the re-snapshot of {}; the request stays in {} for the next pass",
                left.iter().map(|t| t.as_str()).collect::<Vec<_>>().join(", "),
                state_dir.display()
            ),
        ));
    }
    Ok(format!(
        "re-snapshot of {list} taken: its rows and end are in the change log; the loader applies them"
    ))
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

/// The record of a pass for `pipeline_metadata`.
fn pass_record(
    cfg: &ExtractorConfig,
    tables: &str,
    started: chrono::DateTime<Utc>,
    elapsed: std::time::Duration,
    result: &Result<PassOutcome>,
) -> PendingRecord {
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
    PendingRecord {
        start: started,
        end: Utc::now(),
        status,
        counts,
        error,
        metrics,
    }
}
