//! The extractor's progress: the watermark and the next file sequence, in a versioned JSON
//! file written atomically, and only after the change-log files it covers are durable.

use crate::changelog::write_atomic;
use crate::error::{Error, Result};
use crate::event::CaptureMode;
use crate::sink::Durable;
use serde::{Deserialize, Serialize};
use std::cmp::Ordering;
use std::path::{Path, PathBuf};

const PROGRESS_VERSION: u32 = 1;

/// A position in (change time, key) order. `key: None` sorts before every key of that time:
/// "everything from this instant on".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Watermark {
    pub ts_us: i64,
    pub key: Option<String>,
}

impl Watermark {
    /// Compares two watermarks; keys of the same instant compare as integers when both are.
    pub fn cmp_pos(&self, other: &Watermark) -> Ordering {
        self.ts_us
            .cmp(&other.ts_us)
            .then_with(|| match (&self.key, &other.key) {
                (None, None) => Ordering::Equal,
                (None, Some(_)) => Ordering::Less,
                (Some(_), None) => Ordering::Greater,
                (Some(a), Some(b)) => match (a.parse::<i128>(), b.parse::<i128>()) {
                    (Ok(x), Ok(y)) => x.cmp(&y),
                    _ => a.cmp(b),
                },
            })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    pub format_version: u32,
    pub table: String,
    pub capture_mode: CaptureMode,
    /// `None` until the first pass (the initial snapshot) has been written.
    pub watermark: Option<Watermark>,
    pub next_file_seq: u64,
    pub updated_at: Option<String>,
    /// Logical mode: whether the initial copy was taken, and which transactions it shows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logical: Option<LogicalState>,
    /// The shape (key and tracked columns) of each table (`schema.table`) as the change log
    /// last described it: a schema change is written when the source's differs.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub shapes: std::collections::BTreeMap<String, crate::schema_change::Shape>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogicalState {
    pub snapshot_done: bool,
    /// Dropped once the slot has been confirmed past `until_lsn`.
    pub filter: Option<SnapshotFilter>,
    /// The tables the initial copy took (`schema.table`); empty in files written before
    /// several tables could be captured, where it is the file's own table.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tables: Vec<String>,
    /// Every change committed up to this time (µs since the epoch) is captured: the commit
    /// time of the last transaction a pass decoded and confirmed (each pass decodes at least
    /// its own heartbeat's), or the initial copy's time. What `status` measures capture lag
    /// by. Absent in files written before it was kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub captured_through_us: Option<i64>,
}

/// The initial copy's snapshot (`pg_current_snapshot()`): transactions it shows are skipped
/// when they come out of the slot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotFilter {
    pub xmin: u64,
    pub xmax: u64,
    pub xip: Vec<u64>,
    pub until_lsn: u64,
}

impl Progress {
    /// The progress file of `name`: a table's qualified name (timestamp capture, and logical
    /// capture of one table), or the pipeline's key (logical capture of several tables).
    pub fn path(state_dir: &Path, name: &str) -> PathBuf {
        state_dir.join(format!("extractor-{name}.json"))
    }

    fn fresh(name: &str, mode: CaptureMode) -> Self {
        Progress {
            format_version: PROGRESS_VERSION,
            table: name.to_owned(),
            capture_mode: mode,
            watermark: None,
            next_file_seq: 1,
            updated_at: None,
            logical: None,
            shapes: Default::default(),
        }
    }

    /// Reads the progress file; a missing file means "never captured". A file that exists but
    /// cannot be read is an error: starting over silently would re-capture or skip changes.
    pub fn load(state_dir: &Path, name: &str, mode: CaptureMode) -> Result<Self> {
        let path = Self::path(state_dir, name);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Self::fresh(name, mode))
            }
            Err(e) => return Err(Error::io("reading the progress file", &path, e)),
        };
        let p: Progress = serde_json::from_str(&text).map_err(|e| Error::State {
            path: path.clone(),
            message: format!("{e}; fix or remove it (removing it re-captures the whole table)"),
        })?;
        if p.format_version > PROGRESS_VERSION {
            return Err(Error::State {
                path,
                message: format!(
                    "format_version {} is newer than this extractor reads",
                    p.format_version
                ),
            });
        }
        if p.table != name {
            return Err(Error::State {
                path,
                message: format!("it belongs to table {}, not {}", p.table, name),
            });
        }
        if p.capture_mode != mode {
            return Err(Error::State {
                path,
                message: format!(
                    "it was written in {} capture mode, not {mode}; remove it to start {mode} capture from a new snapshot",
                    p.capture_mode
                ),
            });
        }
        Ok(p)
    }

    /// Reads the progress file whatever its mode (for `status`); `None` when there is none.
    pub fn peek(state_dir: &Path, name: &str) -> Result<Option<Self>> {
        let path = Self::path(state_dir, name);
        match std::fs::read_to_string(&path) {
            Ok(t) => serde_json::from_str(&t)
                .map(Some)
                .map_err(|e| Error::State {
                    path,
                    message: e.to_string(),
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io("reading the progress file", &path, e)),
        }
    }

    /// Saves atomically. The watermark never moves backwards. `_durable` is the sink's proof
    /// that the changes this progress covers are durable: progress never runs ahead of them.
    pub fn save(
        &mut self,
        state_dir: &Path,
        name: &str,
        previous: Option<&Watermark>,
        _durable: &Durable,
    ) -> Result<()> {
        if let (Some(prev), Some(new)) = (previous, &self.watermark) {
            if new.cmp_pos(prev) == Ordering::Less {
                self.watermark = Some(prev.clone());
            }
        }
        self.updated_at = Some(chrono::Utc::now().to_rfc3339());
        let bytes = serde_json::to_vec_pretty(self).map_err(|e| Error::State {
            path: Self::path(state_dir, name),
            message: e.to_string(),
        })?;
        write_atomic(&Self::path(state_dir, name), &bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watermark_order_puts_open_key_first_and_compares_numbers() {
        let a = Watermark {
            ts_us: 5,
            key: None,
        };
        let b = Watermark {
            ts_us: 5,
            key: Some("9".into()),
        };
        let c = Watermark {
            ts_us: 5,
            key: Some("10".into()),
        };
        assert_eq!(a.cmp_pos(&b), Ordering::Less);
        assert_eq!(b.cmp_pos(&c), Ordering::Less);
        assert_eq!(
            Watermark {
                ts_us: 6,
                key: None
            }
            .cmp_pos(&c),
            Ordering::Greater
        );
    }
}
