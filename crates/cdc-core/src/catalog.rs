//! Table descriptions read from the source's catalog: for each configured table its primary
//! key (any number of columns), its columns with their types as the source names them,
//! generated columns with their expressions, and the history table it maps to. `CDC_TABLES`
//! selects the tables (`schema.table`, `schema.*`), `CDC_EXCLUDE_COLUMNS` leaves columns out.

use crate::db::ctx;
use crate::error::{Error, Result};
use crate::schema_change::Existing;
use crate::table::{Column, TableSpec, RESERVED_HISTORY_COLUMNS};
use tokio_postgres::GenericClient;

/// Which tables and columns to capture (settled from `CDC_TABLES`, `CDC_EXCLUDE_COLUMNS`,
/// `CDC_CHANGE_TIME_COLUMN`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableSelection {
    /// `(schema, Some(table))` or `(schema, None)` for every table of the schema.
    pub patterns: Vec<(String, Option<String>)>,
    /// `(schema, table, column)` left out of the history.
    pub exclude: Vec<(String, String, String)>,
    /// The change-time column timestamp capture needs (not tracked).
    pub change_time_column: String,
    /// `CDC_PIPELINE_NAME`: names the change-log stream and the logical progress of a
    /// pipeline of several tables.
    pub pipeline_name: String,
}

impl Default for TableSelection {
    fn default() -> Self {
        TableSelection {
            patterns: vec![("public".into(), Some("orders".into()))],
            exclude: Vec::new(),
            change_time_column: "last_updated".into(),
            pipeline_name: "cdc".into(),
        }
    }
}

impl TableSelection {
    /// Parses `CDC_TABLES` (`schema.table` or `schema.*`, comma separated).
    pub fn parse_tables(s: &str) -> std::result::Result<Vec<(String, Option<String>)>, String> {
        let mut out = Vec::new();
        for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let (schema, table) = item
                .split_once('.')
                .ok_or_else(|| format!("'{item}' must be schema.table or schema.*"))?;
            check_name(schema).map_err(|m| format!("'{item}': {m}"))?;
            let table = if table == "*" {
                None
            } else {
                check_name(table).map_err(|m| format!("'{item}': {m}"))?;
                Some(table.to_owned())
            };
            let entry = (schema.to_owned(), table);
            if !out.contains(&entry) {
                out.push(entry);
            }
        }
        if out.is_empty() {
            return Err("must name at least one table (schema.table or schema.*)".into());
        }
        Ok(out)
    }

    /// Parses `CDC_EXCLUDE_COLUMNS` (`schema.table.column`, comma separated).
    pub fn parse_exclude(s: &str) -> std::result::Result<Vec<(String, String, String)>, String> {
        let mut out = Vec::new();
        for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let parts: Vec<&str> = item.split('.').collect();
            let [schema, table, column] = parts[..] else {
                return Err(format!("'{item}' must be schema.table.column"));
            };
            for p in [schema, table, column] {
                check_name(p).map_err(|m| format!("'{item}': {m}"))?;
            }
            out.push((schema.into(), table.into(), column.into()));
        }
        Ok(out)
    }

    /// The configured tables that exist, described from the catalog, in name order. A named
    /// table that does not exist, or has no primary key, is refused.
    pub async fn describe(&self, client: &impl GenericClient) -> Result<Vec<TableSpec>> {
        let mut names: Vec<(String, String)> = Vec::new();
        for (schema, table) in &self.patterns {
            match table {
                Some(t) => names.push((schema.clone(), t.clone())),
                None => {
                    let rows = client
                        .query(
                            "SELECT c.relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                             WHERE n.nspname = $1 AND c.relkind = 'r' AND NOT c.relispartition
                               AND c.relname NOT LIKE 'cdc\\_%'
                             ORDER BY 1",
                            &[schema],
                        )
                        .await
                        .map_err(ctx(format!("listing the tables of schema {schema}")))?;
                    names.extend(rows.iter().map(|r| (schema.clone(), r.get(0))));
                }
            }
        }
        names.sort();
        names.dedup();
        if names.is_empty() {
            return Err(Error::setup(
                "CDC_TABLES",
                "matches no table in the source database; name existing tables (schema.table or schema.*)",
            ));
        }
        let mut specs = Vec::with_capacity(names.len());
        for (schema, table) in names {
            specs.push(self.describe_one(client, &schema, &table).await?);
        }
        Ok(specs)
    }

    /// Describes one table (what `describe` does for each).
    pub async fn describe_one(
        &self,
        client: &impl GenericClient,
        schema: &str,
        table: &str,
    ) -> Result<TableSpec> {
        let what = || format!("source table {schema}.{table}");
        let kind: Option<String> = client
            .query_opt(
                "SELECT c.relkind::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                 WHERE n.nspname = $1 AND c.relname = $2",
                &[&schema, &table],
            )
            .await
            .map_err(ctx(format!("looking up {schema}.{table}")))?
            .map(|r| r.get(0));
        match kind.as_deref() {
            None | Some("r") => {}
            Some("p") => {
                return Err(Error::setup(
                    what(),
                    "is partitioned; partitioned tables are not captured yet (their changes come under the partitions' names): name its partitions in CDC_TABLES",
                ))
            }
            Some(_) => {
                return Err(Error::setup(what(), "is not a table (a view or another relation); name tables in CDC_TABLES"))
            }
        }
        let reserved: Vec<String> = client
            .query_one(
                "SELECT coalesce(array_agg(word::text), '{}') FROM pg_get_keywords() WHERE catcode IN ('R', 'T')",
                &[],
            )
            .await
            .map_err(ctx("reading PostgreSQL's reserved words"))?
            .get(0);
        for (what_name, name) in [("schema", schema), ("table", table)] {
            check_name(name)
                .and_then(|()| not_reserved(name, &reserved))
                .map_err(|m| {
                    Error::setup(
                        what(),
                        format!("{what_name} name {m}; such names are not supported yet"),
                    )
                })?;
        }
        let rows = client
            .query(
                "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), a.atttypid::int8,
                        a.attgenerated = 's', pg_get_expr(d.adbin, d.adrelid),
                        coalesce((SELECT k.n FROM unnest(i.indkey) WITH ORDINALITY AS k(att, n)
                                  WHERE k.att = a.attnum), 0)::int4,
                        a.attnum, a.atttypmod,
                        CASE WHEN a.atthasmissing THEN 'v' WHEN d.adbin IS NOT NULL AND a.attgenerated = '' THEN 'd' ELSE 'n' END,
                        CASE WHEN a.atthasmissing THEN (a.attmissingval::text::text[])[1] END
                 FROM pg_class c
                 JOIN pg_namespace n ON n.oid = c.relnamespace
                 JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
                 LEFT JOIN pg_attrdef d ON d.adrelid = c.oid AND d.adnum = a.attnum
                 LEFT JOIN pg_index i ON i.indrelid = c.oid AND i.indisprimary
                 WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind = 'r'
                 ORDER BY a.attnum",
                &[&schema, &table],
            )
            .await
            .map_err(ctx(format!("reading the catalog of {schema}.{table}")))?;
        if rows.is_empty() {
            return Err(Error::setup(
                what(),
                "does not exist (or is not visible to DB_USER); fix CDC_TABLES, or create it (the demo's tables: apply init-scripts/*.sql to the source database)",
            ));
        }
        let mut key: Vec<(i32, Column)> = Vec::new();
        let mut type_oids: Vec<i64> = Vec::new();
        let mut columns = Vec::new();
        let mut has_change_time = false;
        let mut has_created_at = false;
        let mut ignored = Vec::new();
        for r in &rows {
            let name: String = r.get(0);
            check_name(&name)
                .and_then(|()| not_reserved(&name, &reserved))
                .map_err(|m| {
                    Error::setup(
                        what(),
                        format!("column {name:?}: {m}; such names are not supported yet"),
                    )
                })?;
            let mut col = Column::new(&name, &r.get::<_, String>(1));
            if r.get::<_, bool>(3) {
                col.generated = r.get(4);
            }
            col.attnum = r.get(6);
            col.type_oid = r.get::<_, i64>(2) as u32;
            col.type_mod = r.get(7);
            col.existing = match (r.get::<_, &str>(8), r.get::<_, Option<String>>(9)) {
                ("v", Some(v)) => Existing::Value(v),
                ("d", _) => Existing::Unknown,
                _ => Existing::Null,
            };
            let key_pos: i32 = r.get(5);
            if !excluded_column(&self.exclude, schema, table, &name) {
                type_oids.push(r.get::<_, i64>(2));
            }
            let excluded = self
                .exclude
                .iter()
                .any(|(s, t, c)| s == schema && t == table && *c == name);
            if key_pos > 0 {
                if excluded {
                    return Err(Error::setup(
                        what(),
                        format!("CDC_EXCLUDE_COLUMNS names {name}, a primary-key column; the key is always kept"),
                    ));
                }
                key.push((key_pos, col));
            } else if name == self.change_time_column {
                has_change_time = true;
                ignored.push(name);
            } else if excluded {
                ignored.push(name);
            } else {
                has_created_at |= name == "created_at";
                columns.push(col);
            }
        }
        if key.is_empty() {
            return Err(Error::setup(
                what(),
                "has no primary key; the history needs one to tell rows apart (ALTER TABLE … ADD PRIMARY KEY)",
            ));
        }
        key.sort_by_key(|(pos, _)| *pos);
        let key: Vec<Column> = key.into_iter().map(|(_, c)| c).collect();
        if key.iter().any(|k| k.generated.is_some()) {
            return Err(Error::setup(
                what(),
                "has a generated column in its primary key",
            ));
        }
        let orders =
            schema == "public" && table == "orders" && key.len() == 1 && key[0].name == "id";
        let history_key_columns = if orders {
            vec!["order_key".to_owned()]
        } else {
            key.iter()
                .map(|k| {
                    if RESERVED_HISTORY_COLUMNS.contains(&k.name.as_str()) {
                        format!("source_{}", k.name)
                    } else {
                        k.name.clone()
                    }
                })
                .collect()
        };
        Ok(TableSpec {
            schema: schema.to_owned(),
            name: table.to_owned(),
            key,
            columns,
            change_time_column: has_change_time.then(|| self.change_time_column.clone()),
            created_time_column: has_created_at.then(|| "created_at".to_owned()),
            history_schema: schema.to_owned(),
            history_table: format!("dim_{table}_history"),
            history_key_columns,
            types: user_types(client, &type_oids).await?,
            ignored,
        })
    }
}

/// A fingerprint of each table's columns (names, positions, types, generated expressions)
/// and primary key, in one query: when it changes, the table is described again and compared
/// with what was last captured. `None` for a table that no longer exists.
pub async fn fingerprints(
    client: &impl GenericClient,
    specs: &[TableSpec],
) -> Result<Vec<Option<String>>> {
    let names: Vec<String> = specs.iter().map(|s| s.qualified()).collect();
    let rows = client
        .query(
            "SELECT (SELECT md5(string_agg(a.attnum || ':' || a.attname || ':' || a.atttypid || ':' || a.atttypmod || ':'
                                          || a.attgenerated::text || ':' || coalesce(CASE WHEN a.attgenerated <> '' THEN pg_get_expr(d.adbin, d.adrelid) END, ''),
                                          ',' ORDER BY a.attnum))
                     FROM pg_attribute a LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
                     WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped)
                    || coalesce((SELECT i.indkey::text FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary), '')
             FROM unnest($1::text[]) WITH ORDINALITY AS s(q, n) LEFT JOIN pg_class c ON c.oid = to_regclass(s.q)
             ORDER BY s.n",
            &[&names],
        )
        .await
        .map_err(ctx("reading the captured tables' columns"))?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// What names a pipeline's change-log files (their prefix): its one table's name, or the
/// pipeline's name when it captures several.
pub fn stream_name(specs: &[TableSpec], pipeline: &str) -> String {
    match specs {
        [one] => one.name.clone(),
        _ => pipeline.to_owned(),
    }
}

/// The name of a pipeline's logical progress file: its one table's (as before several tables
/// could be captured), or `pipeline-<name>`.
pub fn logical_progress_name(specs: &[TableSpec], pipeline: &str) -> String {
    match specs {
        [one] => one.qualified(),
        _ => format!("pipeline-{pipeline}"),
    }
}

fn excluded_column(
    exclude: &[(String, String, String)],
    schema: &str,
    table: &str,
    column: &str,
) -> bool {
    exclude
        .iter()
        .any(|(s, t, c)| s == schema && t == table && c == column)
}

/// The user-defined types (enums, domains, composites; through arrays, domains' base types
/// and composites' attributes) that columns of these types need, dependencies first.
async fn user_types(
    client: &impl GenericClient,
    oids: &[i64],
) -> Result<Vec<crate::table::TypeDef>> {
    let mut out: Vec<crate::table::TypeDef> = Vec::new();
    let mut seen: Vec<i64> = Vec::new();
    // Depth-first with an explicit stack: (type, whether its dependencies are already queued).
    let mut stack: Vec<(i64, bool)> = oids.iter().rev().map(|&o| (o, false)).collect();
    while let Some((oid, expanded)) = stack.pop() {
        if seen.contains(&oid) {
            continue;
        }
        let row = client
            .query_one(
                "SELECT t.typtype::text, n.nspname::text, format('%I.%I', n.nspname, t.typname),
                        t.typelem::int8, t.typbasetype::int8, t.typrelid::int8,
                        n.nspname IN ('pg_catalog', 'information_schema'),
                        coalesce((SELECT array_agg(a.atttypid::int8 ORDER BY a.attnum) FROM pg_attribute a
                                  WHERE a.attrelid = t.typrelid AND a.attnum > 0 AND NOT a.attisdropped), '{}')
                 FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace WHERE t.oid = $1::int8::oid",
                &[&oid],
            )
            .await
            .map_err(ctx("reading the source's types"))?;
        let (kind, schema, name): (String, String, String) = (row.get(0), row.get(1), row.get(2));
        let (elem, base, rel, builtin): (i64, i64, i64, bool) =
            (row.get(3), row.get(4), row.get(5), row.get(6));
        let attrs: Vec<i64> = row.get(7);
        // An array: its element type is what needs creating.
        if elem != 0 && kind == "b" {
            seen.push(oid);
            stack.push((elem, false));
            continue;
        }
        if builtin || !matches!(kind.as_str(), "e" | "d" | "c") {
            seen.push(oid);
            continue;
        }
        if !expanded {
            stack.push((oid, true));
            match kind.as_str() {
                "d" => stack.push((base, false)),
                "c" => stack.extend(attrs.iter().rev().map(|&a| (a, false))),
                _ => {}
            }
            continue;
        }
        seen.push(oid);
        let ddl_sql = match kind.as_str() {
            "e" => "SELECT format('CREATE TYPE %I.%I AS ENUM (%s)', n.nspname, t.typname,
                           string_agg(quote_literal(e.enumlabel), ', ' ORDER BY e.enumsortorder))
                    FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
                    JOIN pg_enum e ON e.enumtypid = t.oid WHERE t.oid = $1::int8::oid GROUP BY n.nspname, t.typname",
            "d" => "SELECT format('CREATE DOMAIN %I.%I AS %s%s%s', n.nspname, t.typname,
                           format_type(t.typbasetype, t.typtypmod),
                           CASE WHEN t.typnotnull THEN ' NOT NULL' ELSE '' END,
                           coalesce((SELECT string_agg(format(' CONSTRAINT %I %s', c.conname, pg_get_constraintdef(c.oid)), '')
                                     FROM pg_constraint c WHERE c.contypid = t.oid), ''))
                    FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace WHERE t.oid = $1::int8::oid",
            _ => "SELECT format('CREATE TYPE %I.%I AS (%s)', n.nspname, t.typname,
                           string_agg(format('%I %s', a.attname, format_type(a.atttypid, a.atttypmod)), ', ' ORDER BY a.attnum))
                    FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
                    JOIN pg_attribute a ON a.attrelid = t.typrelid AND a.attnum > 0 AND NOT a.attisdropped
                    WHERE t.oid = $1::int8::oid GROUP BY n.nspname, t.typname",
        };
        if kind == "c" && rel != 0 {
            let standalone: bool = client
                .query_one(
                    "SELECT relkind = 'c' FROM pg_class WHERE oid = $1::int8::oid",
                    &[&rel],
                )
                .await
                .map_err(ctx("reading the source's types"))?
                .get(0);
            if !standalone {
                return Err(Error::setup(
                    format!("type {name}"),
                    "is a table's row type; a column of a table's row type is not supported",
                ));
            }
        }
        let ddl: String = client
            .query_one(ddl_sql, &[&oid])
            .await
            .map_err(ctx(format!("reading the definition of type {name}")))?
            .get(0);
        out.push(crate::table::TypeDef { name, schema, ddl });
    }
    Ok(out)
}

/// A name that is a reserved word of PostgreSQL's grammar would need quoting.
fn not_reserved(name: &str, reserved: &[String]) -> std::result::Result<(), String> {
    if reserved.iter().any(|w| w == name) {
        Err(format!("'{name}' is a reserved SQL word"))
    } else {
        Ok(())
    }
}

/// A schema, table or column name the pipeline splices into SQL as it is: a lower-case SQL
/// identifier.
fn check_name(s: &str) -> std::result::Result<(), String> {
    let mut chars = s.chars();
    let ok = matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && s.len() <= 63;
    if ok {
        Ok(())
    } else {
        Err(format!(
            "'{s}' must be a lower-case SQL identifier (a-z, 0-9, _)"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_lists_parse_and_refuse_what_is_not_a_table() {
        assert_eq!(
            TableSelection::parse_tables(" public.orders, shop.* ,public.orders").unwrap(),
            [
                ("public".to_owned(), Some("orders".to_owned())),
                ("shop".to_owned(), None)
            ]
        );
        assert!(TableSelection::parse_tables("orders").is_err());
        assert!(TableSelection::parse_tables("").is_err());
        assert!(TableSelection::parse_tables("public.Orders").is_err());
        assert_eq!(
            TableSelection::parse_exclude("public.customers.email").unwrap(),
            [("public".into(), "customers".into(), "email".into())]
        );
        assert!(TableSelection::parse_exclude("public.customers").is_err());
    }
}
