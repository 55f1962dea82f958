//! The independent SCD2 reference model: the versions a key's committed states must become,
//! written as plainly as possible, and the comparison of two histories.

use std::collections::BTreeMap;

/// One expected or actual history row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version {
    pub valid_from_us: i64,
    pub valid_to_us: Option<i64>,
    pub is_deleted: bool,
    /// Ended by a truncate of the table (then also `is_deleted`).
    pub is_truncated: bool,
    pub values: Vec<Option<String>>,
}

pub type History = BTreeMap<String, Vec<Version>>;

/// What happened to a key at a time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// The key's committed state (an insert or an update).
    State(Vec<Option<String>>),
    Delete,
    /// The key's table was truncated.
    Truncate,
}

/// The SCD2 reference model over one key's changes in order: `(time, change)`. Of the
/// changes at one time only the last counts, except that a truncate among them ends the
/// open version there and only what follows the truncate counts. A state equal to the one
/// before it is no new version; a delete or truncate closes the open version.
pub fn reference_versions(events: Vec<(i64, Change)>) -> Vec<Version> {
    let mut versions: Vec<Version> = Vec::new();
    type Open = Option<(Vec<Option<String>>, i64)>;
    fn close(versions: &mut Vec<Version>, cur: &mut Open, ts: i64, truncated: bool) {
        if let Some((v, from)) = cur.take() {
            versions.push(Version {
                valid_from_us: from,
                valid_to_us: Some(ts),
                is_deleted: true,
                is_truncated: truncated,
                values: v,
            });
        }
    }
    let mut cur: Open = None;
    let mut i = 0;
    while i < events.len() {
        let ts = events[i].0;
        let mut j = i;
        while j < events.len() && events[j].0 == ts {
            j += 1;
        }
        let mut at_once = &events[i..j];
        i = j;
        if let Some(t) = at_once.iter().rposition(|e| e.1 == Change::Truncate) {
            close(&mut versions, &mut cur, ts, true);
            at_once = &at_once[t + 1..];
        }
        match at_once.last().map(|e| &e.1) {
            None | Some(Change::Truncate) => {}
            Some(Change::Delete) => close(&mut versions, &mut cur, ts, false),
            Some(Change::State(values)) => match &cur {
                Some((v, _)) if v == values => {}
                Some((v, from)) => {
                    versions.push(Version {
                        valid_from_us: *from,
                        valid_to_us: Some(ts),
                        is_deleted: false,
                        is_truncated: false,
                        values: v.clone(),
                    });
                    cur = Some((values.clone(), ts));
                }
                None => cur = Some((values.clone(), ts)),
            },
        }
    }
    if let Some((v, from)) = cur {
        versions.push(Version {
            valid_from_us: from,
            valid_to_us: None,
            is_deleted: false,
            is_truncated: false,
            values: v,
        });
    }
    versions
}

/// Panics with the first differing keys when two histories differ.
pub fn assert_same_history(expected: &History, actual: &History) {
    if expected == actual {
        return;
    }
    let mut report = String::new();
    let keys: std::collections::BTreeSet<&String> = expected.keys().chain(actual.keys()).collect();
    let mut shown = 0;
    for k in keys {
        if expected.get(k) != actual.get(k) {
            report.push_str(&format!(
                "key {k}:\n  expected {:?}\n  actual   {:?}\n",
                expected.get(k),
                actual.get(k)
            ));
            shown += 1;
            if shown == 5 {
                break;
            }
        }
    }
    panic!(
        "history differs from the ground truth ({} expected keys, {} actual):\n{report}",
        expected.len(),
        actual.len()
    );
}
