//! The change sink: where a capture pass writes its events, and the `Durable` token that
//! proves they were made durable. Progress (the watermark file, the slot's confirmed
//! position) takes that token, so "durable before progress" is kept by the compiler, not by
//! convention. Implementation: the change-log directory (`changelog::ChangeLogSink`).

use crate::error::Result;
use crate::event::Op;
use crate::table::TableSpec;
use chrono::{DateTime, Utc};
use std::path::PathBuf;

/// Receives the events of capture passes, one batch per pass.
pub trait ChangeSink: Send {
    /// Starts a batch: the events of one pass captured at `captured_at`; `first_seq`
    /// continues the sink's sequence (kept in the source's progress).
    fn begin(&mut self, captured_at: DateTime<Utc>, first_seq: u64);

    /// Appends one event (a JSON object without a trailing newline) of `table`'s change `op`.
    /// `keep_together` keeps it in the same unit as the event before it: a transaction is
    /// never split.
    fn write(&mut self, event: &[u8], table: &TableSpec, op: Op, keep_together: bool)
        -> Result<()>;

    /// Events written in the current batch so far.
    fn events_written(&self) -> u64;

    /// Makes the batch durable and visible to readers, all or nothing, in order.
    fn commit(&mut self) -> Result<Durable>;

    /// Drops the batch: nothing of it becomes visible.
    fn abort(&mut self);
}

/// Ends a batch: commits it when `written` (what writing it produced) is `Ok`, aborts it
/// otherwise, so that nothing of a failed pass becomes visible.
pub fn commit_if_ok<T>(sink: &mut dyn ChangeSink, written: Result<T>) -> Result<(T, Durable)> {
    match written {
        Ok(v) => Ok((v, sink.commit()?)),
        Err(e) => {
            sink.abort();
            Err(e)
        }
    }
}

/// One durable unit of a committed batch (a change-log file).
#[derive(Debug, Clone)]
pub struct WrittenFile {
    pub path: PathBuf,
    pub events: u64,
    pub bytes: u64,
}

/// How many events of each table and operation a batch holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventCounts(Vec<(String, String, Op, u64)>);

impl EventCounts {
    /// Counts one event of `table`'s change `op`.
    pub fn add(&mut self, table: &TableSpec, op: Op) {
        let found = self.0.iter_mut().find(|(schema, name, o, _)| {
            *o == op && *name == table.name && *schema == table.schema
        });
        match found {
            Some((.., n)) => *n += 1,
            None => self
                .0
                .push((table.schema.clone(), table.name.clone(), op, 1)),
        }
    }

    /// `(schema.table, op, events)`, in the order first seen.
    pub fn iter(&self) -> impl Iterator<Item = (String, Op, u64)> + '_ {
        self.0
            .iter()
            .map(|(schema, name, op, n)| (format!("{schema}.{name}"), *op, *n))
    }
}

/// Proof that a batch is durable in its sink; only a sink's `commit` makes one.
#[derive(Debug)]
#[must_use = "progress may move only with this proof"]
pub struct Durable {
    files: Vec<WrittenFile>,
    next_seq: u64,
    counts: EventCounts,
}

impl Durable {
    /// For `ChangeSink::commit` implementations only: `files` are durable and visible, and
    /// hold the events `counts` counts.
    pub(crate) fn new(files: Vec<WrittenFile>, next_seq: u64, counts: EventCounts) -> Self {
        Durable {
            files,
            next_seq,
            counts,
        }
    }

    /// The durable events by table and operation.
    pub fn counts(&self) -> &EventCounts {
        &self.counts
    }

    /// The units written, in order.
    pub fn files(&self) -> &[WrittenFile] {
        &self.files
    }

    pub fn events(&self) -> u64 {
        self.files.iter().map(|f| f.events).sum()
    }

    pub fn bytes(&self) -> u64 {
        self.files.iter().map(|f| f.bytes).sum()
    }

    /// The sequence number the sink's next unit will get (saved with the progress).
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }
}
