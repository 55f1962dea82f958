//! One pipeline, many tables: `CDC_TABLES=public.*` over the demo's orders, customers (a
//! uuid key) and order_items (a composite key); one extractor pass and one loader run serve
//! all of them, in both capture modes; transactions that touch several tables; randomized
//! rounds. After every step each table's current history prints exactly as its source rows
//! and every invariant holds.

use crate::keys::printed;
use crate::logical::drain_by;
use cdc_core::capture::logical::LogicalCapture;
use cdc_core::capture::timestamp::TimestampCapture;
use cdc_core::capture::ChangeSource;
use cdc_core::catalog::{logical_progress_name, stream_name, TableSelection};
use cdc_core::changelog::ChangeLogSink;
use cdc_core::event::CaptureMode;
use cdc_core::progress::Progress;
use cdc_core::scd2::{loader, verify};
use cdc_core::shutdown::Shutdown;
use cdc_core::table::TableSpec;
use cdc_core::test_utils::{
    actual_history, assert_same_history, connect, expected_history_on, install_audit_for, Basis,
    TestDb,
};
use fake::rand::rngs::StdRng;
use fake::rand::{RngExt, SeedableRng};

fn every_table_of_public() -> TableSelection {
    TableSelection {
        patterns: vec![("public".into(), None)],
        ..TableSelection::default()
    }
}

/// The demo's three tables in databases named for `test`, described as `public.*`.
pub async fn three_tables(test: &str) -> (TestDb, Vec<TableSpec>) {
    let db = TestDb::new(test).await;
    let client = db.source_client().await;
    let specs = every_table_of_public().describe(&client).await.unwrap();
    let names: Vec<String> = specs.iter().map(|s| s.qualified()).collect();
    assert_eq!(
        names,
        ["public.customers", "public.order_items", "public.orders"]
    );
    (db, specs)
}

/// One extractor pass over every table.
pub async fn pass(db: &TestDb, specs: &[TableSpec], logical: bool) {
    let cfg = db.extractor_config();
    let mut sink = ChangeLogSink::new(&cfg.log_dir, &stream_name(specs, "cdc"), 50_000);
    let mut client = connect(&cfg.source).await;
    if logical {
        let mut cap = LogicalCapture::new(
            specs.to_vec(),
            cfg.state_dir.clone(),
            cfg.slot.clone(),
            logical_progress_name(specs, "cdc"),
            cfg.source.clone(),
        )
        .unwrap();
        cap.prepare(&client).await.unwrap();
        cap.pass(&mut client, &mut sink).await.unwrap();
    } else {
        let mut cap = TimestampCapture::new(specs.to_vec(), cfg.state_dir.clone()).unwrap();
        cap.prepare(&client).await.unwrap();
        cap.pass(&mut client, &mut sink).await.unwrap();
    }
}

/// Passes until the slot has confirmed everything written so far (logical), then one more.
pub async fn catch_up(db: &TestDb, specs: &[TableSpec], logical: bool) {
    if !logical {
        return pass(db, specs, false).await;
    }
    drain_by(db, async || pass(db, specs, true).await).await;
}

pub async fn load_all(db: &TestDb) {
    let mut cfg = db.loader_config();
    cfg.tables = every_table_of_public();
    // Small chunks: a chunk holds several tables' events, and a table's events span chunks.
    cfg.max_events_in_memory = 7;
    let totals = loader::run(&cfg, true, Shutdown::new()).await.unwrap();
    assert_eq!(totals.quarantined, 0, "nothing quarantined");
}

/// Every table's current history prints as its source rows, and every invariant holds.
pub async fn assert_every_table_follows(db: &TestDb, specs: &[TableSpec], step: &str) {
    let source = db.source_client().await;
    let warehouse = db.warehouse_client().await;
    for spec in specs {
        let cols: Vec<&str> = spec
            .key
            .iter()
            .chain(spec.columns.iter().filter(|c| c.generated.is_none()))
            .map(|c| c.name.as_str())
            .collect();
        let src_cols = cols.join(", ");
        let hist_cols: Vec<String> = spec
            .key
            .iter()
            .zip(&spec.history_key_columns)
            .map(|(_, h)| h.clone())
            .chain(
                spec.columns
                    .iter()
                    .filter(|c| c.generated.is_none())
                    .map(|c| spec.history_column(c)),
            )
            .collect();
        let order: Vec<String> = (1..=spec.key.len()).map(|i| i.to_string()).collect();
        let expected = printed(
            &source,
            &format!(
                "SELECT {src_cols} FROM {} ORDER BY {}",
                spec.qualified(),
                order.join(", ")
            ),
        )
        .await;
        let actual = printed(
            &warehouse,
            &format!(
                "SELECT {} FROM {} WHERE is_current ORDER BY {}",
                hist_cols.join(", "),
                spec.history_qualified(),
                order.join(", ")
            ),
        )
        .await;
        assert_eq!(actual, expected, "{step}: {}", spec.qualified());
        let report = verify::verify(&warehouse, Some(&source), spec)
            .await
            .unwrap();
        assert!(
            report.ok(),
            "{step}: {}",
            report.render(&spec.history_qualified())
        );
    }
}

const STEPS: &[&str] = &[
    "INSERT INTO customers (id, email, tier) VALUES ('00000000-0000-0000-0000-000000000001', 'a@x', 'gold');
     INSERT INTO order_items VALUES (1, 3, 'a', 1, 1.00), (1, 4, 'b', 2, 2.50)",
    // One transaction across the three tables.
    "BEGIN;
     UPDATE orders SET quantity = quantity + 1 WHERE id = 1;
     UPDATE customers SET tier = 'silver';
     DELETE FROM order_items WHERE line_no = 2;
     INSERT INTO order_items VALUES (2, 5, 'c', 5, 0.10);
     COMMIT",
    // Keys of two tables changed twice in one transaction: only the committed state counts.
    "BEGIN;
     UPDATE customers SET tier = 'a' WHERE id = '00000000-0000-0000-0000-000000000001';
     UPDATE order_items SET quantity = quantity + 1 WHERE (order_id, line_no) = (1, 1);
     UPDATE customers SET tier = 'b' WHERE id = '00000000-0000-0000-0000-000000000001';
     UPDATE order_items SET quantity = quantity + 1 WHERE (order_id, line_no) = (1, 1);
     COMMIT",
    // A deleted order takes its lines along (a cascade), a line changes its key.
    "BEGIN;
     DELETE FROM orders WHERE id = 3;
     DELETE FROM customers WHERE id = '00000000-0000-0000-0000-000000000001';
     UPDATE order_items SET line_no = 9 WHERE (order_id, line_no) = (2, 5);
     COMMIT",
];

/// Every table's history equals the trigger-fed truth, version by version.
pub async fn assert_every_table_matches_the_truth(db: &TestDb, specs: &[TableSpec], basis: &Basis) {
    let source = db.source_client().await;
    let warehouse = db.warehouse_client().await;
    for spec in specs {
        let expected = expected_history_on(&source, spec, basis).await;
        let actual = actual_history(&warehouse, spec).await;
        assert_same_history(&expected, &actual);
    }
}

async fn steps_then_random_rounds(logical: bool, name: &str) {
    let (db, specs) = three_tables("multi").await;
    let source = db.source_client().await;
    install_audit_for(&source, &specs).await;
    let mut basis = Basis::ChangeTime;
    if logical {
        pass(&db, &specs, true).await; // the initial copy of every table
        load_all(&db).await;
        assert_every_table_follows(&db, &specs, "initial copy").await;
        let p = Progress::load(
            &db.state_dir(),
            &logical_progress_name(&specs, "cdc"),
            CaptureMode::Logical,
        )
        .unwrap();
        basis = Basis::Commit {
            snapshot: p.logical.and_then(|l| l.filter),
        };
    }
    for (i, step) in STEPS.iter().enumerate() {
        source.batch_execute(step).await.unwrap();
        catch_up(&db, &specs, logical).await;
        load_all(&db).await;
        assert_every_table_follows(&db, &specs, &format!("{name} step {i}")).await;
        // One change of a key per step: even timestamp capture sees every state.
        assert_every_table_matches_the_truth(&db, &specs, &basis).await;
    }
    let mut rng = StdRng::seed_from_u64(if logical { 7 } else { 8 });
    for round in 0..6 {
        for _ in 0..rng.random_range(5..25) {
            let mut tx = vec!["BEGIN".to_owned()];
            for _ in 0..rng.random_range(1..4) {
                let o: i32 = rng.random_range(1..8);
                let l: i32 = rng.random_range(1..4);
                let c: i32 = rng.random_range(1..6);
                tx.push(match rng.random_range(0..9) {
                    0 => format!("DELETE FROM orders WHERE id = {o}"),
                    1 => format!("INSERT INTO orders (id, customer_id, product_id, quantity, unit_price) VALUES ({o}, 1, 1, 1, 1.00) ON CONFLICT DO NOTHING"),
                    2 => format!("UPDATE orders SET order_status = 's{}' WHERE id = {o}", rng.random_range(0..3)),
                    3 => format!("INSERT INTO order_items SELECT {o}, {l}, 'n', 1, 1.00 WHERE EXISTS (SELECT 1 FROM orders WHERE id = {o}) ON CONFLICT DO NOTHING"),
                    4 => format!("UPDATE order_items SET quantity = quantity + 1 WHERE order_id = {o}"),
                    5 => format!("DELETE FROM order_items WHERE (order_id, line_no) = ({o}, {l})"),
                    6 => format!("INSERT INTO customers (id, email, tier) VALUES ('00000000-0000-0000-0000-00000000000{c}', 'e', 't') ON CONFLICT DO NOTHING"),
                    7 => format!("UPDATE customers SET tier = 't{}' WHERE id = '00000000-0000-0000-0000-00000000000{c}'", rng.random_range(0..3)),
                    _ => format!("DELETE FROM customers WHERE id = '00000000-0000-0000-0000-00000000000{c}'"),
                });
            }
            tx.push("COMMIT".into());
            source.batch_execute(&tx.join(";\n")).await.unwrap();
        }
        catch_up(&db, &specs, logical).await;
        load_all(&db).await;
        assert_every_table_follows(&db, &specs, &format!("{name} round {round}")).await;
        if logical {
            // Logical capture: every committed state of every key of every table.
            assert_every_table_matches_the_truth(&db, &specs, &basis).await;
        }
    }
    db.cleanup().await;
}

#[tokio::test]
async fn one_timestamp_pipeline_captures_every_table_of_a_schema() {
    steps_then_random_rounds(false, "timestamp").await;
}

#[tokio::test]
async fn one_logical_pipeline_captures_every_table_of_a_schema_with_one_slot() {
    steps_then_random_rounds(true, "logical").await;
}
