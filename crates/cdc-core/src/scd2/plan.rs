//! The version planner: the SCD Type 2 rules as a pure function from a chunk of events and
//! the newest version the history holds of each of their keys to the current rows to close
//! and the versions to insert. The rules live here and nowhere else (README, "The history table"):
//!
//! - one version per distinct committed state of a key, `valid_from` = its change time;
//! - events at or before the newest position the history holds for a key are duplicates
//!   (a file applied again, the same change in two files) and are dropped;
//! - of several events of one key at one instant the last (by LSN, then read order) wins;
//! - an event equal to the state before it adds nothing;
//! - a delete closes the chain; a later insert starts a new one.

use crate::event::{DecodedEvent, Op};
use std::collections::HashMap;

/// One event of a chunk, with where it was read and the hash of its state.
#[derive(Debug, Clone)]
pub struct Ev {
    /// Position in read order (file order, then line).
    pub ord: usize,
    /// Index of its file in the batch.
    pub file: usize,
    pub ev: DecodedEvent,
    pub hash: [u8; 16],
}

/// The newest version the history holds for a key: its state and position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Newest {
    /// Whether it is the current (open) version; otherwise the chain ended with a delete.
    pub current: bool,
    pub hash: [u8; 16],
    /// Its position: `valid_from` (and LSN) of a current version, `valid_to` (and end LSN)
    /// of a closed one.
    pub ts_us: i64,
    pub pos: i64,
}

/// An event that changes the history: a version to insert, or a delete that ends a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kept {
    /// Index of the event in the chunk.
    pub idx: usize,
    /// The next kept event of the same key in the chunk: it closes this version.
    pub next: Option<usize>,
}

/// What a chunk does to the history.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// In chunk order; deletes among them insert nothing but close the version before.
    pub kept: Vec<Kept>,
    /// Events (indexes) whose key has a current version in the history that they close.
    pub closes: Vec<usize>,
}

/// Puts a chunk in the order `plan` needs: by table, key, then change time, LSN and read
/// order.
pub fn order(chunk: &mut [Ev]) {
    chunk.sort_by(|a, b| {
        (
            a.ev.table,
            a.ev.key.as_str(),
            a.ev.ts_us,
            a.ev.lsn.unwrap_or(0),
            a.ord,
        )
            .cmp(&(
                b.ev.table,
                b.ev.key.as_str(),
                b.ev.ts_us,
                b.ev.lsn.unwrap_or(0),
                b.ord,
            ))
    });
}

/// The runs of an `order`ed chunk that are one table's: `(table, start..end)`.
pub fn tables(chunk: &[Ev]) -> Vec<(usize, std::ops::Range<usize>)> {
    let mut runs = Vec::new();
    let mut start = 0;
    while start < chunk.len() {
        let t = chunk[start].ev.table;
        let end = start
            + chunk[start..]
                .iter()
                .take_while(|e| e.ev.table == t)
                .count();
        runs.push((t, start..end));
        start = end;
    }
    runs
}

/// The distinct keys of an ordered chunk (of one table).
pub fn keys(chunk: &[Ev]) -> Vec<&str> {
    let mut keys: Vec<&str> = chunk.iter().map(|e| e.ev.key.as_str()).collect();
    keys.dedup();
    keys
}

/// Decides, key by key, which events of an `order`ed chunk of one table become versions,
/// given the newest version the history holds of each key.
pub fn plan(chunk: &[Ev], newest: &HashMap<String, Newest>) -> Plan {
    let mut out = Plan::default();
    let mut start = 0;
    while start < chunk.len() {
        let key = chunk[start].ev.key.as_str();
        let mut end = start;
        while end < chunk.len() && chunk[end].ev.key == key {
            end += 1;
        }
        let lat = newest.get(key);
        // (op is a delete, hash) of the state before the next event.
        let mut prev: Option<(bool, [u8; 16])> = lat.map(|l| (!l.current, l.hash));
        let first_kept = out.kept.len();
        for i in start..end {
            let e = &chunk[i];
            let last_at_instant = i + 1 == end || chunk[i + 1].ev.ts_us != e.ev.ts_us;
            let fresh = lat.is_none_or(|l| (e.ev.ts_us, e.ev.lsn.unwrap_or(0)) > (l.ts_us, l.pos));
            if !last_at_instant || !fresh {
                continue;
            }
            let delete = e.ev.op == Op::Delete;
            let keep = match prev {
                None => !delete,
                Some((prev_deleted, prev_hash)) => {
                    if delete {
                        !prev_deleted
                    } else {
                        prev_deleted || prev_hash != e.hash
                    }
                }
            };
            prev = Some((delete, e.hash));
            if keep {
                if out.kept.len() > first_kept {
                    let last = out.kept.len() - 1;
                    out.kept[last].next = Some(i);
                }
                out.kept.push(Kept { idx: i, next: None });
            }
        }
        if out.kept.len() > first_kept && lat.is_some_and(|l| l.current) {
            out.closes.push(out.kept[first_kept].idx);
        }
        start = end;
    }
    out
}

#[cfg(test)]
mod tests {
    //! The planner against the independent reference model: random change streams of a few
    //! keys (inserts, updates that may change nothing, deletes, re-inserts, several changes
    //! at one instant, replayed stretches), cut into random chunks and applied to an
    //! in-memory history through `plan`, must give exactly the reference model's versions.

    use super::*;
    use crate::event::Values;
    use crate::scd2::row_hash::RowHasher;
    use crate::table::{Column, TableSpec};
    use crate::test_utils::model::{reference_versions, Version};
    use rand::rngs::StdRng;
    use rand::{RngExt, SeedableRng};

    fn spec() -> TableSpec {
        let mut spec = TableSpec::orders();
        spec.columns = ["status", "qty"]
            .iter()
            .map(|n| Column {
                name: (*n).into(),
                sql_type: "text".into(),
                generated: None,
            })
            .collect();
        spec
    }

    /// A history row as the in-memory store keeps it.
    #[derive(Clone, Debug)]
    struct Row {
        from: (i64, i64),
        to: Option<(i64, i64)>,
        deleted: bool,
        hash: [u8; 16],
        values: Vec<Option<String>>,
    }

    /// Applies one chunk through the planner to the in-memory history, as the PostgreSQL
    /// store does: newest per key, close, insert.
    fn apply(history: &mut HashMap<String, Vec<Row>>, chunk: &mut [Ev]) {
        order(chunk);
        let mut newest = HashMap::new();
        for k in keys(chunk) {
            let Some(rows) = history.get(k) else { continue };
            let n = rows.iter().max_by_key(|r| r.from).expect("a row");
            let (ts_us, pos) = n.to.unwrap_or(n.from);
            newest.insert(
                k.to_owned(),
                Newest {
                    current: n.to.is_none(),
                    hash: n.hash,
                    ts_us,
                    pos,
                },
            );
        }
        let p = plan(chunk, &newest);
        let pos = |e: &DecodedEvent| (e.ts_us, e.lsn.unwrap_or(0));
        for &i in &p.closes {
            let e = &chunk[i].ev;
            let rows = history.get_mut(&e.key).expect("a key to close");
            let current: Vec<&mut Row> = rows.iter_mut().filter(|r| r.to.is_none()).collect();
            assert_eq!(current.len(), 1, "one current row of key {}", e.key);
            for r in current {
                r.to = Some(pos(e));
                r.deleted = e.op == Op::Delete;
            }
        }
        for k in &p.kept {
            let e = &chunk[k.idx];
            if e.ev.op == Op::Delete {
                continue;
            }
            let next = k.next.map(|n| &chunk[n].ev);
            history.entry(e.ev.key.clone()).or_default().push(Row {
                from: pos(&e.ev),
                to: next.map(pos),
                deleted: next.is_some_and(|n| n.op == Op::Delete),
                hash: e.hash,
                values: (0..2)
                    .map(|i| e.ev.values.get(i).map(str::to_owned))
                    .collect(),
            });
        }
    }

    #[test]
    fn random_streams_in_random_chunks_give_the_reference_models_versions() {
        let spec = spec();
        let hasher = RowHasher::new(&spec);
        for seed in 0..400u64 {
            let mut rng = StdRng::seed_from_u64(seed);
            let logical = rng.random_bool(0.5);
            let keys = rng.random_range(1..5);
            // The committed changes, in commit order: (key, time, op, values).
            let mut stream: Vec<DecodedEvent> = Vec::new();
            let mut alive = vec![false; keys];
            let mut ts = 1_000_000i64;
            let mut lsn = 100i64;
            for _ in 0..rng.random_range(1..40) {
                ts += rng.random_range(1..3_000_000);
                // One transaction: in logical mode a change or two (several changes at one
                // instant, told apart by their LSNs); a timestamp capture sees one state.
                for _ in 0..rng.random_range(1..if logical { 3 } else { 2 }) {
                    let k = rng.random_range(0..keys);
                    let op = if !alive[k] {
                        Op::Create
                    } else if rng.random_bool(0.2) {
                        Op::Delete
                    } else {
                        Op::Update
                    };
                    alive[k] = op != Op::Delete;
                    let values: Values = if op == Op::Delete {
                        Values::default()
                    } else {
                        let status = ["a", "b"][rng.random_range(0..2)];
                        let qty = ["1", "2"][rng.random_range(0..2)];
                        [Some(status), rng.random_bool(0.9).then_some(qty)]
                            .into_iter()
                            .collect()
                    };
                    lsn += 8;
                    stream.push(DecodedEvent {
                        table: 0,
                        op,
                        key: k.to_string(),
                        ts_us: ts,
                        lsn: logical.then_some(lsn),
                        tx_id: None,
                        captured_ms: 0,
                        values,
                    });
                }
            }
            // What the files deliver: the stream, with a stretch of it replayed later.
            let mut delivered = stream.clone();
            if rng.random_bool(0.5) {
                let a = rng.random_range(0..stream.len());
                let b = rng.random_range(a..stream.len()) + 1;
                delivered.extend_from_slice(&stream[a..b]);
            }
            let evs: Vec<Ev> = delivered
                .into_iter()
                .enumerate()
                .map(|(ord, ev)| Ev {
                    ord,
                    file: 0,
                    hash: hasher.hash(&ev),
                    ev,
                })
                .collect();
            // Cut into chunks, never between events of one instant (as the reader does).
            let mut history: HashMap<String, Vec<Row>> = HashMap::new();
            let mut chunk: Vec<Ev> = Vec::new();
            let size = rng.random_range(1..12);
            for e in evs {
                if chunk.len() >= size && chunk.last().is_some_and(|l| l.ev.ts_us != e.ev.ts_us) {
                    apply(&mut history, &mut chunk);
                    chunk.clear();
                }
                chunk.push(e);
            }
            apply(&mut history, &mut chunk);

            for k in 0..keys {
                let key = k.to_string();
                // The reference model sees each committed state once: the last of its instant.
                let mut events: Vec<(i64, bool, Vec<Option<String>>)> = Vec::new();
                for e in stream.iter().filter(|e| e.key == key) {
                    let values = (0..2).map(|i| e.values.get(i).map(str::to_owned)).collect();
                    let item = (e.ts_us, e.op == Op::Delete, values);
                    match events.last_mut() {
                        Some(last) if last.0 == e.ts_us => *last = item,
                        _ => events.push(item),
                    }
                }
                let expected = reference_versions(events);
                let mut rows = history.get(&key).cloned().unwrap_or_default();
                rows.sort_by_key(|r| r.from);
                let actual: Vec<Version> = rows
                    .into_iter()
                    .map(|r| Version {
                        valid_from_us: r.from.0,
                        valid_to_us: r.to.map(|t| t.0),
                        is_deleted: r.deleted,
                        values: r.values,
                    })
                    .collect();
                assert_eq!(actual, expected, "seed {seed}, key {key}");
            }
        }
    }
}
