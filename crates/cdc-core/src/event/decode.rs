//! Reading change events (the loader's side of the format) without building a
//! `serde_json::Value` per row.

use super::{
    Op, FORMAT_VERSION, RESNAPSHOT_FORMAT_VERSION, SCHEMA_FORMAT_VERSION, TRUNCATE_FORMAT_VERSION,
};
use crate::table::TableSpec;
use serde::Deserialize;
use serde_json::value::RawValue;
use std::borrow::Cow;

#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(default)]
    format_version: Option<u32>,
    op: Op,
    #[serde(borrow, default)]
    before: Option<&'a RawValue>,
    #[serde(borrow, default)]
    after: Option<&'a RawValue>,
    #[serde(borrow, default)]
    schema_change: Option<&'a RawValue>,
    #[serde(borrow)]
    source: Source<'a>,
    ts_ms: i64,
}

#[derive(Deserialize)]
struct Source<'a> {
    #[serde(borrow)]
    schema: Cow<'a, str>,
    #[serde(borrow)]
    table: Cow<'a, str>,
    /// Change time in microseconds since the Unix epoch (commit time in log mode).
    ts_us: i64,
    #[serde(default)]
    lsn: Option<u64>,
    #[serde(default, rename = "txId")]
    tx_id: Option<i64>,
    /// `true`/`false`, or `"incremental"` for a re-snapshot's rows and end.
    #[serde(borrow, default)]
    snapshot: Option<&'a RawValue>,
}

/// One decoded event, ready to apply: values as text in the spec's column order.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodedEvent {
    /// Index of its table in the list it was decoded against.
    pub table: usize,
    pub op: Op,
    /// The key as `TableSpec::encode_key` spells it; empty for a truncate (of every key).
    pub key: String,
    pub ts_us: i64,
    pub lsn: Option<i64>,
    pub tx_id: Option<i64>,
    pub captured_ms: i64,
    /// Tracked column values (text form), `None` for SQL NULL. Empty for deletes,
    /// truncates and schema changes.
    pub values: Values,
    /// A schema event's changes and the table's shape after them.
    pub schema: Option<Box<crate::schema_change::SchemaEvent>>,
    /// A row of a re-snapshot (`source.snapshot` `"incremental"`, format 5): the loader
    /// remembers its key until the snapshot's end.
    pub resnapshot: bool,
}

/// Column values in text form, kept compactly: one string and where each value ends.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Values {
    text: String,
    /// End offset of each value in `text`, `NULL_END` for SQL NULL.
    ends: Vec<u32>,
}

const NULL_END: u32 = u32::MAX;

impl Values {
    pub fn push(&mut self, v: Option<&str>) {
        match v {
            Some(v) => {
                self.text.push_str(v);
                self.ends.push(self.text.len() as u32);
            }
            None => self.ends.push(NULL_END),
        }
    }

    /// Value `i`: `None` for SQL NULL or past the end.
    pub fn get(&self, i: usize) -> Option<&str> {
        let end = *self.ends.get(i)?;
        if end == NULL_END {
            return None;
        }
        let start = self.ends[..i]
            .iter()
            .rev()
            .find(|&&e| e != NULL_END)
            .map_or(0, |&e| e as usize);
        Some(&self.text[start..end as usize])
    }

    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }
}

impl<'a> FromIterator<Option<&'a str>> for Values {
    fn from_iter<I: IntoIterator<Item = Option<&'a str>>>(iter: I) -> Self {
        let mut v = Values::default();
        for x in iter {
            v.push(x);
        }
        v
    }
}

/// Decodes one line against the table description. The error says what is wrong with it.
pub fn decode(line: &str, spec: &TableSpec) -> Result<DecodedEvent, String> {
    decode_for(line, std::slice::from_ref(spec)).map_err(|e| e.to_string())
}

/// Why a line is not an event the loader can apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// Not a valid change event; the message says what is wrong.
    Invalid(String),
    /// A valid event of a table the loader was not configured with (`schema.table`).
    UnknownTable(String),
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecodeError::Invalid(m) => f.write_str(m),
            DecodeError::UnknownTable(t) => write!(
                f,
                "event is for table {t}, which this loader does not apply"
            ),
        }
    }
}

impl From<String> for DecodeError {
    fn from(m: String) -> Self {
        DecodeError::Invalid(m)
    }
}

impl From<&str> for DecodeError {
    fn from(m: &str) -> Self {
        DecodeError::Invalid(m.to_owned())
    }
}

/// Decodes one line for whichever of `specs` it is about (`DecodedEvent::table` is its
/// index); an event of any other table is `DecodeError::UnknownTable`.
pub fn decode_for(line: &str, specs: &[TableSpec]) -> Result<DecodedEvent, DecodeError> {
    decode_where(line, specs, &|_| true)?
        .ok_or_else(|| DecodeError::Invalid("event left out".into()))
}

/// `decode_for`, except that an event of a table (index) `keep` refuses is `None`, its row
/// left undecoded (a rebuild of one table skips the others' events, whatever their shape).
pub fn decode_where(
    line: &str,
    specs: &[TableSpec],
    keep: &dyn Fn(usize) -> bool,
) -> Result<Option<DecodedEvent>, DecodeError> {
    let env: Envelope<'_> =
        serde_json::from_str(line).map_err(|e| format!("not a change event: {e}"))?;
    if let Some(v) = env.format_version {
        if v > FORMAT_VERSION {
            return Err(format!(
                "format_version {v} is newer than this loader reads ({FORMAT_VERSION})"
            )
            .into());
        }
    }
    let Some(table) = specs
        .iter()
        .position(|s| env.source.schema == s.schema && env.source.table == s.name)
    else {
        return Err(DecodeError::UnknownTable(format!(
            "{}.{}",
            env.source.schema, env.source.table
        )));
    };
    if !keep(table) {
        return Ok(None);
    }
    let spec = &specs[table];
    let lsn = match env.source.lsn {
        Some(l) => Some(i64::try_from(l).map_err(|_| format!("source.lsn {l} is out of range"))?),
        None => None,
    };
    // Whole-table events (a truncate, a schema change): no key, no row; each written only
    // by its format and later, so an older event claiming one is not ours.
    let whole_table = match env.op {
        Op::Truncate => Some(("a truncate (op t)", TRUNCATE_FORMAT_VERSION)),
        Op::Schema => Some(("a schema change (op s)", SCHEMA_FORMAT_VERSION)),
        Op::SnapshotEnd => Some(("a re-snapshot's end (op e)", RESNAPSHOT_FORMAT_VERSION)),
        _ => None,
    };
    if let Some((what, since)) = whole_table {
        let v = env.format_version.unwrap_or(1);
        if v < since {
            return Err(format!(
                "{what} needs format_version {since} or later; this event has {v}"
            )
            .into());
        }
        let schema = match env.op {
            Op::Schema => {
                let raw = env
                    .schema_change
                    .ok_or("a schema change (op s) needs `schema_change`")?;
                let change: crate::schema_change::SchemaEvent = serde_json::from_str(raw.get())
                    .map_err(|e| format!("schema_change is not a schema change: {e}"))?;
                Some(Box::new(change))
            }
            _ => None,
        };
        return Ok(Some(DecodedEvent {
            table,
            op: env.op,
            key: String::new(),
            ts_us: env.source.ts_us,
            lsn,
            tx_id: env.source.tx_id,
            captured_ms: env.ts_ms,
            values: Values::default(),
            schema,
            resnapshot: false,
        }));
    }
    let resnapshot = env
        .source
        .snapshot
        .is_some_and(|s| s.get() == "\"incremental\"");
    if resnapshot {
        let v = env.format_version.unwrap_or(1);
        if env.op != Op::Read || v < RESNAPSHOT_FORMAT_VERSION {
            return Err(format!(
                "a re-snapshot's row (source.snapshot \"incremental\") must be op r of format_version \
                 {RESNAPSHOT_FORMAT_VERSION} or later; this event is op {} of format_version {v}",
                env.op.as_char()
            )
            .into());
        }
    }
    let image = match env.op {
        Op::Delete => env.before.ok_or("a delete (op d) needs `before`")?,
        _ => env
            .after
            .ok_or_else(|| format!("op {} needs `after`", env.op.as_char()))?,
    };
    let row: Image<'_> = serde_json::from_str(image.get())
        .map_err(|e| format!("row image is not an object: {e}"))?;
    let mut parts = Vec::with_capacity(spec.key.len());
    for k in &spec.key {
        match row.get(k.name.as_str()).map(|v| json_text(v)) {
            Some(Ok(Some(v))) => {
                super::exact::check(&k.sql_type, &v)
                    .map_err(|e| format!("key column {}: {e}", k.name))?;
                parts.push(v)
            }
            Some(Ok(None)) => return Err(format!("key column {} is null", k.name).into()),
            Some(Err(e)) => return Err(format!("key column {}: {e}", k.name).into()),
            None => return Err(format!("row image has no key column {}", k.name).into()),
        }
    }
    let parts: Vec<&str> = parts.iter().map(|p| p.as_ref()).collect();
    let key = spec.encode_key(&parts);
    let mut values = Values::default();
    if env.op != Op::Delete {
        for c in &spec.columns {
            match row.get(c.name.as_str()) {
                // Format 1 wrote json/jsonb values as raw JSON: their text is the raw JSON (a
                // JSON string stays quoted), a JSON null was SQL NULL. Format 2 writes them as
                // strings like every other value.
                Some(v) if c.is_json() && env.format_version.unwrap_or(1) < 2 => {
                    values.push((v.get() != "null").then(|| v.get()))
                }
                Some(v) => {
                    let text = json_text(v).map_err(|e| format!("column {}: {e}", c.name))?;
                    if let Some(t) = text.as_deref() {
                        super::exact::check(&c.sql_type, t)
                            .map_err(|e| format!("column {}: {e}", c.name))?;
                    }
                    values.push(text.as_deref())
                }
                // Not sent by logical replication; the history table generates it. A column
                // the source dropped holds NULL from then on.
                None if c.generated.is_some() || c.dropped => values.push(None),
                None => return Err(format!("row image has no column {}", c.name).into()),
            }
        }
    }
    Ok(Some(DecodedEvent {
        table,
        op: env.op,
        key,
        ts_us: env.source.ts_us,
        lsn,
        tx_id: env.source.tx_id,
        captured_ms: env.ts_ms,
        values,
        schema: None,
        resnapshot,
    }))
}

/// A row image's fields in the order written (a handful: a linear search beats hashing).
struct Image<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);

impl<'a> Image<'a> {
    fn get(&self, name: &str) -> Option<&'a RawValue> {
        self.0.iter().find(|(k, _)| k == name).map(|(_, v)| *v)
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Image<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for Visit<'a> {
            type Value = Image<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<M: serde::de::MapAccess<'de>>(
                self,
                mut m: M,
            ) -> Result<Image<'a>, M::Error> {
                let mut fields = Vec::with_capacity(m.size_hint().unwrap_or(12));
                while let Some((k, v)) = m.next_entry::<Cow<'de, str>, &'de RawValue>()? {
                    fields.push((k, v));
                }
                Ok(Image(fields))
            }
        }
        d.deserialize_map(Visit(std::marker::PhantomData))
    }
}

/// The text form of a JSON value: strings unescaped, numbers and booleans as written,
/// objects and arrays as their JSON, null as `None`.
fn json_text(v: &RawValue) -> Result<Option<Cow<'_, str>>, String> {
    let raw = v.get();
    match raw.as_bytes().first() {
        Some(b'"') if !raw.contains('\\') => Ok(Some(Cow::Borrowed(&raw[1..raw.len() - 1]))),
        Some(b'"') => serde_json::from_str::<String>(raw)
            .map(|s| Some(Cow::Owned(s)))
            .map_err(|e| e.to_string()),
        Some(b'n') if raw == "null" => Ok(None),
        Some(_) => Ok(Some(Cow::Borrowed(raw))),
        None => Err("empty value".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UPDATE: &str = r#"{"format_version":1,"op":"u","before":null,"after":{"id":7,"customer_id":1,"product_id":2,"quantity":3,"unit_price":"4.50","total_amount":"13.50","order_status":"it's \"ok\"","order_date":"2026-01-01T00:00:00+00:00","created_at":"2026-01-01T00:00:00.5+00:00","last_updated":"2026-01-02T00:00:00+00:00"},"source":{"connector":"x","db":"d","schema":"public","table":"orders","capture_mode":"timestamp","ts_us":1767312000000000,"lsn":null,"txId":null},"ts_ms":1767312001000}"#;

    #[test]
    fn decodes_values_exactly() {
        let e = decode(UPDATE, &TableSpec::orders()).expect("decode");
        assert_eq!(e.op, Op::Update);
        assert_eq!(e.key, "7");
        assert_eq!(e.ts_us, 1_767_312_000_000_000);
        assert_eq!(e.values.get(3), Some("4.50"));
        assert_eq!(e.values.get(4), Some("13.50"));
        assert_eq!(e.values.get(5), Some("it's \"ok\""));
        assert_eq!(e.values.len(), 8);
    }

    #[test]
    fn values_keep_nulls_and_empty_strings_apart() {
        let v: Values = [Some("a"), None, Some(""), Some("bc"), None]
            .into_iter()
            .collect();
        let got: Vec<Option<&str>> = (0..6).map(|i| v.get(i)).collect();
        assert_eq!(got, [Some("a"), None, Some(""), Some("bc"), None, None]);
        assert_eq!(v.len(), 5);
    }

    #[test]
    fn json_columns_keep_their_json() {
        let mut spec = TableSpec::orders();
        spec.columns.push(crate::table::Column::new("doc", "jsonb"));
        let with = |doc: &str| {
            UPDATE.replace(
                "\"last_updated\"",
                &format!("\"doc\":{doc},\"last_updated\""),
            )
        };
        let value = |doc: &str| {
            decode(&with(doc), &spec)
                .expect("decode")
                .values
                .get(8)
                .map(str::to_owned)
        };
        assert_eq!(value("\"hello\"").as_deref(), Some("\"hello\""));
        assert_eq!(value("{\"a\": [1]}").as_deref(), Some("{\"a\": [1]}"));
        assert_eq!(value("null"), None);
    }

    #[test]
    fn a_delete_takes_its_key_from_before() {
        let line = r#"{"op":"d","before":{"id":9},"after":null,"source":{"schema":"public","table":"orders","ts_us":5},"ts_ms":6}"#;
        let e = decode(line, &TableSpec::orders()).expect("decode");
        assert_eq!((e.op, e.key.as_str(), e.values.len()), (Op::Delete, "9", 0));
    }

    #[test]
    fn a_resnapshot_is_marked_rows_and_an_end_of_format_5() {
        let spec = TableSpec::orders();
        let row = UPDATE
            .replace("\"format_version\":1", "\"format_version\":5")
            .replace("\"op\":\"u\"", "\"op\":\"r\"")
            .replace(
                "\"capture_mode\":\"timestamp\"",
                "\"capture_mode\":\"timestamp\",\"snapshot\":\"incremental\"",
            );
        let e = decode(&row, &spec).expect("decode");
        assert_eq!((e.op, e.resnapshot, e.key.as_str()), (Op::Read, true, "7"));
        // An initial copy's row, or any other event, is not a re-snapshot's.
        let plain = row.replace("\"snapshot\":\"incremental\"", "\"snapshot\":true");
        assert!(!decode(&plain, &spec).expect("decode").resnapshot);
        // Only an `r` event of format 5 can be one.
        for bad in [
            row.replace("\"op\":\"r\"", "\"op\":\"u\""),
            row.replace("\"format_version\":5", "\"format_version\":4"),
        ] {
            assert!(decode(&bad, &spec)
                .unwrap_err()
                .contains("a re-snapshot's row"));
        }
        let end = r#"{"format_version":5,"op":"e","before":null,"after":null,"source":{"schema":"public","table":"orders","snapshot":"incremental","key":null,"ts_us":5,"lsn":80,"txId":null},"ts_ms":6}"#;
        let e = decode(end, &spec).expect("decode");
        assert_eq!(
            (e.op, e.key.as_str(), e.ts_us, e.lsn, e.resnapshot),
            (Op::SnapshotEnd, "", 5, Some(80), false)
        );
        let old = end.replace("\"format_version\":5", "\"format_version\":4");
        assert!(decode(&old, &spec)
            .unwrap_err()
            .contains("needs format_version 5"));
    }

    #[test]
    fn a_truncate_has_no_key_and_needs_format_3() {
        let line = r#"{"format_version":3,"op":"t","before":null,"after":null,"source":{"schema":"public","table":"orders","key":null,"ts_us":5,"lsn":80,"txId":7},"ts_ms":6}"#;
        let e = decode(line, &TableSpec::orders()).expect("decode");
        assert_eq!(
            (e.op, e.key.as_str(), e.ts_us, e.lsn, e.values.len()),
            (Op::Truncate, "", 5, Some(80), 0)
        );
        let old = line.replace("\"format_version\":3", "\"format_version\":2");
        assert!(decode(&old, &TableSpec::orders())
            .unwrap_err()
            .contains("needs format_version 3"));
        let newer = line.replace(
            "\"format_version\":3",
            &format!("\"format_version\":{}", super::FORMAT_VERSION + 1),
        );
        assert!(decode(&newer, &TableSpec::orders())
            .unwrap_err()
            .contains("newer than this loader reads"));
        let other = line.replace("\"orders\"", "\"customers\"");
        assert!(decode(&other, &TableSpec::orders())
            .unwrap_err()
            .contains("public.customers"));
    }

    #[test]
    fn errors_say_what_is_wrong() {
        let spec = TableSpec::orders();
        assert!(decode("{not json", &spec)
            .unwrap_err()
            .contains("not a change event"));
        let other = UPDATE.replace("\"orders\"", "\"customers\"");
        assert!(decode(&other, &spec)
            .unwrap_err()
            .contains("public.customers"));
        let no_col = UPDATE.replace("\"quantity\":3,", "");
        assert!(decode(&no_col, &spec).unwrap_err().contains("quantity"));
        let bad_op = UPDATE.replace("\"op\":\"u\"", "\"op\":\"x\"");
        assert!(decode(&bad_op, &spec).is_err());
    }
}
