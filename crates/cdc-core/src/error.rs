//! Typed errors of the library, each saying where it happened, and the retry decision.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A setting is missing or out of range. The binaries exit with code 2.
    #[error("invalid setting {setting}: {message}")]
    Config { setting: String, message: String },

    /// The server is not set up the way the pipeline needs (privileges, table, columns).
    #[error("{what}: {message}")]
    Setup { what: String, message: String },

    #[error("database error while {context}")]
    Db {
        context: String,
        #[source]
        source: tokio_postgres::Error,
    },

    /// Logical capture's replication stream (`db::replication`) failed.
    #[error("replication stream error while {context}")]
    Replication {
        context: String,
        #[source]
        source: crate::db::replication::ReplicationError,
    },

    #[error("could not get a connection while {context}")]
    Pool {
        context: String,
        #[source]
        source: deadpool_postgres::PoolError,
    },

    #[error("{context} ({path})")]
    Io {
        context: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A change-log line that is not a valid change event (`line` 0: the file as a whole,
    /// e.g. one that cannot be opened).
    #[error("{}{}: {message}", path.display(), if *line > 0 { format!(":{line}") } else { String::new() })]
    Parse {
        path: PathBuf,
        line: u64,
        message: String,
    },

    /// Input from the source or a file that cannot be decoded (a pgoutput message that breaks
    /// the protocol): a data error, not a setting to fix.
    #[error("{what}: {message}")]
    Decode { what: String, message: String },

    /// A fault of this program (a worker thread that panicked): nothing the user set.
    #[error("internal error in {what}: {message}")]
    Internal { what: String, message: String },

    /// A persisted state file (progress) that cannot be read.
    #[error("state file {path} is unreadable: {message}")]
    State { path: PathBuf, message: String },

    /// A schema change of a source table that its history cannot follow exactly: the loader
    /// stops at it (exit 2 with `--once`; a looping loader waits until the history can
    /// hold it).
    #[error("schema change of {table}: {message}")]
    SchemaChange { table: String, message: String },

    #[error("stopped by shutdown signal")]
    Shutdown,
}

impl Error {
    pub fn config(setting: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Config {
            setting: setting.into(),
            message: message.into(),
        }
    }

    pub fn setup(what: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Setup {
            what: what.into(),
            message: message.into(),
        }
    }

    pub fn decode(what: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Decode {
            what: what.into(),
            message: message.into(),
        }
    }

    pub fn internal(what: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Internal {
            what: what.into(),
            message: message.into(),
        }
    }

    pub fn io(
        context: impl Into<String>,
        path: impl Into<PathBuf>,
        source: std::io::Error,
    ) -> Self {
        Error::Io {
            context: context.into(),
            path: path.into(),
            source,
        }
    }

    /// Whether the whole unit of work may be retried after reconnecting: decided from the
    /// error's kind (closed connection, connection-class or transient SQLSTATE, a full disk),
    /// never its text.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Db { source, .. } => is_transient_pg(source),
            Error::Replication { source, .. } => source.is_transient(),
            Error::Pool { source, .. } => match source {
                deadpool_postgres::PoolError::Backend(e) => is_transient_pg(e),
                deadpool_postgres::PoolError::Timeout(_) => true,
                _ => false,
            },
            // A full disk empties again (archives pruned, space added): wait, don't exit.
            Error::Io { source, .. } => matches!(
                source.kind(),
                std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
            ),
            _ => false,
        }
    }

    /// Whether the error is about the data of one batch (bad value, constraint) rather than
    /// the connection or the server: such a batch is quarantined, not retried.
    pub fn is_data_error(&self) -> bool {
        match self {
            Error::Parse { .. } | Error::Decode { .. } => true,
            Error::Db { source, .. } => source
                .code()
                .map(|c| {
                    let s = c.code();
                    s.starts_with("22") || s.starts_with("23")
                })
                .unwrap_or(false),
            _ => false,
        }
    }
}

/// A closed connection, an I/O failure, or a SQLSTATE that means "try again".
pub fn is_transient_pg(e: &tokio_postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    match e.code() {
        Some(code) => {
            let s = code.code();
            s.starts_with("08") // connection exception
                || s.starts_with("53") // insufficient resources
                || s == "57P01" // admin_shutdown
                || s == "57P02" // crash_shutdown
                || s == "57P03" // cannot_connect_now
                || s == "40001" // serialization_failure
                || s == "40P01" // deadlock_detected
                || s == "55P03" // lock_not_available
        }
        // No SQLSTATE: transient when the failure happened below the protocol (socket, I/O, a
        // TLS stream cut short), unless TLS refused the server's certificate. Without an I/O
        // or OpenSSL error beneath it nothing below the protocol failed (a server that offers
        // no TLS where the mode requires it, a value that does not convert): no retry helps.
        None => failed_below_protocol(e) && !crate::db::tls::is_refusal(e),
    }
}

fn failed_below_protocol(e: &tokio_postgres::Error) -> bool {
    let mut cur = std::error::Error::source(e);
    while let Some(s) = cur {
        if s.is::<std::io::Error>() || s.is::<openssl::ssl::Error>() {
            return true;
        }
        cur = s.source();
    }
    false
}

/// The whole error chain on one line: `what: why: root cause`.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![e.to_string()];
    let mut cur = e.source();
    while let Some(s) = cur {
        let text = s.to_string();
        // A cause its wrapper already quotes (OpenSSL's, under the TLS handshake's) is not
        // repeated.
        if !parts.last().is_some_and(|p| p.contains(&text)) {
            parts.push(text);
        }
        cur = s.source();
    }
    parts.join(": ")
}

/// The process exit code for an error: 2 for a bad setting or an unprepared server (the user
/// must change something), 1 for a runtime failure.
pub fn exit_code(e: &Error) -> i32 {
    match e {
        Error::Config { .. }
        | Error::Setup { .. }
        | Error::State { .. }
        | Error::SchemaChange { .. } => 2,
        _ => 1,
    }
}
