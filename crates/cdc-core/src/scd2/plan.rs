//! The version planner: the SCD Type 2 rules as a pure function from a chunk of events and
//! the newest version the history holds of each of their keys to the current rows to close
//! and the versions to insert. The rules live here and nowhere else (README, "The history table"):
//!
//! - one version per distinct committed state of a key, `valid_from` = its change time;
//! - events at or before the newest position the history holds for a key are late (a file
//!   applied again, the same change in two files, a quarantined file put back): the store
//!   drops those it holds already and places the others in the key's chain (`Plan::late`),
//!   the last of each instant only;
//! - of several events of one key at one instant the last (by LSN, then read order) wins;
//! - an event equal to the state before it adds nothing;
//! - a delete closes the chain; a later insert starts a new one;
//! - a truncate closes the chain of every key of its table (marked as a truncate); a later
//!   insert starts a new one. At one instant (a transaction that truncates and writes the
//!   table) the chain before it ends at the truncate and the last state after the truncate,
//!   if any, starts a new chain at the same instant.
//!
//! A chunk's truncates also end the keys it has no events of (`truncates`).

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

/// An event that changes the history: a version to insert, or a delete or truncate that ends
/// a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kept {
    /// Index of the event in the chunk (a truncate's when a truncate ends the key's chain).
    pub idx: usize,
    /// The next kept event of the same key in the chunk: it closes this version.
    pub next: Option<usize>,
}

/// A current version of a key the history holds, closed by an event of the chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Closing {
    /// An event of the key (where its key is read).
    pub key: usize,
    /// The event that closes it (a new version, a delete or a truncate).
    pub by: usize,
}

/// What a chunk does to the history.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// In chunk order; deletes and truncates among them insert nothing but close the version
    /// before.
    pub kept: Vec<Kept>,
    /// Keys that have a current version in the history, and the events that close them.
    pub closes: Vec<Closing>,
    /// Events at or before the newest position the history holds of their key (a late
    /// file, a file applied again): the store places each in the key's chain, or finds it
    /// there already (`HistoryStore::late`). Truncates are not among them.
    pub late: Vec<usize>,
    /// Deletes of a key the history holds nothing of before them: remembered, so that an
    /// older version arriving later ends there.
    pub orphan_deletes: Vec<usize>,
}

/// Puts a chunk in the order `plan` needs: by table, its truncates first, then key, change
/// time, LSN and read order.
pub fn order(chunk: &mut [Ev]) {
    chunk.sort_by(|a, b| {
        (
            a.ev.table,
            a.ev.op != Op::Truncate,
            a.ev.key.as_str(),
            a.ev.ts_us,
            a.ev.lsn.unwrap_or(0),
            a.ord,
        )
            .cmp(&(
                b.ev.table,
                b.ev.op != Op::Truncate,
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

/// The truncates of an ordered chunk of one table: they come first, in time order. After the
/// plan the store closes, for each in turn, every version still current that started before
/// it (the keys the chunk has no events of; the plan ended the others), marked as truncated.
pub fn truncates(chunk: &[Ev]) -> &[Ev] {
    let n = chunk.iter().take_while(|e| e.ev.op == Op::Truncate).count();
    &chunk[..n]
}

/// The distinct keys of an ordered chunk (of one table).
pub fn keys(chunk: &[Ev]) -> Vec<&str> {
    let mut keys: Vec<&str> = chunk[truncates(chunk).len()..]
        .iter()
        .map(|e| e.ev.key.as_str())
        .collect();
    keys.dedup();
    keys
}

/// The position of an event: change time, LSN (0 in timestamp mode).
fn pos(e: &DecodedEvent) -> (i64, i64) {
    (e.ts_us, e.lsn.unwrap_or(0))
}

/// Decides, key by key, which events of an `order`ed chunk of one table become versions,
/// given the newest version the history holds of each key.
pub fn plan(chunk: &[Ev], newest: &HashMap<String, Newest>) -> Plan {
    let mut out = Plan::default();
    let n_truncates = truncates(chunk).len();
    let mut start = n_truncates;
    let mut merged: Vec<usize> = Vec::new();
    let mut instant: Vec<usize> = Vec::new();
    while start < chunk.len() {
        let key = chunk[start].ev.key.as_str();
        let mut end = start;
        while end < chunk.len() && chunk[end].ev.key == key {
            end += 1;
        }
        let lat = newest.get(key);
        let fresh = |i: usize| lat.is_none_or(|l| pos(&chunk[i].ev) > (l.ts_us, l.pos));
        // Late: before the newest position, at another instant (one at the newest's instant is
        // that change again, or superseded by it). Of a late instant's events only the last
        // counts, as in order: a transaction that changed the key twice and ended where it
        // began changes nothing, however late it comes.
        out.late.extend((start..end).filter(|&i| {
            let last_of_instant = i + 1 == end || chunk[i + 1].ev.ts_us != chunk[i].ev.ts_us;
            last_of_instant
                && lat.is_some_and(|l| {
                    pos(&chunk[i].ev) < (l.ts_us, l.pos) && chunk[i].ev.ts_us != l.ts_us
                })
        }));
        // The key's events and the table's truncates, in position order (then read order).
        merged.clear();
        if n_truncates == 0 {
            merged.extend(start..end);
        } else {
            merged.extend((0..n_truncates).chain(start..end));
            merged.sort_by_key(|&i| (pos(&chunk[i].ev), chunk[i].ord));
        }
        // (is a deleted or truncated chain, hash) of the state before the next event.
        let mut prev: Option<(bool, [u8; 16])> = lat.map(|l| (!l.current, l.hash));
        let first_kept = out.kept.len();
        let keep = |i: usize, out: &mut Plan| {
            if out.kept.len() > first_kept {
                let last = out.kept.len() - 1;
                out.kept[last].next = Some(i);
            }
            out.kept.push(Kept { idx: i, next: None });
        };
        // One instant at a time.
        let mut a = 0;
        while a < merged.len() {
            let ts = chunk[merged[a]].ev.ts_us;
            let mut b = a;
            while b < merged.len() && chunk[merged[b]].ev.ts_us == ts {
                b += 1;
            }
            instant.clear();
            instant.extend(merged[a..b].iter().copied().filter(|&i| fresh(i)));
            a = b;
            let states = match instant
                .iter()
                .rposition(|&i| chunk[i].ev.op == Op::Truncate)
            {
                Some(t) => {
                    // The truncate ends an open chain; what follows it at this instant is
                    // a new chain.
                    if prev.is_some_and(|(ended, _)| !ended) {
                        keep(instant[t], &mut out);
                    }
                    prev = Some((true, [0; 16]));
                    &instant[t + 1..]
                }
                None => &instant[..],
            };
            // Of the states at one instant the last wins.
            let Some(&i) = states.last() else {
                continue;
            };
            let e = &chunk[i];
            let delete = e.ev.op == Op::Delete;
            let kept = match prev {
                None => {
                    if delete {
                        out.orphan_deletes.push(i);
                    }
                    !delete
                }
                Some((prev_ended, prev_hash)) => {
                    if delete {
                        !prev_ended
                    } else {
                        prev_ended || prev_hash != e.hash
                    }
                }
            };
            prev = Some((delete, e.hash));
            if kept {
                keep(i, &mut out);
            }
        }
        if out.kept.len() > first_kept && lat.is_some_and(|l| l.current) {
            out.closes.push(Closing {
                key: start,
                by: out.kept[first_kept].idx,
            });
        }
        start = end;
    }
    out
}

#[cfg(test)]
mod tests {
    //! The planner against the independent reference model: random change streams of a few
    //! keys (inserts, updates that may change nothing, deletes, re-inserts, truncates of the
    //! table, several changes at one instant, a truncate among them included, replayed
    //! stretches), cut into random chunks and applied to an in-memory history through `plan`
    //! as the PostgreSQL store does, must give exactly the reference model's versions.

    use super::*;
    use crate::event::Values;
    use crate::scd2::row_hash::RowHasher;
    use crate::table::{Column, TableSpec};
    use crate::test_utils::model::{reference_versions, Change, Version};
    use rand::rngs::StdRng;
    use rand::{RngExt, SeedableRng};

    fn spec() -> TableSpec {
        let mut spec = TableSpec::orders();
        spec.columns = ["status", "qty"]
            .iter()
            .map(|n| Column::new(n, "text"))
            .collect();
        spec
    }

    /// A history row as the in-memory store keeps it.
    #[derive(Clone, Debug)]
    struct Row {
        from: (i64, i64),
        to: Option<(i64, i64)>,
        deleted: bool,
        truncated: bool,
        hash: [u8; 16],
        values: Vec<Option<String>>,
    }

    /// Applies one chunk through the planner to the in-memory history, as the PostgreSQL
    /// store does: newest per key, close, insert, then the truncates' table-wide closes.
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
        for c in &p.closes {
            let key = &chunk[c.key].ev.key;
            let by = &chunk[c.by].ev;
            let rows = history.get_mut(key).expect("a key to close");
            let current: Vec<&mut Row> = rows.iter_mut().filter(|r| r.to.is_none()).collect();
            assert_eq!(current.len(), 1, "one current row of key {key}");
            for r in current {
                r.to = Some(pos(by));
                r.deleted = matches!(by.op, Op::Delete | Op::Truncate);
                r.truncated = by.op == Op::Truncate;
            }
        }
        for k in &p.kept {
            let e = &chunk[k.idx];
            if matches!(e.ev.op, Op::Delete | Op::Truncate) {
                continue;
            }
            let next = k.next.map(|n| &chunk[n].ev);
            history.entry(e.ev.key.clone()).or_default().push(Row {
                from: pos(&e.ev),
                to: next.map(pos),
                deleted: next.is_some_and(|n| matches!(n.op, Op::Delete | Op::Truncate)),
                truncated: next.is_some_and(|n| n.op == Op::Truncate),
                hash: e.hash,
                values: (0..2)
                    .map(|i| e.ev.values.get(i).map(str::to_owned))
                    .collect(),
            });
        }
        for t in truncates(chunk) {
            for r in history.values_mut().flatten() {
                if r.to.is_none() && r.from < pos(&t.ev) {
                    r.to = Some(pos(&t.ev));
                    r.deleted = true;
                    r.truncated = true;
                }
            }
        }
        for (key, rows) in history.iter() {
            let mut rows: Vec<&Row> = rows.iter().collect();
            rows.sort_by_key(|r| r.from);
            for w in rows.windows(2) {
                assert!(
                    w[0].to.is_some(),
                    "key {key}: only the newest may be current"
                );
            }
            for r in rows {
                assert!(
                    r.to.is_none_or(|to| to.0 > r.from.0),
                    "key {key}: a zero-length version {r:?}"
                );
            }
        }
    }

    /// A transaction delivered again after the key moved on (an extractor killed before it
    /// confirmed, a file put back) that changed the key twice: only its last state is placed
    /// (placing the first would split a version with a state that never committed).
    #[test]
    fn of_a_late_instant_only_the_last_event_is_placed() {
        let hasher = RowHasher::new(&spec());
        let ev = |ord: usize, ts_us: i64, lsn: i64, qty: &str| {
            let ev = DecodedEvent {
                table: 0,
                op: Op::Update,
                key: "1".into(),
                ts_us,
                lsn: Some(lsn),
                tx_id: None,
                captured_ms: 0,
                values: [Some("a"), Some(qty)].into_iter().collect(),
                schema: None,
                resnapshot: false,
            };
            Ev {
                ord,
                file: 0,
                hash: hasher.hash(&ev),
                ev,
            }
        };
        let mut chunk = vec![
            ev(0, 20, 200, "18"),
            ev(1, 20, 208, "1"),
            ev(2, 25, 300, "5"),
        ];
        order(&mut chunk);
        let newest = HashMap::from([(
            "1".to_owned(),
            Newest {
                current: false,
                hash: [0; 16],
                ts_us: 40,
                pos: 400,
            },
        )]);
        let p = plan(&chunk, &newest);
        let late: Vec<(i64, i64)> = p.late.iter().map(|&i| pos(&chunk[i].ev)).collect();
        assert_eq!(late, [(20, 208), (25, 300)]);
        assert!(p.kept.is_empty() && p.closes.is_empty());
    }

    #[test]
    fn random_streams_in_random_chunks_give_the_reference_models_versions() {
        let spec = spec();
        let hasher = RowHasher::new(&spec);
        for seed in 0..600u64 {
            let mut rng = StdRng::seed_from_u64(seed);
            let logical = rng.random_bool(0.5);
            let keys = rng.random_range(1..5);
            let truncate_rate = if rng.random_bool(0.5) { 0.0 } else { 0.08 };
            // The committed changes, in commit order: (key, time, op, values).
            let mut stream: Vec<DecodedEvent> = Vec::new();
            let mut alive = vec![false; keys];
            let mut ts = 1_000_000i64;
            let mut lsn = 100i64;
            for _ in 0..rng.random_range(1..40) {
                ts += rng.random_range(1..3_000_000);
                // One transaction: in logical mode a change or three (several changes at one
                // instant, told apart by their LSNs); a timestamp capture sees one state.
                for _ in 0..rng.random_range(1..if logical { 4 } else { 2 }) {
                    lsn += 8;
                    if rng.random_bool(truncate_rate) {
                        alive = vec![false; keys];
                        stream.push(DecodedEvent {
                            table: 0,
                            op: Op::Truncate,
                            key: String::new(),
                            ts_us: ts,
                            lsn: logical.then_some(lsn),
                            tx_id: None,
                            captured_ms: 0,
                            values: Values::default(),
                            schema: None,
                            resnapshot: false,
                        });
                        continue;
                    }
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
                    stream.push(DecodedEvent {
                        table: 0,
                        op,
                        key: k.to_string(),
                        ts_us: ts,
                        lsn: logical.then_some(lsn),
                        tx_id: None,
                        captured_ms: 0,
                        values,
                        schema: None,
                        resnapshot: false,
                    });
                }
            }
            // What the files deliver: the stream, with a stretch of it (whole instants: a file
            // never splits a transaction) replayed later.
            let mut delivered = stream.clone();
            if rng.random_bool(0.5) {
                let mut a = rng.random_range(0..stream.len());
                let mut b = rng.random_range(a..stream.len()) + 1;
                while a > 0 && stream[a - 1].ts_us == stream[a].ts_us {
                    a -= 1;
                }
                while b < stream.len() && stream[b].ts_us == stream[b - 1].ts_us {
                    b += 1;
                }
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
                // The reference model: the key's committed changes and the table's truncates.
                let events: Vec<(i64, Change)> = stream
                    .iter()
                    .filter(|e| e.key == key || e.op == Op::Truncate)
                    .map(|e| {
                        let change = match e.op {
                            Op::Truncate => Change::Truncate,
                            Op::Delete => Change::Delete,
                            _ => Change::State(
                                (0..2).map(|i| e.values.get(i).map(str::to_owned)).collect(),
                            ),
                        };
                        (e.ts_us, change)
                    })
                    .collect();
                let expected = reference_versions(events);
                let mut rows = history.get(&key).cloned().unwrap_or_default();
                rows.sort_by_key(|r| r.from);
                let actual: Vec<Version> = rows
                    .into_iter()
                    .map(|r| Version {
                        valid_from_us: r.from.0,
                        valid_to_us: r.to.map(|t| t.0),
                        is_deleted: r.deleted,
                        is_truncated: r.truncated,
                        values: r.values,
                    })
                    .collect();
                assert_eq!(actual, expected, "seed {seed}, key {key}");
            }
        }
    }
}
