//! The apply's reading side, on a thread of its own: reads the batch's files line by line,
//! decodes and hashes each event, and hands them to the applier in chunks, one chunk ahead
//! of the database work on the previous one.

use super::plan::Ev;
use super::row_hash::RowHasher;
use crate::error::{Error, Result};
use crate::event::{decode_where, DecodeError, DecodedEvent};
use crate::table::TableSpec;
use chrono::{DateTime, Utc};
use std::collections::BTreeSet;
use std::io::BufRead;
use std::path::PathBuf;

/// What the reading thread hands to the applier.
pub enum Read {
    /// The next chunk of decoded events.
    Chunk(Vec<Ev>),
    /// A schema event (read from line `line` of file `file` of the batch): the events before
    /// it are in earlier chunks, those after it in later ones, decoded in the new shape.
    Schema {
        file: usize,
        line: usize,
        ev: DecodedEvent,
    },
    /// A re-snapshot's end (from file `file`): its rows are in earlier chunks.
    SnapshotEnd { file: usize, ev: DecodedEvent },
    /// All read: per file, its events and first and last change times.
    Done(Vec<FileRead>),
}

/// What the reader learned of one file: its events, first and last change times, and the
/// tables (indexes) it holds events of.
pub struct FileRead {
    pub events: i64,
    pub first: Option<DateTime<Utc>>,
    pub last: Option<DateTime<Utc>>,
    pub tables: BTreeSet<usize>,
}

/// The reading thread: decodes and hashes the events of `files` and sends them in chunks of
/// at most `chunk_events` (never splitting one change time: events at one instant, a
/// transaction in logical mode, stay together, so a key never gets two versions at one
/// instant, except a re-snapshot's rows, which are of distinct keys; only a schema event or a
/// re-snapshot's end ends a chunk wherever it stands), then the per-file facts.
/// A schema event changes the description later events of its table are decoded by. Stops
/// when the applier has gone.
/// The events of the tables `reads` says no to are skipped undecoded, and so are the lines
/// of the first file before line `from_line` (1-based).
pub fn read_chunks(
    mut hashers: Vec<RowHasher>,
    chunk_events: usize,
    mut specs: Vec<TableSpec>,
    (reads, from_line): (Vec<bool>, usize),
    files: &[PathBuf],
    send: &tokio::sync::mpsc::Sender<Result<Read>>,
) {
    let keep = move |t: usize| reads.get(t).copied().unwrap_or(true);
    // A chunk is started only once the channel has room for it, that is once the applier has
    // taken the previous one: at most two chunks live (one applied, one being read).
    let rt = tokio::runtime::Handle::current();
    let mut permit: Option<tokio::sync::mpsc::Permit<'_, Result<Read>>> = None;
    let mut chunk: Vec<Ev> = Vec::new();
    let mut read = Vec::with_capacity(files.len());
    let mut ord = 0;
    let mut result = Ok(());
    'files: for (fi, path) in files.iter().enumerate() {
        let (mut events, mut first, mut last) = (0, None, None);
        let mut tables = BTreeSet::new();
        let reader = match crate::changelog::open_reader(path) {
            Ok(f) => std::io::BufReader::with_capacity(1 << 20, f),
            // The file's fault, not the loader's: quarantined with the reason.
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                result = Err(Error::Parse {
                    path: path.clone(),
                    line: 0,
                    message: format!("cannot be opened: {e}"),
                });
                break;
            }
            Err(e) => {
                result = Err(Error::io("opening change-log file", path, e));
                break;
            }
        };
        for (i, line) in reader.lines().enumerate() {
            if fi == 0 && i + 1 < from_line {
                continue;
            }
            let decoded = line
                .map_err(|e| {
                    if e.kind() == std::io::ErrorKind::InvalidData {
                        Error::Parse {
                            path: path.clone(),
                            line: i as u64 + 1,
                            message: "is not valid UTF-8 (change-log files are UTF-8 JSON Lines; \
                                      was it saved in another encoding?)"
                                .into(),
                        }
                    } else {
                        Error::io("reading change-log file", path, e)
                    }
                })
                .and_then(|line| {
                    if line.trim().is_empty() {
                        return Ok(None);
                    }
                    let bad = |message: String| Error::Parse {
                        path: path.clone(),
                        line: i as u64 + 1,
                        message,
                    };
                    let ev = decode_where(&line, &specs, &keep).map_err(|e| match e {
                        // Not the file's fault: the loader was started with other tables than
                        // the extractor. Stop rather than quarantine the other tables' events.
                        DecodeError::UnknownTable(t) => Error::setup(
                            format!("change-log file {}", path.display()),
                            format!(
                                "line {} holds events of table {t}, which the loader's CDC_TABLES does not name; \
                                 give the loader the extractor's CDC_TABLES",
                                i + 1
                            ),
                        ),
                        DecodeError::Invalid(m) => bad(m),
                    })?;
                    let Some(ev) = ev else {
                        return Ok(None);
                    };
                    let ts = timestamp(ev.ts_us).map_err(bad)?;
                    timestamp(ev.captured_ms.saturating_mul(1000)).map_err(bad)?;
                    Ok(Some((ev, ts)))
                });
            let (ev, ts) = match decoded {
                Ok(Some(x)) => x,
                Ok(None) => continue,
                Err(e) => {
                    result = Err(e);
                    break 'files;
                }
            };
            first = Some(first.map_or(ts, |x: DateTime<Utc>| x.min(ts)));
            last = Some(last.map_or(ts, |x: DateTime<Utc>| x.max(ts)));
            events += 1;
            ord += 1;
            if let Some(change) = ev.schema.as_deref() {
                let t = ev.table;
                match super::schema::follow(&specs[t], change) {
                    Ok(next) => {
                        hashers[t] = RowHasher::new(&next);
                        specs[t] = next;
                    }
                    Err(m) => {
                        result = Err(Error::Parse {
                            path: path.clone(),
                            line: i as u64 + 1,
                            message: format!("schema change of {}: {m}", specs[t].qualified()),
                        });
                        break 'files;
                    }
                }
                tables.insert(t);
                // The chunk so far (a permit is held whenever it has events), then the event.
                if let Some(p) = permit.take() {
                    p.send(Ok(Read::Chunk(std::mem::take(&mut chunk))));
                }
                if send
                    .blocking_send(Ok(Read::Schema {
                        file: fi,
                        line: i + 1,
                        ev,
                    }))
                    .is_err()
                {
                    return;
                }
                continue;
            }
            if ev.op == crate::event::Op::SnapshotEnd {
                tables.insert(ev.table);
                if let Some(p) = permit.take() {
                    p.send(Ok(Read::Chunk(std::mem::take(&mut chunk))));
                }
                if send
                    .blocking_send(Ok(Read::SnapshotEnd { file: fi, ev }))
                    .is_err()
                {
                    return;
                }
                continue;
            }
            // A re-snapshot's rows share one instant but never a key: they may be split.
            if chunk.len() >= chunk_events
                && chunk
                    .last()
                    .is_some_and(|l| l.ev.ts_us != ev.ts_us || (l.ev.resnapshot && ev.resnapshot))
            {
                if let Some(p) = permit.take() {
                    p.send(Ok(Read::Chunk(std::mem::take(&mut chunk))));
                }
            }
            if permit.is_none() {
                match rt.block_on(send.reserve()) {
                    Ok(p) => permit = Some(p),
                    // The applier has gone (it failed): stop.
                    Err(_) => return,
                }
                chunk.reserve(chunk_events.min(1 << 16));
            }
            let hash = hashers
                .get(ev.table)
                .map(|h| h.hash(&ev))
                .unwrap_or_default();
            tables.insert(ev.table);
            chunk.push(Ev {
                ord,
                file: fi,
                ev,
                hash,
            });
        }
        read.push(FileRead {
            events,
            first,
            last,
            tables,
        });
    }
    let last_msg = match result {
        Ok(()) => Ok(Read::Done(read)),
        Err(e) => Err(e),
    };
    match permit {
        Some(p) => {
            if last_msg.is_ok() {
                p.send(Ok(Read::Chunk(chunk)));
                let _ = send.blocking_send(last_msg);
            } else {
                p.send(last_msg);
            }
        }
        None => {
            let _ = send.blocking_send(last_msg);
        }
    }
}

pub fn timestamp(us: i64) -> std::result::Result<DateTime<Utc>, String> {
    DateTime::<Utc>::from_timestamp_micros(us)
        .ok_or_else(|| format!("time {us} µs is out of range"))
}
