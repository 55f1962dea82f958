//! Settings: every flag also readable from its environment variable (the original names),
//! validated in full into a settled configuration before anything connects.

use crate::error::{Error, Result};
use crate::table::TableSpec;
use clap::{Args, ValueEnum};
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

/// A password: never printed by `Debug` or `Display`.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"***\"")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        Ok(Secret(s.to_owned()))
    }
}

/// Where one database is and how to log in. `Debug` hides the password.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DbSettings {
    /// The setting prefix users know it by (`DB` or `WAREHOUSE_DB`), for messages.
    pub label: &'static str,
    pub host: String,
    pub port: u16,
    pub dbname: String,
    pub user: String,
    pub password: Secret,
    /// How long to keep retrying the first connection before giving up.
    pub connect_retry: Duration,
}

impl DbSettings {
    pub fn pg_config(&self) -> tokio_postgres::Config {
        let mut c = tokio_postgres::Config::new();
        c.host(&self.host)
            .port(self.port)
            .dbname(&self.dbname)
            .user(&self.user)
            .password(self.password.0.as_bytes())
            .application_name("cdc-historical-warehouse")
            .options("-c TimeZone=UTC -c DateStyle=ISO")
            .connect_timeout(Duration::from_secs(10));
        c
    }

    /// `host:port/dbname`, safe to log (no user, no password).
    pub fn display(&self) -> String {
        format!("{}:{}/{}", self.host, self.port, self.dbname)
    }
}

macro_rules! db_args {
    ($(#[$doc:meta])* $name:ident, $label:literal,
     $host_f:literal, $host_e:literal, $port_f:literal, $port_e:literal, $port_d:literal,
     $db_f:literal, $db_e:literal, $db_d:literal, $user_f:literal, $user_e:literal,
     $pw_f:literal, $pw_e:literal) => {
        $(#[$doc])*
        #[derive(Args, Clone, Debug)]
        pub struct $name {
            /// Host name or address
            #[arg(id = $host_f, long = $host_f, env = $host_e, default_value = "localhost")]
            pub host: String,
            /// Port
            #[arg(id = $port_f, long = $port_f, env = $port_e, default_value = $port_d)]
            pub port: u16,
            /// Database name
            #[arg(id = $db_f, long = $db_f, env = $db_e, default_value = $db_d)]
            pub dbname: String,
            /// User name
            #[arg(id = $user_f, long = $user_f, env = $user_e, default_value = "postgres")]
            pub user: String,
            /// Password (prefer the environment variable or .env over the flag)
            #[arg(id = $pw_f, long = $pw_f, env = $pw_e, default_value = "postgres", hide_env_values = true, hide_default_value = true)]
            pub password: Secret,
        }

        impl $name {
            pub fn validate(&self, connect_retry: Duration) -> Result<DbSettings> {
                validate_db($label, &self.host, self.port, &self.dbname, &self.user, &self.password, connect_retry)
            }
        }
    };
}

db_args!(
    /// The operational (source) database.
    SourceDbArgs, "DB",
    "db-host", "DB_HOST", "db-port", "DB_PORT", "5434",
    "db-name", "DB_NAME", "operational_db", "db-user", "DB_USER",
    "db-password", "DB_PASSWORD"
);

db_args!(
    /// The warehouse database.
    WarehouseDbArgs, "WAREHOUSE_DB",
    "warehouse-db-host", "WAREHOUSE_DB_HOST", "warehouse-db-port", "WAREHOUSE_DB_PORT", "5433",
    "warehouse-db-name", "WAREHOUSE_DB_NAME", "warehouse_db", "warehouse-db-user", "WAREHOUSE_DB_USER",
    "warehouse-db-password", "WAREHOUSE_DB_PASSWORD"
);

fn validate_db(
    label: &'static str,
    host: &str,
    port: u16,
    dbname: &str,
    user: &str,
    password: &Secret,
    connect_retry: Duration,
) -> Result<DbSettings> {
    if host.trim().is_empty() {
        return Err(Error::config(format!("{label}_HOST"), "must not be empty"));
    }
    if port == 0 {
        return Err(Error::config(
            format!("{label}_PORT"),
            "must be a port number from 1 to 65535",
        ));
    }
    if dbname.trim().is_empty() {
        return Err(Error::config(format!("{label}_NAME"), "must not be empty"));
    }
    if user.trim().is_empty() {
        return Err(Error::config(format!("{label}_USER"), "must not be empty"));
    }
    Ok(DbSettings {
        label,
        host: host.to_owned(),
        port,
        dbname: dbname.to_owned(),
        user: user.to_owned(),
        password: password.clone(),
        connect_retry,
    })
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Logging flags shared by every binary.
#[derive(Args, Clone, Debug)]
pub struct LogArgs {
    /// Log level: error, warn, info, debug, trace (or a tracing filter directive)
    #[arg(long = "log-level", env = "LOG_LEVEL", default_value = "info")]
    pub log_level: String,
    /// Log format: human-readable text, or one JSON object a line
    #[arg(
        long = "log-format",
        env = "LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    pub log_format: LogFormat,
}

impl LogArgs {
    pub fn validate(&self) -> Result<()> {
        let directive = self.filter_directive();
        let levels = ["trace", "debug", "info", "warn", "error", "off"];
        // A bare word must be a level; directives (`target=level,...`) go to tracing as they are.
        if !directive.contains(['=', ',']) && !levels.contains(&directive.as_str()) {
            return Err(Error::config(
                "LOG_LEVEL",
                format!(
                    "'{}' is not a log level; use error, warn, info, debug or trace",
                    self.log_level
                ),
            ));
        }
        tracing_subscriber::EnvFilter::try_new(&directive).map_err(|e| {
            Error::config("LOG_LEVEL", format!("'{}' is not a log level or filter ({e}); use error, warn, info, debug or trace", self.log_level))
        })?;
        Ok(())
    }

    /// The level as a filter directive (`INFO` and `warning` are accepted too).
    pub fn filter_directive(&self) -> String {
        let lower = self.log_level.trim().to_ascii_lowercase();
        match lower.as_str() {
            "warning" => "warn".to_owned(),
            "critical" | "fatal" => "error".to_owned(),
            _ => lower,
        }
    }

    pub fn ansi(&self) -> bool {
        use std::io::IsTerminal;
        std::io::stderr().is_terminal()
    }
}

/// How long to keep retrying an unreachable database at start-up and after a lost connection.
#[derive(Args, Clone, Debug)]
pub struct RetryArgs {
    /// Seconds to keep retrying an unreachable database (with backoff) before giving up
    #[arg(
        long = "connect-retry-seconds",
        env = "DB_CONNECT_RETRY_SECONDS",
        default_value = "60"
    )]
    pub connect_retry_seconds: f64,
}

impl RetryArgs {
    pub fn validate(&self) -> Result<Duration> {
        positive_secs("DB_CONNECT_RETRY_SECONDS", self.connect_retry_seconds, true)
    }
}

/// Which table to capture: the built-in `orders`, or a description file.
#[derive(Args, Clone, Debug)]
pub struct TableArgs {
    /// JSON file describing the captured table (default: the built-in `orders` description)
    #[arg(long = "table-config", env = "CDC_TABLE_CONFIG")]
    pub table_config: Option<PathBuf>,
}

impl TableArgs {
    pub fn validate(&self) -> Result<TableSpec> {
        match &self.table_config {
            None => Ok(TableSpec::orders()),
            Some(path) => TableSpec::from_file(path),
        }
    }
}

/// Change-log directory flag shared by extractor and loader.
#[derive(Args, Clone, Debug)]
pub struct LogDirArgs {
    /// Directory of the change-log files (*.jsonl)
    #[arg(
        long = "cdc-log-dir",
        env = "CDC_LOG_DIR",
        default_value = "data/cdc_logs"
    )]
    pub cdc_log_dir: PathBuf,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum CaptureMode {
    /// High-watermark on the change-time column, deletes from the tombstone table
    Timestamp,
    /// Logical replication slot with pgoutput (every committed version)
    Logical,
}

impl CaptureMode {
    pub fn as_str(self) -> &'static str {
        match self {
            CaptureMode::Timestamp => "timestamp",
            CaptureMode::Logical => "logical",
        }
    }
}

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
    pub table: TableArgs,
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
    /// Seconds between capture passes
    #[arg(
        long = "interval",
        env = "CDC_EXTRACTION_INTERVAL_SECONDS",
        default_value = "5"
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
    /// Logical mode: name of the replication slot (created if missing)
    #[arg(
        long = "slot-name",
        env = "CDC_SLOT_NAME",
        default_value = "cdc_orders_slot"
    )]
    pub slot_name: String,
    /// Logical mode: name of the publication (created if missing)
    #[arg(
        long = "publication",
        env = "CDC_PUBLICATION",
        default_value = "cdc_orders_pub"
    )]
    pub publication: String,
    /// Logical mode: most changes decoded in one pass (transactions are never split)
    #[arg(
        long = "max-changes-per-pass",
        env = "CDC_MAX_CHANGES_PER_PASS",
        default_value = "200000"
    )]
    pub max_changes_per_pass: i32,
    /// Do one capture pass and exit
    #[arg(long)]
    pub once: bool,
}

/// Settled extractor configuration.
#[derive(Clone, Debug)]
pub struct ExtractorConfig {
    pub source: DbSettings,
    pub warehouse: DbSettings,
    pub table: TableSpec,
    pub log_dir: PathBuf,
    pub state_dir: PathBuf,
    pub capture_mode: CaptureMode,
    pub interval: Duration,
    pub max_rows_per_file: u64,
    pub slot: crate::capture::logical::SlotSettings,
    pub once: bool,
}

impl ExtractorArgs {
    pub fn validate(&self) -> Result<ExtractorConfig> {
        let retry = self.retry.validate()?;
        if self.max_rows_per_file == 0 {
            return Err(Error::config("CDC_MAX_ROWS_PER_FILE", "must be at least 1"));
        }
        Ok(ExtractorConfig {
            source: self.source.validate(retry)?,
            warehouse: self.warehouse.validate(retry)?,
            table: self.table.validate()?,
            log_dir: non_empty_path("CDC_LOG_DIR", &self.log_dir.cdc_log_dir)?,
            state_dir: non_empty_path("CDC_STATE_DIR", &self.state_dir)?,
            capture_mode: self.capture_mode,
            interval: positive_secs(
                "CDC_EXTRACTION_INTERVAL_SECONDS",
                self.interval_seconds,
                false,
            )?,
            max_rows_per_file: self.max_rows_per_file,
            slot: crate::capture::logical::SlotSettings {
                slot: slot_name("CDC_SLOT_NAME", &self.slot_name)?,
                publication: slot_name("CDC_PUBLICATION", &self.publication)?,
                max_changes_per_pass: if self.max_changes_per_pass >= 1 {
                    self.max_changes_per_pass
                } else {
                    return Err(Error::config(
                        "CDC_MAX_CHANGES_PER_PASS",
                        "must be at least 1",
                    ));
                },
            },
            once: self.once,
        })
    }
}

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
    pub table: TableArgs,
    #[command(flatten)]
    pub log_dir: LogDirArgs,
    /// Seconds between looks for new change-log files
    #[arg(
        long = "poll-interval",
        env = "LOADER_POLL_INTERVAL_SECONDS",
        default_value = "0.5"
    )]
    pub poll_interval_seconds: f64,
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
    #[arg(
        long = "slot-name",
        env = "CDC_SLOT_NAME",
        default_value = "cdc_orders_slot"
    )]
    pub slot_name: String,
}

/// Settled loader configuration.
#[derive(Clone, Debug)]
pub struct LoaderConfig {
    pub warehouse: DbSettings,
    pub source: DbSettings,
    pub table: TableSpec,
    pub log_dir: PathBuf,
    pub state_dir: PathBuf,
    pub poll_interval: Duration,
    pub max_files_per_batch: usize,
    pub max_events_in_memory: usize,
    pub slot_name: String,
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
        Ok(LoaderConfig {
            warehouse: self.warehouse.validate(retry)?,
            source: self.source.validate(retry)?,
            table: self.table.validate()?,
            log_dir: non_empty_path("CDC_LOG_DIR", &self.log_dir.cdc_log_dir)?,
            state_dir: non_empty_path("CDC_STATE_DIR", &self.state_dir)?,
            poll_interval: positive_secs(
                "LOADER_POLL_INTERVAL_SECONDS",
                self.poll_interval_seconds,
                false,
            )?,
            max_files_per_batch: self.max_files_per_batch,
            max_events_in_memory: self.max_events_in_memory,
            slot_name: slot_name("CDC_SLOT_NAME", &self.slot_name)?,
        })
    }
}

/// `mutator` flags.
#[derive(Args, Clone, Debug)]
pub struct MutatorArgs {
    #[command(flatten)]
    pub source: SourceDbArgs,
    #[command(flatten)]
    pub retry: RetryArgs,
    /// Seconds between batches in steady mode
    #[arg(
        long = "interval",
        env = "MUTATION_INTERVAL_SECONDS",
        default_value = "2"
    )]
    pub interval_seconds: f64,
    /// Operations per batch in steady mode
    #[arg(long = "batch-size", env = "MUTATION_BATCH_SIZE", default_value = "5")]
    pub batch_size: u32,
    /// Burst mode: perform exactly this many operations, then exit
    #[arg(long)]
    pub count: Option<u64>,
    /// Seed for the random choices (repeatable traffic)
    #[arg(long, env = "MUTATION_SEED")]
    pub seed: Option<u64>,
    /// Concurrent writer connections
    #[arg(long, env = "MUTATION_CONCURRENCY", default_value = "1")]
    pub concurrency: usize,
    /// Operations per transaction
    #[arg(
        long = "ops-per-transaction",
        env = "MUTATION_OPS_PER_TRANSACTION",
        default_value = "1"
    )]
    pub ops_per_transaction: u32,
    /// Steady mode at a fixed rate: operations per second, started on a fixed schedule in
    /// batches of a tenth of a second (replaces --interval and --batch-size)
    #[arg(long, env = "MUTATION_RATE")]
    pub rate: Option<f64>,
}

/// Settled mutator configuration.
#[derive(Clone, Debug)]
pub struct MutatorConfig {
    pub source: DbSettings,
    pub interval: Duration,
    pub batch_size: u32,
    pub count: Option<u64>,
    pub seed: u64,
    pub concurrency: usize,
    pub ops_per_transaction: u32,
    /// Fixed-rate steady mode: operations per second.
    pub rate: Option<f64>,
}

impl MutatorArgs {
    pub fn validate(&self) -> Result<MutatorConfig> {
        let retry = self.retry.validate()?;
        if self.batch_size == 0 {
            return Err(Error::config("MUTATION_BATCH_SIZE", "must be at least 1"));
        }
        if self.concurrency == 0 || self.concurrency > 64 {
            return Err(Error::config(
                "MUTATION_CONCURRENCY",
                "must be from 1 to 64",
            ));
        }
        if self.ops_per_transaction == 0 {
            return Err(Error::config(
                "MUTATION_OPS_PER_TRANSACTION",
                "must be at least 1",
            ));
        }
        if let Some(rate) = self.rate {
            if !(rate.is_finite() && (0.1..=1_000_000.0).contains(&rate)) {
                return Err(Error::config(
                    "MUTATION_RATE",
                    format!(
                        "'{rate}' must be a number of operations per second from 0.1 to 1000000"
                    ),
                ));
            }
        }
        let seed = self.seed.unwrap_or_else(rand::random);
        Ok(MutatorConfig {
            source: self.source.validate(retry)?,
            interval: positive_secs("MUTATION_INTERVAL_SECONDS", self.interval_seconds, false)?,
            batch_size: self.batch_size,
            count: self.count,
            seed,
            concurrency: self.concurrency,
            ops_per_transaction: self.ops_per_transaction,
            rate: self.rate,
        })
    }
}

fn positive_secs(setting: &str, value: f64, allow_zero: bool) -> Result<Duration> {
    let ok =
        value.is_finite() && (value > 0.0 || (allow_zero && value == 0.0)) && value <= 86_400.0;
    if !ok {
        let what = if allow_zero {
            "from 0"
        } else {
            "greater than 0 and at most"
        };
        return Err(Error::config(
            setting,
            format!("'{value}' must be a number of seconds {what} 86400"),
        ));
    }
    Ok(Duration::from_secs_f64(value))
}

/// Slot and publication names: lower-case letters, digits and `_`, at most 63.
fn slot_name(setting: &str, s: &str) -> Result<String> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if ok {
        Ok(s.to_owned())
    } else {
        Err(Error::config(
            setting,
            format!("'{s}' must be 1 to 63 lower-case letters, digits or _"),
        ))
    }
}

fn non_empty_path(setting: &str, p: &std::path::Path) -> Result<PathBuf> {
    if p.as_os_str().is_empty() {
        return Err(Error::config(setting, "must not be empty"));
    }
    Ok(p.to_path_buf())
}
