//! TRUNCATE is history, in both capture modes: every current version of a truncated table
//! ends at the truncate's time (marked `is_truncated`), keys inserted again start new
//! chains after it, and the pipeline's other tables are untouched. One table, two tables in
//! one statement, a CASCADE from orders to its lines, then updates; in logical mode also a
//! transaction that writes, truncates and writes again. After every step each table equals
//! the trigger-fed truth, its current rows print as the source's, and `verify` passes.

use crate::common::{assert_history_exact, capture, load};
use crate::multi::{
    assert_every_table_follows, assert_every_table_matches_the_truth, catch_up, load_all, pass,
    three_tables,
};
use cdc_core::capture::logical::LogicalCapture;
use cdc_core::capture::ChangeSource;
use cdc_core::catalog::logical_progress_name;
use cdc_core::error::exit_code;
use cdc_core::event::CaptureMode;
use cdc_core::progress::Progress;
use cdc_core::table::TableSpec;
use cdc_core::test_utils::{
    actual_history, install_audit, install_audit_for, Basis, History, TestDb,
};

/// One step: its transactions (each run on its own), the tables it truncates and the tables
/// it writes otherwise (all others must keep their history as it was).
struct Step {
    transactions: &'static [&'static str],
    truncated: &'static [&'static str],
    written: &'static [&'static str],
    /// Timestamp capture sees one state per pass: a step that changes a key twice between
    /// two passes is compared with the truth only in logical mode.
    every_state_seen_by_timestamp: bool,
}

const CUSTOMER_1: &str = "'0f8b1f3e-3c0c-4d7e-9a51-1d2f1b7a0001'";

const STEPS: &[Step] = &[
    // One table, then the same keys inserted again (and a new one), in other transactions.
    Step {
        transactions: &[
            "TRUNCATE customers",
            "INSERT INTO customers (id, email, full_name, tier) VALUES
                 ('0f8b1f3e-3c0c-4d7e-9a51-1d2f1b7a0001', 'ada@example.com', 'Ada Lovelace', 'gold'),
                 ('0f8b1f3e-3c0c-4d7e-9a51-1d2f1b7a0002', 'alan@example.com', 'Alan Turing', 'platinum'),
                 ('0f8b1f3e-3c0c-4d7e-9a51-1d2f1b7a0009', 'new@example.com', 'New', 'standard')",
        ],
        truncated: &["customers"],
        written: &[],
        every_state_seen_by_timestamp: true,
    },
    // Updates of the new chains.
    Step {
        transactions: &[
            "UPDATE customers SET tier = 'silver' WHERE email = 'ada@example.com'",
            "DELETE FROM customers WHERE email = 'new@example.com'",
        ],
        truncated: &[],
        written: &["customers"],
        every_state_seen_by_timestamp: true,
    },
    // Two tables in one statement, both filled again.
    Step {
        transactions: &[
            "TRUNCATE customers, order_items",
            "INSERT INTO customers (id, email, tier) VALUES ('0f8b1f3e-3c0c-4d7e-9a51-1d2f1b7a0001', 'ada@example.com', 'gold');
             INSERT INTO order_items SELECT id, 1, 'again', 1, 1.00 FROM orders WHERE id <= 3",
        ],
        truncated: &["customers", "order_items"],
        written: &[],
        every_state_seen_by_timestamp: true,
    },
    // A CASCADE: orders takes its lines along; some of both come back.
    Step {
        transactions: &[
            "TRUNCATE orders CASCADE",
            "INSERT INTO orders (id, customer_id, product_id, quantity, unit_price)
                 VALUES (1, 7, 7, 1, 1.00), (2, 8, 8, 2, 2.00), (42, 9, 9, 3, 3.00)",
            "INSERT INTO order_items VALUES (1, 1, 'back', 1, 1.00), (42, 1, 'new', 2, 2.00)",
        ],
        truncated: &["orders", "order_items"],
        written: &[],
        every_state_seen_by_timestamp: true,
    },
    // Then updates of both.
    Step {
        transactions: &[
            "UPDATE orders SET quantity = quantity + 1 WHERE id = 1",
            "UPDATE order_items SET sku = 'changed' WHERE order_id = 42",
        ],
        truncated: &[],
        written: &["orders", "order_items"],
        every_state_seen_by_timestamp: true,
    },
    // One transaction writes, truncates and writes again (at one commit time in logical
    // mode: the chain before ends at it, the state after starts a new one); another writes
    // orders and truncates order_items without filling it again.
    Step {
        transactions: &[
            "BEGIN;
             UPDATE customers SET tier = 'before' WHERE email = 'ada@example.com';
             TRUNCATE customers;
             INSERT INTO customers (id, email, tier) VALUES ('0f8b1f3e-3c0c-4d7e-9a51-1d2f1b7a0001', 'ada@example.com', 'after');
             COMMIT",
            "BEGIN;
             UPDATE orders SET quantity = 9 WHERE id = 2;
             TRUNCATE order_items;
             COMMIT",
        ],
        truncated: &["customers", "order_items"],
        written: &["orders"],
        every_state_seen_by_timestamp: false,
    },
];

/// The time history must give the newest truncate of `table`: the time the truncate
/// trigger recorded (timestamp mode), or its transaction's commit time (logical mode).
async fn last_truncate_us(db: &TestDb, table: &str, logical: bool) -> i64 {
    let source = db.source_client().await;
    let time = if logical {
        "pg_xact_commit_timestamp(txid::text::xid)"
    } else {
        "ts"
    };
    source
        .query_one(
            &format!(
                "SELECT (extract(epoch FROM {time}) * 1000000)::int8 FROM public.test_audit
                 WHERE kind = 't' AND tbl = $1 ORDER BY seq DESC LIMIT 1"
            ),
            &[&format!("public.{table}")],
        )
        .await
        .expect("the audit recorded the truncate")
        .get(0)
}

async fn histories(db: &TestDb, specs: &[TableSpec]) -> Vec<History> {
    let warehouse = db.warehouse_client().await;
    let mut out = Vec::new();
    for spec in specs {
        out.push(actual_history(&warehouse, spec).await);
    }
    out
}

async fn truncate_steps(logical: bool, test: &str) {
    let (db, specs) = three_tables(test).await;
    let source = db.source_client().await;
    install_audit_for(&source, &specs).await;
    pass(&db, &specs, logical).await; // the initial copy of every table
    load_all(&db).await;
    let basis = if logical {
        let p = Progress::load(
            &db.state_dir(),
            &logical_progress_name(&specs, "cdc"),
            CaptureMode::Logical,
        )
        .unwrap();
        Basis::Commit {
            snapshot: p.logical.and_then(|l| l.filter),
        }
    } else {
        Basis::ChangeTime
    };
    assert_every_table_matches_the_truth(&db, &specs, &basis).await;

    for (n, step) in STEPS.iter().enumerate() {
        let what = format!("{test} step {n}");
        let before = histories(&db, &specs).await;
        for tx in step.transactions {
            source.batch_execute(tx).await.unwrap();
        }
        catch_up(&db, &specs, logical).await;
        load_all(&db).await;
        assert_every_table_follows(&db, &specs, &what).await;
        if logical || step.every_state_seen_by_timestamp {
            assert_every_table_matches_the_truth(&db, &specs, &basis).await;
        }
        let after = histories(&db, &specs).await;
        for ((spec, before), after) in specs.iter().zip(&before).zip(&after) {
            let table = spec.name.as_str();
            if !step.truncated.contains(&table) {
                if !step.written.contains(&table) {
                    assert_eq!(before, after, "{what}: {table} is untouched");
                }
                continue;
            }
            let t = last_truncate_us(&db, table, logical).await;
            // Every version current before the step ended at the truncate, as truncated.
            for (key, versions) in before {
                let Some(open) = versions.last().filter(|v| v.valid_to_us.is_none()) else {
                    continue;
                };
                let now = after[key]
                    .iter()
                    .find(|v| v.valid_from_us == open.valid_from_us)
                    .unwrap_or_else(|| panic!("{what}: {table} key {key} lost a version"));
                // (A state written in the truncating transaction before the truncate is
                // no version: it ended at the same instant.)
                assert_eq!(
                    (now.valid_to_us, now.is_deleted, now.is_truncated),
                    (Some(t), true, true),
                    "{what}: {table} key {key} ends at the truncate"
                );
            }
            // Every current version started at or after it, in a new chain.
            for (key, versions) in after {
                let Some(open) = versions.last().filter(|v| v.valid_to_us.is_none()) else {
                    continue;
                };
                assert!(
                    open.valid_from_us >= t,
                    "{what}: {table} key {key} is current from before the truncate"
                );
                if let Some(prev) = versions.iter().rev().nth(1) {
                    assert!(
                        prev.valid_to_us <= Some(open.valid_from_us) && prev.is_deleted,
                        "{what}: {table} key {key} starts a new chain: {versions:?}"
                    );
                }
            }
        }
    }
    // Nothing of a truncate is left for the next pass in timestamp mode (removed once
    // durable), and nothing was quarantined (`load_all` checks).
    if !logical {
        let left: i64 = source
            .query_one("SELECT count(*) FROM public.cdc_truncations", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(left, 0, "captured truncations are removed");
    }
    db.cleanup().await;
}

#[tokio::test]
async fn timestamp_truncate_closes_every_current_version_and_reinserts_start_new_chains() {
    truncate_steps(false, "truncate_ts").await;
}

#[tokio::test]
async fn logical_truncate_closes_every_current_version_and_reinserts_start_new_chains() {
    truncate_steps(true, "truncate_logical").await;
}

#[tokio::test]
async fn a_truncate_applied_twice_changes_nothing_the_second_time() {
    // The same truncate in two files (a crash between the durable file and the removal of
    // the truncation record, in timestamp mode): the second closes nothing.
    let (db, specs) = three_tables("truncate_twice").await;
    let source = db.source_client().await;
    install_audit_for(&source, &specs).await;
    pass(&db, &specs, false).await;
    load_all(&db).await;
    source.batch_execute("TRUNCATE customers").await.unwrap();
    source
        .batch_execute(
            "INSERT INTO customers (id, email, tier) VALUES ('0f8b1f3e-3c0c-4d7e-9a51-1d2f1b7a0001', 'a', 'b')",
        )
        .await
        .unwrap();
    // Keep the truncation record: the pass's removal is undone by restoring it afterwards.
    let kept: Vec<(String, String, chrono::DateTime<chrono::Utc>)> = source
        .query(
            "SELECT table_schema, table_name, truncated_at FROM public.cdc_truncations",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(kept.len(), 1, "the trigger recorded the truncate once");
    pass(&db, &specs, false).await;
    load_all(&db).await;
    let once = histories(&db, &specs).await;
    source
        .execute(
            "INSERT INTO public.cdc_truncations (table_schema, table_name, truncated_at) VALUES ($1, $2, $3)",
            &[&kept[0].0, &kept[0].1, &kept[0].2],
        )
        .await
        .unwrap();
    source
        .batch_execute(&format!(
            "UPDATE customers SET tier = 'c' WHERE id = {CUSTOMER_1}"
        ))
        .await
        .unwrap();
    pass(&db, &specs, false).await;
    load_all(&db).await;
    let twice = histories(&db, &specs).await;
    let customers = specs.iter().position(|s| s.name == "customers").unwrap();
    let key = "0f8b1f3e-3c0c-4d7e-9a51-1d2f1b7a0001";
    assert_eq!(
        twice[customers][key].len(),
        once[customers][key].len() + 1,
        "the update adds one version and the replayed truncate closes nothing: {:?}",
        twice[customers][key]
    );
    assert!(twice[customers][key].last().unwrap().valid_to_us.is_none());
    assert_every_table_follows(&db, &specs, "truncate applied twice").await;
    db.cleanup().await;
}

#[tokio::test]
async fn a_publication_that_does_not_publish_truncates_is_refused() {
    let db = TestDb::new("truncate_publication").await;
    let source = db.source_client().await;
    let cfg = db.extractor_config();
    source
        .batch_execute(&format!(
            "CREATE PUBLICATION {} FOR TABLE public.orders WITH (publish = 'insert, update, delete')",
            cfg.slot.publication
        ))
        .await
        .unwrap();
    let spec = db.described().await;
    let mut cap = LogicalCapture::new(
        vec![spec.clone()],
        cfg.state_dir.clone(),
        cfg.slot.clone(),
        spec.qualified(),
        cfg.source.clone(),
    )
    .unwrap();
    let err = cap.prepare(&source).await.unwrap_err();
    assert_eq!(exit_code(&err), 2, "{err}");
    let message = err.to_string();
    assert!(
        message.contains("CDC_PUBLICATION") && message.contains("truncate"),
        "{message}"
    );
    source
        .batch_execute(&format!(
            "ALTER PUBLICATION {} SET (publish = 'insert, update, delete, truncate')",
            cfg.slot.publication
        ))
        .await
        .unwrap();
    cap.prepare(&source).await.unwrap();
    db.cleanup().await;
}

#[tokio::test]
async fn a_history_table_made_before_truncates_were_captured_gains_is_truncated_in_place() {
    let db = TestDb::new("truncate_upgrade").await;
    let source = db.source_client().await;
    install_audit(&source).await;
    capture(&db).await;
    load(&db).await;
    // As an earlier version made it: no is_truncated column (its constraint goes with it).
    let warehouse = db.warehouse_client().await;
    warehouse
        .batch_execute("ALTER TABLE dim_orders_history DROP COLUMN is_truncated")
        .await
        .unwrap();
    source
        .batch_execute("TRUNCATE orders CASCADE")
        .await
        .unwrap();
    source
        .batch_execute(
            "INSERT INTO orders (id, customer_id, product_id, quantity, unit_price) VALUES (1, 1, 1, 1, 1.00)",
        )
        .await
        .unwrap();
    capture(&db).await;
    load(&db).await; // migrates the table first
    assert_history_exact(&db).await;
    let row = warehouse
        .query_one(
            "SELECT count(*) FILTER (WHERE is_truncated), count(*) FILTER (WHERE is_current),
                    (SELECT convalidated FROM pg_constraint WHERE conname = 'dim_orders_history_truncated_is_deleted')
             FROM dim_orders_history",
            &[],
        )
        .await
        .unwrap();
    let (truncated, current, validated): (i64, i64, bool) = (row.get(0), row.get(1), row.get(2));
    assert!(truncated >= 10, "the sample orders ended at the truncate");
    assert_eq!(current, 1, "only the order inserted again is current");
    assert!(
        !validated,
        "the constraint was added without a scan of the table"
    );
    db.cleanup().await;
}
