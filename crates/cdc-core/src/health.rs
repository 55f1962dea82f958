//! Readiness: whether a long-running program can do its work now (connected to its databases,
//! schema migrated, not waiting out an outage), as `/readyz` and the `cdc_ready` gauge report
//! it. The loops and the connection code set it; one process-wide handle.

use crate::db::DbRole;
use std::sync::{LazyLock, Mutex, PoisonError};

/// What keeps a program from being ready: each is set with a short reason and cleared
/// when it is over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Blocker {
    /// Start-up is not done (connecting, describing the tables, migrating).
    Starting,
    /// The source database is unreachable (or its connection was lost).
    Source,
    /// The warehouse database is unreachable (or its connection was lost).
    Warehouse,
}

impl Blocker {
    fn index(self) -> usize {
        match self {
            Blocker::Starting => 0,
            Blocker::Source => 1,
            Blocker::Warehouse => 2,
        }
    }

    fn of(role: DbRole) -> Self {
        match role {
            DbRole::Source => Blocker::Source,
            DbRole::Warehouse => Blocker::Warehouse,
        }
    }
}

static BLOCKERS: LazyLock<Mutex<[Option<String>; 3]>> =
    LazyLock::new(|| Mutex::new([Some("starting".to_owned()), None, None]));

fn set(b: Blocker, reason: Option<String>) {
    let mut blockers = BLOCKERS.lock().unwrap_or_else(PoisonError::into_inner);
    blockers[b.index()] = reason;
}

/// `Ok` when ready, else the reasons, most fundamental first.
pub fn readiness() -> Result<(), String> {
    let blockers = BLOCKERS.lock().unwrap_or_else(PoisonError::into_inner);
    let reasons: Vec<&str> = blockers.iter().flatten().map(String::as_str).collect();
    if reasons.is_empty() {
        Ok(())
    } else {
        Err(reasons.join("; "))
    }
}

/// Start-up is done: connected, tables described, schema migrated.
pub fn started() {
    set(Blocker::Starting, None);
}

/// `role`'s database cannot be reached now; the program waits and retries.
pub fn unreachable(role: DbRole, display: &str) {
    set(
        Blocker::of(role),
        Some(format!(
            "waiting for the {} database at {display}",
            role.noun()
        )),
    );
}

/// The connection to `role`'s database was lost (or failed in a way worth retrying); the
/// program will reconnect.
pub fn lost(role: DbRole) {
    set(
        Blocker::of(role),
        Some(format!("lost the {} database connection", role.noun())),
    );
}

/// Notices a connection to `role`'s database that the server closed (while the program had
/// nothing to do with it).
pub fn check(role: DbRole, client: &tokio_postgres::Client) {
    if client.is_closed() {
        lost(role);
    }
}

/// Connected to `role`'s database.
pub fn connected(role: DbRole) {
    set(Blocker::of(role), None);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_nothing_blocks() {
        assert!(readiness().is_err(), "not ready before start-up is done");
        unreachable(DbRole::Warehouse, "127.0.0.1:1/w");
        started();
        let why = readiness().expect_err("the warehouse blocks");
        assert!(why.contains("waiting for the warehouse database"), "{why}");
        connected(DbRole::Warehouse);
        assert_eq!(readiness(), Ok(()));
        lost(DbRole::Source);
        assert!(readiness().is_err_and(|w| w.contains("lost the source")));
        connected(DbRole::Source);
        assert_eq!(readiness(), Ok(()));
    }
}
