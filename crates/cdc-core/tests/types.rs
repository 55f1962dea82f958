//! Exact values: a table with a column of nearly every type PostgreSQL ships, edge values
//! included, through the snapshot, the stream (logical), the row read (timestamp) and the
//! tombstone path. The current history row must print exactly as the source row does (each
//! type's output function, as psql shows it), and a deleted row's last version exactly as the
//! row was before the delete.

use crate::common::{capture, load};
use crate::logical::{drain, logical_pass, logical_snapshot};
use cdc_core::scd2::verify;
use cdc_core::table::{Column, TableSpec};
use cdc_core::test_utils::TestDb;
use tokio_postgres::{Client, SimpleQueryMessage};

/// (column, type) of the typed table, after its `char(6)` key.
const COLUMNS: &[(&str, &str)] = &[
    ("i2", "smallint"),
    ("i8", "bigint"),
    ("num", "numeric"),
    ("f4", "real"),
    ("f8", "double precision"),
    ("m", "money"),
    ("t", "text"),
    ("b", "bytea"),
    ("d", "date"),
    ("tm", "time"),
    ("ttz", "timetz"),
    ("ts", "timestamp"),
    ("tstz", "timestamptz"),
    ("iv", "interval"),
    ("u", "uuid"),
    ("ip", "inet"),
    ("net", "cidr"),
    ("mac", "macaddr"),
    ("r", "int4range"),
    ("tv", "tsvector"),
    ("p", "point"),
    ("bt", "bit(4)"),
    ("vb", "varbit"),
    ("o", "oid"),
    ("bo", "boolean"),
    ("js", "json"),
    ("jb", "jsonb"),
    ("x", "xml"),
    ("ia", "integer[]"),
    ("ta", "text[]"),
];

/// Rows of edge values: `(key, [value literal or NULL for each column])`.
fn rows() -> Vec<(&'static str, Vec<&'static str>)> {
    vec![
        (
            "a",
            vec![
                "-32768",
                "9223372036854775807",
                "'NaN'",
                "'-0'",
                "'-0'",
                "'12.34'",
                "E'tab\\there\\nnewline \\\\ \"quote\" \\x01 é'",
                "'\\x00ff'",
                "'4713-01-01 BC'",
                "'23:59:59.999999'",
                "'12:00+05:30'",
                "'-infinity'",
                "'infinity'",
                "'1 year 2 mons -3 days 04:05:06.789'",
                "'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'",
                "'10.0.0.1'",
                "'10.0.0.0/8'",
                "'08:00:2b:01:02:03'",
                "'[1,5)'",
                "'a:1 b:2'",
                "'(1.5,-2)'",
                "B'1010'",
                "B'1'",
                "4294967295",
                "true",
                "'null'",
                "'null'",
                "'<?xml version=\"1.0\"?><a>1</a>'",
                "'[2:3]={1,2}'",
                "'{\"a b\",\"c,d\",NULL}'",
            ],
        ),
        (
            "b  x",
            vec![
                "0",
                "-9223372036854775808",
                "'-12.3400'",
                "'NaN'",
                "'-Infinity'",
                "'-0.01'",
                "''",
                "''",
                "'infinity'",
                "'00:00'",
                "'00:00:00-12'",
                "'2000-01-01 00:00:00.123456'",
                "'1999-12-31 23:59:59.999999+00'",
                "'-178000000 years'",
                "'00000000-0000-0000-0000-000000000000'",
                "'::1/128'",
                "'2001:db8::/32'",
                "'ff:ff:ff:ff:ff:ff'",
                "'empty'",
                "''",
                "'(0,0)'",
                "B'0000'",
                "B''",
                "0",
                "false",
                "'{\"a\":1,\"a\":2}'",
                "'{\"b\": {\"c\": [1, null]}, \"s\": \"x\\ny\"}'",
                "'<b/>'",
                "'{}'",
                "'{}'",
            ],
        ),
        (
            "c",
            vec![
                "NULL",
                "NULL",
                "'Infinity'",
                "'Infinity'",
                "'0.1'",
                "NULL",
                "NULL",
                "NULL",
                "NULL",
                "NULL",
                "NULL",
                "NULL",
                "NULL",
                "NULL",
                "NULL",
                "NULL",
                "NULL",
                "NULL",
                "NULL",
                "NULL",
                "NULL",
                "NULL",
                "NULL",
                "NULL",
                "NULL",
                "E'{\\n  \"x\": [1,\\n 2]\\r\\n}'",
                "'\"s\"'",
                "NULL",
                "'{NULL,3}'",
                "NULL",
            ],
        ),
    ]
}

/// Updates that change every value of each row to another edge value.
const UPDATES: &[&str] = &[
    "UPDATE typed SET f4 = '1.1', f8 = '-0', js = '[]', jb = '{}', ia = '[0:0]={7}', x = '<c>t</c>', bo = NULL WHERE code = 'a'",
    "UPDATE typed SET num = '0', t = E'\\r', js = 'null', jb = 'null', iv = '0', d = '-infinity' WHERE code = 'b  x'",
    "UPDATE typed SET i2 = 1, t = 'x', js = E'{\"k\":\\n\"v\"}', ta = '[5:6]={z,NULL}' WHERE code = 'c'",
];

async fn create_typed(db: &mut TestDb) {
    let source = db.source_client().await;
    let cols: String = COLUMNS.iter().map(|(n, t)| format!("{n} {t}, ")).collect();
    source
        .batch_execute(&format!(
            "CREATE TABLE public.typed (code char(6) PRIMARY KEY, {cols}
                 last_updated timestamptz NOT NULL DEFAULT clock_timestamp());
             ALTER TABLE public.typed REPLICA IDENTITY FULL;"
        ))
        .await
        .unwrap();
    db.spec = TableSpec {
        schema: "public".into(),
        name: "typed".into(),
        key: vec![Column::new("code", "char(6)")],
        columns: COLUMNS.iter().map(|(n, t)| Column::new(n, t)).collect(),
        change_time_column: Some("last_updated".into()),
        created_time_column: None,
        history_schema: "public".into(),
        history_table: "dim_typed_history".into(),
        history_key_columns: vec!["code".into()],
        types: Vec::new(),
        ignored: vec!["last_updated".into()],
    };
    cdc_core::capture::setup::timestamp_table(&source, &db.spec, "last_updated")
        .await
        .unwrap();
}

async fn insert_rows(source: &Client) {
    for (key, values) in rows() {
        assert_eq!(values.len(), COLUMNS.len());
        let names: Vec<&str> = COLUMNS.iter().map(|c| c.0).collect();
        source
            .batch_execute(&format!(
                "INSERT INTO typed (code, {}) VALUES ('{key}', {})",
                names.join(", "),
                values.join(", ")
            ))
            .await
            .unwrap();
    }
}

/// Rows as psql prints them (text results: each type's output function), by key.
async fn printed(client: &Client, sql: &str) -> Vec<Vec<Option<String>>> {
    let mut out = Vec::new();
    for m in client.simple_query(sql).await.unwrap() {
        if let SimpleQueryMessage::Row(r) = m {
            out.push((0..r.len()).map(|i| r.get(i).map(str::to_owned)).collect());
        }
    }
    out
}

fn column_list() -> String {
    std::iter::once("code")
        .chain(COLUMNS.iter().map(|c| c.0))
        .collect::<Vec<_>>()
        .join(", ")
}

async fn source_rows(source: &Client, filter: &str) -> Vec<Vec<Option<String>>> {
    let sql = format!(
        "SET datestyle = 'ISO, MDY'; SELECT {} FROM typed WHERE {filter} ORDER BY code",
        column_list()
    );
    printed(source, &sql).await
}

async fn history_rows(warehouse: &Client, filter: &str) -> Vec<Vec<Option<String>>> {
    let sql = format!(
        "SELECT {} FROM dim_typed_history WHERE {filter} ORDER BY code",
        column_list()
    );
    printed(warehouse, &sql).await
}

/// Every current history row prints as its source row.
async fn assert_current_rows_print_as_the_source(db: &TestDb) {
    let source = db.source_client().await;
    let warehouse = db.warehouse_client().await;
    let expected = source_rows(&source, "true").await;
    let actual = history_rows(&warehouse, "is_current").await;
    assert_eq!(
        actual, expected,
        "current history rows against the source rows"
    );
}

/// Runs inserts, updates and deletes (between two passes) through `pass`, checking the
/// history after each step.
async fn exact_values_through(db: &TestDb, pass: impl AsyncFn(&TestDb)) {
    let source = db.source_client().await;
    insert_rows(&source).await;
    pass(db).await;
    assert_current_rows_print_as_the_source(db).await;
    for u in UPDATES {
        source.batch_execute(u).await.unwrap();
    }
    pass(db).await;
    assert_current_rows_print_as_the_source(db).await;
    // Changed and then deleted between two passes: in timestamp mode the last state is known
    // only from the tombstone.
    source
        .batch_execute(
            "UPDATE typed SET f8 = '-0', f4 = '-0', ia = '[-2:-1]={4,5}', x = '<?xml version=\"1.0\"?><d/>',
                              js = '{\"k\":1,\"k\":2}', iv = '-1 day', tstz = '-infinity', ip = '10.0.0.2'
             WHERE code IN ('a', 'b  x')",
        )
        .await
        .unwrap();
    let deleted = source_rows(&source, "code IN ('a', 'b  x')").await;
    source
        // A session with other date and interval styles deletes: the tombstone must not
        // depend on them.
        .batch_execute(
            "SET datestyle = 'SQL, DMY'; SET intervalstyle = 'sql_standard';
             DELETE FROM typed WHERE code IN ('a', 'b  x')",
        )
        .await
        .unwrap();
    pass(db).await;
    assert_current_rows_print_as_the_source(db).await;
    let warehouse = db.warehouse_client().await;
    let last = history_rows(&warehouse, "is_deleted").await;
    assert_eq!(
        last, deleted,
        "deleted rows' last versions against the rows before the delete"
    );
    // Insert, update, update and delete: three versions; insert and update: two.
    let counts = printed(
        &warehouse,
        "SELECT code, count(*) FROM dim_typed_history WHERE code <> 'pre' GROUP BY code ORDER BY code",
    )
    .await;
    let count = |k: &str, n: &str| vec![Some(k.to_owned()), Some(n.to_owned())];
    assert_eq!(
        counts,
        [
            count("a     ", "3"),
            count("b  x  ", "3"),
            count("c     ", "2")
        ],
        "versions per key"
    );
}

async fn assert_invariants_hold(db: &TestDb) {
    let source = db.source_client().await;
    let warehouse = db.warehouse_client().await;
    let report = verify::verify(&warehouse, Some(&source), &db.spec)
        .await
        .unwrap();
    assert!(report.ok(), "{}", report.render("typed"));
}

#[tokio::test]
async fn timestamp_capture_keeps_every_value_of_every_type_exactly() {
    let mut db = TestDb::new("types_timestamp").await;
    create_typed(&mut db).await;
    exact_values_through(&db, async |db: &TestDb| {
        capture(db).await;
        load(db).await;
    })
    .await;
    assert_invariants_hold(&db).await;
    db.cleanup().await;
}

#[tokio::test]
async fn logical_capture_keeps_every_value_of_every_type_exactly() {
    let mut db = TestDb::new("types_logical").await;
    create_typed(&mut db).await;
    // Rows before the slot go through the initial copy, the rest through the stream.
    let source = db.source_client().await;
    source
        .batch_execute(
            "INSERT INTO typed (code, js, x, ia, f8, ip) VALUES ('pre', E'{\\n}', '<?xml version=\"1.0\"?><p/>', '[3:3]={1}', '-0', '10.0.0.1')",
        )
        .await
        .unwrap();
    logical_snapshot(&db).await;
    // An update of a copied row that changes nothing: the copied values must read the same
    // from the stream, or this would add a version of values that did not change.
    source
        .batch_execute("UPDATE typed SET i2 = i2 WHERE code = 'pre'")
        .await
        .unwrap();
    drain(&db).await;
    load(&db).await;
    let warehouse = db.warehouse_client().await;
    let pre = printed(
        &warehouse,
        "SELECT count(*) FROM dim_typed_history WHERE code = 'pre'",
    )
    .await;
    assert_eq!(pre, [vec![Some("1".to_owned())]], "the copy only");
    exact_values_through(&db, async |db: &TestDb| {
        drain(db).await;
        logical_pass(db).await;
        load(db).await;
    })
    .await;
    assert_invariants_hold(&db).await;
    db.cleanup().await;
}
