//! The loader's flags and settled configuration (`run`, `verify`, `status`).

use super::{
    listen_addr, non_empty_path, positive_secs, slot_name, LogDirArgs, RetryArgs, SourceDbArgs,
    TablesArgs, WarehouseDbArgs,
};
use crate::catalog::TableSelection;
use crate::db::DbSettings;
use crate::error::{Error, Result};
use clap::Args;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// `scd2-loader` flags.
#[derive(Args, Clone, Debug)]
pub struct LoaderArgs {
    #[command(flatten)]
    pub warehouse: WarehouseDbArgs,
    #[command(flatten)]
    pub source: SourceDbArgs,
    #[command(flatten)]
    pub retry: RetryArgs,
    #[command(flatten)]
    pub tables: TablesArgs,
    #[command(flatten)]
    pub log_dir: LogDirArgs,
    /// Seconds between looks for new change-log files besides the file-system notification
    /// that wakes the loader when one arrives [default: 5 while the directory is watched,
    /// 0.5 when it cannot be]
    #[arg(long = "poll-interval", env = "LOADER_POLL_INTERVAL_SECONDS")]
    pub poll_interval_seconds: Option<f64>,
    /// Most files applied in one transaction when there is a backlog
    #[arg(
        long = "max-files-per-batch",
        env = "LOADER_MAX_FILES_PER_BATCH",
        default_value = "16"
    )]
    pub max_files_per_batch: usize,
    /// Most change events held in memory at once; a batch is applied in chunks of this many
    /// events (same transaction), so memory does not grow with the backlog
    #[arg(
        long = "max-events-in-memory",
        env = "LOADER_MAX_EVENTS_IN_MEMORY",
        default_value = "16384"
    )]
    pub max_events_in_memory: usize,
    /// Directory of the extractor's progress file (read by `status`)
    #[arg(
        long = "state-dir",
        env = "CDC_STATE_DIR",
        default_value = "data/state"
    )]
    pub state_dir: PathBuf,
    /// Logical mode: the extractor's replication slot (its lag is shown by `status`)
    /// [default: <CDC_PIPELINE_NAME>_slot]
    #[arg(long = "slot-name", env = "CDC_SLOT_NAME")]
    pub slot_name: Option<String>,
    /// Days archived change-log files (processed/) are kept; 0 keeps them forever
    #[arg(
        long = "processed-retention-days",
        env = "CDC_PROCESSED_RETENTION_DAYS",
        default_value = "0"
    )]
    pub processed_retention_days: f64,
    /// `status`: capture or apply lag beyond this many seconds is unhealthy
    #[arg(
        long = "max-lag-seconds",
        env = "CDC_MAX_LAG_SECONDS",
        default_value = "300"
    )]
    pub max_lag_seconds: f64,
    /// `status`: a replication slot holding more WAL than this many MiB is unhealthy
    #[arg(
        long = "max-slot-wal-mb",
        env = "CDC_MAX_SLOT_WAL_MB",
        default_value = "1024"
    )]
    pub max_slot_wal_mb: u64,
    /// Where the apply loop serves /metrics, /healthz, /readyz and the dashboard (/): host:port,
    /// or off
    #[arg(
        long = "metrics-addr",
        env = "LOADER_METRICS_ADDR",
        default_value = "127.0.0.1:9188"
    )]
    pub metrics_addr: String,
}

/// Settled loader configuration.
#[derive(Clone, Debug)]
pub struct LoaderConfig {
    pub warehouse: DbSettings,
    pub source: DbSettings,
    pub tables: TableSelection,
    pub log_dir: PathBuf,
    pub state_dir: PathBuf,
    /// Between looks for new files besides the notification (`None`: the default, chosen by
    /// whether the directory can be watched).
    pub poll_interval: Option<Duration>,
    pub max_files_per_batch: usize,
    pub max_events_in_memory: usize,
    pub slot_name: String,
    /// Where the apply loop serves its endpoints (`None`: off); not with `--once`.
    pub metrics_addr: Option<SocketAddr>,
    /// How long archived files are kept (`None`: forever).
    pub processed_retention: Option<Duration>,
    /// `status`: lag beyond this is unhealthy.
    pub max_lag: Duration,
    /// `status`: a slot retaining more WAL than this is unhealthy.
    pub max_slot_wal_bytes: i64,
}

impl LoaderArgs {
    pub fn validate(&self) -> Result<LoaderConfig> {
        let retry = self.retry.validate()?;
        if self.max_files_per_batch == 0 {
            return Err(Error::config(
                "LOADER_MAX_FILES_PER_BATCH",
                "must be at least 1",
            ));
        }
        if self.max_events_in_memory == 0 {
            return Err(Error::config(
                "LOADER_MAX_EVENTS_IN_MEMORY",
                "must be at least 1",
            ));
        }
        let tables = self.tables.validate()?;
        Ok(LoaderConfig {
            warehouse: self.warehouse.validate(retry)?,
            source: self.source.validate(retry)?,
            log_dir: non_empty_path("CDC_LOG_DIR", &self.log_dir.cdc_log_dir)?,
            state_dir: non_empty_path("CDC_STATE_DIR", &self.state_dir)?,
            poll_interval: self
                .poll_interval_seconds
                .map(|s| positive_secs("LOADER_POLL_INTERVAL_SECONDS", s, false))
                .transpose()?,
            max_files_per_batch: self.max_files_per_batch,
            max_events_in_memory: self.max_events_in_memory,
            slot_name: slot_name("CDC_SLOT_NAME", &self.slot_name, &tables, "slot")?,
            metrics_addr: listen_addr("LOADER_METRICS_ADDR", &self.metrics_addr)?,
            max_lag: positive_secs("CDC_MAX_LAG_SECONDS", self.max_lag_seconds, false)?,
            processed_retention: retention_days(self.processed_retention_days)?,
            max_slot_wal_bytes: i64::try_from(self.max_slot_wal_mb)
                .ok()
                .and_then(|mb| mb.checked_mul(1 << 20))
                .filter(|b| *b > 0)
                .ok_or_else(|| {
                    Error::config("CDC_MAX_SLOT_WAL_MB", "must be from 1 to 2^43 MiB")
                })?,
            tables,
        })
    }
}

/// `CDC_PROCESSED_RETENTION_DAYS`: 0 keeps the archive forever.
fn retention_days(days: f64) -> Result<Option<Duration>> {
    if !(days.is_finite() && (0.0..=36_500.0).contains(&days)) {
        return Err(Error::config(
            "CDC_PROCESSED_RETENTION_DAYS",
            format!("'{days}' must be a number of days from 0 (keep forever) to 36500"),
        ));
    }
    Ok((days > 0.0).then(|| Duration::from_secs_f64(days * 86_400.0)))
}
