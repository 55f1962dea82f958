//! Shared steps: one capture pass, one loader run, the ground-truth comparison.

use cdc_core::capture::timestamp::TimestampCapture;
use cdc_core::capture::{ChangeSource, PassOutcome};
use cdc_core::changelog::ChangeLogSink;
use cdc_core::scd2::loader::{self, LoaderTotals};
use cdc_core::scd2::verify;
use cdc_core::shutdown::Shutdown;
use cdc_core::test_utils::{
    actual_history, assert_same_history, connect, expected_history_on, Basis, TestDb,
};

/// One timestamp-capture pass with the test's configuration.
pub async fn capture(db: &TestDb) -> PassOutcome {
    capture_with(db, 50_000).await
}

pub async fn capture_with(db: &TestDb, max_rows_per_file: u64) -> PassOutcome {
    let cfg = db.extractor_config();
    let spec = db.described().await;
    let mut cap =
        TimestampCapture::new(vec![spec.clone()], cfg.state_dir.clone()).expect("load progress");
    let mut sink = ChangeLogSink::new(&cfg.log_dir, &spec.name, max_rows_per_file);
    let mut client = connect(&cfg.source).await;
    cap.pass(&mut client, &mut sink)
        .await
        .expect("capture pass")
}

/// `scd2-loader --once`.
pub async fn load(db: &TestDb) -> LoaderTotals {
    loader::run(&db.loader_config(), true, Shutdown::new())
        .await
        .expect("loader run")
}

/// `scd2-loader --once` holding at most `events` events in memory (chunked apply).
pub async fn load_in_chunks(db: &TestDb, events: usize) -> LoaderTotals {
    let mut cfg = db.loader_config();
    cfg.max_events_in_memory = events;
    loader::run(&cfg, true, Shutdown::new())
        .await
        .expect("loader run")
}

/// The history equals the ground truth and every invariant holds.
pub async fn assert_history_exact(db: &TestDb) {
    assert_history_exact_on(db, &Basis::ChangeTime).await
}

pub async fn assert_history_exact_on(db: &TestDb, basis: &Basis) {
    let source = db.source_client().await;
    let warehouse = db.warehouse_client().await;
    let expected = expected_history_on(&source, &db.spec, basis).await;
    let actual = actual_history(&warehouse, &db.spec).await;
    assert_same_history(&expected, &actual);
    let report = verify::verify(&warehouse, Some(&source), &db.spec)
        .await
        .expect("verify");
    assert!(report.ok(), "{}", report.render("history"));
}
