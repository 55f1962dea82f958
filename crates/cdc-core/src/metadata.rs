//! `pipeline_metadata`: one row per extractor pass and per loader batch, with counts,
//! status, error and metrics.

use crate::db::ctx;
use crate::error::Result;
use chrono::{DateTime, Utc};
use tokio_postgres::GenericClient;

/// A run identifier: the process start time and a random suffix.
pub fn new_run_id(binary: &str) -> String {
    format!(
        "{binary}-{}-{:08x}",
        Utc::now().format("%Y%m%dT%H%M%S"),
        rand::random::<u32>()
    )
}

#[derive(Debug, Clone, Default)]
pub struct RunCounts {
    pub processed: i64,
    pub inserted: i64,
    pub updated: i64,
    pub deleted: i64,
}

/// How a unit of work ended (`pipeline_metadata.status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunStatus {
    Success,
    Failed,
    /// A change-log file moved to `dead_letter/`.
    Quarantined,
}

impl RunStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Success => "success",
            RunStatus::Failed => "failed",
            RunStatus::Quarantined => "quarantined",
        }
    }
}

/// One finished unit of work to record.
#[derive(Debug, Clone)]
pub struct RunRecord<'a> {
    pub pipeline_name: &'a str,
    pub run_id: &'a str,
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
    pub status: RunStatus,
    pub counts: RunCounts,
    pub error: Option<String>,
    pub metrics: serde_json::Value,
}

pub async fn record(client: &impl GenericClient, r: &RunRecord<'_>) -> Result<()> {
    client
        .execute(
            "INSERT INTO public.pipeline_metadata
               (pipeline_name, run_id, start_time, end_time, status, records_processed,
                records_inserted, records_updated, records_deleted, error_message, metrics)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
            &[
                &r.pipeline_name,
                &r.run_id,
                &r.start,
                &r.end,
                &r.status.as_str(),
                &r.counts.processed,
                &r.counts.inserted,
                &r.counts.updated,
                &r.counts.deleted,
                &r.error,
                &r.metrics,
            ],
        )
        .await
        .map_err(ctx("recording the run in pipeline_metadata"))?;
    Ok(())
}

/// A finished unit of work waiting to be recorded (owned, for the `Recorder`'s queue).
#[derive(Debug, Clone)]
pub struct PendingRecord {
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
    pub status: RunStatus,
    pub counts: RunCounts,
    pub error: Option<String>,
    pub metrics: serde_json::Value,
}

/// Most records held while the warehouse is unreachable; beyond it the oldest are dropped
/// (counted in the log). An idle extractor records a pass every 5 s: more than five days;
/// one capturing at every 0.2 s pass fills it in five and a half hours.
pub const MAX_QUEUED_RECORDS: usize = 100_000;

/// Records a looping program's runs in `pipeline_metadata` from a task of its own, so that
/// the work never waits for the warehouse: while the warehouse is unreachable the records
/// queue in memory, and reach the table in order once it is back.
pub struct Recorder {
    tx: tokio::sync::mpsc::UnboundedSender<PendingRecord>,
    task: tokio::task::JoinHandle<()>,
}

impl Recorder {
    /// Starts the recording task. `prepare` runs on every new connection before records are
    /// written (the schema migration).
    pub fn start<F, Fut>(
        db: crate::db::DbSettings,
        pipeline_name: &'static str,
        run_id: String,
        mut waiting: crate::waiting::Waiting,
        shutdown: crate::shutdown::Shutdown,
        prepare: F,
    ) -> Recorder
    where
        F: Fn(tokio_postgres::Client) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Result<tokio_postgres::Client>> + Send,
    {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<PendingRecord>();
        let task = tokio::spawn(async move {
            let mut queue = std::collections::VecDeque::new();
            let mut dropped = 0u64;
            let mut client: Option<tokio_postgres::Client>;
            let mut backoff = crate::db::Backoff::default();
            // Connected (and the schema migrated) while the first pass runs, not after it: a
            // `--once` run otherwise waits for the connection at its end. A failure here is
            // left to the first record, which retries and reports it as always.
            match async { prepare(crate::db::connect_once(&db).await?).await }.await {
                Ok(c) => client = Some(c),
                Err(e) => {
                    client = None;
                    tracing::debug!(
                    error = %crate::error::error_chain(&e),
                    "warehouse not reached at start; tried again with the first record"
                    )
                }
            }
            // Ends when the sender is gone (the program is stopping) and the queue is empty,
            // or when the program stops while the warehouse is unreachable.
            loop {
                if queue.is_empty() {
                    match rx.recv().await {
                        Some(r) => queue.push_back(r),
                        None => break,
                    }
                }
                while let Ok(r) = rx.try_recv() {
                    queue.push_back(r);
                }
                while queue.len() > MAX_QUEUED_RECORDS {
                    queue.pop_front();
                    dropped += 1;
                }
                if dropped > 0 && dropped.is_power_of_two() {
                    tracing::warn!(
                        dropped,
                        "warehouse unreachable for long: oldest run records dropped"
                    );
                }
                let result: Result<tokio_postgres::Client> = async {
                    // A connection the server has closed since (idle timeout, restart) is
                    // replaced before it costs a record at stop.
                    let c = match client.take().filter(|c| !c.is_closed()) {
                        Some(c) => c,
                        None => prepare(crate::db::connect_once(&db).await?).await?,
                    };
                    while let Some(r) = queue.front() {
                        let rec = RunRecord {
                            pipeline_name,
                            run_id: &run_id,
                            start: r.start,
                            end: r.end,
                            status: r.status,
                            counts: r.counts.clone(),
                            error: r.error.clone(),
                            metrics: r.metrics.clone(),
                        };
                        record(&c, &rec).await?;
                        queue.pop_front();
                    }
                    Ok(c)
                }
                .await;
                match result {
                    Ok(c) => {
                        client = Some(c);
                        waiting.resolved();
                        backoff.reset();
                    }
                    Err(e) if e.is_retryable() => {
                        crate::metrics::error(&e);
                        waiting.fault(&e);
                        let stopping = rx.is_closed() || shutdown.is_triggered();
                        if stopping || shutdown.sleep(backoff.next_delay()).await {
                            if !queue.is_empty() {
                                tracing::warn!(
                                    records = queue.len(),
                                    "stopping with run records the warehouse did not get"
                                );
                            }
                            break;
                        }
                    }
                    Err(e) => {
                        // Not the warehouse being away (a refused login, a broken schema): the
                        // record is dropped so that it does not block the ones behind it.
                        crate::metrics::error(&e);
                        tracing::warn!(error = %crate::error::error_chain(&e), "could not record a run in pipeline_metadata");
                        queue.pop_front();
                    }
                }
            }
        });
        Recorder { tx, task }
    }

    /// Queues a record (never waits).
    pub fn record(&self, r: PendingRecord) {
        let _ = self.tx.send(r);
    }

    /// Stops: records still queued are written if the warehouse answers within `grace`.
    pub async fn finish(self, grace: std::time::Duration) {
        drop(self.tx);
        let _ = tokio::time::timeout(grace, self.task).await;
    }
}
