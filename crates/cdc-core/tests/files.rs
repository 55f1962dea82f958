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

/// Every kind of bad input in the change-log directory is quarantined with its reason, alone,
/// and nothing is skipped silently: a file that is not UTF-8, a value the warehouse would
/// round or read relative to the load, a symbolic link and a directory named like a file.
#[tokio::test]
async fn each_kind_of_bad_input_is_quarantined_with_its_reason_and_the_rest_applies() {
    let db = TestDb::new("bad_inputs").await;
    let source = db.source_client().await;
    install_audit(&source).await;
    capture(&db).await;
    let line = |id: i32, price: &str, date: &str| {
        format!(
            r#"{{"op":"c","before":null,"after":{{"id":{id},"customer_id":1,"product_id":1,"quantity":1,"unit_price":"{price}","total_amount":"1.00","order_status":"pending","order_date":"{date}","created_at":"2026-01-01T00:00:00+00:00","last_updated":"2026-01-01T00:00:00+00:00"}},"source":{{"schema":"public","table":"orders","ts_us":1767225600000000}},"ts_ms":1767225600000}}"#
        )
    };
    let dir = db.log_dir();
    let name = |n: u32| format!("orders_99990101T000000.000000Z_{n:010}.jsonl");
    // Saved in Latin-1 by an editor: "pending" became "pénding" in one byte.
    let mut latin1 = line(3001, "1.00", "2026-01-01T00:00:00+00:00").into_bytes();
    let at = latin1.windows(7).position(|w| w == b"pending").unwrap();
    latin1[at + 1] = 0xE9;
    latin1.push(b'\n');
    std::fs::write(dir.join(name(1)), latin1).unwrap();
    std::fs::write(
        dir.join(name(2)),
        line(3002, "12.345", "2026-01-01T00:00:00+00:00") + "\n",
    )
    .unwrap();
    std::fs::write(dir.join(name(3)), line(3003, "1.00", "yesterday") + "\n").unwrap();
    #[cfg(unix)]
    std::os::unix::fs::symlink("/etc/hostname", dir.join(name(4))).unwrap();
    std::fs::create_dir(dir.join(name(5))).unwrap();
    std::fs::write(
        dir.join(name(6)),
        line(3006, "12.340", "2026-01-01T00:00:00+00:00") + "\n",
    )
    .unwrap();

    let totals = load(&db).await;
    let dead = dir.join(DEAD_LETTER_DIR);
    let reason = |n: u32| {
        let text = std::fs::read_to_string(dead.join(format!("{}.reason.json", name(n))))
            .unwrap_or_else(|e| panic!("no reason for file {n}: {e}"));
        serde_json::from_str::<serde_json::Value>(&text).unwrap()["error"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    assert!(reason(1).contains("not valid UTF-8"), "{}", reason(1));
    assert!(
        reason(2).contains("unit_price") && reason(2).contains("rounded"),
        "{}",
        reason(2)
    );
    assert!(
        reason(3).contains("order_date") && reason(3).contains("relative to the load"),
        "{}",
        reason(3)
    );
    if cfg!(unix) {
        assert!(reason(4).contains("symbolic link"), "{}", reason(4));
        assert!(
            std::fs::symlink_metadata(dead.join(name(4))).is_ok(),
            "the link itself is kept"
        );
    }
    assert!(reason(5).contains("is a directory"), "{}", reason(5));
    assert_eq!(totals.quarantined, if cfg!(unix) { 5 } else { 4 });
    // The exact value applied; none of the refused ones did.
    let wh = db.warehouse_client().await;
    let keys: Vec<(i32, String)> = wh
        .query(
            "SELECT order_key, unit_price::text FROM dim_orders_history WHERE order_key > 3000 ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(keys, vec![(3006, "12.34".to_owned())]);
    let left: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".jsonl"))
        .collect();
    assert!(left.is_empty(), "nothing left behind: {left:?}");
    db.cleanup().await;
}
