//! Capture and apply scenarios, each compared with the trigger-fed ground truth.

use crate::common::{assert_history_exact, capture, load};
use cdc_core::test_utils::{install_audit, TestDb};

#[tokio::test]
async fn initial_snapshot_captures_every_row_once_and_then_nothing() {
    let db = TestDb::new("initial_snapshot").await;
    let source = db.source_client().await;
    install_audit(&source).await;
    let rows: i64 = source
        .query_one("SELECT count(*) FROM orders", &[])
        .await
        .unwrap()
        .get(0);
    assert!(rows >= 10, "init scripts load sample rows");

    let out = capture(&db).await;
    assert!(out.snapshot);
    assert_eq!(out.rows as i64, rows);
    assert_eq!(out.files.len(), 1);
    let first_line = std::fs::read_to_string(&out.files[0]).unwrap();
    let first: serde_json::Value =
        serde_json::from_str(first_line.lines().next().unwrap()).unwrap();
    assert_eq!(first["op"], "r");
    assert_eq!(first["source"]["table"], "orders");
    assert!(
        first["after"]["unit_price"].is_string(),
        "numeric keeps its exact text"
    );

    let totals = load(&db).await;
    assert_eq!(totals.applied.versions_inserted as i64, rows);
    assert_history_exact(&db).await;

    let again = capture(&db).await;
    assert_eq!(again.events, 0);
    assert!(again.files.is_empty(), "no file when nothing changed");
    db.cleanup().await;
}

#[tokio::test]
async fn inserts_updates_deletes_and_no_op_updates_become_exact_versions() {
    let db = TestDb::new("exact_versions").await;
    let source = db.source_client().await;
    install_audit(&source).await;
    capture(&db).await;
    load(&db).await;

    source
        .batch_execute(
            "INSERT INTO orders (customer_id, product_id, quantity, unit_price) VALUES (42, 7, 3, 10.05);
             UPDATE orders SET order_status = 'shipped' WHERE id = 1;
             DELETE FROM orders WHERE id = 2;
             UPDATE orders SET quantity = quantity WHERE id = 3;",
        )
        .await
        .unwrap();
    capture(&db).await;
    load(&db).await;
    assert_history_exact(&db).await;

    let wh = db.warehouse_client().await;
    let v = |id: i32| {
        let wh = &wh;
        async move {
            wh.query(
                "SELECT order_status, is_current, is_deleted, valid_to IS NULL FROM dim_orders_history
                 WHERE order_key = $1 ORDER BY valid_from",
                &[&id],
            )
            .await
            .unwrap()
        }
    };
    let one = v(1).await;
    assert_eq!(one.len(), 2, "an update adds a version");
    assert_eq!(one[1].get::<_, String>(0), "shipped");
    assert!(one[1].get::<_, bool>(1));
    let two = v(2).await;
    assert_eq!(two.len(), 1);
    assert!(
        !two[0].get::<_, bool>(1) && two[0].get::<_, bool>(2),
        "a delete closes the chain"
    );
    assert_eq!(
        v(3).await.len(),
        1,
        "an update that changes nothing adds nothing"
    );
    db.cleanup().await;
}

#[tokio::test]
async fn delete_then_reinsert_of_a_key_starts_a_new_chain() {
    let db = TestDb::new("reinsert").await;
    let source = db.source_client().await;
    install_audit(&source).await;
    capture(&db).await;
    load(&db).await;
    source
        .batch_execute("DELETE FROM orders WHERE id = 4")
        .await
        .unwrap();
    capture(&db).await;
    load(&db).await;
    source
        .batch_execute("INSERT INTO orders (id, customer_id, product_id, quantity, unit_price) VALUES (4, 1, 1, 1, 1.00)")
        .await
        .unwrap();
    // Delete and re-insert between two captures as well (two transactions: timestamp capture
    // cannot see that a delete and an insert shared one).
    source
        .batch_execute("DELETE FROM orders WHERE id = 5")
        .await
        .unwrap();
    source
        .batch_execute("INSERT INTO orders (id, customer_id, product_id, quantity, unit_price) VALUES (5, 2, 2, 2, 2.00)")
        .await
        .unwrap();
    capture(&db).await;
    load(&db).await;
    assert_history_exact(&db).await;
    let wh = db.warehouse_client().await;
    for id in [4, 5] {
        let rows = wh
            .query("SELECT is_deleted, is_current FROM dim_orders_history WHERE order_key = $1 ORDER BY valid_from", &[&id])
            .await
            .unwrap();
        let flags: Vec<(bool, bool)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        assert_eq!(flags, vec![(true, false), (false, true)], "key {id}");
    }
    db.cleanup().await;
}

#[tokio::test]
async fn a_primary_key_change_ends_the_old_key_and_starts_the_new_one() {
    let db = TestDb::new("key_change").await;
    let source = db.source_client().await;
    install_audit(&source).await;
    capture(&db).await;
    load(&db).await;
    source
        .batch_execute("UPDATE orders SET id = 700 WHERE id = 8")
        .await
        .unwrap();
    capture(&db).await;
    load(&db).await;
    assert_history_exact(&db).await;
    let wh = db.warehouse_client().await;
    let old: bool = wh
        .query_one(
            "SELECT is_deleted FROM dim_orders_history WHERE order_key = 8",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(old, "the old key's chain is closed");
    db.cleanup().await;
}

#[tokio::test]
async fn a_transaction_that_commits_after_a_poll_is_still_captured() {
    let db = TestDb::new("late_commit").await;
    let source = db.source_client().await;
    install_audit(&source).await;
    capture(&db).await;
    load(&db).await;

    // A writer stamps id 5 first but commits last.
    let mut late = db.source_client().await;
    let tx = late.transaction().await.unwrap();
    tx.execute("UPDATE orders SET order_status = 'late' WHERE id = 5", &[])
        .await
        .unwrap();
    source
        .batch_execute("UPDATE orders SET order_status = 'early' WHERE id = 6")
        .await
        .unwrap();
    let during = capture(&db).await;
    assert_eq!(during.rows, 1, "only the committed change is visible");
    tx.commit().await.unwrap();
    let after = capture(&db).await;
    assert!(after.rows >= 1, "the late commit is found by the next pass");
    load(&db).await;
    assert_history_exact(&db).await;
    let wh = db.warehouse_client().await;
    let status: String = wh
        .query_one(
            "SELECT order_status FROM dim_orders_history WHERE order_key = 5 AND is_current",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(status, "late");
    db.cleanup().await;
}

#[tokio::test]
async fn a_crash_between_the_file_and_the_progress_loses_and_duplicates_nothing() {
    let db = TestDb::new("crash_progress").await;
    let source = db.source_client().await;
    install_audit(&source).await;
    capture(&db).await;
    let progress = std::fs::read_dir(db.state_dir())
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let before = std::fs::read(&progress).unwrap();
    source
        .batch_execute("UPDATE orders SET quantity = quantity + 1 WHERE id <= 3; DELETE FROM orders WHERE id = 9")
        .await
        .unwrap();
    let out = capture(&db).await;
    assert!(!out.files.is_empty());
    // The process died after the file was durable but before progress was saved.
    std::fs::write(&progress, &before).unwrap();
    source
        .batch_execute("UPDATE orders SET order_status = 'x' WHERE id = 7")
        .await
        .unwrap();
    let again = capture(&db).await;
    assert!(again.rows >= 4, "the lost pass is captured again");
    load(&db).await;
    assert_history_exact(&db).await;
    db.cleanup().await;
}
