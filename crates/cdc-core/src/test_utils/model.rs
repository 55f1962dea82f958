//! The independent SCD2 reference model: the versions a key's committed states must become,
//! written as plainly as possible, and the comparison of two histories.

use std::collections::BTreeMap;

/// One expected or actual history row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version {
    pub valid_from_us: i64,
    pub valid_to_us: Option<i64>,
    pub is_deleted: bool,
    pub values: Vec<Option<String>>,
}

pub type History = BTreeMap<String, Vec<Version>>;

/// The SCD2 reference model over one key's events in order: `(time, is_delete, values)`.
/// A state equal to the one before it is no new version; a delete closes the open version.
pub fn reference_versions(events: Vec<(i64, bool, Vec<Option<String>>)>) -> Vec<Version> {
    let mut versions: Vec<Version> = Vec::new();
    let mut cur: Option<(Vec<Option<String>>, i64)> = None;
    for (ts, is_delete, values) in events {
        if is_delete {
            if let Some((v, from)) = cur.take() {
                versions.push(Version {
                    valid_from_us: from,
                    valid_to_us: Some(ts),
                    is_deleted: true,
                    values: v,
                });
            }
        } else {
            match &cur {
                Some((v, _)) if *v == values => {}
                Some((v, from)) => {
                    versions.push(Version {
                        valid_from_us: *from,
                        valid_to_us: Some(ts),
                        is_deleted: false,
                        values: v.clone(),
                    });
                    cur = Some((values, ts));
                }
                None => cur = Some((values, ts)),
            }
        }
    }
    if let Some((v, from)) = cur {
        versions.push(Version {
            valid_from_us: from,
            valid_to_us: None,
            is_deleted: false,
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
