//! Readiness: whether a long-running program can do its work now (connected to its databases,
//! schema migrated, not waiting out an outage), as `/readyz` and the `cdc_ready` gauge report
//! it. The loops and the connection code set it; one process-wide handle.

use crate::db::DbRole;
use std::collections::BTreeMap;
use std::sync::{LazyLock, Mutex, PoisonError};

/// What keeps the program from being ready, by what it is about (`starting`, `source`,
/// `warehouse`, `files`), each with a short reason; cleared when it is over.
static BLOCKERS: LazyLock<Mutex<BTreeMap<String, String>>> = LazyLock::new(|| {
    Mutex::new(BTreeMap::from([(
        STARTING.to_owned(),
        "starting".to_owned(),
    )]))
});

const STARTING: &str = "0-starting";

/// Something keeps the program from working now (a wait it is sitting out).
pub fn block(key: &str, reason: String) {
    BLOCKERS
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .insert(key.to_owned(), reason);
}

/// It is over.
pub fn unblock(key: &str) {
    BLOCKERS
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .remove(key);
}

/// `Ok` when ready, else the reasons, start-up first.
pub fn readiness() -> Result<(), String> {
    let blockers = BLOCKERS.lock().unwrap_or_else(PoisonError::into_inner);
    if blockers.is_empty() {
        Ok(())
    } else {
        Err(blockers.values().cloned().collect::<Vec<_>>().join("; "))
    }
}

/// Start-up is done: connected, tables described, schema migrated.
pub fn started() {
    unblock(STARTING);
}

/// The connection to `role`'s database was lost (or failed in a way worth retrying); the
/// program will reconnect.
pub fn lost(role: DbRole) {
    block(
        role.noun(),
        format!("lost the {} database connection", role.noun()),
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
    unblock(role.noun());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_nothing_blocks() {
        assert!(readiness().is_err(), "not ready before start-up is done");
        block(
            "warehouse",
            "waiting for the warehouse database at 127.0.0.1:1/w".into(),
        );
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
