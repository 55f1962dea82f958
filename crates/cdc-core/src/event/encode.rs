//! Writing change events (the extractor's side of the format) from column values in
//! PostgreSQL's text form (a binary COPY of `col::text` in timestamp mode and the initial
//! copy, pgoutput's text values in logical mode). Building the JSON here rather than with
//! `json_build_object` in the source leaves the source only the work of a plain COPY.

use super::{CaptureMode, Op, CONNECTOR, FORMAT_VERSION};
use crate::table::TableSpec;
use std::borrow::Cow;

/// A JSON object of `(column, type OID, text value or NULL)` fields, each value typed by its
/// column's type (see `write_value`).
pub fn write_object<'a>(
    b: &mut Vec<u8>,
    fields: impl Iterator<Item = (&'a str, u32, Option<&'a str>)>,
) {
    b.push(b'{');
    for (i, (name, oid, v)) in fields.enumerate() {
        if i > 0 {
            b.push(b',');
        }
        json_str(b, name);
        b.push(b':');
        match v {
            None => b.extend_from_slice(b"null"),
            Some(s) => write_value(b, oid, s),
        }
    }
    b.push(b'}');
}

/// The parts of an event besides its row images.
pub struct Header<'a> {
    pub op: Op,
    pub mode: CaptureMode,
    pub snapshot: bool,
    /// A re-snapshot's row or end (`source.snapshot` `"incremental"`; `snapshot` is ignored).
    pub incremental: bool,
    /// `source.db`, when known.
    pub db: Option<&'a str>,
    pub ts_us: i64,
    pub key: &'a str,
    pub lsn: Option<u64>,
    pub tx_id: Option<u32>,
    pub captured_ms: i64,
}

/// Writes one event: `before` and `after` are written by the closures (a JSON value each).
pub fn write_event(
    b: &mut Vec<u8>,
    spec: &TableSpec,
    h: &Header<'_>,
    before: impl FnOnce(&mut Vec<u8>),
    after: impl FnOnce(&mut Vec<u8>),
) {
    b.extend_from_slice(b"{\"format_version\":");
    push_int(b, FORMAT_VERSION);
    b.extend_from_slice(b",\"op\":");
    json_str(b, h.op.as_str());
    b.extend_from_slice(b",\"before\":");
    before(b);
    b.extend_from_slice(b",\"after\":");
    after(b);
    write_source(b, spec, h);
}

/// Writes a schema event (`op` `s`): no row images and no key; `h.ts_us` (and `h.lsn`) the
/// position from which the table has the shape `change.columns`.
pub fn write_schema(
    b: &mut Vec<u8>,
    spec: &TableSpec,
    h: &Header<'_>,
    change: &crate::schema_change::SchemaEvent,
) {
    b.extend_from_slice(
        format!("{{\"format_version\":{FORMAT_VERSION},\"op\":\"s\",\"before\":null,\"after\":null,\"schema_change\":")
            .as_bytes(),
    );
    // Plain data: serializing into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *b, change);
    write_source(
        b,
        spec,
        &Header {
            op: Op::Schema,
            ..*h
        },
    );
}

/// The `source` block and `ts_ms`, closing the event.
fn write_source(b: &mut Vec<u8>, spec: &TableSpec, h: &Header<'_>) {
    b.extend_from_slice(
        concat!(
            ",\"source\":{\"version\":\"",
            env!("CARGO_PKG_VERSION"),
            "\",\"connector\":"
        )
        .as_bytes(),
    );
    json_str(b, CONNECTOR);
    b.push(b',');
    if let Some(db) = h.db {
        b.extend_from_slice(b"\"db\":");
        json_str(b, db);
        b.push(b',');
    }
    b.extend_from_slice(b"\"schema\":");
    json_str(b, &spec.schema);
    b.extend_from_slice(b",\"table\":");
    json_str(b, &spec.name);
    b.extend_from_slice(b",\"capture_mode\":");
    json_str(b, h.mode.as_str());
    if h.incremental {
        b.extend_from_slice(b",\"snapshot\":\"incremental\",\"key\":");
    } else {
        b.extend_from_slice(if h.snapshot {
            b",\"snapshot\":true,\"key\":"
        } else {
            b",\"snapshot\":false,\"key\":"
        });
    }
    if matches!(h.op, Op::Truncate | Op::Schema | Op::SnapshotEnd) {
        // A truncate or schema change is of the whole table: no key.
        b.extend_from_slice(b"null");
    } else {
        json_str(b, h.key);
    }
    let opt = |b: &mut Vec<u8>, v: Option<u64>| match v {
        Some(x) => push_int(b, x),
        None => b.extend_from_slice(b"null"),
    };
    b.extend_from_slice(b",\"ts_us\":");
    push_int(b, h.ts_us);
    b.extend_from_slice(b",\"lsn\":");
    opt(b, h.lsn);
    b.extend_from_slice(b",\"txId\":");
    opt(b, h.tx_id.map(u64::from));
    b.extend_from_slice(b"},\"ts_ms\":");
    push_int(b, h.captured_ms);
    b.push(b'}');
}

/// An integer in decimal.
fn push_int(b: &mut Vec<u8>, n: impl itoa::Integer) {
    b.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

/// Writes a re-snapshot's end (`op` `e`): no row images and no key; `h.ts_us` (and `h.lsn`)
/// the snapshot's position, where the keys it did not name end.
pub fn write_snapshot_end(b: &mut Vec<u8>, spec: &TableSpec, h: &Header<'_>) {
    let null = |b: &mut Vec<u8>| b.extend_from_slice(b"null");
    write_event(
        b,
        spec,
        &Header {
            op: Op::SnapshotEnd,
            incremental: true,
            ..*h
        },
        null,
        null,
    );
}

/// Writes a truncate event (`op` `t`): no row images and no key; `h.ts_us` is the truncate's
/// time, `h.lsn` its position in log mode.
pub fn write_truncate(b: &mut Vec<u8>, spec: &TableSpec, h: &Header<'_>) {
    let null = |b: &mut Vec<u8>| b.extend_from_slice(b"null");
    write_event(
        b,
        spec,
        &Header {
            op: Op::Truncate,
            ..*h
        },
        null,
        null,
    );
}

/// `s` as a JSON string. Most values need no escape (no quote, backslash or control
/// character): those are copied as they are; the others are escaped by serde_json.
pub fn json_str(b: &mut Vec<u8>, s: &str) {
    if s.bytes().all(|c| c >= 0x20 && c != b'"' && c != b'\\') {
        b.reserve(s.len() + 2);
        b.push(b'"');
        b.extend_from_slice(s.as_bytes());
        b.push(b'"');
    } else {
        // Writing into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *b, s);
    }
}

/// Integers and finite floats as JSON numbers, booleans as booleans, timestamps as ISO-8601,
/// everything else (numeric, json and jsonb included) as a JSON string of its exact text.
pub fn write_value(b: &mut Vec<u8>, oid: u32, s: &str) {
    match oid {
        20 | 21 | 23 | 26 => b.extend_from_slice(s.as_bytes()),
        700 | 701 if s.parse::<f64>().is_ok_and(f64::is_finite) => {
            b.extend_from_slice(s.as_bytes())
        }
        16 => b.extend_from_slice(if s == "t" || s == "true" {
            b"true"
        } else {
            b"false"
        }),
        1184 => json_str(b, &iso_timestamp(s, true)),
        1114 => json_str(b, &iso_timestamp(s, false)),
        _ => json_str(b, s),
    }
}

/// `2026-11-24 12:34:29.714732+00` (ISO DateStyle) as `2026-11-24T12:34:29.714732+00:00`;
/// a `timestamp` without a zone (`zoned` false) only gets its `T`. Borrowed when there is
/// nothing to change (infinity).
pub fn iso_timestamp(s: &str, zoned: bool) -> Cow<'_, str> {
    let bytes = s.as_bytes();
    let n = bytes.len();
    let short_zone = zoned
        && n >= 3
        && (bytes[n - 3] == b'+' || bytes[n - 3] == b'-')
        && bytes[n - 2].is_ascii_digit();
    let Some(space) = s.find(' ') else {
        return if short_zone {
            Cow::Owned(format!("{s}:00"))
        } else {
            Cow::Borrowed(s)
        };
    };
    let mut t = String::with_capacity(n + 3);
    t.push_str(&s[..space]);
    t.push('T');
    t.push_str(&s[space + 1..]);
    if short_zone {
        t.push_str(":00");
    }
    Cow::Owned(t)
}

/// Session settings under which `::text` gives what `write_value` expects.
pub const TEXT_OUTPUT_SETTINGS: &str =
    "SET LOCAL datestyle = 'ISO, MDY'; SET LOCAL extra_float_digits = 3; SET LOCAL bytea_output = 'hex'";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_become_iso_8601() {
        assert_eq!(
            iso_timestamp("2026-11-24 12:34:29.714732+00", true),
            "2026-11-24T12:34:29.714732+00:00"
        );
        assert_eq!(
            iso_timestamp("2026-11-24 12:34:29+05:30", true),
            "2026-11-24T12:34:29+05:30"
        );
        let mut b = Vec::new();
        write_value(&mut b, 1700, "12.50");
        write_value(&mut b, 23, "7");
        write_value(&mut b, 701, "NaN");
        write_value(&mut b, 16, "t");
        assert_eq!(String::from_utf8(b).unwrap(), "\"12.50\"7\"NaN\"true");
    }

    #[test]
    fn strings_are_written_as_serde_json_writes_them() {
        let tricky = [
            "",
            "plain",
            "a \"quoted\" word",
            "back\\slash",
            "tab\there",
            "new\nline",
            "\u{0}nul",
            "\u{1f}unit",
            "\u{7f}del",
            "é ü 漢字 🎉",
            "ends with \\",
            "</script>",
        ];
        for s in tricky {
            let mut b = Vec::new();
            json_str(&mut b, s);
            assert_eq!(b, serde_json::to_vec(s).unwrap(), "{s:?}");
        }
    }

    #[test]
    fn timestamps_keep_what_iso_8601_does_not_change() {
        for (text, zoned, iso) in [
            ("infinity", true, "infinity"),
            ("-infinity", false, "-infinity"),
            (
                "0044-03-15 12:00:00+00 BC",
                true,
                "0044-03-15T12:00:00+00 BC",
            ),
            (
                "2026-11-24 12:34:29.5-08",
                true,
                "2026-11-24T12:34:29.5-08:00",
            ),
            ("2026-11-24 12:34:29.5", false, "2026-11-24T12:34:29.5"),
            ("2026-11-24 12:34:29", false, "2026-11-24T12:34:29"),
        ] {
            assert_eq!(iso_timestamp(text, zoned), iso, "{text}");
        }
    }

    #[test]
    fn events_parse_back_with_their_values() {
        let spec = TableSpec::orders();
        let names = ["id", "unit_price", "order_status"];
        let oids = [23, 1700, 1043];
        let mut b = Vec::new();
        let h = Header {
            op: Op::Update,
            mode: CaptureMode::Timestamp,
            snapshot: false,
            incremental: false,
            db: Some("d"),
            ts_us: 5,
            key: "7",
            lsn: None,
            tx_id: None,
            captured_ms: 6,
        };
        let after = [Some("7"), Some("4.50"), Some("a \"b\"")];
        write_event(
            &mut b,
            &spec,
            &h,
            |b| b.extend_from_slice(b"null"),
            |b| {
                write_object(
                    b,
                    names
                        .into_iter()
                        .zip(oids)
                        .zip(after)
                        .map(|((n, o), v)| (n, o, v)),
                )
            },
        );
        let v: serde_json::Value = serde_json::from_slice(&b).expect("valid JSON");
        assert_eq!(v["after"]["id"], 7);
        assert_eq!(v["after"]["unit_price"], "4.50");
        assert_eq!(v["after"]["order_status"], "a \"b\"");
        assert_eq!(v["source"]["db"], "d");
        assert_eq!(v["source"]["lsn"], serde_json::Value::Null);
        assert_eq!(v["ts_ms"], 6);
    }

    #[test]
    fn a_truncate_is_written_without_images_or_key_and_reads_back() {
        let spec = TableSpec::orders();
        let h = Header {
            op: Op::Update,
            mode: CaptureMode::Logical,
            snapshot: false,
            incremental: false,
            db: Some("d"),
            ts_us: 5,
            key: "ignored",
            lsn: Some(80),
            tx_id: Some(7),
            captured_ms: 6,
        };
        let mut b = Vec::new();
        write_truncate(&mut b, &spec, &h);
        let line = String::from_utf8(b).expect("UTF-8");
        let v: serde_json::Value = serde_json::from_str(&line).expect("valid JSON");
        assert_eq!(v["op"], "t");
        assert_eq!(v["format_version"], FORMAT_VERSION);
        assert!(v["before"].is_null() && v["after"].is_null() && v["source"]["key"].is_null());
        let e = crate::event::decode(&line, &spec).expect("decode");
        assert_eq!(
            (e.op, e.key.as_str(), e.ts_us, e.lsn),
            (Op::Truncate, "", 5, Some(80))
        );
    }
}
