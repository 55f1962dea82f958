//! Randomized rounds of changes, compared with the trigger-fed ground truth version by
//! version. Within a round a key changes at most once (timestamp capture sees one state of a
//! key per pass, by design); across rounds anything goes: inserts, updates, no-op updates,
//! deletes, re-inserts of deleted keys, several files per pass, several passes per load.

use crate::common::{assert_history_exact, capture_with, load, load_in_chunks};
use cdc_core::test_utils::{install_audit, TestDb};
use fake::rand::rngs::StdRng;
use fake::rand::{RngExt, SeedableRng};
use std::collections::BTreeSet;
use tokio_postgres::Client;

async fn ids(client: &Client) -> Vec<i32> {
    client
        .query("SELECT id FROM orders ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// One random statement touching `id` (an existing key) or inserting a new/deleted key.
fn statement(rng: &mut StdRng, id: Option<i32>, reinsert: Option<i32>) -> String {
    match (id, reinsert) {
        (_, Some(dead)) => format!(
            "INSERT INTO orders (id, customer_id, product_id, quantity, unit_price) VALUES ({dead}, {}, {}, {}, {}.{:02})",
            rng.random_range(1..100),
            rng.random_range(1..100),
            rng.random_range(1..10),
            rng.random_range(1..500),
            rng.random_range(0..100)
        ),
        (Some(id), None) => match rng.random_range(0..5) {
            0 => format!("DELETE FROM orders WHERE id = {id}"),
            1 => format!("UPDATE orders SET quantity = quantity WHERE id = {id}"),
            2 => format!("UPDATE orders SET unit_price = {}.{:02} WHERE id = {id}", rng.random_range(1..900), rng.random_range(0..100)),
            3 => format!("UPDATE orders SET order_status = 'status{}' WHERE id = {id}", rng.random_range(0..4)),
            _ => format!("UPDATE orders SET quantity = {}, customer_id = customer_id + 1 WHERE id = {id}", rng.random_range(1..50)),
        },
        (None, None) => format!(
            "INSERT INTO orders (customer_id, product_id, quantity, unit_price, order_status) VALUES ({}, {}, {}, {}.{:02}, 'new')",
            rng.random_range(1..100),
            rng.random_range(1..100),
            rng.random_range(1..10),
            rng.random_range(1..500),
            rng.random_range(0..100)
        ),
    }
}

#[tokio::test]
async fn randomized_rounds_match_the_ground_truth_version_by_version() {
    // The loader holds at most this many events at once: chunk boundaries fall anywhere.
    for (seed, chunk) in [(11_u64, 1), (23, 4), (5_077, 32_768)] {
        let db = TestDb::new(&format!("randomized_{seed}")).await;
        let source = db.source_client().await;
        install_audit(&source).await;
        let mut rng = StdRng::seed_from_u64(seed);
        let mut deleted: BTreeSet<i32> = BTreeSet::new();
        capture_with(&db, 5).await;
        for round in 0..12 {
            let existing = ids(&source).await;
            let mut touched = BTreeSet::new();
            let mut stmts = Vec::new();
            for _ in 0..rng.random_range(1..25) {
                let r = rng.random_range(0..10);
                if r < 2 || existing.is_empty() {
                    stmts.push(statement(&mut rng, None, None));
                } else if r < 3 && !deleted.is_empty() {
                    let dead = *deleted
                        .iter()
                        .nth(rng.random_range(0..deleted.len()))
                        .unwrap();
                    if touched.insert(dead) {
                        deleted.remove(&dead);
                        stmts.push(statement(&mut rng, None, Some(dead)));
                    }
                } else {
                    let id = existing[rng.random_range(0..existing.len())];
                    if touched.insert(id) {
                        let s = statement(&mut rng, Some(id), None);
                        if s.starts_with("DELETE") {
                            deleted.insert(id);
                        }
                        stmts.push(s);
                    }
                }
            }
            // Some rounds in one transaction, some statement by statement.
            if rng.random_bool(0.5) {
                source
                    .batch_execute(&format!("BEGIN; {}; COMMIT;", stmts.join("; ")))
                    .await
                    .unwrap();
            } else {
                for s in &stmts {
                    source.batch_execute(s).await.unwrap();
                }
            }
            capture_with(&db, rng.random_range(1..20)).await;
            if rng.random_bool(0.6) || round == 11 {
                load_in_chunks(&db, chunk).await;
            }
        }
        assert_history_exact(&db).await;
        db.cleanup().await;
    }
}

#[tokio::test]
async fn concurrent_writers_holding_transactions_open_across_polls_lose_nothing() {
    let db = TestDb::new("concurrent_writers").await;
    let source = db.source_client().await;
    install_audit(&source).await;
    source
        .batch_execute(
            "INSERT INTO orders (customer_id, product_id, quantity, unit_price)
             SELECT g, g, 1, 1.00 FROM generate_series(1, 120) g",
        )
        .await
        .unwrap();
    capture_with(&db, 50).await;
    load(&db).await;
    let keys = ids(&source).await;

    // Four writers each change their own keys once, in transactions held open for a while,
    // while capture passes run.
    let mut writers = Vec::new();
    for w in 0..4_usize {
        let mine: Vec<i32> = keys.iter().copied().skip(w).step_by(4).collect();
        let mut client = db.source_client().await;
        writers.push(tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(w as u64);
            for chunk in mine.chunks(5) {
                let tx = client.transaction().await.unwrap();
                for id in chunk {
                    let sql = if rng.random_bool(0.15) {
                        format!("DELETE FROM orders WHERE id = {id}")
                    } else {
                        format!("UPDATE orders SET order_status = 'w{w}', quantity = {} WHERE id = {id}", rng.random_range(2..9))
                    };
                    tx.batch_execute(&sql).await.unwrap();
                }
                tokio::time::sleep(std::time::Duration::from_millis(rng.random_range(5..60))).await;
                tx.commit().await.unwrap();
            }
        }));
    }
    let all_done = async {
        for w in writers {
            w.await.unwrap();
        }
    };
    tokio::pin!(all_done);
    loop {
        tokio::select! {
            _ = &mut all_done => break,
            _ = capture_with(&db, 17) => {}
        }
    }
    capture_with(&db, 17).await;
    load(&db).await;
    assert_history_exact(&db).await;
    db.cleanup().await;
}
