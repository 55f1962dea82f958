//! The extractor's flags and settled configuration.

use super::{
    listen_addr, non_empty_path, positive_secs, slot_name, LogDirArgs, RetryArgs, SourceDbArgs,
    TablesArgs, WarehouseDbArgs,
};
use crate::catalog::TableSelection;
use crate::db::DbSettings;
use crate::error::{Error, Result};
use crate::event::CaptureMode;
use crate::slot::SlotSettings;
use clap::Args;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// `extractor` flags.
#[derive(Args, Clone, Debug)]
pub struct ExtractorArgs {
    #[command(flatten)]
    pub source: SourceDbArgs,
    #[command(flatten)]
    pub warehouse: WarehouseDbArgs,
    #[command(flatten)]
    pub retry: RetryArgs,
    #[command(flatten)]
    pub tables: TablesArgs,
    #[command(flatten)]
    pub log_dir: LogDirArgs,
    /// Capture mode
    #[arg(
        long = "capture-mode",
        env = "CDC_CAPTURE_MODE",
        value_enum,
        default_value = "timestamp"
    )]
    pub capture_mode: CaptureMode,
    /// Seconds from the start of one capture pass to the next (an idle source is looked at
    /// with one cheap query, and fully at least every 5 s)
    #[arg(
        long = "interval",
        env = "CDC_EXTRACTION_INTERVAL_SECONDS",
        default_value = "0.2"
    )]
    pub interval_seconds: f64,
    /// Most change events in one change-log file; a larger pass writes several files
    #[arg(
        long = "max-rows-per-file",
        env = "CDC_MAX_ROWS_PER_FILE",
        default_value = "50000"
    )]
    pub max_rows_per_file: u64,
    /// Directory of the extractor's progress (watermark) file
    #[arg(
        long = "state-dir",
        env = "CDC_STATE_DIR",
        default_value = "data/state"
    )]
    pub state_dir: PathBuf,
    /// Logical mode: name of the replication slot (created if missing) [default:
    /// <CDC_PIPELINE_NAME>_slot]
    #[arg(long = "slot-name", env = "CDC_SLOT_NAME")]
    pub slot_name: Option<String>,
    /// Logical mode: name of the publication (created if missing) [default:
    /// <CDC_PIPELINE_NAME>_pub]
    #[arg(long = "publication", env = "CDC_PUBLICATION")]
    pub publication: Option<String>,
    /// Logical mode: most changes decoded in one pass (transactions are never split)
    #[arg(
        long = "max-changes-per-pass",
        env = "CDC_MAX_CHANGES_PER_PASS",
        default_value = "200000"
    )]
    pub max_changes_per_pass: i32,
    /// Where the capture loop serves /metrics, /healthz and /readyz: host:port, or off
    #[arg(
        long = "metrics-addr",
        env = "EXTRACTOR_METRICS_ADDR",
        default_value = "127.0.0.1:9187"
    )]
    pub metrics_addr: String,
    /// Do one capture pass and exit
    #[arg(long)]
    pub once: bool,
}

/// Settled extractor configuration.
#[derive(Clone, Debug)]
pub struct ExtractorConfig {
    pub source: DbSettings,
    pub warehouse: DbSettings,
    pub tables: TableSelection,
    pub log_dir: PathBuf,
    pub state_dir: PathBuf,
    pub capture_mode: CaptureMode,
    pub interval: Duration,
    pub max_rows_per_file: u64,
    pub slot: SlotSettings,
    /// Where the capture loop serves its endpoints (`None`: off); not with `once`.
    pub metrics_addr: Option<SocketAddr>,
    pub once: bool,
}

impl ExtractorArgs {
    pub fn validate(&self) -> Result<ExtractorConfig> {
        let retry = self.retry.validate()?;
        if self.max_rows_per_file == 0 {
            return Err(Error::config("CDC_MAX_ROWS_PER_FILE", "must be at least 1"));
        }
        let tables = self.tables.validate()?;
        Ok(ExtractorConfig {
            source: self.source.validate(retry)?,
            warehouse: self.warehouse.validate(retry)?,
            log_dir: non_empty_path("CDC_LOG_DIR", &self.log_dir.cdc_log_dir)?,
            state_dir: non_empty_path("CDC_STATE_DIR", &self.state_dir)?,
            capture_mode: self.capture_mode,
            interval: positive_secs(
                "CDC_EXTRACTION_INTERVAL_SECONDS",
                self.interval_seconds,
                false,
            )?,
            max_rows_per_file: self.max_rows_per_file,
            slot: SlotSettings {
                slot: slot_name("CDC_SLOT_NAME", &self.slot_name, &tables, "slot")?,
                publication: slot_name("CDC_PUBLICATION", &self.publication, &tables, "pub")?,
                pipeline: tables.pipeline_name.clone(),
                max_changes_per_pass: if self.max_changes_per_pass >= 1 {
                    self.max_changes_per_pass
                } else {
                    return Err(Error::config(
                        "CDC_MAX_CHANGES_PER_PASS",
                        "must be at least 1",
                    ));
                },
            },
            metrics_addr: listen_addr("EXTRACTOR_METRICS_ADDR", &self.metrics_addr)?,
            once: self.once,
            tables,
        })
    }
}
