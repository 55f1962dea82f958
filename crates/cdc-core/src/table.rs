//! The captured table as data: schema, name, primary key (any number of columns), tracked
//! columns and their types, the change-time column, and the history table they map to.
//! Descriptions come from the source's catalog (`catalog`); `orders` is also built in.

use std::borrow::Cow;

/// Columns of the history table that the pipeline owns. A source column with one of these
/// names is stored as `source_<name>`.
pub const RESERVED_HISTORY_COLUMNS: &[&str] = &[
    "surrogate_key",
    "valid_from",
    "valid_to",
    "is_current",
    "is_deleted",
    "is_truncated",
    "cdc_operation",
    "cdc_timestamp",
    "batch_id",
    "source_lsn",
    "source_txid",
    "end_lsn",
    "row_hash",
    "created_at",
    "updated_at",
];

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Column {
    pub name: String,
    /// The column's SQL type as the source names it, e.g. `integer`, `numeric(10,2)`,
    /// `public.mood`, `integer[]`.
    pub sql_type: String,
    /// For a generated column: its expression over the other columns. Logical replication
    /// (PostgreSQL 15) does not send generated columns; the history table generates them from
    /// the same expression.
    pub generated: Option<String>,
    /// Its position in the source table (`attnum`; 0 when not read from a catalog): what
    /// tells a renamed column from a dropped one and an added one.
    pub attnum: i16,
    /// The source's type OID and modifier (`atttypid`, `atttypmod`): how pgoutput's relation
    /// messages name the type (0 and -1 when not read from a catalog).
    pub type_oid: u32,
    pub type_mod: i32,
    /// History only: the source no longer has the column (dropped); the history keeps it and
    /// later versions hold NULL.
    pub dropped: bool,
    /// Catalog only: what rows that existed when the column was added hold (see
    /// `schema_change::Existing`).
    pub existing: crate::schema_change::Existing,
}

impl Column {
    pub fn new(name: &str, sql_type: &str) -> Self {
        Column {
            name: name.to_owned(),
            sql_type: sql_type.to_owned(),
            generated: None,
            attnum: 0,
            type_oid: 0,
            type_mod: -1,
            dropped: false,
            existing: crate::schema_change::Existing::Null,
        }
    }

    fn generated(mut self, expr: &str) -> Self {
        self.generated = Some(expr.to_owned());
        self
    }

    /// Whether the column holds JSON (`json`, `jsonb`).
    pub fn is_json(&self) -> bool {
        let t = self.sql_type.to_ascii_lowercase();
        t == "json" || t == "jsonb"
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableSpec {
    pub schema: String,
    pub name: String,
    /// The primary key's columns, in key order.
    pub key: Vec<Column>,
    /// The tracked columns besides the key, in order. A change to any of them makes a new
    /// version.
    pub columns: Vec<Column>,
    /// Timestamp capture: the timestamptz column the database sets on every insert and
    /// update (not tracked: it changes with every update).
    pub change_time_column: Option<String>,
    /// A column set once at insert (lets timestamp capture tell `c` from `u`).
    pub created_time_column: Option<String>,
    pub history_schema: String,
    pub history_table: String,
    /// The history's names of the key columns, in key order.
    pub history_key_columns: Vec<String>,
    /// User-defined types its columns use (enums, domains, composites), dependencies first:
    /// the warehouse creates each that it lacks, with the source's definition.
    pub types: Vec<TypeDef>,
    /// Source columns that are not tracked: the change-time column and those left out by
    /// `CDC_EXCLUDE_COLUMNS`.
    pub ignored: Vec<String>,
}

/// A user-defined type of the source and the DDL that creates it as the source defines it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TypeDef {
    /// `schema.name`, quoted as needed.
    pub name: String,
    pub schema: String,
    pub ddl: String,
}

impl TableSpec {
    /// The built-in description of `public.orders` and `dim_orders_history` (what the catalog
    /// gives for the demo's `orders`).
    pub fn orders() -> Self {
        TableSpec {
            schema: "public".into(),
            name: "orders".into(),
            key: vec![Column::new("id", "integer")],
            columns: vec![
                Column::new("customer_id", "integer"),
                Column::new("product_id", "integer"),
                Column::new("quantity", "integer"),
                Column::new("unit_price", "numeric(10,2)"),
                Column::new("total_amount", "numeric(12,2)").generated("quantity * unit_price"),
                Column::new("order_status", "varchar(20)"),
                Column::new("order_date", "timestamptz"),
                Column::new("created_at", "timestamptz"),
            ],
            change_time_column: Some("last_updated".into()),
            created_time_column: Some("created_at".into()),
            history_schema: "public".into(),
            history_table: "dim_orders_history".into(),
            history_key_columns: vec!["order_key".into()],
            types: Vec::new(),
            ignored: vec!["last_updated".into()],
        }
    }

    /// `schema.name` of the source table.
    pub fn qualified(&self) -> String {
        format!("{}.{}", self.schema, self.name)
    }

    /// `schema.table` of the history table.
    pub fn history_qualified(&self) -> String {
        format!("{}.{}", self.history_schema, self.history_table)
    }

    /// The history column that stores a tracked source column.
    pub fn history_column(&self, c: &Column) -> String {
        self.history_name(&c.name)
    }

    /// The history column that stores the tracked source column named `name`.
    pub fn history_name(&self, name: &str) -> String {
        if RESERVED_HISTORY_COLUMNS.contains(&name)
            || self.history_key_columns.iter().any(|k| k == name)
        {
            format!("source_{name}")
        } else {
            name.to_owned()
        }
    }

    /// The history table's tracked columns, comma separated, in order.
    pub fn history_column_list(&self) -> String {
        self.columns
            .iter()
            .map(|c| self.history_column(c))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The history's key columns, comma separated, each prefixed by `alias.` if given.
    pub fn history_key_list(&self, alias: &str) -> String {
        self.history_key_columns
            .iter()
            .map(|k| {
                if alias.is_empty() {
                    k.clone()
                } else {
                    format!("{alias}.{k}")
                }
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The source's key columns, comma separated, each prefixed by `alias.`.
    pub fn key_list(&self, alias: &str) -> String {
        self.key
            .iter()
            .map(|k| format!("{alias}.{}", k.name))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Indexes of the tracked columns the loader writes (generated ones the history table
    /// generates).
    pub fn written_columns(&self) -> Vec<usize> {
        (0..self.columns.len())
            .filter(|&i| self.columns[i].generated.is_none())
            .collect()
    }

    /// A key as one string (the events' `source.key` and the loader's grouping): a
    /// single-column key is its value's text; a composite key the JSON array of its values'
    /// texts, in key order.
    pub fn encode_key(&self, parts: &[&str]) -> String {
        match parts {
            [one] => (*one).to_owned(),
            _ => serde_json::to_string(parts).unwrap_or_default(),
        }
    }

    /// The texts of a key's columns, in key order (the inverse of `encode_key`).
    pub fn key_parts<'a>(&self, key: &'a str) -> Result<Vec<Cow<'a, str>>, String> {
        split_key(key, self.key.len()).map_err(|m| {
            format!(
                "{m} (table {} has {} key columns)",
                self.qualified(),
                self.key.len()
            )
        })
    }
}

/// The texts of a key of `n` columns encoded by `TableSpec::encode_key`.
pub fn split_key(key: &str, n: usize) -> Result<Vec<Cow<'_, str>>, String> {
    if n == 1 {
        return Ok(vec![Cow::Borrowed(key)]);
    }
    let parts: Vec<Cow<'_, str>> = serde_json::from_str(key)
        .map_err(|e| format!("key {key:?} is not a JSON array of texts: {e}"))?;
    if parts.len() != n {
        return Err(format!("key {key:?} has {} values, not {n}", parts.len()));
    }
    Ok(parts)
}

/// Replaces each whole-word reference to a tracked column in `expr` by `f(index)`.
pub fn substitute_columns(expr: &str, spec: &TableSpec, f: impl Fn(usize) -> String) -> String {
    let mut out = String::with_capacity(expr.len() * 2);
    let mut word = String::new();
    let flush = |word: &mut String, out: &mut String| {
        if !word.is_empty() {
            match spec.columns.iter().position(|c| c.name == *word) {
                Some(i) => out.push_str(&f(i)),
                None => out.push_str(word),
            }
            word.clear();
        }
    };
    for ch in expr.chars() {
        if ch.is_ascii_alphanumeric() || ch == '_' {
            word.push(ch);
        } else {
            flush(&mut word, &mut out);
            out.push(ch);
        }
    }
    flush(&mut word, &mut out);
    out
}

/// Quotes a string as a SQL literal (standard_conforming_strings is on since PostgreSQL 9.1).
pub fn sql_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// Quotes an identifier for SQL when it needs it.
pub fn quote_ident(s: &str) -> String {
    let plain = s
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if plain {
        s.to_owned()
    } else {
        format!("\"{}\"", s.replace('"', "\"\""))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orders_spec_renames_reserved_columns() {
        let spec = TableSpec::orders();
        assert!(spec.history_column_list().contains("source_created_at"));
        assert!(spec
            .history_column_list()
            .starts_with("customer_id, product_id"));
    }

    #[test]
    fn composite_keys_encode_and_decode() {
        let mut spec = TableSpec::orders();
        assert_eq!(spec.encode_key(&["7"]), "7");
        assert_eq!(spec.key_parts("7").unwrap(), ["7"]);
        spec.key.push(Column::new("line_no", "integer"));
        let k = spec.encode_key(&["7", "a\"b"]);
        assert_eq!(k, r#"["7","a\"b"]"#);
        assert_eq!(spec.key_parts(&k).unwrap(), ["7", "a\"b"]);
        assert!(spec.key_parts("7").is_err());
    }

    #[test]
    fn generated_expressions_refer_to_typed_columns() {
        let spec = TableSpec::orders();
        let e = substitute_columns("quantity * unit_price", &spec, |i| format!("v{}", i + 1));
        assert_eq!(e, "v3 * v4");
    }

    #[test]
    fn literal_escapes_quotes() {
        assert_eq!(sql_literal("o'hara"), "'o''hara'");
        assert_eq!(quote_ident("Odd Name"), "\"Odd Name\"");
        assert_eq!(quote_ident("plain_1"), "plain_1");
    }
}
