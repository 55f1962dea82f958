//! The row hash of a version's state, stored as a UUID: MD5 over the written columns'
//! values, timestamps as instants (so the same state hashes the same whichever capture mode
//! wrote it). Two events whose hashes are equal carry the same state: the later adds nothing.

use crate::event::{DecodedEvent, Op};
use crate::table::TableSpec;
use chrono::DateTime;
use md5::{Digest, Md5};

/// Which columns a table's hash covers, and which of them are timestamps.
#[derive(Debug, Clone)]
pub struct RowHasher {
    /// Indexes of the tracked columns the loader writes (the others are generated).
    written: Vec<usize>,
    /// Whether each tracked column is a timestamp (compared as an instant).
    is_time: Vec<bool>,
}

impl RowHasher {
    pub fn new(spec: &TableSpec) -> Self {
        RowHasher {
            written: spec.written_columns(),
            is_time: spec
                .columns
                .iter()
                .map(|c| c.sql_type.to_ascii_lowercase().starts_with("timestamp"))
                .collect(),
        }
    }

    /// The hash of an event's state. Deletes carry no state.
    pub fn hash(&self, ev: &DecodedEvent) -> [u8; 16] {
        let mut md5 = Md5::new();
        if ev.op != Op::Delete {
            for &i in &self.written {
                // Each value is tagged and length-prefixed, so no two value lists share bytes.
                match ev.values.get(i) {
                    None => md5.update(b"N"),
                    Some(v) => match self.is_time[i]
                        .then(|| DateTime::parse_from_rfc3339(v).ok())
                        .flatten()
                    {
                        Some(t) => {
                            md5.update(b"T");
                            md5.update(t.timestamp_micros().to_le_bytes());
                        }
                        None => {
                            md5.update(b"V");
                            md5.update((v.len() as u64).to_le_bytes());
                            md5.update(v.as_bytes());
                        }
                    },
                }
            }
        }
        md5.finalize().into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(values: &[Option<&str>]) -> DecodedEvent {
        DecodedEvent {
            table: 0,
            op: Op::Update,
            key: "1".into(),
            ts_us: 0,
            lsn: None,
            tx_id: None,
            captured_ms: 0,
            values: values.iter().copied().collect(),
            schema: None,
            resnapshot: false,
        }
    }

    #[test]
    fn the_row_hash_sees_instants_and_nulls_not_spelling() {
        let sql = RowHasher::new(&TableSpec::orders());
        let row_hash = |e: &DecodedEvent, h: &RowHasher| h.hash(e);
        let sql = &sql;
        let base = [
            Some("1"),
            Some("2"),
            Some("3"),
            Some("4.50"),
            None,
            Some("pending"),
            Some("2026-01-01T00:00:00+00:00"),
            Some("2026-01-01T00:00:00.5+00:00"),
        ];
        let h = row_hash(&ev(&base), sql);
        // The same instant in another zone, and a generated column's value, change nothing.
        let mut same = base;
        same[6] = Some("2026-01-01T01:00:00+01:00");
        same[4] = Some("13.50");
        assert_eq!(row_hash(&ev(&same), sql), h);
        let mut other = base;
        other[5] = Some("shipped");
        assert_ne!(row_hash(&ev(&other), sql), h);
        let mut null = base;
        null[3] = None;
        assert_ne!(row_hash(&ev(&null), sql), h);
        // Values cannot run into each other.
        let mut a = base;
        (a[0], a[1]) = (Some("1\x1f"), Some("2"));
        let mut b = base;
        (b[0], b[1]) = (Some("1"), Some("\x1f2"));
        assert_ne!(row_hash(&ev(&a), sql), row_hash(&ev(&b), sql));
    }
}
