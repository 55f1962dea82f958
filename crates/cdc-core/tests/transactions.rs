//! Timestamp capture and the shape of source transactions: a row that a transaction writes
//! and deletes again never committed and leaves no version; a prepared transaction
//! (`PREPARE TRANSACTION` … `COMMIT PREPARED`) holds the watermark until it commits or rolls
//! back, however many passes run meanwhile. Each compared with the trigger-fed ground truth,
//! and `verify` holds.

use crate::common::{assert_history_exact, capture, load};
use cdc_core::capture::timestamp::TimestampCapture;
use cdc_core::capture::{ChangeSource, PassOutcome};
use cdc_core::changelog::ChangeLogSink;
use cdc_core::scd2::status;
use cdc_core::test_utils::{connect, install_audit, TestDb};
use fake::rand::rngs::StdRng;
use fake::rand::{RngExt, SeedableRng};
use std::collections::BTreeSet;
use tokio_postgres::Client;

/// The versions of one key: (order_status, is_current, is_deleted, valid_to in µs).
async fn versions(wh: &Client, id: i32) -> Vec<(String, bool, bool, Option<i64>)> {
    wh.query(
        "SELECT order_status, is_current, is_deleted, (extract(epoch FROM valid_to) * 1000000)::int8
         FROM dim_orders_history WHERE order_key = $1 ORDER BY valid_from",
        &[&id],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
    .collect()
}

#[tokio::test]
async fn a_row_written_and_deleted_in_one_transaction_leaves_no_version() {
    let db = TestDb::new("tx_insert_delete").await;
    let source = db.source_client().await;
    install_audit(&source).await;
    capture(&db).await;
    load(&db).await;
    let status_of_3: String = source
        .query_one("SELECT order_status FROM orders WHERE id = 3", &[])
        .await
        .unwrap()
        .get(0);

    source
        .batch_execute(
            "BEGIN;
             INSERT INTO orders (id, customer_id, product_id, quantity, unit_price) VALUES (900, 1, 1, 1, 1.00);
             DELETE FROM orders WHERE id = 900;
             COMMIT;
             BEGIN;
             INSERT INTO orders (id, customer_id, product_id, quantity, unit_price) VALUES (901, 1, 1, 1, 1.00);
             UPDATE orders SET order_status = 'never' WHERE id = 901;
             DELETE FROM orders WHERE id = 901;
             COMMIT;
             BEGIN;
             UPDATE orders SET order_status = 'never' WHERE id = 3;
             DELETE FROM orders WHERE id = 3;
             COMMIT;
             -- The insert in a subtransaction, the delete in the transaction.
             BEGIN;
             SAVEPOINT s;
             INSERT INTO orders (id, customer_id, product_id, quantity, unit_price) VALUES (902, 1, 1, 1, 1.00);
             RELEASE SAVEPOINT s;
             DELETE FROM orders WHERE id = 902;
             COMMIT;
             -- A key written and then changed in one transaction: the first key never existed.
             BEGIN;
             INSERT INTO orders (id, customer_id, product_id, quantity, unit_price) VALUES (903, 1, 1, 1, 1.00);
             UPDATE orders SET id = 904 WHERE id = 903;
             COMMIT;
             -- A rolled-back update in a subtransaction: the delete removes the committed row.
             BEGIN;
             SAVEPOINT s;
             UPDATE orders SET order_status = 'rolled back' WHERE id = 4;
             ROLLBACK TO SAVEPOINT s;
             DELETE FROM orders WHERE id = 4;
             COMMIT;",
        )
        .await
        .unwrap();
    let out = capture(&db).await;
    assert_eq!(
        out.deletes, 6,
        "every delete (and the key change) is captured"
    );
    load(&db).await;
    assert_history_exact(&db).await;

    let wh = db.warehouse_client().await;
    for id in [900, 901, 902, 903] {
        assert_eq!(versions(&wh, id).await, vec![], "key {id} never committed");
    }
    let deleted_at: i64 = source
        .query_one(
            "SELECT (extract(epoch FROM ts) * 1000000)::int8 FROM test_audit WHERE key = '3' AND kind = 'd'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        versions(&wh, 3).await,
        vec![(status_of_3, false, true, Some(deleted_at))],
        "the committed version is closed at the delete, and the update in between is no version"
    );
    assert_eq!(versions(&wh, 904).await.len(), 1);
    let four = versions(&wh, 4).await;
    assert_eq!(four.len(), 1);
    assert!(four[0].2, "key 4 is deleted");
    assert_ne!(four[0].0, "rolled back");
    db.cleanup().await;
}

#[tokio::test]
async fn a_delete_in_a_transaction_older_than_the_rows_writer_keeps_its_last_state() {
    // The deleting transaction took its id before the row's writer did: the row is not its
    // own, so its last state (not yet captured) becomes a version.
    let db = TestDb::new("tx_older_deleter").await;
    let source = db.source_client().await;
    install_audit(&source).await;
    capture(&db).await;
    load(&db).await;
    let mut deleter = db.source_client().await;
    let tx = deleter.transaction().await.unwrap();
    tx.batch_execute("SELECT pg_current_xact_id()")
        .await
        .unwrap();
    source
        .batch_execute("UPDATE orders SET order_status = 'committed' WHERE id = 5")
        .await
        .unwrap();
    tx.batch_execute("DELETE FROM orders WHERE id = 5")
        .await
        .unwrap();
    tx.commit().await.unwrap();
    capture(&db).await;
    load(&db).await;
    assert_history_exact(&db).await;
    let wh = db.warehouse_client().await;
    let five = versions(&wh, 5).await;
    assert_eq!(five.len(), 2, "{five:?}");
    assert_eq!(five[1].0, "committed");
    assert!(five[1].2, "closed by the delete");
    db.cleanup().await;
}

/// Fails the test with the fix when the source cluster does not allow prepared transactions.
async fn require_prepared_transactions(source: &Client) {
    let n: String = source
        .query_one("SHOW max_prepared_transactions", &[])
        .await
        .unwrap()
        .get(0);
    assert_ne!(
        n, "0",
        "the source test cluster needs max_prepared_transactions > 0: scripts/local-db.sh sets it \
         at start (restart the cluster: scripts/local-db.sh stop && scripts/local-db.sh start)"
    );
}

/// What the prepared transaction does: it updates key 5, inserts key 950 and deletes key 6.
const PREPARED: &str = "
    UPDATE orders SET order_status = 'prepared' WHERE id = 5;
    INSERT INTO orders (id, customer_id, product_id, quantity, unit_price) VALUES (950, 9, 9, 9, 9.99);
    DELETE FROM orders WHERE id = 6;";

/// Prepares a transaction named `gid` that runs `sql`.
async fn prepare(db: &TestDb, gid: &str, sql: &str) {
    let client = db.source_client().await;
    client
        .batch_execute(&format!("BEGIN; {sql} PREPARE TRANSACTION '{gid}';"))
        .await
        .unwrap();
}

/// Committed traffic while the prepared transaction waits: each statement stamps its rows
/// later than the prepared transaction's.
const TRAFFIC: &[&str] = &[
    "UPDATE orders SET order_status = 'a' WHERE id = 7",
    "INSERT INTO orders (id, customer_id, product_id, quantity, unit_price) VALUES (960, 1, 2, 3, 4.00)",
    "UPDATE orders SET quantity = quantity + 1 WHERE id IN (8, 960)",
    "DELETE FROM orders WHERE id = 9",
];

/// The extractor's loop: one capture object, one sink, one connection across passes.
struct Extractor {
    capture: TimestampCapture,
    sink: ChangeLogSink,
    client: Client,
}

impl Extractor {
    async fn new(db: &TestDb) -> Self {
        let cfg = db.extractor_config();
        let spec = db.described().await;
        Extractor {
            capture: TimestampCapture::new(vec![spec.clone()], cfg.state_dir.clone()).unwrap(),
            sink: ChangeLogSink::new(&cfg.log_dir, &spec.name, 50_000),
            client: connect(&cfg.source).await,
        }
    }

    async fn pass(&mut self) -> PassOutcome {
        self.capture
            .pass(&mut self.client, &mut self.sink)
            .await
            .expect("capture pass")
    }
}

/// Prepares a transaction, runs passes (each in a new process when `restarts`, else in one)
/// and loads while other traffic commits, then finishes it with `finish` and checks the history.
async fn prepared_transaction_case(test: &str, finish: &str, restarts: bool) {
    let db = TestDb::new(test).await;
    let source = db.source_client().await;
    require_prepared_transactions(&source).await;
    install_audit(&source).await;
    let gid = format!("gid_{}", db.name);
    let mut extractor = Extractor::new(&db).await;
    extractor.pass().await;
    load(&db).await;

    prepare(&db, &gid, PREPARED).await;
    for sql in TRAFFIC {
        source.batch_execute(sql).await.unwrap();
        if restarts {
            capture(&db).await;
        } else {
            extractor.pass().await;
        }
        load(&db).await;
    }
    // `status` names the prepared transaction that holds the watermark.
    let warehouse = db.warehouse_client().await;
    let report = status::status(&db.loader_config(), Some(&warehouse), Some(&source))
        .await
        .unwrap();
    let text = report.render();
    assert!(
        text.contains(&format!("held by prepared transaction '{gid}'")),
        "{text}"
    );

    source
        .batch_execute(&format!("{finish} '{gid}'"))
        .await
        .unwrap();
    if restarts {
        capture(&db).await;
    } else {
        extractor.pass().await;
    }
    load(&db).await;
    assert_history_exact(&db).await;
    let wh = db.warehouse_client().await;
    let five = versions(&wh, 5).await;
    let six = versions(&wh, 6).await;
    let added = versions(&wh, 950).await;
    if finish == "COMMIT PREPARED" {
        assert_eq!(five.last().unwrap().0, "prepared", "{five:?}");
        assert!(six.last().unwrap().2, "the prepared delete is captured");
        assert_eq!(added.len(), 1, "the prepared insert is captured");
    } else {
        assert_eq!(five.len(), 1, "{five:?}");
        assert!(!six.last().unwrap().2);
        assert!(added.is_empty());
    }
    // Once it is gone, the watermark moves on with the traffic again.
    source
        .batch_execute("UPDATE orders SET order_status = 'after' WHERE id = 10")
        .await
        .unwrap();
    let after = if restarts {
        capture(&db).await
    } else {
        extractor.pass().await
    };
    assert_eq!(after.rows, 1, "only the new change is read: {after:?}");
    load(&db).await;
    assert_history_exact(&db).await;
    db.cleanup().await;
}

#[tokio::test]
async fn a_prepared_transaction_committed_after_many_passes_is_captured() {
    prepared_transaction_case("prepared_commit", "COMMIT PREPARED", false).await;
}

#[tokio::test]
async fn a_prepared_transaction_committed_after_extractor_restarts_is_captured() {
    prepared_transaction_case("prepared_commit_restarts", "COMMIT PREPARED", true).await;
}

#[tokio::test]
async fn a_prepared_transaction_rolled_back_after_many_passes_leaves_nothing() {
    prepared_transaction_case("prepared_rollback", "ROLLBACK PREPARED", false).await;
}

#[tokio::test]
async fn the_initial_copy_waits_for_a_transaction_prepared_before_it() {
    let db = TestDb::new("prepared_before_copy").await;
    let source = db.source_client().await;
    require_prepared_transactions(&source).await;
    install_audit(&source).await;
    let gid = format!("gid_{}", db.name);
    // (No update of a key that exists: the copy shows each row's state when it is taken, not
    // the states before it, which the ground truth holds.)
    prepare(
        &db,
        &gid,
        "INSERT INTO orders (id, customer_id, product_id, quantity, unit_price) VALUES (950, 9, 9, 9, 9.99);
         DELETE FROM orders WHERE id = 6;",
    )
    .await;
    let mut extractor = Extractor::new(&db).await;
    for _ in 0..2 {
        let out = extractor.pass().await;
        assert_eq!(
            out.events, 0,
            "no copy while a prepared transaction may commit older rows"
        );
    }
    assert!(
        std::fs::read_dir(db.state_dir()).map_or(true, |mut d| d.next().is_none()),
        "no progress saved"
    );
    source
        .batch_execute(&format!("COMMIT PREPARED '{gid}'"))
        .await
        .unwrap();
    let copy = extractor.pass().await;
    assert!(copy.snapshot && copy.rows > 0, "{copy:?}");
    load(&db).await;
    assert_history_exact(&db).await;
    db.cleanup().await;
}

/// Randomized rounds of traffic with the transaction shapes above mixed in: ordinary
/// changes, rows written and deleted in one transaction, committed rows updated and deleted
/// in one transaction, and prepared transactions left open across rounds, then committed or
/// rolled back; passes by one long-running extractor or by restarted ones.
#[tokio::test]
async fn randomized_transaction_shapes_match_the_ground_truth() {
    for seed in [3_u64, 41] {
        let db = TestDb::new(&format!("tx_randomized_{seed}")).await;
        let source = db.source_client().await;
        require_prepared_transactions(&source).await;
        install_audit(&source).await;
        let mut rng = StdRng::seed_from_u64(seed);
        let mut extractor = Extractor::new(&db).await;
        extractor.pass().await;
        let mut next_id = 100_000;
        // The open prepared transaction: its gid and the keys it holds locked.
        let mut open: Option<(String, Vec<i32>)> = None;
        for round in 0..14 {
            let live: Vec<i32> = source
                .query("SELECT id FROM orders ORDER BY id", &[])
                .await
                .unwrap()
                .iter()
                .map(|r| r.get(0))
                .collect();
            // Keys changed this round (each once, so that the previous state was captured)
            // and keys a prepared transaction holds.
            let mut touched: BTreeSet<i32> = open.iter().flat_map(|(_, k)| k.clone()).collect();
            let pick = |rng: &mut StdRng, touched: &mut BTreeSet<i32>| {
                let free: Vec<i32> = live
                    .iter()
                    .copied()
                    .filter(|k| !touched.contains(k))
                    .collect();
                (!free.is_empty()).then(|| {
                    let k = free[rng.random_range(0..free.len())];
                    touched.insert(k);
                    k
                })
            };
            for _ in 0..rng.random_range(2..10) {
                let insert = |id: i32, rng: &mut StdRng| {
                    format!(
                        "INSERT INTO orders (id, customer_id, product_id, quantity, unit_price) VALUES ({id}, {}, 1, {}, 1.00)",
                        rng.random_range(1..50),
                        rng.random_range(1..9)
                    )
                };
                let sql = match rng.random_range(0..7) {
                    0 => {
                        next_id += 1;
                        insert(next_id, &mut rng)
                    }
                    1 => {
                        next_id += 1;
                        let id = next_id;
                        let middle = if rng.random_bool(0.5) {
                            format!("UPDATE orders SET order_status = 'never' WHERE id = {id};")
                        } else {
                            String::new()
                        };
                        format!(
                            "BEGIN; {}; {middle} DELETE FROM orders WHERE id = {id}; COMMIT",
                            insert(id, &mut rng)
                        )
                    }
                    2 => match pick(&mut rng, &mut touched) {
                        Some(k) => format!(
                            "BEGIN; UPDATE orders SET order_status = 'never' WHERE id = {k}; DELETE FROM orders WHERE id = {k}; COMMIT"
                        ),
                        None => continue,
                    },
                    3 => match pick(&mut rng, &mut touched) {
                        Some(k) => format!("DELETE FROM orders WHERE id = {k}"),
                        None => continue,
                    },
                    _ => match pick(&mut rng, &mut touched) {
                        Some(k) => format!(
                            "UPDATE orders SET order_status = 's{}', quantity = {} WHERE id = {k}",
                            rng.random_range(0..5),
                            rng.random_range(1..9)
                        ),
                        None => continue,
                    },
                };
                source.batch_execute(&sql).await.unwrap();
            }
            match open.take() {
                None if rng.random_bool(0.5) => {
                    let mut keys = Vec::new();
                    let mut sql = String::new();
                    for _ in 0..2 {
                        if let Some(k) = pick(&mut rng, &mut touched) {
                            keys.push(k);
                            sql.push_str(&format!(
                                "UPDATE orders SET order_status = 'prepared {round}' WHERE id = {k};"
                            ));
                        }
                    }
                    next_id += 1;
                    sql.push_str(&format!(
                        "INSERT INTO orders (id, customer_id, product_id, quantity, unit_price) VALUES ({next_id}, 1, 1, 1, 1.00);"
                    ));
                    let gid = format!("gid_{}_{round}", db.name);
                    prepare(&db, &gid, &sql).await;
                    open = Some((gid, keys));
                }
                None => {}
                Some((gid, keys)) => {
                    if rng.random_bool(0.4) {
                        let finish = if rng.random_bool(0.7) {
                            "COMMIT PREPARED"
                        } else {
                            "ROLLBACK PREPARED"
                        };
                        source
                            .batch_execute(&format!("{finish} '{gid}'"))
                            .await
                            .unwrap();
                    } else {
                        open = Some((gid, keys));
                    }
                }
            }
            if rng.random_bool(0.3) {
                capture(&db).await;
            } else {
                extractor.pass().await;
            }
            if rng.random_bool(0.5) {
                load(&db).await;
            }
        }
        if let Some((gid, _)) = open.take() {
            source
                .batch_execute(&format!("COMMIT PREPARED '{gid}'"))
                .await
                .unwrap();
        }
        extractor.pass().await;
        load(&db).await;
        assert_history_exact(&db).await;
        db.cleanup().await;
    }
}
