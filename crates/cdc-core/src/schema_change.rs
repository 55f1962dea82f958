//! Schema changes of a captured table, from capture to history.
//!
//! The extractor keeps the shape (key and tracked columns, their positions and types) it last
//! wrote for each table in its progress. When the source's shape differs (the event trigger's
//! record of the ALTER: a WAL message in logical mode, a row of `cdc_alters` in timestamp
//! mode; else timestamp mode: the catalog, read at the start of each pass under the tables'
//! locks; logical mode: pgoutput's relation message before the first change in the new
//! shape), it writes a schema event (`op` `s`) before any change in the new shape, dated at
//! the ALTER where it can be (README, "Schema changes"): the changes and the shape after them. The
//! loader follows the event in the history table, in the batch's transaction, and records it
//! in `cdc_schema_changes`:
//!
//! - a column added: the history gains it (earlier versions hold NULL); when the rows that
//!   existed got a value (a default), every current version is followed by one holding it, at
//!   the change's time;
//! - a column dropped: the history keeps it; later versions hold NULL;
//! - a column renamed: the history column is renamed;
//! - a type changed: the history column is altered when it can hold every value exactly
//!   (`widens`); otherwise the loader stops at the event, says why, and waits.

use crate::table::{Column, TableSpec, TypeDef};
use serde::{Deserialize, Serialize};

/// What the rows that existed when a column was added hold in it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Existing {
    /// NULL (no default).
    #[default]
    Null,
    /// This value, in every row (a default that is not volatile: PostgreSQL's "missing
    /// value", stored once in the catalog).
    Value(String),
    /// Each row its own value (a volatile default rewrote the table), which no change event
    /// carries.
    Unknown,
}

/// A column of a table's shape as the change log describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShapeColumn {
    pub name: String,
    #[serde(rename = "type")]
    pub sql_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generated: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub key: bool,
    /// Position in the source table (0: unknown).
    #[serde(default)]
    pub attnum: i16,
    #[serde(default)]
    pub type_oid: u32,
    #[serde(default = "no_type_mod")]
    pub type_mod: i32,
}

fn no_type_mod() -> i32 {
    -1
}

/// A table's key and tracked columns, in the source's order.
pub type Shape = Vec<ShapeColumn>;

/// The shape of a table description (its live columns).
pub fn shape_of(spec: &TableSpec) -> Shape {
    let col = |c: &Column, key: bool| ShapeColumn {
        name: c.name.clone(),
        sql_type: c.sql_type.clone(),
        generated: c.generated.clone(),
        key,
        attnum: c.attnum,
        type_oid: c.type_oid,
        type_mod: c.type_mod,
    };
    let mut out: Shape = spec
        .key
        .iter()
        .map(|c| col(c, true))
        .chain(
            spec.columns
                .iter()
                .filter(|c| !c.dropped)
                .map(|c| col(c, false)),
        )
        .collect();
    if out.iter().all(|c| c.attnum > 0) {
        out.sort_by_key(|c| c.attnum);
    }
    out
}

/// One change of a table's shape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Change {
    AddColumn {
        column: String,
        #[serde(rename = "type")]
        sql_type: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        generated: Option<String>,
        existing: Existing,
    },
    DropColumn {
        column: String,
    },
    RenameColumn {
        column: String,
        new_name: String,
    },
    AlterType {
        column: String,
        type_before: String,
        type_after: String,
    },
    AlterGenerated {
        column: String,
        before: Option<String>,
        after: Option<String>,
    },
    AlterKey {
        before: Vec<String>,
        after: Vec<String>,
    },
}

impl Change {
    /// `add_column`, `drop_column`, ... (as `cdc_schema_changes.kind` records it).
    pub fn kind(&self) -> &'static str {
        match self {
            Change::AddColumn { .. } => "add_column",
            Change::DropColumn { .. } => "drop_column",
            Change::RenameColumn { .. } => "rename_column",
            Change::AlterType { .. } => "alter_type",
            Change::AlterGenerated { .. } => "alter_generated",
            Change::AlterKey { .. } => "alter_key",
        }
    }

    /// The column it is about (its name before the change).
    pub fn column(&self) -> Option<&str> {
        match self {
            Change::AddColumn { column, .. }
            | Change::DropColumn { column }
            | Change::RenameColumn { column, .. }
            | Change::AlterType { column, .. }
            | Change::AlterGenerated { column, .. } => Some(column),
            Change::AlterKey { .. } => None,
        }
    }
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Change::AddColumn {
                column, sql_type, ..
            } => write!(f, "ADD COLUMN {column} {sql_type}"),
            Change::DropColumn { column } => write!(f, "DROP COLUMN {column}"),
            Change::RenameColumn { column, new_name } => {
                write!(f, "RENAME COLUMN {column} TO {new_name}")
            }
            Change::AlterType {
                column,
                type_before,
                type_after,
            } => write!(
                f,
                "ALTER COLUMN {column} TYPE {type_after} (was {type_before})"
            ),
            Change::AlterGenerated { column, after, .. } => match after {
                Some(e) => write!(f, "column {column} now GENERATED ALWAYS AS ({e})"),
                None => write!(f, "column {column} no longer generated"),
            },
            Change::AlterKey { before, after } => write!(
                f,
                "primary key ({}) is now ({})",
                before.join(", "),
                after.join(", ")
            ),
        }
    }
}

/// The payload of a schema event (`op` `s`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SchemaEvent {
    pub changes: Vec<Change>,
    /// The table's shape after the changes.
    pub columns: Shape,
    /// The user-defined types the columns after need (the warehouse creates those it lacks).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub types: Vec<TypeDef>,
}

/// The changes from shape `old` to shape `new`: columns are matched by position when both
/// shapes know positions (so a rename is told from a drop and an add), by name otherwise.
/// Renames come first, then type and expression changes, drops, adds, and a key change last.
/// `existing` says what the rows that existed hold in an added column.
pub fn diff(old: &Shape, new: &Shape, existing: impl Fn(&str) -> Existing) -> Vec<Change> {
    let by_pos = old.iter().chain(new).all(|c| c.attnum > 0);
    let same = |o: &ShapeColumn, n: &ShapeColumn| {
        if by_pos {
            o.attnum == n.attnum
        } else {
            o.name == n.name
        }
    };
    let (mut renames, mut alters, mut drops, mut adds) = (vec![], vec![], vec![], vec![]);
    for o in old {
        match new.iter().find(|n| same(o, n)) {
            None => drops.push(Change::DropColumn {
                column: o.name.clone(),
            }),
            Some(n) => {
                if n.name != o.name {
                    renames.push(Change::RenameColumn {
                        column: o.name.clone(),
                        new_name: n.name.clone(),
                    });
                }
                if n.sql_type != o.sql_type {
                    alters.push(Change::AlterType {
                        column: n.name.clone(),
                        type_before: o.sql_type.clone(),
                        type_after: n.sql_type.clone(),
                    });
                }
                if n.generated != o.generated {
                    alters.push(Change::AlterGenerated {
                        column: n.name.clone(),
                        before: o.generated.clone(),
                        after: n.generated.clone(),
                    });
                }
            }
        }
    }
    for n in new {
        if !old.iter().any(|o| same(o, n)) {
            adds.push(Change::AddColumn {
                column: n.name.clone(),
                sql_type: n.sql_type.clone(),
                generated: n.generated.clone(),
                existing: existing(&n.name),
            });
        }
    }
    // The key, each old key column under its new name.
    let renamed = |o: &ShapeColumn| {
        new.iter()
            .find(|n| same(o, n))
            .map_or(o.name.clone(), |n| n.name.clone())
    };
    let key_before: Vec<String> = old.iter().filter(|c| c.key).map(renamed).collect();
    let key_after: Vec<String> = new
        .iter()
        .filter(|c| c.key)
        .map(|c| c.name.clone())
        .collect();
    let mut out = renames;
    out.append(&mut alters);
    out.append(&mut drops);
    out.append(&mut adds);
    if key_before != key_after {
        out.push(Change::AlterKey {
            before: old
                .iter()
                .filter(|c| c.key)
                .map(|c| c.name.clone())
                .collect(),
            after: key_after,
        });
    }
    out
}

/// Whether a column of type `from` can become `to` with every value it holds kept exactly
/// (the same text): a wider integer, a longer or unbounded text, a numeric of at least the
/// same integer digits and scale, a finer timestamp or time.
pub fn widens(from: &str, to: &str) -> bool {
    let (from, to) = (from.trim(), to.trim());
    if from == to {
        return true;
    }
    let int_rank = |t: &str| match t {
        "smallint" => Some(1),
        "integer" => Some(2),
        "bigint" => Some(3),
        _ => None,
    };
    if let (Some(a), Some(b)) = (int_rank(from), int_rank(to)) {
        return a <= b;
    }
    if int_rank(from).is_some() {
        return match numeric_of(to) {
            Some(None) => true,
            Some(Some((p, 0))) => {
                p >= match from {
                    "smallint" => 5,
                    "integer" => 10,
                    _ => 19,
                }
            }
            _ => false,
        };
    }
    if let (Some(a), Some(b)) = (numeric_of(from), numeric_of(to)) {
        return match (a, b) {
            (_, None) => true,
            (None, Some(_)) => false,
            (Some((p1, s1)), Some((p2, s2))) => s2 >= s1 && p2 - s2 >= p1 - s1,
        };
    }
    let text_len = |t: &str| -> Option<Option<u32>> {
        if t == "text" || t == "character varying" {
            return Some(None);
        }
        let n = t
            .strip_prefix("character varying(")?
            .strip_suffix(')')?
            .parse()
            .ok()?;
        Some(Some(n))
    };
    if let (Some(a), Some(b)) = (text_len(from), text_len(to)) {
        return match (a, b) {
            (_, None) => true,
            (None, Some(_)) => false,
            (Some(x), Some(y)) => y >= x,
        };
    }
    // timestamp(p), time(p) with or without time zone: a finer precision (6 when unnamed).
    let precise = |t: &str| -> Option<(String, u32)> {
        for base in ["timestamp", "time"] {
            let Some(rest) = t.strip_prefix(base) else {
                continue;
            };
            let (p, zone) = match rest.strip_prefix('(') {
                Some(r) => {
                    let (p, z) = r.split_once(')')?;
                    (p.parse().ok()?, z)
                }
                None => (6, rest),
            };
            if zone.is_empty() || zone == " with time zone" || zone == " without time zone" {
                let zone = if zone == " with time zone" { "tz" } else { "" };
                return Some((format!("{base}{zone}"), p));
            }
        }
        None
    };
    if let (Some((a, p)), Some((b, q))) = (precise(from), precise(to)) {
        return a == b && q >= p;
    }
    false
}

/// `numeric` → `Some(None)`, `numeric(p,s)` → `Some(Some((p, s)))`, anything else `None`.
fn numeric_of(t: &str) -> Option<Option<(i64, i64)>> {
    if t == "numeric" {
        return Some(None);
    }
    let inner = t.strip_prefix("numeric(")?.strip_suffix(')')?;
    let (p, s) = inner.split_once(',').unwrap_or((inner, "0"));
    Some(Some((p.trim().parse().ok()?, s.trim().parse().ok()?)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(name: &str, t: &str, attnum: i16) -> ShapeColumn {
        ShapeColumn {
            name: name.into(),
            sql_type: t.into(),
            generated: None,
            key: attnum == 1,
            attnum,
            type_oid: 0,
            type_mod: -1,
        }
    }

    #[test]
    fn positions_tell_a_rename_from_a_drop_and_an_add() {
        let old = vec![
            c("id", "integer", 1),
            c("a", "text", 2),
            c("b", "integer", 3),
        ];
        let new = vec![
            c("id", "bigint", 1),
            c("a2", "text", 2),
            c("note", "text", 4),
        ];
        let d = diff(&old, &new, |_| Existing::Value("x".into()));
        assert_eq!(
            d,
            vec![
                Change::RenameColumn {
                    column: "a".into(),
                    new_name: "a2".into()
                },
                Change::AlterType {
                    column: "id".into(),
                    type_before: "integer".into(),
                    type_after: "bigint".into()
                },
                Change::DropColumn { column: "b".into() },
                Change::AddColumn {
                    column: "note".into(),
                    sql_type: "text".into(),
                    generated: None,
                    existing: Existing::Value("x".into())
                },
            ]
        );
        // Same name, new position: dropped and added again.
        let readded = vec![c("id", "integer", 1), c("a", "text", 2), c("b", "text", 5)];
        let d = diff(&old, &readded, |_| Existing::Null);
        assert_eq!(d[0], Change::DropColumn { column: "b".into() });
        assert!(matches!(&d[1], Change::AddColumn { column, .. } if column == "b"));
        assert!(diff(&old, &old, |_| Existing::Null).is_empty());
    }

    #[test]
    fn a_key_change_is_reported() {
        let old = vec![c("id", "integer", 1), c("a", "text", 2)];
        let mut new = old.clone();
        new[1].key = true;
        assert!(matches!(
            diff(&old, &new, |_| Existing::Null).last(),
            Some(Change::AlterKey { .. })
        ));
    }

    #[test]
    fn only_exact_widenings_widen() {
        for (a, b) in [
            ("integer", "bigint"),
            ("smallint", "integer"),
            ("integer", "numeric"),
            ("integer", "numeric(12,0)"),
            ("numeric(10,2)", "numeric(12,4)"),
            ("numeric(10,2)", "numeric"),
            ("character varying(20)", "character varying(40)"),
            ("character varying(20)", "text"),
            ("character varying", "text"),
            ("text", "character varying"),
            ("timestamp(3) with time zone", "timestamp with time zone"),
            ("public.mood", "public.mood"),
        ] {
            assert!(widens(a, b), "{a} -> {b}");
        }
        for (a, b) in [
            ("bigint", "integer"),
            ("integer", "numeric(9,0)"),
            ("numeric(10,2)", "numeric(10,1)"),
            ("numeric(10,2)", "numeric(11,4)"),
            ("numeric", "numeric(30,10)"),
            ("character varying(40)", "character varying(20)"),
            ("text", "character varying(20)"),
            ("real", "double precision"),
            ("timestamp without time zone", "timestamp with time zone"),
            ("integer", "text"),
        ] {
            assert!(!widens(a, b), "{a} -> {b}");
        }
    }
}
