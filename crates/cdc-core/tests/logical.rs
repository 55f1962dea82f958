//! Logical-replication capture: every committed version in commit order, a consistent
//! initial copy under load, the slot confirmed only after files are durable, heartbeats.
//! Compared with the trigger-fed ground truth stamped with commit times.

use crate::common::{assert_history_exact_on, load, load_in_chunks};
use cdc_core::capture::logical::LogicalCapture;
use cdc_core::capture::{ChangeSource, PassOutcome};
use cdc_core::changelog::ChangeLogSink;
use cdc_core::event::CaptureMode;
use cdc_core::progress::Progress;
use cdc_core::slot::lag as slot_lag;
use cdc_core::table::Column;
use cdc_core::test_utils::{connect, install_audit, Basis, TestDb};
use fake::rand::rngs::StdRng;
use fake::rand::{RngExt, SeedableRng};

pub async fn logical_pass(db: &TestDb) -> PassOutcome {
    logical_pass_with(db, 50_000).await
}

/// One pass writing files of at most `max_rows` events (plus the rest of a transaction).
async fn logical_pass_with(db: &TestDb, max_rows: u64) -> PassOutcome {
    let cfg = db.extractor_config();
    let spec = db.described().await;
    let mut cap = LogicalCapture::new(
        vec![spec.clone()],
        cfg.state_dir.clone(),
        cfg.slot.clone(),
        spec.qualified(),
        cfg.source.clone(),
    )
    .unwrap();
    let mut sink = ChangeLogSink::new(&cfg.log_dir, &spec.name, max_rows);
    let mut client = connect(&cfg.source).await;
    cap.prepare(&client).await.unwrap();
    cap.pass(&mut client, &mut sink).await.unwrap()
}

/// The initial copy, and the snapshot filter it recorded (for the ground truth).
pub async fn logical_snapshot(db: &TestDb) -> Basis {
    let out = logical_pass(db).await;
    assert!(out.snapshot);
    let p = Progress::load(&db.state_dir(), &db.spec.qualified(), CaptureMode::Logical).unwrap();
    Basis::Commit {
        snapshot: p.logical.and_then(|l| l.filter),
    }
}

/// Passes until the slot has confirmed everything written before the call (the test
/// clusters commit asynchronously, so the newest WAL may need a moment to be flushed).
pub async fn drain(db: &TestDb) {
    drain_by(db, async || {
        logical_pass(db).await;
    })
    .await
}

/// Runs `pass` until the slot has confirmed everything written before the call.
pub async fn drain_by(db: &TestDb, pass: impl AsyncFn()) {
    let source = db.source_client().await;
    let target: i64 = source
        .query_one("SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::int8", &[])
        .await
        .unwrap()
        .get(0);
    for _ in 0..200 {
        pass().await;
        let confirmed: i64 = source
            .query_one(
                "SELECT (confirmed_flush_lsn - '0/0'::pg_lsn)::int8 FROM pg_replication_slots WHERE slot_name = $1",
                &[&db.name],
            )
            .await
            .unwrap()
            .get(0);
        if confirmed >= target {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("the slot did not catch up");
}

#[tokio::test]
async fn logical_a_key_updated_many_times_between_captures_gets_every_version() {
    let db = TestDb::new("logical_every_version").await;
    let source = db.source_client().await;
    install_audit(&source).await;
    let basis = logical_snapshot(&db).await;
    for i in 0..12 {
        source
            .execute("UPDATE orders SET quantity = $1 WHERE id = 5", &[&(i + 2)])
            .await
            .unwrap();
    }
    source
        .batch_execute("UPDATE orders SET quantity = quantity WHERE id = 5")
        .await
        .unwrap();
    drain(&db).await;
    load(&db).await;
    assert_history_exact_on(&db, &basis).await;
    let wh = db.warehouse_client().await;
    let n: i64 = wh
        .query_one(
            "SELECT count(*) FROM dim_orders_history WHERE order_key = 5",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        n, 13,
        "the copied version and twelve updates; the no-op adds nothing"
    );
    db.cleanup().await;
}

#[tokio::test]
async fn logical_changes_inside_one_transaction_collapse_to_the_committed_state() {
    let db = TestDb::new("logical_one_tx").await;
    let source = db.source_client().await;
    install_audit(&source).await;
    let basis = logical_snapshot(&db).await;
    source
        .batch_execute(
            "BEGIN;
             UPDATE orders SET order_status = 'a' WHERE id = 1;
             UPDATE orders SET order_status = 'b' WHERE id = 1;
             INSERT INTO orders (id, customer_id, product_id, quantity, unit_price) VALUES (500, 1, 1, 1, 1.00);
             DELETE FROM orders WHERE id = 500;
             DELETE FROM orders WHERE id = 2;
             INSERT INTO orders (id, customer_id, product_id, quantity, unit_price) VALUES (2, 9, 9, 9, 9.00);
             COMMIT;",
        )
        .await
        .unwrap();
    // Delete then re-insert in two transactions: a closed chain and a new one.
    source
        .batch_execute("DELETE FROM orders WHERE id = 3")
        .await
        .unwrap();
    source
        .batch_execute("INSERT INTO orders (id, customer_id, product_id, quantity, unit_price) VALUES (3, 3, 3, 3, 3.00)")
        .await
        .unwrap();
    // A primary-key change: the old key is deleted, the new one inserted.
    source
        .batch_execute("UPDATE orders SET id = 600 WHERE id = 4")
        .await
        .unwrap();
    drain(&db).await;
    load(&db).await;
    assert_history_exact_on(&db, &basis).await;
    let wh = db.warehouse_client().await;
    let flags = |id: i32| {
        let wh = &wh;
        async move {
            wh.query("SELECT is_current, is_deleted FROM dim_orders_history WHERE order_key = $1 ORDER BY valid_from", &[&id])
                .await
                .unwrap()
                .iter()
                .map(|r| (r.get::<_, bool>(0), r.get::<_, bool>(1)))
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(
        flags(1).await.len(),
        2,
        "one version for two updates in one transaction"
    );
    assert!(
        flags(500).await.is_empty(),
        "inserted and deleted in one transaction: never visible"
    );
    assert_eq!(
        flags(2).await,
        vec![(false, false), (true, false)],
        "delete + insert in one transaction is an update"
    );
    assert_eq!(
        flags(3).await,
        vec![(false, true), (true, false)],
        "separate transactions: a new chain"
    );
    assert_eq!(flags(4).await, vec![(false, true)]);
    assert_eq!(flags(600).await, vec![(true, false)]);
    db.cleanup().await;
}

/// A transaction whose changes of a key came to nothing (a value changed and changed back)
/// leaves no version; applied again from another file after the key moved on (a restart
/// before the slot was confirmed streams it again), its intermediate state must not become
/// one.
#[tokio::test]
async fn logical_a_transaction_applied_again_adds_none_of_its_intermediate_states() {
    let db = TestDb::new("logical_again_mid").await;
    let source = db.source_client().await;
    install_audit(&source).await;
    let basis = logical_snapshot(&db).await;
    source
        .batch_execute(
            "BEGIN;
             UPDATE orders SET quantity = quantity + 100 WHERE id = 1;
             UPDATE orders SET quantity = quantity - 100 WHERE id = 1;
             COMMIT;",
        )
        .await
        .unwrap();
    source
        .batch_execute("DELETE FROM orders WHERE id = 1")
        .await
        .unwrap();
    drain(&db).await;
    load(&db).await;
    assert_history_exact_on(&db, &basis).await;
    let wh = db.warehouse_client().await;
    let versions = async || -> i64 {
        wh.query_one(
            "SELECT count(*) FROM dim_orders_history WHERE order_key = 1",
            &[],
        )
        .await
        .unwrap()
        .get(0)
    };
    let before = versions().await;
    let processed = db.log_dir().join(cdc_core::changelog::PROCESSED_DIR);
    let mut files: Vec<_> = std::fs::read_dir(&processed)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    files.sort();
    for (i, f) in files.iter().enumerate() {
        std::fs::copy(
            f,
            db.log_dir()
                .join(format!("orders_99990101T000000.000000Z_{i:010}.jsonl")),
        )
        .unwrap();
    }
    let totals = load(&db).await;
    assert_eq!(totals.applied.versions_inserted, 0, "{totals:?}");
    assert_eq!(versions().await, before);
    assert_history_exact_on(&db, &basis).await;
    db.cleanup().await;
}

#[tokio::test]
async fn logical_initial_copy_while_writers_are_busy_misses_and_doubles_nothing() {
    let db = TestDb::new("logical_busy_copy").await;
    let source = db.source_client().await;
    install_audit(&source).await;
    source
        .batch_execute("INSERT INTO orders (customer_id, product_id, quantity, unit_price) SELECT g, g, 1, 1.00 FROM generate_series(1, 300) g")
        .await
        .unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..3_u64 {
        let client = db.source_client().await;
        let stop = stop.clone();
        writers.push(tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(w);
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) || n < 50 {
                let id: i32 = rng.random_range(1..320);
                let sql = match rng.random_range(0..10) {
                    0 => format!("DELETE FROM orders WHERE id = {id}"),
                    1 => "INSERT INTO orders (customer_id, product_id, quantity, unit_price) VALUES (1, 1, 1, 1.00)".into(),
                    _ => format!("UPDATE orders SET quantity = quantity + 1, order_status = 'w{w}' WHERE id = {id}"),
                };
                client.batch_execute(&sql).await.unwrap();
                n += 1;
            }
        }));
    }
    // The slot is created and the copy taken while they write.
    tokio::time::sleep(std::time::Duration::from_millis(30)).await;
    let basis = logical_snapshot(&db).await;
    logical_pass(&db).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    drain(&db).await;
    load(&db).await;
    assert_history_exact_on(&db, &basis).await;
    db.cleanup().await;
}

#[tokio::test]
async fn logical_randomized_concurrent_rounds_match_the_ground_truth_version_by_version() {
    let db = TestDb::new("logical_randomized").await;
    let source = db.source_client().await;
    install_audit(&source).await;
    let basis = logical_snapshot(&db).await;
    let mut rng = StdRng::seed_from_u64(99);
    for _round in 0..8 {
        let mut tasks = Vec::new();
        for w in 0..3_u64 {
            let client = db.source_client().await;
            let seed = rng.random::<u64>();
            tasks.push(tokio::spawn(async move {
                let mut rng = StdRng::seed_from_u64(seed);
                for _ in 0..rng.random_range(5..30) {
                    let id: i32 = rng.random_range(1..40);
                    let stmts: Vec<String> = (0..rng.random_range(1..4))
                        .map(|_| match rng.random_range(0..8) {
                            0 => format!("DELETE FROM orders WHERE id = {id}"),
                            1 => format!(
                                "INSERT INTO orders (id, customer_id, product_id, quantity, unit_price) VALUES ({id}, {w}, 1, 1, 1.00) ON CONFLICT (id) DO NOTHING"
                            ),
                            2 => format!("UPDATE orders SET quantity = quantity WHERE id = {id}"),
                            _ => format!("UPDATE orders SET quantity = {}, order_status = 'r{w}' WHERE id = {id}", rng.random_range(1..9)),
                        })
                        .collect();
                    // Serialization conflicts between writers are fine: the ground truth only
                    // records what committed.
                    let _ = client.batch_execute(&format!("BEGIN; {}; COMMIT;", stmts.join("; "))).await;
                    let _ = client.batch_execute("ROLLBACK").await;
                }
            }));
        }
        // Capture while they write, in small files (a transaction is never split).
        logical_pass_with(&db, 4).await;
        for t in tasks {
            t.await.unwrap();
        }
        logical_pass_with(&db, 4).await;
        if rng.random_bool(0.5) {
            load_in_chunks(&db, 3).await;
        }
    }
    drain(&db).await;
    load_in_chunks(&db, 2).await;
    assert_history_exact_on(&db, &basis).await;
    // Files are cut at transaction boundaries once full: at most 4 events plus the rest of
    // one transaction (3 statements, a key change being two events).
    let processed = db.log_dir().join("processed");
    let mut sizes = Vec::new();
    for f in std::fs::read_dir(&processed).unwrap() {
        let text = std::fs::read_to_string(f.unwrap().path()).unwrap();
        sizes.push(text.lines().count());
    }
    assert!(sizes.len() > 8, "{sizes:?}");
    assert!(sizes.iter().all(|&n| n <= 4 + 6), "{sizes:?}");
    db.cleanup().await;
}

#[tokio::test]
async fn logical_an_idle_table_still_advances_its_slot() {
    let db = TestDb::new("logical_idle").await;
    let source = db.source_client().await;
    logical_snapshot(&db).await;
    // WAL from another table: nothing for us, but the slot must not hold it.
    source
        .batch_execute(
            // A synchronous commit, so that its WAL is written before the lag is read (the
            // test clusters commit asynchronously).
            "SET synchronous_commit = on; CREATE TABLE other (x int);
             INSERT INTO other SELECT generate_series(1, 20000)",
        )
        .await
        .unwrap();
    let before = slot_lag(&source, &db.name).await.unwrap().unwrap();
    assert!(before.confirmed_lag_bytes > 100_000, "{before:?}");
    let end_of_other: String = source
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    let out = logical_pass(&db).await;
    assert_eq!(out.events, 0);
    assert!(out.files.is_empty(), "no file when nothing changed");
    // The slot no longer holds the other table's WAL (other tests may write more meanwhile).
    let passed: bool = source
        .query_one(
            "SELECT confirmed_flush_lsn >= $2::text::pg_lsn FROM pg_replication_slots WHERE slot_name = $1",
            &[&db.name, &end_of_other],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        passed,
        "confirmed position moved past {end_of_other}: {:?}",
        slot_lag(&source, &db.name).await
    );
    db.cleanup().await;
}

#[tokio::test]
async fn logical_unchanged_toasted_values_are_taken_from_the_old_image() {
    let mut db = TestDb::new("logical_toast").await;
    let source = db.source_client().await;
    source
        .batch_execute("ALTER TABLE orders ADD COLUMN note text")
        .await
        .unwrap();
    db.spec.columns.push(Column::new("note", "text"));
    logical_snapshot(&db).await;
    // A value large and random enough to be stored out of line (TOASTed), then an update
    // that leaves it alone: pgoutput does not resend it.
    for sql in [
        "UPDATE orders SET note = (SELECT string_agg(md5(random()::text), '') FROM generate_series(1, 4000)) WHERE id = 1",
        "UPDATE orders SET quantity = quantity + 1 WHERE id = 1",
    ] {
        source.batch_execute(sql).await.unwrap();
    }
    drain(&db).await;
    let totals = load(&db).await;
    assert_eq!(totals.quarantined, 0);
    let note_len: i32 = source
        .query_one("SELECT length(note) FROM orders WHERE id = 1", &[])
        .await
        .unwrap()
        .get(0);
    let rows = db
        .warehouse_client()
        .await
        .query(
            "SELECT length(note), quantity FROM dim_orders_history WHERE order_key = 1 ORDER BY valid_from",
            &[],
        )
        .await
        .unwrap();
    let got: Vec<(Option<i32>, i32)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(got.len(), 3, "{got:?}");
    assert_eq!(
        (got[0].0, got[1].0, got[2].0),
        (None, Some(note_len), Some(note_len))
    );
    assert_eq!(got[2].1, got[1].1 + 1);
    db.cleanup().await;
}
