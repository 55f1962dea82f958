//! Tables described by the catalog with keys other than one integer: a composite primary key
//! and a uuid key, in both capture modes, through inserts, updates, deletes and key changes.
//! The current history must print exactly as the source and every invariant hold.

use crate::common::{capture, load};
use crate::logical::{drain, logical_pass, logical_snapshot};
use cdc_core::capture::setup;
use cdc_core::scd2::verify;
use cdc_core::table::TableSpec;
use cdc_core::test_utils::TestDb;
use tokio_postgres::{Client, SimpleQueryMessage};

/// A table with its triggers for timestamp capture (what `extractor setup` installs: key
/// changes leave a tombstone).
pub async fn create(db: &mut TestDb, name: &str, columns: &str, key: &[&str]) {
    let key_list = key.join(", ");
    let source = db.source_client().await;
    source
        .batch_execute(&format!(
            "CREATE TABLE public.{name} ({columns},
                 last_updated timestamptz NOT NULL DEFAULT clock_timestamp(), PRIMARY KEY ({key_list}));
             ALTER TABLE public.{name} REPLICA IDENTITY FULL;"
        ))
        .await
        .unwrap();
    db.spec = TableSpec {
        name: name.into(),
        ..TableSpec::orders()
    };
    setup::timestamp_table(&source, &db.described().await, "last_updated")
        .await
        .unwrap();
}

pub async fn printed(client: &Client, sql: &str) -> Vec<Vec<Option<String>>> {
    let mut out = Vec::new();
    for m in client.simple_query(sql).await.unwrap() {
        if let SimpleQueryMessage::Row(r) = m {
            out.push((0..r.len()).map(|i| r.get(i).map(str::to_owned)).collect());
        }
    }
    out
}

/// Current history rows against the source rows, and the invariants.
async fn assert_history_follows(db: &TestDb, cols: &str) {
    let source = db.source_client().await;
    let warehouse = db.warehouse_client().await;
    let spec = db.described().await;
    let expected = printed(
        &source,
        &format!("SELECT {cols} FROM {} ORDER BY {cols}", spec.qualified()),
    )
    .await;
    let actual = printed(
        &warehouse,
        &format!(
            "SELECT {cols} FROM {} WHERE is_current ORDER BY {cols}",
            spec.history_qualified()
        ),
    )
    .await;
    assert_eq!(actual, expected, "current history against the source");
    let report = verify::verify(&warehouse, Some(&source), &spec)
        .await
        .unwrap();
    assert!(report.ok(), "{}", report.render(&spec.history_qualified()));
}

const LINES: &[&str] = &[
    "INSERT INTO lines (order_id, line_no, sku, qty) VALUES (1, 1, 'a', 1), (1, 2, 'b', 2), (2, 1, 'a', 3), (10, 1, 'x', 1)",
    "UPDATE lines SET qty = qty + 1 WHERE order_id = 1; DELETE FROM lines WHERE (order_id, line_no) = (2, 1)",
    "UPDATE lines SET line_no = 3 WHERE (order_id, line_no) = (1, 2); INSERT INTO lines VALUES (2, 1, 'again', 9)",
    "DELETE FROM lines WHERE order_id = 1; UPDATE lines SET sku = 'y' WHERE order_id = 10",
];

const ACCOUNTS: &[&str] = &[
    "INSERT INTO accounts (id, email) VALUES ('a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', 'a@x'), ('00000000-0000-0000-0000-000000000001', 'b@x')",
    "UPDATE accounts SET email = 'a2@x' WHERE email = 'a@x'",
    "DELETE FROM accounts WHERE email = 'b@x'; INSERT INTO accounts (id, email) VALUES ('00000000-0000-0000-0000-000000000001', 'b2@x')",
];

async fn through_timestamp_capture(db: &TestDb, steps: &[&str], cols: &str) {
    let source = db.source_client().await;
    for step in steps {
        source.batch_execute(step).await.unwrap();
        capture(db).await;
        load(db).await;
        assert_history_follows(db, cols).await;
    }
}

async fn through_logical_capture(db: &TestDb, steps: &[&str], cols: &str) {
    let source = db.source_client().await;
    logical_snapshot(db).await;
    for step in steps {
        source.batch_execute(step).await.unwrap();
        drain(db).await;
        logical_pass(db).await;
        load(db).await;
        assert_history_follows(db, cols).await;
    }
}

#[tokio::test]
async fn a_composite_key_table_follows_the_source_in_timestamp_mode() {
    let mut db = TestDb::new("keys_composite_ts").await;
    create(
        &mut db,
        "lines",
        "order_id int, line_no int, sku text, qty int",
        &["order_id", "line_no"],
    )
    .await;
    through_timestamp_capture(&db, LINES, "order_id, line_no, sku, qty").await;
    db.cleanup().await;
}

#[tokio::test]
async fn a_composite_key_table_follows_the_source_in_logical_mode() {
    let mut db = TestDb::new("keys_composite_lg").await;
    create(
        &mut db,
        "lines",
        "order_id int, line_no int, sku text, qty int",
        &["order_id", "line_no"],
    )
    .await;
    through_logical_capture(&db, LINES, "order_id, line_no, sku, qty").await;
    // A key change is the end of the old key and the start of the new one.
    let wh = db.warehouse_client().await;
    let moved = printed(
        &wh,
        "SELECT is_deleted::text FROM public.dim_lines_history WHERE (order_id, line_no) = (1, 2)
         ORDER BY valid_from DESC LIMIT 1",
    )
    .await;
    assert_eq!(moved, [vec![Some("true".to_owned())]]);
    db.cleanup().await;
}

#[tokio::test]
async fn a_uuid_key_table_follows_the_source_in_both_modes() {
    let mut db = TestDb::new("keys_uuid_ts").await;
    create(&mut db, "accounts", "id uuid, email text", &["id"]).await;
    through_timestamp_capture(&db, ACCOUNTS, "id, email").await;
    db.cleanup().await;
    let mut db = TestDb::new("keys_uuid_lg").await;
    create(&mut db, "accounts", "id uuid, email text", &["id"]).await;
    through_logical_capture(&db, ACCOUNTS, "id, email").await;
    db.cleanup().await;
}

const PROFILES: &[&str] = &[
    "INSERT INTO profiles (id, m, p, a, ms, s) VALUES
         (1, 'happy', 5, ROW('1 Main St', 'sad')::addr, '{happy,sad}', 'xl'),
         (2, NULL, 1, NULL, '{}', 's')",
    "UPDATE profiles SET m = 'sad', a = ROW('2 Side St', NULL)::addr, ms = '[0:0]={sad}' WHERE id = 1",
    "DELETE FROM profiles WHERE id = 2; UPDATE profiles SET p = 7, s = 's' WHERE id = 1",
];

/// Enum, domain (with a check), composite (with an enum attribute), an enum array and an enum
/// of another schema: the warehouse gets each type with the source's definition.
async fn create_profiles(db: &mut TestDb) {
    db.source_client()
        .await
        .batch_execute(
            "CREATE TYPE mood AS ENUM ('sad', 'happy');
             CREATE DOMAIN posint AS integer CHECK (VALUE > 0);
             CREATE TYPE addr AS (street text, kind mood);
             CREATE SCHEMA shop; CREATE TYPE shop.size AS ENUM ('s', 'm', 'xl');",
        )
        .await
        .unwrap();
    create(
        db,
        "profiles",
        "id int, m mood, p posint, a addr, ms mood[], s shop.size",
        &["id"],
    )
    .await;
}

#[tokio::test]
async fn enum_domain_and_composite_columns_get_their_types_in_the_warehouse() {
    let cols = "id, m, p, a, ms, s";
    let mut db = TestDb::new("keys_types_ts").await;
    create_profiles(&mut db).await;
    through_timestamp_capture(&db, PROFILES, cols).await;
    let wh = db.warehouse_client().await;
    let domain = printed(
        &wh,
        "SELECT pg_get_constraintdef(c.oid) FROM pg_constraint c WHERE c.contypid = 'posint'::regtype",
    )
    .await;
    assert_eq!(domain, [vec![Some("CHECK ((VALUE > 0))".to_owned())]]);
    db.cleanup().await;
    let mut db = TestDb::new("keys_types_lg").await;
    create_profiles(&mut db).await;
    through_logical_capture(&db, PROFILES, cols).await;
    db.cleanup().await;
}
