//! The captured table as data: schema, name, key, tracked columns and their types, the
//! change-time column, and the history table they map to. `orders` is the built-in default;
//! any other table is described by a JSON file (`CDC_TABLE_CONFIG`), not by new code.

use crate::error::{Error, Result};
use serde::Deserialize;
use std::path::Path;

/// Columns of the history table that the pipeline owns. A tracked source column with one of
/// these names is stored as `source_<name>`.
pub const RESERVED_HISTORY_COLUMNS: &[&str] = &[
    "surrogate_key",
    "valid_from",
    "valid_to",
    "is_current",
    "is_deleted",
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

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct Column {
    pub name: String,
    /// The column's SQL type as in the source, e.g. `integer`, `numeric(10,2)`, `timestamptz`.
    #[serde(rename = "type")]
    pub sql_type: String,
    /// For a generated column: its expression over the other tracked columns. Logical
    /// replication (PostgreSQL 15) does not send generated columns; the history table generates
    /// them from the same expression.
    #[serde(default)]
    pub generated: Option<String>,
}

impl Column {
    fn new(name: &str, sql_type: &str) -> Self {
        Column {
            name: name.to_owned(),
            sql_type: sql_type.to_owned(),
            generated: None,
        }
    }

    fn generated(mut self, expr: &str) -> Self {
        self.generated = Some(expr.to_owned());
        self
    }

    /// Whether the column holds JSON (`json`, `jsonb`): its event value is JSON itself.
    pub fn is_json(&self) -> bool {
        let t = self.sql_type.to_ascii_lowercase();
        t == "json" || t == "jsonb"
    }

    /// Whether the value goes into an event as a JSON string of its exact text (numeric and
    /// other types that JSON numbers would round).
    pub fn is_exact_text(&self) -> bool {
        let t = self.sql_type.to_ascii_lowercase();
        t.starts_with("numeric") || t.starts_with("decimal") || t == "money"
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TableSpec {
    #[serde(default = "default_schema")]
    pub schema: String,
    pub name: String,
    /// The primary key (one column).
    pub key: Column,
    /// The business columns, in order. A change to any of them makes a new version.
    pub columns: Vec<Column>,
    /// A timestamptz column the database sets on every insert and update.
    pub change_time_column: String,
    /// A column set once at insert (lets timestamp capture tell `c` from `u`).
    #[serde(default)]
    pub created_time_column: Option<String>,
    #[serde(default = "default_schema")]
    pub history_schema: String,
    pub history_table: String,
    pub history_key_column: String,
}

fn default_schema() -> String {
    "public".to_owned()
}

impl TableSpec {
    /// The built-in description of `public.orders` and `dim_orders_history`.
    pub fn orders() -> Self {
        TableSpec {
            schema: "public".into(),
            name: "orders".into(),
            key: Column::new("id", "integer"),
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
            change_time_column: "last_updated".into(),
            created_time_column: Some("created_at".into()),
            history_schema: "public".into(),
            history_table: "dim_orders_history".into(),
            history_key_column: "order_key".into(),
        }
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            Error::config(
                "CDC_TABLE_CONFIG",
                format!("cannot read {}: {e}", path.display()),
            )
        })?;
        let spec: TableSpec = serde_json::from_str(&text)
            .map_err(|e| Error::config("CDC_TABLE_CONFIG", format!("{}: {e}", path.display())))?;
        spec.validate()
            .map_err(|m| Error::config("CDC_TABLE_CONFIG", format!("{}: {m}", path.display())))?;
        Ok(spec)
    }

    /// Checks names and types so that they can be spliced into SQL unquoted.
    pub fn validate(&self) -> std::result::Result<(), String> {
        for (what, name) in [
            ("schema", &self.schema),
            ("name", &self.name),
            ("key.name", &self.key.name),
            ("change_time_column", &self.change_time_column),
            ("history_schema", &self.history_schema),
            ("history_table", &self.history_table),
            ("history_key_column", &self.history_key_column),
        ] {
            check_ident(what, name)?;
        }
        if let Some(c) = &self.created_time_column {
            check_ident("created_time_column", c)?;
        }
        check_type("key.type", &self.key.sql_type)?;
        if self.columns.is_empty() {
            return Err("columns: at least one tracked column is needed".into());
        }
        let mut seen = std::collections::HashSet::new();
        for c in &self.columns {
            check_ident("columns[].name", &c.name)?;
            check_type(&format!("type of column {}", c.name), &c.sql_type)?;
            if c.name == self.key.name || c.name == self.change_time_column {
                return Err(format!(
                    "columns: {} is the key or the change-time column; list only tracked columns",
                    c.name
                ));
            }
            if !seen.insert(c.name.clone()) {
                return Err(format!("columns: {} is listed twice", c.name));
            }
        }
        if RESERVED_HISTORY_COLUMNS.contains(&self.history_key_column.as_str()) {
            return Err(format!(
                "history_key_column: {} is a reserved history column",
                self.history_key_column
            ));
        }
        Ok(())
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
        if RESERVED_HISTORY_COLUMNS.contains(&c.name.as_str()) || c.name == self.history_key_column
        {
            format!("source_{}", c.name)
        } else {
            c.name.clone()
        }
    }

    /// Indexes of the tracked columns the loader writes (generated ones the history table
    /// generates).
    pub fn written_columns(&self) -> Vec<usize> {
        (0..self.columns.len())
            .filter(|&i| self.columns[i].generated.is_none())
            .collect()
    }

    /// The history table's tracked columns, comma separated, in order.
    pub fn history_column_list(&self) -> String {
        self.columns
            .iter()
            .map(|c| self.history_column(c))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

fn check_ident(what: &str, s: &str) -> std::result::Result<(), String> {
    let mut chars = s.chars();
    let ok = matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && s.len() <= 63;
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{what}: '{s}' must be a lower-case SQL identifier (a-z, 0-9, _)"
        ))
    }
}

fn check_type(what: &str, s: &str) -> std::result::Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || " _(),[]".contains(c));
    if ok {
        Ok(())
    } else {
        Err(format!("{what}: '{s}' is not a SQL type name"))
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orders_spec_is_valid_and_renames_reserved_columns() {
        let spec = TableSpec::orders();
        assert_eq!(spec.validate(), Ok(()));
        assert!(spec.history_column_list().contains("source_created_at"));
        assert!(spec
            .history_column_list()
            .starts_with("customer_id, product_id"));
    }

    #[test]
    fn identifiers_that_need_quoting_are_refused() {
        let mut spec = TableSpec::orders();
        spec.name = "Orders; drop table x".into();
        let err = spec.validate().unwrap_err();
        assert!(err.contains("name"), "{err}");
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
    }
}
