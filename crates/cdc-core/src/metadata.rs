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
