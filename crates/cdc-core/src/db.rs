//! Database connections: connect with retry and backoff, pools, and the backoff policy used
//! when a connection is lost in the middle of work.

use crate::config::DbSettings;
use crate::error::{is_transient_pg, Error, Result};
use crate::shutdown::Shutdown;
use std::time::{Duration, Instant};
use tokio_postgres::{Client, NoTls};

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
    let config = db.pg_config();
    loop {
        match config.connect(NoTls).await {
            Ok((client, connection)) => {
                let target = db.display();
                tokio::spawn(async move {
                    if let Err(e) = connection.await {
                        tracing::debug!(db = %target, error = %e, "connection closed");
                    }
                });
                return Ok(client);
            }
            Err(e) => {
                let retryable = is_transient_pg(&e);
                let delay = backoff.next_delay();
                if !retryable || started.elapsed() + delay > db.connect_retry {
                    return Err(Error::Db {
                        context: format!(
                            "connecting to the {} database at {} (settings {}_HOST, {}_PORT, {}_NAME, {}_USER)",
                            if db.label == "DB" { "source" } else { "warehouse" },
                            db.display(),
                            db.label,
                            db.label,
                            db.label,
                            db.label
                        ),
                        source: e,
                    });
                }
                tracing::warn!(db = %db.display(), error = %e, retry_in_ms = delay.as_millis() as u64, "database unreachable; retrying");
                if shutdown.sleep(delay).await {
                    return Err(Error::Shutdown);
                }
            }
        }
    }
}

/// A connection pool for concurrent writers (the mutator).
pub fn pool(db: &DbSettings, size: usize) -> Result<deadpool_postgres::Pool> {
    let mgr = deadpool_postgres::Manager::from_config(
        db.pg_config(),
        NoTls,
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
