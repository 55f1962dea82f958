//! The loader's handling of files: idempotent replay, quarantine of bad files.

use crate::common::{assert_history_exact, capture, load};
use cdc_core::changelog::{file_name, DEAD_LETTER_DIR, PROCESSED_DIR};
use cdc_core::test_utils::{install_audit, TestDb};

async fn history_rows(db: &TestDb) -> Vec<(i32, String, bool)> {
    let wh = db.warehouse_client().await;
    wh.query(
        "SELECT order_key, valid_from::text, is_current FROM dim_orders_history ORDER BY 1, 2",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2)))
    .collect()
}

#[tokio::test]
async fn replaying_a_file_or_the_same_changes_in_another_file_changes_nothing() {
    let db = TestDb::new("replay").await;
    let source = db.source_client().await;
    install_audit(&source).await;
    capture(&db).await;
    source
        .batch_execute("UPDATE orders SET order_status = 'shipped' WHERE id IN (1, 2); DELETE FROM orders WHERE id = 3")
        .await
        .unwrap();
    capture(&db).await;
    load(&db).await;
    let before = history_rows(&db).await;

    let processed = db.log_dir().join(PROCESSED_DIR);
    let mut archived: Vec<_> = std::fs::read_dir(&processed)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    archived.sort();
    assert_eq!(archived.len(), 2);
    for (i, f) in archived.iter().enumerate() {
        // The same file again under its own name, and its events under a new name.
        std::fs::copy(f, db.log_dir().join(file_name(f))).unwrap();
        std::fs::copy(
            f,
            db.log_dir()
                .join(format!("orders_99990101T000000.000000Z_{i:010}.jsonl")),
        )
        .unwrap();
    }
    let totals = load(&db).await;
    assert_eq!(
        totals.skipped_already_applied, 2,
        "files already applied are skipped by name"
    );
    assert_eq!(totals.applied.files, 2, "renamed copies are applied");
    assert_eq!(totals.applied.versions_inserted, 0, "and add nothing");
    assert_eq!(totals.applied.versions_closed, 0);
    assert_eq!(history_rows(&db).await, before);
    assert_history_exact(&db).await;
    db.cleanup().await;
}

#[tokio::test]
async fn a_malformed_file_is_quarantined_with_its_reason_and_the_next_file_still_applies() {
    let db = TestDb::new("quarantine").await;
    std::fs::create_dir_all(db.log_dir()).unwrap();
    let bad = db
        .log_dir()
        .join("orders_20000101T000000.000000Z_0000000000.jsonl");
    let good_line = r#"{"op":"c","before":null,"after":{"id":1000,"customer_id":1,"product_id":1,"quantity":1,"unit_price":"1.00","total_amount":"1.00","order_status":"pending","order_date":"2026-01-01T00:00:00+00:00","created_at":"2026-01-01T00:00:00+00:00","last_updated":"2026-01-01T00:00:00+00:00"},"source":{"schema":"public","table":"orders","ts_us":1767225600000000},"ts_ms":1767225600000}"#;
    std::fs::write(
        &bad,
        format!("{good_line}\n{{\"op\": \"u\", this is not json\n"),
    )
    .unwrap();
    let source = db.source_client().await;
    install_audit(&source).await;
    capture(&db).await;

    let totals = load(&db).await;
    assert_eq!(totals.quarantined, 1);
    assert_eq!(totals.applied.files, 1, "the capture file after it applied");
    let dead = db.log_dir().join(DEAD_LETTER_DIR);
    assert!(
        dead.join(file_name(&bad)).exists(),
        "the bad file is kept, not lost"
    );
    let reason =
        std::fs::read_to_string(dead.join(format!("{}.reason.json", file_name(&bad)))).unwrap();
    let reason: serde_json::Value = serde_json::from_str(&reason).unwrap();
    assert_eq!(reason["line"], 2, "{reason}");
    assert!(
        reason["error"]
            .as_str()
            .unwrap()
            .contains("not a change event"),
        "{reason}"
    );
    // Nothing of the bad file was applied, not even its valid first line.
    let wh = db.warehouse_client().await;
    let n: i64 = wh
        .query_one(
            "SELECT count(*) FROM dim_orders_history WHERE order_key = 1000",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0);
    assert_history_exact(&db).await;
    db.cleanup().await;
}

#[tokio::test]
async fn a_file_whose_values_the_warehouse_rejects_is_quarantined_alone() {
    let db = TestDb::new("reject_values").await;
    let source = db.source_client().await;
    install_audit(&source).await;
    capture(&db).await;
    std::fs::create_dir_all(db.log_dir()).unwrap();
    // Parses, but "lots" is no integer: the database refuses the batch.
    let bad = db
        .log_dir()
        .join("orders_99990101T000000.000000Z_0000000001.jsonl");
    std::fs::write(
        &bad,
        r#"{"op":"c","before":null,"after":{"id":2000,"customer_id":1,"product_id":1,"quantity":"lots","unit_price":"1.00","total_amount":"1.00","order_status":"pending","order_date":"2026-01-01T00:00:00+00:00","created_at":"2026-01-01T00:00:00+00:00","last_updated":"2026-01-01T00:00:00+00:00"},"source":{"schema":"public","table":"orders","ts_us":1767225600000000},"ts_ms":1767225600000}
"#,
    )
    .unwrap();
    let totals = load(&db).await;
    assert_eq!(totals.quarantined, 1);
    assert!(db
        .log_dir()
        .join(DEAD_LETTER_DIR)
        .join(file_name(&bad))
        .exists());
    assert_history_exact(&db).await;
    db.cleanup().await;
}
