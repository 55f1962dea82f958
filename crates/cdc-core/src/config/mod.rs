//! Settings: every flag also readable from its environment variable (the original names),
//! validated in full into a settled configuration before anything connects. This module
//! holds what several binaries share; each binary's own flags are in a module of its own
//! (`extractor`, `loader`; the mutator's live in its crate).

pub mod extractor;
pub mod loader;

use crate::catalog::TableSelection;
use crate::db::tls::TlsSettings;
use crate::db::{DbRole, DbSettings, Secret};
use crate::error::{Error, Result};
use clap::{Args, ValueEnum};
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

/// The operational (source) database.
#[derive(Args, Clone, Debug)]
pub struct SourceDbArgs {
    /// Host name or address
    #[arg(
        id = "db-host",
        long = "db-host",
        env = "DB_HOST",
        default_value = "localhost"
    )]
    pub host: String,
    /// Port
    #[arg(
        id = "db-port",
        long = "db-port",
        env = "DB_PORT",
        default_value = "5434"
    )]
    pub port: String,
    /// Database name
    #[arg(
        id = "db-name",
        long = "db-name",
        env = "DB_NAME",
        default_value = "operational_db"
    )]
    pub dbname: String,
    /// User name
    #[arg(
        id = "db-user",
        long = "db-user",
        env = "DB_USER",
        default_value = "postgres"
    )]
    pub user: String,
    /// Password (prefer the environment variable or .env over the flag)
    #[arg(
        id = "db-password",
        long = "db-password",
        env = "DB_PASSWORD",
        default_value = "postgres",
        hide_env_values = true,
        hide_default_value = true
    )]
    pub password: Secret,
    /// TLS: disable, prefer (TLS when the server offers it), require (always, certificate
    /// not checked unless a CA file is given), verify-ca (certificate chains to the CA file),
    /// verify-full (and names the host connected to); as libpq's sslmode
    #[arg(
        id = "db-sslmode",
        long = "db-sslmode",
        env = "DB_SSLMODE",
        default_value = "prefer"
    )]
    pub sslmode: String,
    /// TLS: the CA certificate file (PEM) the server's certificate must chain to
    #[arg(id = "db-sslrootcert", long = "db-sslrootcert", env = "DB_SSLROOTCERT")]
    pub sslrootcert: Option<PathBuf>,
}

impl SourceDbArgs {
    pub fn validate(&self, connect_retry: Duration) -> Result<DbSettings> {
        let a = self.clone();
        DbArgs {
            host: a.host,
            port: a.port,
            dbname: a.dbname,
            user: a.user,
            password: a.password,
            sslmode: a.sslmode,
            sslrootcert: a.sslrootcert,
        }
        .validate(DbRole::Source, connect_retry)
    }
}

/// The warehouse database.
#[derive(Args, Clone, Debug)]
pub struct WarehouseDbArgs {
    /// Host name or address
    #[arg(
        id = "warehouse-db-host",
        long = "warehouse-db-host",
        env = "WAREHOUSE_DB_HOST",
        default_value = "localhost"
    )]
    pub host: String,
    /// Port
    #[arg(
        id = "warehouse-db-port",
        long = "warehouse-db-port",
        env = "WAREHOUSE_DB_PORT",
        default_value = "5433"
    )]
    pub port: String,
    /// Database name
    #[arg(
        id = "warehouse-db-name",
        long = "warehouse-db-name",
        env = "WAREHOUSE_DB_NAME",
        default_value = "warehouse_db"
    )]
    pub dbname: String,
    /// User name
    #[arg(
        id = "warehouse-db-user",
        long = "warehouse-db-user",
        env = "WAREHOUSE_DB_USER",
        default_value = "postgres"
    )]
    pub user: String,
    /// Password (prefer the environment variable or .env over the flag)
    #[arg(
        id = "warehouse-db-password",
        long = "warehouse-db-password",
        env = "WAREHOUSE_DB_PASSWORD",
        default_value = "postgres",
        hide_env_values = true,
        hide_default_value = true
    )]
    pub password: Secret,
    /// TLS: disable, prefer (TLS when the server offers it), require (always, certificate
    /// not checked unless a CA file is given), verify-ca (certificate chains to the CA file),
    /// verify-full (and names the host connected to); as libpq's sslmode
    #[arg(
        id = "warehouse-db-sslmode",
        long = "warehouse-db-sslmode",
        env = "WAREHOUSE_DB_SSLMODE",
        default_value = "prefer"
    )]
    pub sslmode: String,
    /// TLS: the CA certificate file (PEM) the server's certificate must chain to
    #[arg(
        id = "warehouse-db-sslrootcert",
        long = "warehouse-db-sslrootcert",
        env = "WAREHOUSE_DB_SSLROOTCERT"
    )]
    pub sslrootcert: Option<PathBuf>,
}

impl WarehouseDbArgs {
    pub fn validate(&self, connect_retry: Duration) -> Result<DbSettings> {
        let a = self.clone();
        DbArgs {
            host: a.host,
            port: a.port,
            dbname: a.dbname,
            user: a.user,
            password: a.password,
            sslmode: a.sslmode,
            sslrootcert: a.sslrootcert,
        }
        .validate(DbRole::Warehouse, connect_retry)
    }
}

/// One database's raw settings, whichever flags they came from; validated into `DbSettings`
/// with messages naming the role's variables (`DB_PORT`, `WAREHOUSE_DB_PORT`, ...).
#[derive(Clone, Debug)]
pub struct DbArgs {
    pub host: String,
    pub port: String,
    pub dbname: String,
    pub user: String,
    pub password: Secret,
    pub sslmode: String,
    pub sslrootcert: Option<PathBuf>,
}

impl DbArgs {
    pub fn validate(self, role: DbRole, connect_retry: Duration) -> Result<DbSettings> {
        let setting = |s: &str| format!("{}_{s}", role.setting_prefix());
        if self.host.trim().is_empty() {
            return Err(Error::config(setting("HOST"), "must not be empty"));
        }
        // Parsed here, not by the flag parser, so that a bad value names the variable.
        let port = self
            .port
            .trim()
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| {
                Error::config(
                    setting("PORT"),
                    format!("'{}' must be a port number from 1 to 65535", self.port),
                )
            })?;
        if self.dbname.trim().is_empty() {
            return Err(Error::config(setting("NAME"), "must not be empty"));
        }
        if self.user.trim().is_empty() {
            return Err(Error::config(setting("USER"), "must not be empty"));
        }
        let tls = TlsSettings::validate(
            role.setting_prefix(),
            &self.sslmode,
            self.sslrootcert.as_deref(),
        )?;
        Ok(DbSettings {
            role,
            host: self.host,
            port,
            dbname: self.dbname,
            user: self.user,
            password: self.password,
            connect_retry,
            tls,
        })
    }
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
    /// Where the log goes: stderr, or file (rotating files in LOG_DIR named after the
    /// program: <program>.text.<date>.log or <program>.json.<date>.log, with <program>.log or
    /// <program>.json.log pointing at the current one)
    #[arg(long = "log-output", env = "LOG_OUTPUT", default_value = "stderr")]
    pub log_output: String,
    /// With LOG_OUTPUT=file: the directory of the log files (must exist)
    #[arg(long = "log-dir", env = "LOG_DIR", default_value = "logs")]
    pub log_dir: PathBuf,
    /// With LOG_OUTPUT=file: start a new file every day or every hour (UTC): daily, hourly
    #[arg(long = "log-rotation", env = "LOG_ROTATION", default_value = "daily")]
    pub log_rotation: String,
    /// With LOG_OUTPUT=file: files kept per program and format; the oldest beyond it are
    /// deleted at start-up and at each rotation
    #[arg(long = "log-max-files", env = "LOG_MAX_FILES", default_value = "14")]
    pub log_max_files: String,
}

/// Where the log goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LogOutput {
    Stderr,
    /// Rotating files in `dir` (absolute), at most `max_files` per program and format.
    File {
        dir: PathBuf,
        rotation: LogRotation,
        max_files: usize,
    },
}

/// How often a log file is started anew.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogRotation {
    Daily,
    Hourly,
}

/// Settled logging configuration.
#[derive(Clone, Debug)]
pub struct LogSettings {
    /// A tracing filter directive.
    pub filter: String,
    pub format: LogFormat,
    pub output: LogOutput,
}

impl LogArgs {
    pub fn validate(&self) -> Result<LogSettings> {
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
        // Checked whatever the output, so that a mistake shows before it matters.
        let rotation = match self.log_rotation.trim().to_ascii_lowercase().as_str() {
            "daily" => LogRotation::Daily,
            "hourly" => LogRotation::Hourly,
            _ => {
                return Err(Error::config(
                    "LOG_ROTATION",
                    format!("'{}' must be daily or hourly", self.log_rotation),
                ))
            }
        };
        let max_files = self
            .log_max_files
            .trim()
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=100_000).contains(n))
            .ok_or_else(|| {
                Error::config(
                    "LOG_MAX_FILES",
                    format!(
                        "'{}' must be a whole number of files from 1 to 100000",
                        self.log_max_files
                    ),
                )
            })?;
        let output = match self.log_output.trim().to_ascii_lowercase().as_str() {
            "stderr" => LogOutput::Stderr,
            "file" => LogOutput::File {
                dir: log_dir(&self.log_dir)?,
                rotation,
                max_files,
            },
            _ => {
                return Err(Error::config(
                    "LOG_OUTPUT",
                    format!("'{}' must be stderr or file", self.log_output),
                ))
            }
        };
        Ok(LogSettings {
            filter: directive,
            format: self.log_format,
            output,
        })
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
}

/// The log directory as an absolute path (the current-file links point into it): it must
/// exist and be a directory; it is not created, so that a mistyped one is noticed.
fn log_dir(dir: &std::path::Path) -> Result<PathBuf> {
    let shown = dir.display();
    if dir.as_os_str().is_empty() {
        return Err(Error::config(
            "LOG_DIR",
            "must not be empty with LOG_OUTPUT=file",
        ));
    }
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(Error::config(
                "LOG_DIR",
                format!("'{shown}' is not a directory"),
            ))
        }
        Err(e) => {
            return Err(Error::config(
                "LOG_DIR",
                format!("'{shown}' cannot be used ({e}); create it, or set LOG_DIR to the directory for the log files"),
            ))
        }
    }
    std::fs::canonicalize(dir)
        .map_err(|e| Error::config("LOG_DIR", format!("'{shown}' cannot be resolved: {e}")))
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

/// Which tables and columns to capture, described by the source's catalog.
#[derive(Args, Clone, Debug)]
pub struct TablesArgs {
    /// Tables to capture: schema.table or schema.* (every table of the schema), comma separated
    #[arg(long = "tables", env = "CDC_TABLES", default_value = "public.orders")]
    pub tables: String,
    /// Columns left out of the history (personal data): schema.table.column, comma separated
    #[arg(
        long = "exclude-columns",
        env = "CDC_EXCLUDE_COLUMNS",
        default_value = ""
    )]
    pub exclude_columns: String,
    /// Timestamp mode: the column the database sets on every insert and update
    #[arg(
        long = "change-time-column",
        env = "CDC_CHANGE_TIME_COLUMN",
        default_value = "last_updated"
    )]
    pub change_time_column: String,
    /// Name of the pipeline: names the slot and publication unless they are set, and owns
    /// them and the change-log directory; with several tables also the change-log files'
    /// prefix and the logical progress file's name
    #[arg(
        long = "pipeline-name",
        env = "CDC_PIPELINE_NAME",
        default_value = "cdc"
    )]
    pub pipeline_name: String,
}

impl TablesArgs {
    pub fn validate(&self) -> Result<TableSelection> {
        let patterns = TableSelection::parse_tables(&self.tables)
            .map_err(|m| Error::config("CDC_TABLES", m))?;
        let exclude = TableSelection::parse_exclude(&self.exclude_columns)
            .map_err(|m| Error::config("CDC_EXCLUDE_COLUMNS", m))?;
        let ct = self.change_time_column.trim();
        let ok = ct
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
            && ct.len() <= 63
            && ct
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !ok {
            return Err(Error::config(
                "CDC_CHANGE_TIME_COLUMN",
                format!("'{ct}' must be a lower-case SQL identifier (a-z, 0-9, _)"),
            ));
        }
        let name = self.pipeline_name.trim();
        if name.is_empty()
            || name.len() > 40
            || !name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        {
            return Err(Error::config(
                "CDC_PIPELINE_NAME",
                format!("'{name}' must be 1 to 40 lower-case letters, digits or _"),
            ));
        }
        Ok(TableSelection {
            patterns,
            exclude,
            change_time_column: ct.to_owned(),
            pipeline_name: name.to_owned(),
        })
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

pub fn positive_secs(setting: &str, value: f64, allow_zero: bool) -> Result<Duration> {
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

/// Slot and publication names: lower-case letters, digits and `_`, at most 63; when not
/// set (or empty), `<pipeline name>_<suffix>`.
pub fn slot_name(
    setting: &str,
    given: &Option<String>,
    tables: &TableSelection,
    suffix: &str,
) -> Result<String> {
    let s = match given.as_deref().map(str::trim) {
        Some(s) if !s.is_empty() => s.to_owned(),
        _ => format!("{}_{suffix}", tables.pipeline_name),
    };
    let s = s.as_str();
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

pub fn non_empty_path(setting: &str, p: &std::path::Path) -> Result<PathBuf> {
    if p.as_os_str().is_empty() {
        return Err(Error::config(setting, "must not be empty"));
    }
    Ok(p.to_path_buf())
}

/// Where a long-running program serves its HTTP endpoints (`/metrics`, `/healthz`,
/// `/readyz`): `host:port` (a name is resolved now, IPv4 preferred), or `off` for none.
pub fn listen_addr(setting: &str, value: &str) -> Result<Option<SocketAddr>> {
    let v = value.trim();
    if v.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    let bad = |why: &str| {
        Error::config(
            setting,
            format!("'{v}' {why}; use host:port (such as 127.0.0.1:9187) or off"),
        )
    };
    let addrs: Vec<SocketAddr> = v
        .to_socket_addrs()
        .map_err(|_| bad("is not an address with a port"))?
        .collect();
    let addr = addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or(addrs.first())
        .copied()
        .ok_or_else(|| bad("names no address"))?;
    if addr.port() == 0 {
        return Err(bad("needs a port from 1 to 65535"));
    }
    Ok(Some(addr))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addr_takes_host_port_or_off() {
        let a = listen_addr("X_METRICS_ADDR", "127.0.0.1:9187").expect("valid");
        assert_eq!(a, Some("127.0.0.1:9187".parse().expect("addr")));
        assert_eq!(listen_addr("X_METRICS_ADDR", " OFF ").expect("off"), None);
        for bad in ["", "9187", "127.0.0.1", "127.0.0.1:0", "127.0.0.1:http"] {
            let e = listen_addr("X_METRICS_ADDR", bad).expect_err(bad);
            assert!(e.to_string().contains("X_METRICS_ADDR"), "{e}");
        }
    }
}
