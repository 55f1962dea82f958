//! Waiting out a transient fault: a looping program that cannot reach a database (or write
//! its files) keeps trying with capped backoff for as long as it takes. While it waits, it
//! says so once in its log and in `<state dir>/<program>-<what>.waiting.json`, which `status`
//! reads ("waiting for … since …"); the file goes when the fault does.

use crate::changelog::write_atomic;
use crate::error::{error_chain, Error};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

const SUFFIX: &str = ".waiting.json";

/// What `status` reads: who waits for what, since when, and the last error.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct WaitRecord {
    pub program: String,
    pub waiting_for: String,
    pub since: DateTime<Utc>,
    pub last_error: String,
    pub pid: u32,
}

/// One thing a program may wait for (the source, the warehouse, the change-log directory).
#[derive(Debug)]
pub struct Waiting {
    program: String,
    what: String,
    path: Option<PathBuf>,
    since: Option<DateTime<Utc>>,
    /// Whether the wait keeps the program from being ready (`/readyz`): not for the
    /// extractor's run records, whose wait does not stop capture.
    blocks: Option<String>,
}

impl Waiting {
    /// `key` names the file (`extractor-source`) and, when `blocks_readiness`, the reason
    /// `/readyz` gives; `what` is said in messages ("the source database at host:5432/db").
    /// Without a state directory nothing is written.
    pub fn new(
        state_dir: Option<&Path>,
        program: &str,
        key: &str,
        what: impl Into<String>,
        blocks_readiness: bool,
    ) -> Self {
        let path = state_dir.map(|d| d.join(format!("{program}-{key}{SUFFIX}")));
        if let Some(p) = &path {
            // A file left by an earlier process of this program is stale.
            let _ = std::fs::remove_file(p);
        }
        Waiting {
            program: program.to_owned(),
            what: what.into(),
            path,
            since: None,
            blocks: blocks_readiness.then(|| key.to_owned()),
        }
    }

    pub fn is_waiting(&self) -> bool {
        self.since.is_some()
    }

    /// A fault: the first one of an outage is logged and recorded, later ones update the
    /// recorded error only.
    pub fn fault(&mut self, e: &Error) {
        let error = error_chain(e);
        let since = match self.since {
            Some(s) => s,
            None => {
                let now = Utc::now();
                self.since = Some(now);
                if let Some(key) = &self.blocks {
                    crate::health::block(key, format!("waiting for {}", self.what));
                }
                tracing::warn!(waiting_for = %self.what, error = %error, "waiting for {}; retrying with backoff for as long as it takes", self.what);
                now
            }
        };
        if let Some(p) = &self.path {
            let record = WaitRecord {
                program: self.program.clone(),
                waiting_for: self.what.clone(),
                since,
                last_error: error,
                pid: std::process::id(),
            };
            if let Ok(json) = serde_json::to_vec_pretty(&record) {
                if let Err(e) = write_atomic(p, &json) {
                    tracing::debug!(error = %error_chain(&e), "could not record the wait");
                }
            }
        }
    }

    /// The fault is over (a success): logged with its length, the record removed.
    pub fn resolved(&mut self) {
        if let Some(since) = self.since.take() {
            if let Some(key) = &self.blocks {
                crate::health::unblock(key);
            }
            let secs = (Utc::now() - since).num_milliseconds() as f64 / 1000.0;
            tracing::info!(
                waited_s = secs,
                "{} is back after {secs:.1} s; resuming",
                self.what
            );
            if let Some(p) = &self.path {
                let _ = std::fs::remove_file(p);
            }
        }
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if self.since.is_some() {
            if let Some(p) = &self.path {
                let _ = std::fs::remove_file(p);
            }
        }
    }
}

/// The waits recorded in `state_dir` by processes that are still running.
pub fn current(state_dir: &Path) -> Vec<WaitRecord> {
    let Ok(entries) = std::fs::read_dir(state_dir) else {
        return Vec::new();
    };
    let mut out: Vec<WaitRecord> = entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(SUFFIX))
        .filter_map(|e| std::fs::read(e.path()).ok())
        .filter_map(|b| serde_json::from_slice::<WaitRecord>(&b).ok())
        .filter(|r| crate::ownership::process_alive(r.pid, None))
        .collect();
    out.sort_by_key(|a| a.since);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wait_is_recorded_while_it_lasts() {
        let dir = std::env::temp_dir().join(format!("cdc-wait-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut w = Waiting::new(Some(&dir), "loader", "test-wait", "the warehouse", false);
        assert!(current(&dir).is_empty());
        w.fault(&Error::setup("x", "down"));
        let first = current(&dir);
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].waiting_for, "the warehouse");
        w.fault(&Error::setup("x", "still down"));
        let second = current(&dir);
        assert_eq!(second[0].since, first[0].since);
        assert!(second[0].last_error.contains("still down"));
        w.resolved();
        assert!(current(&dir).is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
