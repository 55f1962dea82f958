//! SCD Type 2 apply of a batch of change-log files into a history store, in the store's one
//! transaction (the caller commits).
//!
//! The events are read in chunks of at most `chunk_events` (memory does not grow with the
//! batch) on a reading thread (`read`). For each chunk the store is asked for the newest
//! version of each key in it, the planner (`plan`, the SCD2 rules) decides what to close and
//! what to insert, and the store closes and inserts; then each truncate of the chunk closes
//! the versions still current before it (the keys the chunk has no events of). The files are recorded as applied in
//! the same transaction. A later chunk sees the earlier chunks' rows, exactly as a later
//! batch sees an earlier one.

use super::plan::{self, Ev};
use super::read::{read_chunks, Read};
use super::row_hash::RowHasher;
use super::store::{AppliedBatch, Close, HistoryStore, NewVersion};
use crate::changelog::batch_name;
use crate::error::{Error, Result};
use crate::event::Op;
use crate::metrics::ChangeAges;
use crate::table::TableSpec;
use std::path::PathBuf;

/// Default of the most events held in memory at once (and handled by one set of
/// statements): `LOADER_MAX_EVENTS_IN_MEMORY`.
pub const CHUNK_EVENTS: usize = 16_384;

/// What applying a batch changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApplyStats {
    pub files: usize,
    pub events: u64,
    pub versions_inserted: u64,
    pub versions_closed: u64,
    pub deletes: u64,
    /// Schema changes followed.
    pub schema_changes: u64,
    /// Where the time went, in milliseconds: waiting for decoded events (reading runs
    /// ahead on its own thread), reading the newest versions and computing the new ones,
    /// closing current rows, copying versions in.
    pub phases_ms: [u64; 4],
    /// The counts of each of the pipeline's tables (in the order of its tables).
    pub tables: Vec<TableApplied>,
    /// The source change times of the changes that went into the history (for the delay
    /// metric).
    pub ages: ChangeAges,
    /// The tables (`schema.table`) held at a schema change in this batch.
    pub held: Vec<String>,
}

/// What applying a batch changed in one table's history.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TableApplied {
    /// `schema.table`.
    pub table: String,
    pub events: u64,
    pub inserted: u64,
    pub closed: u64,
    pub deletes: u64,
}

impl ApplyStats {
    /// Adds another batch's counts (not its phases, tables or ages).
    pub fn add(&mut self, s: &ApplyStats) {
        self.files += s.files;
        self.events += s.events;
        self.versions_inserted += s.versions_inserted;
        self.versions_closed += s.versions_closed;
        self.deletes += s.deletes;
        self.schema_changes += s.schema_changes;
    }
}

/// How the pipeline's batches are applied: its tables' descriptions (a table is addressed by
/// its index in them), their row hashes, the chunk size, which tables' events are applied.
#[derive(Debug, Clone)]
pub struct Applying {
    specs: Vec<TableSpec>,
    hashers: Vec<RowHasher>,
    chunk_events: usize,
    /// Apply only this table's events (a rebuild, a held table's replay), skipping the
    /// others'.
    only: Option<usize>,
    /// Skip the lines of the first file before this one (1-based; a held table's replay
    /// starts at its schema change).
    from_line: usize,
    /// Per table, whether it is held at a schema change its history cannot hold: its events
    /// are not applied until it is replayed (`Held`).
    held: Vec<Option<Held>>,
    /// Whether a schema change the history cannot hold holds its table (the others go on)
    /// instead of failing the batch.
    holds: bool,
}

/// Where a table's history stopped: the schema change (line `line` of change-log file
/// `batch`) it cannot hold exactly, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    pub batch: String,
    pub line: usize,
    pub reason: String,
}

impl Applying {
    pub fn new(specs: &[TableSpec], chunk_events: usize) -> Self {
        Applying {
            specs: specs.to_vec(),
            hashers: specs.iter().map(RowHasher::new).collect(),
            chunk_events: chunk_events.max(1),
            only: None,
            from_line: 0,
            held: vec![None; specs.len()],
            holds: false,
        }
    }

    /// Applies only the events of table `t` (an index in the descriptions).
    pub fn only(mut self, t: usize) -> Self {
        self.only = Some(t);
        self
    }

    /// A schema change the history cannot hold holds its table, instead of failing.
    pub fn holding(mut self, held: Vec<Option<Held>>) -> Self {
        self.held = held;
        self.held.resize(self.specs.len(), None);
        self.holds = true;
        self
    }

    /// The replay of held table `t`: only its events, from its schema change on (the first
    /// file must be the one it is held in), failing again if the history still cannot hold
    /// it.
    pub fn replay_of(&self, t: usize) -> Option<Self> {
        let h = self.held.get(t)?.as_ref()?;
        let mut r = self.clone();
        r.only = Some(t);
        r.from_line = h.line;
        r.held = vec![None; self.specs.len()];
        r.holds = false;
        Some(r)
    }

    /// Takes table `t`'s description from a replay that caught it up: it is no longer held.
    pub fn resume(&mut self, t: usize, replay: &Applying) {
        self.specs[t] = replay.specs[t].clone();
        self.hashers[t] = replay.hashers[t].clone();
        self.held[t] = None;
    }

    /// Table `t`'s description.
    pub fn spec(&self, t: usize) -> &TableSpec {
        &self.specs[t]
    }

    /// Held table `t` is still held, for `reason` now.
    pub fn note_held(&mut self, t: usize, reason: &str) {
        if let Some(Some(h)) = self.held.get_mut(t) {
            h.reason = reason.to_owned();
        }
    }

    /// The held tables: index, description, where and why.
    pub fn held(&self) -> impl Iterator<Item = (usize, &TableSpec, &Held)> {
        self.held
            .iter()
            .enumerate()
            .filter_map(|(t, h)| Some((t, &self.specs[t], h.as_ref()?)))
    }

    /// Per table, whether its events are read.
    fn reads(&self) -> Vec<bool> {
        (0..self.specs.len())
            .map(|t| self.only.map_or(self.held[t].is_none(), |o| o == t))
            .collect()
    }
}

/// Applies `files` (in order) to `store`. A line that does not decode fails the batch with
/// `Error::Parse` naming the file and line.
///
/// Reading, decoding and hashing run on a thread of their own, one chunk ahead of the
/// store's work on the previous chunk.
///
/// A schema event is followed in the store between the chunks before and after it, and
/// changes `how`'s description of its table: the caller keeps the changed `how` only once
/// the store's transaction has committed.
pub async fn apply_files(
    store: &mut impl HistoryStore,
    how: &mut Applying,
    files: &[PathBuf],
    run_id: &str,
) -> Result<ApplyStats> {
    let mut stats = ApplyStats {
        files: files.len(),
        tables: how
            .specs
            .iter()
            .map(|s| TableApplied {
                table: s.qualified(),
                ..Default::default()
            })
            .collect(),
        ages: ChangeAges::starting_now(),
        ..Default::default()
    };
    let mut facts: Vec<AppliedBatch> = files
        .iter()
        .map(|p| AppliedBatch {
            name: batch_name(p),
            ..Default::default()
        })
        .collect();
    let (send, mut recv) = tokio::sync::mpsc::channel::<Result<Read>>(1);
    {
        let (how, files) = (how.clone(), files.to_vec());
        // If the applier fails first, it drops `recv` and the reader stops at its next send.
        tokio::task::spawn_blocking(move || {
            let scope = (how.reads(), how.from_line);
            read_chunks(
                how.hashers,
                how.chunk_events,
                how.specs,
                scope,
                &files,
                &send,
            )
        });
    }
    let mut clock = std::time::Instant::now();
    loop {
        let msg = recv.recv().await.ok_or_else(|| {
            Error::internal(
                "change-log reader",
                "stopped without finishing (it panicked)",
            )
        })??;
        stats.phases_ms[0] += lap(&mut clock);
        match msg {
            Read::Chunk(mut chunk) => {
                // A table held in this batch: the reader decoded its later events.
                chunk.retain(|e| how.held.get(e.ev.table).is_none_or(|h| h.is_none()));
                stats.events += chunk.len() as u64;
                apply_chunk(store, &mut chunk, &mut facts, &mut stats, &mut clock).await?;
            }
            Read::Schema { file, line, ev } => {
                let t = ev.table;
                if how.held.get(t).is_some_and(|h| h.is_some()) {
                    continue;
                }
                stats.events += 1;
                let (Some(old), Some(change)) = (how.specs.get(t), ev.schema.as_deref()) else {
                    continue;
                };
                let new = super::schema::follow(old, change).map_err(|m| Error::Parse {
                    path: files[file].clone(),
                    line: line as u64,
                    message: format!("schema change of {}: {m}", old.qualified()),
                })?;
                let batch = &facts[file].name;
                let added = match store.schema_change(t, old, &new, &ev, batch).await {
                    Ok(added) => added,
                    // The history cannot hold it: this table waits at the change, the others
                    // go on.
                    Err(Error::SchemaChange { message, .. }) if how.holds => {
                        let held = Held {
                            batch: batch.clone(),
                            line,
                            reason: message,
                        };
                        store.hold(t, old, &held, ev.ts_us).await?;
                        stats.held.push(old.qualified());
                        how.held[t] = Some(held);
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                how.hashers[t] = RowHasher::new(&new);
                how.specs[t] = new;
                stats.schema_changes += change.changes.len() as u64;
                stats.versions_inserted += added;
                stats.versions_closed += added;
                facts[file].inserted += added as i64;
                if let Some(s) = stats.tables.get_mut(t) {
                    s.events += 1;
                    s.inserted += added;
                    s.closed += added;
                }
                stats.phases_ms[2] += lap(&mut clock);
            }
            Read::SnapshotEnd { file, ev } => {
                if how.held.get(ev.table).is_some_and(|h| h.is_some()) {
                    continue;
                }
                stats.events += 1;
                let n = store.snapshot_end(ev.table, ev.ts_us, ev.lsn).await?;
                stats.versions_closed += n;
                stats.deletes += n;
                facts[file].deletes += n as i64;
                if let Some(s) = stats.tables.get_mut(ev.table) {
                    s.events += 1;
                    s.closed += n;
                    s.deletes += n;
                }
                if n > 0 {
                    tracing::info!(
                        table = %how.specs.get(ev.table).map(|s| s.qualified()).unwrap_or_default(),
                        ended = n,
                        "a re-snapshot ended the keys it no longer has"
                    );
                }
                stats.phases_ms[2] += lap(&mut clock);
            }
            Read::Done(read) => {
                for (f, r) in facts.iter_mut().zip(read) {
                    (f.events, f.first, f.last) = (r.events, r.first, r.last);
                    f.history_tables = r
                        .tables
                        .iter()
                        .filter_map(|&t| how.specs.get(t))
                        .map(|s| s.history_qualified())
                        .collect::<Vec<_>>()
                        .join(", ");
                }
                break;
            }
        }
    }
    store.record_batches(&facts, run_id).await?;
    Ok(stats)
}

fn lap(clock: &mut std::time::Instant) -> u64 {
    let ms = clock.elapsed().as_millis() as u64;
    *clock = std::time::Instant::now();
    ms
}

/// One chunk: per table in it, the newest versions of its keys, the plan, the closes and the
/// inserts.
async fn apply_chunk(
    store: &mut impl HistoryStore,
    chunk: &mut Vec<Ev>,
    facts: &mut [AppliedBatch],
    stats: &mut ApplyStats,
    clock: &mut std::time::Instant,
) -> Result<()> {
    plan::order(chunk);
    for (table, range) in plan::tables(chunk) {
        apply_table(store, table, &chunk[range], facts, stats, clock).await?;
    }
    chunk.clear();
    Ok(())
}

/// One table's events of a chunk, in `plan::order`.
async fn apply_table(
    store: &mut impl HistoryStore,
    table: usize,
    events: &[Ev],
    facts: &mut [AppliedBatch],
    stats: &mut ApplyStats,
    clock: &mut std::time::Instant,
) -> Result<()> {
    if let Some(t) = stats.tables.get_mut(table) {
        t.events += events.len() as u64;
    }
    let snapshot_rows: Vec<&crate::event::DecodedEvent> = events
        .iter()
        .filter(|e| e.ev.resnapshot)
        .map(|e| &e.ev)
        .collect();
    store.resnapshot_keys(table, &snapshot_rows).await?;
    let keys = plan::keys(events);
    let newest = if keys.is_empty() {
        Default::default()
    } else {
        store.newest(table, &keys).await?
    };
    let plan = plan::plan(events, &newest);
    stats.phases_ms[1] += lap(clock);

    // Close the current rows the first new event (or delete, or truncate) of their key
    // supersedes.
    let closes: Vec<Close<'_>> = plan
        .closes
        .iter()
        .map(|c| {
            let by = &events[c.by].ev;
            Close {
                key: &events[c.key].ev.key,
                ts_us: by.ts_us,
                lsn: by.lsn,
                deleted: matches!(by.op, Op::Delete | Op::Truncate),
                truncated: by.op == Op::Truncate,
            }
        })
        .collect();
    let closed = store.close(table, &closes).await?;
    stats.versions_closed += closed;
    stats.phases_ms[2] += lap(clock);

    // Write the new versions (a kept delete or truncate inserts nothing: it closed the one
    // before).
    let mut counts = TableApplied {
        closed,
        ..Default::default()
    };
    let ends_chain = |e: &Ev| matches!(e.ev.op, Op::Delete | Op::Truncate);
    for k in &plan.kept {
        let e = &events[k.idx];
        stats.ages.record(e.ev.ts_us);
        if ends_chain(e) {
            counts.deletes += 1;
            facts[e.file].deletes += 1;
        } else {
            counts.inserted += 1;
            facts[e.file].inserted += 1;
        }
    }
    let versions: Vec<NewVersion<'_>> = plan
        .kept
        .iter()
        .map(|k| (k, &events[k.idx]))
        .filter(|(_, e)| !ends_chain(e))
        .map(|(k, e)| NewVersion {
            event: &e.ev,
            hash: &e.hash,
            next: k.next.map(|n| &events[n].ev),
            batch: &facts[e.file].name,
        })
        .collect();
    store.insert(table, &versions).await?;
    stats.phases_ms[3] += lap(clock);

    // Each truncate ends every version still current before it: the keys of the table this
    // chunk has no events of (the plan ended the others).
    for t in plan::truncates(events) {
        let n = store.truncate(table, t.ev.ts_us, t.ev.lsn).await?;
        counts.closed += n;
        counts.deletes += n;
        stats.versions_closed += n;
        facts[t.file].deletes += n as i64;
    }
    // Late events (a file put back, applied again), deletes of keys the history holds
    // nothing of, and remembered deletes that end the versions just written.
    let late: Vec<(&crate::event::DecodedEvent, [u8; 16], &str)> = plan
        .late
        .iter()
        .map(|&i| {
            let e = &events[i];
            (&e.ev, e.hash, facts[e.file].name.as_str())
        })
        .collect();
    let orphans: Vec<(&crate::event::DecodedEvent, &str)> = plan
        .orphan_deletes
        .iter()
        .map(|&i| (&events[i].ev, facts[events[i].file].name.as_str()))
        .collect();
    // Only a version written now can hold a remembered delete (a key whose chunk events are
    // deletes has none: rows inserted and deleted in one transaction).
    let mut written: Vec<&str> = plan
        .kept
        .iter()
        .map(|k| &events[k.idx])
        .filter(|e| !ends_chain(e))
        .map(|e| e.ev.key.as_str())
        .collect();
    written.dedup();
    let placed = store.late(table, &late, &orphans, &written).await?;
    counts.inserted += placed.inserted;
    counts.closed += placed.closed;
    counts.deletes += placed.deletes;
    stats.versions_closed += placed.closed;
    stats.phases_ms[2] += lap(clock);
    stats.deletes += counts.deletes;
    stats.versions_inserted += counts.inserted;
    if let Some(t) = stats.tables.get_mut(table) {
        t.inserted += counts.inserted;
        t.closed += counts.closed;
        t.deletes += counts.deletes;
    }
    Ok(())
}
