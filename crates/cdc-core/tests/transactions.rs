//! Timestamp capture and the shape of source transactions: a row that a transaction writes
//! and deletes again never committed and leaves no version. Each compared with the
//! trigger-fed ground truth, and `verify` holds.

use crate::common::{assert_history_exact, capture, load};
use cdc_core::test_utils::{install_audit, TestDb};
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
