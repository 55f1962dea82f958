//! `verify` finds each kind of broken history.

use crate::common::{capture, load};
use cdc_core::scd2::verify::verify;
use cdc_core::test_utils::TestDb;

#[tokio::test]
async fn verify_reports_overlap_second_current_row_gap_and_stale_current_row() {
    let db = TestDb::new("verify_checks").await;
    let source = db.source_client().await;
    capture(&db).await;
    source
        .batch_execute("UPDATE orders SET order_status = 'a' WHERE id IN (1, 2, 3)")
        .await
        .unwrap();
    capture(&db).await;
    load(&db).await;
    let wh = db.warehouse_client().await;
    let report = verify(&wh, Some(&source), &db.spec).await.unwrap();
    assert!(report.ok(), "{}", report.render("h"));

    // Overlap: key 1's first version ends after the second begins.
    wh.batch_execute(
        "UPDATE dim_orders_history SET valid_to = valid_to + interval '1 second'
         WHERE order_key = 1 AND NOT is_current",
    )
    .await
    .unwrap();
    // Gap: key 2's first version ends before the second begins.
    wh.batch_execute(
        "UPDATE dim_orders_history SET valid_to = valid_from + interval '1 microsecond'
         WHERE order_key = 2 AND NOT is_current",
    )
    .await
    .unwrap();
    // A second current row for key 3 (only possible without the unique index).
    wh.batch_execute(
        "DROP INDEX dim_orders_history_one_current;
         UPDATE dim_orders_history SET valid_to = NULL, is_current = true WHERE order_key = 3 AND NOT is_current;",
    )
    .await
    .unwrap();
    // The source moved on without capture: key 4's current row is stale.
    source
        .batch_execute("UPDATE orders SET order_status = 'moved' WHERE id = 4")
        .await
        .unwrap();

    let report = verify(&wh, Some(&source), &db.spec).await.unwrap();
    let text = report.render("dim_orders_history");
    assert!(!report.ok());
    let failed = |name: &str| {
        report
            .checks
            .iter()
            .find(|c| c.name.contains(name))
            .unwrap()
            .violations
    };
    assert_eq!(failed("one current row"), 1, "{text}");
    assert!(failed("contiguous") >= 2, "{text}");
    assert!(failed("equals the source") >= 1, "{text}");
    assert!(
        text.contains("key 1") && text.contains("overlaps"),
        "{text}"
    );
    assert!(text.contains("key 2") && text.contains("gap"), "{text}");
    assert!(text.contains("key 3 has 2 current rows"), "{text}");
    assert!(text.contains("key 4: source"), "{text}");
    db.cleanup().await;
}
