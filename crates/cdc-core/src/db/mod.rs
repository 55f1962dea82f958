//! Database connections: where a database is (`DbSettings`), connect with retry and backoff,
//! pools, and the backoff policy used when a connection is lost in the middle of work.

pub mod copy_text;
pub mod replication;
pub mod tls;

use crate::error::{Error, Result};
use crate::shutdown::Shutdown;
use crate::waiting::Waiting;
use std::fmt;
use std::time::{Duration, Instant};
use tokio_postgres::Client;

/// The `application_name` of every connection.
pub(crate) const APPLICATION_NAME: &str = "cdc-historical-warehouse";

/// The session settings of every connection (the replication connection's too): the text
/// form of times depends on them.
pub(crate) const SESSION_OPTIONS: &str = "-c TimeZone=UTC -c DateStyle=ISO";

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

/// Which of the pipeline's two databases a connection is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DbRole {
    /// The operational database the changes come from.
    Source,
    /// The warehouse that holds the history.
    Warehouse,
}

impl DbRole {
    /// The prefix of the settings users know it by: `DB_HOST`, `WAREHOUSE_DB_HOST`, ...
    pub fn setting_prefix(self) -> &'static str {
        match self {
            DbRole::Source => "DB",
            DbRole::Warehouse => "WAREHOUSE_DB",
        }
    }

    /// The database's name in messages.
    pub fn noun(self) -> &'static str {
        match self {
            DbRole::Source => "source",
            DbRole::Warehouse => "warehouse",
        }
    }
}

/// Where one database is and how to log in. `Debug` hides the password.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DbSettings {
    pub role: DbRole,
    pub host: String,
    pub port: u16,
    pub dbname: String,
    pub user: String,
    pub password: Secret,
    /// How long to keep retrying the first connection before giving up.
    pub connect_retry: Duration,
    /// `DB_SSLMODE` / `DB_SSLROOTCERT` (or the warehouse's).
    pub tls: tls::TlsSettings,
}

impl DbSettings {
    pub fn pg_config(&self) -> tokio_postgres::Config {
        let mut c = tokio_postgres::Config::new();
        c.host(&self.host)
            .port(self.port)
            .dbname(&self.dbname)
            .user(&self.user)
            .password(self.password.0.as_bytes())
            .application_name(APPLICATION_NAME)
            .options(SESSION_OPTIONS)
            .connect_timeout(Duration::from_secs(10));
        self.tls.apply(&mut c);
        c
    }

    /// `host:port/dbname`, safe to log (no user, no password).
    pub fn display(&self) -> String {
        format!("{}:{}/{}", self.host, self.port, self.dbname)
    }
}

/// Exponential backoff with jitter: 250 ms doubling up to 10 s.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
    max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            next: Duration::from_millis(250),
            max: Duration::from_secs(10),
        }
    }
}

impl Backoff {
    /// The delay to wait now; the following one doubles.
    pub fn next_delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(self.max);
        let jitter = rand::random_range(0.0..0.25);
        base.mul_f64(1.0 + jitter)
    }

    pub fn reset(&mut self) {
        *self = Backoff::default();
    }
}

/// Connects to `db`, retrying transient failures with backoff for up to `db.connect_retry`.
/// A refused login or a missing database fails at once: retrying cannot fix it.
pub async fn connect(db: &DbSettings, shutdown: &Shutdown) -> Result<Client> {
    let started = Instant::now();
    let mut backoff = Backoff::default();
    loop {
        match connect_once(db).await {
            Ok(client) => return Ok(client),
            Err(e) => {
                let delay = backoff.next_delay();
                if !e.is_retryable() || started.elapsed() + delay > db.connect_retry {
                    return Err(e);
                }
                tracing::warn!(db = %db.display(), error = %crate::error::error_chain(&e), retry_in_ms = delay.as_millis() as u64, "database unreachable; retrying");
                if shutdown.sleep(delay).await {
                    return Err(Error::Shutdown);
                }
            }
        }
    }
}

/// Connects to `db` for a looping program: transient failures are retried with capped
/// backoff for as long as it takes (recorded in `waiting`); a refused login or a missing
/// database fails at once.
pub async fn connect_patiently(
    db: &DbSettings,
    shutdown: &Shutdown,
    waiting: &mut Waiting,
) -> Result<Client> {
    let mut backoff = Backoff::default();
    loop {
        match connect_once(db).await {
            Ok(client) => return Ok(client),
            Err(e) if e.is_retryable() => {
                waiting.fault(&e);
                if shutdown.sleep(backoff.next_delay()).await {
                    return Err(Error::Shutdown);
                }
            }
            Err(e) => return Err(e),
        }
    }
}

/// One connection attempt; the error names the settings to check.
pub(crate) async fn connect_once(db: &DbSettings) -> Result<Client> {
    match db.pg_config().connect(db.tls.connector()).await {
        Ok((client, connection)) => {
            crate::health::connected(db.role);
            let target = db.display();
            tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::debug!(db = %target, error = %e, "connection closed");
                }
            });
            Ok(client)
        }
        Err(e) => {
            let p = db.role.setting_prefix();
            Err(Error::Db {
                context: format!(
                    "connecting to the {} database at {} (settings {p}_HOST, {p}_PORT, {p}_NAME, {p}_USER, {p}_PASSWORD, {p}_SSLMODE, {p}_SSLROOTCERT)",
                    db.role.noun(),
                    db.display(),
                ),
                source: e,
            })
        }
    }
}

/// A connection pool for concurrent writers (the mutator).
pub fn pool(db: &DbSettings, size: usize) -> Result<deadpool_postgres::Pool> {
    let mgr = deadpool_postgres::Manager::from_config(
        db.pg_config(),
        db.tls.connector(),
        deadpool_postgres::ManagerConfig {
            recycling_method: deadpool_postgres::RecyclingMethod::Fast,
        },
    );
    deadpool_postgres::Pool::builder(mgr)
        .max_size(size)
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .build()
        .map_err(|e| Error::setup("connection pool", e.to_string()))
}

/// Wraps a tokio-postgres error with what we were doing.
pub fn ctx(context: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> Error {
    let context = context.into();
    move |source| Error::Db { context, source }
}
